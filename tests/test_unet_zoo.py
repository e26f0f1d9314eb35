"""Tests for the U-Net zoo: the paper-exact unpadded U-Net, its size helpers, deep supervision and the residual U-Net.

Full-size models are only traced (``jax.eval_shape``); real forwards use tiny widths and sizes.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax import models
from segjax.errors import SegjaxError
from segjax.losses import downsample_nearest
from segjax.models.layers import ResidualDoubleConv
from segjax.models.unet import (
  UNet,
  UNetValid,
  center_crop,
  next_valid_input_size,
  previous_valid_input_size,
  smallest_valid_input_size,
  valid_input_sizes,
  valid_output_size,
)

# "rbg" keys: random init compiles several times faster on CPU than the default threefry, for the same tests.
KEY = jax.random.key(0, impl="rbg")
ODD_INPUT = (2, 37, 50, 1)
VALID_INPUT = (2, 48, 44, 1)  # valid for depth 2: 48 -> 8, 44 -> 4


def count(tree) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def abstract_init_with_output(model: nn.Module, shape: tuple[int, ...]):
  """(output, variables) of ``model.init_with_output`` as ShapeDtypeStructs, without computing anything."""
  return jax.eval_shape(lambda: model.init_with_output(KEY, jnp.zeros(shape), train=False))


def tiny_unet_valid(**kwargs) -> UNetValid:
  return UNetValid(**{**dict(num_classes=2, depth=2, base_width=4), **kwargs})


def tiny_deeply_supervised_unet(**kwargs) -> UNet:
  return UNet(**{**dict(num_classes=3, depth=3, base_width=4, norm="none", deep_supervision=True), **kwargs})


def relative_error(approx: jax.Array, exact: jax.Array) -> float:
  return float(jnp.linalg.norm(approx - exact) / jnp.linalg.norm(exact))


# ------------------------------------------------------------------------------------------- unpadded U-Net


def test_unet_valid_is_the_paper_network():
  # Ronneberger et al. 2015, Fig. 1: a 572x572 tile gives a 388x388 map; 23 conv layers; 1 -> 2 channels.
  model = models.get_model("unet_valid", num_classes=2)
  logits, variables = abstract_init_with_output(model, (1, 572, 572, 1))
  assert logits.shape == (1, 388, 388, 2) and logits.dtype == jnp.float32
  assert set(variables) == {"params"}  # no norm by default
  assert count(variables["params"]) == 31_030_658
  kernels = [path for path, _ in jax.tree_util.tree_leaves_with_path(variables["params"]) if "kernel" in str(path[-1])]
  assert len(kernels) == 23
  assert variables["params"]["upsample_3"]["kernel"].shape == (2, 2, 1024, 512)  # up-conv halves the channels
  assert variables["params"]["up_3"]["conv_0"]["conv"]["kernel"].shape == (3, 3, 1024, 512)  # after concatenation


def test_unet_valid_tiny_forward_and_seamless_tiles():
  # With centred skip crops the unpadded U-Net is a sliding window: shifting the tile by 2**depth pixels shifts the
  # output by as much (the overlap-tile strategy, Sec. 2 / Fig. 2). A misplaced crop breaks this.
  model = tiny_unet_valid()
  x = jax.random.normal(KEY, VALID_INPUT)
  variables = model.init(KEY, x, train=False)
  logits = model.apply(variables, x, train=False)
  chex.assert_shape(logits, (2, valid_output_size(48, depth=2), valid_output_size(44, depth=2), 2))
  assert logits.shape[1:3] == (8, 4)
  assert logits.dtype == jnp.float32
  chex.assert_tree_all_finite(logits)
  chex.assert_trees_all_close(logits[:, :4], model.apply(variables, x[:, :44], train=False), atol=1e-5)
  chex.assert_trees_all_close(logits[:, 4:], model.apply(variables, x[:, 4:], train=False), atol=1e-5)


def test_unet_valid_skip_connection_is_centre_cropped():
  # With the deeper path cut (up-convolution zeroed), output pixel (i, j) sees the input only through the level-0 skip:
  # 2 + 2 unpadded 3x3 convs, a 9x9 window that a centred crop puts at the centre of the 41x41 receptive field.
  model = tiny_unet_valid()
  x = jax.random.normal(KEY, VALID_INPUT)[:1, :44]  # 44 -> 4: margin (44 - 4) / 2 = 20
  params = model.init(KEY, x, train=False)["params"]
  params = {**params, "upsample_0": jax.tree.map(jnp.zeros_like, params["upsample_0"])}
  i, j = 1, 2
  grad = jax.grad(lambda x: model.apply({"params": params}, x, train=False)[0, i, j, 0])(x)[0, :, :, 0]
  rows, cols = np.nonzero(np.asarray(grad))
  assert rows.min() >= i + 20 - 4 and rows.max() <= i + 20 + 4
  assert cols.min() >= j + 20 - 4 and cols.max() <= j + 20 + 4
  assert grad[i + 20, j + 20] != 0


def test_center_crop_is_centred():
  x = jnp.arange(2 * 6 * 7 * 1).reshape(2, 6, 7, 1)
  np.testing.assert_array_equal(center_crop(x, 2, 3), x[:, 2:4, 2:5])
  np.testing.assert_array_equal(center_crop(x, 6, 7), x)
  np.testing.assert_array_equal(center_crop(x, 5, 4), x[:, 0:5, 1:5])  # odd surplus: the extra pixel goes at the end
  with pytest.raises(ValueError, match="cannot crop"):
    center_crop(x, 7, 3)


def test_valid_size_helper_values():
  assert valid_output_size(572) == 388
  assert valid_output_size(188) == 4
  assert smallest_valid_input_size(4) == 188
  assert smallest_valid_input_size(1) == 18
  sizes = valid_input_sizes(depth=4, max_size=600)
  assert sizes[0] == 188 and 572 in sizes and sizes[-1] <= 600
  assert all(valid_output_size(size) > 0 for size in sizes)
  assert next_valid_input_size(573) == 588 and previous_valid_input_size(573) == 572
  assert next_valid_input_size(572) == previous_valid_input_size(572) == 572
  assert next_valid_input_size(1) == 188 and previous_valid_input_size(187) is None


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_valid_input_sizes_are_exactly_the_sizes_that_work(depth):
  def works(size: int) -> bool:
    try:
      return valid_output_size(size, depth) > 0
    except SegjaxError:
      return False

  assert [size for size in range(-2, 400) if works(size)] == valid_input_sizes(depth, max_size=399)


@pytest.mark.parametrize("size, reason", [(573, "odd size 569"), (100, "odd size 5"), (0, "not positive"), (-4, "")])
def test_invalid_size_raises_one_line_error_naming_it(size, reason):
  with pytest.raises(SegjaxError, match=rf"input size {size} .*{reason}.*nearest valid size") as error:
    valid_output_size(size)
  assert "\n" not in str(error.value)
  assert ("572 and 588" in str(error.value)) == (size == 573)
  assert ("188 (the smallest)" in str(error.value)) == (size < 188)


@pytest.mark.parametrize("shape, side", [((1, 45, 44, 1), "height 45"), ((1, 44, 46, 1), "width 46")])
def test_unet_valid_rejects_invalid_input_size(shape, side):
  with pytest.raises(SegjaxError, match=rf"input {side} does not fit the unpadded U-Net of depth 2"):
    abstract_init_with_output(tiny_unet_valid(), shape)


def test_he_normal_init():
  # Sec. 3: weights from a Gaussian with standard deviation sqrt(2 / N), N = 9 * input channels of a 3x3 conv.
  model = UNetValid(num_classes=2, depth=1, base_width=64)
  x = jnp.zeros((1, smallest_valid_input_size(1), 18, 1))
  params = model.init(KEY, x, train=False)["params"]
  for conv in (params["down_0"]["conv_1"]["conv"], params["bottleneck"]["conv_1"]["conv"]):
    kernel = conv["kernel"]
    np.testing.assert_allclose(np.std(kernel), np.sqrt(2 / (9 * kernel.shape[2])), rtol=0.02)
    assert abs(float(np.mean(kernel))) < 0.05 * np.std(kernel)
    assert not np.any(conv["bias"])


# ---------------------------------------------------------------------------------------------- deep supervision


def test_deep_supervision_outputs_coarsest_first_at_ceil_sizes():
  model = tiny_deeply_supervised_unet(dtype=jnp.bfloat16)
  x = jax.random.normal(KEY, ODD_INPUT)
  variables = model.init(KEY, x, train=False)
  assert {"aux_classifier_2", "aux_classifier_1"} <= set(variables["params"])
  assert "aux_classifier_0" not in variables["params"]

  logits, aux_logits = model.apply(variables, x, train=True)
  chex.assert_shape(logits, (2, 37, 50, 3))
  assert isinstance(aux_logits, tuple)
  chex.assert_shape(aux_logits, [(2, 10, 13, 3), (2, 19, 25, 3)])  # ceil(37 / 4), ceil(50 / 4); ceil(./2)
  assert {out.dtype for out in (logits, *aux_logits)} == {jnp.dtype(jnp.float32)}

  eval_logits = model.apply(variables, x, train=False)
  assert isinstance(eval_logits, jax.Array)
  chex.assert_trees_all_equal(eval_logits, logits)  # no norm or dropout: train and eval compute the same

  labels = jnp.zeros(ODD_INPUT[:3], jnp.int32)  # segjax.losses.deep_supervision_loss subsamples labels like this
  chex.assert_shape([downsample_nearest(labels, *aux.shape[1:3]) for aux in aux_logits], [(2, 10, 13), (2, 19, 25)])


def test_without_deep_supervision_train_returns_logits_only():
  model = UNet(num_classes=3, depth=2, base_width=4, norm="none")
  x = jnp.zeros((1, 8, 8, 1))
  variables = model.init(KEY, x, train=False)
  assert not any(name.startswith("aux") for name in variables["params"])
  assert isinstance(model.apply(variables, x, train=True), jax.Array)


# ------------------------------------------------------------------------------------------------ residual U-Net


def resunet_param_count(in_channels, num_classes, depth, width, norm, upsample):
  """Parameter count of the residual U-Net written out from its blocks (He et al. 2016, Sec. 3.3, option B)."""
  per_channel = 1 if norm == "none" else 2  # conv bias, or norm scale and bias

  def conv(c_in, c_out, k):
    return k * k * c_in * c_out + per_channel * c_out

  def residual_block(c_in, c_out):
    shortcut = conv(c_in, c_out, 1) if c_in != c_out else 0
    return conv(c_in, c_out, 3) + conv(c_out, c_out, 3) + shortcut

  total, c_in = 0, in_channels
  for level in range(depth + 1):  # the last one is the bottleneck
    total += residual_block(c_in, width * 2**level)
    c_in = width * 2**level
  for level in reversed(range(depth)):
    c_up, c_out = width * 2 ** (level + 1), width * 2**level
    up_kernel = 2 if upsample == "transpose" else 3
    total += up_kernel * up_kernel * c_up * c_out + c_out  # up-conv with bias
    total += residual_block(2 * c_out, c_out)  # skip + up-sampled
  return total + width * num_classes + num_classes  # 1x1 classifier with bias


@pytest.mark.parametrize(
  "in_channels, depth, width, norm, upsample",
  [
    (1, 1, 4, "batch", "transpose"),
    (4, 2, 4, "none", "resize"),
    (3, 2, 6, "group", "transpose"),
    (1, 4, 64, "batch", "transpose"),
  ],
)
def test_resunet_param_count_matches_formula(in_channels, depth, width, norm, upsample):
  model = models.get_model(
    "resunet", num_classes=2, depth=depth, base_width=width, norm=norm, upsample=upsample, group_norm_groups=2
  )
  _, variables = abstract_init_with_output(model, (1, 16, 16, in_channels))
  expected = resunet_param_count(in_channels, 2, depth, width, norm, upsample)
  assert count(variables["params"]) == expected
  if (in_channels, depth, width) == (1, 4, 64):
    assert expected == 32_435_138


def test_resunet_projection_shortcut_only_where_channels_change():
  model = models.get_model("resunet", num_classes=2, depth=2, base_width=4)
  same = abstract_init_with_output(model, (1, 8, 8, 4))[1]["params"]  # 4 input channels = base width
  assert sorted(name for name, block in same.items() if "shortcut" in block) == ["bottleneck", "down_1", "up_0", "up_1"]
  assert same["down_1"]["shortcut"]["conv"]["kernel"].shape == (1, 1, 4, 8)
  gray = abstract_init_with_output(model, (1, 8, 8, 1))[1]["params"]
  assert "shortcut" in gray["down_0"]


def test_residual_block_adds_the_identity():
  block = ResidualDoubleConv(features=3, norm="none")
  x = jax.random.normal(KEY, (1, 5, 6, 3))
  params = block.init(KEY, x, train=False)["params"]
  assert set(params) == {"conv_0", "conv_1"}
  zero_last = {**params, "conv_1": jax.tree.map(jnp.zeros_like, params["conv_1"])}
  chex.assert_trees_all_close(block.apply({"params": zero_last}, x, train=False), nn.relu(x))


@pytest.mark.parametrize("height, width", [(37, 50), (32, 32)])
def test_resunet_any_input_size_gives_same_size_output(height, width):
  model = models.get_model("resunet", num_classes=3, depth=2, base_width=4, group_norm_groups=2, norm="group")
  x = jax.random.normal(KEY, (2, height, width, 1))
  logits = model.apply(model.init(KEY, x, train=False), x, train=False)
  chex.assert_shape(logits, (2, height, width, 3))
  assert logits.dtype == jnp.float32
  chex.assert_tree_all_finite(logits)


def test_resunet_deep_supervision():
  model = models.get_model("resunet", num_classes=2, depth=2, base_width=4, deep_supervision=True)
  x = jnp.zeros((1, 9, 10, 1))
  variables = model.init(KEY, x, train=False)
  (logits, (aux,)), _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
  chex.assert_shape([logits, aux], [(1, 9, 10, 2), (1, 5, 5, 2)])


# ------------------------------------------------------------------------------------------------------ bfloat16


@pytest.mark.parametrize(
  "model, shape",
  [
    (UNet(num_classes=3, depth=2, base_width=8), ODD_INPUT),
    (tiny_unet_valid(), VALID_INPUT),
    (UNet(num_classes=3, depth=2, base_width=8, block="residual"), ODD_INPUT),
  ],
  ids=["unet", "unet_valid", "resunet"],
)
def test_bfloat16_close_to_float32(model, shape):
  x = jax.random.normal(KEY, shape)
  variables = model.init(KEY, x, train=False)
  exact = model.apply(variables, x, train=False)
  approx, captured = model.clone(dtype=jnp.bfloat16).apply(
    variables, x, train=False, capture_intermediates=True, mutable=["intermediates"]
  )
  assert approx.dtype == jnp.float32
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  # every layer computes in bfloat16 (only the model's own output is cast back to float32) ...
  outputs = dict(captured["intermediates"])
  del outputs["__call__"]
  assert {leaf.dtype for leaf in jax.tree.leaves(outputs)} == {jnp.dtype(jnp.bfloat16)}
  chex.assert_tree_all_finite(approx)
  # ... so the logits carry bfloat16's rounding (about 2**-8 relative per operation): close to, but not, float32's
  assert 1e-4 < relative_error(approx, exact) < 5e-2


def test_registry_has_the_zoo():
  assert {"unet", "unet_valid", "resunet"} <= set(models.list_models())
  assert type(models.get_model("unet_valid", num_classes=2)) is UNetValid
  resunet = models.get_model("resunet", num_classes=2)
  assert type(resunet) is UNet and resunet.block == "residual"
  with pytest.raises(SegjaxError, match="model.block"):
    UNet(num_classes=2, block="dense")
  with pytest.raises(SegjaxError, match="model.depth"):
    UNetValid(num_classes=2, depth=0)
