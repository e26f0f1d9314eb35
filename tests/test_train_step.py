"""The pure train/eval steps, the train state and checkpoint round trips."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from segjax.config import base_config
from segjax.data.augment import make_augment_fn
from segjax.errors import SegjaxError
from segjax.losses import softmax_cross_entropy
from segjax.models import get_model
from segjax.train import checkpoint
from segjax.train.optim import create_optimizer, create_schedule
from segjax.train.state import create_train_state
from segjax.train.step import make_eval_step, make_train_step


def _batch(seed: int = 0, n: int = 4, size: int = 16):
  rng = np.random.default_rng(seed)
  label = np.zeros((n, size, size), np.int32)
  for i in range(n):
    y, x = rng.integers(2, size - 8, 2)
    label[i, y : y + 6, x : x + 6] = 1
  image = (0.2 + 0.6 * label + 0.05 * rng.standard_normal(label.shape)).astype(np.float32)[..., None]
  return {"image": jnp.asarray(image), "label": jnp.asarray(label)}


def _state(norm: str = "batch", lr: float = 1e-2):
  model = get_model("unet", num_classes=2, depth=2, base_width=4, norm=norm)
  return create_train_state(jax.random.PRNGKey(0), model, optax.adam(lr), (1, 16, 16, 1))


def test_state_holds_params_batch_stats_opt_state_step_rng():
  state = _state()
  assert int(state.step) == 0
  assert jax.tree_util.tree_leaves(state.batch_stats)
  assert state.rng.shape == (2,) and state.rng.dtype == jnp.uint32
  assert jax.tree_util.tree_structure(state.opt_state) == jax.tree_util.tree_structure(
    optax.adam(1.0).init(state.params)
  )


@pytest.mark.parametrize("norm", ["batch", "none"])
def test_train_step_lowers_loss_on_fixed_batch(norm):
  batch = _batch()
  state = _state(norm, lr=3e-2)
  step = jax.jit(make_train_step(softmax_cross_entropy), donate_argnums=0)
  losses = []
  for _ in range(40):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert int(state.step) == 40
  assert losses[-1] < 0.6 * losses[0], losses
  assert losses[-1] < min(losses[:10]), losses
  assert step._cache_size() == 1  # compiled once


def test_train_step_updates_batch_stats_and_is_deterministic():
  batch = _batch()
  step = jax.jit(make_train_step(softmax_cross_entropy, make_augment_fn(ml_collections.ConfigDict({"ops": ["flip"]}))))
  s0 = _state()
  s1, _ = step(s0, batch)
  s1_again, _ = step(s0, batch)
  changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), s0.batch_stats, s1.batch_stats)
  assert all(jax.tree_util.tree_leaves(changed))
  jax.tree_util.tree_map(np.testing.assert_array_equal, s1.params, s1_again.params)


def test_eval_step_sums_match_direct_computation_and_ignore_padding():
  state = _state()
  batch = _batch(1)
  weights = jnp.ones(batch["label"].shape).at[2:].set(0.0)
  eval_step = jax.jit(make_eval_step(softmax_cross_entropy, 2))
  out = eval_step(state, {**batch, "weights": weights})
  logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, batch["image"], train=False)
  pred = np.asarray(jnp.argmax(logits, -1))[:2]
  label = np.asarray(batch["label"])[:2]
  assert int(out["confusion"].sum()) == label.size
  assert int(out["confusion"][1, 1]) == int(np.sum((pred == 1) & (label == 1)))
  expected_loss = softmax_cross_entropy(logits[:2], batch["label"][:2])
  np.testing.assert_allclose(out["loss_sum"] / out["weight_sum"], expected_loss, rtol=1e-5)


def _warmup_cosine_closed_form(step: int, peak: float, end: float, warmup: int, total: int) -> float:
  """Linear warmup from 0 to ``peak`` over ``warmup`` steps, then half a cosine from ``peak`` down to ``end`` at step
  ``total`` (and ``end`` after it)."""
  if step < warmup:
    return peak * step / warmup
  progress = min(step - warmup, total - warmup) / (total - warmup)
  return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * progress))


def _optimizer(**settings) -> ml_collections.ConfigDict:
  """The base config's optimizer section with ``settings``."""
  config = base_config().optimizer
  config.update(settings)
  return config


