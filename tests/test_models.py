"""Tests for segjax.models: shapes, exact parameter counts, train/eval behaviour, padding and the registry."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax import models
from segjax.errors import SegjaxError
from segjax.models import BasicBlock, BottleneckBlock, ResNet, UNet

KEY = jax.random.key(0)
# Tests share input shapes (and tiny_* configurations) so that eager ops compiled by one test are reused by the next.
UNET_INPUT = (2, 37, 50, 1)
RESNET_INPUT = (2, 32, 32, 3)

# torchvision.models.resnetXX(num_classes=1000): sum(p.numel() for p in model.parameters()).
TORCHVISION_PARAM_COUNTS = {
  "resnet18": 11_689_512,
  "resnet34": 21_797_672,
  "resnet50": 25_557_032,
  "resnet101": 44_549_160,
  "resnet152": 60_192_808,
}


def count(tree) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def abstract_init(model: nn.Module, shape: tuple[int, ...]):
  """Variables of ``model`` as ShapeDtypeStructs, without computing anything."""
  return jax.eval_shape(lambda: model.init(KEY, jnp.zeros(shape), train=False))


def tiny_unet(**kwargs) -> UNet:
  defaults = dict(num_classes=3, depth=2, base_width=4, group_norm_groups=2)
  return UNet(**{**defaults, **kwargs})


def tiny_resnet(**kwargs) -> ResNet:
  defaults = dict(stage_sizes=(1, 1, 1, 1), block_cls=BasicBlock, num_classes=5, width=4)
  return ResNet(**{**defaults, **kwargs})


# ----------------------------------------------------------------------------------------------------------- U-Net


@pytest.mark.parametrize("upsample", ["transpose", "resize"])
@pytest.mark.parametrize("norm", ["batch", "group", "instance", "none"])
def test_unet_output_shape_and_dtype(norm, upsample):
  model = tiny_unet(norm=norm, upsample=upsample)
  logits, variables = model.init_with_output(KEY, jax.random.normal(KEY, UNET_INPUT), train=False)
  chex.assert_shape(logits, (2, 37, 50, 3))
  assert logits.dtype == jnp.float32
  chex.assert_tree_all_finite(logits)
  assert ("batch_stats" in variables) == (norm == "batch")


@pytest.mark.parametrize("height, width", [(37, 50), (2, 3), (1, 9)])
def test_unet_any_input_size_gives_same_size_output(height, width):
  # depth 2 pads sides to multiples of 4; (2, 3) and (1, 9) need reflection wider than the image itself.
  model = tiny_unet(norm="none", upsample="resize")
  logits, _ = model.init_with_output(KEY, jax.random.normal(KEY, (2, height, width, 1)), train=False)
  chex.assert_shape(logits, (2, height, width, 3))
  chex.assert_tree_all_finite(logits)


def test_unet_bfloat16_computation_keeps_float32_params_and_logits():
  model = tiny_unet(dtype=jnp.bfloat16)
  logits, variables = model.init_with_output(KEY, jax.random.normal(KEY, UNET_INPUT), train=False)
  assert logits.dtype == jnp.float32
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}


def unet_param_count(in_channels, num_classes, depth, width, norm, upsample):
  """Parameter count of the U-Net written out from the architecture (Ronneberger et al. 2015, Sec. 2)."""
  norm_params = 0 if norm == "none" else 2  # scale and bias per channel
  conv_bias = 1 if norm == "none" else 0

  def conv_norm(c_in, c_out, k=3):
    return k * k * c_in * c_out + (conv_bias + norm_params) * c_out

  def double_conv(c_in, c_out):
    return conv_norm(c_in, c_out) + conv_norm(c_out, c_out)

  total, c_in = 0, in_channels
  for level in range(depth):
    total += double_conv(c_in, width * 2**level)
    c_in = width * 2**level
  total += double_conv(c_in, width * 2**depth)
  for level in reversed(range(depth)):
    c_up, c_out = width * 2 ** (level + 1), width * 2**level
    up_kernel = 2 if upsample == "transpose" else 3
    total += up_kernel * up_kernel * c_up * c_out + c_out  # up-conv with bias
    total += double_conv(2 * c_out, c_out)  # skip + up-sampled
  return total + width * num_classes + num_classes  # 1x1 classifier with bias


def test_unet_param_count_by_hand():
  # depth 1, width 4, 3 -> 2 channels, batch norm, transposed conv:
  #   down_0      3*3*3*4 + 2*4 + 3*3*4*4 + 2*4 = 268
  #   bottleneck  3*3*4*8 + 2*8 + 3*3*8*8 + 2*8 = 896
  #   upsample_0  2*2*8*4 + 4                   = 132
  #   up_0        3*3*8*4 + 2*4 + 3*3*4*4 + 2*4 = 448
  #   classifier  4*2 + 2                       = 10
  variables = abstract_init(UNet(num_classes=2, depth=1, base_width=4), (1, 8, 8, 3))
  assert count(variables["params"]) == 268 + 896 + 132 + 448 + 10 == 1754
  assert count(variables["batch_stats"]) == 2 * (4 + 4 + 8 + 8 + 4 + 4)


@pytest.mark.parametrize(
  "depth, width, norm, upsample",
  [(1, 4, "batch", "transpose"), (2, 4, "none", "transpose"), (2, 6, "group", "resize"), (3, 2, "instance", "resize")],
)
def test_unet_param_count_matches_formula(depth, width, norm, upsample):
  model = UNet(num_classes=3, depth=depth, base_width=width, norm=norm, upsample=upsample, group_norm_groups=2)
  variables = abstract_init(model, (1, 16, 16, 2))
  assert count(variables["params"]) == unet_param_count(2, 3, depth, width, norm, upsample)


def test_unet_convs_have_bias_only_without_norm():
  with_norm = abstract_init(tiny_unet(norm="batch"), (1, 8, 8, 1))["params"]
  without_norm = abstract_init(tiny_unet(norm="none"), (1, 8, 8, 1))["params"]
  assert set(with_norm["down_0"]["conv_0"]) == {"conv", "norm"}
  assert set(with_norm["down_0"]["conv_0"]["conv"]) == {"kernel"}
  assert set(without_norm["down_0"]["conv_0"]["conv"]) == {"kernel", "bias"}


def test_unet_rejects_bad_settings():
  with pytest.raises(SegjaxError, match="model.norm"):
    UNet(num_classes=2, norm="layer")
  with pytest.raises(SegjaxError, match="model.upsample"):
    UNet(num_classes=2, upsample="pixelshuffle")
  with pytest.raises(SegjaxError, match="group_norm_groups=8 does not divide 12"):
    UNet(num_classes=2, base_width=12, norm="group")
  with pytest.raises(SegjaxError, match="dropout_rate"):
    UNet(num_classes=2, dropout_rate=1.0)


def test_unet_jitted_forward_traces_once():
  model = tiny_unet(depth=1)
  x = jnp.ones((1, 10, 12, 1))
  variables = model.init(KEY, x, train=False)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def forward(variables, x):
    return model.apply(variables, x, train=False)

  forward(variables, x)
  forward(variables, x + 1.0)  # a second trace would raise


# ---------------------------------------------------------------------------------------------- train vs eval


@pytest.mark.parametrize(
  "model, shape", [(tiny_unet(), UNET_INPUT), (tiny_resnet(), RESNET_INPUT)], ids=["unet", "resnet"]
)
def test_batch_stats_update_in_train_only(model, shape):
  x = 3.0 + jax.random.normal(KEY, shape)
  variables = model.init(KEY, x, train=False)

  _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), variables["batch_stats"], updates["batch_stats"])
  assert all(jax.tree.leaves(changed))

  _, eval_updates = model.apply(variables, x, train=False, mutable=["batch_stats"])
  chex.assert_trees_all_equal(eval_updates["batch_stats"], variables["batch_stats"])


def test_batch_norm_averages_statistics_over_bn_axis_name():
  # vmap with an axis name stands in for pmap: each "device" sees one image, the statistics are of all of them.
  model = UNet(num_classes=2, depth=1, base_width=4, bn_axis_name="batch")
  x = jax.random.normal(KEY, (4, 1, 8, 8, 1)) * jnp.arange(1.0, 5.0)[:, None, None, None, None]
  variables = model.init(KEY, x[0], train=False)

  def train_step(shard):
    return model.apply(variables, shard, train=True, mutable=["batch_stats"])

  _, updates = jax.vmap(train_step, axis_name="batch")(x)
  stats = updates["batch_stats"]["down_0"]["conv_0"]["norm"]["mean"]
  chex.assert_trees_all_close(stats[0], stats[3])  # every shard holds the same, global statistics

  whole_batch = model.clone(bn_axis_name=None)
  _, single = whole_batch.apply(variables, x.reshape(4, 8, 8, 1), train=True, mutable=["batch_stats"])
  chex.assert_trees_all_close(stats[0], single["batch_stats"]["down_0"]["conv_0"]["norm"]["mean"], atol=1e-6)


def test_dropout_random_in_train_deterministic_in_eval():
  model = tiny_unet(norm="none", dropout_rate=0.5)
  x = jax.random.normal(KEY, UNET_INPUT)
  variables = model.init(KEY, x, train=False)

  def train_forward(seed):
    return model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(seed)})

  assert not np.allclose(train_forward(1), train_forward(2))
  chex.assert_trees_all_equal(train_forward(1), train_forward(1))
  chex.assert_trees_all_equal(model.apply(variables, x, train=False), model.apply(variables, x, train=False))
  assert not np.allclose(model.apply(variables, x, train=False), train_forward(1))


# ------------------------------------------------------------------------------------------------------ ResNet


@pytest.mark.parametrize("name", list(TORCHVISION_PARAM_COUNTS))
def test_resnet_param_count_equals_torchvision(name):
  variables = abstract_init(models.get_model(name, num_classes=1000), (1, 32, 32, 3))
  assert set(variables) == {"params", "batch_stats"}
  assert count(variables["params"]) == TORCHVISION_PARAM_COUNTS[name]


@pytest.mark.parametrize("name", list(TORCHVISION_PARAM_COUNTS))
def test_resnet_output_shape_abstract(name):
  model = models.get_model(name, num_classes=7, width=4, dtype=jnp.bfloat16)
  logits, variables = jax.eval_shape(lambda: model.init_with_output(KEY, jnp.zeros(RESNET_INPUT), train=False))
  assert logits.shape == (2, 7) and logits.dtype == jnp.float32
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("block_cls", [BasicBlock, BottleneckBlock])
def test_resnet_forward(block_cls):
  model = tiny_resnet(block_cls=block_cls)
  logits, _ = model.init_with_output(KEY, jax.random.normal(KEY, RESNET_INPUT), train=False)
  chex.assert_shape(logits, (2, 5))
  assert logits.dtype == jnp.float32
  chex.assert_tree_all_finite(logits)


def torchvision_out(size: int, kernel: int, stride: int, pad: int) -> int:
  return (size + 2 * pad - kernel) // stride + 1


@pytest.mark.parametrize("size", [224, 225])
def test_resnet_stage_resolutions_match_torchvision(size):
  model = models.get_model("resnet18", num_classes=10, width=4)
  _, state = jax.eval_shape(
    lambda: model.init_with_output(KEY, jnp.zeros((1, size, size, 3)), train=False, capture_intermediates=True)
  )
  captured = state["intermediates"]
  stem = torchvision_out(size, 7, 2, 3)
  expected = [torchvision_out(stem, 3, 2, 1)]  # after max pool = stage 1
  for _ in range(3):
    expected.append(torchvision_out(expected[-1], 3, 2, 1))
  if size == 224:
    assert [stem, *expected] == [112, 56, 28, 14, 7]
  assert captured["conv1"]["__call__"][0].shape[1:3] == (stem, stem)
  for stage, side in enumerate(expected, start=1):
    assert captured[f"layer{stage}_1"]["__call__"][0].shape[1:3] == (side, side)


def test_resnet_stem_uses_symmetric_padding_not_same():
  model = tiny_resnet()
  x = jax.random.normal(KEY, RESNET_INPUT)
  _, state = model.init_with_output(KEY, x, train=False, capture_intermediates=True)
  stem = state["intermediates"]["conv1"]["__call__"][0]
  kernel = state["params"]["conv1"]["kernel"]
  conv = functools.partial(jax.lax.conv_general_dilated, x, kernel, (2, 2), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  chex.assert_trees_all_close(stem, conv(padding=((3, 3), (3, 3))), atol=1e-5)
  same = conv(padding="SAME")  # Flax/TF 'SAME' pads (2, 3) here: shifted by one pixel
  assert same.shape == stem.shape and not np.allclose(stem, same, atol=1e-3)


def test_resnet_projection_shortcut_only_where_shape_changes():
  params = abstract_init(models.get_model("resnet50", num_classes=10, width=4), (1, 32, 32, 3))["params"]
  with_projection = sorted(name for name, block in params.items() if "downsample_conv" in block)
  assert with_projection == ["layer1_0", "layer2_0", "layer3_0", "layer4_0"]  # layer1_0: 4 -> 16 channels
  assert params["layer2_0"]["conv2"]["kernel"].shape == (3, 3, 8, 8)  # v1.5: stride sits in the 3x3 conv
  assert "bias" not in params["conv1"] and "bias" in params["fc"]


@pytest.mark.parametrize("block_cls, last_bn", [(BasicBlock, "bn2"), (BottleneckBlock, "bn3")])
def test_resnet_zero_init_residual(block_cls, last_bn):
  x = jnp.zeros(RESNET_INPUT)
  zero = tiny_resnet(block_cls=block_cls, zero_init_residual=True).init(KEY, x, train=False)["params"]
  default = tiny_resnet(block_cls=block_cls).init(KEY, x, train=False)["params"]
  assert not np.any(zero["layer1_0"][last_bn]["scale"])
  assert np.all(default["layer1_0"][last_bn]["scale"] == 1)
  assert np.all(zero["layer1_0"]["bn1"]["scale"] == 1)


# ---------------------------------------------------------------------------------------------------- registry


def test_registry_lists_all_models():
  assert models.list_models() == [
    "resnet18",
    "resnet18_unet",
    "resnet20_cifar",
    "resnet32_cifar",
    "resnet34",
    "resnet34_unet",
    "resnet44_cifar",
    "resnet50",
    "resnet50_unet",
    "resnet56_cifar",
    "resnet101",
    "resnet101_unet",
    "resnet110_cifar",
    "resnet152",
    "resunet",
    "unet",
    "unet_small",
    "unet_valid",
  ]


def test_get_model_returns_configured_modules():
  assert type(models.get_model("unet", num_classes=2)) is UNet
  resnet50 = models.get_model("resnet50", num_classes=10)
  assert type(resnet50) is ResNet
  assert resnet50.block_cls is BottleneckBlock and tuple(resnet50.stage_sizes) == (3, 4, 6, 3)
  assert models.get_model("resnet18", num_classes=10).block_cls is BasicBlock
  small = models.get_model("unet_small", num_classes=2)
  assert (small.depth, small.base_width) == (3, 16)
  assert models.get_model("unet_small", num_classes=2, base_width=8).base_width == 8  # config overrides


def test_get_model_unknown_name_raises_one_line_segjax_error():
  with pytest.raises(SegjaxError) as error:
    models.get_model("foo", num_classes=2)
  message = str(error.value)
  assert "\n" not in message
  assert "'foo'" in message and "model.name" in message
  assert all(name in message for name in models.list_models())


def test_get_model_bad_keyword_raises_segjax_error():
  with pytest.raises(SegjaxError, match="'unet'.*widht"):
    models.get_model("unet", num_classes=2, widht=3)


def test_register_model_accepts_classes_and_functions(monkeypatch):
  monkeypatch.setattr(models, "MODELS", models.MODELS.copy())

  @models.register_model("test_function_model")
  def build(num_classes: int) -> nn.Module:
    return UNet(num_classes=num_classes, depth=1, base_width=4)

  @models.register_model("test_class_model")
  class Tiny(nn.Module):
    num_classes: int

  assert models.get_model("test_function_model", num_classes=4).num_classes == 4
  assert type(models.get_model("test_class_model", num_classes=4)) is Tiny
  with pytest.raises(ValueError, match="twice"):
    models.register_model("unet")(UNet)
