"""The U-Net paper's first experiment: EM membranes of ISBI 2012 with the unpadded U-Net, overlap-tile training
tiles and elastic deformation (Ronneberger et al. 2015, Sec. 3 and 4).

  python -m experiments.train --config=experiments/configs/isbi2012_unet.py --workdir=runs/isbi2012
  python -m experiments.train --config=experiments/configs/isbi2012_unet.py:paper --workdir=runs/isbi2012_paper

Variants: ``cpu`` (default) keeps the paper's architecture, 572x572 tiles and augmentation but with a quarter of
the channels (base width 16) and batch norm, so it trains in about 20 minutes on a 2-core CPU; ``paper`` is the
paper-exact network (base width 64, no normalisation, dropout 0.5) with SGD, momentum 0.99, batch 1, for a GPU;
``wide`` is ``cpu`` with base width 32 (four times the parameters, about 2.5x the step time), the second run of the
learning curve in README.md.
The data is read from ``data.manual_dir`` (default ``$SEGJAX_DATA/isbi2012`` or ``../shared/data/isbi2012``);
slices 25-29 are held out and scored with the challenge's pixel error and foreground-restricted Rand error.
"""

import ml_collections

from experiments.configs import default
from segjax.config import data_section


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  """Returns the ``cpu`` (default), ``wide`` or ``paper`` config."""
  variant = variant or "cpu"
  if variant not in ("cpu", "wide", "paper"):
    raise ValueError(f"unknown isbi2012_unet variant '{variant}'; use cpu, wide or paper.")
  config = default.get_config()
  config.data = data_section("isbi2012")  # slices 25-29 validate; no test split (its labels were never released)
  config.data.crop_size = 572  # the paper's tile: 572x572 in, 388x388 out
  # The weight map stays off: with the class-balanced weight map (w0 = 10) the network over-predicts membrane on
  # this data (README).
  config.model.name = "unet_valid"
  config.model.kwargs = ml_collections.ConfigDict({"depth": 4, "base_width": 16, "norm": "batch", "dropout_rate": 0.0})
  config.augment = ml_collections.ConfigDict(
    {
      "ops": ("flip", "rot90", "elastic", "intensity"),
      "elastic": {"grid_size": 3, "sigma": 10.0},  # Sec. 3.1: 3x3 grid, 10 px standard deviation, bicubic
    }
  )
  config.evaluators = ("isbi",)
  # Sec. 4: the submitted result was "averaged over 7 rotated versions of the input data"; here the 8 dihedral ones
  config.eval_tta = "flips_rot90"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 100
  config.batch_size = 1  # Sec. 3: large tiles over a large batch, batch size 1
  config.eval_batch_size = 1
  config.num_train_steps = 1500
  config.log_every_steps = 50
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 250
  config.num_sample_images = 3
  config.num_test_images = 5
  if variant == "wide":
    config.model.kwargs.base_width = 32
  if variant == "paper":
    config.model.kwargs.update({"base_width": 64, "norm": "none", "dropout_rate": 0.5})
    config.optimizer.update(
      {"name": "sgd", "momentum": 0.99, "nesterov": False, "learning_rate": 0.01, "schedule": "constant"}
    )
    config.num_train_steps = 20000
    config.eval_every_steps = 1000
    config.checkpoint_every_steps = 1000
  return config