def test_schedule_and_optimizer_from_config():
  peak, warmup, total = 1e-3, 6, 30
  config = _optimizer(
    name="sgd",
    momentum=0.0,
    nesterov=False,
    learning_rate=peak,
    schedule="warmup_cosine",
    warmup_steps=warmup,
    end_learning_rate_factor=0.1,
    grad_clip_norm=None,
  )
  schedule = create_schedule(config, total)
  # every step, and a few past the end (where it stays at the end value): a linear decay or a cosine over the whole
  # run (warmup included) would not match
  steps = range(total + 4)
  expected = [_warmup_cosine_closed_form(s, peak, 0.1 * peak, warmup, total) for s in steps]
  np.testing.assert_allclose([float(schedule(s)) for s in steps], expected, rtol=1e-5, atol=1e-10)
  assert float(schedule(0)) == 0.0 and float(schedule(warmup)) == pytest.approx(peak, rel=1e-6)
  # the optimizer follows it: plain SGD's update at step s is -schedule(s) * gradient
  tx = create_optimizer(config, total)
  params = jnp.zeros(3)
  opt_state = tx.init(params)
  gradient = jnp.asarray([1.0, -2.0, 0.5])
  for s in steps:
    updates, opt_state = tx.update(gradient, opt_state, params)
    np.testing.assert_allclose(updates, -expected[s] * np.asarray(gradient), rtol=1e-5, atol=1e-12)
  with pytest.raises(SegjaxError, match="unknown optimizer 'adan' \\(config key optimizer.name\\)"):
    create_optimizer(ml_collections.ConfigDict({**config.to_dict(), "name": "adan"}), 100)


def test_grad_clip_norm_rescales_the_global_gradient_norm_before_the_optimizer():
  lr, clip = 0.1, 1.0
  config = _optimizer(
    name="sgd", momentum=0.0, nesterov=False, learning_rate=lr, schedule="constant", grad_clip_norm=clip
  )
  tx = create_optimizer(config, 10)
  params = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
  opt_state = tx.init(params)
  base = {"a": np.array([1.0, -2.0, 2.0]), "b": np.full((2, 2), 0.5)}  # global norm sqrt(10), each leaf's below it
  for factor in (0.2, 5.0):  # norms 0.63 (left alone) and 15.8 (clipped to 1)
    gradient = {k: factor * v for k, v in base.items()}
    norm = np.sqrt(sum(np.sum(v**2) for v in gradient.values()))
    assert (norm < clip) == (factor < 1)
    updates, opt_state = tx.update(jax.tree_util.tree_map(jnp.asarray, gradient), opt_state, params)
    for key, g in gradient.items():
      np.testing.assert_allclose(updates[key], -lr * g * min(1.0, clip / norm), rtol=1e-6)


