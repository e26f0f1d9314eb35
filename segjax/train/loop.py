"""``train_and_evaluate``: the outer loop, where all I/O happens (data, logs, checkpoints, pictures).

The loop resumes from the latest checkpoint of its workdir, runs the jitted pure ``train_step``, fetches metrics every
``log_every_steps`` and before every checkpoint (the only host syncs), evaluates every ``eval_every_steps`` on the
whole validation split with an accumulated confusion matrix, and checkpoints every ``checkpoint_every_steps``. At the
end it evaluates the validation and test splits, plots curves and a sample grid, exports test images for
``experiments.predict`` and prints a summary table.
"""

import functools
import json
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm import tqdm

from segjax import viz
from segjax.data import DATASETS, Dataset, load_dataset
from segjax.data.augment import make_augment_fn
from segjax.data.instance_targets import InstanceSettings, with_instance_targets
from segjax.data.pipeline import (
  WeightMap,
  eval_batches,
  prefetch_to_device,
  split_class_counts,
  to_model_inputs,
  train_batches,
  train_dataset,
)
from segjax.errors import SegjaxError
from segjax.logging_utils import MetricWriter
from segjax.losses import get_loss, model_outputs
from segjax.metrics import summarize_confusion
from segjax.models import create_model, get_model
from segjax.models.geometry import Geometry, eval_geometry, model_geometry
from segjax.registry import import_modules
from segjax.tiling import TTA_TRANSFORMS, tta_log_probabilities
from segjax.train import checkpoint, parallel
from segjax.train.evaluators import (
  best_over_thresholds,
  check_evaluators,
  evaluator_keys,
  get_evaluators,
  run_evaluators,
)
from segjax.train.optim import create_optimizer, create_schedule
from segjax.train.preemption import Preemption
from segjax.train.state import LossScale, TrainState, compute_dtype, count_params, create_train_state
from segjax.train.step import make_eval_step, make_train_step, predict_logits

POSITIVE_KEYS = (
  "batch_size",
  "eval_batch_size",
  "num_train_steps",
  "log_every_steps",
  "eval_every_steps",
  "checkpoint_every_steps",
  "max_checkpoints_to_keep",
)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks every name and interval of an experiment config before any work (data preparation included) starts."""
  import_modules(config.get("imports", ()))
  for key in POSITIVE_KEYS:
    value = config.get(key)
    if not isinstance(value, int) or value <= 0:
      raise SegjaxError(f"config key {key} must be a positive integer, got {value!r}.")
  DATASETS.lookup(config.data.name)
  get_model(config.model.name, num_classes=2, **config.model.get("kwargs", {}))
  get_loss(config.loss)
  create_optimizer(config.optimizer, config.num_train_steps)
  make_augment_fn(config.augment)
  get_evaluators(config.get("evaluators", ()), instances=InstanceSettings.from_config(config.get("instances")))
  if config.get("eval_tta", "none") not in TTA_TRANSFORMS:
    raise SegjaxError(
      f"unknown eval_tta '{config.eval_tta}' (config key eval_tta); available: {', '.join(TTA_TRANSFORMS)}."
    )
  crop_size = config.data.get("crop_size")
  if crop_size is not None and (not isinstance(crop_size, int) or crop_size <= 0):
    raise SegjaxError(f"config key data.crop_size must be a positive integer or None, got {crop_size!r}.")
  if config.get("parallelism", "jit") not in parallel.PARALLELISMS:
    raise SegjaxError(
      f"unknown parallelism '{config.parallelism}' (config key parallelism); available: "
      f"{', '.join(parallel.PARALLELISMS)}."
    )
  compute_dtype(config)
  accum = config.get("grad_accum_steps", 1)
  if not isinstance(accum, int) or accum <= 0:
    raise SegjaxError(f"config key grad_accum_steps must be a positive integer, got {accum!r}.")
  if not 0.0 <= config.get("ema_decay", 0.0) < 1.0:
    raise SegjaxError(f"config key ema_decay must be in [0, 1) (0 turns EMA off), got {config.ema_decay!r}.")
  if config.get("checkpoint_best_mode", "max") not in ("max", "min"):
    raise SegjaxError(f"config key checkpoint_best_mode must be 'max' or 'min', got {config.checkpoint_best_mode!r}.")


def check_divisible(config: ml_collections.ConfigDict, mesh) -> None:
  """The global batch must split over the devices, and each device's share over the gradient micro-batches."""
  parallel.check_batch_size(config.batch_size, mesh)
  accum = config.get("grad_accum_steps", 1)
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
  crop_size = config.data.get("crop_size")
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
  spec = config.data.get("weight_map")
  if not spec or not spec.get("enabled", False):
    return None
  if not dataset.has_instances:
    raise SegjaxError(
      f"data.weight_map needs instance maps, which dataset '{dataset.name}' does not have; disable data.weight_map."
    )
  class_weights = spec.get("class_weights", "balanced")
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
  return WeightMap(tuple(float(w) for w in class_weights), float(spec.get("w0", 10.0)))


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
    prepare=functools.partial(to_model_inputs, num_classes=dataset.num_classes, weight_map=weight_map),
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


