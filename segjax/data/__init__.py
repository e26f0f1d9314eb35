"""Datasets, looked up by name from the config through one registry.

A dataset loader takes the config's ``data`` section and returns a :class:`Dataset`: random-access sources of
feature dicts per split (``image`` (H, W, C) uint8, ``mask`` (H, W, 1) uint8 class ids, optionally ``instances``),
and what the model needs to know (number of classes and channels). Adding a dataset is one loader function and one
``@register_dataset`` line; the trainer does not change.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import ml_collections

from segjax.errors import SegjaxError


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Splits of a prepared dataset and its shape facts.

  Attributes:
    name: registry name.
    num_classes: number of classes including background (class 0).
    num_channels: image channels (1 or 3).
    class_names: one name per class.
    splits: split name -> random-access source (``len`` and ``__getitem__`` returning a feature dict).
  """

  name: str
  num_classes: int
  num_channels: int
  class_names: tuple[str, ...]
  splits: dict[str, Any]

  def split(self, name: str) -> Any:
    """The source of split ``name``; a SegjaxError names the available splits otherwise."""
    if name not in self.splits:
      raise SegjaxError(f"dataset '{self.name}' has no split '{name}'; available: {', '.join(self.splits)}.")
    return self.splits[name]


DatasetLoader = Callable[[ml_collections.ConfigDict], Dataset]
DATASETS: dict[str, DatasetLoader] = {}


def register_dataset(name: str) -> Callable[[DatasetLoader], DatasetLoader]:
  """Decorator registering a loader function under ``name``."""

  def register(loader: DatasetLoader) -> DatasetLoader:
    DATASETS[name] = loader
    return loader

  return register


def load_dataset(config: ml_collections.ConfigDict) -> Dataset:
  """Prepares (if needed) and opens the dataset named by ``config.name``."""
  if config.name not in DATASETS:
    raise SegjaxError(
      f"unknown dataset '{config.name}' (config key data.name); available: {', '.join(sorted(DATASETS))}."
    )
  return DATASETS[config.name](config)


def prepare(builder: Any) -> None:
  """Prepares a TFDS builder's data once (a no-op when already prepared), saying so in one line."""
  import tensorflow_datasets as tfds

  if not builder.is_prepared():
    print(f"preparing {builder.info.full_name} in {builder.data_dir} ...", flush=True)
    tfds.display_progress_bar(False)  # one line instead of per-split bars that garble the training bar
    builder.download_and_prepare()


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
  return Dataset("synthetic_cells", bc.num_classes, bc.num_channels, class_names, splits)
