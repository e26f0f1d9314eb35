"""ResNets (He, Zhang, Ren & Sun 2015, "Deep Residual Learning for Image Recognition").

ImageNet models (:class:`ResNet`, Sec. 3.3-4.1 / Table 1): the definitions match torchvision's ``resnet18`` ...
``resnet152`` layer for layer, so their parameter counts are equal and torchvision weights can be converted
(:mod:`segjax.convert`): explicit symmetric padding everywhere (Flax 'SAME' pads a stride-2 conv asymmetrically), the
stride of a bottleneck block in its 3x3 conv ("ResNet v1.5"; ``stride_in_1x1=True`` gives the paper's v1), projection
shortcuts (option B, Sec. 3.3) only where the shape changes. Submodule names follow torchvision's (``conv1``, ``bn1``,
``layer1_0``, ``downsample_conv``, ``fc``) so a converter can map ``layer1.0.conv1.weight`` to
``layer1_0/conv1/kernel``. :class:`ResNetEncoder` is the same network without the classifier, returning the feature
maps of every stage (the contracting path of :mod:`segjax.models.resnet_unet`), with the same parameter names.

CIFAR-10 models (:class:`CifarResNet`, Sec. 4.2): ``resnet20_cifar`` ... ``resnet110_cifar``, 6n+2 layers with
parameter-free option-A shortcuts.
"""

import functools
from collections.abc import Sequence
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.errors import SegjaxError
from segjax.models import ModelConstructor, register_model
from segjax.models.layers import batch_norm, conv, he_normal, max_pool_3x3_stride_2

PAD_1 = ((1, 1), (1, 1))
PAD_3 = ((3, 3), (3, 3))
SHORTCUTS = ("A", "B")


def _conv(features: int, kernel: int, strides: int, padding: Any, dtype: Any, kernels: str, name: str) -> nn.Module:
  # Convs feed a BatchNorm, whose beta makes a conv bias redundant; torchvision's fan-out He init.
  return conv(
    features,
    kernel,
    strides=strides,
    padding=padding,
    use_bias=False,
    dtype=dtype,
    kernel_init=he_normal("fan_out"),
    kernels=kernels,
    name=name,
  )


def zero_pad_shortcut(x: jax.Array, features: int, strides: int) -> jax.Array:
  """Parameter-free shortcut to a smaller, wider map: option A of He et al. 2015, Sec. 3.3 / 4.2.

  "The shortcut still performs identity mapping, with extra zero entries padded for increasing dimensions", taking
  every ``strides``-th pixel ("performed with a stride of 2"). The zeros are split evenly before and after the input
  channels (the convention of the common PyTorch CIFAR reproductions, so their weights line up).

  Args:
    x: (B, H, W, C) feature map.
    features: output channels, >= C.
    strides: spatial subsampling factor.

  Returns:
    (B, ceil(H / strides), ceil(W / strides), features) array.
  """
  extra = features - x.shape[-1]
  if extra < 0:
    raise SegjaxError(f"an option-A shortcut cannot reduce channels ({x.shape[-1]} -> {features}); use shortcut='B'.")
  x = x[:, ::strides, ::strides]
  return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))


class ResidualBlock(nn.Module):
  """Fields and shortcut shared by :class:`BasicBlock` and :class:`BottleneckBlock`.

  Attributes:
    features: channels of the block's convs (output channels = ``features * expansion``).
    strides: down-sampling stride of the block and of its shortcut.
    shortcut: ``'B'``: identity, or a 1x1 projection conv + BN where the shape changes; ``'A'``: identity, with
      stride-2 subsampling and zero-padded extra channels where the shape changes, no parameters (He et al. 2015,
      Sec. 3.3).
    stride_in_1x1: bottleneck only: put the stride in the first 1x1 conv (the paper's "ResNet v1") instead of the
      3x3 conv ("v1.5", torchvision's default). Both have the same parameters.
    zero_init_residual: initialise the last BN's gamma to zero, so the block starts as the identity (Goyal et al.
      2017, Sec. 5.1).
    dtype: computation dtype.
    bn_axis_name: cross-device axis name for batch norm statistics.
    kernels: the form of the convs (:data:`segjax.models.layers.KERNELS`).
  """

  features: int
  strides: int = 1
  shortcut: str = "B"
  stride_in_1x1: bool = False
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  kernels: str = "auto"

  expansion = 1

  def __post_init__(self) -> None:
    if self.shortcut not in SHORTCUTS:
      raise SegjaxError(f"unknown ResNet shortcut {self.shortcut!r}; choose one of: {', '.join(SHORTCUTS)}.")
    super().__post_init__()

  def _bn(self, *, train: bool, name: str, last: bool = False) -> nn.BatchNorm:
    zero_gamma = last and self.zero_init_residual
    scale_init = nn.initializers.zeros if zero_gamma else nn.initializers.ones
    return batch_norm(train=train, dtype=self.dtype, axis_name=self.bn_axis_name, scale_init=scale_init, name=name)

  def _shortcut(self, x: jax.Array, features: int, *, train: bool) -> jax.Array:
    """Identity when the shape is kept, else option A or B of He et al. 2015, Sec. 3.3 (see ``shortcut``)."""
    if self.strides == 1 and x.shape[-1] == features:
      return x
    if self.shortcut == "A":
      return zero_pad_shortcut(x, features, self.strides)
    x = _conv(features, 1, self.strides, "VALID", self.dtype, self.kernels, "downsample_conv")(x)
    return self._bn(train=train, name="downsample_bn")(x)


