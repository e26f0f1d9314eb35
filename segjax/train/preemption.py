"""Preemption: notice SIGTERM and stop at a step boundary, after a checkpoint, on every process at the same step.

Cluster schedulers (Cloud TPU, Kubernetes, Slurm) send SIGTERM some seconds before they kill a job. With one process,
a handler sets a flag that the loop reads after each step (a host-side check, no device sync). With several
processes, JAX's distributed runtime catches the signal and :func:`jax.experimental.multihost_utils.
reached_preemption_sync_point` makes every process agree on the step to checkpoint at.
"""

import signal
import threading
from types import FrameType

import jax
from jax.experimental import multihost_utils


class Preemption:
  """Context manager that turns SIGTERM into ``reached(step) == True`` at the next step boundary."""

  def __init__(self):
    self._requested = False
    self._previous = None

  def __enter__(self) -> "Preemption":
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc_info) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _handle(self, signum: int, frame: FrameType | None) -> None:
    del signum, frame
    self._requested = True

  def reached(self, step: int) -> bool:
    """Whether to checkpoint at ``step`` and stop (called after every step, on every process)."""
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._requested
