"""ResNet classifiers (He, Zhang, Ren & Sun 2015, "Deep Residual Learning for Image Recognition").

The definitions match torchvision's ``resnet18`` ... ``resnet152`` layer for layer, so their parameter counts are equal
and torchvision weights can be converted: explicit symmetric padding everywhere (Flax 'SAME' pads a stride-2 conv
asymmetrically), the stride of a bottleneck block in its 3x3 conv ("ResNet v1.5"), projection shortcuts (option B,
Sec. 3.3) only where the shape changes. Submodule names follow torchvision's (``conv1``, ``bn1``, ``layer1_0``,
``downsample_conv``, ``fc``) so a converter can map ``layer1.0.conv1.weight`` to ``layer1_0/conv1/kernel``.
"""

import functools
from collections.abc import Sequence
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.models import register_model
from segjax.models.layers import batch_norm, he_normal

PAD_1 = ((1, 1), (1, 1))
PAD_3 = ((3, 3), (3, 3))


def _conv(features: int, kernel: int, strides: int, padding: Any, dtype: Any, name: str) -> nn.Conv:
  # Convs feed a BatchNorm, whose beta makes a conv bias redundant; torchvision's fan-out He init.
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=(strides, strides),
    padding=padding,
    use_bias=False,
    dtype=dtype,
    kernel_init=he_normal("fan_out"),
    name=name,
  )


class ResidualBlock(nn.Module):
  """Fields and shortcut shared by :class:`BasicBlock` and :class:`BottleneckBlock`.

  Attributes:
    features: channels of the block's convs (output channels = ``features * expansion``).
    strides: down-sampling stride of the block (in its 3x3 conv) and of the projection shortcut.
    zero_init_residual: initialise the last BN's gamma to zero, so the block starts as the identity (Goyal et al.
      2017, Sec. 5.1).
    dtype: computation dtype.
    bn_axis_name: cross-device axis name for batch norm statistics.
  """

  features: int
  strides: int = 1
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None

  expansion = 1

  def _bn(self, *, train: bool, name: str, last: bool = False) -> nn.BatchNorm:
    zero_gamma = last and self.zero_init_residual
    scale_init = nn.initializers.zeros if zero_gamma else nn.initializers.ones
    return batch_norm(train=train, dtype=self.dtype, axis_name=self.bn_axis_name, scale_init=scale_init, name=name)

  def _shortcut(self, x: jax.Array, features: int, *, train: bool) -> jax.Array:
    """Identity when the shape is kept, else 1x1 conv (stride s) + BN: option B of He et al. 2015, Sec. 3.3."""
    if self.strides == 1 and x.shape[-1] == features:
      return x
    x = _conv(features, 1, self.strides, "VALID", self.dtype, "downsample_conv")(x)
    return self._bn(train=train, name="downsample_bn")(x)


class BasicBlock(ResidualBlock):
  """Two 3x3 convs plus shortcut (He et al. 2015, Sec. 3.3, Fig. 5 left); see :class:`ResidualBlock`."""

  expansion = 1

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    y = _conv(self.features, 3, self.strides, PAD_1, self.dtype, "conv1")(x)
    y = nn.relu(self._bn(train=train, name="bn1")(y))
    y = _conv(self.features, 3, 1, PAD_1, self.dtype, "conv2")(y)
    y = self._bn(train=train, name="bn2", last=True)(y)
    return nn.relu(y + self._shortcut(x, y.shape[-1], train=train))


class BottleneckBlock(ResidualBlock):
  """1x1 -> 3x3 -> 1x1 bottleneck plus shortcut (He et al. 2015, Sec. 4.1, Fig. 5 right); expansion 4.

  The stride sits in the 3x3 conv ("ResNet v1.5", torchvision's default), not in the first 1x1 conv as in the paper.
  """

  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    y = _conv(self.features, 1, 1, "VALID", self.dtype, "conv1")(x)
    y = nn.relu(self._bn(train=train, name="bn1")(y))
    y = _conv(self.features, 3, self.strides, PAD_1, self.dtype, "conv2")(y)
    y = nn.relu(self._bn(train=train, name="bn2")(y))
    y = _conv(self.features * self.expansion, 1, 1, "VALID", self.dtype, "conv3")(y)
    y = self._bn(train=train, name="bn3", last=True)(y)
    return nn.relu(y + self._shortcut(x, y.shape[-1], train=train))


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
    zero_init_residual: zero-init the last BN gamma of every block (Goyal et al. 2017, Sec. 5.1).
    dtype: computation dtype (params stay float32; logits are returned as float32).
    bn_axis_name: cross-device axis name for batch norm statistics (pmap).

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
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None

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
    x = _conv(self.width, 7, 2, PAD_3, self.dtype, "conv1")(x)
    x = batch_norm(train=train, dtype=self.dtype, axis_name=self.bn_axis_name, name="bn1")(x)
    x = nn.relu(x)
    # Padding with -inf (Flax's max-pool init value), as PyTorch's MaxPool2d does.
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=PAD_1)
    for stage, num_blocks in enumerate(self.stage_sizes):
      for index in range(num_blocks):
        x = self.block_cls(
          self.width * 2**stage,
          strides=2 if stage > 0 and index == 0 else 1,
          zero_init_residual=self.zero_init_residual,
          dtype=self.dtype,
          bn_axis_name=self.bn_axis_name,
          name=f"layer{stage + 1}_{index}",
        )(x, train=train)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)
    return x.astype(jnp.float32)


ResNet18 = register_model("resnet18")(functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock))
ResNet34 = register_model("resnet34")(functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock))
ResNet50 = register_model("resnet50")(functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BottleneckBlock))
ResNet101 = register_model("resnet101")(functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), block_cls=BottleneckBlock))
ResNet152 = register_model("resnet152")(functools.partial(ResNet, stage_sizes=(3, 8, 36, 3), block_cls=BottleneckBlock))
