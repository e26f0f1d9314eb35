"""Any folder data set: images and masks paired by file name, trained with a U-Net without writing code.

  python -m experiments.train --config=experiments/configs/folder_unet.py --workdir=runs/mydata \
      --config.data.image_dir=/data/mine/images --config.data.mask_dir=/data/mine/masks \
      --config.data.num_classes=2 --config.data.num_channels=3

Masks hold one value per pixel. ``data.mask_values`` maps mask values to class ids
(``--config.data.mask_values=0:0,255:1`` on the command line, or a dict in a config file; by default a value is its
class id) and ``data.ignore_value`` marks unlabelled pixels. ``data.instance_dir`` (instance-id images with the same
names) enables the U-Net border weight map. The split comes from ``data.split_files``
(``--config.data.split_files=train:train.txt,validation:val.txt``, or a dict; one file name or stem per line) or from
``data.validation_fraction`` / ``data.test_fraction`` of the sorted names (``round(n * fraction)`` images each, at
least one), or from k-fold cross-validation (``data.num_folds=5 data.fold=k``; train each fold in its own workdir
and predict with all of them: ``experiments.predict --workdir=runs/mydata_folds``). See ``segjax/data/folder.py``.
"""

import ml_collections

from experiments.configs import default
from segjax.config import data_section


def get_config() -> ml_collections.ConfigDict:
  """Returns the config; ``data.image_dir`` and ``data.mask_dir`` must be set."""
  config = default.get_config()
  config.data = data_section("segmentation_folder")  # its keys: segjax.data's registration, segjax/data/folder.py
  config.data.crop_size = 256
  config.data.eval_size_multiple = 16
  config.augment = ml_collections.ConfigDict({"ops": ("flip", "rot90", "scale_crop", "intensity")})
  config.model.kwargs.depth = 4
  config.num_train_steps = 2000
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 500
  return config
