"""Prediction with a trained checkpoint: load, read images, predict probabilities, label maps and instances.

The checkpoint carries its config (with the dataset's number of classes and channels), so a workdir alone is enough.
Images go through the same ``normalize_image`` as training, and are predicted whole or in tiles
(:mod:`segjax.tiling`: overlap-tile, sliding windows, test-time augmentation).
"""

import dataclasses
import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from segjax import viz
from segjax.data.instance_targets import InstanceSettings
from segjax.data.pipeline import Normalization, normalize_image, pad_image_for_model
from segjax.errors import SegjaxError
from segjax.models.geometry import Geometry, eval_geometry
from segjax.registry import import_modules
from segjax.tiling import Tiling, gaussian_weights, overlap_tile_plan, predict_tiled, predict_tiles, sliding_window_plan
from segjax.train import checkpoint
from segjax.train.setup import build_model
from segjax.train.state import TrainState
from segjax.train.step import predict_logits

_whole = jax.jit(predict_tiles, static_argnames=("tta", "output"))


@dataclasses.dataclass
class Predictor:
  """A restored model ready to predict: its config, state and checkpoint step.

  ``state`` is replicated over ``devices`` (this process's devices by default): tiles are split over them.
  """

  config: ml_collections.ConfigDict
  state: TrainState
  step: int
  geometry: Geometry = dataclasses.field(default_factory=Geometry)
  devices: tuple = ()

  @property
  def num_channels(self) -> int:
    """Image channels the model takes (1 or 3)."""
    return int(self.config.dataset_info.num_channels)

  @property
  def num_classes(self) -> int:
    """Classes of the data set the model was trained on."""
    return int(self.config.dataset_info.num_classes)

  def default_tile_size(self) -> int:
    """The training tile (``data.crop_size``) when there was one, else 572 (unpadded U-Net) or 256; for the unpadded
    U-Net at least the smallest tile whose output covers one whole pooling grid (overlap-tile needs one per step)."""
    size = self.config.data.crop_size or (572 if self.geometry.margin else 256)
    if self.geometry.margin:
      size = max(size, self.geometry.align + 2 * self.geometry.margin)
    return self.geometry.fit(size)

  def resolve(self, image_shape: tuple[int, ...], tiling: Tiling) -> tuple[str, int]:
    """The mode ``'auto'`` stands for on an image of ``image_shape``, and the tile size."""
    tile = tiling.tile_size or self.default_tile_size()
    if tiling.mode != "auto":
      return tiling.mode, tile
    if self.geometry.margin:
      return "overlap_tile", tile
    return ("sliding_window" if max(image_shape[:2]) > tile else "whole"), tile

  def predict(self, image: np.ndarray, tiling: Tiling | None = None, *, output: str = "probabilities") -> np.ndarray:
    """Image (H, W, C) uint8/uint16 -> (H, W, K) float32 class probabilities (or logits), by ``tiling``.

    Images go through the training normalisation. ``'whole'`` predicts the image at once (for the unpadded U-Net
    mirrored at its borders to the input whose output covers it); ``'overlap_tile'`` and ``'sliding_window'`` go
    through :mod:`segjax.tiling`. A one-logit binary model gives the two classes' probabilities (1 - p, p).
    """
    tiling = tiling or Tiling()
    mode, tile = self.resolve(image.shape, tiling)
    height, width = image.shape[:2]
    normalized = normalize_image(image, Normalization.from_config(self.config.data))
    if mode == "whole":
      padded = pad_image_for_model(normalized, self.geometry)
      single = jax.tree_util.tree_map(lambda x: x.addressable_data(0), self.state)
      return np.asarray(_whole(single, padded[None], tta=tiling.tta, output=output)[0, :height, :width])
    if mode == "overlap_tile":
      plan, weights = overlap_tile_plan(height, width, self.geometry, tile), None
    else:
      if self.geometry.margin:
        raise SegjaxError("--tiling=sliding_window needs a same-padded model; use overlap_tile for unet_valid.")
      plan = sliding_window_plan(height, width, tile, tiling.overlap)
      weights = gaussian_weights(tile) if tiling.blend == "gaussian" else None
    return predict_tiled(
      self.state,
      normalized,
      plan,
      weights=weights,
      padding=tiling.padding if mode == "sliding_window" else "reflect",
      tta=tiling.tta,
      batch=tiling.batch,
      output=output,
      devices=self.devices or None,
    )

  def predict_logits(self, image: np.ndarray, tiling: Tiling | None = None) -> np.ndarray:
    """Image (H, W, C) -> logits (H, W, outputs), float32 (blended as logits when tiled)."""
    return self.predict(image, tiling, output="logits")

  def predict_probabilities(self, image: np.ndarray, tiling: Tiling | None = None) -> np.ndarray:
    """Image (H, W, C) -> class probabilities (H, W, num_classes), float32."""
    return self.predict(image, tiling)

  def predict_labels(self, image: np.ndarray, tiling: Tiling | None = None) -> np.ndarray:
    """Image (H, W, C) -> label map (H, W) of class ids, uint8: the argmax of the (blended) probabilities."""
    return np.argmax(self.predict(image, tiling), -1).astype(np.uint8)

  @property
  def instances(self) -> InstanceSettings:
    """How the run turns probabilities into instances (its ``config.instances``; runs saved before it existed:
    connected components)."""
    return InstanceSettings.from_config(self.config.instances)

  def predict_instances(
    self, image: np.ndarray, tiling: Tiling | None = None, *, min_size: int | None = None
  ) -> np.ndarray:
    """Image (H, W, C) -> instance ids (H, W), int32, by the run's ``config.instances`` (marker-controlled
    watershed of instance targets, or connected components of the predicted foreground), without instances smaller
    than ``min_size`` pixels (default the run's ``instances.min_size``)."""
    settings = self.instances if min_size is None else dataclasses.replace(self.instances, min_size=min_size)
    return settings.to_instances(self.predict(image, tiling))

  def check_image(self, image: np.ndarray, path: str) -> None:
    """Refuses an image the model cannot take; the SegjaxError names the file."""
    if min(image.shape[:2]) < 2:
      raise SegjaxError(f"'{path}' is {image.shape[0]}x{image.shape[1]} pixels; the model needs at least 2x2.")


