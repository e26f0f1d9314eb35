"""Segmentation losses: pure functions of (logits, labels, weights) -> scalar.

Logits have the class axis last; labels have the logits' shape without it, so the same functions serve per-pixel
segmentation (B, H, W, C) and per-image classification (B, C). Losses are looked up by name through ``LOSSES``.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from segjax.errors import SegjaxError

LossFn = Callable[..., jax.Array]


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array | None = None) -> jax.Array:
  """Weighted mean of the per-pixel softmax cross-entropy.

  This is the energy function of the U-Net paper (Ronneberger et al. 2015, Sec. 3, Eq. 1): a pixel-wise soft-max over
  the final feature map combined with the cross-entropy loss, each pixel weighted by ``w(x)``.

  Args:
    logits: float array (..., num_classes).
    labels: integer class ids, shape ``logits.shape[:-1]``.
    weights: optional per-pixel weights of the labels' shape (0 excludes a pixel, e.g. padding or an ignore label).

  Returns:
    The scalar weighted mean, ``sum(w * ce) / max(sum(w), eps)``.
  """
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  if weights is None:
    return jnp.mean(ce)
  weights = weights.astype(jnp.float32)
  return jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1e-8)


LOSSES: dict[str, LossFn] = {
  "softmax_cross_entropy": softmax_cross_entropy,
}


def get_loss(name: str) -> LossFn:
  """Returns the loss registered as ``name``; raises SegjaxError naming the config key otherwise."""
  if name not in LOSSES:
    raise SegjaxError(f"unknown loss '{name}' (config key loss); available: {', '.join(sorted(LOSSES))}.")
  return LOSSES[name]
