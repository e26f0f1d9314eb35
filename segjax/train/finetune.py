"""Starting a run from imported weights (``config.model.init_from``): torchvision ResNet weights (``segjax.convert``)
into a classifier, whose head is kept from the file when it has the model's number of classes and newly initialised
otherwise (fine-tuning to another label set), or into a ResNet-encoder U-Net's encoder."""

import jax
import numpy as np

from segjax.convert import load_state_dict, torchvision_resnet_to_flax
from segjax.errors import SegjaxError
from segjax.train.state import TrainState


def init_from(state: TrainState, path: str, *, ema: bool = False) -> TrainState:
  """The step-0 ``state`` with the weights and BatchNorm statistics of the torchvision ResNet file ``path``.

  The optimizer state is re-initialised for the new parameters (and the EMA, when kept, starts from them).

  Raises:
    SegjaxError: for an unreadable file or tensors that do not fit the model (named in the message).
  """
  state_dict = load_state_dict(path)
  variables = {"params": jax.device_get(state.params), "batch_stats": jax.device_get(state.batch_stats)}
  into = "encoder" if "encoder" in variables["params"] else None
  if into is None and "fc" not in variables["params"]:
    raise SegjaxError(f"model.init_from '{path}': the model has neither a ResNet classifier head (fc) nor an encoder.")
  skip_classifier = into is None and _head_differs(state_dict, variables["params"]["fc"])
  loaded = torchvision_resnet_to_flax(
    state_dict, variables, into=into, skip_classifier=skip_classifier, source=repr(str(path))
  )
  params, batch_stats = loaded["params"], loaded.get("batch_stats", state.batch_stats)
  state = state.replace(params=params, batch_stats=batch_stats, opt_state=state.tx.init(params))
  if ema:
    state = state.replace(ema={"params": params, "batch_stats": batch_stats})
  return state


def _head_differs(state_dict, fc) -> bool:
  """Whether the file's classifier has another number of classes than the model's (so the model's new head stays)."""
  weight = state_dict.get("fc.weight")
  return weight is None or tuple(np.shape(weight))[0] != int(np.shape(fc["kernel"])[-1])