def check_segmentation_output(state: TrainState, input_shape: tuple[int, ...], name: str) -> None:
  """Refuses a model whose output is not per-pixel logits (B, H, W, C), e.g. a ResNet classifier."""
  out = jax.eval_shape(predict_logits, state, jax.ShapeDtypeStruct(input_shape, jnp.float32))
  if out.ndim != 4:
    raise SegjaxError(
      f"model '{name}' (config key model.name) outputs shape {tuple(out.shape)} for input {input_shape}, not per-pixel "
      "logits; it is a classifier. Pick a segmentation model such as unet."
    )


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


def mean_metrics(history: list[tuple[int, dict[str, jax.Array]]], *, loss_scaled: bool = False) -> dict[str, float]:
  """Host-side means of per-step metric dicts (one device-to-host transfer for the whole list).

  Raises:
    SegjaxError: naming the first step whose loss, gradient or parameter norm is not finite. With float16 loss
      scaling a step with non-finite gradients was skipped (and counted in ``skipped``); only the parameters count.
  """
  steps = [step for step, _ in history]
  values = jax.device_get([m for _, m in history])
  checked = ("param_norm",) if loss_scaled else ("loss", "grad_norm", "param_norm")
  for step, m in zip(steps, values, strict=True):
    if not all(np.isfinite(m[k]) for k in checked):
      raise SegjaxError(
        f"non-finite loss, gradient or parameters at step {step} (loss {float(m['loss'])}, grad_norm "
        f"{float(m['grad_norm'])}, param_norm {float(m['param_norm'])}); the last checkpoint is kept. Lower "
        "optimizer.learning_rate or set optimizer.grad_clip_norm."
      )
  return {k: float(np.mean([m[k] for m in values])) for k in values[0]}


