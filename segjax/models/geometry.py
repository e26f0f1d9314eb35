"""How a model's output size relates to its input size, for choosing training tiles and padding whole images.

Same-padded models (``unet``, ``resunet``, the ResNet-encoder U-Nets) keep the input size; the unpadded U-Net of the
paper (``unet_valid``) loses a fixed ``margin`` at each border and takes only certain sizes.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn

from segjax.models import unet


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
  """The geometry of ``model``; same-padded inputs are rounded up to ``multiple`` (fewer distinct shapes compile).

  For the unpadded U-Net of depth d, output = input - 2 * margin with margin = (smallest valid input - its output)/2
  (92 for d = 4: 572 -> 388) for every valid input; inputs are rounded up to the next valid size.
  """
  if isinstance(model, unet.UNetValid):
    depth = model.depth
    smallest = unet.smallest_valid_input_size(depth)
    margin = (smallest - unet.valid_output_size(smallest, depth)) // 2
    return Geometry(margin=margin, fit=lambda n: unet.next_valid_input_size(n, depth), align=2**depth)
  return Geometry(margin=0, fit=lambda n: _round_up(n, multiple), align=2 ** getattr(model, "depth", 0))


def eval_geometry(model: nn.Module, data_config: Any) -> Geometry:
  """The geometry for whole images: same-padded inputs rounded up to ``data.eval_size_multiple`` (default 1)."""
  return model_geometry(model, multiple=data_config.get("eval_size_multiple", 1))
