"""Conv and normalisation blocks shared by the segjax models.

Every block takes ``train`` as a keyword-only call argument and a computation ``dtype`` attribute; parameters stay
float32 (Flax's default ``param_dtype``). BatchNorm settings are written once here (:func:`batch_norm`) so the U-Net
and the ResNet use the same momentum, epsilon and cross-device axis.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.errors import SegjaxError

NORMS = ("batch", "group", "instance", "none")

# PyTorch's BatchNorm2d defaults (momentum 0.1 on the new value == 0.9 on the running value), so converted
# torchvision weights behave the same.
BN_MOMENTUM = 0.9
NORM_EPSILON = 1e-5


def he_normal(mode: str = "fan_in") -> jax.nn.initializers.Initializer:
  """He et al. 2015 ("Delving deep into rectifiers", Sec. 2.2) Gaussian init with variance 2 / fan.

  Ronneberger et al. 2015 (U-Net, Sec. 3) draw weights from N(0, sqrt(2 / N)), N the fan-in; torchvision's ResNet
  uses the same rule on the fan-out.

  Args:
    mode: ``'fan_in'`` or ``'fan_out'``.

  Returns:
    A Flax/JAX initializer (untruncated normal).
  """
  return nn.initializers.variance_scaling(2.0, mode, "normal")


LECUN_NORMAL = nn.initializers.lecun_normal()  # nn.Conv's default kernel init

POINTWISE_AS_MATMUL: bool | None = None
"""How 1x1 convolutions and 2x2 stride-2 up-convolutions run: as matrix products (True), as XLA convolutions (False),
or None: matrix products on the CPU backend only, where XLA's convolution kernels are several times slower for them
(most of all their weight gradients; see BENCHMARKS.md). The parameters and the result are the same either way
(tests)."""


class _KernelLayer(nn.Module):
  """The fields, parameters and initialisers ``nn.Conv`` and ``nn.ConvTranspose`` have, shared by segjax's CPU forms
  of them (:class:`PointwiseConv`, :class:`UpConv2x2`, :class:`Conv3x3`), so their checkpoints are interchangeable."""

  features: int
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Callable = LECUN_NORMAL
  bias_init: Callable = nn.initializers.zeros_init()

  def kernel_and_bias(self, x: jax.Array, size: int) -> tuple:
    """``(x, kernel, bias)``: the (size, size, C, features) kernel and the bias (None without one), promoted with
    ``x`` to ``dtype``. Call from a compact ``__call__``."""
    kernel = self.param("kernel", self.kernel_init, (size, size, x.shape[-1], self.features), self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
    return nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)


class PointwiseConv(_KernelLayer):
  """A 1x1 convolution, optionally strided, computed as ``x[:, ::s, ::s] @ kernel[0, 0]`` (+ bias) by
  :func:`pointwise`, whose kernel gradient is a banded matrix product.

  Drop-in for ``nn.Conv(features, (1, 1), strides=s)`` with ``'VALID'`` or ``'SAME'`` padding (equal for 1x1
  kernels): the same parameter names, shapes and initialisation, and the same output.
  """

  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x, kernel, bias = self.kernel_and_bias(x, 1)
    if self.strides > 1:
      x = x[:, :: self.strides, :: self.strides]
    y = pointwise(x, kernel[0, 0])
    return y if bias is None else y + bias


class UpConv2x2(_KernelLayer):
  """The U-Net's 2x2 stride-2 up-convolution (Ronneberger et al. 2015, Sec. 2) as one matrix product to 4 x features
  channels followed by depth-to-space: output pixel (2i + a, 2j + b) is ``x[i, j] @ kernel[1 - a, 1 - b]`` (+ bias).

  Drop-in for ``nn.ConvTranspose(features, (2, 2), strides=(2, 2), padding='VALID')``: the same parameter names,
  shapes and initialisation, and the same output.
  """

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x, kernel, bias = self.kernel_and_bias(x, 2)
    batch, height, width, _ = x.shape
    # (C, a, b, O) with the spatial taps flipped, as the transposed convolution applies them
    weights = jnp.transpose(kernel[::-1, ::-1], (2, 0, 1, 3)).reshape(x.shape[-1], 4 * self.features)
    y = jax.lax.dot_general(x, weights, (((3,), (0,)), ((), ()))).reshape(batch, height, width, 2, 2, self.features)
    y = jnp.transpose(y, (0, 1, 3, 2, 4, 5)).reshape(batch, 2 * height, 2 * width, self.features)
    return y if bias is None else y + bias


CONV3X3_BLOCKED_WEIGHT_GRADIENT: bool | None = None
"""How the weight gradient of stride-1 3x3 convolutions is computed: by :func:`banded_weight_gradient`, a loop of
small im2col matrix products (True; for outputs at least :data:`BLOCKED_MIN_WIDTH` wide), by XLA's own convolution
(False), or None: the loop on the CPU backend only, where XLA:CPU's kernel runs this gradient at 40-65 GFLOP/s for the
U-Nets' wide images (BENCHMARKS.md, attempt 5). The forward pass and the input gradient are XLA's convolutions either
way; the weight gradient agrees to float32 rounding (tests)."""


def _padding_amount(padding: Any) -> int | None:
  """1 for ``'SAME'`` or ((1, 1), (1, 1)), 0 for ``'VALID'`` or ((0, 0), (0, 0)), None for anything else."""
  if isinstance(padding, str):
    return {"SAME": 1, "VALID": 0}.get(padding.upper())
  pairs = {tuple(p) for p in padding} if len(padding) == 2 else set()
  return next(iter(pairs))[0] if len(pairs) == 1 and next(iter(pairs)) in ((1, 1), (0, 0)) else None


def _conv3x3(x: jax.Array, kernel: jax.Array, pad: int) -> jax.Array:
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((pad, pad), (pad, pad)), dimension_numbers=_NHWC)


_NHWC = ("NHWC", "HWIO", "NHWC")


INPUT_GRADIENT_SCOPE = "input_gradient"
WEIGHT_GRADIENT_SCOPE = "weight_gradient"
"""``jax.named_scope``s of the CPU forms' input and kernel gradients, which :mod:`segjax.profile` reads back."""


