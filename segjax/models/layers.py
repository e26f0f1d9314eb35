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
from segjax.models import cpu_kernels

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

KERNELS = ("auto", "xla", "cpu")
"""The forms convolutions and max pools take (the models' ``kernels`` field): ``'xla'`` XLA's own ops, ``'cpu'`` the
forms of :mod:`segjax.models.cpu_kernels` (faster on XLA:CPU; BENCHMARKS.md), ``'auto'`` the CPU forms where the
program is lowered for the CPU and XLA's elsewhere, chosen inside the traced program by ``lax.platform_dependent``, so
an AOT lowering or ``jax.export`` for a GPU or TPU carries XLA's forms. Parameters and results are the same (tests)."""

_NHWC = ("NHWC", "HWIO", "NHWC")


def check_kernels(kernels: str) -> None:
  """Raises SegjaxError naming config key ``model.kernels`` if ``kernels`` is not one of :data:`KERNELS`."""
  check_choice("kernels", kernels, KERNELS)


def by_platform(kernels: str, cpu: Callable, xla: Callable, *args: jax.Array) -> jax.Array:
  """``cpu(*args)`` or ``xla(*args)`` as ``kernels`` (:data:`KERNELS`) says; for ``'auto'`` the one of the platform
  the program is lowered for (``lax.platform_dependent``)."""
  check_kernels(kernels)
  if kernels == "xla":
    return xla(*args)
  if kernels == "cpu":
    return cpu(*args)
  return jax.lax.platform_dependent(*args, cpu=cpu, default=xla)


def _padding_amount(padding: Any) -> int | None:
  """1 for ``'SAME'`` or ((1, 1), (1, 1)), 0 for ``'VALID'`` or ((0, 0), (0, 0)), None for anything else."""
  if isinstance(padding, str):
    return {"SAME": 1, "VALID": 0}.get(padding.upper())
  pairs = {tuple(p) for p in padding} if len(padding) == 2 else set()
  return next(iter(pairs))[0] if len(pairs) == 1 and next(iter(pairs)) in ((1, 1), (0, 0)) else None


def _cpu_convolution(lhs: jax.Array, rhs: jax.Array, settings: dict) -> Callable | None:
  """The CPU form of ``lax.conv_general_dilated(lhs, rhs, **settings)`` as a function of ``(lhs, rhs)``: a 1x1
  kernel (square stride, no padding) as matrix products, a stride-1 3x3 kernel padded by 0 or 1 with the banded weight
  gradient; None for every other convolution, which keeps XLA's."""
  plain = (
    lhs.ndim == 4
    and all(d == 1 for d in settings["lhs_dilation"] or (1,))
    and all(d == 1 for d in settings["rhs_dilation"] or (1,))
    and settings["feature_group_count"] == 1
    and settings["batch_group_count"] == 1
    and settings["precision"] is None
    and settings["preferred_element_type"] is None
    and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, settings["dimension_numbers"])
    == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
  )
  if not plain:
    return None
  size, (stride_y, stride_x), padding = rhs.shape[:2], tuple(settings["window_strides"]), settings["padding"]
  if size == (1, 1) and stride_y == stride_x and (isinstance(padding, str) or _padding_amount(padding) == 0):
    return lambda x, kernel: cpu_kernels.pointwise(x[:, ::stride_y, ::stride_x], kernel[0, 0])
  pad = _padding_amount(padding)
  if size == (3, 3) and (stride_y, stride_x) == (1, 1) and pad is not None:
    return lambda x, kernel: cpu_kernels.conv3x3(x, kernel, pad)
  return None


def _convolution(kernels: str) -> Callable:
  """A function with ``lax.conv_general_dilated``'s signature computing the convolution in the form ``kernels``
  names, for ``nn.Conv(conv_general_dilated=...)`` (the parameters stay ``nn.Conv``'s)."""

  def convolution(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    batch_group_count=1,
    precision=None,
    preferred_element_type=None,
  ):
    settings = {
      "window_strides": window_strides,
      "padding": padding,
      "lhs_dilation": lhs_dilation,
      "rhs_dilation": rhs_dilation,
      "dimension_numbers": dimension_numbers,
      "feature_group_count": feature_group_count,
      "batch_group_count": batch_group_count,
      "precision": precision,
      "preferred_element_type": preferred_element_type,
    }
    xla = functools.partial(jax.lax.conv_general_dilated, **settings)
    cpu = _cpu_convolution(lhs, rhs, settings)
    return xla(lhs, rhs) if cpu is None else by_platform(kernels, cpu, xla, lhs, rhs)

  convolution.__name__ = f"{kernels}_conv_general_dilated"
  return convolution


