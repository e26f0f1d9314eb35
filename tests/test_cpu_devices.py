"""Several CPU devices in one process: the scheduler flag segjax adds, and the default experiment's data-parallel
U-Net step running to completion on 2 and 4 of them (XLA:CPU's default scheduler could deadlock it)."""

import json
import os
import subprocess
import sys

import pytest

from segjax.host import SAFE_SCHEDULER_FLAG, safe_cpu_xla_flags, use_safe_cpu_scheduler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
  "flags, expected",
  [
    ("", ""),
    ("--xla_force_host_platform_device_count=1", "--xla_force_host_platform_device_count=1"),
    ("--xla_force_host_platform_device_count=4", f"--xla_force_host_platform_device_count=4 {SAFE_SCHEDULER_FLAG}"),
    (
      "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=2",
      f"--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=2 {SAFE_SCHEDULER_FLAG}",
    ),
    (  # the user's own choice of scheduler is kept
      "--xla_force_host_platform_device_count=2 --xla_cpu_enable_concurrency_optimized_scheduler=true",
      "--xla_force_host_platform_device_count=2 --xla_cpu_enable_concurrency_optimized_scheduler=true",
    ),
  ],
)
def test_the_safe_scheduler_is_chosen_only_for_several_cpu_devices(flags, expected):
  assert safe_cpu_xla_flags(flags) == expected


def test_other_jaxlib_versions_are_left_alone():
  flags = "--xla_force_host_platform_device_count=2"
  environ = {"XLA_FLAGS": flags}
  use_safe_cpu_scheduler(environ, jaxlib_version="0.99.0")  # a version whose XLA may not know the flag
  assert environ == {"XLA_FLAGS": flags}
  use_safe_cpu_scheduler(environ, jaxlib_version="0.10.2")
  assert environ == {"XLA_FLAGS": f"{flags} {SAFE_SCHEDULER_FLAG}"}


def test_importing_segjax_applies_it_before_jax_starts():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=3"}
  code = "import os, segjax, jax; print(os.environ['XLA_FLAGS']); print(len(jax.devices()))"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split("\n")[:2] == [f"--xla_force_host_platform_device_count=3 {SAFE_SCHEDULER_FLAG}", "3"]


@pytest.mark.parametrize("devices", [2, 4])
def test_the_default_unet_trains_to_completion_on_several_cpu_devices(tmp_path, tfds_dir, devices):
  workdir = tmp_path / "run"
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "TF_CPP_MIN_LOG_LEVEL": "3"}
  args = [
    "--config=experiments/configs/tiny.py",  # tiny data, the default experiment's U-Net (depth 3, width 16)
    f"--workdir={workdir}",
    "--config.model.kwargs.depth=3",
    "--config.model.kwargs.base_width=16",
    f"--config.data.tfds_data_dir={tfds_dir}",
    "--config.num_train_steps=2",
    "--config.log_every_steps=1",
    "--config.eval_every_steps=2",
    "--config.checkpoint_every_steps=2",
    "--config.num_sample_images=1",
    "--config.num_test_images=1",
  ]
  result = subprocess.run(
    [sys.executable, "-m", "experiments.train", *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=480
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"{devices} devices in 1 processes" in result.stdout + result.stderr
  with open(workdir / "metrics.jsonl") as f:
    steps = [r["step"] for r in map(json.loads, f) if r.get("split") == "train"]
  assert steps == [1, 2]
