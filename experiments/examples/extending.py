"""Worked examples of extending segjax without editing the trainer; docs/extending.md walks through them.

Importing this module registers one example of each kind of extension, each a function or module plus one registry
line:

================  ========================================  ==========================================
kind              registered name (config key)              registry
================  ========================================  ==========================================
model             ``toy_fcn`` (``model.name``)              ``segjax.models.register_model``
loss              ``toy_l2_softmax`` (``loss``)             ``segjax.losses.LOSSES``
per-image metric  ``foreground_fraction`` (``evaluators``)  ``segjax.train.evaluators.EVALUATORS``
augmentation      ``invert`` (``augment.ops``)              ``segjax.data.augment.AUGMENTATIONS``
dataset           ``toy_squares`` (``data.name``)           ``segjax.data.register_dataset``
================  ========================================  ==========================================

Train with all of them through the normal entry point (they are chosen by name in :func:`toy_config`)::

  from experiments.examples import extending
  from segjax.train.loop import train_and_evaluate

  summary = train_and_evaluate(extending.toy_config(), "runs/toy")
  print(summary["validation"]["foreground_fraction_error"])

or from the command line, with a config file that imports this module (``python -m experiments.train
--config=path/to/toy_config.py --workdir=runs/toy``)::

  from experiments.examples import extending


  def get_config():
    return extending.toy_config()

``toy_config`` names this module in ``config.imports``, which the trainer imports before anything is built and which is
saved with the checkpoint, so the run predicts from the command line too (``python -m experiments.predict
--workdir=runs/toy --input=runs/toy/test_images --output=runs/toy/predictions``).

The module also shows the trainer's two hooks for a research variant of the train step. ``make_objective`` changes
what is differentiated and keeps the rest of the standard step (gradient accumulation, loss scaling, EMA, ``pmap``);
:func:`make_weight_decay_objective` adds an L2 penalty on the parameters. ``make_step`` replaces the step builder;
:func:`make_penalty_logging_step` wraps the standard step to log one more metric::

  import functools

  config = extending.toy_config()
  make_objective = functools.partial(extending.make_weight_decay_objective, weight_decay=1e-2)
  summary = train_and_evaluate(config, "runs/toy_decay", make_objective=make_objective)

  # the same objective, and a step that also logs l2_penalty in metrics.jsonl
  make_step = extending.make_penalty_logging_step
  summary = train_and_evaluate(config, "runs/toy_decay_logged", make_objective=make_objective, make_step=make_step)

``tests/test_extending.py`` runs all of it and checks that docs/extending.md quotes this module verbatim.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments.configs import tiny
from segjax.data import Dataset, register_dataset
from segjax.data.augment import AUGMENTATIONS
from segjax.data.features import IGNORE_LABEL, make_example
from segjax.losses import LOSSES, LossFn
from segjax.models import register_model
from segjax.models.layers import batch_norm
from segjax.train.evaluators import EVALUATORS
from segjax.train.state import TrainState
from segjax.train.step import AugmentFn, Batch, make_loss_fn, make_train_step

# --- A model: a Flax Linen module and one decorator ------------------------------------------------------------------


@register_model("toy_fcn")
class ToyFCN(nn.Module):
  """A toy fully convolutional network: ``num_layers`` x (3x3 conv, BatchNorm, ReLU) at full resolution, then a 1x1
  convolution to ``num_classes`` logits per pixel.

  Attributes:
    num_classes: logits per pixel; the trainer sets it from the data set and the loss.
    width: channels of the hidden layers.
    num_layers: number of hidden layers.
    dtype: computation dtype; the trainer passes bfloat16 or float16 with ``half_precision``.
    bn_axis_name: the axis BatchNorm averages its statistics over; the trainer passes it with ``parallelism='pmap'``.
  """

  num_classes: int
  width: int = 8
  num_layers: int = 2
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    for _ in range(self.num_layers):
      x = nn.Conv(self.width, (3, 3), dtype=self.dtype)(x)
      x = batch_norm(train=train, dtype=self.dtype, axis_name=self.bn_axis_name)(x)
      x = nn.relu(x)
    return nn.Conv(self.num_classes, (1, 1), dtype=self.dtype)(x).astype(jnp.float32)


# --- A loss: a pure function of (logits, labels, weights) and one dict entry -----------------------------------------


def l2_softmax_loss(
  logits: jax.Array, labels: jax.Array, weights: jax.Array | None = None, *, ignore_label: int | None = None
) -> jax.Array:
  """Weighted mean over pixels of the squared distance between the softmax probabilities and the one-hot label.

  Per pixel this is the multi-class Brier score ``sum_c (p_c - t_c)**2`` (Brier 1950), in [0, 2].

  Args:
    logits: float array (..., num_classes).
    labels: integer class ids, shape ``logits.shape[:-1]``.
    weights: optional per-pixel weights of the labels' shape (0 excludes a pixel, e.g. padding).
    ignore_label: optional label id whose pixels get weight 0; configs set it as ``loss.ignore_label``.

  Returns:
    The scalar ``sum(w * brier) / sum(w)``.
  """
  w = jnp.ones(labels.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
  if ignore_label is not None:
    ignored = labels == ignore_label
    w = jnp.where(ignored, 0.0, w)
    labels = jnp.where(ignored, 0, labels)
  probabilities = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
  per_pixel = jnp.sum((probabilities - targets) ** 2, axis=-1)
  return jnp.sum(w * per_pixel) / jnp.maximum(jnp.sum(w), 1e-8)


LOSSES["toy_l2_softmax"] = l2_softmax_loss


# --- A per-image metric: a host function of (prediction, info) and one dict entry ------------------------------------


def foreground_fraction_evaluator(prediction: np.ndarray, info: dict[str, Any]) -> dict[str, float]:
  """The absolute difference between the predicted and the true fraction of foreground pixels of one image.

  Args:
    prediction: (H, W) predicted class ids of the image.
    info: the example's features; ``info['mask']`` is its (H, W, 1) mask, ``IGNORE_LABEL`` where unlabelled.

  Returns:
    ``{'foreground_fraction_error': value}``, NaN for an image without labelled pixels (the loop averages each
    metric over the images where it is defined).
  """
  mask = np.asarray(info["mask"])[..., 0]
  labelled = mask != IGNORE_LABEL
  if not labelled.any():
    return {"foreground_fraction_error": float("nan")}
  predicted = np.mean(prediction[labelled] > 0)
  true = np.mean(mask[labelled] > 0)
  return {"foreground_fraction_error": float(abs(predicted - true))}


EVALUATORS["foreground_fraction"] = foreground_fraction_evaluator


# --- An augmentation: a jittable op on one example and one dict entry ------------------------------------------------


def random_invert(key: jax.Array, example: dict[str, jax.Array], *, probability: float = 0.5) -> dict[str, jax.Array]:
  """Inverts the image's intensities (``x -> 1 - x``; images are in [0, 1]) with the given probability.

  Only the image changes; an op that moves pixels must move ``label`` and ``weights`` (when present) the same way.

  Args:
    key: this op's random key for this example.
    example: one example: ``image`` (H, W, C), ``label`` (H, W), optional ``weights`` (H, W).
    probability: the chance of inverting; set by ``config.augment.invert.probability``.

  Returns:
    The example with the same keys and shapes.
  """
  inverted = jax.random.bernoulli(key, probability)
  return {**example, "image": jnp.where(inverted, 1.0 - example["image"], example["image"])}


AUGMENTATIONS["invert"] = random_invert


# --- A dataset: a loader returning a Dataset and one decorator -------------------------------------------------------


def square_example(rng: np.random.Generator, size: int, name: str) -> dict[str, Any]:
  """One gray image with a bright square on a noisy dark background; class 1 is the square."""
  side = int(rng.integers(size // 4, size // 2 + 1))
  top, left = rng.integers(0, size - side + 1, size=2)
  mask = np.zeros((size, size), np.uint8)
  mask[top : top + side, left : left + side] = 1
  image = np.clip(0.25 + 0.5 * mask + rng.normal(0.0, 0.1, mask.shape), 0.0, 1.0)
  return make_example(name, (image * 255).round().astype(np.uint8)[..., None], mask)


# The data set's own config keys and their defaults: a config that does not set them gets these.
@register_dataset("toy_squares", defaults={"image_size": 32, "num_train": 32, "data_seed": 0})
def load_toy_squares(config: ml_collections.ConfigDict) -> Dataset:
  """Generates ``toy_squares`` in memory: ``data.image_size`` pixels square, ``data.num_train`` training images and 8
  each for ``validation`` and ``test``, from ``data.data_seed``."""
  size, seed = config.image_size, config.data_seed
  counts = {"train": config.num_train, "validation": 8, "test": 8}
  splits = {}
  for index, (split, count) in enumerate(counts.items()):
    rng = np.random.default_rng([seed, index])
    splits[split] = [square_example(rng, size, f"{split}_{i}") for i in range(count)]
  # `source` names what the examples depend on: a resumed run is refused if it would read different data.
  source = f"toy_squares/size={size}/train={counts['train']}/seed={seed}"
  return Dataset("toy_squares", 2, 1, ("background", "square"), splits, source=source)


# --- Choosing the examples from a config ------------------------------------------------------------------------------


def toy_config(tfds_data_dir: str | None = None) -> ml_collections.ConfigDict:
  """The tiny config (``experiments/configs/tiny.py``) with the model, loss, augmentation and metric above."""
  config = tiny.get_config()
  config.imports = ("experiments.examples.extending",)  # also imported by experiments.predict for this run
  config.data.tfds_data_dir = tfds_data_dir
  config.model.name = "toy_fcn"
  config.model.kwargs = ml_collections.ConfigDict({"width": 8, "num_layers": 2})
  config.loss = "toy_l2_softmax"
  config.augment.ops = ["flip", "invert"]
  config.augment.invert = ml_collections.ConfigDict({"probability": 0.5})
  config.evaluators = ("foreground_fraction",)
  return config


# --- What is differentiated, and the whole step: the trainer's make_objective and make_step hooks ---------------------


def l2_penalty(params: Any) -> jax.Array:
  """``0.5 * ||params||^2`` over all leaves; its gradient is ``params``."""
  return 0.5 * sum(jnp.sum(jnp.square(p)) for p in jax.tree_util.tree_leaves(params))


def make_weight_decay_objective(loss_fn: LossFn, *, weight_decay: float) -> Callable:
  """A ``make_objective`` for ``train_and_evaluate``: the objective ``loss + weight_decay * l2_penalty(params)``
  (L2 regularisation).

  Returns:
    ``objective(params, state, batch, rng) -> (loss + penalty, (logits, batch_stats))``, with the signature of
    ``make_loss_fn(loss_fn)``'s result; the standard step differentiates it, and logs its value as ``loss``.
  """
  objective = make_loss_fn(loss_fn)  # (params, state, batch, rng) -> (loss, (logits, batch_stats))

  def regularised(params, state: TrainState, batch: Batch, rng: jax.Array):
    loss, (logits, batch_stats) = objective(params, state, batch, rng)
    return loss + weight_decay * l2_penalty(params), (logits, batch_stats)

  return regularised


def make_penalty_logging_step(loss_fn: LossFn, augment_fn: AugmentFn | None = None, **options) -> Callable:
  """A ``make_step`` for ``train_and_evaluate``: the standard step, also logging ``l2_penalty`` of the parameters it
  differentiated at. ``options`` are the trainer's ``axis_name``, ``grad_accum_steps``, ``ema_decay`` and
  ``objective``, passed on."""
  train_step = make_train_step(loss_fn, augment_fn, **options)

  def step(state: TrainState, batch: Batch):
    new_state, metrics = train_step(state, batch)
    return new_state, {**metrics, "l2_penalty": l2_penalty(state.params)}

  return step
