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
  """Centre-crops ``label`` and ``weights`` to the logits' size (the unpadded U-Net's output is smaller); image-level
  labels (classification: logits (B, C)) are left as they are."""
  if logits.ndim != 4:
    return batch
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


def micro_batches(batch: Batch, count: int) -> Batch:
  """Splits a batch into ``count`` micro-batches, stacked on a new leading axis.

  Micro-batch ``j`` holds examples ``j, j + count, j + 2 count, ...``: with the batch sharded over devices, every
  device keeps its own examples (its share of each micro-batch), so no data moves between devices.
  """

  def split(x):
    if x.shape[0] % count:
      raise ValueError(f"a batch of {x.shape[0]} examples does not split into {count} micro-batches")
    return jnp.swapaxes(x.reshape(x.shape[0] // count, count, *x.shape[1:]), 0, 1)

  return jax.tree_util.tree_map(split, batch)


def make_gradient_fn(loss_fn: LossFn, grad_accum_steps: int = 1, *, objective: Callable | None = None) -> Callable:
  """Returns ``gradients(state, batch, rng) -> (loss, pixel_accuracy, batch_stats, grads)`` of a batch.

  With ``grad_accum_steps = k > 1`` the batch is split into k micro-batches (:func:`micro_batches`) whose gradients
  are averaged in a ``lax.scan``, so activations are held for one micro-batch at a time. The result equals one step
  on the whole batch when the loss is a mean over examples with equal pixel weights per micro-batch; BatchNorm
  normalises each micro-batch with its own statistics, and the running statistics are updated once per micro-batch.

  With a float16 :class:`~segjax.train.state.LossScale` in the state, the gradients returned are of the loss times
  the scale (the caller divides and checks them).

  ``objective`` replaces what is differentiated: ``objective(params, state, batch, rng) -> (scalar,
  (logits, batch_stats))`` like :func:`make_loss_fn`'s (default ``make_loss_fn(loss_fn)``), e.g. the loss plus a
  regulariser of ``params``.
  """
  objective = objective or make_loss_fn(loss_fn)

  def one(state: TrainState, batch: Batch, rng: jax.Array):
    scale = 1.0 if state.loss_scale is None else state.loss_scale.scale

    def scaled(params):
      loss, aux = objective(params, state, batch, rng)
      return loss * scale, (loss, aux)

    (_, (loss, (logits, batch_stats))), grads = jax.value_and_grad(scaled, has_aux=True)(state.params)
    return loss, pixel_accuracy(logits, crop_targets(batch, logits)), batch_stats, grads

  if grad_accum_steps == 1:
    return one

  def accumulated(state: TrainState, batch: Batch, rng: jax.Array):
    def body(carry, inputs):
      batch_stats, loss, accuracy, grads = carry
      index, micro = inputs
      out = one(state.replace(batch_stats=batch_stats), micro, jax.random.fold_in(rng, index))
      summed = jax.tree_util.tree_map(jnp.add, (loss, accuracy, grads), (out[0], out[1], out[3]))
      return (out[2], *summed), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
    init = (state.batch_stats, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
    inputs = (jnp.arange(grad_accum_steps), micro_batches(batch, grad_accum_steps))
    (batch_stats, loss, accuracy, grads), _ = jax.lax.scan(body, init, inputs)
    mean = lambda x: x / grad_accum_steps  # noqa: E731
    return mean(loss), mean(accuracy), batch_stats, jax.tree_util.tree_map(mean, grads)

  return accumulated


def all_finite(tree: Any) -> jax.Array:
  """True when every element of every leaf is finite."""
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


def ema_update(ema: Any, new: Any, step: jax.Array, decay: float) -> Any:
  """One step of the exponential moving average, with the decay ramped up as ``min(decay, (1 + s) / (10 + s))``.

  The ramp (as in TensorFlow's ``ExponentialMovingAverage(num_updates=)``) keeps the average close to the trained
  weights early on, when they change fast.
  """
  step = step.astype(jnp.float32)
  rate = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return jax.tree_util.tree_map(lambda e, p: rate * e + (1.0 - rate) * p, ema, new)


def make_train_step(
  loss_fn: LossFn,
  augment_fn: AugmentFn | None = None,
  *,
  axis_name: str | None = None,
  grad_accum_steps: int = 1,
  ema_decay: float = 0.0,
  objective: Callable | None = None,
  accuracy_name: str = "pixel_accuracy",
) -> Callable[[TrainState, Batch], tuple]:
  """Builds the pure train step.

  The step's randomness is ``fold_in(state.rng, state.step)``, split into an augmentation and a dropout key.

  Args:
    loss_fn: ``(logits, labels, weights) -> scalar``.
    augment_fn: optional on-device augmentation ``(key, batch) -> batch``. Under ``pmap`` it is called with
      ``axis_name=`` too, so that each example gets the key it would get in one global batch.
    axis_name: the ``pmap`` axis: gradients, the loss and metrics are averaged over it with ``lax.pmean``. None under
      ``jit`` (sharded or not), where the step is written for the global batch.
    grad_accum_steps: micro-batches per step (:func:`make_gradient_fn`).
    ema_decay: if positive, ``state.ema`` (see :func:`~segjax.train.state.create_train_state`) follows the weights.
    objective: what is differentiated, see :func:`make_gradient_fn`; the logged ``loss`` is its value.
    accuracy_name: the metric name of the batch's accuracy (``'accuracy'`` for image classification).

  Returns:
    ``train_step(state, batch) -> (new_state, metrics)`` with metrics ``loss``, ``pixel_accuracy``,
    ``grad_norm`` and ``param_norm`` (the latter after the update, so a blown-up state shows as non-finite), and with
    float16 loss scaling ``loss_scale`` and ``skipped`` (1 for a step skipped for non-finite gradients).
  """
  gradients = make_gradient_fn(loss_fn, grad_accum_steps, objective=objective)

  def train_step(state: TrainState, batch: Batch):
    step_rng = jax.random.fold_in(state.rng, state.step)
    augment_rng, dropout_rng = jax.random.split(step_rng)
    if axis_name is not None:
      dropout_rng = jax.random.fold_in(dropout_rng, jax.lax.axis_index(axis_name))
    if augment_fn is not None:
      batch = augment_fn(augment_rng, batch, axis_name=axis_name) if axis_name else augment_fn(augment_rng, batch)
    loss, accuracy, batch_stats, grads = gradients(state, batch, dropout_rng)
    if state.loss_scale is not None:
      grads = jax.tree_util.tree_map(lambda g: g / state.loss_scale.scale, grads)
    if axis_name is not None:
      grads, loss, accuracy, batch_stats = jax.lax.pmean((grads, loss, accuracy, batch_stats), axis_name)
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    metrics = {"loss": loss, accuracy_name: accuracy, "grad_norm": optax.global_norm(grads)}
    if state.loss_scale is not None:  # float16: skip the update of a step with non-finite gradients
      finite = all_finite(grads)
      keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
      new_state = new_state.replace(
        params=keep(new_state.params, state.params),
        opt_state=keep(new_state.opt_state, state.opt_state),
        batch_stats=keep(new_state.batch_stats, state.batch_stats),
        loss_scale=state.loss_scale.update(finite),
      )
      metrics.update(loss_scale=state.loss_scale.scale, skipped=1.0 - finite.astype(jnp.float32))
    if ema_decay > 0:
      new = {"params": new_state.params, "batch_stats": new_state.batch_stats}
      new_state = new_state.replace(ema=ema_update(state.ema, new, state.step, ema_decay))
    metrics["param_norm"] = optax.global_norm(new_state.params)
    return new_state, metrics

  return train_step


def make_eval_step(
  loss_fn: LossFn,
  num_classes: int,
  *,
  predict: Callable[[TrainState, jax.Array], jax.Array] = predict_logits,
) -> Callable[[TrainState, Batch], dict[str, jax.Array]]:
  """Builds the pure eval step.

  Args:
    loss_fn: the training loss, reported on the split.
    num_classes: C, for the confusion matrix.
    predict: ``predict(state, images) -> logits``; default the model's logits. For test-time augmentation pass
      :func:`segjax.tiling.tta_log_probabilities` (log of the averaged probabilities, whose softmax is that average).

  Returns:
    ``eval_step(state, batch) -> {'confusion', 'loss_sum', 'weight_sum', 'predictions'}`` and, for two-class models,
    ``'foreground_probability'`` (class 1), for more classes ``'probabilities'`` (B, H', W', C): sums to be added up
    over the split, and the predicted label maps and probabilities for per-image metrics on the host. The batch's
    ``weights`` (0 for padding) exclude pixels from every sum.
  """

  def eval_step(state: TrainState, batch: Batch):
    logits = predict(state, batch["image"])
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
    else:  # e.g. instance targets, which the watershed turns into instances
      out["probabilities"] = jax.nn.softmax(logits.astype(jnp.float32), -1)
    return out

  return eval_step