class BasicBlock(ResidualBlock):
  """Two 3x3 convs plus shortcut (He et al. 2015, Sec. 3.3, Fig. 5 left); see :class:`ResidualBlock`."""

  expansion = 1

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    y = _conv(self.features, 3, self.strides, PAD_1, self.dtype, self.kernels, "conv1")(x)
    y = nn.relu(self._bn(train=train, name="bn1")(y))
    y = _conv(self.features, 3, 1, PAD_1, self.dtype, self.kernels, "conv2")(y)
    y = self._bn(train=train, name="bn2", last=True)(y)
    return nn.relu(y + self._shortcut(x, y.shape[-1], train=train))


class BottleneckBlock(ResidualBlock):
  """1x1 -> 3x3 -> 1x1 bottleneck plus shortcut (He et al. 2015, Sec. 4.1, Fig. 5 right); expansion 4.

  By default the stride sits in the 3x3 conv ("ResNet v1.5", torchvision's default); ``stride_in_1x1=True`` puts it
  in the first 1x1 conv, as in the paper's original ("v1"), which drops 3/4 of the input pixels unseen.
  """

  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    stride_1x1, stride_3x3 = (self.strides, 1) if self.stride_in_1x1 else (1, self.strides)
    y = _conv(self.features, 1, stride_1x1, "VALID", self.dtype, self.kernels, "conv1")(x)
    y = nn.relu(self._bn(train=train, name="bn1")(y))
    y = _conv(self.features, 3, stride_3x3, PAD_1, self.dtype, self.kernels, "conv2")(y)
    y = nn.relu(self._bn(train=train, name="bn2")(y))
    y = _conv(self.features * self.expansion, 1, 1, "VALID", self.dtype, self.kernels, "conv3")(y)
    y = self._bn(train=train, name="bn3", last=True)(y)
    return nn.relu(y + self._shortcut(x, y.shape[-1], train=train))


def _imagenet_stages(module: "ResNet | ResNetEncoder", x: jax.Array, *, train: bool) -> tuple[jax.Array, ...]:
  """Stem and the four stages of an ImageNet ResNet, built as submodules of ``module`` (so names are shared).

  Called from the compact ``__call__`` of :class:`ResNet` and of :class:`ResNetEncoder`, which therefore have the
  same parameter tree apart from the classifier ``fc``.

  Returns:
    The five feature maps at strides 2 (stem conv, BN, ReLU; before the max pool), 4, 8, 16 and 32 (stages 1-4).
  """
  chex.assert_rank(x, 4)
  x = x.astype(module.dtype)
  x = _conv(module.width, 7, 2, PAD_3, module.dtype, module.kernels, "conv1")(x)
  x = batch_norm(train=train, dtype=module.dtype, axis_name=module.bn_axis_name, name="bn1")(x)
  x = nn.relu(x)
  features = [x]
  x = max_pool_3x3_stride_2(x, module.kernels)  # padded with -inf, as PyTorch's MaxPool2d(3, 2, padding=1)
  for stage, num_blocks in enumerate(module.stage_sizes):
    for index in range(num_blocks):
      x = module.block_cls(
        module.width * 2**stage,
        strides=2 if stage > 0 and index == 0 else 1,
        stride_in_1x1=module.stride_in_1x1,
        zero_init_residual=module.zero_init_residual,
        dtype=module.dtype,
        bn_axis_name=module.bn_axis_name,
        kernels=module.kernels,
        name=f"layer{stage + 1}_{index}",
      )(x, train=train)
    features.append(x)
  return tuple(features)


