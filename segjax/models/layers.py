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


class PointwiseConv(nn.Module):
  """A 1x1 convolution, optionally strided, computed as ``x[:, ::s, ::s] @ kernel[0, 0]`` (+ bias).

  Drop-in for ``nn.Conv(features, (1, 1), strides=s)`` with ``'VALID'`` or ``'SAME'`` padding (equal for 1x1
  kernels): the same parameter names, shapes and initialisation, and the same output.
  """

  features: int
  strides: int = 1
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Callable = LECUN_NORMAL
  bias_init: Callable = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init, (1, 1, x.shape[-1], self.features), self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    if self.strides > 1:
      x = x[:, :: self.strides, :: self.strides]
    y = jax.lax.dot_general(x, kernel[0, 0], (((x.ndim - 1,), (0,)), ((), ())))
    return y if bias is None else y + bias


class UpConv2x2(nn.Module):
  """The U-Net's 2x2 stride-2 up-convolution (Ronneberger et al. 2015, Sec. 2) as one matrix product to 4 x features
  channels followed by depth-to-space: output pixel (2i + a, 2j + b) is ``x[i, j] @ kernel[1 - a, 1 - b]`` (+ bias).

  Drop-in for ``nn.ConvTranspose(features, (2, 2), strides=(2, 2), padding='VALID')``: the same parameter names,
  shapes and initialisation, and the same output.
  """

  features: int
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Callable = LECUN_NORMAL
  bias_init: Callable = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init, (2, 2, x.shape[-1], self.features), self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    batch, height, width, _ = x.shape
    # (C, a, b, O) with the spatial taps flipped, as the transposed convolution applies them
    weights = jnp.transpose(kernel[::-1, ::-1], (2, 0, 1, 3)).reshape(x.shape[-1], 4 * self.features)
    y = jax.lax.dot_general(x, weights, (((3,), (0,)), ((), ()))).reshape(batch, height, width, 2, 2, self.features)
    y = jnp.transpose(y, (0, 1, 3, 2, 4, 5)).reshape(batch, 2 * height, 2 * width, self.features)
    return y + bias


def up_convolution(features: int, *, dtype: Any = None, kernel_init: Callable = LECUN_NORMAL, name=None) -> nn.Module:
  """The 2x2 stride-2 transposed convolution: ``nn.ConvTranspose``, or on CPU :class:`UpConv2x2` (same parameters
  and result; XLA:CPU's weight gradient of the transposed convolution is about 20x slower than the matrix product,
  see BENCHMARKS.md and :data:`POINTWISE_AS_MATMUL`)."""
  if _as_matmul():
    return UpConv2x2(features, dtype=dtype, kernel_init=kernel_init, name=name)
  return nn.ConvTranspose(
    features, (2, 2), strides=(2, 2), padding="VALID", dtype=dtype, kernel_init=kernel_init, name=name
  )


def _as_matmul() -> bool:
  return POINTWISE_AS_MATMUL if POINTWISE_AS_MATMUL is not None else jax.default_backend() == "cpu"


def conv(
  features: int,
  kernel_size: int,
  *,
  strides: int = 1,
  padding: Any = "SAME",
  use_bias: bool = True,
  dtype: Any = None,
  kernel_init: Callable = LECUN_NORMAL,
  name: str | None = None,
) -> nn.Module:
  """A square convolution: ``nn.Conv``, or for a 1x1 kernel on CPU a :class:`PointwiseConv` (same parameters and
  result, faster there; see :data:`POINTWISE_AS_MATMUL`)."""
  if kernel_size == 1 and _as_matmul():
    return PointwiseConv(features, strides=strides, use_bias=use_bias, dtype=dtype, kernel_init=kernel_init, name=name)
  return nn.Conv(
    features,
    (kernel_size, kernel_size),
    strides=(strides, strides),
    padding=padding,
    use_bias=use_bias,
    dtype=dtype,
    kernel_init=kernel_init,
    name=name,
  )


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
    x = nn.Conv(
      self.features,
      tuple(self.kernel_size),
      strides=tuple(self.strides),
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
