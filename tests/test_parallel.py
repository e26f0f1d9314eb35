"""Data parallelism and precision on 4 fake CPU devices: jit-sharded, pmap and single-device steps agree; gradient
accumulation equals one large batch; EMA, float16 loss scaling and bfloat16 activations."""

import logging

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from segjax.data.augment import make_augment_fn
from segjax.errors import SegjaxError
from segjax.losses import softmax_cross_entropy
from segjax.models import get_model
from segjax.train import parallel
from segjax.train.distributed import in_cluster_job
from segjax.train.state import LossScale, create_train_state
from segjax.train.step import make_train_step, micro_batches

SIZE = 16
# Plain SGD (no momentum) in the equivalence tests: its update is -LR * gradient, so a wrong constant factor on the
# gradient (a psum for a pmean, a missing 1 / grad_accum_steps or 1 / loss_scale) changes the parameters. Adam's
# update is invariant to such a factor and would hide it.
LR = 0.1


def _batch(seed: int, n: int = 8):
  rng = np.random.default_rng(seed)
  label = np.zeros((n, SIZE, SIZE), np.int32)
  for i in range(n):
    y, x = rng.integers(1, SIZE - 7, 2)
    label[i, y : y + 6, x : x + 5] = 1
  image = (0.2 + 0.6 * label + 0.1 * rng.standard_normal(label.shape)).astype(np.float32)[..., None]
  return {"image": image, "label": label, "weights": np.ones(label.shape, np.float32)}


def _state(norm="batch", bn_axis_name=None, dtype=jnp.float32, tx=None, **kwargs):
  model = get_model("unet", num_classes=2, depth=2, base_width=4, norm=norm, bn_axis_name=bn_axis_name, dtype=dtype)
  tx = optax.adam(3e-3) if tx is None else tx
  return create_train_state(jax.random.PRNGKey(1), model, tx, (1, SIZE, SIZE, 1), **kwargs)


def _sgd_state(**kwargs):
  return _state(tx=optax.sgd(LR), **kwargs)


def _mean_cross_entropy_gradient(state, batch):
  """The gradient of the mean pixel cross-entropy of the whole batch, taken from the model alone (no train step)."""

  def loss(params):
    logits = state.apply_fn({"params": params}, batch["image"], train=True)
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    return -jnp.mean(jnp.take_along_axis(log_p, batch["label"][..., None], -1))

  return jax.grad(loss)(state.params)


def _first(tree):
  return jax.tree_util.tree_leaves(tree)[0]


def _augment():
  return make_augment_fn(ml_collections.ConfigDict({"ops": ["flip", "rot90"]}))


def _run(step, place, state, steps=3):
  """Trains ``steps`` steps on batches 0, 1, ...; returns the state and the logged loss and grad_norm per step."""
  logged = {"loss": [], "grad_norm": []}
  for s in range(steps):
    state, metrics = step(state, place(_batch(s)))
    for key, values in logged.items():
      values.append(float(metrics[key]))
  return state, logged


def test_jit_sharded_pmap_and_single_device_training_agree():
  assert jax.device_count() == 4
  step_fn = make_train_step(softmax_cross_entropy, _augment())
  single, single_logged = _run(jax.jit(step_fn), jax.device_put, _sgd_state())

  mesh = parallel.create_mesh()
  sharded_step, place = parallel.compile_train_step(step_fn, mesh, "jit")
  sharded, sharded_logged = _run(sharded_step, place, parallel.replicate(_sgd_state(), mesh))
  assert all(x.sharding.is_fully_replicated and len(x.devices()) == 4 for x in jax.tree_util.tree_leaves(sharded))

  pmap_fn = make_train_step(softmax_cross_entropy, _augment(), axis_name=parallel.DATA_AXIS)
  pmap_step, pmap_place = parallel.compile_train_step(pmap_fn, mesh, "pmap")
  pmapped, pmap_logged = _run(pmap_step, pmap_place, _sgd_state(bn_axis_name=parallel.DATA_AXIS))

  # the gradient (its logged norm and, through SGD, the parameters) is the global batch's mean, not a sum over devices
  for logged in (sharded_logged, pmap_logged):
    np.testing.assert_allclose(logged["loss"], single_logged["loss"], rtol=1e-5)
    np.testing.assert_allclose(logged["grad_norm"], single_logged["grad_norm"], rtol=1e-4)
  for other in (sharded, pmapped):
    chex.assert_trees_all_close(other.params, single.params, rtol=1e-4, atol=1e-6)
    chex.assert_trees_all_close(other.batch_stats, single.batch_stats, rtol=1e-4, atol=1e-6)
  assert int(sharded.step) == int(pmapped.step) == 3
  assert single_logged["loss"][0] != single_logged["loss"][1]  # the batches differ, so agreement is not trivial


def test_steps_compile_once_on_the_mesh():
  mesh = parallel.create_mesh()
  step, place = parallel.compile_train_step(make_train_step(softmax_cross_entropy, _augment()), mesh, "jit")
  _run(step, place, parallel.replicate(_state(), mesh), steps=4)
  assert step._cache_size() == 1


