"""Test set-up: JAX sees 4 fake CPU devices so sharded code is tested on one CPU.

The flag must be in the environment before JAX initialises its backend, so it is set at import time of this file,
which pytest loads before any test module.
"""

import os
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for this test session, inherited by the training processes the tests start: a
# subprocess that builds the same train step as an earlier one loads it instead of compiling it again.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="segjax-test-jax-cache-")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
  """One TFDS data dir for the whole session, so the tiny data set is prepared once."""
  return str(tmp_path_factory.mktemp("tfds"))