_CONVOLUTIONS = {kernels: _convolution(kernels) for kernels in KERNELS}


def conv(
  features: int,
  kernel_size: int | Sequence[int],
  *,
  strides: int | Sequence[int] = 1,
  padding: Any = "SAME",
  use_bias: bool = True,
  dtype: Any = None,
  kernel_init: Callable = LECUN_NORMAL,
  kernels: str = "auto",
  name: str | None = None,
) -> nn.Conv:
  """``nn.Conv`` computing its convolution in the form ``kernels`` (:data:`KERNELS`) names. ``kernel_size`` and
  ``strides`` are an int (square) or a pair."""
  check_kernels(kernels)
  kernel_size = tuple(kernel_size) if isinstance(kernel_size, Sequence) else (kernel_size, kernel_size)
  return nn.Conv(
    features,
    kernel_size,
    strides=strides,
    padding=padding,
    use_bias=use_bias,
    dtype=dtype,
    kernel_init=kernel_init,
    conv_general_dilated=_CONVOLUTIONS[kernels],
    name=name,
  )


def _xla_up_conv_2x2(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return jax.lax.conv_transpose(x, kernel, (2, 2), "VALID", dimension_numbers=_NHWC)


class UpConv2x2(nn.Module):
  """The U-Net's 2x2 stride-2 up-convolution (Ronneberger et al. 2015, Sec. 2) in the form ``kernels`` names.

  Drop-in for ``nn.ConvTranspose(features, (2, 2), strides=(2, 2), padding='VALID')``: the same fields, parameter
  names, shapes, initialisation and output, so checkpoints of either load into the other.
  """

  features: int
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Callable = LECUN_NORMAL
  bias_init: Callable = nn.initializers.zeros_init()
  kernels: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init, (2, 2, x.shape[-1], self.features), self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = by_platform(self.kernels, cpu_kernels.up_conv_2x2, _xla_up_conv_2x2, x, kernel)
    return y if bias is None else y + bias


def up_convolution(
  features: int, *, dtype: Any = None, kernel_init: Callable = LECUN_NORMAL, kernels: str = "auto", name=None
) -> UpConv2x2:
  """The 2x2 stride-2 transposed convolution with bias (:class:`UpConv2x2`)."""
  return UpConv2x2(features, dtype=dtype, kernel_init=kernel_init, kernels=kernels, name=name)


def max_pool_2x2(x: jax.Array, kernels: str = "auto") -> jax.Array:
  """2x2 max pooling with stride 2 and ``'VALID'`` padding (an odd last row or column is dropped), NHWC: the U-Net's
  down-sampling (Ronneberger et al. 2015, Sec. 2), in the form ``kernels`` (:data:`KERNELS`) names."""
  with jax.named_scope("max_pool"):
    return by_platform(kernels, cpu_kernels.max_pool_2x2, lambda x: nn.max_pool(x, (2, 2), strides=(2, 2)), x)


def max_pool_3x3_stride_2(x: jax.Array, kernels: str = "auto") -> jax.Array:
  """3x3 max pooling with stride 2 and one pixel of -inf padding on every side, NHWC: ResNet's stem pooling (He et
  al. 2015, Table 1; torchvision's ``MaxPool2d(3, 2, padding=1)``), in the form ``kernels`` names."""

  def xla(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

  with jax.named_scope("max_pool"):
    return by_platform(kernels, cpu_kernels.max_pool_3x3_stride_2, xla, x)


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
    kernels: the form of the conv, one of :data:`KERNELS`.
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
  kernels: str = "auto"

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
      kernels=self.kernels,
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
    kernels: the form of the convs, one of :data:`KERNELS`.
  """

  features: int
  padding: str = "SAME"
  norm: str = "batch"
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  group_norm_groups: int = 8
  kernels: str = "auto"

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
        kernels=self.kernels,
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
    kernels: the form of the convs, one of :data:`KERNELS`.
  """

  features: int
  norm: str = "batch"
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  group_norm_groups: int = 8
  kernels: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    conv = functools.partial(
      ConvNormAct,
      self.features,
      norm=self.norm,
      dtype=self.dtype,
      bn_axis_name=self.bn_axis_name,
      group_norm_groups=self.group_norm_groups,
      kernels=self.kernels,
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
