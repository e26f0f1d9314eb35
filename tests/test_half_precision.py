"""``half_precision`` end to end: the tiny config trains with float16 (loss-scaled) and bfloat16 activations, saves a
float32 state, and its checkpoint predicts in the same half precision."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments.configs import tiny
from segjax.inference import load_predictor
from segjax.tiling import Tiling
from segjax.train import checkpoint
from segjax.train.loop import train_and_evaluate

STEPS = 3


def _config(tfds_dir: str, dtype: str | None) -> ml_collections.ConfigDict:
  config = tiny.get_config()
  config.data.tfds_data_dir = tfds_dir
  config.num_sample_images = config.num_test_images = 0
  config.num_train_steps = config.eval_every_steps = config.checkpoint_every_steps = STEPS
  config.log_every_steps = 1
  config.half_precision = dtype is not None
  config.half_precision_dtype = dtype or "bfloat16"
  return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tfds_dir):
  """Workdirs of the same run in float16 and in bfloat16 activations."""
  workdirs = {}
  for dtype in ("float16", "bfloat16"):
    workdirs[dtype] = str(tmp_path_factory.mktemp(dtype))
    # on one device: what half precision changes does not depend on the mesh, and one device compiles faster
    summary = train_and_evaluate(_config(tfds_dir, dtype), workdirs[dtype], devices=jax.devices()[:1])
    assert summary["steps"] == STEPS and 0.0 <= summary["validation"]["mean_iou"] <= 1.0
  return workdirs


def _train_records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["split"] == "train"]


def _raw_state(workdir):
  """The saved state as written, without a template: what a reader with no segjax code would find."""
  manager = checkpoint.create_manager(workdir, read_only=True)
  step = manager.latest_step()
  raw = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  manager.close()
  return step, raw


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_runs_save_float32_state_and_predict_in_half_precision(runs, dtype):
  workdir = runs[dtype]
  records = _train_records(workdir)
  assert [r["step"] for r in records] == list(range(1, STEPS + 1))
  assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in records)
  if dtype == "float16":  # dynamic loss scaling: the initial 2**15, no step skipped on this tiny run
    assert [(r["loss_scale"], r["skipped"]) for r in records] == [(2.0**15, 0.0)] * STEPS
  else:
    assert not any("loss_scale" in r or "skipped" in r for r in records)

  step, raw = _raw_state(workdir)
  assert step == STEPS and int(raw["step"]) == STEPS
  for part in ("params", "opt_state", "batch_stats"):
    floats = [x for x in jax.tree_util.tree_leaves(raw[part]) if np.issubdtype(np.asarray(x).dtype, np.floating)]
    assert floats and {np.asarray(x).dtype for x in floats} == {np.dtype(np.float32)}, part
  if dtype == "float16":
    assert float(raw["loss_scale"]["scale"]) == 2.0**15 and int(raw["loss_scale"]["good_steps"]) == STEPS
  else:
    assert raw.get("loss_scale") is None

  predictor = load_predictor(workdir)
  state = predictor.state
  assert predictor.step == STEPS
  assert {x.dtype for x in jax.tree_util.tree_leaves(state.params)} == {jnp.dtype(jnp.float32)}
  assert state.loss_scale is None and state.opt_state == ()  # prediction restores the model variables only
  # the restored weights are the saved ones, and the model computes in the run's dtype: its float32 logits are
  # values of that dtype (a float32 computation would give values between them)
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(state.params), raw["params"])
  image = (np.random.default_rng(0).random((64, 80, 1)) * 255).astype(np.uint8)
  logits = predictor.predict_logits(image, Tiling(mode="whole"))
  assert logits.dtype == np.float32 and np.isfinite(logits).all()
  # the same program in float32 differs by the dtype's rounding (bfloat16 keeps 8 significant bits, float16 11)
  float32_model = state.apply_fn.__self__.clone(dtype=jnp.float32)
  float32 = dataclasses.replace(predictor, state=state.replace(apply_fn=float32_model.apply))
  reference = float32.predict_logits(image, Tiling(mode="whole"))
  error, scale = np.abs(logits - reference).max(), np.abs(reference).max() * float(jnp.finfo(dtype).eps)
  assert scale / 4 < error < scale * 8, (error, scale)
  for tiling in (Tiling(mode="whole"), Tiling(mode="sliding_window", tile_size=32, overlap=0.5)):
    probabilities = predictor.predict(image, tiling)
    assert probabilities.shape == (64, 80, 2) and np.isfinite(probabilities).all()
    assert probabilities.min() >= 0.0
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-5)


def test_float16_gradients_are_unscaled_like_bfloat16_ones(runs):
  """The logged gradient norm is of the loss, not of the loss times the scale: the float16 and bfloat16 runs start
  from the same weights and data and differ only by rounding (2% on this run), far from a factor of 2**15."""
  first = {dtype: _train_records(workdir)[0]["grad_norm"] for dtype, workdir in runs.items()}
  assert first["float16"] == pytest.approx(first["bfloat16"], rel=0.1)
