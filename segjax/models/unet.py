"""U-Nets (Ronneberger, Fischer & Brox 2015, "U-Net: Convolutional Networks for Biomedical Image Segmentation").

* :class:`UNetValid` (``unet_valid``): the architecture of Sec. 2 / Fig. 1 exactly, with unpadded convs, so the output
  is smaller than the input (572 -> 388) and only some input sizes work (:func:`valid_input_sizes`).
* :class:`UNet` (``unet``, ``unet_small``): with the now-common changes: 3x3 convs use same padding (so no cropping
  of the skip connections and the output has the input's size), an optional normalisation after every conv and
  optional deep supervision.
* ``resunet`` (:data:`ResUNet`): the same-padded U-Net with residual blocks (He et al. 2016) in place of the plain
  double convs.
"""

import functools
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.errors import SegjaxError
from segjax.models import register_model
from segjax.models.geometry import Geometry
from segjax.models.layers import (
  DoubleConv,
  ResidualDoubleConv,
  check_choice,
  check_kernels,
  check_norm,
  conv,
  he_normal,
  max_pool_2x2,
  up_convolution,
)

UPSAMPLES = ("transpose", "resize")
RESIZE_METHODS = ("nearest", "bilinear")
BLOCKS = ("double_conv", "residual")


def _check_depth(depth: int) -> None:
  if depth < 1:
    raise SegjaxError(f"U-Net depth must be >= 1, got {depth} (config key model.depth).")


def _check_unet_settings(depth: int, base_width: int, norm: str, group_norm_groups: int, dropout_rate: float) -> None:
  """Raises SegjaxError for settings that both U-Nets share and that cannot work."""
  _check_depth(depth)
  check_norm(norm, channels=base_width, group_norm_groups=group_norm_groups)
  if not 0.0 <= dropout_rate < 1.0:
    raise SegjaxError(f"dropout_rate must be in [0, 1), got {dropout_rate} (config key model.dropout_rate).")


def _up_convolution(features: int, dtype: Any, kernels: str, name: str) -> nn.Module:
  """The paper's "2x2 up-convolution" (Sec. 2): a stride-2 transposed conv with bias and no activation."""
  return up_convolution(features, dtype=dtype, kernel_init=he_normal(), kernels=kernels, name=name)


def center_crop(x: jax.Array, height: int, width: int) -> jax.Array:
  """The centred ``height`` x ``width`` window of NHWC ``x`` (Ronneberger et al. 2015, Sec. 2: "cropping").

  When a side's surplus is odd, the extra pixel is cut at the bottom/right.

  Args:
    x: (B, H, W, C) array with H >= height and W >= width.
    height: output height.
    width: output width.

  Returns:
    ``x[:, top:top + height, left:left + width]`` with ``top = (H - height) // 2``, ``left = (W - width) // 2``.
  """
  chex.assert_rank(x, 4)
  full_height, full_width = x.shape[1:3]
  if not (0 < height <= full_height and 0 < width <= full_width):
    raise ValueError(f"cannot crop a {full_height}x{full_width} map to {height}x{width}.")
  top, left = (full_height - height) // 2, (full_width - width) // 2
  return x[:, top : top + height, left : left + width]


# ------------------------------------------------------------------------------------- sizes of the unpadded U-Net


def _trace_unpadded_size(input_size: int, depth: int) -> tuple[int | None, str]:
  """Follows one image side through the unpadded U-Net: (output size, "") or (None, why it cannot)."""
  _check_depth(depth)
  size = input_size
  if size < 1:
    return None, "it is not positive"
  for level in range(depth):
    size -= 4  # two unpadded 3x3 convs
    if size < 1:
      return None, f"the convs of level {level} would shrink it to {size}"
    if size % 2:
      return None, f"the 2x2 max pooling after level {level} would see the odd size {size}"
    size //= 2
  size -= 4
  if size < 1:
    return None, f"the bottleneck convs would shrink it to {size}"
  for level in reversed(range(depth)):
    size = 2 * size - 4  # up-convolution, then two unpadded 3x3 convs
    if size < 1:
      return None, f"the convs of expanding level {level} would shrink it to {size}"
  return size, ""


