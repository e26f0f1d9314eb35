"""`segmentation_folder`: bring your own data, a folder of images and a folder of masks paired by file stem.

Images may be PNG, TIFF or JPEG, grayscale or RGB, 8- or 16-bit, and of different sizes. Masks hold one value per
pixel; ``mask_values`` maps those values to class ids (e.g. ``{0: 0, 255: 1}``; by default a value is its class id)
and ``ignore_value`` marks pixels without a label. An optional folder of instance-id images adds the U-Net border
weight term. The split comes from list files of stems or from deterministic fractions of the sorted stems.

Used through a config (see ``experiments/configs/folder_unet.py``); nothing needs to be written in code. The prepared
data is named after a hash of the settings and of the files' names, sizes and modification times, so changing either
prepares it again instead of reading stale data.
"""

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from segjax.data.features import IGNORE_LABEL, SegmentationBuilder, make_example, segmentation_features
from segjax.data.io import files_fingerprint, images_by_stem, is_sixteen_bit, pair_by_stem, read_image, read_label
from segjax.errors import SegjaxError

SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(eq=False)
class FolderConfig(tfds.core.BuilderConfig):
  """A folder data set's settings (use :func:`folder_config` to build one from the ``data`` config section).

  Attributes:
    image_dir: folder of images.
    mask_dir: folder of masks with the same stems.
    instance_dir: optional folder of instance-id images with the same stems ('' for none).
    mask_values: (mask value, class id) pairs; empty: each value is its class id.
    ignore_value: mask value meaning "no label" (-1 for none).
    num_classes: number of classes including background.
    num_channels: 1 or 3; images are converted to it.
    sixteen_bit: store 16-bit images (set when any grayscale image is 16-bit).
    splits: (split, stems) pairs.
    border_sigma: sigma of the border weight term in pixels.
    split_dirs: for data sets shipped as per-split folders, (split, image_dir, mask_dir, instance_dir) of each
      split, read instead of the three folders above; empty otherwise.
  """

  image_dir: str = ""
  mask_dir: str = ""
  instance_dir: str = ""
  mask_values: tuple[tuple[int, int], ...] = ()
  ignore_value: int = -1
  num_classes: int = 2
  num_channels: int = 1
  sixteen_bit: bool = False
  splits: tuple[tuple[str, tuple[str, ...]], ...] = ()
  border_sigma: float = 5.0
  split_dirs: tuple[tuple[str, str, str, str], ...] = ()


SPLIT_FOLDER_NAMES = {"train": ("train",), "validation": ("validation", "val", "valid"), "test": ("test",)}
"""Folder names tried for each split when ``data.image_dir`` holds ``{split}`` (e.g. CamVid's train/ val/ test/)."""


def map_mask(mask: np.ndarray, config: FolderConfig, path: str) -> np.ndarray:
  """Mask values -> class ids (``IGNORE_LABEL`` for the ignore value); SegjaxError names a value with no class."""
  table = dict(config.mask_values) if config.mask_values else {v: v for v in range(config.num_classes)}
  if config.ignore_value >= 0:
    table[config.ignore_value] = IGNORE_LABEL
  values = np.unique(mask)
  if unknown := [int(v) for v in values if int(v) not in table]:
    raise SegjaxError(
      f"mask '{path}' holds value {unknown[0]}, which data.mask_values does not map to a class; add it to "
      "data.mask_values or set data.ignore_value."
    )
  lookup = np.zeros(int(values.max()) + 1, np.uint8)
  for v in values:
    lookup[int(v)] = table[int(v)]
  return lookup[mask]


