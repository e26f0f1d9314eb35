"""Pure training and evaluation steps.

Each step is a pure function of (state, batch) -> (state, metrics), built by a ``make_*`` factory from smaller pure
functions so that research code can wrap or replace one piece (the loss, the augmentation, what is differentiated)
without copying the loop. The loop compiles each step once with ``jax.jit`` and donates the state.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from segjax.losses import LossFn, deep_supervision_loss
from segjax.metrics import confusion_matrix
from segjax.train.state import TrainState

Batch = dict[str, jax.Array]
AugmentFn = Callable[[jax.Array, Batch], Batch]


def forward(state: TrainState, params: Any, images: jax.Array, *, train: bool, rng: jax.Array | None = None):
  """Applies the model; in train mode also returns the updated BatchNorm statistics.

  Returns:
    ``(logits, batch_stats)``; in eval mode ``batch_stats`` is the state's, unchanged.
  """
  variables = {"params": params, "batch_stats": state.batch_stats}
  if not train:
    return state.apply_fn(variables, images, train=False), state.batch_stats
  logits, updates = state.apply_fn(variables, images, train=True, mutable=["batch_stats"], rngs={"dropout": rng})
  return logits, updates.get("batch_stats", state.batch_stats)


def predict_logits(state: TrainState, images: jax.Array) -> jax.Array:
  """Eval-mode logits of the state's model (running BatchNorm statistics, no dropout)."""
  return forward(state, state.params, images, train=False)[0]


def crop_targets(batch: Batch, logits: jax.Array) -> Batch:
  """Centre-crops ``label`` and ``weights`` to the logits' size (the unpadded U-Net's output is smaller)."""
  height, width = logits.shape[1:3]
  if batch["label"].shape[1:3] == (height, width):
    return batch
  top = (batch["label"].shape[1] - height) // 2
  left = (batch["label"].shape[2] - width) // 2
  out = dict(batch)
  for key in ("label", "weights"):
    if key in out:
      out[key] = out[key][:, top : top + height, left : left + width]
  return out


def make_loss_fn(loss_fn: LossFn) -> Callable[..., tuple[jax.Array, tuple[jax.Array, Any]]]:
  """Returns ``objective(params, state, batch, rng) -> (loss, (logits, new_batch_stats))`` to differentiate.

  A model that returns ``(logits, aux_logits)`` in training (deep supervision) is trained on all its outputs with
  :func:`segjax.losses.deep_supervision_loss`; ``logits`` in the result are the full-resolution ones.
  """

  def objective(params, state: TrainState, batch: Batch, rng: jax.Array):
    outputs, batch_stats = forward(state, params, batch["image"], train=True, rng=rng)
    if isinstance(outputs, tuple):  # deep supervision: (logits, coarser auxiliary logits)
      logits, aux_logits = outputs
      loss = deep_supervision_loss(loss_fn, logits, aux_logits, batch["label"], batch.get("weights"))
    else:
      logits = outputs
      batch = crop_targets(batch, logits)
      loss = loss_fn(logits, batch["label"], batch.get("weights"))
    return loss, (logits, batch_stats)

  return objective


def predict_classes(logits: jax.Array) -> jax.Array:
  """Class ids from logits (..., C): the argmax, or ``logit > 0`` (class 1) for a one-logit binary model."""
  if logits.shape[-1] == 1:
    return (logits[..., 0] > 0).astype(jnp.int32)
  return jnp.argmax(logits, -1)


def foreground_probability(logits: jax.Array) -> jax.Array:
  """Probability of class 1 of a two-class model: softmax of two logits, or the sigmoid of one."""
  if logits.shape[-1] == 1:
    return jax.nn.sigmoid(logits[..., 0].astype(jnp.float32))
  return jax.nn.softmax(logits.astype(jnp.float32), -1)[..., 1]


def pixel_accuracy(logits: jax.Array, batch: Batch) -> jax.Array:
  """Fraction of correctly classified pixels among those with a positive weight (all pixels without weights)."""
  correct = predict_classes(logits) == batch["label"]
  if "weights" not in batch:
    return jnp.mean(correct)
  counted = batch["weights"] > 0
  return jnp.sum(correct & counted) / jnp.maximum(jnp.sum(counted), 1)


def make_train_step(loss_fn: LossFn, augment_fn: AugmentFn | None = None) -> Callable[[TrainState, Batch], tuple]:
  """Builds the pure train step.

  The step's randomness is ``fold_in(state.rng, state.step)``, split into an augmentation and a dropout key.

  Args:
    loss_fn: ``(logits, labels, weights) -> scalar``.
    augment_fn: optional on-device augmentation ``(key, batch) -> batch``.

  Returns:
    ``train_step(state, batch) -> (new_state, metrics)`` with metrics ``loss``, ``pixel_accuracy``,
    ``grad_norm`` and ``param_norm`` (the latter after the update, so a blown-up state shows as non-finite).
  """
  objective = make_loss_fn(loss_fn)

  def train_step(state: TrainState, batch: Batch):
    step_rng = jax.random.fold_in(state.rng, state.step)
    augment_rng, dropout_rng = jax.random.split(step_rng)
    if augment_fn is not None:
      batch = augment_fn(augment_rng, batch)
    (loss, (logits, batch_stats)), grads = jax.value_and_grad(objective, has_aux=True)(
      state.params, state, batch, dropout_rng
    )
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    accuracy = pixel_accuracy(logits, crop_targets(batch, logits))
    metrics = {
      "loss": loss,
      "pixel_accuracy": accuracy,
      "grad_norm": optax.global_norm(grads),
      "param_norm": optax.global_norm(new_state.params),
    }
    return new_state, metrics

  return train_step


def make_eval_step(loss_fn: LossFn, num_classes: int) -> Callable[[TrainState, Batch], dict[str, jax.Array]]:
  """Builds the pure eval step.

  Returns:
    ``eval_step(state, batch) -> {'confusion', 'loss_sum', 'weight_sum', 'predictions'}`` (and
    ``'foreground_probability'`` for two-class models): sums to be added up over the split, and the predicted label
    maps (B, H', W') and class-1 probabilities for per-image metrics on the host. The batch's ``weights`` (0 for
    padding) exclude pixels from every sum.
  """

  def eval_step(state: TrainState, batch: Batch):
    logits = predict_logits(state, batch["image"])
    batch = crop_targets(batch, logits)
    weights = batch.get("weights")
    if weights is None:
      weights = jnp.ones(batch["label"].shape, jnp.float32)
    weight_sum = jnp.sum(weights)
    loss_sum = loss_fn(logits, batch["label"], weights) * weight_sum
    predictions = predict_classes(logits)
    confusion = confusion_matrix(predictions, batch["label"], num_classes, weights)
    out = {"confusion": confusion, "loss_sum": loss_sum, "weight_sum": weight_sum, "predictions": predictions}
    if logits.shape[-1] <= 2:  # two classes: class 1's probability, for metrics taken over thresholds
      out["foreground_probability"] = foreground_probability(logits)
    return out

  return eval_step