def smallest_valid_input_size(depth: int = 4) -> int:
  """The smallest image side the unpadded U-Net of ``depth`` pooling steps can take (188 for depth 4).

  A side s is valid iff every pooled size is even and every size stays positive. Writing m for the side entering the
  bottleneck, s = 2**depth * m + 4 * (2**depth - 1) and the bottleneck output is b = m - 4; the expanding path maps
  b -> 2b - 4 ``depth`` times, which stays positive iff b >= 3 for depth 1 and b >= 4 (the fixed point) for more.
  So the valid sides are ``smallest_valid_input_size(depth) + k * 2**depth``, k = 0, 1, ...
  """
  _check_depth(depth)
  smallest_bottleneck = 3 if depth == 1 else 4
  return 2**depth * (smallest_bottleneck + 4) + 4 * (2**depth - 1)


def valid_input_sizes(depth: int = 4, max_size: int = 1024) -> list[int]:
  """All image sides up to ``max_size`` that the unpadded U-Net can take, e.g. [188, 204, ..., 572, ...] for depth 4.

  Args:
    depth: number of pooling steps.
    max_size: largest side to list.

  Returns:
    The valid sides in increasing order (spaced by ``2**depth``); each maps to a positive
    :func:`valid_output_size`.
  """
  return list(range(smallest_valid_input_size(depth), max_size + 1, 2**depth))