class SegmentationFolder(SegmentationBuilder):
  """TFDS builder for a :class:`FolderConfig`; splits as configured."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    return self.dataset_info_from_configs(
      description=f"Images from {config.image_dir} with masks from {config.mask_dir}.",
      features=segmentation_features(
        config.num_channels,
        image_dtype=np.uint16 if config.sixteen_bit else np.uint8,
        instances=bool(config.instance_dir),
      ),
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator[Any]]:
    del dl_manager  # the folders are given by the config
    return {split: self._generate_examples(split, stems) for split, stems in self.builder_config.splits if stems}

  def _generate_examples(self, split: str, stems: tuple[str, ...]) -> Iterator[tuple[int, dict[str, Any]]]:
    config = self.builder_config
    dirs = dict((s, d) for s, *d in config.split_dirs).get(
      split, (config.image_dir, config.mask_dir, config.instance_dir)
    )
    image_dir, mask_dir, instance_dir = dirs
    images, masks = images_by_stem(image_dir), images_by_stem(mask_dir)
    instance_files = images_by_stem(instance_dir) if instance_dir else {}
    for key, stem in enumerate(stems):
      image = read_image(images[stem], config.num_channels)
      if image.dtype == np.uint8 and config.sixteen_bit:
        image = image.astype(np.uint16) * 257  # the same [0, 1] intensity after normalisation
      mask = map_mask(read_label(masks[stem]), config, masks[stem])
      instances = read_label(instance_files[stem]) if instance_files else None
      yield key, make_example(stem, image, mask, instances, border_sigma=config.border_sigma)


def _read_stems(path: str, split: str) -> tuple[str, ...]:
  if not os.path.isfile(path):
    raise SegjaxError(f"split list '{path}' (config key data.split_files.{split}) does not exist.")
  with open(path) as f:
    return tuple(os.path.splitext(os.path.basename(line.strip()))[0] for line in f if line.strip())


FOLD_SEED = 12345
"""Seed of the permutation that deals the images into cross-validation folds (fixed: folds are stable)."""


def assign_splits(
  stems: list[str],
  *,
  split_files: Mapping[str, str] | None,
  validation_fraction: float,
  test_fraction: float,
  num_folds: int = 0,
  fold: int = 0,
) -> dict[str, tuple[str, ...]]:
  """Split name -> stems, from list files or from fractions of the sorted stems.

    With fractions, ``round(n * fraction)`` of the n sorted stems go to each of ``validation`` and ``test`` (at least
  one where the fraction is positive), spread evenly over the sorted order: validation takes the last stem of each
  of ``n_val`` equal parts of the list, test likewise among those left; the rest train. So no split is
  empty that a positive fraction asks for, and the two fractions do not compete for the same stems.

  With ``num_folds`` K > 1 (k-fold cross-validation, nnU-Net's 5-fold default), the test stems are taken as above
  and the others are dealt into K folds of a fixed permutation (:data:`FOLD_SEED`; fold sizes differ by at most
  one): fold ``fold`` validates, the other K - 1 train, and ``validation_fraction`` is not used. The folds of one
  folder partition its non-test images and do not change between runs.

    Raises:
      SegjaxError: for a fraction outside [0, 1) or fractions that leave no training image, naming the keys.
  """
  if num_folds and (not isinstance(num_folds, int) or num_folds < 2):
    raise SegjaxError(f"data.num_folds must be 0 (no folds) or an integer >= 2, got {num_folds!r}.")
  if num_folds and not (isinstance(fold, int) and 0 <= fold < num_folds):
    raise SegjaxError(f"data.fold must be one of 0..{num_folds - 1} (data.num_folds={num_folds}), got {fold!r}.")
  if split_files and num_folds:
    raise SegjaxError("data.num_folds deals the images into folds itself; unset data.split_files or data.num_folds.")
  if split_files:
    splits = {split: _read_stems(path, split) for split, path in split_files.items()}
    if bad := [s for s in splits if s not in SPLITS]:
      raise SegjaxError(f"unknown split '{bad[0]}' in data.split_files; use {', '.join(SPLITS)}.")
    known = set(stems)
    for split, listed in splits.items():
      if missing := [s for s in listed if s not in known]:
        raise SegjaxError(f"split list {split_files[split]} names '{missing[0]}', which has no image and mask.")
    return splits
  for key, value in (("validation_fraction", validation_fraction), ("test_fraction", test_fraction)):
    if not 0.0 <= value < 1.0:
      raise SegjaxError(f"data.{key} must be in [0, 1), got {value}.")
  ordered = sorted(stems)
  n = len(ordered)
  if num_folds:
    n_test = max(1, round(n * test_fraction)) if test_fraction > 0 else 0
    if n - n_test < num_folds:
      raise SegjaxError(
        f"data.num_folds={num_folds} needs at least {num_folds} images besides the {n_test} test images; "
        f"the folder has {n}. Lower data.num_folds."
      )
    test = _spread(ordered, n_test)
    rest = [stem for stem in ordered if stem not in set(test)]
    order = np.random.default_rng(FOLD_SEED).permutation(len(rest))
    validation = tuple(sorted(rest[i] for position, i in enumerate(order) if position % num_folds == fold))
    taken = set(validation) | set(test)
    return {"train": tuple(s for s in ordered if s not in taken), "validation": validation, "test": test}
  n_val, n_test = (max(1, round(n * f)) if f > 0 else 0 for f in (validation_fraction, test_fraction))
  if n_val + n_test >= n:
    raise SegjaxError(
      f"data.validation_fraction={validation_fraction} and data.test_fraction={test_fraction} of {n} images leave "
      f"no training image ({n_val} validation, {n_test} test); lower them, or list the splits in data.split_files."
    )
  validation = _spread(ordered, n_val)
  rest = [stem for stem in ordered if stem not in set(validation)]
  test = _spread(rest, n_test)
  taken = set(validation) | set(test)
  return {"train": tuple(s for s in ordered if s not in taken), "validation": validation, "test": test}


def _spread(items: list[str], count: int) -> tuple[str, ...]:
  """``count`` of ``items`` evenly spread over them: the last of each of ``count`` equal parts."""
  return tuple(items[(k + 1) * len(items) // count - 1] for k in range(count))


def parse_pairs(value: Any, key: str) -> Any:
  """A ``key:value,key:value`` string of the command line (``--config.data.mask_values=0:0,255:1``) as a dict; any
  other value unchanged. SegjaxError names the config key for text that is not such pairs."""
  if not isinstance(value, str):
    return value
  pairs = [item.split(":", 1) for item in value.split(",") if item.strip()]
  if not pairs or any(len(pair) != 2 or not pair[0].strip() or not pair[1].strip() for pair in pairs):
    raise SegjaxError(f"config key {key} must be pairs like 'a:b,c:d' (or a dict in the config file), got {value!r}.")
  return {k.strip(): v.strip() for k, v in pairs}


def _mask_value_pairs(mask_values: Any) -> tuple[tuple[int, int], ...]:
  mask_values = parse_pairs(mask_values, "data.mask_values")
  if not mask_values:
    return ()
  items = mask_values.items() if hasattr(mask_values, "items") else mask_values
  try:
    return tuple(sorted((int(v), int(c)) for v, c in items))
  except (TypeError, ValueError) as e:
    raise SegjaxError(
      f"data.mask_values must map mask values to class ids, e.g. {{0: 0, 255: 1}}; got {mask_values}."
    ) from e


BINARY_255 = ((0, 0), (255, 1))


def _detected_mask_values(masks: dict[str, str], num_classes: int, data: Mapping[str, Any]) -> tuple:
  """``((0, 0), (255, 1))`` for a 2-class folder whose masks hold 0 and 255 (the common binary export), judged from
  up to 16 masks spread over the sorted names; else ``()`` (values are class ids: 0/1 masks, palette and 1-bit PNGs).
  A later mask with other values is still refused while preparing, naming the file and value."""
  if num_classes != 2 or not masks:
    return ()
  paths = [masks[s] for s in sorted(masks)]
  sample = paths[:: max(1, len(paths) // 16)][:16]
  seen = set().union(*(np.unique(read_label(p)).tolist() for p in sample)) - {data["ignore_value"]}
  if 255 in seen and seen <= {0, 255}:
    logging.info(
      "masks in %s hold 0 and 255: mapped to classes 0 and 1 (set data.mask_values to change)", data["mask_dir"]
    )
    return BINARY_255
  return ()


def folder_config(data: Mapping[str, Any]) -> FolderConfig:
  """Checks the folders and builds the builder config from the ``data`` config section.

  Every image must have a mask of the same size (and an instance map, when ``instance_dir`` is set); the first file
  that breaks this is named in a SegjaxError before anything is prepared (file headers only). Mask values without a
  class are found while preparing; TFDS then discards the partial output.
  """
  from segjax.config import data_section

  data = {**data_section("segmentation_folder").to_dict(), **data}  # the keys not given take their defaults
  for key in ("image_dir", "mask_dir"):
    if not data[key]:
      raise SegjaxError(f"config key data.{key} is not set; point it at the folder of {key.split('_')[0]}s.")
  if "{split}" in data["image_dir"]:
    return _split_folders_config(data)
  images = images_by_stem(data["image_dir"])
  masks = images_by_stem(data["mask_dir"])
  instance_dir = data["instance_dir"] or ""
  instances = images_by_stem(instance_dir) if instance_dir else {}
  pair_by_stem(images, masks, what="mask", folder=data["mask_dir"])
  if instance_dir:
    pair_by_stem(images, instances, what="instance map", folder=instance_dir)
  num_channels = int(data["num_channels"])
  if num_channels not in (1, 3):
    raise SegjaxError(f"data.num_channels must be 1 or 3, got {num_channels}.")
  num_classes = int(data["num_classes"])
  mask_values = _mask_value_pairs(data["mask_values"]) or _detected_mask_values(masks, num_classes, data)
  if bad := [c for _, c in mask_values if not 0 <= c < num_classes]:
    raise SegjaxError(f"data.mask_values maps to class {bad[0]}, outside 0..{num_classes - 1} (data.num_classes).")
  splits = assign_splits(
    list(images),
    split_files=parse_pairs(data["split_files"], "data.split_files"),
    validation_fraction=float(data["validation_fraction"]),
    test_fraction=float(data["test_fraction"]),
    num_folds=data["num_folds"] or 0,
    fold=data["fold"],
  )
  logging.info("folder %s: %s", data["image_dir"], ", ".join(f"{s} {len(v)}" for s, v in splits.items()))
  settings = {
    "image_dir": os.path.abspath(data["image_dir"]),
    "mask_dir": os.path.abspath(data["mask_dir"]),
    "instance_dir": os.path.abspath(instance_dir) if instance_dir else "",
    "mask_values": mask_values,
    "ignore_value": -1 if data["ignore_value"] is None else int(data["ignore_value"]),
    "num_classes": num_classes,
    "num_channels": num_channels,
    "sixteen_bit": num_channels == 1 and any(is_sixteen_bit(p) for p in images.values()),
    "splits": tuple((s, tuple(splits.get(s, ()))) for s in SPLITS),
    "border_sigma": float(data["border_sigma"]),
  }
  files = sorted(images.values()) + sorted(masks.values()) + sorted(instances.values())
  return _named_config(settings, files)


def _split_folders_config(data: Mapping[str, Any]) -> FolderConfig:
  """:func:`folder_config` of a data set shipped as one folder per split: ``data.image_dir`` (and ``mask_dir``,
  ``instance_dir``) hold ``{split}``, filled in with the names of :data:`SPLIT_FOLDER_NAMES`
  (``--config.data.image_dir=/data/camvid/{split} --config.data.mask_dir=/data/camvid/{split}annot``)."""
  templates = {key: data[key] or "" for key in ("image_dir", "mask_dir", "instance_dir")}
  if bad := [key for key in ("mask_dir", "instance_dir") if templates[key] and "{split}" not in templates[key]]:
    raise SegjaxError(f"data.image_dir holds {{split}}, so data.{bad[0]} must too (e.g. '.../{{split}}annot').")
  if data["split_files"] or data["num_folds"]:
    raise SegjaxError(
      "per-split folders ({split} in data.image_dir) are the split; unset data.split_files / num_folds."
    )
  dirs, splits, singles = [], {}, {}
  for split, names in SPLIT_FOLDER_NAMES.items():
    name = next((n for n in names if os.path.isdir(templates["image_dir"].format(split=n))), None)
    if name is None:
      continue
    split_data = {**data, **{k: t.format(split=name) for k, t in templates.items()}, "split_files": None}
    single = folder_config({**split_data, "validation_fraction": 0.0, "test_fraction": 0.0})
    dirs.append((split, single.image_dir, single.mask_dir, single.instance_dir))
    splits[split], singles[split] = dict(single.splits)["train"], single
  if "train" not in splits:
    tried = templates["image_dir"].format(split="train")
    raise SegjaxError(f"data.image_dir holds {{split}} but '{tried}' does not exist; it needs at least a train folder.")
  base = {key: getattr(singles["train"], key) for key in _SHARED}  # mask values as the train folder's
  settings = {
    **base,
    "image_dir": templates["image_dir"],
    "mask_dir": templates["mask_dir"],
    "instance_dir": templates["instance_dir"],
    "splits": tuple((s, splits.get(s, ())) for s in SPLITS),
    "split_dirs": tuple(dirs),
    "sixteen_bit": any(single.sixteen_bit for single in singles.values()),
  }
  logging.info("split folders %s: %s", templates["image_dir"], ", ".join(f"{s} {len(v)}" for s, v in splits.items()))
  files = [p for _, *ds in dirs for d in ds if d for p in sorted(images_by_stem(d).values())]
  return _named_config(settings, files)


def _named_config(settings: dict[str, Any], files: list[str]) -> FolderConfig:
  """The builder config named after a hash of its settings and of its files' names, sizes and times."""
  digest = hashlib.sha1((json.dumps(settings, sort_keys=True) + files_fingerprint(files)).encode()).hexdigest()[:16]
  return FolderConfig(name=f"f{digest}", description=f"images {settings['image_dir']}", **settings)


_SHARED = ("mask_values", "ignore_value", "num_classes", "num_channels", "border_sigma")
