"""An experiment built once from its config: :func:`build` returns the :class:`Experiment` (data, model, optimizer,
loss, augmentation, compiled steps, evaluators) that training, evaluation and the benchmark use; the checks of the
config, the workdir and a resumed input stream live here too."""

import dataclasses
import functools
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from segjax.config import with_defaults
from segjax.data import DATASETS, Dataset, load_dataset
from segjax.data.augment import make_augment_fn
from segjax.data.instance_targets import InstanceSettings, with_instance_targets
from segjax.data.pipeline import (
  Normalization,
  WeightMap,
  split_class_counts,
  to_model_inputs,
  train_batches,
  train_dataset,
)
from segjax.errors import SegjaxError
from segjax.losses import get_loss, model_outputs
from segjax.models import create_model
from segjax.models.geometry import Geometry, eval_geometry, model_geometry
from segjax.registry import import_modules
from segjax.tiling import TTA_TRANSFORMS, tta_log_probabilities
from segjax.train import evaluation, parallel
from segjax.train.evaluators import check_evaluators, get_evaluators
from segjax.train.optim import create_optimizer, create_schedule
from segjax.train.state import LossScale, TrainState, compute_dtype, create_train_state
from segjax.train.step import make_eval_step, make_train_step, predict_logits

TASKS = ("segmentation", "classification")
"""What an experiment learns (config key ``task``): a class per pixel, or a class per image
(:mod:`segjax.train.classification`)."""

POSITIVE_KEYS = (
  "batch_size",
  "eval_batch_size",
  "num_train_steps",
  "log_every_steps",
  "eval_every_steps",
  "checkpoint_every_steps",
  "max_checkpoints_to_keep",
)


def _check_values(config: ml_collections.ConfigDict) -> None:
  """The intervals, sizes and choices of a config that no builder below checks."""
  for key in POSITIVE_KEYS:
    value = config[key]
    if not isinstance(value, int) or value <= 0:
      raise SegjaxError(f"config key {key} must be a positive integer, got {value!r}.")
  DATASETS.lookup(config.data.name)
  if config.task not in TASKS:
    raise SegjaxError(f"unknown task {config.task!r} (config key task); available: {', '.join(TASKS)}.")
  if config.eval_tta not in TTA_TRANSFORMS:
    raise SegjaxError(
      f"unknown eval_tta '{config.eval_tta}' (config key eval_tta); available: {', '.join(TTA_TRANSFORMS)}."
    )
  crop_size = config.data.crop_size
  if crop_size is not None and (not isinstance(crop_size, int) or crop_size <= 0):
    raise SegjaxError(f"config key data.crop_size must be a positive integer or None, got {crop_size!r}.")
  if config.parallelism not in parallel.PARALLELISMS:
    raise SegjaxError(
      f"unknown parallelism '{config.parallelism}' (config key parallelism); available: "
      f"{', '.join(parallel.PARALLELISMS)}."
    )
  compute_dtype(config)
  Normalization.from_config(config.data)
  accum = config.grad_accum_steps
  if not isinstance(accum, int) or accum <= 0:
    raise SegjaxError(f"config key grad_accum_steps must be a positive integer, got {accum!r}.")
  if not 0.0 <= config.ema_decay < 1.0:
    raise SegjaxError(f"config key ema_decay must be in [0, 1) (0 turns EMA off), got {config.ema_decay!r}.")
  if config.checkpoint_best_mode not in ("max", "min"):
    raise SegjaxError(f"config key checkpoint_best_mode must be 'max' or 'min', got {config.checkpoint_best_mode!r}.")


@dataclasses.dataclass(frozen=True)
class _DataFree:
  """The parts of an experiment its config alone defines: built (and so checked) before any data is prepared."""

  model: nn.Module  # num_classes set from the data set by build()
  loss_fn: Callable
  augment_fn: Callable
  tx: optax.GradientTransformation
  schedule: Callable
  instances: InstanceSettings
  evaluator_fns: tuple[Callable, ...]


