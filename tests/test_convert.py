"""Tests for segjax.convert: torchvision ResNet state dicts into the Flax ResNet and the ResNet-U-Net encoder.

torch is a test-only dependency and torchvision has no CPU wheel here, so the reference model below is written in
plain ``torch.nn`` with torchvision's module names and architecture (7x7/2 stem with padding 3, 3x3/2 max pool with
padding 1, stride in the bottleneck's 3x3 conv, 1x1 conv + BN projections, BN eps 1e-5).
"""

import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import segjax.models.resnet_unet  # noqa: F401  (registers resnet*_unet)
from experiments.torch_models import torchvision_layout_resnet
from segjax import convert, models
from segjax.errors import SegjaxError
from segjax.models.resnet import BasicBlock, ResNet
from segjax.models.resnet_unet import ResNetUNet

KEY = jax.random.key(0)
SIDE = 67  # odd: exercises the padding arithmetic of every strided layer


@pytest.fixture(scope="module")
def torch():
  return pytest.importorskip("torch")


def nchw(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def relative_error(actual, expected) -> float:
  return float(np.max(np.abs(np.asarray(actual) - expected)) / np.max(np.abs(expected)))


def assert_close_relative(actual, expected):
  np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(expected))))


# --------------------------------------------------------------------------------- equivalence with torch


@pytest.mark.parametrize(
  "arch, bottleneck, layers", [("resnet18", False, (2, 2, 2, 2)), ("resnet50", True, (3, 4, 6, 3))]
)
def test_classifier_logits_match_torch(torch, tmp_path, arch, bottleneck, layers):
  torch_model = torchvision_layout_resnet(torch, bottleneck, layers, num_classes=10, seed=1)
  path = tmp_path / f"{arch}.pth"
  torch.save(torch_model.state_dict(), path)

  x = np.random.default_rng(0).normal(size=(1, SIDE, SIDE, 3)).astype(np.float32)
  with torch.no_grad():
    expected = torch_model(torch.from_numpy(nchw(x))).numpy()

  model = models.get_model(arch, num_classes=10)
  variables = jax.eval_shape(lambda: model.init(KEY, jnp.zeros((1, 32, 32, 3)), train=False))
  variables = convert.load_torchvision_resnet(path, variables)
  logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  print(f"{arch}: max relative logit error {relative_error(logits, expected):.2e}")
  assert_close_relative(logits, expected)


def test_resnet_unet_encoder_features_match_torch(torch, tmp_path):
  torch_model = torchvision_layout_resnet(torch, False, (2, 2, 2, 2), num_classes=1000, seed=2)
  path = tmp_path / "resnet18.pth"
  torch.save(torch_model.state_dict(), path)

  # Grey input: 1-channel U-Net with the RGB stem summed over channels == the torch model on (g, g, g).
  grey = np.random.default_rng(1).normal(size=(1, 64, 64, 1)).astype(np.float32)
  with torch.no_grad():
    expected = [
      f.numpy().transpose(0, 2, 3, 1) for f in torch_model.features(torch.from_numpy(nchw(grey)).repeat(1, 3, 1, 1))
    ]

  model = ResNetUNet(num_classes=2, encoder="resnet18", decoder_widths=(16, 16, 8, 8, 8))
  initial = jax.jit(lambda: model.init(KEY, jnp.zeros((1, 32, 32, 1)), train=False))()
  variables = convert.load_torchvision_resnet(path, initial, into="encoder")
  chex.assert_trees_all_equal(
    {k: v for k, v in variables["params"].items() if k != "encoder"},
    {k: v for k, v in initial["params"].items() if k != "encoder"},
  )
  stem = torch_model.state_dict()["conv1.weight"].numpy().sum(axis=1, keepdims=True).transpose(2, 3, 1, 0)
  np.testing.assert_array_equal(variables["params"]["encoder"]["conv1"]["kernel"], stem)

  @jax.jit
  def forward(variables, x):
    logits, state = model.apply(
      variables, x, train=False, capture_intermediates=lambda module, _: module.name == "encoder"
    )
    return logits, state["intermediates"]["encoder"]["__call__"][0]

  logits, features = forward(variables, grey)
  chex.assert_shape(logits, (1, 64, 64, 2))
  assert [f.shape for f in features] == [f.shape for f in expected]
  for actual, reference in zip(features, expected, strict=True):
    assert_close_relative(actual, reference)


# ------------------------------------------------------------------------------ file formats and errors


def tiny_resnet() -> ResNet:
  return ResNet(stage_sizes=(1, 1, 1, 1), block_cls=BasicBlock, num_classes=5, width=4)


def tiny_variables(model: nn.Module | None = None, channels: int = 3):
  model = model or tiny_resnet()
  return model.init(KEY, jnp.zeros((1, 32, 32, channels)), train=False)


def torch_names_of(variables) -> dict[str, np.ndarray]:
  """A random state dict with torchvision names and layouts for the given Flax ResNet variables."""
  rng = np.random.default_rng(0)
  state = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    names = [entry.key for entry in path]
    name = convert._torch_name(tuple(names))
    shape = leaf.shape
    if len(shape) == 4:
      shape = (shape[3], shape[2], shape[0], shape[1])
    elif len(shape) == 2:
      shape = shape[::-1]
    state[name] = rng.normal(size=shape).astype(np.float32)
  for name in [n for n in state if n.endswith("running_var")]:
    state[name.replace("running_var", "num_batches_tracked")] = np.array(7, dtype=np.int64)
  return state


