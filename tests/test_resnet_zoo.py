"""Tests for the ResNet zoo: CIFAR ResNets, v1 / v1.5 bottlenecks, the features mode and the ResNet-encoder U-Net."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import segjax.models.resnet_unet  # noqa: F401  (registers resnet*_unet)
from segjax import models
from segjax.errors import SegjaxError
from segjax.models.resnet import (
  BasicBlock,
  BottleneckBlock,
  CifarResNet,
  ResNet,
  ResNetEncoder,
  resnet_encoder,
  zero_pad_shortcut,
)
from segjax.models.resnet_unet import ResNetUNet

KEY = jax.random.key(0)

# He et al. 2015, Table 6: (n, parameters) of the CIFAR-10 ResNets; the exact counts are of this implementation.
CIFAR_PARAM_COUNTS = {
  "resnet20_cifar": (3, 269_722, 0.27),
  "resnet32_cifar": (5, 464_154, 0.46),
  "resnet44_cifar": (7, 658_586, 0.66),
  "resnet56_cifar": (9, 853_018, 0.85),
  "resnet110_cifar": (18, 1_727_962, 1.7),
}
# resnet*_unet, 3 input channels, 2 classes, default decoder (256, 128, 64, 32, 16), batch norm, resize, 3x3 head.
RESNET_UNET_PARAM_COUNTS = {
  "resnet18_unet": 14_328_354,
  "resnet34_unet": 24_436_514,
  "resnet50_unet": 32_521_250,
  "resnet101_unet": 51_513_378,
}
# torchvision.models.resnetXX(num_classes=1000) minus fc (512 or 2048 inputs, 1000 outputs, with bias).
ENCODER_PARAM_COUNTS = {
  "resnet18": 11_689_512 - 513_000,
  "resnet34": 21_797_672 - 513_000,
  "resnet50": 25_557_032 - 2_049_000,
  "resnet101": 44_549_160 - 2_049_000,
}


def count(tree) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def abstract_init_with_output(model: nn.Module, shape: tuple[int, ...], **kwargs):
  """(output, variables) of ``model`` as ShapeDtypeStructs, without computing anything."""
  return jax.eval_shape(lambda: model.init_with_output(KEY, jnp.zeros(shape), train=False, **kwargs))


def shapes(tree):
  return jax.tree.map(lambda leaf: tuple(leaf.shape), tree)


def torchvision_out(size: int, kernel: int, stride: int, pad: int) -> int:
  return (size + 2 * pad - kernel) // stride + 1


# ----------------------------------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("name", list(CIFAR_PARAM_COUNTS))
def test_cifar_resnet_param_counts_match_paper(name):
  n, exact, paper = CIFAR_PARAM_COUNTS[name]
  model = models.get_model(name, num_classes=10)
  assert type(model) is CifarResNet and model.blocks_per_stage == n
  logits, variables = abstract_init_with_output(model, (2, 32, 32, 3))
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  params = variables["params"]
  assert count(params) == exact
  assert round(exact / 1e6, 2 if exact < 1e6 else 1) == paper  # rounds to Table 6's figure (in millions)
  # 6n + 2 weighted layers: the stem, 2 convs per block, fc; no projection shortcuts (option A).
  convs = [path for path, _ in jax.tree_util.tree_flatten_with_path(params)[0] if path[-1].key == "kernel"]
  assert len(convs) == 6 * n + 2
  assert not any("downsample_conv" in block for block in params.values())
  assert params["layer3_0"]["conv1"]["kernel"].shape == (3, 3, 32, 64)


def test_cifar_resnet20_forward_and_stage_sizes():
  model = models.get_model("resnet20_cifar", num_classes=10)
  x = jax.random.normal(KEY, (2, 32, 32, 3))
  (logits, state) = model.init_with_output(KEY, x, train=False, capture_intermediates=True)
  chex.assert_shape(logits, (2, 10))
  chex.assert_tree_all_finite(logits)
  captured = state["intermediates"]
  assert captured["layer1_2"]["__call__"][0].shape == (2, 32, 32, 16)
  assert captured["layer2_0"]["__call__"][0].shape == (2, 16, 16, 32)
  assert captured["layer3_2"]["__call__"][0].shape == (2, 8, 8, 64)


def test_option_a_shortcut_subsamples_and_zero_pads():
  x = jax.random.normal(KEY, (1, 5, 6, 4))
  y = zero_pad_shortcut(x, 8, 2)
  chex.assert_shape(y, (1, 3, 3, 8))
  np.testing.assert_array_equal(y[..., 2:6], x[:, ::2, ::2])
  assert not np.any(y[..., :2]) and not np.any(y[..., 6:])
  with pytest.raises(SegjaxError, match="cannot reduce channels"):
    zero_pad_shortcut(x, 2, 2)


def test_option_a_block_adds_the_padded_input():
  block = BasicBlock(8, strides=2, shortcut="A")
  x = jax.random.normal(KEY, (1, 6, 6, 4))
  variables = block.init(KEY, x, train=False)
  assert "downsample_conv" not in variables["params"]
  # With the residual branch silenced (last BN scale 0, bias 0) the block is ReLU(shortcut(x)).
  params = jax.tree_util.tree_map_with_path(
    lambda path, p: jnp.zeros_like(p) if path[0].key == "bn2" else p, variables["params"]
  )
  y = block.apply({**variables, "params": params}, x, train=False)
  chex.assert_trees_all_close(y, nn.relu(zero_pad_shortcut(x, 8, 2)))
  with pytest.raises(SegjaxError, match="shortcut 'C'"):
    BasicBlock(8, shortcut="C")


# ------------------------------------------------------------------------------------------------ v1 vs v1.5


@pytest.mark.parametrize("stride_in_1x1, strided_conv", [(False, "conv2"), (True, "conv1")])
def test_bottleneck_stride_placement(stride_in_1x1, strided_conv):
  model = ResNet(
    stage_sizes=(1, 1, 1, 1), block_cls=BottleneckBlock, num_classes=3, width=4, stride_in_1x1=stride_in_1x1
  )
  _, state = abstract_init_with_output(model, (1, 64, 64, 3), capture_intermediates=True)
  block = state["intermediates"]["layer2_0"]  # input 16x16 (stem 32, max pool 16), output 8x8
  sides = {conv: block[conv]["__call__"][0].shape[1] for conv in ("conv1", "conv2", "conv3")}
  assert sides == ({"conv1": 8, "conv2": 8, "conv3": 8} if stride_in_1x1 else {"conv1": 16, "conv2": 8, "conv3": 8})
  assert [conv for conv in ("conv1", "conv2") if sides[conv] == 8][0] == strided_conv
  # v1 and v1.5 have identical parameters.
  default = abstract_init_with_output(model.clone(stride_in_1x1=False), (1, 64, 64, 3))[1]
  chex.assert_trees_all_equal_shapes(state["params"], default["params"])


def test_stride_in_1x1_passes_through_registry():
  model = models.get_model("resnet50", num_classes=10, stride_in_1x1=True)
  assert model.stride_in_1x1 and not models.get_model("resnet50", num_classes=10).stride_in_1x1


# ---------------------------------------------------------------------------------------------- features mode


@pytest.mark.parametrize(
  "arch, channels", [("resnet18", (64, 64, 128, 256, 512)), ("resnet50", (64, 256, 512, 1024, 2048))]
)
@pytest.mark.parametrize("size", [224, 67])
def test_encoder_feature_shapes(arch, channels, size):
  encoder = resnet_encoder(arch)
  assert encoder.channels == channels
  features, _ = abstract_init_with_output(encoder, (2, size, size, 3))
  sides = [torchvision_out(size, 7, 2, 3)]
  for _ in range(4):
    sides.append(torchvision_out(sides[-1], 3, 2, 1))
  if size == 224:
    assert sides == [112, 56, 28, 14, 7]
  else:
    assert sides == [34, 17, 9, 5, 3]
  assert [f.shape for f in features] == [(2, s, s, c) for s, c in zip(sides, channels, strict=True)]


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_encoder_params_are_classifier_params_minus_fc(arch):
  classifier = abstract_init_with_output(models.get_model(arch, num_classes=1000), (1, 32, 32, 3))[1]
  encoder = abstract_init_with_output(resnet_encoder(arch), (1, 32, 32, 3))[1]
  assert shapes(encoder["params"]) == shapes({k: v for k, v in classifier["params"].items() if k != "fc"})
  assert shapes(encoder["batch_stats"]) == shapes(classifier["batch_stats"])
  assert count(encoder["params"]) == ENCODER_PARAM_COUNTS[arch]


def test_encoder_features_are_the_classifiers_stage_outputs():
  classifier = ResNet(stage_sizes=(1, 1, 1, 1), block_cls=BasicBlock, num_classes=5, width=4)
  x = jax.random.normal(KEY, (1, 33, 35, 3))
  _, state = classifier.init_with_output(KEY, x, train=False, capture_intermediates=True)
  variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
  variables["params"] = {k: v for k, v in variables["params"].items() if k != "fc"}
  features = ResNetEncoder(stage_sizes=(1, 1, 1, 1), block_cls=BasicBlock, width=4).apply(variables, x, train=False)
  captured = state["intermediates"]
  expected = [nn.relu(captured["bn1"]["__call__"][0])]
  expected += [captured[f"layer{stage}_0"]["__call__"][0] for stage in range(1, 5)]
  chex.assert_trees_all_close(features, tuple(expected))


def test_resnet_encoder_unknown_arch():
  with pytest.raises(SegjaxError, match="'resnet19'.*resnet18"):
    resnet_encoder("resnet19")


# --------------------------------------------------------------------------------------------------- ResNetUNet


@pytest.mark.parametrize("name", list(RESNET_UNET_PARAM_COUNTS))
def test_resnet_unet_param_counts_and_encoder_tree(name):
  model = models.get_model(name, num_classes=2)
  assert type(model) is ResNetUNet
  logits, variables = abstract_init_with_output(model, (1, 64, 64, 3))
  assert logits.shape == (1, 64, 64, 2) and logits.dtype == jnp.float32
  assert count(variables["params"]) == RESNET_UNET_PARAM_COUNTS[name]
  arch = name.removesuffix("_unet")
  classifier = abstract_init_with_output(models.get_model(arch, num_classes=1000), (1, 64, 64, 3))[1]
  classifier_params = {k: v for k, v in classifier["params"].items() if k != "fc"}
  assert shapes(variables["params"]["encoder"]) == shapes(classifier_params)
  assert shapes(variables["batch_stats"]["encoder"]) == shapes(classifier["batch_stats"])
  assert set(variables["params"]) == {"encoder", "head", *(f"decoder_{i}" for i in range(5))}


def resnet_unet_decoder_param_count(encoder_channels, widths, num_classes, head_kernel=3):
  """Decoder + head parameters written out from the architecture (two 3x3 conv + BN per stage, no conv bias)."""
  skips = list(encoder_channels[-2::-1]) + [0]
  total, c_in = 0, encoder_channels[-1]
  for width, skip in zip(widths, skips, strict=True):
    total += 9 * (c_in + skip) * width + 2 * width + 9 * width * width + 2 * width
    c_in = width
  return total + head_kernel**2 * c_in * num_classes + num_classes


@pytest.mark.parametrize("name", list(RESNET_UNET_PARAM_COUNTS))
def test_resnet_unet_param_count_by_formula(name):
  arch = name.removesuffix("_unet")
  decoder = resnet_unet_decoder_param_count(resnet_encoder(arch).channels, (256, 128, 64, 32, 16), 2)
  assert RESNET_UNET_PARAM_COUNTS[name] == ENCODER_PARAM_COUNTS[arch] + decoder


@pytest.mark.parametrize("height, width", [(64, 96), (37, 50), (5, 3)])
@pytest.mark.parametrize("upsample", ["resize", "transpose"])
def test_resnet_unet_output_has_input_size(height, width, upsample):
  model = models.get_model("resnet18_unet", num_classes=3, upsample=upsample)
  logits, _ = abstract_init_with_output(model, (2, height, width, 1))
  assert logits.shape == (2, height, width, 3) and logits.dtype == jnp.float32


def test_resnet_unet_real_forward_odd_grayscale():
  model = ResNetUNet(num_classes=2, encoder="resnet18", encoder_width=8, decoder_widths=(16, 16, 8, 8, 8))
  x = jax.random.normal(KEY, (1, 37, 45, 1))

  @jax.jit
  def forward(x):
    variables = model.init(KEY, x, train=False)
    return model.apply(variables, x, train=False), variables

  logits, variables = forward(x)
  chex.assert_shape(logits, (1, 37, 45, 2))
  chex.assert_tree_all_finite(logits)
  assert variables["params"]["encoder"]["conv1"]["kernel"].shape == (7, 7, 1, 8)


def test_resnet_unet_rejects_bad_settings():
  with pytest.raises(SegjaxError, match="encoder 'vgg16'"):
    ResNetUNet(num_classes=2, encoder="vgg16")
  with pytest.raises(SegjaxError, match="decoder_widths needs 5"):
    ResNetUNet(num_classes=2, decoder_widths=(64, 32))
  with pytest.raises(SegjaxError, match="model.upsample"):
    ResNetUNet(num_classes=2, upsample="pixelshuffle")
  with pytest.raises(SegjaxError, match="model.norm"):
    ResNetUNet(num_classes=2, norm="layer")
  with pytest.raises(SegjaxError, match="head_kernel"):
    ResNetUNet(num_classes=2, head_kernel=5)


# ------------------------------------------------------------------------------------------------------ bfloat16


def test_bfloat16_resnet_close_to_float32():
  model = ResNet(stage_sizes=(1, 1, 1, 1), block_cls=BottleneckBlock, num_classes=10, width=8)
  x = jax.random.normal(KEY, (2, 32, 32, 3))
  variables = model.init(KEY, x, train=False)
  forward = jax.jit(lambda m, x: m.apply(variables, x, train=False), static_argnums=0)
  f32 = forward(model, x)
  bf16 = forward(model.clone(dtype=jnp.bfloat16), x)
  assert bf16.dtype == jnp.float32
  chex.assert_tree_all_finite(bf16)
  np.testing.assert_allclose(bf16, f32, rtol=0, atol=0.05 * float(jnp.max(jnp.abs(f32))))
  assert not np.array_equal(bf16, f32)  # the computation really ran in bfloat16
