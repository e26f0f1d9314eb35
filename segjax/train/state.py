"""The explicit training state and its creation."""

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax.training import train_state


class TrainState(train_state.TrainState):
  """Flax's TrainState (step, apply_fn, params, tx, opt_state) plus BatchNorm statistics and the base RNG key.

  ``rng`` never changes during training: the key of step ``s`` is ``fold_in(rng, s)``, so every random draw is a pure
  function of (seed, step) and a resumed run repeats exactly what an uninterrupted one would do.
  """

  batch_stats: Any
  rng: jax.Array


def create_train_state(
  rng: jax.Array, model: nn.Module, tx: optax.GradientTransformation, input_shape: tuple[int, ...]
) -> TrainState:
  """Initialises the model's variables and optimizer state.

  Args:
    rng: a raw uint32 PRNG key (``jax.random.PRNGKey(seed)``); split into init and training keys.
    model: a segjax model (``__call__(x, *, train)``).
    tx: the Optax optimizer.
    input_shape: shape of one input batch, NHWC (the batch size does not matter).

  Returns:
    A TrainState at step 0.
  """
  init_rng, dropout_rng, train_rng = jax.random.split(rng, 3)
  variables = model.init({"params": init_rng, "dropout": dropout_rng}, jnp.zeros(input_shape, jnp.float32), train=False)
  return TrainState.create(
    apply_fn=model.apply,
    params=variables["params"],
    tx=tx,
    batch_stats=variables.get("batch_stats", {}),
    rng=train_rng,
  ).replace(step=jnp.zeros((), jnp.int32))  # an array, not a Python int: the jitted step must not recompile at step 1


def count_params(params: Any) -> int:
  """Number of scalars in a parameter tree."""
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
