"""Oxford-IIIT Pet foreground segmentation with an ImageNet-style ResNet-34 encoder U-Net.

  python -m experiments.train --config=experiments/configs/pets_resnet34_unet.py --workdir=runs/pets

Reads the standard TFDS ``oxford_iiit_pet`` data set from ``data.tfds_data_dir`` (prepare it with
``tfds build oxford_iiit_pet --file_format=array_record`` where there is network access). The trimap's uncertain
border is ignored in the loss and the metrics (``data.trimap_border``: 'ignore', 'pet' or 'background'). Training
uses random 256x256 tiles from the first 90% of the TFDS train split; its last 10% is the validation split, and the
test split is scored at the end.
"""

import ml_collections

from experiments.configs import default
from segjax.config import data_section


def get_config() -> ml_collections.ConfigDict:
  """Returns the config."""
  config = default.get_config()
  config.data = data_section("oxford_iiit_pet")  # data.trimap_border 'ignore' by default
  config.data.train_split = "train[:90%]"
  config.data.eval_split = "train[90%:]"
  config.data.num_threads = 4
  config.data.crop_size = 256
  config.data.eval_size_multiple = 32
  config.model.name = "resnet34_unet"
  config.model.kwargs = ml_collections.ConfigDict()
  config.augment = ml_collections.ConfigDict({"ops": ("flip", "scale_crop", "intensity")})
  config.optimizer.learning_rate = 1e-3
  config.batch_size = 16
  config.eval_batch_size = 8
  config.num_train_steps = 10000
  config.eval_every_steps = 1000
  config.checkpoint_every_steps = 1000
  return config
