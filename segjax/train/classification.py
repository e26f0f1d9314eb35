"""Image classification (``config.task = 'classification'``) through the same loop, checkpoints, sharding, EMA and
half precision as segmentation: :func:`build_classifier` returns a :class:`ClassifierExperiment` with the interface
:func:`segjax.train.loop.train_and_evaluate` uses.

What differs from segmentation is small and lives here: one label per image, every image squared to
``data.image_size`` on the host (:func:`segjax.data.classification.classification_inputs`), an eval step that sums
the loss, top-1 and top-k hits and a confusion matrix on the device over the whole split, and outputs (a samples
picture with predicted and true labels, a per-class summary).
"""

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from segjax import viz
from segjax.data import Dataset, load_dataset
from segjax.data.classification import IMAGENET_MEAN, IMAGENET_STD, classification_inputs
from segjax.data.pipeline import train_batches, train_dataset
from segjax.errors import SegjaxError
from segjax.metrics import confusion_matrix, summarize_classification, top_k_correct
from segjax.train import parallel
from segjax.train.evaluation import _pad_examples, _Strided
from segjax.train.state import LossScale, TrainState, compute_dtype, create_train_state
from segjax.train.step import make_train_step, predict_logits

TOP_K = 5
"""The k of the reported top-k accuracy (ImageNet's top-5)."""
MAX_CONFUSION_CLASSES = 100
"""Label sets up to this size keep a confusion matrix (and per-class accuracy); ImageNet's 1000 do not."""


def normalisation(config: ml_collections.ConfigDict) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
  """``(mean, std)`` of ``data.mean`` / ``data.std``; ImageNet's when unset and ``model.init_from`` imports
  torchvision weights (which were trained on images standardised so)."""
  mean, std = config.data.mean, config.data.std
  if mean is None and config.model.init_from:
    return IMAGENET_MEAN, IMAGENET_STD
  if (mean is None) != (std is None):
    raise SegjaxError("set both data.mean and data.std (one value per channel), or neither.")
  return (tuple(mean), tuple(std)) if mean is not None else (None, None)


def host_inputs(config: ml_collections.ConfigDict, *, train: bool) -> Callable[[Any], dict[str, np.ndarray]]:
  """The host's example -> model-input function: training images squared to ``data.load_size`` (default
  ``image_size``) for the on-device crops, evaluation images resized to ``image_size / crop_fraction`` (shorter
  side) and centre-cropped to ``image_size``."""
  mean, std = normalisation(config)
  data = config.data
  if train:
    return functools.partial(classification_inputs, size=data.load_size or data.image_size, mean=mean, std=std)
  return functools.partial(
    classification_inputs, size=data.image_size, crop_fraction=float(data.crop_fraction), mean=mean, std=std
  )


