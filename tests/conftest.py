"""Test set-up: JAX sees 4 fake CPU devices so sharded code is tested on one CPU.

The flag must be in the environment before JAX initialises its backend, so it is set at import time of this file,
which pytest loads before any test module.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
  """One TFDS data dir for the whole session, so the tiny data set is prepared once."""
  return str(tmp_path_factory.mktemp("tfds"))
