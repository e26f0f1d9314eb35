"""U-Net with a ResNet encoder: ImageNet-pretrainable contracting path, U-Net expanding path.

The contracting path is a torchvision-layout ResNet-18/34/50/101 (He et al. 2015) without its classifier
(:class:`segjax.models.resnet.ResNetEncoder`), so ImageNet weights can be imported into it
(:func:`segjax.convert.load_torchvision_resnet` with ``into='encoder'``). The expanding path follows the U-Net
(Ronneberger et al. 2015, Sec. 2): at each of five stages it up-samples x2, concatenates the encoder feature map of the
same stride and applies two 3x3 conv -> norm -> ReLU layers, ending at the input resolution. This is the widely used
"U-Net with a ResNet-34 encoder" design (e.g. Buslaev et al. 2018, "Fully Convolutional Network for Automatic Road
Extraction from Satellite Imagery"; the ``Unet`` of segmentation_models_pytorch); the decoder here is segjax's own.
"""

import functools
from collections.abc import Sequence
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.errors import SegjaxError
from segjax.models import register_model
from segjax.models.layers import DoubleConv, check_choice, check_kernels, check_norm, conv, he_normal, up_convolution
from segjax.models.resnet import resnet_encoder

ENCODERS = ("resnet18", "resnet34", "resnet50", "resnet101")
UPSAMPLES = ("resize", "transpose")
RESIZE_METHODS = ("nearest", "bilinear")
# The encoder's output stride: inputs are padded to a multiple of it.
OUTPUT_STRIDE = 32


