"""Trains, evaluates, checkpoints and predicts one experiment.

  python -m experiments.train --config=experiments/configs/synthetic_cells.py --workdir=runs/synthetic_cells
  python -m experiments.train --config=experiments/configs/synthetic_cells.py:rgb --workdir=runs/rgb \
      --config.num_train_steps=500

Running the same command again resumes from the workdir's latest checkpoint; SIGTERM checkpoints and stops.

Multi-host (run the same command on every host; see README.md): on a TPU pod slice, under Slurm or Open MPI the
processes find each other from the environment; elsewhere pass --coordinator_address, --num_processes and
--process_id.
"""

from absl import flags
from ml_collections import config_flags

from experiments import cli
from segjax.train import distributed
from segjax.train.loop import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (Python).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and outputs.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index, 0 to num_processes - 1.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  del argv
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  summary = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if summary.get("preempted"):
    print(f"stopped at step {summary['steps']} after SIGTERM; the checkpoint is saved. Run the same command to resume.")


if __name__ == "__main__":
  cli.run(main)
