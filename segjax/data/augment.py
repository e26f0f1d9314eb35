"""On-device augmentation: jit-compiled JAX functions applied jointly to image, label and weights.

Each op takes a key and one example dict (image (H, W, C), label (H, W), optional weights (H, W)) and returns the
transformed dict; ``make_augment_fn`` maps the configured ops over a batch with one key per example. Keys come from
``fold_in(rng, step)`` in the train step, so augmentations are a pure function of (seed, step).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections

from segjax.errors import SegjaxError

Example = dict[str, jax.Array]
Op = Callable[[jax.Array, Example], Example]


def _spatial(fn: Callable[[jax.Array], jax.Array], example: Example) -> Example:
  """Applies the same spatial transform (on the two leading axes) to every array of an example."""
  return {k: fn(v) for k, v in example.items()}


def random_flip(key: jax.Array, example: Example) -> Example:
  """Flips left-right and up-down, each with probability 1/2."""
  flip_lr, flip_ud = jax.random.bernoulli(key, 0.5, (2,))
  example = _spatial(lambda a: jnp.where(flip_lr, a[:, ::-1], a), example)
  return _spatial(lambda a: jnp.where(flip_ud, a[::-1], a), example)


def random_rot90(key: jax.Array, example: Example) -> Example:
  """Rotates by a uniformly random multiple of 90 degrees (square images only)."""
  height, width = example["image"].shape[:2]
  if height != width:
    raise SegjaxError(
      f"augmentation rot90 needs square images, got {height}x{width}; remove 'rot90' from augment.ops or crop square."
    )
  k = jax.random.randint(key, (), 0, 4)
  branches = [lambda e, k=k: _spatial(lambda a: jnp.rot90(a, k, axes=(0, 1)), e) for k in range(4)]
  return jax.lax.switch(k, branches, example)


AUGMENTATIONS: dict[str, Op] = {
  "flip": random_flip,
  "rot90": random_rot90,
}


def make_augment_fn(config: ml_collections.ConfigDict) -> Callable[[jax.Array, Example], Example] | None:
  """Builds ``augment(key, batch) -> batch`` from the ``augment`` config section (``ops``: a list of names).

  Returns None when no op is configured, so the train step skips augmentation entirely.
  """
  names = list(config.get("ops", ()))
  for name in names:
    if name not in AUGMENTATIONS:
      raise SegjaxError(
        f"unknown augmentation '{name}' (config key augment.ops); available: {', '.join(AUGMENTATIONS)}."
      )
  if not names:
    return None
  ops = [AUGMENTATIONS[n] for n in names]

  def augment_one(key: jax.Array, example: Example) -> Example:
    for op, op_key in zip(ops, jax.random.split(key, len(ops)), strict=True):
      example = op(op_key, example)
    return example

  def augment(key: jax.Array, batch: Example) -> Example:
    keys = jax.random.split(key, batch["image"].shape[0])
    return jax.vmap(augment_one)(keys, batch)

  return augment
