"""The benchmark's FLOP count is the model's, whichever formulation the CPU runs."""

import jax
import jax.numpy as jnp
import optax

from segjax import benchmark
from segjax.losses import softmax_cross_entropy
from segjax.models import get_model
from segjax.train.state import create_train_state
from segjax.train.step import make_train_step


def _flops(lowered) -> float:
  analysis = lowered.cost_analysis()
  return float((analysis[0] if isinstance(analysis, list | tuple) else analysis)["flops"])


def test_model_flops_counts_the_weight_gradients_the_cpu_forms_scan_in_full():
  """XLA's cost analysis counts a loop body once: the FLOP count is taken on the model's XLA form, whose count is
  the CPU form's plus the scanned weight gradients' work."""
  batch = {"image": jnp.ones((2, 64, 64, 1)), "label": jnp.zeros((2, 64, 64), jnp.int32)}
  step = jax.jit(make_train_step(softmax_cross_entropy))
  counts = {}
  for kernels in ("cpu", "xla"):
    model = get_model("unet", num_classes=2, depth=1, base_width=4, kernels=kernels)
    state = create_train_state(jax.random.PRNGKey(0), model, optax.sgd(0.1), (1, 64, 64, 1))
    counts[kernels] = benchmark.model_flops(step, state, batch)
  assert counts["xla"] == _flops(step.lower(state, batch))
  # the 64-wide level's two 3x3 weight gradients alone are 2 * 9 * (1 * 4 + 4 * 4) * 2 * 64 * 64 FLOPs
  assert counts["xla"] - counts["cpu"] > 0.9 * 2 * 9 * (1 * 4 + 4 * 4) * 2 * 64 * 64


def test_holding_kernels_constant_drops_only_their_gradients():
  from experiments.benchmark import without_kernel_gradients

  model = get_model("unet", num_classes=2, depth=1, base_width=4)
  state = create_train_state(jax.random.PRNGKey(0), model, optax.sgd(0.1), (1, 16, 16, 1))
  image = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 1))

  def loss(params, apply_fn):
    logits, _ = apply_fn(
      {"params": params, "batch_stats": state.batch_stats}, image, train=True, mutable=["batch_stats"]
    )
    return jnp.sum(logits**2)

  value, grads = jax.value_and_grad(loss)(state.params, state.apply_fn)
  held, held_grads = jax.value_and_grad(loss)(state.params, without_kernel_gradients(state.apply_fn))
  assert held == value
  for (path, grad), held_grad in zip(
    jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(held_grads), strict=True
  ):
    if "kernel" in jax.tree_util.keystr(path):
      assert not jnp.any(held_grad) and jnp.any(grad)
    else:
      assert jnp.array_equal(held_grad, grad)
