"""Offline import of torchvision ResNet weights into segjax's Flax ResNets.

torchvision's ``resnet18`` ... ``resnet152`` state dicts (``model.state_dict()`` saved with ``torch.save``, or the
same tensors in ``.safetensors`` / ``.npz`` files) map one to one onto :class:`segjax.models.resnet.ResNet`, whose
submodules carry torchvision's names, and onto the ``encoder`` of :class:`segjax.models.resnet_unet.ResNetUNet`:

==============================================  ================================================================
torchvision                                     Flax
==============================================  ================================================================
``layer1.0.conv1.weight`` (O, I, kh, kw)        ``params/layer1_0/conv1/kernel`` (kh, kw, I, O)
``layer1.0.bn1.weight`` / ``.bias``             ``params/layer1_0/bn1/scale`` / ``bias``
``layer1.0.bn1.running_mean`` / ``_var``        ``batch_stats/layer1_0/bn1/mean`` / ``var``
``layer2.0.downsample.0`` / ``.1``              ``layer2_0/downsample_conv`` / ``downsample_bn``
``fc.weight`` (O, I) / ``fc.bias``              ``params/fc/kernel`` (I, O) / ``bias``
==============================================  ================================================================

``num_batches_tracked`` counters are ignored (Flax's BatchNorm uses a fixed momentum). Nothing is downloaded: fetch the
file once (e.g. torchvision's ``ResNet34_Weights.IMAGENET1K_V1`` URL) and pass its path.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from segjax import models, convert
  >>> import segjax.models.resnet_unet
  >>> model = models.get_model("resnet34_unet", num_classes=2)
  >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False)
  >>> variables = convert.load_torchvision_resnet("resnet34-b627a593.pth", variables, into="encoder")  # doctest: +SKIP
"""

import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from segjax.errors import SegjaxError

Variables = Mapping[str, Any]

# Flax leaf name -> (collection, torchvision tensor name suffix).
_LEAVES = {
  ("params", "kernel"): "weight",
  ("params", "scale"): "weight",
  ("params", "bias"): "bias",
  ("batch_stats", "mean"): "running_mean",
  ("batch_stats", "var"): "running_var",
}
_MODULE_NAMES = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}
_IGNORED_SUFFIX = "num_batches_tracked"
_CLASSIFIER_PREFIX = "fc."
_STEM = "conv1.weight"
_SHOWN = 5  # names listed in an error message


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a state dict of named tensors from a local file as numpy arrays.

  Args:
    path: ``.pth`` / ``.pt`` (needs PyTorch; read with ``weights_only=True``, so no code is executed),
      ``.safetensors`` (needs the ``safetensors`` package) or ``.npz`` (numpy only).

  Returns:
    Tensor name -> numpy array (floating tensors as float32).

  Raises:
    SegjaxError: if the file is missing, its format unknown, the reader not installed or the content not a flat
      mapping of tensors.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise SegjaxError(f"weight file {path!r} does not exist; download it first (nothing is fetched automatically).")
  suffix = os.path.splitext(path)[1].lower()
  if suffix in (".pth", ".pt"):
    try:
      import torch
    except ImportError as e:
      raise SegjaxError(
        f"reading {path!r} needs PyTorch (pip install torch, CPU build is enough), or convert it to .npz / "
        ".safetensors first."
      ) from e
    try:
      state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
      raise SegjaxError(f"cannot read {path!r} with torch.load(weights_only=True): {e}".replace("\n", " ")) from e
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
      raise SegjaxError(
        f"{path!r} does not hold a state dict of tensors (got {type(state).__name__}); save model.state_dict()."
      )
    return {name: _torch_to_numpy(tensor) for name, tensor in state.items()}
  if suffix == ".safetensors":
    try:
      from safetensors.numpy import load_file
    except ImportError as e:
      raise SegjaxError(
        f"reading {path!r} needs the safetensors package (pip install safetensors), or convert it to .npz first."
      ) from e
    return dict(load_file(path))
  if suffix == ".npz":
    with np.load(path, allow_pickle=False) as archive:
      return {name: archive[name] for name in archive.files}
  raise SegjaxError(f"unknown weight file type {suffix!r} of {path!r}; use .pth, .pt, .safetensors or .npz.")


def _torch_to_numpy(tensor: Any) -> np.ndarray:
  tensor = tensor.detach().cpu()
  if tensor.is_floating_point():
    tensor = tensor.float()  # numpy has no bfloat16
  return tensor.numpy()


def _torch_name(path: tuple[str, ...]) -> str:
  """('params', 'layer1_0', 'downsample_bn', 'scale') -> 'layer1.0.downsample.1.weight'."""
  collection, *modules, leaf = path
  parts = []
  for module in modules:
    if module in _MODULE_NAMES:
      parts.append(_MODULE_NAMES[module])
    elif module.startswith("layer") and "_" in module:
      parts.append(module.replace("_", ".", 1))
    else:
      parts.append(module)
  key = (collection, leaf)
  if key not in _LEAVES:
    raise SegjaxError(f"no torchvision counterpart for Flax variable {'/'.join(path)!r}; is this a segjax ResNet?")
  return ".".join([*parts, _LEAVES[key]])