def test_the_training_loop_compiles_its_train_step_once(tmp_path, tfds_dir, caplog):
  from experiments.configs import tiny
  from segjax.train.loop import train_and_evaluate

  config = tiny.get_config()
  config.data.tfds_data_dir = tfds_dir
  config.num_train_steps, config.eval_every_steps, config.checkpoint_every_steps = 7, 3, 2
  with jax.log_compiles(True), caplog.at_level(logging.WARNING, logger="jax"):
    train_and_evaluate(config, str(tmp_path))
  compiles = [r.getMessage() for r in caplog.records if "train_step" in r.getMessage()]
  assert compiles and len([m for m in compiles if m.startswith("Compiling")]) == 1, compiles


def test_gradient_accumulation_equals_one_large_batch():
  # Without BatchNorm (which normalises each micro-batch on its own) k micro-batches give one batch's update.
  # With SGD a sum of the k micro-batch gradients in place of their mean would move the parameters k times as far.
  whole = jax.jit(make_train_step(softmax_cross_entropy, _augment()))
  accumulated = jax.jit(make_train_step(softmax_cross_entropy, _augment(), grad_accum_steps=4))
  a, logged_a = _run(whole, jax.device_put, _sgd_state(norm="none"), steps=2)
  b, logged_b = _run(accumulated, jax.device_put, _sgd_state(norm="none"), steps=2)
  np.testing.assert_allclose(logged_b["loss"], logged_a["loss"], rtol=1e-5)
  np.testing.assert_allclose(logged_b["grad_norm"], logged_a["grad_norm"], rtol=1e-4)
  chex.assert_trees_all_close(b.params, a.params, rtol=1e-4, atol=1e-6)
  # and sharded over the mesh: every device keeps its examples in each micro-batch
  mesh = parallel.create_mesh()
  step, place = parallel.compile_train_step(
    make_train_step(softmax_cross_entropy, _augment(), grad_accum_steps=2), mesh, "jit"
  )
  c, logged_c = _run(step, place, parallel.replicate(_sgd_state(norm="none"), mesh), steps=2)
  np.testing.assert_allclose(logged_c["grad_norm"], logged_a["grad_norm"], rtol=1e-4)
  chex.assert_trees_all_close(c.params, a.params, rtol=1e-4, atol=1e-6)
  # and against the gradient of the whole batch's mean loss taken here from the model (no augmentation): one
  # accumulated SGD step moves the parameters by -LR times it
  state, batch = _sgd_state(norm="none"), _batch(0)
  gradient = _mean_cross_entropy_gradient(state, batch)
  after, metrics = jax.jit(make_train_step(softmax_cross_entropy, grad_accum_steps=4))(state, batch)
  np.testing.assert_allclose(float(metrics["grad_norm"]), float(optax.global_norm(gradient)), rtol=1e-5)
  expected = jax.tree_util.tree_map(lambda p, g: np.asarray(p) - LR * np.asarray(g), state.params, gradient)
  chex.assert_trees_all_close(after.params, expected, rtol=1e-5, atol=1e-7)


def test_micro_batches_take_every_kth_example():
  batch = {"image": np.arange(8)[:, None]}
  split = micro_batches(batch, 4)["image"]
  assert split.shape == (4, 2, 1)
  assert split[:, :, 0].tolist() == [[0, 4], [1, 5], [2, 6], [3, 7]]


def _ema_recurrence(history, rates):
  """NumPy (float64) EMA of a sequence of trees: starts at ``history[0]``, then ``e = r e + (1 - r) x`` per step."""
  ema = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), history[0])
  for tree, rate in zip(history[1:], rates, strict=True):
    ema = jax.tree_util.tree_map(lambda e, x, r=rate: r * e + (1 - r) * np.asarray(x, np.float64), ema, tree)
  return ema


def _max_difference(a, b):
  """The largest absolute difference between the leaves of two trees of one structure."""
  pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in pairs)


def test_ema_follows_the_weights_and_is_what_evaluation_uses():
  # The rate of step s is min(decay, (1 + s) / (10 + s)). With decay 0.45 over 12 steps the ramp is the smaller one
  # at steps 0-6 (0.1 ... 0.4375) and the configured decay at steps 7-11 (the ramp is 0.47 ... 0.52 there), so both
  # an EMA that ignores ema_decay and one that ignores the ramp come out different.
  decay, steps = 0.45, 12
  ramp = [(1 + s) / (10 + s) for s in range(steps)]
  rates = [min(decay, r) for r in ramp]
  assert rates[:7] == ramp[:7] and rates[7:] == [decay] * 5
  step = jax.jit(make_train_step(softmax_cross_entropy, ema_decay=decay))
  state = _state(ema=True)
  tracked = lambda st: jax.device_get({"params": st.params, "batch_stats": st.batch_stats})  # noqa: E731
  history = [tracked(state)]
  for s in range(steps):
    state, _ = step(state, _batch(s))
    history.append(tracked(state))
  # the parameters and the BatchNorm running statistics are both averaged
  expected = _ema_recurrence(history, rates)
  chex.assert_trees_all_close(state.ema, expected, rtol=1e-5, atol=1e-7)
  # each wrong rate rule (the ramp alone, the decay alone) is far outside that tolerance
  for wrong in (ramp, [decay] * steps):
    assert _max_difference(_ema_recurrence(history, wrong), expected) > 1e-4
  for part in ("params", "batch_stats"):
    assert _max_difference(state.ema[part], history[-1][part]) > 1e-3  # the average is not the last value
  evaluated = state.for_eval()
  assert evaluated.params is state.ema["params"] and evaluated.batch_stats is state.ema["batch_stats"]