def evaluate(
  state: TrainState,
  eval_step,
  source: Any,
  *,
  batch_size: int,
  num_classes: int,
  geometry: Geometry,
  evaluators: tuple[str, ...] = (),
  instances: InstanceSettings | None = None,
  mesh: Mesh | None = None,
) -> dict[str, float]:
  """Runs ``eval_step`` over a whole split and returns the split's loss and metrics.

  With several processes, process p evaluates images p, p + P, ...; within a process each batch is split over its
  devices of ``mesh`` (padded with zero-weight examples to a multiple of their number). Confusion counts and losses
  are summed on device, then over processes; the per-image ``evaluators`` (e.g. the ISBI Rand error) run on the host
  on each predicted label map, cropped to its image, and are averaged over all images of the split.

  Args:
    state: the state to evaluate, on this process's devices of ``mesh`` (:func:`segjax.train.parallel.to_local`).
    instances: how the ``instances`` evaluator turns predictions into instances (``config.instances``).
    mesh: the training mesh; None evaluates on the default device.
  """
  evaluator_fns = get_evaluators(evaluators, instances=instances)
  keep = evaluator_keys(evaluators)
  prepare = functools.partial(to_model_inputs, num_classes=num_classes)
  if jax.process_count() > 1:
    source = _Strided(source, jax.process_index(), jax.process_count())
  devices = parallel.local_devices(mesh) if mesh is not None else jax.local_devices()[:1]
  sharding = parallel.batch_sharded(Mesh(np.asarray(devices), (parallel.DATA_AXIS,)))
  totals, per_image = None, []
  for batch, infos in eval_batches(source, batch_size=batch_size, prepare=prepare, geometry=geometry, keep=keep):
    out = eval_step(state, jax.device_put(_pad_examples(batch, len(devices)), sharding))
    predictions = out.pop("predictions")
    # class 1's probability (two classes) or all of them, for evaluators that threshold or post-process them
    probabilities = {k: out.pop(k) for k in ("foreground_probability", "probabilities") if k in out}
    totals = out if totals is None else jax.tree_util.tree_map(jnp.add, totals, out)
    if evaluator_fns:
      predictions = np.asarray(predictions)
      probabilities = {k: np.asarray(v) for k, v in probabilities.items()}
      for i, info in enumerate(infos):
        height, width = info["size"]
        info = {**info, **{k: v[i, :height, :width] for k, v in probabilities.items()}}
        per_image.append(run_evaluators(evaluator_fns, predictions[i, :height, :width], info))
  if totals is None:  # a process with no image of this split
    totals = {"confusion": np.zeros((num_classes, num_classes), np.float32), "loss_sum": 0.0, "weight_sum": 0.0}
  totals = jax.tree_util.tree_map(np.asarray, jax.device_get(totals))
  if jax.process_count() > 1:
    totals = jax.tree_util.tree_map(lambda x: multihost_utils.process_allgather(x).sum(0), totals)
    per_image = [m for part in _allgather_json(per_image) for m in part]
  metrics = {
    "loss": float(totals["loss_sum"] / max(float(totals["weight_sum"]), 1.0)),
    **summarize_confusion(totals["confusion"]),
  }
  for key in per_image[0] if per_image else ():
    # NaN for an image where a metric is undefined (e.g. no cells): averaged over the images where it is defined.
    metrics[key] = _nanmean([m[key] for m in per_image])
  return best_over_thresholds(metrics)


class _Strided:
  """Examples ``start, start + step, ...`` of a random-access source."""

  def __init__(self, source: Any, start: int, step: int):
    self._source, self._indices = source, range(start, len(source), step)

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, index: int) -> Any:
    return self._source[self._indices[index]]