def test_batch_norm_running_statistics_follow_the_momentum_formula_through_the_train_step():
  # Each BatchNorm's running statistics after a train step are momentum * old + (1 - momentum) * the batch's, with
  # momentum 0.9 (PyTorch's 0.1 on the new value) and the batch's mean and biased variance of the BatchNorm input
  # over (N, H, W). The input of each norm is its conv's output, captured here from the model itself.
  momentum = 0.9
  step = jax.jit(make_train_step(softmax_cross_entropy))
  state = _state()

  @jax.jit
  def conv_outputs(variables, images):
    _, captured = state.apply_fn(
      variables,
      images,
      train=True,
      mutable=["batch_stats", "intermediates"],
      capture_intermediates=lambda module, method: module.name == "conv" and method == "__call__",
    )
    return captured["intermediates"]

  for seed in range(2):  # the second step starts from running statistics that are no longer the initial 0 and 1
    batch = _batch(seed)
    inputs = conv_outputs({"params": state.params, "batch_stats": state.batch_stats}, batch["image"])
    old = jax.device_get(state.batch_stats)
    state, _ = step(state, batch)
    new = jax.device_get(state.batch_stats)
    checked = 0
    for block, convs in old.items():
      for conv_name, stats in convs.items():
        x = np.asarray(inputs[block][conv_name]["conv"]["__call__"][0], np.float64)
        batch_mean, batch_var = x.mean((0, 1, 2)), x.var((0, 1, 2))
        running = new[block][conv_name]["norm"]
        np.testing.assert_allclose(
          running["mean"], momentum * stats["norm"]["mean"] + (1 - momentum) * batch_mean, rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(
          running["var"], momentum * stats["norm"]["var"] + (1 - momentum) * batch_var, rtol=1e-5, atol=1e-6
        )
        checked += 1
    assert checked == 10  # every BatchNorm of the depth-2 U-Net


@pytest.mark.parametrize("warmup", [0, 10])
def test_polynomial_schedule_is_nnunet_poly_decay(warmup):
  config = _optimizer(
    name="sgd", learning_rate=0.01, schedule="polynomial", warmup_steps=warmup, end_learning_rate_factor=0.0
  )
  schedule = create_schedule(config, 110)
  for step in (0, 37, 80, 110):
    if step < warmup:
      expected = 0.01 * step / warmup
    else:
      expected = 0.01 * (1 - (step - warmup) / (110 - warmup)) ** 0.9
    np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-5, atol=1e-9)


def test_checkpoint_round_trip_restores_state_and_config(tmp_path):
  step = jax.jit(make_train_step(softmax_cross_entropy))
  state, _ = step(_state(), _batch())
  config = ml_collections.ConfigDict({"model": {"name": "unet"}, "seed": 3, "dataset_info": {"num_classes": 2}})
  manager = checkpoint.create_manager(str(tmp_path))
  checkpoint.save(manager, state, config)
  manager.wait_until_finished()
  restored = checkpoint.restore_state(manager, _state())
  manager.close()
  assert int(restored.step) == 1
  for a, b in (
    (state.params, restored.params),
    (state.batch_stats, restored.batch_stats),
    (state.opt_state, restored.opt_state),
  ):
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
  np.testing.assert_array_equal(state.rng, restored.rng)
  loaded, loaded_step = checkpoint.restore_config(str(tmp_path))
  assert loaded_step == 1 and loaded.seed == 3 and loaded.model.name == "unet"


def test_restore_config_without_checkpoint_says_train_first(tmp_path):
  with pytest.raises(SegjaxError, match="no checkpoint in .*train first"):
    checkpoint.restore_config(str(tmp_path))


def test_metrics_include_finite_grad_and_param_norms():
  _, metrics = jax.jit(make_train_step(softmax_cross_entropy))(_state(), _batch())
  assert float(metrics["grad_norm"]) > 0 and np.isfinite(float(metrics["grad_norm"]))
  assert float(metrics["param_norm"]) > 0 and np.isfinite(float(metrics["param_norm"]))


def test_valid_unet_trains_on_centre_cropped_labels():
  from segjax.models.unet import valid_output_size

  model = get_model("unet_valid", num_classes=2, depth=1, base_width=4)
  size = 20
  out = valid_output_size(size, depth=1)
  state = create_train_state(jax.random.PRNGKey(0), model, optax.adam(1e-2), (1, size, size, 1))
  batch = _batch(n=2, size=size)
  step = jax.jit(make_train_step(softmax_cross_entropy))
  losses = []
  for _ in range(15):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0]
  ev = jax.jit(make_eval_step(softmax_cross_entropy, 2))(state, batch)
  assert int(ev["confusion"].sum()) == 2 * out * out


def test_deep_supervision_unet_trains_through_the_step():
  model = get_model("unet", num_classes=2, depth=2, base_width=4, deep_supervision=True)
  state = create_train_state(jax.random.PRNGKey(0), model, optax.adam(3e-2), (1, 16, 16, 1))
  step = jax.jit(make_train_step(softmax_cross_entropy))
  losses = []
  for _ in range(20):
    state, metrics = step(state, _batch())
    losses.append(float(metrics["loss"]))
  assert losses[-1] < 0.7 * losses[0], losses
