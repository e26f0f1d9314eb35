"""How a model's output size relates to its input size, for choosing training tiles and padding whole images.

Same-padded models (``unet``, ``resunet``, the ResNet-encoder U-Nets) keep the input size; the unpadded U-Net of the
paper (``unet_valid``) loses a fixed ``margin`` at each border and takes only certain sizes. A model class states its
own rules with a ``geometry(multiple)`` method (``@nn.nowrap``, so it works unbound) returning a :class:`Geometry`,
as ``UNetValid`` does; models without one are same-padded.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Attributes:
  margin: context lost at each border: output size = input size - 2 * margin (0 for same-padded models).
  fit: the smallest input size the model takes that is >= a given size.
  align: the down-sampling factor (2 ** depth for a U-Net): two inputs whose origins differ by a multiple of it see
    the same max-pooling grid, so their outputs agree where they overlap.
  """

  margin: int = 0
  fit: Callable[[int], int] = lambda n: n
  align: int = 1

  def input_size_for_output(self, size: int) -> int:
    """The smallest model input whose output covers ``size`` pixels."""
    return self.fit(size + 2 * self.margin)

  def output_size(self, input_size: int) -> int:
    """The output side for an input side the model takes."""
    return input_size - 2 * self.margin


def _round_up(size: int, multiple: int) -> int:
  return -(-size // multiple) * multiple


def model_geometry(model: nn.Module, *, multiple: int = 1) -> Geometry:
  """The geometry of ``model``: its class's ``geometry(multiple)`` where it has one, else that of a same-padded model
  whose inputs are rounded up to ``multiple`` (fewer distinct shapes compile) and aligned to ``2 ** model.depth``."""
  if callable(rules := getattr(type(model), "geometry", None)):
    return rules(model, multiple)
  return same_padded(multiple, getattr(model, "depth", 0))


def same_padded(multiple: int, depth: int) -> Geometry:
  """A model that keeps its input size: inputs rounded up to ``multiple``, pooling grid ``2 ** depth``."""
  return Geometry(margin=0, fit=lambda n: _round_up(n, multiple), align=2**depth)


def eval_geometry(model: nn.Module, data_config: Any) -> Geometry:
  """The geometry for whole images: same-padded inputs rounded up to ``data.eval_size_multiple`` (default 1)."""
  return model_geometry(model, multiple=data_config.eval_size_multiple)
