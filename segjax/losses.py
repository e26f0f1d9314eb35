"""Segmentation losses: pure functions of (logits, labels, weights) -> scalar.

Logits have the class axis last; labels have the logits' shape without it, so the same functions serve per-pixel
segmentation (B, H, W, C) and per-image classification (B, C). Losses are looked up by name through ``LOSSES``.
"""

import math
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


def downsample_nearest(x: jax.Array, height: int, width: int) -> jax.Array:
  """Every s-th pixel of a (B, H, W) map with s = 2**k chosen so the result is (B, height, width), height = ceil(H/s).

  This matches a U-Net decoder level k of an input padded to a multiple of 2**k and cropped to ceil(H / 2**k).
  """
  stride_h = 2 ** round(math.log2(x.shape[1] / height))
  stride_w = 2 ** round(math.log2(x.shape[2] / width))
  out = x[:, ::stride_h, ::stride_w]
  if out.shape[1:3] != (height, width):
    raise ValueError(f"cannot downsample {x.shape[1:3]} to {(height, width)} by a power-of-two stride.")
  return out


def deep_supervision_loss(
  loss_fn: LossFn,
  logits: jax.Array,
  aux_logits: tuple[jax.Array, ...],
  labels: jax.Array,
  weights: jax.Array | None = None,
) -> jax.Array:
  """Loss over the full-resolution output and the coarser auxiliary outputs of a deeply supervised U-Net.

  Each auxiliary output (ordered coarsest to finest) is compared with the labels (and weights) subsampled to its
  resolution; the output at resolution 1/2**k gets weight 1/2**k and the weights are normalised to sum to 1, as in
  nnU-Net (Isensee et al. 2021, deep supervision).

  Args:
    loss_fn: the per-output loss ``(logits, labels, weights) -> scalar``.
    logits: full-resolution logits (B, H, W, C).
    aux_logits: lower-resolution logits, coarsest first.
    labels: (B, H, W) class ids.
    weights: optional (B, H, W) pixel weights.
  """
  outputs = [logits, *reversed(aux_logits)]  # finest first: output i is at 1/2**i
  scales = [0.5**i for i in range(len(outputs))]
  total = 0.0
  for scale, out in zip(scales, outputs, strict=True):
    h, w = out.shape[1:3]
    w_map = None if weights is None else downsample_nearest(weights, h, w)
    total = total + scale * loss_fn(out, downsample_nearest(labels, h, w), w_map)
  return total / sum(scales)


LOSSES: dict[str, LossFn] = {
  "softmax_cross_entropy": softmax_cross_entropy,
}


def get_loss(name: str) -> LossFn:
  """Returns the loss registered as ``name``; raises SegjaxError naming the config key otherwise."""
  if name not in LOSSES:
    raise SegjaxError(f"unknown loss '{name}' (config key loss); available: {', '.join(sorted(LOSSES))}.")
  return LOSSES[name]
