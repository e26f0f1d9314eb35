"""Optimizers and learning-rate schedules from the config, one registry each."""

from collections.abc import Callable

import ml_collections
import optax

from segjax.registry import Registry


def _constant(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  del total_steps
  return optax.constant_schedule(config.learning_rate)


def _warmup_cosine(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  warmup = min(config.get("warmup_steps", 0), max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=config.learning_rate,
    warmup_steps=warmup,
    decay_steps=max(total_steps, warmup + 1),
    end_value=config.learning_rate * config.get("end_learning_rate_factor", 0.0),
  )


def _warmup_polynomial(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """nnU-Net's "poly" decay ``lr (1 - s / total) ** power`` (power 0.9, Isensee et al. 2021), after a linear warmup."""
  warmup = min(config.get("warmup_steps", 0), max(total_steps - 1, 0))
  decay = optax.polynomial_schedule(
    init_value=config.learning_rate,
    end_value=config.learning_rate * config.get("end_learning_rate_factor", 0.0),
    power=config.get("power", 0.9),
    transition_steps=max(total_steps - warmup, 1),
  )
  if not warmup:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, config.learning_rate, warmup), decay], [warmup])


SCHEDULES: Registry[Callable[[ml_collections.ConfigDict, int], optax.Schedule]] = Registry(
  "schedule",
  "optimizer.schedule",
  {"constant": _constant, "warmup_cosine": _warmup_cosine, "polynomial": _warmup_polynomial},
)

OPTIMIZERS: Registry[Callable[[optax.Schedule, ml_collections.ConfigDict], optax.GradientTransformation]] = Registry(
  "optimizer",
  "optimizer.name",
  {
    "adam": lambda lr, c: optax.adam(lr),
    "adamw": lambda lr, c: optax.adamw(lr, weight_decay=c.get("weight_decay", 1e-4)),
    "sgd": lambda lr, c: optax.sgd(lr, momentum=c.get("momentum", 0.9), nesterov=c.get("nesterov", True)),
  },
)


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
  if config.get("grad_clip_norm"):
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  return tx
