"""Model registry: every model is found by the name in the config (``model.name``).

A registered constructor is a Flax Linen module class or any callable returning one (typically a
``functools.partial`` of one parameterised class, e.g. ``resnet50``). Importing this package registers all models.

Example:
  >>> from segjax import models
  >>> model = models.get_model("unet_small", num_classes=2)
  >>> type(model).__name__
  'UNet'
"""

from collections.abc import Callable
from typing import Any, TypeVar

import flax.linen as nn

from segjax.errors import SegjaxError
from segjax.registry import Registry

ModelConstructor = Callable[..., nn.Module]
_Constructor = TypeVar("_Constructor", bound=ModelConstructor)

MODELS: Registry[ModelConstructor] = Registry("model", "model.name")


def register_model(name: str) -> Callable[[_Constructor], _Constructor]:
  """Decorator that registers a module class or a function returning a module under ``name``.

  Args:
    name: the registry name (``model.name`` in configs).

  Returns:
    A decorator that records its argument and returns it unchanged.

  Raises:
    ValueError: if ``name`` is already registered.
  """

  return MODELS.register(name)


def list_models() -> list[str]:
  """Names of all registered models, sorted with numbers in numeric order (resnet18 before resnet101)."""
  return MODELS.names()


def get_model(name: str, **kwargs) -> nn.Module:
  """Builds the registered model ``name`` with module attributes ``kwargs`` (e.g. ``num_classes=2``).

  Args:
    name: a registered name, see :func:`list_models`.
    **kwargs: keyword arguments of the constructor; they override a partial's defaults.

  Returns:
    An unbound Flax Linen module.

  Raises:
    SegjaxError: for an unknown name or keyword arguments the constructor does not accept.
  """
  constructor = MODELS.lookup(name)
  try:
    return constructor(**kwargs)
  except TypeError as e:
    raise SegjaxError(f"cannot build model {name!r} from the config: {e}. Fix the model.* keys in the config.") from e


create = get_model
"""The former name of :func:`get_model`, kept for existing code."""


def create_model(config: Any, num_classes: int, **overrides) -> nn.Module:
  """The model of a config's ``model`` section: ``get_model(config.name, num_classes=..., **config.kwargs)``, with
  ``kernels=config.kernels`` when that is not ``'auto'`` (every segjax model's default; a model of one's own needs
  the field only to be given another).

  ``overrides`` set attributes the run decides rather than the model config, e.g. ``dtype`` (half precision) or
  ``bn_axis_name`` (pmap).
  """
  chosen = {} if config.kernels == "auto" else {"kernels": config.kernels}
  return get_model(config.name, num_classes=num_classes, **{**config.kwargs, **chosen, **overrides})


# Imported last: these modules register themselves with the registry defined above.
from segjax.models.resnet import (  # noqa: E402
  BasicBlock,
  BottleneckBlock,
  CifarResNet,
  ResidualBlock,
  ResNet,
  ResNet18,
  ResNet34,
  ResNet50,
  ResNet101,
  ResNet152,
  ResNetEncoder,
  resnet_encoder,
)
from segjax.models.resnet_unet import ResNetUNet  # noqa: E402
from segjax.models.unet import ResUNet, UNet, UNetSmall, UNetValid  # noqa: E402

__all__ = [
  "BasicBlock",
  "BottleneckBlock",
  "CifarResNet",
  "MODELS",
  "ModelConstructor",
  "ResNet",
  "ResNet18",
  "ResNet34",
  "ResNet50",
  "ResNet101",
  "ResNet152",
  "ResNetEncoder",
  "ResNetUNet",
  "ResUNet",
  "ResidualBlock",
  "UNet",
  "UNetSmall",
  "UNetValid",
  "create",
  "create_model",
  "get_model",
  "list_models",
  "register_model",
  "resnet_encoder",
]