OUTPUT_KINDS = ("labels", "overlay", "instances", "probabilities")


def save_outputs(
  directory: str,
  stem: str,
  image: np.ndarray,
  probabilities: np.ndarray,
  kinds: Sequence[str],
  *,
  instances: InstanceSettings | None = None,
) -> None:
  """Writes the asked ``kinds`` of outputs of one image into ``directory``.

  ``labels``: ``<stem>_mask.png`` (pixel value = class id); ``overlay``: ``<stem>_overlay.png``; ``instances``:
  ``<stem>_instances.png``, 16-bit instance ids by ``instances`` (:meth:`InstanceSettings.to_instances`; default
  connected components of the foreground of at least 10 pixels); ``probabilities``: ``<stem>_probabilities.npy``,
  (H, W, classes) float32.

  Raises:
    SegjaxError: naming the folder when it cannot be written, or when the instances do not fit 16 bits.
  """
  from PIL import Image

  labels = np.argmax(probabilities, -1).astype(np.uint8)
  try:
    os.makedirs(directory, exist_ok=True)
    if "labels" in kinds:
      Image.fromarray(labels).save(os.path.join(directory, f"{stem}_mask.png"))
    if "overlay" in kinds:
      Image.fromarray(viz.overlay(image, labels)).save(os.path.join(directory, f"{stem}_overlay.png"))
    if "instances" in kinds:
      ids = (instances or InstanceSettings()).to_instances(probabilities)
      if ids.max() > np.iinfo(np.uint16).max:
        raise SegjaxError(f"'{stem}' has {ids.max()} instances, more than a 16-bit PNG holds.")
      Image.fromarray(ids.astype(np.uint16)).save(os.path.join(directory, f"{stem}_instances.png"))
    if "probabilities" in kinds:
      np.save(os.path.join(directory, f"{stem}_probabilities.npy"), probabilities.astype(np.float32))
  except OSError as e:
    raise SegjaxError(
      f"cannot write predictions to '{directory}' ({e.strerror or e}); pass a writable --output."
    ) from e


