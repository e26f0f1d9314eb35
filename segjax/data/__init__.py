"""Datasets, looked up by name from the config through one registry.

A dataset loader takes the config's ``data`` section and returns a :class:`Dataset`: random-access sources of
feature dicts per split (see :mod:`segjax.data.features`: ``image``, ``mask``, optionally ``instances`` and
``border_weights``), and what the model needs to know (number of classes and channels). Adding a dataset is one
loader function and one ``@register_dataset`` line; the trainer does not change.

Data sets read from files (``isbi2012``, ``dsb2018``) find them in ``data.manual_dir``, else in
``$SEGJAX_DATA/<name>``, else in ``../shared/data/<name>`` next to the repository.
"""

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections
import numpy as np

from segjax.data.features import IGNORE_LABEL
from segjax.errors import SegjaxError
from segjax.registry import Registry


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Splits of a prepared dataset and its shape facts.

  Attributes:
    name: registry name.
    num_classes: number of classes including background (class 0).
    num_channels: image channels (1 or 3).
    class_names: one name per class.
    splits: split name -> random-access source (``len`` and ``__getitem__`` returning a feature dict).
    same_size: whether all images have one size (else training needs ``data.crop_size``).
    has_instances: whether examples carry ``instances`` and ``border_weights``.
    source: what the records were prepared from (the TFDS builder's full name, which names its settings and, for
      file-based data, a fingerprint of the files); a resumed run must read the same.
  """

  name: str
  num_classes: int
  num_channels: int
  class_names: tuple[str, ...]
  splits: dict[str, Any]
  same_size: bool = True
  has_instances: bool = False
  source: str = ""

  def split(self, name: str) -> Any:
    """The source of split ``name``; a SegjaxError names the available splits otherwise."""
    if name not in self.splits:
      raise SegjaxError(f"dataset '{self.name}' has no split '{name}'; available: {', '.join(self.splits)}.")
    return self.splits[name]


DatasetLoader = Callable[[ml_collections.ConfigDict], Dataset]
DATASETS: Registry[DatasetLoader] = Registry("dataset", "data.name")


def register_dataset(name: str) -> Callable[[DatasetLoader], DatasetLoader]:
  """Decorator registering a loader function under ``name``; ValueError if the name is taken."""
  return DATASETS.register(name)


def load_dataset(config: ml_collections.ConfigDict) -> Dataset:
  """Prepares (if needed) and opens the dataset named by ``config.name``."""
  return DATASETS.lookup(config.name)(config)


def prepare(builder: Any, manual_dir: str | None = None) -> None:
  """Prepares a TFDS builder's data once (a no-op when already prepared), saying so in one line.

  TFDS writes into a temporary directory and renames it when complete, so a failed preparation leaves nothing that
  looks prepared; the next run starts again. In a multi-process job only process 0 prepares; the others wait.
  """
  import jax
  import tensorflow_datasets as tfds

  # Several processes (multi-host, shared file system): process 0 prepares, the others wait for it and then read.
  if not builder.is_prepared() and jax.process_index() == 0:
    print(f"preparing {builder.info.full_name} in {builder.data_dir} ...", flush=True)
    tfds.display_progress_bar(False)  # one line instead of per-split bars that garble the training bar
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(f"segjax prepared {builder.info.full_name}")
    if jax.process_index() != 0:
      builder.info.read_from_directory(builder.data_dir)


def data_root() -> str:
  """Where file-based data sets live by default: ``$SEGJAX_DATA``, else ``../shared/data`` beside the repository."""
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  return os.environ.get("SEGJAX_DATA") or os.path.join(os.path.dirname(repo), "shared", "data")


def manual_dir(config: ml_collections.ConfigDict, name: str) -> str:
  """The folder holding data set ``name``'s files: ``data.manual_dir`` or ``<data_root()>/<name>``."""
  path = config.get("manual_dir") or os.path.join(data_root(), name)
  if not os.path.isdir(path):
    raise SegjaxError(
      f"{name}: data folder '{path}' does not exist; set data.manual_dir (or $SEGJAX_DATA) to where the {name} files "
      "are."
    )
  return path


class MappedSource:
  """A random-access source whose elements are ``fn(source[i])`` (e.g. renaming or remapping features)."""

  def __init__(self, source: Any, fn: Callable[[Mapping[str, Any]], dict[str, Any]]):
    self.source, self.fn = source, fn

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self.fn(self.source[index])


@register_dataset("synthetic_cells")
def load_synthetic_cells(config: ml_collections.ConfigDict) -> Dataset:
  """The embedded default: ``synthetic_cells/<config.variant>``, generated into ``config.tfds_data_dir``."""
  from segjax.data import synthetic

  variants = [c.name for c in synthetic.SyntheticCells.BUILDER_CONFIGS]
  if config.variant not in variants:
    raise SegjaxError(
      f"unknown synthetic_cells variant '{config.variant}' (config key data.variant); available: {', '.join(variants)}."
    )
  builder = synthetic.SyntheticCells(config=config.variant, data_dir=config.get("tfds_data_dir"))
  prepare(builder)
  bc = builder.builder_config
  class_names = (
    ("background", "cell")
    if bc.num_classes == 2
    else ("background",) + tuple(f"class_{i}" for i in range(1, bc.num_classes))
  )
  splits = {name: builder.as_data_source(name) for name in builder.info.splits}
  return Dataset(
    "synthetic_cells",
    bc.num_classes,
    bc.num_channels,
    class_names,
    splits,
    has_instances=True,
    source=builder.info.full_name,
  )


