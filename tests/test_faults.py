"""Preemption and faults: SIGKILL and SIGTERM mid-run lose nothing, damaged checkpoints are set aside, checkpoints
restore onto other device counts, the best checkpoint is kept, and two processes train like one."""

import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from experiments.configs import tiny
from segjax.train import checkpoint
from segjax.train.loop import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(tfds_dir, **overrides):
  config = tiny.get_config()
  config.data.tfds_data_dir = tfds_dir
  config.num_sample_images = config.num_test_images = 0
  for key, value in overrides.items():
    setattr(config, key, value)
  return config


def _final_state(workdir, like=None):
  """The raw saved state dict (numpy leaves) of a workdir's latest checkpoint; ``like``: a numpy tree of its
  structure, needed for a checkpoint written by devices this process does not have."""
  import orbax.checkpoint as ocp

  manager = checkpoint.create_manager(workdir, read_only=True)
  restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore(like)))[
    "state"
  ]
  manager.close()
  return jax.tree_util.tree_map(np.asarray, restored)


def _train_command(workdir, tfds_dir, *flags):
  """``experiments.train`` on the tiny config, without sample pictures, plus ``flags``."""
  return [
    sys.executable,
    "-m",
    "experiments.train",
    "--config=experiments/configs/tiny.py",
    f"--workdir={workdir}",
    f"--config.data.tfds_data_dir={tfds_dir}",
    "--config.num_sample_images=0",
    "--config.num_test_images=0",
    *flags,
  ]


def _long_run(workdir, tfds_dir, steps):
  """A run long enough to be interrupted, logging every step and checkpointing every 3."""
  flags = ("--config.checkpoint_every_steps=3", "--config.log_every_steps=1", f"--config.eval_every_steps={steps}")
  return _train_command(workdir, tfds_dir, f"--config.num_train_steps={steps}", *flags)


def _logged_step(workdir) -> int:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    steps = [json.loads(line)["step"] for line in f if line.strip().endswith("}")]
  return max(steps, default=0)


def _start_and_signal(command, workdir, at_step, sig):
  """Starts a training process, sends ``sig`` once it has logged ``at_step``; returns (returncode, output)."""
  with open(f"{workdir}.log", "w+") as log:  # a file, not a pipe: the process never blocks on its output
    process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while process.poll() is None and _logged_step(workdir) < at_step and time.time() < deadline:
      time.sleep(0.02)
    process.send_signal(sig)
    process.wait(timeout=300)
    log.seek(0)
    return process.returncode, log.read()


def test_sigkill_and_sigterm_mid_run_then_resume_give_bitwise_the_uninterrupted_result(tmp_path, tfds_dir):
  steps = 36
  reference = str(tmp_path / "reference")
  config = _config(tfds_dir, num_train_steps=steps, checkpoint_every_steps=3, log_every_steps=1, eval_every_steps=steps)
  train_and_evaluate(config, reference)

  workdir = str(tmp_path / "interrupted")
  code, output = _start_and_signal(_long_run(workdir, tfds_dir, steps), workdir, 7, signal.SIGKILL)
  assert code == -signal.SIGKILL, output[-2000:]  # killed mid-run, not finished
  killed_at = _logged_step(workdir)
  assert 7 <= killed_at < steps

  code, output = _start_and_signal(_long_run(workdir, tfds_dir, steps), workdir, killed_at + 6, signal.SIGTERM)
  assert code == 0, output[-2000:]
  match = [line for line in output.splitlines() if "after SIGTERM" in line]
  assert match, output[-2000:]
  stopped_at = int(match[0].split("stopped at step ")[1].split()[0])
  assert killed_at < stopped_at < steps
  assert checkpoint.create_manager(workdir, read_only=True).latest_step() == stopped_at  # saved where it stopped

  result = subprocess.run(_long_run(workdir, tfds_dir, steps), cwd=ROOT, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-2000:]
  assert f"resuming from step {stopped_at}" in result.stdout
  chex.assert_trees_all_equal(_final_state(workdir), _final_state(reference))  # bitwise