def ensemble_workdirs(spec: str) -> list[str]:
  """The workdirs ``experiments.predict --workdir`` names: one workdir, a comma-separated list, or a folder whose
  sub-folders are workdirs (e.g. one per cross-validation fold), in sorted order.

  Raises:
    SegjaxError: naming the path when it is neither a workdir nor a folder of workdirs.
  """
  paths = [p for p in spec.split(",") if p]
  if len(paths) == 1 and not os.path.isdir(checkpoint.checkpoint_dir(paths[0])) and os.path.isdir(paths[0]):
    found = sorted(
      os.path.join(paths[0], name)
      for name in os.listdir(paths[0])
      if os.path.isdir(checkpoint.checkpoint_dir(os.path.join(paths[0], name)))
    )
    if not found:
      raise SegjaxError(f"'{paths[0]}' holds no checkpoints/ and no workdirs with checkpoints; pass a trained workdir.")
    return found
  return paths


class Ensemble:
  """Several predictors (e.g. the folds of a cross-validation) as one: their probabilities averaged, as nnU-Net
  ensembles its folds, before any argmax or instance post-processing. Config, classes, channels, instance settings
  and the image check are the first member's; the members must agree on classes and channels."""

  def __init__(self, predictors: Sequence[Predictor], names: Sequence[str] | None = None):
    if not predictors:
      raise SegjaxError("an ensemble needs at least one trained workdir.")
    first = predictors[0]
    for predictor, name in zip(predictors[1:], (names or [str(i) for i in range(len(predictors))])[1:], strict=True):
      if (predictor.num_classes, predictor.num_channels) != (first.num_classes, first.num_channels):
        raise SegjaxError(
          f"workdir {name} predicts {predictor.num_classes} classes from {predictor.num_channels} channels, the first "
          f"{first.num_classes} from {first.num_channels}; ensemble runs of the same data."
        )
    self.members = list(predictors)

  def __getattr__(self, name: str):  # config, step, num_classes, instances, check_image, ... of the first member
    if name == "members":
      raise AttributeError(name)
    return getattr(self.members[0], name)

  def predict(self, image: np.ndarray, tiling: Tiling | None = None) -> np.ndarray:
    """Image (H, W, C) -> the members' mean class probabilities (H, W, num_classes), float32."""
    total = self.members[0].predict(image, tiling).astype(np.float64)
    for member in self.members[1:]:
      total += member.predict(image, tiling)
    return (total / len(self.members)).astype(np.float32)


def load_ensemble(spec: str, step: int | None = None) -> Predictor | Ensemble:
  """The predictor of one workdir, or the :class:`Ensemble` of the workdirs that ``spec`` names
  (:func:`ensemble_workdirs`)."""
  workdirs = ensemble_workdirs(spec)
  if len(workdirs) == 1:
    return load_predictor(workdirs[0], step)
  return Ensemble([load_predictor(w, step) for w in workdirs], names=workdirs)


TUNED_INSTANCES_FILE = "instances.json"
"""Post-processing chosen on the validation split (``experiments.tune_instances``), kept in the workdir."""


def tuned_instances(workdir: str) -> dict | None:
  """The ``settings`` of ``<workdir>/instances.json`` (keys of ``config.instances``), or None without the file."""
  path = os.path.join(workdir, TUNED_INSTANCES_FILE)
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      settings = json.load(f)["settings"]
    InstanceSettings.from_config(settings)  # names and values checked as config.instances's
  except (ValueError, KeyError, TypeError, SegjaxError) as e:
    raise SegjaxError(
      f"{path} is not a tune_instances result ({e}); delete it or rerun experiments.tune_instances."
    ) from e
  return settings