def next_valid_input_size(size: int, depth: int = 4) -> int:
  """The smallest valid side >= ``size`` for the unpadded U-Net (e.g. the tile to pad an image to)."""
  smallest, step = smallest_valid_input_size(depth), 2**depth
  return smallest + step * max(0, -(-(size - smallest) // step))


def previous_valid_input_size(size: int, depth: int = 4) -> int | None:
  """The largest valid side <= ``size`` for the unpadded U-Net, or None if ``size`` is below the smallest one."""
  smallest, step = smallest_valid_input_size(depth), 2**depth
  return None if size < smallest else smallest + step * ((size - smallest) // step)


def _unpadded_output_size(input_size: int, depth: int, what: str) -> int:
  output_size, why = _trace_unpadded_size(input_size, depth)
  if output_size is not None:
    return output_size
  below, above = previous_valid_input_size(input_size, depth), next_valid_input_size(input_size, depth)
  nearest = f"sizes: {below} and {above}" if below is not None else f"size: {above} (the smallest)"
  raise SegjaxError(
    f"{what} {input_size} does not fit the unpadded U-Net of depth {depth}: {why}; nearest valid {nearest} "
    "(see segjax.models.unet.valid_input_sizes)."
  )


def valid_output_size(input_size: int, depth: int = 4) -> int:
  """Output side of the unpadded U-Net (Ronneberger et al. 2015, Fig. 1) for an input side: 572 -> 388, 188 -> 4.

  Args:
    input_size: height or width of the input tile.
    depth: number of pooling steps.

  Returns:
    The height or width of the logits.

  Raises:
    SegjaxError: if a 2x2 max pooling would see an odd size or a size would become non-positive; the message names
      the size and the nearest valid ones.
  """
  return _unpadded_output_size(input_size, depth, "input size")


@register_model("unet_valid")
class UNetValid(nn.Module):
  """The U-Net of Ronneberger et al. 2015, exactly as in Sec. 2 and Fig. 1 (unpadded convs, cropped skips).

  Contracting path: ``depth`` levels of two unpadded 3x3 convs with ReLU and ``base_width * 2**level`` channels, each
  followed by 2x2 max pooling with stride 2; a bottleneck level with ``base_width * 2**depth`` channels, with optional
  dropout on its output ("Drop-out layers at the end of the contracting path", Sec. 3.1). Expanding path: per level a
  2x2 up-convolution (stride-2 transposed conv) that halves the channels, concatenation with the centre-cropped
  feature map of the same contracting level, and two unpadded 3x3 convs with ReLU. The up-convolution is linear, as
  in Fig. 1 (its arrow has no ReLU). A final 1x1 conv maps to ``num_classes`` logits. Weights are drawn from
  N(0, sqrt(2 / N)), N the fan-in (Sec. 3); biases start at zero.

  Every conv loses a 1-pixel border, so the output is smaller than the input (572 -> 388 for depth 4) and only inputs
  whose pooled sizes are all even work: see :func:`valid_output_size` and :func:`valid_input_sizes`. The paper
  predicts large images tile by tile with a mirrored border (overlap-tile strategy, Fig. 2). With 1 input channel,
  2 classes and the defaults it has 31,030,658 parameters.

  Attributes:
    num_classes: number of output channels (classes).
    depth: number of pooling steps.
    base_width: channels of the first level.
    norm: ``'none'`` (the paper: convs with bias), or ``'batch'``, ``'group'``, ``'instance'`` after every conv.
    dropout_rate: dropout on the bottleneck output in training; 0 disables it.
    dtype: computation dtype (params stay float32; logits are returned as float32).
    bn_axis_name: cross-device axis name for batch norm statistics (pmap); unused with ``norm='none'``.
    group_norm_groups: number of groups when ``norm='group'``; must divide ``base_width``.
    kernels: the form of the convolutions and pools (:data:`segjax.models.layers.KERNELS`; ``'auto'`` per platform).

  Example:
    >>> model = UNetValid(num_classes=2, depth=2, base_width=4)
    >>> x = jnp.zeros((1, 44, 60, 1))
    >>> variables = model.init(jax.random.key(0), x, train=False)
    >>> model.apply(variables, x, train=False).shape
    (1, 4, 20, 2)
  """

  num_classes: int
  depth: int = 4
  base_width: int = 64
  norm: str = "none"
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  group_norm_groups: int = 8
  kernels: str = "auto"

  def __post_init__(self) -> None:
    _check_unet_settings(self.depth, self.base_width, self.norm, self.group_norm_groups, self.dropout_rate)
    check_kernels(self.kernels)
    super().__post_init__()

  def _double_conv(self, features: int, name: str) -> DoubleConv:
    return DoubleConv(
      features,
      padding="VALID",
      norm=self.norm,
      dtype=self.dtype,
      bn_axis_name=self.bn_axis_name,
      group_norm_groups=self.group_norm_groups,
      kernels=self.kernels,
      name=name,
    )

  @nn.nowrap
  def geometry(self, multiple: int = 1) -> Geometry:
    """Output = input - 2 * margin for every valid input, with margin = (smallest valid input - its output) / 2
    (92 for depth 4: 572 -> 388); inputs are rounded up to the next valid size (``multiple`` does not apply)."""
    del multiple
    depth = self.depth
    smallest = smallest_valid_input_size(depth)
    margin = (smallest - valid_output_size(smallest, depth)) // 2
    return Geometry(margin=margin, fit=lambda n: next_valid_input_size(n, depth), align=2**depth)

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Per-pixel logits of the centre of the input tile.

    Args:
      x: images, (B, H, W, C) float; H and W must be valid sizes (:func:`valid_input_sizes`).
      train: dropout (and batch-norm batch statistics) on; needs a 'dropout' rng when ``dropout_rate > 0``.

    Returns:
      float32 logits, (B, valid_output_size(H), valid_output_size(W), num_classes).

    Raises:
      SegjaxError: at trace time, if H or W is not a valid size.
    """
    chex.assert_rank(x, 4)
    height, width = x.shape[1:3]
    out_height = _unpadded_output_size(height, self.depth, "input height")
    out_width = _unpadded_output_size(width, self.depth, "input width")
    x = x.astype(self.dtype)

    skips = []
    for level in range(self.depth):
      x = self._double_conv(self.base_width * 2**level, f"down_{level}")(x, train=train)
      skips.append(x)
      x = max_pool_2x2(x, self.kernels)

    x = self._double_conv(self.base_width * 2**self.depth, "bottleneck")(x, train=train)
    if self.dropout_rate > 0:
      x = nn.Dropout(self.dropout_rate, name="dropout")(x, deterministic=not train)

    for level in reversed(range(self.depth)):
      features = self.base_width * 2**level
      x = _up_convolution(features, self.dtype, self.kernels, f"upsample_{level}")(x)
      skip = center_crop(skips[level], x.shape[1], x.shape[2])
      x = jnp.concatenate([skip, x], axis=-1)
      x = self._double_conv(features, f"up_{level}")(x, train=train)

    x = conv(self.num_classes, 1, dtype=self.dtype, kernel_init=he_normal(), kernels=self.kernels, name="classifier")(x)
    chex.assert_shape(x, (None, out_height, out_width, self.num_classes))
    return x.astype(jnp.float32)


# ------------------------------------------------------------------------------------------ same-padded U-Net


@register_model("unet")
class UNet(nn.Module):
  """Same-padded U-Net for dense per-pixel classification (Ronneberger et al. 2015, Sec. 2).

  Contracting path: ``depth`` levels of two 3x3 conv -> norm -> ReLU with ``base_width * 2**level`` channels, each
  followed by 2x2 max pooling; a bottleneck level with ``base_width * 2**depth`` channels and optional dropout
  ("Drop-out layers at the end of the contracting path", Sec. 3.1). Expanding path: per level, a x2 up-sampling that
  halves the channels, concatenation with the skip feature map of the same level, and two 3x3 conv -> norm -> ReLU.
  A final 1x1 conv maps to ``num_classes`` logits.

  With ``block='residual'`` (registered as ``resunet``) every level's two convs form a residual block instead
  (:class:`segjax.models.layers.ResidualDoubleConv`: post-activation basic block of He et al. 2016, Sec. 3.2-3.3,
  with a 1x1 projection shortcut where the channels change), as in the residual U-Nets of Zhang et al. 2018
  ("Road Extraction by Deep Residual U-Net").

  Deep supervision (``deep_supervision=True``; Lee et al. 2015, "Deeply-Supervised Nets", as used by nnU-Net,
  Isensee et al. 2021): a 1x1 conv head on the output of every expanding level except the finest. In training
  (``train=True``) the model then returns ``(logits, aux_logits)``, where ``aux_logits`` is a tuple of ``depth - 1``
  float32 arrays ordered coarsest to finest; the one from the level at 1/2**k resolution has shape
  (B, ceil(H / 2**k), ceil(W / 2**k), num_classes), k = depth - 1, ..., 1, cropped like the main logits, so its
  pixel (i, j) lies over input pixel (2**k i, 2**k j) (:func:`segjax.losses.deep_supervision_loss` subsamples labels
  the same way). In evaluation (``train=False``) it returns only the logits; the heads are still computed (so
  ``init`` with ``train=False`` creates their parameters) and dropped by XLA under ``jit``.

  Inputs of any height/width are accepted: a side that is not a multiple of ``2**depth`` is reflect-padded at the
  bottom/right to the next multiple (mirroring, as the paper does at the image border, Sec. 2 / Fig. 2) and the
  logits are cropped back, so the output has the input's height and width.

  Attributes:
    num_classes: number of output channels (classes).
    depth: number of pooling steps.
    base_width: channels of the first level.
    norm: ``'batch'``, ``'group'``, ``'instance'`` or ``'none'`` (the paper's original: none, convs with bias).
    block: ``'double_conv'`` (two conv -> norm -> ReLU, the paper) or ``'residual'`` (a residual block).
    upsample: ``'transpose'`` (2x2 stride-2 transposed conv, the paper's "up-convolution") or ``'resize'``
      (``jax.image.resize`` x2 with ``resize_method``, then a 3x3 conv).
    resize_method: ``'nearest'`` or ``'bilinear'``, used when ``upsample='resize'``.
    dropout_rate: dropout on the bottleneck output in training; 0 disables it.
    dtype: computation dtype (params stay float32; logits are returned as float32).
    bn_axis_name: cross-device axis name for batch norm statistics (pmap).
    group_norm_groups: number of groups when ``norm='group'``; must divide ``base_width``.
    deep_supervision: add auxiliary logits of the coarser expanding levels to the training output (see above).
    kernels: the form of the convolutions and pools (:data:`segjax.models.layers.KERNELS`; ``'auto'`` per platform).

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
  block: str = "double_conv"
  upsample: str = "transpose"
  resize_method: str = "bilinear"
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  group_norm_groups: int = 8
  deep_supervision: bool = False
  kernels: str = "auto"

  def __post_init__(self) -> None:
    _check_unet_settings(self.depth, self.base_width, self.norm, self.group_norm_groups, self.dropout_rate)
    check_kernels(self.kernels)
    check_choice("block", self.block, BLOCKS)
    check_choice("upsample", self.upsample, UPSAMPLES)
    check_choice("resize_method", self.resize_method, RESIZE_METHODS)
    super().__post_init__()

  def _block(self, features: int, name: str) -> nn.Module:
    block_cls = DoubleConv if self.block == "double_conv" else ResidualDoubleConv
    return block_cls(
      features,
      norm=self.norm,
      dtype=self.dtype,
      bn_axis_name=self.bn_axis_name,
      group_norm_groups=self.group_norm_groups,
      kernels=self.kernels,
      name=name,
    )

  def _upsample(self, x: jax.Array, features: int, name: str) -> jax.Array:
    """x2 up-sampling to ``features`` channels; no norm or ReLU follows it, so the conv keeps its bias (Sec. 2)."""
    if self.upsample == "transpose":
      return _up_convolution(features, self.dtype, self.kernels, name)(x)
    batch, height, width, channels = x.shape
    x = jax.image.resize(x, (batch, 2 * height, 2 * width, channels), method=self.resize_method)
    return conv(features, 3, dtype=self.dtype, kernel_init=he_normal(), kernels=self.kernels, name=name)(x)

  def _classifier(self, name: str) -> nn.Conv:
    return conv(self.num_classes, 1, dtype=self.dtype, kernel_init=he_normal(), kernels=self.kernels, name=name)

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array | tuple[jax.Array, tuple[jax.Array, ...]]:
    """Per-pixel logits.

    Args:
      x: images, (B, H, W, C) float.
      train: batch-norm batch statistics and dropout on (needs ``mutable=['batch_stats']`` and a 'dropout' rng).

    Returns:
      float32 logits, (B, H, W, num_classes); with ``deep_supervision`` and ``train=True`` the pair
      ``(logits, aux_logits)``, ``aux_logits`` coarsest first (see the class docstring).
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
      x = self._block(self.base_width * 2**level, f"down_{level}")(x, train=train)
      skips.append(x)
      x = max_pool_2x2(x, self.kernels)

    x = self._block(self.base_width * 2**self.depth, "bottleneck")(x, train=train)
    if self.dropout_rate > 0:
      x = nn.Dropout(self.dropout_rate, name="dropout")(x, deterministic=not train)

    aux_logits = []
    for level in reversed(range(self.depth)):
      features = self.base_width * 2**level
      x = self._upsample(x, features, f"upsample_{level}")
      x = jnp.concatenate([skips[level], x], axis=-1)
      x = self._block(features, f"up_{level}")(x, train=train)
      if self.deep_supervision and level > 0:
        aux = self._classifier(f"aux_classifier_{level}")(x)
        aux_logits.append(aux[:, : -(-height // 2**level), : -(-width // 2**level)].astype(jnp.float32))

    logits = self._classifier("classifier")(x)[:, :height, :width].astype(jnp.float32)
    if self.deep_supervision and train:
      return logits, tuple(aux_logits)
    return logits


UNetSmall = register_model("unet_small")(functools.partial(UNet, depth=3, base_width=16))
ResUNet = register_model("resunet")(functools.partial(UNet, block="residual"))
