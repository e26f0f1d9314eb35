"""The explicit training state and its creation."""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn
from flax import struct
from flax.training import train_state

from segjax.errors import SegjaxError

HALF_PRECISION_DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16}


def compute_dtype(config: ml_collections.ConfigDict) -> Any:
  """The models' activation dtype: float32, or ``half_precision_dtype`` when ``half_precision`` is on.

  Parameters and optimizer state stay float32 either way; float16 also turns on dynamic loss scaling.
  """
  if not config.half_precision:
    return jnp.float32
  name = config.half_precision_dtype
  if name not in HALF_PRECISION_DTYPES:
    raise SegjaxError(
      f"config key half_precision_dtype must be one of {', '.join(HALF_PRECISION_DTYPES)}, got {name!r}."
    )
  return HALF_PRECISION_DTYPES[name]


class LossScale(struct.PyTreeNode):
  """Dynamic loss scaling for float16 training (Micikevicius et al. 2018, "Mixed Precision Training", Sec. 3.2).

  The loss is multiplied by ``scale`` before differentiation and the gradients divided by it, so that small float16
  gradients do not flush to zero. A step with non-finite gradients is skipped and halves the scale; after
  ``growth_interval`` finite steps in a row the scale doubles.
  """

  scale: jax.Array
  good_steps: jax.Array
  growth_interval: int = struct.field(pytree_node=False, default=2000)

  @classmethod
  def create(cls, initial_scale: float = 2.0**15, growth_interval: int = 2000) -> "LossScale":
    """A scale of ``initial_scale`` that doubles after ``growth_interval`` finite steps in a row."""
    return cls(jnp.asarray(initial_scale, jnp.float32), jnp.zeros((), jnp.int32), growth_interval)

  def update(self, finite: jax.Array) -> "LossScale":
    """The scale after a step whose gradients were (or were not) all finite."""
    grow = finite & (self.good_steps + 1 >= self.growth_interval)
    scale = jnp.where(finite, jnp.where(grow, self.scale * 2.0, self.scale), jnp.maximum(self.scale / 2.0, 1.0))
    good_steps = jnp.where(finite & ~grow, self.good_steps + 1, 0)
    return self.replace(scale=scale, good_steps=good_steps)


class TrainState(train_state.TrainState):
  """Flax's TrainState (step, apply_fn, params, tx, opt_state) plus BatchNorm statistics and the base RNG key.

  ``rng`` never changes during training: the key of step ``s`` is ``fold_in(rng, s)``, so every random draw is a pure
  function of (seed, step) and a resumed run repeats exactly what an uninterrupted one would do.

  Optional parts (None when off): ``ema``, the exponential moving average ``{'params', 'batch_stats'}`` that
  evaluation uses (config key ``ema_decay``), and ``loss_scale``, the float16 :class:`LossScale`.
  """

  batch_stats: Any
  rng: jax.Array
  ema: Any = None
  loss_scale: LossScale | None = None

  def for_eval(self) -> "TrainState":
    """The state evaluation runs: the EMA weights and statistics in place of the trained ones when EMA is on."""
    if self.ema is None:
      return self
    return self.replace(params=self.ema["params"], batch_stats=self.ema["batch_stats"])


def create_train_state(
  rng: jax.Array,
  model: nn.Module,
  tx: optax.GradientTransformation,
  input_shape: tuple[int, ...],
  *,
  ema: bool = False,
  loss_scale: LossScale | None = None,
) -> TrainState:
  """Initialises the model's variables and optimizer state.

  Args:
    rng: a raw uint32 PRNG key (``jax.random.PRNGKey(seed)``); split into init and training keys.
    model: a segjax model (``__call__(x, *, train)``).
    tx: the Optax optimizer.
    input_shape: shape of one input batch, NHWC (the batch size does not matter).
    ema: keep an exponential moving average of the parameters and statistics (starts at the initial values).
    loss_scale: the initial dynamic loss scale for float16 training, or None.

  Returns:
    A TrainState at step 0.
  """
  init_rng, dropout_rng, train_rng = jax.random.split(rng, 3)
  variables = model.init({"params": init_rng, "dropout": dropout_rng}, jnp.zeros(input_shape, jnp.float32), train=False)
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  return TrainState.create(
    apply_fn=model.apply,
    params=params,
    tx=tx,
    batch_stats=batch_stats,
    rng=train_rng,
    # copies: the jitted step donates the state, and one buffer must not appear in it twice
    ema=jax.tree_util.tree_map(jnp.copy, {"params": params, "batch_stats": batch_stats}) if ema else None,
    loss_scale=loss_scale,
  ).replace(step=jnp.zeros((), jnp.int32))  # an array, not a Python int: the jitted step must not recompile at step 1


def count_params(params: Any) -> int:
  """Number of scalars in a parameter tree."""
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