def _to_flax_layout(name: str, value: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
  """Transposes a torch tensor to Flax's layout; sums an RGB stem over its input channels for 1-channel models."""
  if value.ndim == 4:  # conv (O, I, kh, kw) -> (kh, kw, I, O)
    value = value.transpose(2, 3, 1, 0)
    if name == _STEM and value.shape[2] == 3 and target_shape[2] == 1:
      # A grey image g seen as RGB (g, g, g) gives sum_c W_c * g: the summed kernel computes the same features.
      value = value.sum(axis=2, keepdims=True)
  elif value.ndim == 2:  # dense (O, I) -> (I, O)
    value = value.T
  return value


def _listing(names: list[str]) -> str:
  shown = ", ".join(names[:_SHOWN])
  more = f", ... ({len(names) - _SHOWN} more)" if len(names) > _SHOWN else ""
  return f"{len(names)} ({shown}{more})"


def torchvision_resnet_to_flax(
  state_dict: Mapping[str, Any],
  variables: Variables,
  *,
  into: str | None = None,
  skip_classifier: bool = False,
  source: str = "the state dict",
) -> dict[str, Any]:
  """Copies a torchvision ResNet state dict into Flax ResNet variables (see the module docstring for the mapping).

  Every target variable must be found in ``state_dict`` with the right shape, and every tensor of ``state_dict``
  must be used, except ``num_batches_tracked`` counters and, when skipped, the classifier ``fc.*``. Only the ResNet
  stem accepts a different shape: an RGB ``conv1.weight`` is summed over its input channels for a 1-channel
  (greyscale) model; other channel counts are an error.

  Args:
    state_dict: torchvision tensor name -> array (numpy, or anything ``np.asarray`` takes).
    variables: the model's ``{'params': ..., 'batch_stats': ...}``, e.g. from ``model.init`` (or ``jax.eval_shape``
      of it, when every leaf is replaced).
    into: the top-level submodule holding the ResNet (``'encoder'`` for :class:`ResNetUNet`), or None for a
      classifier at the top level. Variables outside it are returned unchanged.
    skip_classifier: ignore ``fc.*`` and keep the model's own ``fc`` (e.g. for a different number of classes).
      Automatic when the target has no ``fc`` (an encoder).
    source: how error messages name the state dict (its file).

  Returns:
    A new variables dict with float32 arrays from ``state_dict`` (in the dtypes of ``variables``).

  Raises:
    SegjaxError: naming the missing, unexpected and mis-shaped tensors (the first few of each, with counts).
  """
  prefix = () if into is None else (into,)
  flat = traverse_util.flatten_dict(dict(variables))
  targets = {
    path: leaf
    for path, leaf in flat.items()
    if path[0] in ("params", "batch_stats") and path[1 : 1 + len(prefix)] == prefix
  }
  if not targets:
    raise SegjaxError(f"the Flax variables have no ResNet under {into!r} to import {source} into.")
  by_name = {_torch_name((path[0], *path[1 + len(prefix) :])): path for path in targets}
  has_classifier = any(name.startswith(_CLASSIFIER_PREFIX) for name in by_name)
  if skip_classifier:
    by_name = {name: path for name, path in by_name.items() if not name.startswith(_CLASSIFIER_PREFIX)}

  def ignored(name: str) -> bool:
    classifier = name.startswith(_CLASSIFIER_PREFIX) and (skip_classifier or not has_classifier)
    return name.endswith(_IGNORED_SUFFIX) or classifier

  missing = sorted(name for name in by_name if name not in state_dict)
  unexpected = sorted(name for name in state_dict if name not in by_name and not ignored(name))
  misshaped, converted = [], {}
  for name, path in by_name.items():
    if name not in state_dict:
      continue
    target_shape = tuple(targets[path].shape)
    value = _to_flax_layout(name, np.asarray(state_dict[name]), target_shape)
    if value.shape != target_shape:
      misshaped.append(f"{name} {tuple(np.shape(state_dict[name]))} -> {value.shape} != {target_shape}")
    else:
      converted[path] = jnp.asarray(value, dtype=targets[path].dtype)

  if missing or unexpected or misshaped:
    problems = []
    if missing:
      problems.append(f"missing {_listing(missing)}")
    if unexpected:
      problems.append(f"unexpected {_listing(unexpected)}")
    if misshaped:
      problems.append(f"mis-shaped {_listing(sorted(misshaped))}")
    hint = " (a 1-channel model takes an RGB stem summed over channels; other channel counts need 3)"
    hint = hint if any(text.startswith(_STEM + " ") for text in misshaped) else ""
    raise SegjaxError(
      f"{source} does not match the Flax ResNet{'' if into is None else f' under {into!r}'}: "
      f"{'; '.join(problems)}{hint}. Check the architecture (resnet18/34/50/...) and width, or use "
      "skip_classifier=True for a different number of classes."
    )
  return traverse_util.unflatten_dict({**flat, **converted})


def load_torchvision_resnet(
  path: str | os.PathLike,
  variables: Variables,
  *,
  into: str | None = None,
  skip_classifier: bool = False,
) -> dict[str, Any]:
  """Reads torchvision ResNet weights from ``path`` into Flax ResNet variables.

  :func:`load_state_dict` followed by :func:`torchvision_resnet_to_flax`.

  Args:
    path: ``.pth`` / ``.pt``, ``.safetensors`` or ``.npz`` file of a torchvision ResNet's ``state_dict()``.
    variables: the model's ``{'params': ..., 'batch_stats': ...}``.
    into: ``'encoder'`` for a :class:`segjax.models.resnet_unet.ResNetUNet` (its decoder keeps its values), None for
      a :class:`segjax.models.resnet.ResNet` classifier.
    skip_classifier: keep the model's ``fc`` instead of the file's (automatic for an encoder).

  Returns:
    The new variables.

  Raises:
    SegjaxError: for an unreadable file or tensors that do not match the model (named in the message).
  """
  state_dict = load_state_dict(path)
  return torchvision_resnet_to_flax(
    state_dict, variables, into=into, skip_classifier=skip_classifier, source=repr(os.fspath(path))
  )