def make_classifier_eval_step(
  loss_fn: Callable, num_classes: int, *, top_k: int = TOP_K
) -> Callable[[TrainState, dict[str, jax.Array]], dict[str, jax.Array]]:
  """The pure eval step: sums of the loss, the top-1 and top-k hits and the example weights (0 for padding), and for
  up to :data:`MAX_CONFUSION_CLASSES` classes the confusion matrix; also each example's class probabilities."""

  def eval_step(state: TrainState, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    logits = predict_logits(state, batch["image"]).astype(jnp.float32)
    weights = batch["weights"]
    out = {
      "loss_sum": loss_fn(logits, batch["label"], weights) * jnp.sum(weights),
      "weight_sum": jnp.sum(weights),
      "top1": top_k_correct(logits, batch["label"], 1, weights),
      "topk": top_k_correct(logits, batch["label"], top_k, weights),
      "probabilities": jax.nn.softmax(logits, -1),
    }
    if num_classes <= MAX_CONFUSION_CLASSES:
      out["confusion"] = confusion_matrix(jnp.argmax(logits, -1), batch["label"], num_classes, weights)
    return out

  return eval_step


def eval_batches(source: Any, batch_size: int, prepare: Callable) -> Iterator[dict[str, np.ndarray]]:
  """The examples of a split in order, ``batch_size`` at a time, with ``weights`` 1 (padding examples get 0)."""
  for start in range(0, len(source), batch_size):
    examples = [prepare(source[i]) for i in range(start, min(start + batch_size, len(source)))]
    batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    batch["weights"] = np.ones(len(examples), np.float32)
    yield batch


def evaluate_classifier(
  state: TrainState,
  eval_step: Callable,
  source: Any,
  *,
  batch_size: int,
  prepare: Callable,
  class_names: tuple[str, ...],
  mesh: Mesh | None = None,
) -> dict[str, float]:
  """The loss, top-1 / top-k accuracy and per-class accuracy of ``state`` over the whole split ``source``.

  Every count is summed on the device, then over processes (process p evaluates examples p, p + P, ...), so the
  accuracy is the split's, not a mean of batch accuracies.
  """
  if jax.process_count() > 1:
    source = _Strided(source, jax.process_index(), jax.process_count())
  devices = parallel.local_devices(mesh) if mesh is not None else jax.local_devices()[:1]
  sharding = parallel.batch_sharded(Mesh(np.asarray(devices), (parallel.DATA_AXIS,)))
  totals = None
  for batch in eval_batches(source, batch_size, prepare):
    out = eval_step(state, jax.device_put(_pad_examples(batch, len(devices)), sharding))
    out.pop("probabilities")
    totals = out if totals is None else jax.tree_util.tree_map(jnp.add, totals, out)
  if totals is None:  # a process with no example of this split
    totals = {"loss_sum": 0.0, "weight_sum": 0.0, "top1": 0.0, "topk": 0.0}
    if len(class_names) <= MAX_CONFUSION_CLASSES:
      totals["confusion"] = np.zeros((len(class_names),) * 2, np.int32)
  totals = jax.tree_util.tree_map(np.asarray, jax.device_get(totals))
  if jax.process_count() > 1:
    totals = jax.tree_util.tree_map(lambda x: multihost_utils.process_allgather(x).sum(0), totals)
  return summarize_classification(totals, class_names, top_k=TOP_K)


@dataclasses.dataclass(frozen=True)
class ClassifierExperiment:
  """Everything a classification run needs, built once (:func:`build_classifier`); the same interface as
  :class:`segjax.train.setup.Experiment`."""

  config: ml_collections.ConfigDict
  mesh: Mesh
  dataset: Dataset
  train_source: Any
  eval_source: Any
  test_source: Any | None
  model: nn.Module
  input_shape: tuple[int, ...]
  loss_fn: Callable
  augment_fn: Callable | None
  tx: optax.GradientTransformation
  schedule: Callable
  loss_scale: LossScale | None
  train_step: Callable
  place_batch: Callable
  eval_step: Callable

  @property
  def use_pmap(self) -> bool:
    return self.config.parallelism == "pmap"

  def initial_state(self) -> TrainState:
    """The step-0 state from ``config.seed`` (with ``model.init_from``'s weights when set), placed on the mesh."""
    from segjax.train.finetune import init_from
    from segjax.train.setup import check_model_output

    rng = jax.random.PRNGKey(self.config.seed)
    ema = self.config.ema_decay > 0
    state = create_train_state(rng, self.model, self.tx, self.input_shape, ema=ema, loss_scale=self.loss_scale)
    check_model_output(state, self.input_shape, self.config.model.name, task="classification")
    if self.config.model.init_from:
      state = init_from(state, self.config.model.init_from, ema=ema)
    return state if self.use_pmap else parallel.replicate(state, self.mesh)

  def training_batches(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """This process's host batches of the steps ``start_step + 1, ...`` (a pure function of the seed and step)."""
    dataset_of_steps = train_dataset(
      self.train_source,
      batch_size=self.config.batch_size,
      seed=self.config.seed,
      prepare=host_inputs(self.config, train=True),
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )
    return train_batches(dataset_of_steps, start_step=start_step, num_threads=self.config.data.num_threads)

  def evaluate(self, state: TrainState, source: Any) -> dict[str, float]:
    """The loss and accuracies of ``state`` over the whole split ``source``."""
    return evaluate_classifier(
      state,
      self.eval_step,
      source,
      batch_size=self.config.eval_batch_size,
      prepare=host_inputs(self.config, train=False),
      class_names=self.dataset.class_names,
      mesh=self.mesh,
    )

  def run_config(self) -> ml_collections.ConfigDict:
    """The config saved with each checkpoint, with the data set facts prediction needs."""
    from segjax.train.setup import run_config

    return run_config(self.config, self.dataset)

  def data_state(self, step: int) -> dict[str, Any]:
    """What the input pipeline needs to resume after ``step``."""
    from segjax.train.setup import data_state

    return data_state(self.config, step, self.dataset, len(self.train_source))

  def probabilities(self, state: TrainState, batch: dict[str, np.ndarray]) -> np.ndarray:
    """The class probabilities (B, C) of a host batch, computed on this process's devices."""
    devices = parallel.local_devices(self.mesh)
    sharding = parallel.batch_sharded(Mesh(np.asarray(devices), (parallel.DATA_AXIS,)))
    out = self.eval_step(state, jax.device_put(_pad_examples(batch, len(devices)), sharding))
    return np.asarray(out["probabilities"])[: len(batch["image"])]

  @staticmethod
  def headline(metrics: dict[str, float]) -> str:
    return f"accuracy {metrics['accuracy']:.4f}, top-{TOP_K} {metrics[f'top{TOP_K}_accuracy']:.4f}"

  def write_outputs(self, state: TrainState, workdir: str, summary: dict) -> None:
    """``curves.png``, ``samples.png`` (validation images with predicted and true labels) and ``summary.json``."""
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(metrics_path):
      viz.plot_curves(viz.read_metrics(metrics_path), os.path.join(workdir, "curves.png"))
    count = min(self.config.num_sample_images, len(self.eval_source))
    if count > 0:
      batch = next(eval_batches(self.eval_source, count, host_inputs(self.config, train=False)))
      probabilities = self.probabilities(state, batch)
      shown = [
        np.asarray(classification_inputs(self.eval_source[i], size=self.config.data.image_size)["image"])
        for i in range(count)
      ]
      viz.plot_classified(
        shown, batch["label"], probabilities, self.dataset.class_names, os.path.join(workdir, "samples.png")
      )
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)

  def format_summary(self, summary: dict) -> str:
    """The final top-1 / top-k accuracy and error, and per-class accuracy for small label sets."""
    splits = [s for s in ("validation", "test") if s in summary]
    lines = [
      f"segjax: {summary['steps']} steps, {summary['num_params']:,} parameters, "
      f"{summary['train_seconds_this_run']:.0f} s training this run",
      f"{'':<22}" + "".join(f"{s:>14}" for s in splits),
    ]
    keys = [f"accuracy/{n}" for n in self.dataset.class_names if f"accuracy/{n}" in summary[splits[0]]][:20]
    for key in ("accuracy", f"top{TOP_K}_accuracy", "error", "mean_class_accuracy", "loss", *keys):
      if key in summary[splits[0]]:
        lines.append(f"{key[:21]:<22}" + "".join(f"{summary[s][key]:>14.4f}" for s in splits))
    return "\n".join(lines)


def build_classifier(
  config: ml_collections.ConfigDict,
  parts: Any,
  *,
  mesh: Mesh,
  make_objective: Callable | None,
  make_step: Callable,
) -> ClassifierExperiment:
  """Builds a classification experiment from its checked config and data-free parts (:func:`segjax.train.setup.build`
  calls this for ``config.task = 'classification'``)."""
  if config.evaluators:
    raise SegjaxError(
      f"config.evaluators {tuple(config.evaluators)} are per-pixel segmentation metrics; a classifier reports top-1 / "
      f"top-{TOP_K} accuracy itself: set config.evaluators = ()."
    )
  normalisation(config)
  use_pmap = config.parallelism == "pmap"
  dataset = load_dataset(config.data)
  if dataset.task != "classification":
    raise SegjaxError(
      f"data set '{dataset.name}' is for {dataset.task}, not classification (config key task); pick a classification "
      "data set (synthetic_shapes, image_folder, cifar10, imagenet2012, tfds_classification)."
    )
  train_source = dataset.split(config.data.train_split)
  model = parts.model.clone(num_classes=dataset.num_classes)
  size = config.data.image_size
  input_shape = (1, size, size, dataset.num_channels)
  augment_fn = parts.augment_fn
  if augment_fn is not None:  # the crops must hand the model image_size squares
    load = config.data.load_size or size
    example = {
      "image": jax.ShapeDtypeStruct((1, load, load, dataset.num_channels), jnp.float32),
      "label": jax.ShapeDtypeStruct((1,), jnp.int32),
    }
    out = jax.eval_shape(augment_fn, jax.random.PRNGKey(0), example)["image"].shape
    if out[1:3] != (size, size):
      raise SegjaxError(
        f"the augmentation turns the {load}x{load} training images (data.load_size) into {out[1]}x{out[2]}, not "
        f"data.image_size {size}; set augment.random_resized_crop.size = {size} or data.load_size = {size}."
      )
  step_fn = make_step(
    parts.loss_fn,
    augment_fn,
    axis_name=parallel.DATA_AXIS if use_pmap else None,
    grad_accum_steps=config.grad_accum_steps,
    ema_decay=config.ema_decay,
    objective=make_objective(parts.loss_fn) if make_objective else None,
    **({"accuracy_name": "accuracy"} if make_step is make_train_step else {}),  # a step of one's own keeps its names
  )
  train_step, place_batch = parallel.compile_train_step(step_fn, mesh, config.parallelism)
  test_split = config.data.test_split
  return ClassifierExperiment(
    config=config,
    mesh=mesh,
    dataset=dataset,
    train_source=train_source,
    eval_source=dataset.split(config.data.eval_split),
    test_source=dataset.splits.get(test_split) if test_split else None,
    model=model,
    input_shape=input_shape,
    loss_fn=parts.loss_fn,
    augment_fn=augment_fn,
    tx=parts.tx,
    schedule=parts.schedule,
    loss_scale=LossScale.create() if compute_dtype(config) == jnp.float16 else None,
    train_step=train_step,
    place_batch=place_batch,
    eval_step=jax.jit(make_classifier_eval_step(parts.loss_fn, dataset.num_classes)),
  )