def build_model(config: ml_collections.ConfigDict, num_classes: int, *, training: bool = True) -> nn.Module:
  """The experiment's model for a data set of ``num_classes`` classes: as many outputs as the loss takes, activations
  in the config's precision and, for training under pmap, BatchNorm statistics averaged over the devices. Training
  (:func:`build`) and prediction (:func:`segjax.inference.load_predictor`) both build their model here."""
  pmap = training and config.parallelism == "pmap"
  overrides = {"dtype": compute_dtype(config)} | ({"bn_axis_name": parallel.DATA_AXIS} if pmap else {})
  return create_model(config.model, model_outputs(config.loss, num_classes), **overrides)


def _data_free_parts(config: ml_collections.ConfigDict) -> _DataFree:
  import_modules(config.imports)
  _check_values(config)
  instances = InstanceSettings.from_config(config.instances)
  return _DataFree(
    model=build_model(config, 2),
    loss_fn=get_loss(config.loss),
    augment_fn=make_augment_fn(config.augment),
    tx=create_optimizer(config.optimizer, config.num_train_steps),
    schedule=create_schedule(config.optimizer, config.num_train_steps),
    instances=instances,
    evaluator_fns=get_evaluators(config.evaluators, instances=instances),
  )


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks every name, interval and choice of an experiment config without preparing any data (what
  :func:`build` checks first); a SegjaxError names the key."""
  _data_free_parts(with_defaults(config))


def check_divisible(config: ml_collections.ConfigDict, mesh) -> None:
  """The global batch must split over the devices, and each device's share over the gradient micro-batches."""
  parallel.check_batch_size(config.batch_size, mesh)
  accum = config.grad_accum_steps
  per_device = config.batch_size // mesh.size
  if per_device % accum:
    raise SegjaxError(
      f"batch_size {config.batch_size} over {mesh.size} devices gives {per_device} examples per device, which do "
      f"not split into grad_accum_steps={accum} micro-batches; make batch_size a multiple of {mesh.size * accum}."
    )


def training_geometry(config: ml_collections.ConfigDict, model, dataset: Dataset, first_image_shape) -> tuple:
  """The model's geometry and the training tile size (None: whole images), checked against the model and data.

  Raises:
    SegjaxError: if images differ in size and no ``data.crop_size`` is set, or the tile does not fit the model.
  """
  geometry = model_geometry(model)
  crop_size = config.data.crop_size
  if crop_size is None:
    if not dataset.same_size:
      raise SegjaxError(
        f"dataset '{dataset.name}' has images of different sizes; set data.crop_size to the training tile size."
      )
    height, width = first_image_shape[:2]
    if geometry.fit(height) != height or geometry.fit(width) != width:
      raise SegjaxError(
        f"model '{config.model.name}' cannot take the {height}x{width} training images whole; set data.crop_size "
        f"(e.g. {geometry.fit(max(height, width))})."
      )
    return eval_geometry(model, config.data), None
  if geometry.fit(crop_size) != crop_size or geometry.output_size(crop_size) <= 0:
    raise SegjaxError(
      f"data.crop_size {crop_size} does not fit model '{config.model.name}'; the nearest size it takes is "
      f"{geometry.fit(crop_size)}."
    )
  return eval_geometry(model, config.data), crop_size


def weight_map_of(config: ml_collections.ConfigDict, dataset: Dataset, train_source: Any) -> WeightMap | None:
  """The U-Net weight map set up by ``data.weight_map`` (None when disabled); 'balanced' counts training pixels."""
  spec = config.data.weight_map
  if not spec.enabled:
    return None
  if not dataset.has_instances:
    raise SegjaxError(
      f"data.weight_map needs instance maps, which dataset '{dataset.name}' does not have; disable data.weight_map."
    )
  class_weights = spec.class_weights
  if class_weights == "balanced":
    from segjax.weight_maps import class_balance_from_counts

    class_weights = class_balance_from_counts(split_class_counts(train_source, dataset.num_classes))
  elif class_weights is None:
    class_weights = np.ones(dataset.num_classes)
  if len(class_weights) != dataset.num_classes:
    raise SegjaxError(
      f"data.weight_map.class_weights has {len(class_weights)} values for {dataset.num_classes} classes; give one "
      "per class or 'balanced'."
    )
  return WeightMap(tuple(float(w) for w in class_weights), float(spec.w0))