@register_dataset("isbi2012")
def load_isbi2012(config: ml_collections.ConfigDict) -> Dataset:
  """ISBI 2012 EM membranes (class 1 = membrane): ``train`` and ``validation`` (``data.validation_slices``)."""
  from segjax.data import isbi2012

  folder = manual_dir(config, "isbi2012")
  bc = isbi2012.builder_config(folder, tuple(config.get("validation_slices", (25, 26, 27, 28, 29))), _sigma(config))
  builder = isbi2012.Isbi2012(config=bc, data_dir=config.get("tfds_data_dir"))
  prepare(builder, folder)
  splits = {name: builder.as_data_source(name) for name in builder.info.splits}
  return Dataset("isbi2012", 2, 1, ("cell", "membrane"), splits, has_instances=True, source=builder.info.full_name)


@register_dataset("dsb2018")
def load_dsb2018(config: ml_collections.ConfigDict) -> Dataset:
  """DSB 2018 nuclei (class 1 = nucleus), RGB of mixed sizes: ``train``, ``validation``, ``test`` (80/10/10)."""
  from segjax.data import dsb2018

  folder = manual_dir(config, "dsb2018")
  # Pairs and fingerprints the files first: unpaired or mis-sized files fail before anything is prepared.
  builder = dsb2018.Dsb2018(config=dsb2018.builder_config(folder, _sigma(config)), data_dir=config.get("tfds_data_dir"))
  prepare(builder, folder)
  splits = {name: builder.as_data_source(name) for name in builder.info.splits}
  return Dataset(
    "dsb2018",
    2,
    3,
    ("background", "nucleus"),
    splits,
    same_size=False,
    has_instances=True,
    source=builder.info.full_name,
  )


@register_dataset("segmentation_folder")
def load_segmentation_folder(config: ml_collections.ConfigDict) -> Dataset:
  """Your own images and masks (see :mod:`segjax.data.folder` for the ``data`` keys)."""
  from segjax.data import folder

  bc = folder.folder_config(config)
  builder = folder.SegmentationFolder(config=bc, data_dir=config.get("tfds_data_dir"))
  prepare(builder)
  splits = {name: builder.as_data_source(name) for name in builder.info.splits}
  names = tuple(config.get("class_names") or ()) or tuple(f"class_{c}" for c in range(bc.num_classes))
  if len(names) != bc.num_classes:
    raise SegjaxError(f"data.class_names has {len(names)} names for {bc.num_classes} classes (data.num_classes).")
  return Dataset(
    "segmentation_folder",
    bc.num_classes,
    bc.num_channels,
    names,
    splits,
    same_size=False,
    has_instances=bool(bc.instance_dir),
    source=builder.info.full_name,
  )


PET_TRIMAP_BORDER = {"ignore": IGNORE_LABEL, "pet": 1, "background": 0}
"""What the trimap's third value (the uncertain border around the pet) becomes, by ``data.trimap_border``."""


def pet_features(features: Mapping[str, Any], border_class: int) -> dict[str, Any]:
  """``oxford_iiit_pet`` features -> segjax's; trimap 1 (pet) -> 1, 2 (background) -> 0, 3 (border) -> border_class."""
  trimap = np.asarray(features["segmentation_mask"])
  lookup = np.array([IGNORE_LABEL, 1, 0, border_class], np.uint8)
  return {
    "image": np.asarray(features["image"]),
    "mask": lookup[np.clip(trimap, 0, 3)],
    "name": features.get("file_name", ""),
  }


@register_dataset("oxford_iiit_pet")
def load_oxford_iiit_pet(config: ml_collections.ConfigDict) -> Dataset:
  """The standard TFDS ``oxford_iiit_pet`` (prepared in ``data.tfds_data_dir``): background / pet segmentation.

  Splits are TFDS split names, slices included (e.g. ``train[:90%]``). grain reads ArrayRecord files, so the data
  must be prepared with ``tfds build oxford_iiit_pet --file_format=array_record``.
  """
  import tensorflow_datasets as tfds

  border = config.get("trimap_border", "ignore")
  if border not in PET_TRIMAP_BORDER:
    raise SegjaxError(f"unknown data.trimap_border '{border}'; use one of {', '.join(PET_TRIMAP_BORDER)}.")
  builder = tfds.builder("oxford_iiit_pet", data_dir=config.get("tfds_data_dir"), file_format="array_record")
  try:
    prepare(builder)
  except Exception as e:  # no network here: TFDS raises assorted download errors
    raise SegjaxError(
      f"oxford_iiit_pet is not prepared in '{builder.data_dir}' and could not be downloaded ({type(e).__name__}); run "
      "`tfds build oxford_iiit_pet --file_format=array_record` where there is network access and point "
      "data.tfds_data_dir at the result."
    ) from e
  split_names = {config.get(k) for k in ("train_split", "eval_split", "test_split") if config.get(k)}
  try:
    sources = {name: builder.as_data_source(name) for name in split_names}
  except NotImplementedError as e:  # prepared as TFRecord, which has no random access
    raise SegjaxError(
      f"oxford_iiit_pet in '{builder.data_dir}' is not in ArrayRecord format; rebuild it with `tfds build "
      "oxford_iiit_pet --file_format=array_record`."
    ) from e
  relabel = functools.partial(pet_features, border_class=PET_TRIMAP_BORDER[border])
  splits = {name: MappedSource(source, relabel) for name, source in sources.items()}
  return Dataset("oxford_iiit_pet", 2, 3, ("background", "pet"), splits, same_size=False, source=builder.info.full_name)


def _sigma(config: ml_collections.ConfigDict) -> float:
  return float(config.get("border_sigma", 5.0))
