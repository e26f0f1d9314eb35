"""Plain-JAX forms of convolution and pooling that XLA:CPU runs faster than its own kernels for the same ops.

Each function computes exactly what an XLA primitive computes (the tests compare values and gradients) and is chosen
per platform by :mod:`segjax.models.layers` (``kernels='auto'`` selects these on the CPU inside the traced program,
with ``lax.platform_dependent``); nothing here reads the backend or a global. Why each form is faster, with the
measurements, is in BENCHMARKS.md (attempts 4 to 10).
"""

import functools

import jax
import jax.numpy as jnp

INPUT_GRADIENT_SCOPE = "input_gradient"
WEIGHT_GRADIENT_SCOPE = "weight_gradient"
"""``jax.named_scope``s of the input and kernel gradients below, which :mod:`segjax.profile` reads back."""

BLOCKED_MIN_WIDTH = 64
"""Outputs narrower than this (ResNet's 56 to 7 pixel stages) keep XLA's 3x3 weight gradient, as fast there."""

BANDED_POINTWISE_MIN_PIXELS = 4096
"""Below this many pixels (batch x height x width) the 1x1 kernel gradient is one matrix product: its operands fit
in cache anyway."""

VALID_AS_CROPPED_SAME_MIN_CHANNELS = 16
"""From this many input channels an unpadded 3x3 convolution is computed as the interior of the padded one, which
XLA:CPU runs several times faster; with fewer (a first layer's 1-3) its unpadded kernel is the faster one."""

_NHWC = ("NHWC", "HWIO", "NHWC")


def banded_weight_gradient(x: jax.Array, g: jax.Array, size: int, pad: int) -> jax.Array:
  """The gradient of a stride-1 ``size`` x ``size`` convolution's (size, size, C, O) kernel (``size`` 1 or 3), given
  its input ``x`` (N, H, W, C), padding ``pad`` (0 or 1 on every side) and output gradient ``g`` (N, Ho, Wo, O).

  ``dw[ky, kx] = sum over pixels of x_padded[y + ky, x + kx] outer g[y, x]``, computed band by band: a ``lax.scan``
  over bands of rows of all images builds the band's size^2 x C patches (im2col; for 1x1 the band itself) and adds
  their product with the band's gradient, accumulating in float32. A band of about 2048 pixels keeps the patches and
  the transposed operand in cache, where the whole-image product would write 9 times the activations (3x3) or
  transpose them through memory (1x1). Bands cut rows, never the batch, so a batch sharded across devices stays
  sharded (each device sums its images; the partitioner adds the cross-device sum).
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
    # (O, P) @ (P, size^2 C), written as a batched product of one: the plain 2-D form runs on an XLA:CPU kernel whose
    # sums depend on how many devices share the process's threads (BENCHMARKS.md, attempts 8, 16 and 17)
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
  """``x @ kernel`` over the channel axis of NHWC ``x``, (C, O) ``kernel``: a 1x1 convolution as matrix products,
  whose kernel gradient is :func:`banded_weight_gradient` for batches of at least
  :data:`BANDED_POINTWISE_MIN_PIXELS` pixels."""
  return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


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


def _xla_conv3x3(x: jax.Array, kernel: jax.Array, pad: int) -> jax.Array:
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((pad, pad), (pad, pad)), dimension_numbers=_NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv3x3(x: jax.Array, kernel: jax.Array, pad: int) -> jax.Array:
  return _xla_conv3x3(x, kernel, pad)


def _conv3x3_forward(x, kernel, pad):
  return _xla_conv3x3(x, kernel, pad), (x, kernel)


def _conv3x3_backward(pad, residuals, g):
  x, kernel = residuals
  if g.shape[2] < BLOCKED_MIN_WIDTH:
    return jax.vjp(lambda x, kernel: _xla_conv3x3(x, kernel, pad), x, kernel)[1](g)
  with jax.named_scope(INPUT_GRADIENT_SCOPE):
    dx = jax.vjp(lambda x: _xla_conv3x3(x, kernel, pad), x)[1](g)[0]
  with jax.named_scope(WEIGHT_GRADIENT_SCOPE):
    dw = banded_weight_gradient(x, g, 3, pad)
  return dx, dw.astype(kernel.dtype)


_conv3x3.defvjp(_conv3x3_forward, _conv3x3_backward)


def conv3x3(x: jax.Array, kernel: jax.Array, pad: int) -> jax.Array:
  """A stride-1 3x3 convolution, NHWC x HWIO, padded by ``pad`` (0 or 1) on every side: XLA's convolution and input
  gradient, :func:`banded_weight_gradient` for the kernel gradient, and an unpadded convolution of at least
  :data:`VALID_AS_CROPPED_SAME_MIN_CHANNELS` input channels computed as the interior of the padded one."""
  if pad == 0 and x.shape[-1] >= VALID_AS_CROPPED_SAME_MIN_CHANNELS:
    return _conv3x3(x, kernel, 1)[:, 1:-1, 1:-1]  # the interior of the padded convolution reads no padding
  return _conv3x3(x, kernel, pad)


def up_conv_2x2(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """``lax.conv_transpose(x, kernel, (2, 2), 'VALID')`` (NHWC, HWIO (2, 2, C, O)) as one matrix product to 4 x O
  channels and a depth-to-space: output pixel (2i + a, 2j + b) is ``x[i, j] @ kernel[1 - a, 1 - b]``. XLA:CPU's
  weight gradient of the transposed convolution is many times slower than the matrix product's."""
  batch, height, width, channels = x.shape
  features = kernel.shape[-1]
  # (C, a, b, O) with the spatial taps flipped, as the transposed convolution applies them
  weights = jnp.transpose(kernel[::-1, ::-1], (2, 0, 1, 3)).reshape(channels, 4 * features)
  y = jax.lax.dot_general(x, weights, (((3,), (0,)), ((), ()))).reshape(batch, height, width, 2, 2, features)
  return jnp.transpose(y, (0, 1, 3, 2, 4, 5)).reshape(batch, 2 * height, 2 * width, features)


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """``nn.max_pool(x, (2, 2), strides=(2, 2))`` (NHWC; an odd last row or column dropped) as a reshape and a max
  whose custom gradient routes to the first maximum of each window, as XLA's select-and-scatter does; XLA:CPU
  expands the gradient of ``reduce_window`` into index-carrying windows, several times slower."""
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
  """``nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))`` (NHWC, -inf padding) as the maximum of the nine strided
  window taps, with a custom gradient to the first maximum of each window, as XLA's select-and-scatter."""
  # an odd last row or column gets one more -inf row or column: its windows read padding there anyway
  x = jnp.pad(x, ((0, 0), (0, x.shape[1] % 2), (0, x.shape[2] % 2), (0, 0)), constant_values=-jnp.inf)
  return _max_pool_3x3_stride_2(x)


def _window_maximum(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The maximum of each 3x3 stride-2 window of ``x`` (N, H, W, C; H and W even) padded by 1 with -inf, and the
  index 0-8 (int8) of its first maximum in row-major window order."""
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
