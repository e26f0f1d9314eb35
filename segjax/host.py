"""Host memory settings for segjax processes on Linux (glibc).

XLA:CPU allocates the temporaries of an executable afresh on every call: 954 MB for the default benchmark U-Net's
train step. glibc serves buffers this large with ``mmap`` and gives them back with ``munmap``, so every step faults
its temporaries in again, 4 KiB page by page: about 300,000 minor page faults and 0.5 s of kernel time per U-Net step
on the 2-core development machine (BENCHMARKS.md, attempt 9). PyTorch's CPU kernels pay the same way. Three glibc
settings remove almost all of it:

- ``MALLOC_MMAP_MAX_=0``: large buffers come from the heap, not from ``mmap``, so a freed buffer is reused by the next
  step instead of being returned to the kernel;
- ``MALLOC_TRIM_THRESHOLD_`` (64 GiB): the top of the heap is not given back between steps either;
- ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``: the heap is backed by transparent huge pages where the kernel allows
  them (``madvise`` mode), so growing it faults 2 MiB at a time.

glibc reads them only at process start, so :func:`reexec_with_tuned_allocator` starts the process again with them
(``os.execve``: same process id, same arguments); ``python -m experiments.<entry point>`` does this first thing.
The cost is that a process keeps its peak heap until it exits. ``SEGJAX_HOST_ALLOCATOR=default`` in the environment
keeps glibc's defaults.
"""

import os
import platform
import sys
from collections.abc import Callable, Mapping, MutableMapping, Sequence

from segjax.errors import SegjaxError

SETTING_VARIABLE = "SEGJAX_HOST_ALLOCATOR"
MALLOC_VARIABLES = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 36)}
HUGE_PAGE_TUNABLE = "glibc.malloc.hugetlb=1"


def allocator_env(environ: Mapping[str, str]) -> dict[str, str] | None:
  """The environment with the tuned allocator settings added, or None when ``environ`` needs no change (already
  tuned, or ``SEGJAX_HOST_ALLOCATOR=default``). Other glibc tunables the user set are kept."""
  setting = environ.get(SETTING_VARIABLE, "tuned")
  if setting not in ("tuned", "default"):
    raise SegjaxError(f"{SETTING_VARIABLE}={setting!r}: set it to 'tuned' (the default) or 'default' (glibc's own).")
  if setting == "default" or allocator_setting(environ) == "tuned":
    return None
  env = dict(environ)
  env.update({k: v for k, v in MALLOC_VARIABLES.items() if k not in environ})
  tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t and not t.startswith("glibc.malloc.hugetlb=")]
  env["GLIBC_TUNABLES"] = ":".join([*tunables, HUGE_PAGE_TUNABLE])
  return env


def allocator_setting(environ: Mapping[str, str] = os.environ) -> str:
  """``'tuned'`` when all three settings are in ``environ`` (whatever their values), else ``'default'``."""
  has_tunable = any(t.startswith("glibc.malloc.hugetlb=") for t in environ.get("GLIBC_TUNABLES", "").split(":"))
  return "tuned" if has_tunable and all(k in environ for k in MALLOC_VARIABLES) else "default"


DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
SAFE_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
"""XLA:CPU's default (concurrency-optimised) scheduler can order the all-reduces of a data-parallel step differently
on two CPU devices of one process, so each waits in a different one until the rendezvous times out (BENCHMARKS.md,
attempt 14: the default U-Net step on 2 devices). The plain scheduler keeps them in program order."""


def safe_cpu_xla_flags(flags: str) -> str:
  """``XLA_FLAGS`` with :data:`SAFE_SCHEDULER_FLAG` added when it asks for more than one CPU device
  (``--xla_force_host_platform_device_count=N``, N > 1) and does not choose the scheduler itself; else unchanged."""
  count = 1
  for flag in flags.split():
    if flag.startswith(DEVICE_COUNT_FLAG + "="):
      try:
        count = int(flag.split("=", 1)[1])
      except ValueError:
        return flags  # XLA reports its own flag errors
  chosen = any(f.startswith(SAFE_SCHEDULER_FLAG.split("=")[0] + "=") for f in flags.split())
  return f"{flags} {SAFE_SCHEDULER_FLAG}".strip() if count > 1 and not chosen else flags


SCHEDULER_FLAG_JAXLIB = ("0.10.",)
"""jaxlib versions known to have :data:`SAFE_SCHEDULER_FLAG` (the pinned one); XLA aborts on a flag it does not know,
so for other versions ``XLA_FLAGS`` is left alone."""


def use_safe_cpu_scheduler(environ: MutableMapping[str, str] = os.environ, jaxlib_version: str | None = None) -> None:
  """Applies :func:`safe_cpu_xla_flags` to ``environ['XLA_FLAGS']`` for the jaxlib versions of
  :data:`SCHEDULER_FLAG_JAXLIB`. XLA reads the variable when JAX first creates its backends, so this works if called
  before any computation (``import segjax`` does)."""
  if "XLA_FLAGS" not in environ:
    return
  if jaxlib_version is None:
    from importlib import metadata

    try:
      jaxlib_version = metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
      return
  if jaxlib_version.startswith(SCHEDULER_FLAG_JAXLIB):
    environ["XLA_FLAGS"] = safe_cpu_xla_flags(environ["XLA_FLAGS"])


def reexec_with_tuned_allocator(
  argv: Sequence[str] | None = None,
  environ: Mapping[str, str] = os.environ,
  execve: Callable[..., None] | None = None,
) -> None:
  """Restarts this Python process with :func:`allocator_env` (``os.execve``) on Linux with glibc; does nothing where
  there is nothing to change or glibc is not the C library. Call it before anything else has run: the process
  starts over. ``argv`` defaults to the interpreter's own command line (``sys.orig_argv``), ``execve`` to
  ``os.execve``."""
  if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
    return
  env = allocator_env(environ)
  if env is not None:
    argv = list(sys.orig_argv if argv is None else argv)
    (execve or os.execve)(sys.executable, [sys.executable, *argv[1:]], env)
