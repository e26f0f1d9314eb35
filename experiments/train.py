"""Trains, evaluates, checkpoints and predicts one experiment.

  python -m experiments.train --config=experiments/configs/synthetic_cells.py --workdir=runs/synthetic_cells
  python -m experiments.train --config=experiments/configs/synthetic_cells.py:rgb --workdir=runs/rgb \
      --config.num_train_steps=500

Running the same command again resumes from the workdir's latest checkpoint.
"""

from absl import flags
from ml_collections import config_flags

from experiments import cli
from segjax.train.loop import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (Python).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and outputs.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  del argv
  train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)