def test_npz_round_trip_without_torch(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # the .npz path must not need torch
  variables = tiny_variables()
  state = torch_names_of(variables)
  assert "layer2.0.downsample.0.weight" in state and "layer2.0.downsample.1.running_mean" in state
  path = tmp_path / "weights.npz"
  np.savez(path, **state)
  converted = convert.load_torchvision_resnet(path, variables)
  params, stats = converted["params"], converted["batch_stats"]
  np.testing.assert_array_equal(
    params["layer2_0"]["conv1"]["kernel"], state["layer2.0.conv1.weight"].transpose(2, 3, 1, 0)
  )
  np.testing.assert_array_equal(params["layer2_0"]["downsample_bn"]["scale"], state["layer2.0.downsample.1.weight"])
  np.testing.assert_array_equal(stats["layer3_0"]["bn2"]["var"], state["layer3.0.bn2.running_var"])
  np.testing.assert_array_equal(params["fc"]["kernel"], state["fc.weight"].T)
  np.testing.assert_array_equal(params["fc"]["bias"], state["fc.bias"])
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(converted))
  chex.assert_trees_all_equal_shapes(converted, variables)


def test_skip_classifier_keeps_model_fc():
  variables = tiny_variables()
  state = torch_names_of(tiny_variables(tiny_resnet().clone(num_classes=1000)))
  converted = convert.torchvision_resnet_to_flax(state, variables, skip_classifier=True)
  chex.assert_trees_all_equal(converted["params"]["fc"], variables["params"]["fc"])
  np.testing.assert_array_equal(converted["params"]["bn1"]["bias"], state["bn1.bias"])
  with pytest.raises(SegjaxError, match="mis-shaped 2 .*fc.bias"):
    convert.torchvision_resnet_to_flax(state, variables)


def test_into_encoder_ignores_fc_and_keeps_decoder():
  model = ResNetUNet(num_classes=2, encoder="resnet18", encoder_width=4, decoder_widths=(8, 8, 8, 8, 8))
  variables = jax.eval_shape(lambda: model.init(KEY, jnp.zeros((1, 32, 32, 3)), train=False))
  classifier = tiny_variables(ResNet(stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock, num_classes=1000, width=4))
  state = torch_names_of(classifier)
  converted = convert.torchvision_resnet_to_flax(state, variables, into="encoder")
  assert converted["params"]["head"]["kernel"] is variables["params"]["head"]["kernel"]  # untouched
  np.testing.assert_array_equal(converted["batch_stats"]["encoder"]["bn1"]["mean"], state["bn1.running_mean"])


@pytest.mark.parametrize(
  "edit, expected",
  [
    (lambda s: s.pop("layer1.0.bn1.running_var"), r"missing 1 \(layer1\.0\.bn1\.running_var\)"),
    (
      lambda s: s.update({"layer5.0.conv1.weight": np.zeros((1, 1, 1, 1))}),
      r"unexpected 1 \(layer5\.0\.conv1\.weight\)",
    ),
    (
      lambda s: s.update({"layer1.0.conv2.weight": np.zeros((4, 4, 1, 1))}),
      r"mis-shaped 1 \(layer1\.0\.conv2\.weight \(4, 4, 1, 1\) -> \(1, 1, 4, 4\) != \(3, 3, 4, 4\)\)",
    ),
  ],
  ids=["missing", "unexpected", "misshaped"],
)
def test_mismatch_errors_name_the_tensors(edit, expected):
  variables = tiny_variables()
  state = torch_names_of(variables)
  edit(state)
  with pytest.raises(SegjaxError, match=expected) as error:
    convert.torchvision_resnet_to_flax(state, variables)
  assert "\n" not in str(error.value)


def test_error_lists_first_names_and_count():
  variables = tiny_variables()
  state = {k: v for k, v in torch_names_of(variables).items() if not k.startswith("layer4")}
  with pytest.raises(SegjaxError, match=r"missing 15 \(layer4\.0\.bn1\.bias, .*, \.\.\. \(10 more\)\)"):
    convert.torchvision_resnet_to_flax(state, variables)


def test_stem_channel_mismatch_error():
  variables = tiny_variables(channels=2)
  state = torch_names_of(tiny_variables())
  with pytest.raises(SegjaxError, match=r"conv1\.weight .*1-channel model"):
    convert.torchvision_resnet_to_flax(state, variables)


def test_load_state_dict_errors(tmp_path, monkeypatch):
  with pytest.raises(SegjaxError, match="does not exist"):
    convert.load_state_dict(tmp_path / "absent.pth")
  (tmp_path / "weights.h5").write_bytes(b"")
  with pytest.raises(SegjaxError, match="unknown weight file type '.h5'"):
    convert.load_state_dict(tmp_path / "weights.h5")
  (tmp_path / "weights.pth").write_bytes(b"")
  (tmp_path / "weights.safetensors").write_bytes(b"")
  monkeypatch.setitem(sys.modules, "torch", None)
  monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
  with pytest.raises(SegjaxError, match="needs PyTorch"):
    convert.load_state_dict(tmp_path / "weights.pth")
  with pytest.raises(SegjaxError, match="needs the safetensors package"):
    convert.load_state_dict(tmp_path / "weights.safetensors")


def test_safetensors_round_trip(tmp_path):
  safetensors_numpy = pytest.importorskip("safetensors.numpy")
  variables = tiny_variables()
  state = torch_names_of(variables)
  safetensors_numpy.save_file(state, str(tmp_path / "weights.safetensors"))
  converted = convert.load_torchvision_resnet(tmp_path / "weights.safetensors", variables)
  np.testing.assert_array_equal(converted["params"]["fc"]["bias"], state["fc.bias"])


def test_pth_that_is_not_a_state_dict(torch, tmp_path):
  torch.save([torch.zeros(2)], tmp_path / "list.pth")
  with pytest.raises(SegjaxError, match="does not hold a state dict"):
    convert.load_state_dict(tmp_path / "list.pth")
