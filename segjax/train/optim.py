"""Optimizers and learning-rate schedules from the config, one registry each."""

from collections.abc import Callable

import jax
import ml_collections
import optax

from segjax.registry import Registry


def _constant(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  del total_steps
  return optax.constant_schedule(config.learning_rate)


def _warmup_cosine(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  warmup = min(config.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=config.learning_rate,
    warmup_steps=warmup,
    decay_steps=max(total_steps, warmup + 1),
    end_value=config.learning_rate * config.end_learning_rate_factor,
  )


def _warmup_polynomial(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """nnU-Net's "poly" decay ``lr (1 - s / total) ** power`` (power 0.9, Isensee et al. 2021), after a linear warmup."""
  warmup = min(config.warmup_steps, max(total_steps - 1, 0))
  decay = optax.polynomial_schedule(
    init_value=config.learning_rate,
    end_value=config.learning_rate * config.end_learning_rate_factor,
    power=config.power,
    transition_steps=max(total_steps - warmup, 1),
  )
  if not warmup:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, config.learning_rate, warmup), decay], [warmup])


def _warmup_piecewise(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Step decay (He et al. 2015: 0.1, divided by 10 at 32k and 48k iterations): ``learning_rate`` times
  ``decay_factor`` at each of ``boundaries``, after ``warmup_steps`` of linear warm-up from 0 or, with
  ``warmup_learning_rate``, of that constant rate (He et al.'s ResNet-110 starts at 0.01 for about 400 iterations)."""
  del total_steps
  decay = optax.piecewise_constant_schedule(
    config.learning_rate, {int(b): float(config.decay_factor) for b in config.boundaries}
  )
  warmup = int(config.warmup_steps)
  if not warmup:
    return decay
  if config.warmup_learning_rate is None:
    start = optax.linear_schedule(0.0, config.learning_rate, warmup)
  else:
    start = optax.constant_schedule(float(config.warmup_learning_rate))
  return optax.join_schedules([start, lambda step: decay(step + warmup)], [warmup])


SCHEDULES: Registry[Callable[[ml_collections.ConfigDict, int], optax.Schedule]] = Registry(
  "schedule",
  "optimizer.schedule",
  {
    "constant": _constant,
    "warmup_cosine": _warmup_cosine,
    "polynomial": _warmup_polynomial,
    "piecewise": _warmup_piecewise,
  },
)

OPTIMIZERS: Registry[Callable[[optax.Schedule, ml_collections.ConfigDict], optax.GradientTransformation]] = Registry(
  "optimizer",
  "optimizer.name",
  {
    "adam": lambda lr, c: optax.adam(lr),
    "adamw": lambda lr, c: optax.adamw(lr, weight_decay=c.weight_decay),
    "sgd": lambda lr, c: _with_l2(optax.sgd(lr, momentum=c.momentum, nesterov=c.nesterov), c.weight_decay),
  },
)


def _kernels(params):
  """True for the parameters L2 weight decay applies to: those with more than one axis (kernels, not biases or
  BatchNorm scales)."""
  return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


def _with_l2(tx: optax.GradientTransformation, weight_decay: float) -> optax.GradientTransformation:
  """``tx`` after adding ``weight_decay * w`` to the kernels' gradients; ``tx`` itself (its state layout, as saved
  checkpoints have it) without decay."""
  return optax.chain(optax.add_decayed_weights(weight_decay, mask=_kernels), tx) if weight_decay else tx


def create_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """The learning-rate schedule named by ``config.schedule`` over ``total_steps``."""
  return SCHEDULES.lookup(config.schedule)(config, total_steps)


def create_optimizer(config: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """The optimizer named by ``config.name``, driven by the configured schedule, with optional gradient clipping.

  Args:
    config: the ``optimizer`` section of an experiment config (name, learning_rate, schedule, ...).
    total_steps: the training length, for schedules that decay over it.
  """
  tx = OPTIMIZERS.lookup(config.name)(create_schedule(config, total_steps), config)
  if config.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  return tx
