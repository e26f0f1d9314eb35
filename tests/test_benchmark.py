"""The benchmark's FLOP count is the model's, whichever formulation the CPU runs."""

import jax
import jax.numpy as jnp
import optax

from segjax import benchmark
from segjax.losses import softmax_cross_entropy
from segjax.models import get_model, layers
from segjax.train.state import create_train_state
from segjax.train.step import make_train_step


def _flops(lowered) -> float:
  analysis = lowered.cost_analysis()
  return float((analysis[0] if isinstance(analysis, list | tuple) else analysis)["flops"])


def test_model_flops_counts_the_scanned_weight_gradient_in_full(monkeypatch):
  model = get_model("unet", num_classes=2, depth=1, base_width=4)
  state = create_train_state(jax.random.PRNGKey(0), model, optax.sgd(0.1), (1, 64, 64, 1))
  batch = {"image": jnp.ones((2, 64, 64, 1)), "label": jnp.zeros((2, 64, 64), jnp.int32)}
  make = lambda: jax.jit(make_train_step(softmax_cross_entropy))  # noqa: E731
  monkeypatch.setattr(layers, "CONV3X3_BLOCKED_WEIGHT_GRADIENT", True)
  scanned = _flops(make().lower(state, batch))  # XLA counts each loop body once
  counted = benchmark.model_flops(make, state, batch)
  assert layers.CONV3X3_BLOCKED_WEIGHT_GRADIENT is True and layers.BANDED_POINTWISE_MIN_PIXELS == 4096  # restored
  monkeypatch.setattr(layers, "CONV3X3_BLOCKED_WEIGHT_GRADIENT", False)
  monkeypatch.setattr(layers, "BANDED_POINTWISE_MIN_PIXELS", 10**12)  # the U-Net's last layer is a 1x1 convolution
  assert counted == _flops(make().lower(state, batch))
  # the 64-wide level's two 3x3 weight gradients alone are 2 * 9 * (1 * 4 + 4 * 4) * 2 * 64 * 64 FLOPs
  assert counted - scanned > 0.9 * 2 * 9 * (1 * 4 + 4 * 4) * 2 * 64 * 64