class ResNetUNet(nn.Module):
  """U-Net whose contracting path is an ImageNet ResNet (see the module docstring).

  Encoder feature maps are taken at strides 2 (stem), 4, 8, 16 and 32 (stages 1-4). Decoder stage ``i`` (0..4)
  up-samples x2, concatenates the encoder map of stride ``16 / 2**i`` (stages 0-3; stage 4 reaches the input
  resolution and has no skip) and applies two 3x3 conv -> norm -> ReLU with ``decoder_widths[i]`` channels. A final
  ``head_kernel`` x ``head_kernel`` conv with bias maps to ``num_classes`` logits.

  Inputs of any height/width are accepted: sides that are not multiples of 32 are reflect-padded at the bottom/right
  and the logits are cropped back, so the output has the input's height and width. The input may have any number of
  channels (the encoder's ``conv1`` takes them); ImageNet weights fit 3 channels and, summed over RGB, 1 channel
  (see :mod:`segjax.convert`). Pretrained encoders expect inputs normalised like their training data.

  Attributes:
    num_classes: number of output channels (classes).
    encoder: ``'resnet18'``, ``'resnet34'``, ``'resnet50'`` or ``'resnet101'``; its parameters live under the
      submodule ``encoder`` with torchvision's names (``encoder/layer1_0/conv1/kernel``).
    decoder_widths: channels of the five decoder stages, from the coarsest.
    norm: decoder normalisation, ``'batch'``, ``'group'``, ``'instance'`` or ``'none'`` (the encoder always uses
      batch norm, as the pretrained ResNets do).
    upsample: ``'resize'`` (``jax.image.resize`` x2 with ``resize_method``, no parameters) or ``'transpose'`` (2x2
      stride-2 transposed conv with bias to the stage's decoder width).
    resize_method: ``'nearest'`` or ``'bilinear'``, used when ``upsample='resize'``.
    head_kernel: side of the final conv (3 or 1).
    encoder_width: channels of the encoder's stem and first stage; 64 (the default) for ImageNet weights.
    dtype: computation dtype (params stay float32; logits are returned as float32).
    bn_axis_name: cross-device axis name for batch norm statistics (pmap), encoder and decoder.
    group_norm_groups: number of groups when ``norm='group'``; must divide every decoder width.
    kernels: the form of the convolutions and pools (:data:`segjax.models.layers.KERNELS`; ``'auto'`` per platform).

  Example:
    >>> model = ResNetUNet(num_classes=2, encoder="resnet18")
    >>> x = jnp.zeros((1, 37, 50, 1))
    >>> variables = model.init(jax.random.key(0), x, train=False)
    >>> model.apply(variables, x, train=False).shape
    (1, 37, 50, 2)
  """

  num_classes: int
  encoder: str = "resnet34"
  decoder_widths: Sequence[int] = (256, 128, 64, 32, 16)
  norm: str = "batch"
  upsample: str = "resize"
  resize_method: str = "nearest"
  head_kernel: int = 3
  encoder_width: int = 64
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  group_norm_groups: int = 8
  kernels: str = "auto"

  def __post_init__(self) -> None:
    if self.encoder not in ENCODERS:
      raise SegjaxError(
        f"unknown encoder {self.encoder!r} (config key model.kwargs.encoder); choose one of: {', '.join(ENCODERS)}."
      )
    if len(self.decoder_widths) != 5:
      raise SegjaxError(
        f"decoder_widths needs 5 entries (one per x2 up-sampling from stride 32), got {tuple(self.decoder_widths)} "
        "(config key model.kwargs.decoder_widths)."
      )
    check_norm(self.norm, channels=min(self.decoder_widths), group_norm_groups=self.group_norm_groups)
    check_choice("upsample", self.upsample, UPSAMPLES)
    check_choice("resize_method", self.resize_method, RESIZE_METHODS)
    check_kernels(self.kernels)
    if self.head_kernel not in (1, 3):
      raise SegjaxError(f"head_kernel must be 1 or 3, got {self.head_kernel} (config key model.kwargs.head_kernel).")
    super().__post_init__()

  def _upsample(self, x: jax.Array, features: int, name: str) -> jax.Array:
    if self.upsample == "transpose":
      return up_convolution(features, dtype=self.dtype, kernel_init=he_normal(), kernels=self.kernels, name=name)(x)
    batch, height, width, channels = x.shape
    return jax.image.resize(x, (batch, 2 * height, 2 * width, channels), method=self.resize_method)

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Per-pixel logits.

    Args:
      x: images, (B, H, W, C) float, any H, W and C.
      train: batch-norm batch statistics on (needs ``mutable=['batch_stats']``).

    Returns:
      float32 logits, (B, H, W, num_classes).
    """
    chex.assert_rank(x, 4)
    height, width = x.shape[1:3]
    pad_h, pad_w = -height % OUTPUT_STRIDE, -width % OUTPUT_STRIDE
    if pad_h or pad_w:
      x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="reflect")

    encoder = resnet_encoder(
      self.encoder,
      width=self.encoder_width,
      dtype=self.dtype,
      bn_axis_name=self.bn_axis_name,
      kernels=self.kernels,
      name="encoder",
    )
    features = encoder(x, train=train)
    skips = features[-2::-1]  # strides 16, 8, 4, 2
    x = features[-1]
    for stage, channels in enumerate(self.decoder_widths):
      x = self._upsample(x, channels, f"upsample_{stage}")
      if stage < len(skips):
        x = jnp.concatenate([x, skips[stage]], axis=-1)
      x = DoubleConv(
        channels,
        norm=self.norm,
        dtype=self.dtype,
        bn_axis_name=self.bn_axis_name,
        group_norm_groups=self.group_norm_groups,
        kernels=self.kernels,
        name=f"decoder_{stage}",
      )(x, train=train)

    x = conv(
      self.num_classes, self.head_kernel, dtype=self.dtype, kernel_init=he_normal(), kernels=self.kernels, name="head"
    )(x)
    return x[:, :height, :width].astype(jnp.float32)


ResNet18UNet = register_model("resnet18_unet")(functools.partial(ResNetUNet, encoder="resnet18"))
ResNet34UNet = register_model("resnet34_unet")(functools.partial(ResNetUNet, encoder="resnet34"))
ResNet50UNet = register_model("resnet50_unet")(functools.partial(ResNetUNet, encoder="resnet50"))
ResNet101UNet = register_model("resnet101_unet")(functools.partial(ResNetUNet, encoder="resnet101"))