class ResNet(nn.Module):
  """ResNet image classifier, torchvision-compatible (He et al. 2015, Sec. 3-4, Table 1).

  Stem: 7x7/2 conv, BN, ReLU, 3x3/2 max pool (explicit padding 3 and 1, as torchvision). Four stages of
  ``stage_sizes[i]`` blocks with ``width * 2**i`` channels; the first block of stages 2-4 down-samples with stride 2.
  Global average pooling and a dense layer with bias give the logits.

  Attributes:
    stage_sizes: number of blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
    block_cls: :class:`BasicBlock` or :class:`BottleneckBlock`.
    num_classes: number of logits.
    width: channels of the stem and of the first stage (64 in the paper).
    stride_in_1x1: bottleneck stride in the first 1x1 conv ("ResNet v1", the paper) instead of the 3x3 conv ("v1.5",
      torchvision, the default); no effect on basic blocks.
    zero_init_residual: zero-init the last BN gamma of every block (Goyal et al. 2017, Sec. 5.1).
    dtype: computation dtype (params stay float32; logits are returned as float32).
    bn_axis_name: cross-device axis name for batch norm statistics (pmap).
    kernels: the form of the convs and pools (:data:`segjax.models.layers.KERNELS`; ``'auto'`` per platform).

  Example:
    >>> model = ResNet(stage_sizes=(1, 1, 1, 1), block_cls=BasicBlock, num_classes=10, width=8)
    >>> x = jnp.zeros((2, 32, 32, 3))
    >>> variables = model.init(jax.random.key(0), x, train=False)
    >>> model.apply(variables, x, train=False).shape
    (2, 10)
  """

  stage_sizes: Sequence[int]
  block_cls: type[ResidualBlock]
  num_classes: int
  width: int = 64
  stride_in_1x1: bool = False
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  kernels: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Class logits.

    Args:
      x: images, (B, H, W, C) float.
      train: batch statistics on (needs ``mutable=['batch_stats']``).

    Returns:
      float32 logits, (B, num_classes).
    """
    x = _imagenet_stages(self, x, train=train)[-1]
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)
    return x.astype(jnp.float32)


class ResNetEncoder(nn.Module):
  """:class:`ResNet` without pooling and classifier, returning the feature map of every stage.

  The parameter tree is the classifier's minus ``fc`` (same submodule names), so ImageNet weights transfer
  unchanged. Sides follow torchvision's arithmetic: a 224 input gives 112, 56, 28, 14 and 7; odd sides round up
  (e.g. 67 -> 34, 17, 9, 5, 3).

  Attributes:
    stage_sizes: number of blocks per stage, e.g. ``(3, 4, 6, 3)`` for ResNet-34.
    block_cls: :class:`BasicBlock` or :class:`BottleneckBlock`.
    width: channels of the stem and of the first stage (64 in the paper).
    stride_in_1x1: see :class:`ResNet`.
    zero_init_residual: see :class:`ResNet`.
    dtype: computation dtype of the convs and of the returned feature maps.
    bn_axis_name: cross-device axis name for batch norm statistics (pmap).
    kernels: the form of the convs and pools (:data:`segjax.models.layers.KERNELS`; ``'auto'`` per platform).

  Example:
    >>> encoder = resnet_encoder("resnet18", width=8)
    >>> x = jnp.zeros((1, 64, 64, 3))
    >>> features, _ = encoder.init_with_output(jax.random.key(0), x, train=False)
    >>> [f.shape[1] for f in features]
    [32, 16, 8, 4, 2]
  """

  stage_sizes: Sequence[int]
  block_cls: type[ResidualBlock]
  width: int = 64
  stride_in_1x1: bool = False
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  kernels: str = "auto"

  @property
  def channels(self) -> tuple[int, ...]:
    """Channels of the five feature maps, e.g. (64, 64, 128, 256, 512) for ResNet-18/34."""
    expansion = self.block_cls.expansion
    return (self.width, *(self.width * 2**stage * expansion for stage in range(len(self.stage_sizes))))

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, ...]:
    """Feature maps of the stem and of the four stages.

    Args:
      x: images, (B, H, W, C) float.
      train: batch statistics on (needs ``mutable=['batch_stats']``).

    Returns:
      Five (B, h_i, w_i, c_i) arrays at strides 2 (stem, before the max pool), 4, 8, 16 and 32.
    """
    return _imagenet_stages(self, x, train=train)


# Table 1 of He et al. 2015: blocks per stage and block type of the ImageNet models.
IMAGENET_RESNETS: dict[str, tuple[tuple[int, ...], type[ResidualBlock]]] = {
  "resnet18": ((2, 2, 2, 2), BasicBlock),
  "resnet34": ((3, 4, 6, 3), BasicBlock),
  "resnet50": ((3, 4, 6, 3), BottleneckBlock),
  "resnet101": ((3, 4, 23, 3), BottleneckBlock),
  "resnet152": ((3, 8, 36, 3), BottleneckBlock),
}


def resnet_encoder(arch: str, /, **kwargs) -> ResNetEncoder:
  """The :class:`ResNetEncoder` of the ImageNet ResNet ``arch`` (``'resnet18'`` ... ``'resnet152'``).

  Args:
    arch: a key of :data:`IMAGENET_RESNETS`.
    **kwargs: further :class:`ResNetEncoder` attributes (``width``, ``dtype``, ``name``, ...).

  Returns:
    An unbound encoder.

  Raises:
    SegjaxError: for an unknown architecture.
  """
  if arch not in IMAGENET_RESNETS:
    raise SegjaxError(
      f"unknown ResNet encoder {arch!r} (config key model.kwargs.encoder); choose one of: "
      f"{', '.join(IMAGENET_RESNETS)}."
    )
  stage_sizes, block_cls = IMAGENET_RESNETS[arch]
  return ResNetEncoder(stage_sizes=stage_sizes, block_cls=block_cls, **kwargs)


def _register_imagenet(name: str) -> ModelConstructor:
  stage_sizes, block_cls = IMAGENET_RESNETS[name]
  return register_model(name)(functools.partial(ResNet, stage_sizes=stage_sizes, block_cls=block_cls))


ResNet18 = _register_imagenet("resnet18")
ResNet34 = _register_imagenet("resnet34")
ResNet50 = _register_imagenet("resnet50")
ResNet101 = _register_imagenet("resnet101")
ResNet152 = _register_imagenet("resnet152")


class CifarResNet(nn.Module):
  """ResNet for 32x32 CIFAR-10 images, 6n+2 layers (He et al. 2015, Sec. 4.2).

  "The first layer is 3x3 convolutions. Then we use a stack of 6n layers with 3x3 convolutions on the feature maps of
  sizes {32, 16, 8} respectively, with 2n layers for each feature map size. The numbers of filters are {16, 32, 64}
  respectively. The subsampling is performed by convolutions with a stride of 2. The network ends with a global
  average pooling, a 10-way fully-connected layer, and softmax." All shortcuts are identities (option A: zero-padded
  channels, stride-2 subsampling; see :func:`zero_pad_shortcut`), so the model has exactly as many parameters as its
  plain counterpart. With n = 3, 5, 7, 9, 18: ResNet-20/32/44/56/110 with 0.27M/0.46M/0.66M/0.85M/1.7M parameters.
  Convs have no bias (each feeds a BN) and use the He et al. fan-out init; submodule names follow :class:`ResNet`.

  Attributes:
    blocks_per_stage: n, the number of basic blocks in each of the three stages.
    num_classes: number of logits.
    widths: channels of the three stages (the stem has ``widths[0]``).
    shortcut: ``'A'`` (paper, parameter-free) or ``'B'`` (projections where the shape changes).
    dtype: computation dtype (params stay float32; logits are returned as float32).
    bn_axis_name: cross-device axis name for batch norm statistics (pmap).
    kernels: the form of the convs and pools (:data:`segjax.models.layers.KERNELS`; ``'auto'`` per platform).

  Example:
    >>> model = CifarResNet(blocks_per_stage=3, num_classes=10)
    >>> x = jnp.zeros((2, 32, 32, 3))
    >>> variables = model.init(jax.random.key(0), x, train=False)
    >>> model.apply(variables, x, train=False).shape
    (2, 10)
  """

  blocks_per_stage: int
  num_classes: int
  widths: Sequence[int] = (16, 32, 64)
  shortcut: str = "A"
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  kernels: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Class logits.

    Args:
      x: images, (B, H, W, C) float.
      train: batch statistics on (needs ``mutable=['batch_stats']``).

    Returns:
      float32 logits, (B, num_classes).
    """
    chex.assert_rank(x, 4)
    x = x.astype(self.dtype)
    x = _conv(self.widths[0], 3, 1, PAD_1, self.dtype, self.kernels, "conv1")(x)
    x = nn.relu(batch_norm(train=train, dtype=self.dtype, axis_name=self.bn_axis_name, name="bn1")(x))
    for stage, features in enumerate(self.widths):
      for index in range(self.blocks_per_stage):
        x = BasicBlock(
          features,
          strides=2 if stage > 0 and index == 0 else 1,
          shortcut=self.shortcut,
          dtype=self.dtype,
          bn_axis_name=self.bn_axis_name,
          kernels=self.kernels,
          name=f"layer{stage + 1}_{index}",
        )(x, train=train)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)
    return x.astype(jnp.float32)


ResNet20Cifar = register_model("resnet20_cifar")(functools.partial(CifarResNet, blocks_per_stage=3))
ResNet32Cifar = register_model("resnet32_cifar")(functools.partial(CifarResNet, blocks_per_stage=5))
ResNet44Cifar = register_model("resnet44_cifar")(functools.partial(CifarResNet, blocks_per_stage=7))
ResNet56Cifar = register_model("resnet56_cifar")(functools.partial(CifarResNet, blocks_per_stage=9))
ResNet110Cifar = register_model("resnet110_cifar")(functools.partial(CifarResNet, blocks_per_stage=18))