def test_damaged_and_half_written_checkpoints_are_set_aside_with_a_warning(tmp_path, tfds_dir, capsys):
  workdir = str(tmp_path)
  train_and_evaluate(_config(tfds_dir, num_train_steps=6), workdir)  # checkpoints at 3 and 6
  directory = checkpoint.checkpoint_dir(workdir)
  # step 6: a data file of the state cut to nothing; step 9: a step directory with nothing in it
  data_files = [os.path.join(d, f) for d, _, files in os.walk(os.path.join(directory, "6", "state")) for f in files]
  biggest = max(data_files, key=os.path.getsize)
  open(biggest, "w").close()
  os.makedirs(os.path.join(directory, "9"))
  summary = train_and_evaluate(_config(tfds_dir, num_train_steps=9), workdir)
  err = capsys.readouterr().err
  assert "checkpoint at step 9 is damaged" in err and "checkpoint at step 6 is damaged" in err
  assert summary["steps"] == 9 and summary["trained_steps_this_run"] == 6  # resumed from step 3
  # the damaged ones kept for inspection under another name; 6 and 9 written again by the resumed run
  assert sorted(os.listdir(directory)) == ["3", "6", "6.damaged", "9", "9.damaged"]


def test_a_checkpoint_saved_on_4_devices_resumes_on_1_and_on_2(tmp_path, tfds_dir):
  reference, saved_on_4 = str(tmp_path / "reference"), str(tmp_path / "saved_on_4")
  train_and_evaluate(_config(tfds_dir, num_train_steps=6), reference)  # on all 4 devices
  config = _config(tfds_dir, num_train_steps=3)
  train_and_evaluate(config, saved_on_4)
  saved = _final_state(saved_on_4)
  for count in (1, 2):
    workdir = str(tmp_path / f"resumed_on_{count}")
    shutil.copytree(saved_on_4, workdir)
    _resume_on(count, workdir, reference, config, saved, tfds_dir)


def _resume_on(count, workdir, reference, config, saved, tfds_dir):
  from segjax.models import create_model
  from segjax.train import parallel
  from segjax.train.optim import create_optimizer
  from segjax.train.state import create_train_state

  # restored exactly, replicated on the smaller mesh
  mesh = parallel.create_mesh(jax.devices()[:count])
  model = create_model(config.model, 2)
  template = create_train_state(jax.random.PRNGKey(9), model, create_optimizer(config.optimizer, 3), (1, 64, 64, 1))
  manager = checkpoint.create_manager(workdir)
  state, data_state = checkpoint.restore_latest(manager, parallel.replicate(template, mesh), config)
  manager.close()
  assert data_state["next_step"] == 3
  leaves = jax.tree_util.tree_leaves(state)
  assert all(set(x.devices()) == set(jax.devices()[:count]) for x in leaves)
  chex.assert_trees_all_equal(jax.tree_util.tree_map(np.asarray, state.params), saved["params"])

  # and training goes on there: close to the run that stayed on 4 devices (float32 sums differ in order)
  summary = train_and_evaluate(_config(tfds_dir, num_train_steps=6), workdir, devices=jax.devices()[:count])
  assert summary["trained_steps_this_run"] == 3
  chex.assert_trees_all_close(_final_state(workdir)["params"], _final_state(reference)["params"], atol=2e-4)


def test_the_best_checkpoint_is_kept_besides_the_newest(tmp_path, tfds_dir):
  workdir = str(tmp_path)
  config = _config(
    tfds_dir,
    num_train_steps=8,
    eval_every_steps=1,
    checkpoint_every_steps=1,
    max_checkpoints_to_keep=1,
    checkpoint_best_metric="loss",
    checkpoint_best_mode="min",
  )
  train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    losses = {r["step"]: r["loss"] for r in map(json.loads, f) if r["split"] == "validation"}
  best = min(losses, key=losses.get)
  kept = checkpoint.create_manager(workdir, read_only=True).all_steps()
  assert sorted(kept) == sorted({best, 8})
  assert checkpoint.best_step(workdir, "loss", "min") == best


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _tree_layout(tree):
  leaves = jax.tree_util.tree_leaves(tree)
  return jax.tree_util.tree_structure(tree), [(np.shape(x), np.asarray(x).dtype) for x in leaves]


