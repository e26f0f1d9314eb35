"""Instance-aware training targets as a view of a data set: the ``mask`` of every example replaced by the classes of
:func:`segjax.instances.instance_targets` (``config.instances.targets``: ``'contour'`` or ``'distance'``).

The targets are computed on the host from the whole instance map, before cropping and augmentation, so an object cut
by a training tile keeps its true boundary (computing them after the crop would draw boundary along the tile's
edge). The geometric augmentations then warp the target classes by nearest neighbour, like every label
(:func:`segjax.data.augment.warp`): classes stay existing ids; a zoom by s scales the boundary's width by s
(0.75-1.33 with the DSB config), which the post-processing tolerates. Everything downstream (weight maps, the loss,
the confusion matrix, prediction) sees an ordinary data set of ``num_target_classes`` classes; the original
instances stay in each example for the instance evaluator.
"""

import dataclasses
import threading
from typing import Any

import ml_collections
import numpy as np

from segjax.data import Dataset
from segjax.data.features import IGNORE_LABEL
from segjax.errors import SegjaxError

TARGET_KINDS = ("contour", "distance")


@dataclasses.dataclass(frozen=True)
class InstanceSettings:
  """``config.instances``: what the network learns and how its output becomes instances.

  Attributes:
    targets: None (the data set's own classes), ``'contour'`` (background / interior / boundary) or ``'distance'``
      (background and ``distance_bins`` levels of the normalised distance to the object's boundary).
    boundary_width: contour targets: width in pixels of the boundary class inside each object.
    distance_bins: distance targets: number of distance levels.
    method: ``'watershed'`` (marker-controlled, for contour or distance targets) or ``'components'`` (connected
      components of the foreground) for evaluation and ``experiments.predict --outputs=instances``.
    min_size: instances with fewer pixels are dropped.
    marker_threshold: probability (contour: of the interior; distance: expected normalised distance) above which a
      pixel seeds an instance.
    foreground_threshold: probability of not being background above which a pixel belongs to an instance.
  """

  targets: str | None = None
  boundary_width: int = 2
  distance_bins: int = 4
  method: str = "components"
  min_size: int = 10
  marker_threshold: float = 0.5
  foreground_threshold: float = 0.5

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict | dict | None) -> "InstanceSettings":
    """Reads ``config.instances`` (None or missing: the defaults); SegjaxError naming a bad key or value."""
    values = dict(config.to_dict() if isinstance(config, ml_collections.ConfigDict) else (config or {}))
    names = {f.name for f in dataclasses.fields(cls)}
    if unknown := sorted(set(values) - names):
      raise SegjaxError(f"unknown config key instances.{unknown[0]}; instances takes: {', '.join(sorted(names))}.")
    settings = cls(**values)
    if settings.targets not in (None, *TARGET_KINDS):
      raise SegjaxError(
        f"config key instances.targets must be None, 'contour' or 'distance', got {settings.targets!r}."
      )
    if settings.method not in ("watershed", "components"):
      raise SegjaxError(f"config key instances.method must be 'watershed' or 'components', got {settings.method!r}.")
    if settings.method == "watershed" and settings.targets is None:
      raise SegjaxError(
        "config key instances.method 'watershed' needs instances.targets 'contour' or 'distance' (the markers come "
        "from the network's interior or distance output); set instances.targets or use method 'components'."
      )
    for key in ("boundary_width", "distance_bins", "min_size"):
      value = getattr(settings, key)
      if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "min_size" else 1):
        raise SegjaxError(f"config key instances.{key} must be a positive integer, got {value!r}.")
    for key in ("marker_threshold", "foreground_threshold"):
      if not 0.0 <= float(getattr(settings, key)) < 1.0:
        raise SegjaxError(f"config key instances.{key} must be in [0, 1), got {getattr(settings, key)!r}.")
    return settings

  @property
  def num_classes(self) -> int:
    """Classes of the targets (only meaningful when ``targets`` is set)."""
    from segjax.instances import num_target_classes

    return num_target_classes(self.targets, distance_bins=self.distance_bins)

  def to_instances(self, probabilities: np.ndarray) -> np.ndarray:
    """(H, W, C) class probabilities -> (H, W) int32 instance ids 0..K by ``method``: the one post-processing of
    evaluation, ``experiments.predict`` and the notebook."""
    from segjax.instances import instances_from_predictions
    from segjax.metrics import label_instances

    if self.method == "components":  # any number of classes: every class but 0 is foreground
      return label_instances(np.argmax(probabilities, -1) > 0, min_size=self.min_size)
    return instances_from_predictions(
      probabilities,
      self.targets,
      min_size=self.min_size,
      marker_threshold=self.marker_threshold,
      foreground_threshold=self.foreground_threshold,
    )

  @property
  def class_names(self) -> tuple[str, ...]:
    if self.targets == "contour":
      return ("background", "interior", "boundary")
    return ("background",) + tuple(f"distance {k}/{self.distance_bins}" for k in range(1, self.distance_bins + 1))


class InstanceTargetSource:
  """A random-access source whose examples carry the instance targets as ``mask`` (computed once per example).

  Pixels the original mask leaves unlabelled (``IGNORE_LABEL``) stay unlabelled. The computed targets are kept (as
  uint8, one byte per pixel) so an example read again (every epoch, every evaluation) costs nothing.
  """

  def __init__(self, source: Any, settings: InstanceSettings):
    self._source, self._settings = source, settings
    self._cache: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self._source)

  def targets(self, index: int, features: dict[str, Any]) -> np.ndarray:
    """The (H, W, 1) uint8 target classes of example ``index``."""
    with self._lock:
      cached = self._cache.get(index)
    if cached is not None:
      return cached
    from segjax.instances import instance_targets

    instances = np.asarray(features["instances"])[..., 0]
    classes = instance_targets(
      instances,
      self._settings.targets,
      boundary_width=self._settings.boundary_width,
      distance_bins=self._settings.distance_bins,
    ).astype(np.uint8)
    classes = np.where(np.asarray(features["mask"])[..., 0] == IGNORE_LABEL, IGNORE_LABEL, classes)[..., None]
    with self._lock:
      self._cache[index] = classes
    return classes

  def __getitem__(self, index: int) -> dict[str, Any]:
    features = dict(self._source[index])
    features["mask"] = self.targets(index, features)
    return features


def with_instance_targets(dataset: Dataset, settings: InstanceSettings) -> Dataset:
  """The data set with ``settings.targets`` as its classes (unchanged when no targets are configured).

  Raises:
    SegjaxError: when targets are configured for a data set without instance maps.
  """
  if settings.targets is None:
    return dataset
  if not dataset.has_instances:
    raise SegjaxError(
      f"config key instances.targets '{settings.targets}' needs instance maps, which dataset '{dataset.name}' has "
      "not (for a folder data set set data.instance_dir); set instances.targets to None."
    )
  return dataclasses.replace(
    dataset,
    num_classes=settings.num_classes,
    class_names=settings.class_names,
    splits={name: InstanceTargetSource(source, settings) for name, source in dataset.splits.items()},
    source=f"{dataset.source}+{settings.targets}(width {settings.boundary_width}, bins {settings.distance_bins})",
  )
