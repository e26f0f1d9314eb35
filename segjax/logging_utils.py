"""Metric logs: one writer that appends JSON lines and TensorBoard scalars (tensorboard's own event writer)."""

import json
import os
import time

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter


class MetricWriter:
  """Writes ``{step, split, **scalars}`` records to ``<workdir>/metrics.jsonl`` and TensorBoard events.

  Args:
    workdir: the run directory.
    resume_step: on resume, records after this step (written before a crash, after the last checkpoint) are dropped
      from the JSON-lines file so the log matches the resumed run.
    enabled: False on processes other than 0, which write nothing.
  """

  def __init__(self, workdir: str, *, resume_step: int = 0, enabled: bool = True):
    self.enabled = enabled
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    if not enabled:
      return
    if os.path.exists(self.jsonl_path):
      with open(self.jsonl_path) as f:
        kept = [line for line in f if (_step_of(line) or resume_step + 1) <= resume_step]
      with open(self.jsonl_path, "w") as f:
        f.writelines(kept)
    self._events = EventFileWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, split: str, scalars: dict[str, float]) -> None:
    """Appends one record; TensorBoard tags are ``<split>/<name>``."""
    if not self.enabled:
      return
    record = {"step": int(step), "split": split, **{k: float(v) for k, v in scalars.items()}}
    with open(self.jsonl_path, "a") as f:
      f.write(json.dumps(record) + "\n")
    values = [summary_pb2.Summary.Value(tag=f"{split}/{k}", simple_value=float(v)) for k, v in scalars.items()]
    event = event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values))
    self._events.add_event(event)

  def flush(self) -> None:
    """Writes buffered TensorBoard events to disk."""
    if self.enabled:
      self._events.flush()

  def close(self) -> None:
    """Flushes and closes the TensorBoard writer."""
    if self.enabled:
      self._events.flush()
      self._events.close()


def _step_of(line: str) -> int | None:
  """The step of a JSON-lines record, or None for a line cut short by a killed process."""
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return None
