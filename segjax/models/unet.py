"""U-Net (Ronneberger, Fischer & Brox 2015, "U-Net: Convolutional Networks for Biomedical Image Segmentation").

The architecture of Sec. 2 / Fig. 1 with the now-common changes: 3x3 convs use same padding (so no cropping of the
skip connections and the output has the input's size), and an optional normalisation after every conv.
"""

import functools
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.errors import SegjaxError
from segjax.models import register_model
from segjax.models.layers import DoubleConv, check_norm, he_normal

UPSAMPLES = ("transpose", "resize")
RESIZE_METHODS = ("nearest", "bilinear")


@register_model("unet")
class UNet(nn.Module):
  """Same-padded U-Net for dense per-pixel classification (Ronneberger et al. 2015, Sec. 2).

  Contracting path: ``depth`` levels of two 3x3 conv -> norm -> ReLU with ``base_width * 2**level`` channels, each
  followed by 2x2 max pooling; a bottleneck level with ``base_width * 2**depth`` channels and optional dropout
  ("Drop-out layers at the end of the contracting path", Sec. 3.1). Expanding path: per level, a x2 up-sampling that
  halves the channels, concatenation with the skip feature map of the same level, and two 3x3 conv -> norm -> ReLU.
  A final 1x1 conv maps to ``num_classes`` logits.

  Inputs of any height/width are accepted: a side that is not a multiple of ``2**depth`` is reflect-padded at the
  bottom/right to the next multiple (mirroring, as the paper does at the image border, Sec. 2 / Fig. 2) and the
  logits are cropped back, so the output has the input's height and width.

  Attributes:
    num_classes: number of output channels (classes).
    depth: number of pooling steps.
    base_width: channels of the first level.
    norm: ``'batch'``, ``'group'``, ``'instance'`` or ``'none'`` (the paper's original: none, convs with bias).
    upsample: ``'transpose'`` (2x2 stride-2 transposed conv, the paper's "up-convolution") or ``'resize'``
      (``jax.image.resize`` x2 with ``resize_method``, then a 3x3 conv).
    resize_method: ``'nearest'`` or ``'bilinear'``, used when ``upsample='resize'``.
    dropout_rate: dropout on the bottleneck output in training; 0 disables it.
    dtype: computation dtype (params stay float32; logits are returned as float32).
    bn_axis_name: cross-device axis name for batch norm statistics (pmap).
    group_norm_groups: number of groups when ``norm='group'``; must divide ``base_width``.

  Example:
    >>> model = UNet(num_classes=2, depth=2, base_width=8)
    >>> x = jnp.zeros((1, 37, 50, 1))
    >>> variables = model.init(jax.random.key(0), x, train=False)
    >>> model.apply(variables, x, train=False).shape
    (1, 37, 50, 2)
  """

  num_classes: int
  depth: int = 4
  base_width: int = 64
  norm: str = "batch"
  upsample: str = "transpose"
  resize_method: str = "bilinear"
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  group_norm_groups: int = 8

  def __post_init__(self) -> None:
    if self.depth < 1:
      raise SegjaxError(f"U-Net depth must be >= 1, got {self.depth} (config key model.depth).")
    check_norm(self.norm, channels=self.base_width, group_norm_groups=self.group_norm_groups)
    if self.upsample not in UPSAMPLES:
      raise SegjaxError(
        f"unknown upsample {self.upsample!r} (config key model.upsample); choose one of: {', '.join(UPSAMPLES)}."
      )
    if self.resize_method not in RESIZE_METHODS:
      raise SegjaxError(
        f"unknown resize_method {self.resize_method!r} (config key model.resize_method); choose one of: "
        f"{', '.join(RESIZE_METHODS)}."
      )
    if not 0.0 <= self.dropout_rate < 1.0:
      raise SegjaxError(f"dropout_rate must be in [0, 1), got {self.dropout_rate} (config key model.dropout_rate).")
    super().__post_init__()

  def _double_conv(self, features: int, name: str) -> DoubleConv:
    return DoubleConv(
      features,
      norm=self.norm,
      dtype=self.dtype,
      bn_axis_name=self.bn_axis_name,
      group_norm_groups=self.group_norm_groups,
      name=name,
    )

  def _upsample(self, x: jax.Array, features: int, name: str) -> jax.Array:
    """x2 up-sampling to ``features`` channels; no norm or ReLU follows it, so the conv keeps its bias (Sec. 2)."""
    if self.upsample == "transpose":
      return nn.ConvTranspose(
        features, (2, 2), strides=(2, 2), padding="VALID", dtype=self.dtype, kernel_init=he_normal(), name=name
      )(x)
    batch, height, width, channels = x.shape
    x = jax.image.resize(x, (batch, 2 * height, 2 * width, channels), method=self.resize_method)
    return nn.Conv(features, (3, 3), padding="SAME", dtype=self.dtype, kernel_init=he_normal(), name=name)(x)

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Per-pixel logits.

    Args:
      x: images, (B, H, W, C) float.
      train: batch-norm batch statistics and dropout on (needs ``mutable=['batch_stats']`` and a 'dropout' rng).

    Returns:
      float32 logits, (B, H, W, num_classes).
    """
    chex.assert_rank(x, 4)
    height, width = x.shape[1:3]
    multiple = 2**self.depth
    pad_h, pad_w = -height % multiple, -width % multiple
    if pad_h or pad_w:
      x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="reflect")
    x = x.astype(self.dtype)

    skips = []
    for level in range(self.depth):
      x = self._double_conv(self.base_width * 2**level, f"down_{level}")(x, train=train)
      skips.append(x)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))

    x = self._double_conv(self.base_width * 2**self.depth, "bottleneck")(x, train=train)
    if self.dropout_rate > 0:
      x = nn.Dropout(self.dropout_rate, name="dropout")(x, deterministic=not train)

    for level in reversed(range(self.depth)):
      features = self.base_width * 2**level
      x = self._upsample(x, features, f"upsample_{level}")
      x = jnp.concatenate([skips[level], x], axis=-1)
      x = self._double_conv(features, f"up_{level}")(x, train=train)

    x = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, kernel_init=he_normal(), name="classifier")(x)
    return x[:, :height, :width].astype(jnp.float32)


UNetSmall = register_model("unet_small")(functools.partial(UNet, depth=3, base_width=16))
