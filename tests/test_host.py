"""segjax.host: the entry points restart themselves with glibc's allocator tuned, and only they do."""

import importlib
import json
import os
import subprocess
import sys

import pytest

from segjax import host
from segjax.errors import SegjaxError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TUNING_VARIABLES = ("GLIBC_TUNABLES", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", host.SETTING_VARIABLE)


def _untuned_environ(**extra: str) -> dict[str, str]:
  return {**{k: v for k, v in os.environ.items() if k not in TUNING_VARIABLES}, **extra}


def test_allocator_env_adds_the_three_settings_and_keeps_the_users_tunables():
  env = host.allocator_env({"PATH": "/bin", "GLIBC_TUNABLES": "glibc.pthread.rseq=0:glibc.malloc.hugetlb=0"})
  assert env["PATH"] == "/bin"
  assert env["GLIBC_TUNABLES"] == "glibc.pthread.rseq=0:glibc.malloc.hugetlb=1"
  assert env["MALLOC_MMAP_MAX_"] == "0"
  assert int(env["MALLOC_TRIM_THRESHOLD_"]) >= 1 << 36
  assert host.allocator_setting(env) == "tuned"
  assert host.allocator_env(env) is None  # nothing left to change: no second restart


def test_allocator_env_keeps_values_the_user_chose_and_honours_the_opt_out():
  env = host.allocator_env({"MALLOC_TRIM_THRESHOLD_": "123"})
  assert env["MALLOC_TRIM_THRESHOLD_"] == "123" and host.allocator_setting(env) == "tuned"
  assert host.allocator_env({host.SETTING_VARIABLE: "default"}) is None
  assert host.allocator_setting({}) == "default"
  with pytest.raises(SegjaxError, match="SEGJAX_HOST_ALLOCATOR='fast'.*'tuned'.*'default'"):
    host.allocator_env({host.SETTING_VARIABLE: "fast"})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc allocator settings apply on Linux only")
def test_reexec_restarts_the_same_command_line_with_the_tuned_environment():
  calls = []
  argv = ["/usr/bin/python3", "-m", "experiments.train", "--config=x.py"]
  host.reexec_with_tuned_allocator(argv, {"HOME": "/h"}, execve=lambda *a: calls.append(a))
  [(executable, args, env)] = calls
  assert executable == sys.executable and args == [sys.executable, "-m", "experiments.train", "--config=x.py"]
  assert env["HOME"] == "/h" and host.allocator_setting(env) == "tuned"
  host.reexec_with_tuned_allocator(argv, env, execve=lambda *a: calls.append(a))
  assert len(calls) == 1


def _benchmark_allocator(tmp_path, **extra: str) -> subprocess.CompletedProcess:
  out = tmp_path / "bench.json"
  result = subprocess.run(
    [sys.executable, "-m", "experiments.benchmark", "--cases=", "--notorch", f"--json={out}"],
    cwd=ROOT,
    env=_untuned_environ(TF_CPP_MIN_LOG_LEVEL="3", XLA_FLAGS="", **extra),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  return json.loads(out.read_text())["host_allocator"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc allocator settings apply on Linux only")
def test_an_entry_point_runs_with_the_tuned_allocator_unless_told_not_to(tmp_path):
  assert _benchmark_allocator(tmp_path) == "tuned"
  assert _benchmark_allocator(tmp_path, SEGJAX_HOST_ALLOCATOR="default") == "default"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc allocator settings apply on Linux only")
@pytest.mark.parametrize(
  "orig_argv, restarts",
  [
    (["python", "-m", "experiments.train", "--workdir=w"], True),
    (["python", "-u", "-m", "experiments.predict"], True),
    (["python", "-m", "pytest", "tests"], False),
    (["python", "-c", "import experiments"], False),
  ],
)
def test_only_running_an_entry_point_restarts_the_process(monkeypatch, orig_argv, restarts):
  import experiments

  for name in TUNING_VARIABLES:
    monkeypatch.delenv(name, raising=False)
  calls = []
  monkeypatch.setattr(sys, "orig_argv", orig_argv)
  monkeypatch.setattr(os, "execve", lambda *a: calls.append(a))
  importlib.reload(experiments)
  assert len(calls) == restarts
  if restarts:
    assert calls[0][1] == [sys.executable, *orig_argv[1:]] and host.allocator_setting(calls[0][2]) == "tuned"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc allocator settings apply on Linux only")
def test_an_unknown_allocator_setting_stops_an_entry_point_with_a_one_line_error():
  result = subprocess.run(
    [sys.executable, "-m", "experiments.train", "--workdir=unused"],
    cwd=ROOT,
    env=_untuned_environ(SEGJAX_HOST_ALLOCATOR="fast"),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
    "error: SEGJAX_HOST_ALLOCATOR='fast': set it to 'tuned' (the default) or 'default' (glibc's own)."
  ]