def test_float16_loss_scaling_skips_non_finite_steps_and_adapts_the_scale():
  # SGD with momentum: its update is linear in the gradient (a missing 1 / scale would show) and its momentum is
  # optimizer state that a skipped step must leave alone.
  sgd = optax.sgd(LR, momentum=0.9)
  step = jax.jit(make_train_step(softmax_cross_entropy))
  unscaled, unscaled_metrics = step(_state(dtype=jnp.float16, tx=sgd), _batch(0))
  initial = _state(dtype=jnp.float16, tx=sgd, loss_scale=LossScale.create(2.0**10, growth_interval=2))
  state, metrics = step(initial, _batch(0))
  assert float(metrics["skipped"]) == 0.0 and np.isfinite(float(metrics["loss"]))
  # The loss is multiplied by 2**10 and the gradients divided by it again: the logged gradient and the update are
  # those of the same float16 step without scaling (a power of two scales exactly, up to float16 underflow).
  np.testing.assert_allclose(float(metrics["grad_norm"]), float(unscaled_metrics["grad_norm"]), rtol=1e-3)
  chex.assert_trees_all_close(state.params, unscaled.params, rtol=1e-3, atol=1e-5)
  assert _max_difference(state.params, initial.params) > 1e-3  # and it did move them
  before = state
  bad = _batch(1)
  bad["image"][0, 0, 0, 0] = np.inf
  state, metrics = step(state, bad)
  assert float(metrics["skipped"]) == 1.0
  chex.assert_trees_all_equal(state.params, before.params)
  chex.assert_trees_all_equal(state.opt_state, before.opt_state)
  assert int(state.step) == 2 and float(state.loss_scale.scale) == 2.0**9
  for s in range(2):
    state, _ = step(state, _batch(2 + s))
  assert float(state.loss_scale.scale) == 2.0**10  # doubled after growth_interval good steps
  assert _first(state.params).dtype == jnp.float32


def test_bfloat16_activations_keep_float32_parameters_and_optimizer_state():
  state = _state(dtype=jnp.bfloat16)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  logits = np.asarray(state.apply_fn(variables, _batch(0)["image"], train=False), np.float32)
  full = np.asarray(_state().apply_fn(variables, _batch(0)["image"], train=False))
  # computed in bfloat16 (its values are bfloat16 numbers), close to but not the float32 result
  np.testing.assert_array_equal(logits, logits.astype(jnp.bfloat16).astype(np.float32))
  assert 0 < np.abs(logits - full).max() < 0.05
  state, metrics = jax.jit(make_train_step(softmax_cross_entropy))(state, _batch(0))
  assert metrics["loss"].dtype == jnp.float32 and np.isfinite(float(metrics["loss"]))
  assert {x.dtype for x in jax.tree_util.tree_leaves((state.params, state.opt_state[0].mu))} == {jnp.dtype("float32")}


def test_batch_sizes_that_do_not_split_are_clear_errors():
  mesh = parallel.create_mesh()
  with pytest.raises(SegjaxError, match="batch_size 6 .* 4 devices; make it a multiple of 4"):
    parallel.check_batch_size(6, mesh)
  from experiments.configs import tiny
  from segjax.train.loop import check_divisible, validate_config

  config = tiny.get_config()
  config.grad_accum_steps = 2
  with pytest.raises(SegjaxError, match="1 examples per device, which do not split into grad_accum_steps=2"):
    check_divisible(config, mesh)
  config.parallelism = "tpu_magic"
  with pytest.raises(SegjaxError, match="unknown parallelism 'tpu_magic' .*jit, pmap"):
    validate_config(config)


def test_cluster_jobs_are_recognised_from_their_environment():
  assert not in_cluster_job({})
  assert not in_cluster_job({"SLURM_NTASKS": "1", "TPU_WORKER_HOSTNAMES": "localhost"})
  assert in_cluster_job({"SLURM_NTASKS": "4"})
  assert in_cluster_job({"OMPI_COMM_WORLD_SIZE": "2"})
  assert in_cluster_job({"TPU_WORKER_HOSTNAMES": "t1k-0,t1k-1"})
  assert in_cluster_job({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
