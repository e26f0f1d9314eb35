"""The default experiment: a small U-Net on the embedded synthetic_cells data set, sized for a 2-core CPU.

  python -m experiments.train --config=experiments/configs/synthetic_cells.py --workdir=runs/synthetic_cells
  python -m experiments.train --config=experiments/configs/synthetic_cells.py:rgb --workdir=runs/synthetic_cells_rgb

The argument after ':' picks the data variant: ``gray`` (default; background / cell) or ``rgb`` (background and 3
object classes). Every other value is the base config's (``default.py``).
"""

import ml_collections

from experiments.configs import default


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config for data variant ``variant`` ('gray' or 'rgb')."""
  config = default.get_config()
  config.data.name = "synthetic_cells"
  config.data.variant = variant or "gray"  # all images 128x128: trained whole (data.crop_size None)
  return config