BLOCKED_MIN_WIDTH = 64
"""Narrower outputs (ResNet's 56 to 7 pixel stages) keep XLA's weight gradient, which is as fast or faster there."""


def banded_weight_gradient(x: jax.Array, g: jax.Array, size: int, pad: int) -> jax.Array:
  """The gradient of a stride-1 ``size`` x ``size`` convolution's (size, size, C, O) kernel (``size`` 1 or 3), given
  its input ``x`` (N, H, W, C), padding ``pad`` (0 or 1 on every side) and output gradient ``g`` (N, Ho, Wo, O).

  ``dw[ky, kx] = sum over pixels of x_padded[y + ky, x + kx] outer g[y, x]``, computed band by band: a ``lax.scan``
  over bands of rows of all images builds the band's size^2 x C patches (im2col; for 1x1 the band itself) and adds
  their product with the band's gradient, accumulating in float32. A band of about 2048 pixels keeps the patches
  and the transposed operand the matrix product needs in cache, where the whole-image product would write 9 times
  the activations (3x3) or transpose them through memory (1x1). Bands cut rows, never the batch, so a batch sharded
  across devices stays sharded (each device sums its images; the partitioner adds the cross-device sum).
  """
  n, _, _, c = x.shape
  _, height, width, features = g.shape
  rows = max(1, min(8, round(2048 / (n * width))))
  bands = -(-height // rows)
  halo = size - 1
  # zero rows of gradient (and the input rows they would read) complete the last band; they add nothing
  xp = jnp.pad(x, ((0, 0), (pad, bands * rows + halo - height - pad), (pad, pad), (0, 0)))
  gp = jnp.pad(g, ((0, 0), (0, bands * rows - height), (0, 0), (0, 0)))

  def add_band(total, band):
    xs = jax.lax.dynamic_slice_in_dim(xp, band * rows, rows + halo, axis=1)
    gs = jax.lax.dynamic_slice_in_dim(gp, band * rows, rows, axis=1)
    shifts = [xs[:, ky : ky + rows, kx : kx + width] for ky in range(size) for kx in range(size)]
    patches = shifts[0] if size == 1 else jnp.concatenate(shifts, -1)
    # (O, P) @ (P, size^2 C): the transposed operand is the narrow gradient band, and the patches enter the product
    # in the row-major form XLA:CPU's matrix-product kernels take directly. Written as a batched product (one batch):
    # the plain 2-D form of this product runs on a kernel whose sums depend on how many devices share the process's
    # threads (BENCHMARKS.md, attempts 8, 16 and 17)
    product = jax.lax.dot_general(
      gs.reshape(1, -1, features).transpose(0, 2, 1),
      patches.reshape(1, -1, size * size * c),
      (((2,), (1,)), ((0,), (0,))),
      preferred_element_type=jnp.float32,
    )
    return total + product[0], None

  total, _ = jax.lax.scan(add_band, jnp.zeros((features, size * size * c), jnp.float32), jnp.arange(bands))
  return total.T.reshape(size, size, c, features).astype(x.dtype)


@jax.custom_vjp
def pointwise(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """``x @ kernel`` over the channel axis of NHWC ``x``, (C, O) ``kernel``: a 1x1 convolution, whose kernel gradient
  is :func:`banded_weight_gradient` (when the batch has at least :data:`BANDED_POINTWISE_MIN_PIXELS` pixels) and
  whose output and input gradient are plain matrix products."""
  return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


BANDED_POINTWISE_MIN_PIXELS = 4096
"""Below this many pixels (batch x height x width) the 1x1 kernel gradient is one matrix product: its operands fit in
cache anyway. Above, XLA:CPU transposes the whole input for the product, and fuses the producer of the gradient (e.g.
BatchNorm's backward) into that transpose: 80-90 ms per 16x56x56x256 layer of ResNet-50 (BENCHMARKS.md, attempt 7).
"""


def _pointwise_forward(x, kernel):
  return pointwise(x, kernel), (x, kernel)


def _pointwise_backward(residuals, g):
  x, kernel = residuals
  with jax.named_scope(INPUT_GRADIENT_SCOPE):
    dx = jax.lax.dot_general(g, kernel, (((g.ndim - 1,), (1,)), ((), ())))
  with jax.named_scope(WEIGHT_GRADIENT_SCOPE):
    if x.shape[0] * x.shape[1] * x.shape[2] < BANDED_POINTWISE_MIN_PIXELS:
      dw = jax.lax.dot_general(x, g, (((0, 1, 2), (0, 1, 2)), ((), ())))
    else:
      dw = banded_weight_gradient(x, g, 1, 0)[0, 0]
  return dx.astype(x.dtype), dw.astype(kernel.dtype)


pointwise.defvjp(_pointwise_forward, _pointwise_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv3x3(x: jax.Array, kernel: jax.Array, pad: int) -> jax.Array:
  """A stride-1 3x3 convolution, NHWC x HWIO, padded by ``pad`` (0 or 1) on every side, whose kernel gradient is
  :func:`banded_weight_gradient`; the output and the input gradient are XLA's."""
  return _conv3x3(x, kernel, pad)


def _conv3x3_forward(x, kernel, pad):
  return _conv3x3(x, kernel, pad), (x, kernel)


def _conv3x3_backward(pad, residuals, g):
  x, kernel = residuals
  if g.shape[2] < BLOCKED_MIN_WIDTH:
    return jax.vjp(lambda x, kernel: _conv3x3(x, kernel, pad), x, kernel)[1](g)
  with jax.named_scope(INPUT_GRADIENT_SCOPE):
    dx = jax.vjp(lambda x: _conv3x3(x, kernel, pad), x)[1](g)[0]
  with jax.named_scope(WEIGHT_GRADIENT_SCOPE):
    dw = banded_weight_gradient(x, g, 3, pad)
  return dx, dw.astype(kernel.dtype)


conv3x3.defvjp(_conv3x3_forward, _conv3x3_backward)


VALID_AS_CROPPED_SAME_MIN_CHANNELS = 16
"""From this many input channels, :class:`Conv3x3` computes an unpadded ('VALID') convolution as the interior of the
padded one: XLA:CPU runs unpadded 3x3 convolutions 2.5-5x slower than padded ones at the paper U-Net's sizes, which
more than pays for the one-pixel ring computed and dropped (BENCHMARKS.md, attempt 6). With fewer channels (the
first layer's 1-3) XLA's unpadded kernel is the faster one."""


class Conv3x3(_KernelLayer):
  """A stride-1 3x3 convolution computed by :func:`conv3x3` (+ bias): the CPU form of ``nn.Conv`` (:func:`conv`).

  Drop-in for ``nn.Conv(features, (3, 3), padding=p)`` with ``p`` ``'SAME'`` or ``'VALID'`` (or the explicit
  ((1, 1), (1, 1)) / ((0, 0), (0, 0))): the same parameter names, shapes, initialisation and output.
  """

  padding: Any = "SAME"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pad = _padding_amount(self.padding)
    if pad is None:
      raise SegjaxError(f"Conv3x3 takes padding 'SAME' or 'VALID', got {self.padding!r}.")
    x, kernel, bias = self.kernel_and_bias(x, 3)
    if pad == 0 and x.shape[-1] >= VALID_AS_CROPPED_SAME_MIN_CHANNELS:
      y = conv3x3(x, kernel, 1)[:, 1:-1, 1:-1]  # the interior of the padded convolution reads no padding
    else:
      y = conv3x3(x, kernel, pad)
    return y if bias is None else y + bias


def up_convolution(features: int, *, dtype: Any = None, kernel_init: Callable = LECUN_NORMAL, name=None) -> nn.Module:
  """The 2x2 stride-2 transposed convolution: ``nn.ConvTranspose``, or on CPU :class:`UpConv2x2` (same parameters
  and result; XLA:CPU's weight gradient of the transposed convolution is about 20x slower than the matrix product,
  see BENCHMARKS.md and :data:`POINTWISE_AS_MATMUL`)."""
  if _cpu_form(POINTWISE_AS_MATMUL):
    return UpConv2x2(features, dtype=dtype, kernel_init=kernel_init, name=name)
  return nn.ConvTranspose(
    features, (2, 2), strides=(2, 2), padding="VALID", dtype=dtype, kernel_init=kernel_init, name=name
  )


MAX_POOL_AS_RESHAPE: bool | None = None
"""How max pooling runs (the U-Net's 2x2 stride-2 and ResNet's 3x3 stride-2 windows): as a reshape or strided slices
and a max with a custom gradient (True), as Flax's ``nn.max_pool`` (False), or None: the former on the CPU backend
only, where XLA expands the gradient of ``reduce_window`` into index-carrying windows over iotas, 5-10x slower
(BENCHMARKS.md, attempts 4 and 10). Outputs are equal bit for bit and gradients go to the same input pixels, ties
included (tests)."""


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max pooling with stride 2 and ``'VALID'`` padding (an odd last row or column is dropped), NHWC: the U-Net's
  down-sampling (Ronneberger et al. 2015, Sec. 2); ``nn.max_pool(x, (2, 2), strides=(2, 2))`` or, on CPU, a reshape
  and a max with a custom gradient that computes the same values and gradients (:data:`MAX_POOL_AS_RESHAPE`)."""
  with jax.named_scope("max_pool"):
    if not _cpu_form(MAX_POOL_AS_RESHAPE):
      return nn.max_pool(x, (2, 2), strides=(2, 2))
    return _max_pool_even(x[:, : x.shape[1] // 2 * 2, : x.shape[2] // 2 * 2])


def _pool_windows(x: jax.Array) -> jax.Array:
  """(N, H, W, C), H and W even -> (N, H/2, W/2, C, 4): each 2x2 window's values in row-major order."""
  n, h, w, c = x.shape
  return x.reshape(n, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4).reshape(n, h // 2, w // 2, c, 4)


@jax.custom_vjp
def _max_pool_even(x: jax.Array) -> jax.Array:
  return jnp.max(_pool_windows(x), -1)


def _max_pool_even_forward(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  windows = _pool_windows(x)
  # the first maximum in row-major window order takes the gradient, as in XLA's select-and-scatter of max pooling
  return jnp.max(windows, -1), jnp.argmax(windows, -1).astype(jnp.int8)


def _max_pool_even_backward(first_max: jax.Array, g: jax.Array) -> tuple[jax.Array]:
  n, h, w, c = g.shape
  routed = jnp.where(first_max[..., None] == jnp.arange(4, dtype=jnp.int8), g[..., None], jnp.zeros((), g.dtype))
  return (routed.reshape(n, h, w, c, 2, 2).transpose(0, 1, 4, 2, 5, 3).reshape(n, 2 * h, 2 * w, c),)


_max_pool_even.defvjp(_max_pool_even_forward, _max_pool_even_backward)


def max_pool_3x3_stride_2(x: jax.Array) -> jax.Array:
  """3x3 max pooling with stride 2 and one pixel of -inf padding on every side, NHWC: ResNet's stem pooling (He et
  al. 2015, Table 1; torchvision's ``MaxPool2d(3, 2, padding=1)``). ``nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1,
  1)))`` or, on CPU, the maximum of the nine strided window taps with a custom gradient that computes the same values
  and gradients (:data:`MAX_POOL_AS_RESHAPE`)."""
  with jax.named_scope("max_pool"):
    if not _cpu_form(MAX_POOL_AS_RESHAPE):
      return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    # an odd last row or column gets one more -inf row or column: its windows read padding there anyway
    x = jnp.pad(x, ((0, 0), (0, x.shape[1] % 2), (0, x.shape[2] % 2), (0, 0)), constant_values=-jnp.inf)
    return _max_pool_3x3_stride_2(x)


def _window_maximum(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The maximum of each 3x3 stride-2 window of ``x`` (N, H, W, C; H and W even) padded by 1 with -inf, and the
  index 0-8 (int8) of its first maximum in row-major window order, as XLA's select-and-scatter of max pooling picks
  it."""
  n, h, w, c = x.shape
  out_h, out_w = h // 2, w // 2
  padded = jnp.pad(x, ((0, 0), (1, 0), (1, 0), (0, 0)), constant_values=-jnp.inf)
  maximum, first = padded[:, : 2 * out_h : 2, : 2 * out_w : 2], jnp.zeros((n, out_h, out_w, c), jnp.int8)
  for k in range(1, 9):
    ky, kx = divmod(k, 3)
    tap = padded[:, ky : ky + 2 * out_h : 2, kx : kx + 2 * out_w : 2]
    larger = tap > maximum
    maximum, first = jnp.where(larger, tap, maximum), jnp.where(larger, jnp.int8(k), first)
  return maximum, first


@jax.custom_vjp
def _max_pool_3x3_stride_2(x: jax.Array) -> jax.Array:
  return _window_maximum(x)[0]


def _max_pool_3x3_stride_2_forward(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  return _window_maximum(x)


def _max_pool_3x3_stride_2_backward(first_max: jax.Array, g: jax.Array) -> tuple[jax.Array]:
  n, out_h, out_w, c = g.shape
  zero = jnp.zeros((), g.dtype)
  total = jnp.zeros((n, 2 * out_h + 1, 2 * out_w + 1, c), g.dtype)
  for k in range(9):
    ky, kx = divmod(k, 3)
    routed = jnp.where(first_max == k, g, zero)
    # tap (ky, kx) of output (i, j) is padded pixel (2i + ky, 2j + kx): spread the routed gradient to those pixels
    total = total + jax.lax.pad(routed, zero, ((0, 0, 0), (ky, 2 - ky, 1), (kx, 2 - kx, 1), (0, 0, 0)))
  return (total[:, 1 : 2 * out_h + 1, 1 : 2 * out_w + 1],)


_max_pool_3x3_stride_2.defvjp(_max_pool_3x3_stride_2_forward, _max_pool_3x3_stride_2_backward)


def _cpu_form(setting: bool | None) -> bool:
  """A CPU-form switch (:data:`POINTWISE_AS_MATMUL`, :data:`CONV3X3_BLOCKED_WEIGHT_GRADIENT`,
  :data:`MAX_POOL_AS_RESHAPE`): its value when set, else whether JAX's default backend is the CPU."""
  return setting if setting is not None else jax.default_backend() == "cpu"


def conv(
  features: int,
  kernel_size: int | Sequence[int],
  *,
  strides: int | Sequence[int] = 1,
  padding: Any = "SAME",
  use_bias: bool = True,
  dtype: Any = None,
  kernel_init: Callable = LECUN_NORMAL,
  name: str | None = None,
) -> nn.Module:
  """A convolution: ``nn.Conv``, or on CPU for a 1x1 kernel a :class:`PointwiseConv` and for a stride-1 3x3 kernel a
  :class:`Conv3x3` (same parameters and result, faster there; see :data:`POINTWISE_AS_MATMUL` and
  :data:`CONV3X3_BLOCKED_WEIGHT_GRADIENT`). ``kernel_size`` and ``strides`` are an int (square) or a pair."""
  kernel_size = tuple(kernel_size) if isinstance(kernel_size, Sequence) else (kernel_size, kernel_size)
  strides = tuple(strides) if isinstance(strides, Sequence) else (strides, strides)
  square_stride = strides[0] if strides[0] == strides[1] else None
  common = {"use_bias": use_bias, "dtype": dtype, "kernel_init": kernel_init, "name": name}
  if kernel_size == (1, 1) and square_stride and _cpu_form(POINTWISE_AS_MATMUL):
    return PointwiseConv(features, strides=square_stride, **common)
  if (
    kernel_size == (3, 3)
    and square_stride == 1
    and _padding_amount(padding) is not None
    and _cpu_form(CONV3X3_BLOCKED_WEIGHT_GRADIENT)
  ):
    return Conv3x3(features, padding=padding, **common)
  return nn.Conv(features, kernel_size, strides=strides, padding=padding, **common)


def batch_norm(
  *,
  train: bool,
  dtype: Any = jnp.float32,
  axis_name: str | None = None,
  scale_init: Callable[..., Any] = nn.initializers.ones,
  name: str | None = None,
) -> nn.BatchNorm:
  """The one BatchNorm configuration in segjax (Ioffe & Szegedy 2015).

  Args:
    train: batch statistics (and running-stat updates) when True, running averages when False.
    dtype: computation dtype.
    axis_name: pmap/shard_map axis over which batch statistics are averaged; None for per-device statistics.
    scale_init: initializer of gamma (zeros for the "zero-init residual" trick).
    name: submodule name.

  Returns:
    An unbound ``nn.BatchNorm``.
  """
  return nn.BatchNorm(
    use_running_average=not train,
    momentum=BN_MOMENTUM,
    epsilon=NORM_EPSILON,
    axis_name=axis_name,
    dtype=dtype,
    scale_init=scale_init,
    name=name,
  )


def check_norm(norm: str, *, channels: int | None = None, group_norm_groups: int = 8) -> None:
  """Raises SegjaxError if ``norm`` is unknown or group norm cannot split ``channels`` evenly.

  Args:
    norm: one of :data:`NORMS`.
    channels: the smallest channel count that will be normalised (checked only for ``norm='group'``).
    group_norm_groups: number of groups for group norm.

  Raises:
    SegjaxError: on an unknown norm or a group count that does not divide ``channels``.
  """
  if norm not in NORMS:
    raise SegjaxError(f"unknown norm {norm!r} (config key model.norm); choose one of: {', '.join(NORMS)}.")
  if norm == "group" and channels is not None and (group_norm_groups < 1 or channels % group_norm_groups):
    raise SegjaxError(
      f"group_norm_groups={group_norm_groups} does not divide {channels} channels (config keys "
      "model.group_norm_groups, model.base_width); pick a group count that divides the base width."
    )


def norm_layer(
  norm: str,
  *,
  train: bool,
  dtype: Any = jnp.float32,
  bn_axis_name: str | None = None,
  group_norm_groups: int = 8,
  name: str | None = None,
) -> Callable[[jax.Array], jax.Array]:
  """Builds the normalisation layer named by ``norm`` (identity for ``'none'``).

  Args:
    norm: ``'batch'`` (Ioffe & Szegedy 2015), ``'group'`` (Wu & He 2018), ``'instance'`` (Ulyanov et al. 2016) or
      ``'none'``.
    train: see :func:`batch_norm`; ignored by the other norms.
    dtype: computation dtype.
    bn_axis_name: cross-device axis for batch norm.
    group_norm_groups: number of groups for group norm.
    name: submodule name.

  Returns:
    A callable on NHWC arrays.
  """
  check_norm(norm)
  if norm == "batch":
    return batch_norm(train=train, dtype=dtype, axis_name=bn_axis_name, name=name)
  if norm == "group":
    return nn.GroupNorm(num_groups=group_norm_groups, epsilon=NORM_EPSILON, dtype=dtype, name=name)
  if norm == "instance":
    return nn.InstanceNorm(epsilon=NORM_EPSILON, dtype=dtype, name=name)
  return lambda x: x


class ConvNormAct(nn.Module):
  """Conv -> norm -> ReLU. The conv has a bias only when there is no norm (every norm here has a learned bias).

  Attributes:
    features: output channels.
    kernel_size: conv window.
    strides: conv strides.
    padding: Flax padding; explicit pairs for strided convs (Flax 'SAME' pads stride-2 convs asymmetrically).
    norm: one of :data:`NORMS`.
    activation: apply ReLU after the norm.
    dtype: computation dtype.
    bn_axis_name: cross-device axis for batch norm.
    group_norm_groups: number of groups for group norm.
  """

  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] = (1, 1)
  padding: str | Sequence[tuple[int, int]] = "SAME"
  norm: str = "batch"
  activation: bool = True
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  group_norm_groups: int = 8

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = conv(
      self.features,
      self.kernel_size,
      strides=self.strides,
      padding=self.padding,
      use_bias=self.norm == "none",
      dtype=self.dtype,
      kernel_init=he_normal("fan_in"),
      name="conv",
    )(x)
    x = norm_layer(
      self.norm,
      train=train,
      dtype=self.dtype,
      bn_axis_name=self.bn_axis_name,
      group_norm_groups=self.group_norm_groups,
      name="norm",
    )(x)
    return nn.relu(x) if self.activation else x


class DoubleConv(nn.Module):
  """Two 3x3 conv -> norm -> ReLU layers: one U-Net level (Ronneberger et al. 2015, Sec. 2).

  Attributes:
    features: output channels of both convs.
    padding: ``'SAME'`` (output size = input size) or ``'VALID'`` (the paper's unpadded convs: each side loses 4
      pixels over the two convs).
    norm: one of :data:`NORMS`.
    dtype: computation dtype.
    bn_axis_name: cross-device axis for batch norm.
    group_norm_groups: number of groups for group norm.
  """

  features: int
  padding: str = "SAME"
  norm: str = "batch"
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  group_norm_groups: int = 8

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    for i in range(2):
      x = ConvNormAct(
        self.features,
        padding=self.padding,
        norm=self.norm,
        dtype=self.dtype,
        bn_axis_name=self.bn_axis_name,
        group_norm_groups=self.group_norm_groups,
        name=f"conv_{i}",
      )(x, train=train)
    return x


class ResidualDoubleConv(nn.Module):
  """A :class:`DoubleConv` with a residual shortcut (He et al. 2016, "Deep Residual Learning", Sec. 3.2-3.3, Fig. 2).

  The original post-activation "basic block": ``relu(norm(conv(relu(norm(conv(x))))) + shortcut(x))`` with 3x3 convs,
  where the shortcut is the identity when ``x`` already has ``features`` channels and otherwise a 1x1 projection
  conv -> norm (option B of Sec. 3.3). Post-activation is used so that the block can take raw images like the plain
  double conv (a pre-activation block would normalise and rectify the input image itself). All convs are
  same-padded with stride 1; they have a bias only when ``norm='none'``.

  Attributes:
    features: output channels.
    norm: one of :data:`NORMS`.
    dtype: computation dtype.
    bn_axis_name: cross-device axis for batch norm.
    group_norm_groups: number of groups for group norm.
  """

  features: int
  norm: str = "batch"
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  group_norm_groups: int = 8

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    conv = functools.partial(
      ConvNormAct,
      self.features,
      norm=self.norm,
      dtype=self.dtype,
      bn_axis_name=self.bn_axis_name,
      group_norm_groups=self.group_norm_groups,
    )
    shortcut = x
    if x.shape[-1] != self.features:
      shortcut = conv(kernel_size=(1, 1), activation=False, name="shortcut")(x, train=train)
    y = conv(name="conv_0")(x, train=train)
    y = conv(activation=False, name="conv_1")(y, train=train)
    return nn.relu(y + shortcut)


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
  """Raises SegjaxError naming config key ``model.<name>`` if ``value`` is not one of ``choices``."""
  if value not in choices:
    raise SegjaxError(f"unknown {name} {value!r} (config key model.{name}); choose one of: {', '.join(choices)}.")