def _pad_examples(batch: dict[str, np.ndarray], multiple: int) -> dict[str, np.ndarray]:
  """Pads a batch with all-zero examples (weight 0: they count nowhere) to a multiple of ``multiple`` examples."""
  missing = -len(batch["image"]) % multiple
  if not missing:
    return batch
  return {k: np.concatenate([v, np.zeros((missing, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}


def _allgather_json(value: Any) -> list[Any]:
  """Every process's JSON-serialisable ``value``, in process order (a collective: all processes must call it)."""
  data = np.frombuffer(json.dumps(value).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.asarray([data.size], np.int64)).reshape(-1)
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[: data.size] = data
  gathered = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(row[:n])) for row, n in zip(gathered, lengths, strict=True)]


def _nanmean(values: list[float]) -> float:
  values = np.asarray(values, np.float64)
  values = values[~np.isnan(values)]
  return float(values.mean()) if values.size else float("nan")


def predict_split(
  state: TrainState, eval_step, source: Any, *, batch_size: int, num_classes: int, geometry: Geometry, limit: int
) -> tuple[list[np.ndarray], ...]:
  """Images, labels and predicted label maps (each at its image's size) of the first ``limit`` examples of a split."""
  images, labels, predictions = [], [], []
  prepare = functools.partial(to_model_inputs, num_classes=num_classes)
  for index in range(min(limit, len(source))):
    batches = eval_batches([source[index]], batch_size=1, prepare=prepare, geometry=geometry, keep=("mask",))
    batch, (info,) = next(batches)
    height, width = info["size"]
    m = geometry.margin
    images.append(batch["image"][0, m : m + height, m : m + width])
    labels.append(batch["label"][0, m : m + height, m : m + width])
    predictions.append(np.asarray(eval_step(state, jax.device_put(batch))["predictions"])[0, :height, :width])
  return images, labels, predictions


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  devices: list[jax.Device] | None = None,
  make_objective: Callable[[Any], Callable] | None = None,
  make_step: Callable[..., Callable] = make_train_step,
) -> dict[str, Any]:
  """Trains, evaluates, checkpoints and writes the run's outputs into ``workdir``.

  Running it again on the same workdir resumes from the latest checkpoint (and, when training had finished, only
  redoes the final evaluation and outputs). SIGTERM (preemption) makes it checkpoint the current step and return.
  Training is data-parallel over ``devices`` (:mod:`segjax.train.parallel`); with several processes
  (``jax.distributed``) every process runs this function, reads its rows of each batch and joins the collective
  checkpoint writes, and only process 0 writes logs and pictures.

  Args:
    config: the experiment config (see ``experiments/configs/synthetic_cells.py`` for every key).
    workdir: the run directory; created if missing.
    devices: the devices to train on; default all devices of all processes.
    make_objective: ``make_objective(loss_fn) -> objective`` changes what is differentiated (e.g. adds a
      regulariser; see :func:`segjax.train.step.make_gradient_fn`), keeping everything else of the standard step.
    make_step: builds the pure train step, called as ``make_step(loss_fn, augment_fn, axis_name=,
      grad_accum_steps=, ema_decay=, objective=)``; default :func:`segjax.train.step.make_train_step`.

  Returns:
    The final summary: ``{'validation': metrics, 'test': metrics, 'steps', 'train_seconds_this_run', ...}``, or
    ``{'preempted': True, 'steps': ...}`` after a SIGTERM.

  Raises:
    SegjaxError: for bad config values, an unknown model/dataset/loss name, an unwritable workdir, a checkpoint that
      does not fit the config, or a non-finite loss.
  """
  validate_config(config)
  check_workdir(workdir)
  is_main = jax.process_index() == 0
  mesh = parallel.create_mesh(devices)
  check_divisible(config, mesh)
  use_pmap = config.get("parallelism", "jit") == "pmap"
  instances = InstanceSettings.from_config(config.get("instances"))
  dataset = with_instance_targets(load_dataset(config.data), instances)
  train_source = dataset.split(config.data.train_split)
  eval_source = dataset.split(config.data.eval_split)
  test_split = config.data.get("test_split")
  test_source = dataset.splits.get(test_split) if test_split else None
  total_steps = config.num_train_steps
  tx = create_optimizer(config.optimizer, total_steps)
  schedule = create_schedule(config.optimizer, total_steps)
  dtype = compute_dtype(config)
  overrides = {"dtype": dtype} | ({"bn_axis_name": parallel.DATA_AXIS} if use_pmap else {})
  model = create_model(config.model, model_outputs(config.loss, dataset.num_classes), **overrides)
  check_evaluators(config.get("evaluators", ()), dataset.has_instances)
  first_shape = np.asarray(train_source[0]["image"]).shape
  geometry, crop_size = training_geometry(config, model, dataset, first_shape)
  input_shape = (1, crop_size or first_shape[0], crop_size or first_shape[1], dataset.num_channels)
  ema_decay = config.get("ema_decay", 0.0)
  loss_scale = LossScale.create() if dtype == jnp.float16 else None
  state = create_train_state(
    jax.random.PRNGKey(config.seed), model, tx, input_shape, ema=ema_decay > 0, loss_scale=loss_scale
  )
  check_segmentation_output(state, input_shape, config.model.name)
  if not use_pmap:  # pmap takes the state as it is (in_axes=None); jit wants it replicated over the mesh
    state = parallel.replicate(state, mesh)
  weight_map = weight_map_of(config, dataset, train_source)
  if is_main:
    print(
      f"model {config.model.name}: {count_params(state.params):,} parameters; {mesh.size} devices in "
      f"{jax.process_count()} processes ({config.get('parallelism', 'jit')}); workdir {workdir}"
    )

  saved_config = run_config(config, dataset, weight_map)
  best_metric = config.get("checkpoint_best_metric") or None
  manager = checkpoint.create_manager(
    workdir,
    max_to_keep=config.max_checkpoints_to_keep,
    best_metric=best_metric,
    best_mode=config.get("checkpoint_best_mode", "max"),
    keep_best=config.get("max_best_checkpoints_to_keep", 1),
  )
  restored = checkpoint.restore_latest(manager, state, saved_config) if manager.all_steps() else None
  if restored is not None:
    state, saved_data_state = restored
    check_data_state(saved_data_state, data_state(config, int(parallel.fetch(state.step)), dataset, len(train_source)))
    if is_main:
      print(f"resuming from step {int(parallel.fetch(state.step))} of {checkpoint.checkpoint_dir(workdir)}")
  start_step = int(parallel.fetch(state.step))

  loss_fn = get_loss(config.loss)
  step_fn = make_step(
    loss_fn,
    make_augment_fn(config.augment),
    axis_name=parallel.DATA_AXIS if use_pmap else None,
    grad_accum_steps=config.get("grad_accum_steps", 1),
    ema_decay=ema_decay,
    objective=make_objective(loss_fn) if make_objective else None,
  )
  train_step, place_batch = parallel.compile_train_step(step_fn, mesh, config.get("parallelism", "jit"))
  tta = config.get("eval_tta", "none")
  predict = predict_logits if tta == "none" else functools.partial(tta_log_probabilities, tta=tta)
  eval_step = jax.jit(make_eval_step(loss_fn, dataset.num_classes, predict=predict))
  evaluate_split = functools.partial(
    evaluate,
    eval_step=eval_step,
    batch_size=config.eval_batch_size,
    num_classes=dataset.num_classes,
    geometry=geometry,
    evaluators=tuple(config.get("evaluators", ())),
    instances=instances,
    mesh=mesh,
  )
  local_eval_state = lambda: parallel.to_local(state.for_eval(), mesh)  # noqa: E731
  writer = MetricWriter(workdir, resume_step=start_step, enabled=is_main)
  host_batches = training_batches(config, dataset, train_source, geometry, crop_size, weight_map, start_step)
  batches = prefetch_to_device(host_batches, place=place_batch)

  train_start = time.perf_counter()
  pending: list[tuple[int, dict[str, jax.Array]]] = []
  val_metrics, preempted, eval_seconds = None, False, 0.0
  try:
    with (
      Preemption() as preemption,
      tqdm(total=total_steps, initial=start_step, desc="train", unit="step", disable=not is_main) as bar,
    ):
      for step in range(start_step + 1, total_steps + 1):
        state, metrics = train_step(state, next(batches))
        pending.append((step, metrics))
        preempted = preemption.reached(step)
        checkpoint_now = step % config.checkpoint_every_steps == 0 or step == total_steps or preempted
        # Metrics are also fetched before every checkpoint, so a non-finite state is never saved.
        if step % config.log_every_steps == 0 or checkpoint_now:
          logged = {
            **mean_metrics(pending, loss_scaled=loss_scale is not None),
            "learning_rate": float(schedule(step - 1)),
            # wall time of this run's training so far, evaluations excluded (for learning curves against time)
            "train_seconds": time.perf_counter() - train_start - eval_seconds,
          }
          pending = []
          writer.write(step, "train", logged)
          bar.set_postfix(loss=f"{logged['loss']:.4f}")
        step_metrics = None
        if (step % config.eval_every_steps == 0 or step == total_steps) and not preempted:
          eval_start = time.perf_counter()
          val_metrics = step_metrics = evaluate_split(local_eval_state(), source=eval_source)
          eval_seconds += time.perf_counter() - eval_start
          writer.write(step, "validation", val_metrics)
          if is_main:
            bar.write(f"step {step}: validation loss {val_metrics['loss']:.4f}, mean IoU {val_metrics['mean_iou']:.4f}")
        if checkpoint_now:
          ranked = step_metrics if best_metric and step_metrics and best_metric in step_metrics else None
          checkpoint.save(
            manager, state, saved_config, data_state(config, step, dataset, len(train_source)), metrics=ranked
          )
        bar.update(1)
        if preempted:
          if is_main:
            bar.write(f"preempted (SIGTERM): saved the checkpoint of step {step}; run the same command to resume.")
          break
  finally:
    manager.wait_until_finished()
    manager.close()
    writer.close()
  train_seconds = time.perf_counter() - train_start
  if preempted:
    return {
      "preempted": True,
      "steps": int(parallel.fetch(state.step)),
      "trained_steps_this_run": int(parallel.fetch(state.step)) - start_step,
    }

  eval_state = local_eval_state()
  summary = {
    "steps": int(parallel.fetch(state.step)),
    "trained_steps_this_run": int(parallel.fetch(state.step)) - start_step,
    "train_seconds_this_run": round(train_seconds, 2),
    "num_params": count_params(state.params),
    # None when a finished run is resumed: evaluate the restored state again
    "validation": val_metrics or evaluate_split(eval_state, source=eval_source),
  }
  if test_source is not None:
    summary["test"] = evaluate_split(eval_state, source=test_source)
  if is_main:
    predict = functools.partial(
      predict_split, eval_state, eval_step, num_classes=dataset.num_classes, geometry=geometry, batch_size=1
    )
    write_outputs(predict, config, eval_source, test_source, workdir, summary)
    print(format_summary(summary, dataset.class_names))
  return summary


def write_outputs(
  predict, config: ml_collections.ConfigDict, eval_source: Any, test_source: Any, workdir: str, summary: dict
) -> None:
  """Curves, the validation sample grid, ``summary.json``, and test-split images for ``experiments.predict``.

  ``predict(source, limit=n)`` returns images, labels and predictions of a split's first n examples. Without a test
  split, the validation images are exported instead.
  """
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(metrics_path):
    viz.plot_curves(viz.read_metrics(metrics_path), os.path.join(workdir, "curves.png"))
  if config.num_sample_images > 0:
    images, labels, predictions = predict(eval_source, limit=config.num_sample_images)
    viz.plot_samples(images, labels, predictions, os.path.join(workdir, "samples.png"))
  export_source, prefix = (test_source, "test") if test_source is not None else (eval_source, "validation")
  if config.num_test_images > 0:
    export_images(export_source, os.path.join(workdir, "test_images"), prefix, config.num_test_images)
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)


