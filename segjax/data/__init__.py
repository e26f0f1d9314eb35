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
from ml_collections import config_dict

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
    task: ``'segmentation'`` (features ``image``, ``mask``) or ``'classification'`` (``image``, ``label``), as
      ``config.task`` must be.
  """

  name: str
  num_classes: int
  num_channels: int
  class_names: tuple[str, ...]
  splits: dict[str, Any]
  same_size: bool = True
  has_instances: bool = False
  source: str = ""
  task: str = "segmentation"

  def split(self, name: str) -> Any:
    """The source of split ``name``; a SegjaxError names the available splits otherwise."""
    if name not in self.splits:
      raise SegjaxError(f"dataset '{self.name}' has no split '{name}'; available: {', '.join(self.splits)}.")
    return self.splits[name]


DatasetLoader = Callable[[ml_collections.ConfigDict], Dataset]
DATASETS: Registry[DatasetLoader] = Registry("dataset", "data.name")


def register_dataset(
  name: str, *, defaults: Mapping[str, Any] | None = None, task: str = "segmentation"
) -> Callable[[DatasetLoader], DatasetLoader]:
  """Decorator registering a loader function under ``name``; ValueError if the name is taken.

  ``task`` is what its examples are for (``'segmentation'`` or ``'classification'``); ``defaults`` are the data set's
  own ``data`` keys with their defaults (the shared ones are in
  :func:`segjax.config.base_config`); :func:`segjax.config.with_defaults` fills them in, so the loader reads its keys
  directly.
  """
  return DATASETS.register(name, defaults=dict(defaults or {}), task=task)


def load_dataset(config: ml_collections.ConfigDict) -> Dataset:
  """Prepares (if needed) and opens the dataset named by ``config.name`` (a ``data`` section; the keys it lacks take
  their defaults, :func:`segjax.config.with_data_defaults`)."""
  from segjax.config import with_data_defaults

  loader = DATASETS.lookup(config.name)
  return loader(with_data_defaults(config))


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
  path = config.manual_dir or os.path.join(data_root(), name)
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


@register_dataset("synthetic_cells", defaults={"variant": "gray"})
def load_synthetic_cells(config: ml_collections.ConfigDict) -> Dataset:
  """The embedded default: ``synthetic_cells/<config.variant>``, generated into ``config.tfds_data_dir``."""
  from segjax.data import synthetic

  variants = [c.name for c in synthetic.SyntheticCells.BUILDER_CONFIGS]
  if config.variant not in variants:
    raise SegjaxError(
      f"unknown synthetic_cells variant '{config.variant}' (config key data.variant); available: {', '.join(variants)}."
    )
  builder = synthetic.SyntheticCells(config=config.variant, data_dir=config.tfds_data_dir)
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


_FILE_KEYS = {"manual_dir": config_dict.placeholder(str), "border_sigma": 5.0}
"""The keys of a data set read from files: their folder (None: :func:`manual_dir`'s default) and the sigma of the
U-Net border weights prepared with them."""


@register_dataset(
  "isbi2012",
  # the challenge's test labels were never released: the last five training slices validate
  defaults={**_FILE_KEYS, "validation_slices": (25, 26, 27, 28, 29), "test_split": config_dict.placeholder(str)},
)
def load_isbi2012(config: ml_collections.ConfigDict) -> Dataset:
  """ISBI 2012 EM membranes (class 1 = membrane): ``train`` and ``validation`` (``data.validation_slices``)."""
  from segjax.data import isbi2012

  folder = manual_dir(config, "isbi2012")
  bc = isbi2012.builder_config(folder, tuple(config.validation_slices), float(config.border_sigma))
  builder = isbi2012.Isbi2012(config=bc, data_dir=config.tfds_data_dir)
  prepare(builder, folder)
  splits = {name: builder.as_data_source(name) for name in builder.info.splits}
  return Dataset("isbi2012", 2, 1, ("cell", "membrane"), splits, has_instances=True, source=builder.info.full_name)


@register_dataset("dsb2018", defaults=_FILE_KEYS)
def load_dsb2018(config: ml_collections.ConfigDict) -> Dataset:
  """DSB 2018 nuclei (class 1 = nucleus), RGB of mixed sizes: ``train``, ``validation``, ``test`` (80/10/10)."""
  from segjax.data import dsb2018

  folder = manual_dir(config, "dsb2018")
  # Pairs and fingerprints the files first: unpaired or mis-sized files fail before anything is prepared.
  builder = dsb2018.Dsb2018(
    config=dsb2018.builder_config(folder, float(config.border_sigma)), data_dir=config.tfds_data_dir
  )
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


@register_dataset(
  "segmentation_folder",
  defaults={
    "image_dir": config_dict.placeholder(str),
    "mask_dir": config_dict.placeholder(str),
    "instance_dir": config_dict.placeholder(str),
    # dicts in a config file, or 'value:class,...' / 'split:file,...' on the command line
    "mask_values": config_dict.placeholder(object),  # None: detected (0/255 binary masks) or the values are classes
    "ignore_value": config_dict.placeholder(int),
    "num_classes": 2,
    "num_channels": 1,
    "class_names": config_dict.placeholder(tuple),
    "split_files": config_dict.placeholder(object),
    "validation_fraction": 0.1,
    "test_fraction": 0.0,
    # k-fold cross-validation: num_folds K >= 2 validates on fold `fold` (0..K-1) of the non-test images
    "num_folds": 0,
    "fold": 0,
    "border_sigma": 5.0,
  },
)
def load_segmentation_folder(config: ml_collections.ConfigDict) -> Dataset:
  """Your own images and masks (see :mod:`segjax.data.folder` for the ``data`` keys)."""
  from segjax.data import folder

  bc = folder.folder_config(config)
  builder = folder.SegmentationFolder(config=bc, data_dir=config.tfds_data_dir)
  prepare(builder)
  splits = {name: builder.as_data_source(name) for name in builder.info.splits}
  names = tuple(config.class_names or ()) or tuple(f"class_{c}" for c in range(bc.num_classes))
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


@register_dataset("oxford_iiit_pet", defaults={"trimap_border": "ignore"})
def load_oxford_iiit_pet(config: ml_collections.ConfigDict) -> Dataset:
  """The standard TFDS ``oxford_iiit_pet`` (prepared in ``data.tfds_data_dir``): background / pet segmentation.

  Splits are TFDS split names, slices included (e.g. ``train[:90%]``). grain reads ArrayRecord files, so the data
  must be prepared with ``tfds build oxford_iiit_pet --file_format=array_record``.
  """
  import tensorflow_datasets as tfds

  border = config.trimap_border
  if border not in PET_TRIMAP_BORDER:
    raise SegjaxError(f"unknown data.trimap_border '{border}'; use one of {', '.join(PET_TRIMAP_BORDER)}.")
  builder = tfds.builder("oxford_iiit_pet", data_dir=config.tfds_data_dir, file_format="array_record")
  try:
    prepare(builder)
  except Exception as e:  # no network here: TFDS raises assorted download errors
    raise SegjaxError(
      f"oxford_iiit_pet is not prepared in '{builder.data_dir}' and could not be downloaded ({type(e).__name__}); run "
      "`tfds build oxford_iiit_pet --file_format=array_record` where there is network access and point "
      "data.tfds_data_dir at the result."
    ) from e
  split_names = {config[k] for k in ("train_split", "eval_split", "test_split") if config[k]}
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


# --- Image classification (task 'classification'): examples {'image', 'label', 'name'} ---------------------------

_CLASSIFICATION_KEYS = {
  "image_size": 32,  # the model's input: every image is resized (shorter side) and centre-cropped to this square
  "load_size": config_dict.placeholder(int),  # training images' square before the on-device crops (None: image_size)
  "crop_fraction": 1.0,  # evaluation: shorter side image_size / crop_fraction, centre crop (ImageNet: 0.875)
  # per-channel standardisation after scaling to [0, 1]; None: none, or ImageNet's when model.init_from is set
  "mean": config_dict.placeholder(tuple),
  "std": config_dict.placeholder(tuple),
}
"""The ``data`` keys every classification data set has (:func:`segjax.data.classification.classification_inputs`)."""


@register_dataset(
  "synthetic_shapes",
  task="classification",
  defaults={
    **_CLASSIFICATION_KEYS,
    "num_channels": 3,
    "num_train": 3000,
    "num_validation": 300,
    "num_test": 300,
    "data_seed": 0,
  },
)
def load_synthetic_shapes(config: ml_collections.ConfigDict) -> Dataset:
  """Generated in memory: six shapes (disc, ring, square, triangle, cross, bars) in random colours on noisy
  backgrounds, ``data.image_size`` square; ``data.num_train`` / ``num_validation`` / ``num_test`` examples."""
  from segjax.data import classification

  counts = {"train": config.num_train, "validation": config.num_validation, "test": config.num_test}
  splits = classification.shapes_splits(
    image_size=config.image_size, num_channels=config.num_channels, counts=counts, seed=config.data_seed
  )
  source = (
    f"synthetic_shapes/size={config.image_size}/channels={config.num_channels}/counts={counts}/seed={config.data_seed}"
  )
  return Dataset(
    "synthetic_shapes",
    len(classification.SHAPES),
    config.num_channels,
    classification.SHAPES,
    splits,
    source=source,
    task="classification",
  )


@register_dataset(
  "image_folder",
  task="classification",
  defaults={
    **_CLASSIFICATION_KEYS,
    "root": config_dict.placeholder(str),  # root/<class>/*.png, or root/train/<class>/... with root/val/, root/test/
    "num_channels": 3,
    "validation_fraction": 0.1,
    "test_fraction": 0.0,
  },
)
def load_image_folder(config: ml_collections.ConfigDict) -> Dataset:
  """A folder of class sub-folders (:func:`segjax.data.classification.class_folder_splits`); labels in sorted
  class-name order."""
  from segjax.data import classification
  from segjax.data.io import files_fingerprint

  if not config.root:
    raise SegjaxError(
      "config key data.root is not set; point it at a folder of class sub-folders (root/<class>/*.png)."
    )
  classes, splits = classification.class_folder_splits(
    config.root,
    num_channels=config.num_channels,
    validation_fraction=float(config.validation_fraction),
    test_fraction=float(config.test_fraction),
  )
  paths = [path for split in splits.values() for path, _ in split.items]
  source = f"image_folder/{os.path.abspath(config.root)}/{files_fingerprint(sorted(paths))}"
  return Dataset(
    "image_folder",
    len(classes),
    config.num_channels,
    classes,
    splits,
    same_size=False,
    source=source,
    task="classification",
  )


def classification_features(features: Mapping[str, Any]) -> dict[str, Any]:
  """A TFDS image-classification example -> segjax's (``image`` always (H, W, C))."""
  image = np.asarray(features["image"])
  name = features.get("file_name", features.get("id", ""))
  return {
    "image": image[..., None] if image.ndim == 2 else image,
    "label": int(features["label"]),
    "name": name.decode() if isinstance(name, bytes) else str(name),
  }


def load_tfds_classification(config: ml_collections.ConfigDict, name: str, how: str) -> Dataset:
  """A prepared TFDS data set with ``image`` and ``label`` features, read with ``as_data_source`` (ArrayRecord).

  ``how`` says how to prepare it where it is missing (no network is assumed here, so nothing is downloaded)."""
  import tensorflow_datasets as tfds

  try:
    builder = tfds.builder(name, data_dir=config.tfds_data_dir)
  except Exception as e:  # noqa: BLE001 - TFDS raises assorted errors for unknown names
    raise SegjaxError(f"unknown TFDS data set '{name}' (config key data.tfds_name): {e}".splitlines()[0]) from e
  split_names = {config[k] for k in ("train_split", "eval_split", "test_split") if config[k]}
  try:
    sources = {split: builder.as_data_source(split) for split in split_names}
  except (AssertionError, FileNotFoundError, ValueError, NotImplementedError) as e:
    raise SegjaxError(
      f"{name} is not prepared as ArrayRecord in '{builder.data_dir}' ({type(e).__name__}); {how}, and point "
      "data.tfds_data_dir at the result."
    ) from e
  features = builder.info.features
  if "image" not in features or "label" not in features:
    raise SegjaxError(f"TFDS data set '{name}' has no 'image' and 'label' features; it is not an image classifier's.")
  num_channels = int(features["image"].shape[-1] or 3)
  class_names = tuple(features["label"].names)
  splits = {split: MappedSource(source, classification_features) for split, source in sources.items()}
  return Dataset(
    name,
    len(class_names),
    num_channels,
    class_names,
    splits,
    same_size=False,
    source=builder.info.full_name,
    task="classification",
  )


@register_dataset(
  "cifar10",
  task="classification",
  defaults={**_CLASSIFICATION_KEYS, "eval_split": "test", "test_split": config_dict.placeholder(str)},
)
def load_cifar10(config: ml_collections.ConfigDict) -> Dataset:
  """CIFAR-10 (50k train / 10k test 32x32 images, 10 classes) from TFDS; validated on the test split as He et al."""
  return load_tfds_classification(
    config, "cifar10", "run `tfds build cifar10 --file_format=array_record` where there is network access"
  )


@register_dataset(
  "imagenet2012",
  task="classification",
  defaults={
    **_CLASSIFICATION_KEYS,
    "image_size": 224,
    "load_size": 256,
    "crop_fraction": 0.875,
    "test_split": config_dict.placeholder(str),
  },
)
def load_imagenet2012(config: ml_collections.ConfigDict) -> Dataset:
  """ILSVRC 2012 (1.28M train / 50k validation images, 1000 classes) from TFDS."""
  return load_tfds_classification(
    config,
    "imagenet2012",
    "download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from image-net.org into <manual_dir> and run "
    "`tfds build imagenet2012 --file_format=array_record --manual_dir=<manual_dir>`",
  )


@register_dataset(
  "tfds_classification",
  task="classification",
  defaults={**_CLASSIFICATION_KEYS, "tfds_name": config_dict.placeholder(str)},
)
def load_any_tfds_classification(config: ml_collections.ConfigDict) -> Dataset:
  """Any TFDS data set with ``image`` / ``label`` features, by ``data.tfds_name`` (e.g. ``'oxford_flowers102'``)."""
  if not config.tfds_name:
    raise SegjaxError("config key data.tfds_name is not set; name the TFDS data set (e.g. 'oxford_flowers102').")
  return load_tfds_classification(
    config,
    config.tfds_name,
    f"run `tfds build {config.tfds_name} --file_format=array_record` where there is network access",
  )