def training_batches(
  config: ml_collections.ConfigDict,
  dataset: Dataset,
  train_source: Any,
  geometry: Geometry,
  crop_size: int | None,
  weight_map: WeightMap | None,
  start_step: int = 0,
) -> Any:
  """This process's host batches of the steps ``start_step + 1, start_step + 2, ...``: the training input pipeline
  (:func:`segjax.data.pipeline.train_dataset` read by ``config.data.num_threads`` threads)."""
  dataset_of_steps = train_dataset(
    train_source,
    batch_size=config.batch_size,
    seed=config.seed,
    prepare=functools.partial(
      to_model_inputs,
      num_classes=dataset.num_classes,
      weight_map=weight_map,
      normalization=Normalization.from_config(config.data),
    ),
    crop_size=crop_size,
    margin=geometry.margin,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  return train_batches(dataset_of_steps, start_step=start_step, num_threads=config.data.num_threads)


def check_workdir(workdir: str) -> None:
  """Creates ``workdir`` and proves it writable before any work starts; a SegjaxError says what to do otherwise.

  Every process of a multi-host job runs this at once on the same (shared) workdir, so each writes its own uniquely
  named probe file; one shared name let one process delete the probe another was about to delete.
  """
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_probe.") as f:
      f.write(b"ok")
  except OSError as e:
    raise SegjaxError(f"workdir '{workdir}' is not writable ({e.strerror}); pass a writable --workdir.") from e


def check_model_output(state: TrainState, input_shape: tuple[int, ...], name: str, task: str = "segmentation") -> None:
  """Refuses a model whose output does not fit the task: per-pixel logits (B, H, W, C) for segmentation (not a
  ResNet classifier), one row of logits per image (B, C) for classification (not a U-Net)."""
  out = jax.eval_shape(predict_logits, state, jax.ShapeDtypeStruct(input_shape, jnp.float32))
  if task == "segmentation" and out.ndim != 4:
    raise SegjaxError(
      f"model '{name}' (config key model.name) outputs shape {tuple(out.shape)} for input {input_shape}, not per-pixel "
      "logits; it is a classifier. Pick a segmentation model such as unet."
    )
  if task == "classification" and out.ndim != 2:
    raise SegjaxError(
      f"model '{name}' (config key model.name) outputs shape {tuple(out.shape)} for input {input_shape}, not one row "
      "of logits per image; it is a segmenter. Pick a classifier such as resnet20_cifar or resnet50."
    )


check_segmentation_output = functools.partial(check_model_output, task="segmentation")
"""The segmentation check, by its former name."""


def run_config(
  config: ml_collections.ConfigDict, dataset: Dataset, weight_map: WeightMap | None = None
) -> ml_collections.ConfigDict:
  """The config saved with each checkpoint: the experiment config plus the dataset facts needed to predict."""
  saved = ml_collections.ConfigDict(config.to_dict())
  saved.dataset_info = {
    "name": dataset.name,
    "num_classes": dataset.num_classes,
    "num_channels": dataset.num_channels,
    "class_names": list(dataset.class_names),
    "class_weights": list(weight_map.class_weights) if weight_map else None,
  }
  return saved


def data_state(config: ml_collections.ConfigDict, step: int, dataset: Dataset, num_examples: int) -> dict[str, Any]:
  """What the input pipeline needs to resume: the batch of step s is a pure function of (seed, s) over the split."""
  return {
    "next_step": step,
    "seed": config.seed,
    "batch_size": config.batch_size,
    "source": dataset.source,
    "num_examples": num_examples,
  }


def check_data_state(saved: dict[str, Any] | None, current: dict[str, Any]) -> None:
  """Refuses to resume when the training stream would differ from the uninterrupted run's.

  The stream is fixed by the seed, the batch size and the prepared training split (its source and size); a
  SegjaxError names what changed.
  """
  if saved is None:
    return
  if saved.get("num_examples") != current["num_examples"]:
    raise SegjaxError(
      f"the training split had {saved.get('num_examples')} examples when the checkpoint was written and has "
      f"{current['num_examples']} now; resume with the original data or pass a new --workdir."
    )
  # Keys a checkpoint was written without (older versions) are not compared.
  if changed := [k for k in ("seed", "batch_size", "source") if k in saved and saved[k] != current[k]]:
    raise SegjaxError(
      f"the checkpoint's input stream differs from this run's in {', '.join(changed)} (was "
      f"{', '.join(repr(saved.get(k)) for k in changed)}); resume with the original config and data or pass a new "
      "--workdir."
    )


@dataclasses.dataclass(frozen=True)
class Experiment:
  """Everything a run needs, built once from its config by :func:`build`.

  Attributes:
    config: the experiment config.
    mesh: the devices trained on (:func:`segjax.train.parallel.create_mesh`).
    dataset: the data set, with instance targets when ``config.instances.targets`` asks for them.
    train_source, eval_source, test_source: the splits (``test_source`` None without ``data.test_split``).
    model: the model, its ``num_classes`` the loss's number of outputs for the data set.
    geometry, crop_size, input_shape: the model's valid-size rule, the training tile (None: whole images) and the
      shape the parameters are initialised with.
    weight_map: the U-Net weight map of ``data.weight_map`` (None when off).
    loss_fn, augment_fn, tx, schedule: the loss, the on-device augmentation, the optimizer and its schedule.
    loss_scale: float16's dynamic loss scale (None in other precisions).
    train_step, place_batch: the compiled train step and the function placing a host batch on the mesh.
    eval_step: the jitted evaluation step (with the config's test-time augmentation).
    evaluator_fns: the per-image evaluators of ``config.evaluators``.
  """

  config: ml_collections.ConfigDict
  mesh: Mesh
  dataset: Dataset
  instances: InstanceSettings
  train_source: Any
  eval_source: Any
  test_source: Any | None
  model: nn.Module
  geometry: Geometry
  crop_size: int | None
  input_shape: tuple[int, ...]
  weight_map: WeightMap | None
  loss_fn: Callable
  augment_fn: Callable
  tx: optax.GradientTransformation
  schedule: Callable
  loss_scale: LossScale | None
  train_step: Callable
  place_batch: Callable
  eval_step: Callable
  evaluator_fns: tuple[Callable, ...]

  @property
  def use_pmap(self) -> bool:
    return self.config.parallelism == "pmap"

  def initial_state(self) -> TrainState:
    """The step-0 state from ``config.seed``, checked to give per-pixel logits, placed on the mesh."""
    ema = self.config.ema_decay > 0
    rng = jax.random.PRNGKey(self.config.seed)
    state = create_train_state(rng, self.model, self.tx, self.input_shape, ema=ema, loss_scale=self.loss_scale)
    check_segmentation_output(state, self.input_shape, self.config.model.name)
    if self.config.model.init_from:  # e.g. an ImageNet ResNet encoder
      from segjax.train.finetune import init_from

      state = init_from(state, self.config.model.init_from, ema=ema)
    # pmap takes the state as it is (in_axes=None); jit wants it replicated over the mesh
    return state if self.use_pmap else parallel.replicate(state, self.mesh)

  def training_batches(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """This process's host batches of the steps ``start_step + 1, start_step + 2, ...``."""
    return training_batches(
      self.config, self.dataset, self.train_source, self.geometry, self.crop_size, self.weight_map, start_step
    )

  def evaluate(self, state: TrainState, source: Any) -> dict[str, float]:
    """The loss and metrics of ``state`` (on this process's devices) over the whole split ``source``."""
    return evaluation.evaluate(
      state,
      self.eval_step,
      source,
      batch_size=self.config.eval_batch_size,
      num_classes=self.dataset.num_classes,
      geometry=self.geometry,
      evaluators=tuple(self.config.evaluators),
      instances=self.instances,
      normalization=Normalization.from_config(self.config.data),
      mesh=self.mesh,
      evaluator_fns=self.evaluator_fns,
    )

  @staticmethod
  def headline(metrics: dict[str, float]) -> str:
    """The validation scores the progress bar prints after an evaluation."""
    return f"mean IoU {metrics['mean_iou']:.4f}"

  def write_outputs(self, state: TrainState, workdir: str, summary: dict) -> None:
    """Curves, the validation sample grid, ``summary.json`` and test images (:mod:`segjax.train.outputs`)."""
    from segjax.train.outputs import write_outputs

    predict = functools.partial(
      evaluation.predict_split,
      state,
      self.eval_step,
      num_classes=self.dataset.num_classes,
      geometry=self.geometry,
      batch_size=1,
      normalization=Normalization.from_config(self.config.data),
    )
    write_outputs(predict, self.config, self.eval_source, self.test_source, workdir, summary)

  def format_summary(self, summary: dict) -> str:
    """The per-class IoU / Dice table (:func:`segjax.train.outputs.format_summary`)."""
    from segjax.train.outputs import format_summary

    return format_summary(summary, self.dataset.class_names)

  def run_config(self) -> ml_collections.ConfigDict:
    """The config saved with each checkpoint (:func:`run_config`)."""
    return run_config(self.config, self.dataset, self.weight_map)

  def data_state(self, step: int) -> dict[str, Any]:
    """What the input pipeline needs to resume after ``step`` (:func:`data_state`)."""
    return data_state(self.config, step, self.dataset, len(self.train_source))


def build(
  config: ml_collections.ConfigDict,
  *,
  devices: list[jax.Device] | None = None,
  make_objective: Callable[[Any], Callable] | None = None,
  make_step: Callable[..., Callable] = make_train_step,
  workdir: str | None = None,
) -> Experiment:
  """Builds every part of the experiment ``config`` once, checking the config before any data is prepared.

  Args:
    config: the experiment config.
    devices: the devices to train on; default all devices of all processes.
    make_objective: ``make_objective(loss_fn) -> objective`` changes what is differentiated (see
      :func:`segjax.train.loop.train_and_evaluate`).
    make_step: builds the pure train step (default :func:`segjax.train.step.make_train_step`).
    workdir: a run directory to create and prove writable once the config is checked, before data is prepared.

  Raises:
    SegjaxError: for a bad config value or name, a batch that does not split over the devices, or a model that does
      not fit the data.
  """
  config = with_defaults(config)
  use_pmap = config.parallelism == "pmap"
  parts = _data_free_parts(config)
  if workdir is not None:
    check_workdir(workdir)
  mesh = parallel.create_mesh(devices)
  check_divisible(config, mesh)
  if config.task == "classification":
    from segjax.train.classification import build_classifier

    return build_classifier(config, parts, mesh=mesh, make_objective=make_objective, make_step=make_step)
  dataset = with_instance_targets(load_dataset(config.data), parts.instances)
  if dataset.task != "segmentation":
    raise SegjaxError(
      f"data set '{dataset.name}' has one label per image, not per pixel; set config.task = 'classification' (and a "
      "classifier model) or pick a segmentation data set."
    )
  check_evaluators(config.evaluators, dataset.has_instances)
  train_source = dataset.split(config.data.train_split)
  test_split = config.data.test_split
  model = parts.model.clone(num_classes=model_outputs(config.loss, dataset.num_classes))
  first_shape = np.asarray(train_source[0]["image"]).shape
  geometry, crop_size = training_geometry(config, model, dataset, first_shape)
  step_fn = make_step(
    parts.loss_fn,
    parts.augment_fn,
    axis_name=parallel.DATA_AXIS if use_pmap else None,
    grad_accum_steps=config.grad_accum_steps,
    ema_decay=config.ema_decay,
    objective=make_objective(parts.loss_fn) if make_objective else None,
  )
  train_step, place_batch = parallel.compile_train_step(step_fn, mesh, config.parallelism)
  tta = config.eval_tta
  predict = predict_logits if tta == "none" else functools.partial(tta_log_probabilities, tta=tta)
  return Experiment(
    config=config,
    mesh=mesh,
    dataset=dataset,
    instances=parts.instances,
    train_source=train_source,
    eval_source=dataset.split(config.data.eval_split),
    test_source=dataset.splits.get(test_split) if test_split else None,
    model=model,
    geometry=geometry,
    crop_size=crop_size,
    input_shape=(1, crop_size or first_shape[0], crop_size or first_shape[1], dataset.num_channels),
    weight_map=weight_map_of(config, dataset, train_source),
    loss_fn=parts.loss_fn,
    augment_fn=parts.augment_fn,
    tx=parts.tx,
    schedule=parts.schedule,
    loss_scale=LossScale.create() if compute_dtype(config) == jnp.float16 else None,
    train_step=train_step,
    place_batch=place_batch,
    eval_step=jax.jit(make_eval_step(parts.loss_fn, dataset.num_classes, predict=predict)),
    evaluator_fns=parts.evaluator_fns,
  )