def export_images(source: Any, directory: str, prefix: str, limit: int) -> None:
  """Writes the first ``limit`` images of a split as PNG files ``<prefix>_<i>.png``."""
  from PIL import Image

  os.makedirs(directory, exist_ok=True)
  for i in range(min(limit, len(source))):
    image = np.asarray(source[i]["image"])
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(
      os.path.join(directory, f"{prefix}_{i:04d}.png")
    )


def format_summary(summary: dict, class_names: tuple[str, ...]) -> str:
  """A short table of the final per-class and mean scores for stdout."""
  splits = [s for s in ("validation", "test") if s in summary]
  header = f"{'':<22}" + "".join(f"{s:>24}" for s in splits)
  lines = [
    f"segjax: {summary['steps']} steps, {summary['num_params']:,} parameters, "
    f"{summary['train_seconds_this_run']:.0f} s training this run",
    header,
    f"{'':<22}" + "".join(f"{'IoU':>12}{'Dice':>12}" for _ in splits),
  ]
  for c, name in enumerate(class_names):
    row = f"{c}: {name}"[:21]
    lines.append(
      f"{row:<22}" + "".join(f"{summary[s][f'iou/{c}']:>12.4f}{summary[s][f'dice/{c}']:>12.4f}" for s in splits)
    )
  per_image = [k for k in ("pixel_error", "rand_error", "instance_ap") if k in summary[splits[0]]]
  for key in ("mean_iou", "foreground_iou", "pixel_accuracy", "loss", *per_image):
    lines.append(f"{key:<22}" + "".join(f"{summary[s].get(key, float('nan')):>24.4f}" for s in splits))
  return "\n".join(lines)