def load_predictor(workdir: str, step: int | None = None, *, tuned: bool = True) -> Predictor:
  """Restores the checkpoint at ``step`` (default latest) of ``workdir``; SegjaxError if there is none.

  With ``tuned`` (default) the post-processing settings that ``experiments.tune_instances`` chose on the validation
  split (``<workdir>/instances.json``) replace those of the run's ``config.instances``.
  """
  config, step = checkpoint.restore_config(workdir, step)
  if tuned and (settings := tuned_instances(workdir)):
    with config.unlocked():
      config.instances.update(settings)
  import_modules(config.imports)  # modules that registered the run's model, loss, ...
  info = config.dataset_info
  model = build_model(config, info.num_classes, training=False)
  classifier = config.task == "classification"
  geometry = Geometry() if classifier else eval_geometry(model, config.data)
  side = config.data.image_size if classifier else geometry.input_size_for_output(32)
  # Prediction needs the weights and BatchNorm statistics only (the EMA's when the run kept one, as its evaluation
  # used them): their shapes come from the model alone, and the optimizer state is never read.
  variables = jax.eval_shape(
    lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, side, side, info.num_channels)), train=False)
  )
  devices = tuple(jax.local_devices())
  replicated = NamedSharding(Mesh(np.asarray(devices), ("data",)), PartitionSpec())
  manager = checkpoint.create_manager(workdir, read_only=True)
  params, batch_stats = checkpoint.restore_variables(
    manager,
    variables["params"],
    variables.get("batch_stats", {}),
    step,
    ema=config.ema_decay > 0,
    sharding=replicated,
  )
  manager.close()
  state = TrainState(
    step=np.int32(step),
    apply_fn=model.apply,
    params=params,
    tx=optax.identity(),
    opt_state=(),
    batch_stats=batch_stats,
    rng=np.zeros(2, np.uint32),
  )
  state = jax.device_put(state, replicated)
  if classifier:
    return Classifier(config=config, state=state, step=step, devices=devices)
  return Predictor(config=config, state=state, step=step, geometry=geometry, devices=devices)


@dataclasses.dataclass
class Classifier:
  """A restored image classifier (``config.task = 'classification'``): class probabilities of whole images, each
  squared as the run evaluated (:func:`segjax.train.classification.host_inputs`)."""

  config: ml_collections.ConfigDict
  state: TrainState
  step: int
  devices: tuple = ()

  @property
  def num_channels(self) -> int:
    return int(self.config.dataset_info.num_channels)

  @property
  def num_classes(self) -> int:
    return int(self.config.dataset_info.num_classes)

  @property
  def class_names(self) -> tuple[str, ...]:
    return tuple(self.config.dataset_info.class_names)

  def check_image(self, image: np.ndarray, name: str) -> None:
    """Any size is taken (resized); only the channels must match."""
    if image.ndim != 3 or image.shape[-1] != self.num_channels:
      raise SegjaxError(f"{name}: the model takes {self.num_channels}-channel images, got shape {image.shape}.")

  def predict(self, image: np.ndarray, tiling: Tiling | None = None) -> np.ndarray:
    """Image (H, W, C) of any size -> class probabilities (num_classes,), float32."""
    del tiling  # a classifier sees the whole (resized) image
    from segjax.train.classification import host_inputs

    inputs = host_inputs(self.config, train=False)({"image": image, "label": 0})["image"]
    logits = _classify(self.state, jnp.asarray(inputs[None]))
    return np.asarray(jax.nn.softmax(logits[0].astype(jnp.float32)))

  def top_k(self, probabilities: np.ndarray, k: int) -> list[tuple[str, float]]:
    """The ``k`` most probable classes and their probabilities, most probable first."""
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [(self.class_names[i], float(probabilities[i])) for i in order]


_classify = jax.jit(predict_logits)


def write_classifications(path: str, rows: Sequence[tuple[str, list[tuple[str, float]]]]) -> None:
  """A CSV with one row per image: ``file``, then ``label_1, probability_1, ..., label_k, probability_k``, the most
  probable first; written to a temporary name and renamed, so a failed run leaves no half-written file."""
  import csv

  k = max((len(top) for _, top in rows), default=0)
  header = ["file"] + [f"{what}_{i}" for i in range(1, k + 1) for what in ("label", "probability")]
  tmp = path + ".tmp"
  with open(tmp, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    for name, top in rows:
      writer.writerow([name] + [v for label, p in top for v in (label, f"{p:.6f}")])
  os.replace(tmp, path)
