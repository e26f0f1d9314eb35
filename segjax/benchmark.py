"""Timing helpers for ``experiments.benchmark``: compiled-step timing, XLA's FLOP count, a matrix-multiply peak."""

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def block(tree: Any) -> Any:
  """Waits for every array of ``tree`` (JAX dispatches asynchronously)."""
  return jax.block_until_ready(tree)


def time_steps(step: Callable, carry: Any, *args, steps: int = 10, warmup: int = 2) -> tuple[float, list[float], Any]:
  """Times ``carry = step(carry, *args)[0]``: the first call (compilation included) and ``steps`` calls after
  ``warmup`` more.

  Returns:
    ``(first_call_seconds, step_seconds, final_carry)``.
  """
  start = time.perf_counter()
  carry = block(step(carry, *args))[0]
  first = time.perf_counter() - start
  for _ in range(warmup):
    carry = block(step(carry, *args))[0]
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    carry = block(step(carry, *args))[0]
    times.append(time.perf_counter() - start)
  return first, times, carry


def compile_time(jitted: Callable, *args) -> float:
  """Seconds to lower and compile ``jitted`` for ``args``."""
  start = time.perf_counter()
  jitted.lower(*args).compile()
  return time.perf_counter() - start


def model_flops(jitted: Callable, *args) -> float | None:
  """The FLOPs of one call of ``jitted`` on ``args``, counted by XLA's cost analysis without compiling.

  Pass the function of the model's XLA form (``kernels='xla'``): the cost analysis counts a loop body once, so the
  scans of the CPU forms' weight gradients (:func:`segjax.models.cpu_kernels.banded_weight_gradient`) would hide most
  of their work, though their arithmetic is the same.
  """
  analysis = jitted.lower(*args).cost_analysis()
  if isinstance(analysis, list | tuple):
    analysis = analysis[0] if analysis else {}
  flops = (analysis or {}).get("flops")
  return float(flops) if flops else None


def matmul_peak_gflops(size: int = 2048, repeats: int = 5, dtype: Any = jnp.float32) -> float:
  """Measured GFLOP/s of a ``size``-square matrix product on the default device: the machine's practical peak."""
  a = jnp.asarray(np.random.default_rng(0).random((size, size)), dtype)
  product = jax.jit(lambda x: x @ x)
  block(product(a))
  start = time.perf_counter()
  for _ in range(repeats):
    block(product(a))
  return 2.0 * size**3 * repeats / (time.perf_counter() - start) / 1e9
