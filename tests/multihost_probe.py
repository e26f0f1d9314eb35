"""``experiments.train`` that also records what this process read and scored, for tests/test_faults.py.

  python -m tests.multihost_probe --reads=/tmp/reads <experiments.train flags>

writes ``/tmp/reads.<process index>.pkl``: this process's host batch of every training step it read, and for every
evaluation the images it scored (a hash of each, its size and its number of weighted pixels) and the confusion
matrix the metrics were computed from (summed over the processes). :func:`record_reads` installs the same record in
a process that calls ``train_and_evaluate`` itself.
"""

import hashlib
import pickle
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import flags

from experiments import cli, train
from segjax.train import evaluation, setup

_READS = flags.DEFINE_string("reads", None, "Path prefix of the record of this process's reads.")


def record_reads(setattr_: Callable[[Any, str, Any], None] = setattr) -> dict[str, list]:
  """Wraps the loop's input pipeline and metric summary to record what they see; returns the record (filled as the
  run goes). ``setattr_``: how to replace the loop's functions (e.g. pytest's ``monkeypatch.setattr``)."""
  record: dict[str, list] = {"train": [], "evaluations": []}
  training_batches, evaluate, eval_batches, summarize_confusion = (
    setup.training_batches,
    evaluation.evaluate,
    evaluation.eval_batches,
    evaluation.summarize_confusion,
  )

  def recorded_training_batches(*args, **kwargs):
    for batch in training_batches(*args, **kwargs):
      record["train"].append({k: np.array(v) for k, v in batch.items()})
      yield batch

  def recorded_evaluate(*args, **kwargs):
    record["evaluations"].append({"images": [], "confusion": None})
    return evaluate(*args, **kwargs)

  def recorded_eval_batches(*args, **kwargs):
    for batch, infos in eval_batches(*args, **kwargs):
      for i, info in enumerate(infos):  # the real examples; fillers of weight 0 follow them
        image = np.ascontiguousarray(batch["image"][i])
        digest = hashlib.sha1(image.tobytes()).hexdigest()
        record["evaluations"][-1]["images"].append((digest, tuple(info["size"]), float(batch["weights"][i].sum())))
      yield batch, infos

  def recorded_summarize_confusion(confusion):
    record["evaluations"][-1]["confusion"] = np.array(confusion)
    return summarize_confusion(confusion)

  # where the loop's setup (segjax.train.setup) and evaluation (segjax.train.evaluation) call them
  setattr_(setup, "training_batches", recorded_training_batches)
  setattr_(evaluation, "evaluate", recorded_evaluate)
  setattr_(evaluation, "eval_batches", recorded_eval_batches)
  setattr_(evaluation, "summarize_confusion", recorded_summarize_confusion)
  return record


def main(argv: list[str]) -> None:
  record = record_reads()
  train.main(argv)
  with open(f"{_READS.value}.{jax.process_index()}.pkl", "wb") as f:
    pickle.dump(record, f)


if __name__ == "__main__":
  cli.run(main)