def _logged(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [(r["split"], r["step"]) for r in map(json.loads, f)]


def _saved_config(workdir, step):
  config = checkpoint.restore_config(workdir, step)[0].to_dict()
  config["data"].pop("tfds_data_dir")  # the one thing the two runs are told differently
  return config


def _assert_each_example_read_and_scored_once(one, parts, *, steps):
  """``one``: the record (tests/multihost_probe.py) of a one-process run; ``parts``: its processes' of a two-process
  run of the same config."""
  # Exact: every step's global batch is read once, half by each process, in the one process's row order (the
  # processes read disjoint rows whose union is that batch) -- from data process 0 prepared while process 1 waited.
  assert all(len(part["train"]) >= steps for part in (one, *parts))  # the prefetcher may read ahead
  for step in range(steps):
    whole = one["train"][step]
    assert whole["image"].shape[0] == 4 and len({row.tobytes() for row in whole["image"]}) == 4
    for key in whole:
      assert [part["train"][step][key].shape[0] for part in parts] == [2, 2], key
      np.testing.assert_array_equal(np.concatenate([part["train"][step][key] for part in parts]), whole[key])

  # Exact: each evaluation (validation at steps 3 and 6, then test) scores every image of its split once over the
  # processes, and the confusion counts summed over them count each weighted pixel once (not once per process).
  assert len(one["evaluations"]) == len(parts[0]["evaluations"]) == len(parts[1]["evaluations"]) == 3
  for i, whole in enumerate(one["evaluations"]):
    by_process = [part["evaluations"][i] for part in parts]
    assert [len(e["images"]) for e in by_process] == [4, 4] and len(whole["images"]) == 8  # 8 images a split
    assert not {d for d, _, _ in by_process[0]["images"]} & {d for d, _, _ in by_process[1]["images"]}
    assert sorted(by_process[0]["images"] + by_process[1]["images"]) == sorted(whole["images"])
    pixels = sum(weight for _, _, weight in whole["images"])
    assert whole["confusion"].sum() == pixels
    for e in by_process:
      assert e["confusion"].sum() == pixels  # every process summarises the same totals
      np.testing.assert_array_equal(e["confusion"], by_process[0]["confusion"])
      # the predictions can differ only at the few pixels whose logits tie to within the states' float32 difference
      assert np.abs(e["confusion"] - whole["confusion"]).max() <= 1e-3 * pixels


def test_two_processes_with_two_devices_each_train_like_one_process_with_four(tmp_path, tfds_dir, monkeypatch):
  from tests.multihost_probe import record_reads

  reference = str(tmp_path / "reference")
  one = record_reads(monkeypatch.setattr)
  train_and_evaluate(_config(tfds_dir), reference)  # one process, 4 devices
  monkeypatch.undo()

  workdir = str(tmp_path / "multihost")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
  # if the job hangs, the test aborts it and Python's fault handler prints every thread's stack into the logs
  env["PYTHONFAULTHANDLER"] = "1"
  port = _free_port()
  # a TFDS dir not prepared yet: process 0 prepares the data while process 1 waits for it
  fresh_tfds = str(tmp_path / "tfds")
  reads = str(tmp_path / "reads")
  command = [
    *_train_command(workdir, fresh_tfds, f"--coordinator_address=localhost:{port}", "--num_processes=2"),
    f"--reads={reads}",
  ]
  command[2] = "tests.multihost_probe"  # experiments.train, recording what each process reads
  logs = [open(tmp_path / f"process_{i}.log", "w+") for i in range(2)]  # files, not pipes: no process blocks on output
  processes = [
    subprocess.Popen([*command, f"--process_id={i}"], cwd=ROOT, env=env, stdout=logs[i], stderr=subprocess.STDOUT)
    for i in range(2)
  ]
  deadline = time.monotonic() + 300
  try:
    for p in processes:
      p.wait(timeout=max(1.0, deadline - time.monotonic()))
  except subprocess.TimeoutExpired:
    for p in processes:
      if p.poll() is None:
        p.send_signal(signal.SIGABRT)  # the fault handler dumps the stacks, then the process dies
    for p in processes:
      try:
        p.wait(timeout=30)
      except subprocess.TimeoutExpired:
        p.kill()
  outputs = [(log.seek(0), log.read(), log.close())[1] for log in logs]
  for p, out in zip(processes, outputs, strict=True):
    assert p.returncode == 0, out[-6000:]
  assert "2 processes" in outputs[0] and "4 devices" in outputs[0]
  assert "segjax:" in outputs[0] and "segjax:" not in outputs[1]  # only process 0 prints the summary
  # process 0 alone prepared the data
  assert "preparing synthetic_cells" in outputs[0] and "preparing synthetic_cells" not in outputs[1]
  parts = []
  for i in range(2):
    with open(f"{reads}.{i}.pkl", "rb") as f:
      parts.append(pickle.load(f))

  steps = _config(tfds_dir).num_train_steps
  _assert_each_example_read_and_scored_once(one, parts, steps=steps)

  # Exact: the step count, what was logged (once, by process 0) and the checkpoints' layout and contents
  assert _logged(workdir) == _logged(reference)
  with open(os.path.join(workdir, "summary.json")) as f, open(os.path.join(reference, "summary.json")) as g:
    ours, theirs = json.load(f), json.load(g)
  assert ours["steps"] == theirs["steps"] == steps and ours["trained_steps_this_run"] == steps
  directories = [checkpoint.checkpoint_dir(w) for w in (workdir, reference)]
  assert sorted(os.listdir(directories[0])) == sorted(os.listdir(directories[1])) == ["3", "6"]
  for step in ("3", "6"):
    items = [sorted(set(os.listdir(os.path.join(d, step))) & set(checkpoint.ITEMS)) for d in directories]
    assert items[0] == items[1] == sorted(checkpoint.ITEMS)
    assert _saved_config(workdir, int(step)) == _saved_config(reference, int(step))
    managers = [checkpoint.create_manager(w, read_only=True) for w in (workdir, reference)]
    data_states = [checkpoint.restore_data_state(m, int(step)) for m in managers]
    assert data_states[0] == data_states[1] and data_states[0]["next_step"] == int(step)
    for m in managers:
      m.close()
  expected = _final_state(reference)
  restored = _final_state(workdir, like=expected)
  assert _tree_layout(restored) == _tree_layout(expected)
  np.testing.assert_array_equal(restored["step"], steps)
  np.testing.assert_array_equal(restored["rng"], expected["rng"])

  # Close: the float32 state. The cross-process all-reduce (gloo) adds in another order than one process's devices,
  # so sums differ by float32 rounding (relative 1e-7 each) and six Adam steps carry that on: Adam divides by the
  # root of the second moment, so a relative error of a gradient entry becomes about as large an error of the update,
  # amplified where a moment is near zero (on the development CPU in Dec 2026, also for the code of 4791dec: 5e-6 on
  # batch-stat means near 0.1, 1e-5 on a first moment of 3e-4). A wrong sharding, a missed row or an unsynchronised
  # gradient differs by orders of magnitude more.
  chex.assert_trees_all_close(restored, expected, rtol=1e-3, atol=1e-4)
  assert ours["validation"]["loss"] == pytest.approx(theirs["validation"]["loss"], rel=1e-4)
  shutil.rmtree(workdir)


def _save_raw(workdir, state_dict, config):
  import orbax.checkpoint as ocp

  manager = checkpoint.create_manager(workdir)
  manager.save(
    int(state_dict["step"]),
    args=ocp.args.Composite(state=ocp.args.StandardSave(state_dict), config=ocp.args.JsonSave(config.to_dict())),
  )
  manager.wait_until_finished()
  return manager


def test_checkpoints_of_older_layouts_restore_and_foreign_layouts_are_refused_not_set_aside(tmp_path):
  import optax
  from flax import serialization

  from segjax.errors import SegjaxError
  from segjax.models import get_model
  from segjax.train.state import create_train_state

  model = get_model("unet", num_classes=2, depth=2, base_width=4)
  state = create_train_state(jax.random.PRNGKey(0), model, optax.adam(1e-3), (1, 16, 16, 1))
  state = state.replace(step=state.step + 5, params=jax.tree_util.tree_map(lambda x: x + 1.0, state.params))
  config = tiny.get_config()
  # written before the state had its optional ema and loss_scale entries
  older = {k: v for k, v in serialization.to_state_dict(state).items() if k not in ("ema", "loss_scale")}
  manager = _save_raw(str(tmp_path / "older"), older, config)
  template = create_train_state(jax.random.PRNGKey(1), model, optax.adam(1e-3), (1, 16, 16, 1))
  restored, _ = checkpoint.restore_latest(manager, template, config)
  assert int(restored.step) == 5 and restored.ema is None
  chex.assert_trees_all_equal(restored.params, state.params)
  # a layout this code does not build (an unknown entry), with the same config: refused, and left where it is
  foreign = {**serialization.to_state_dict(state), "extra": np.zeros(3, np.float32)}
  manager = _save_raw(str(tmp_path / "foreign"), foreign, config)
  with pytest.raises(SegjaxError, match="holds a state of another layout"):
    checkpoint.restore_latest(manager, template, config)
  assert os.listdir(checkpoint.checkpoint_dir(str(tmp_path / "foreign"))) == ["5"]


def test_a_workdir_that_cannot_be_written_is_named_before_anything_starts(tmp_path):
  from segjax.errors import SegjaxError
  from segjax.train.loop import check_workdir

  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  with pytest.raises(SegjaxError, match=r"workdir '.*a_file/run' is not writable .*pass a writable --workdir"):
    check_workdir(str(blocker / "run"))


def test_the_processes_of_a_job_check_one_workdir_at_once_without_tripping_over_each_other(tmp_path):
  """Every process of a multi-host job checks the shared workdir at start-up: none may fail on another's probe."""
  import concurrent.futures

  from segjax.train.loop import check_workdir

  workdir = str(tmp_path / "shared")
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    results = list(pool.map(lambda _: check_workdir(workdir), range(400)))
  assert results == [None] * 400
  assert os.listdir(workdir) == []  # the probes are gone
