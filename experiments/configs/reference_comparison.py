"""`folder_unet` on the ISBI 2012 and DSB 2018 data given as plain folders, for the comparison with the PyTorch
reference loop (`experiments/torch_reference.py`) at equal wall time.

  python -m experiments.export_folders --dataset=isbi2012 --output=runs/folders/isbi2012
  python -m experiments.train --config=experiments/configs/reference_comparison.py:isbi --workdir=runs/cmp_isbi \
      --config.num_train_steps=<steps that fit the budget>

The folders are read from ``$SEGJAX_FOLDERS/<isbi2012|dsb2018>`` (default ``runs/folders/...``), with the splits of
their ``train.txt`` / ``validation.txt`` / ``test.txt``. Everything else is `folder_unet`'s defaults (depth 4,
base width 16, batch norm, batch 8 of 256x256 crops), the settings a new user gets.
"""

import os

import ml_collections

from experiments.configs import folder_unet


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  """Returns the ``isbi`` (default) or ``dsb`` config."""
  variant = variant or "isbi"
  if variant not in ("isbi", "dsb"):
    raise ValueError(f"unknown reference_comparison variant '{variant}'; use isbi or dsb.")
  name = {"isbi": "isbi2012", "dsb": "dsb2018"}[variant]
  root = os.path.join(os.environ.get("SEGJAX_FOLDERS", "runs/folders"), name)
  config = folder_unet.get_config()
  config.data.image_dir = os.path.join(root, "images")
  config.data.mask_dir = os.path.join(root, "masks")
  config.data.split_files = {s: os.path.join(root, f"{s}.txt") for s in ("train", "validation", "test")}
  if variant == "isbi":
    del config.data.split_files["test"]  # the challenge's test labels were never released
    config.data.test_split = None
    config.evaluators = ("isbi",)
  else:
    config.data.instance_dir = os.path.join(root, "instances")
    config.data.num_channels = 3
    config.evaluators = ("instances",)
  return config
