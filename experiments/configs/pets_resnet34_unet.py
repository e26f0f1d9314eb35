"""Oxford-IIIT Pet foreground segmentation with an ImageNet-style ResNet-34 encoder U-Net.

  python -m experiments.train --config=experiments/configs/pets_resnet34_unet.py --workdir=runs/pets

Reads the standard TFDS ``oxford_iiit_pet`` data set from ``data.tfds_data_dir`` (prepare it with
``tfds build oxford_iiit_pet --file_format=array_record`` where there is network access). The trimap's uncertain
border is ignored in the loss and the metrics (``data.trimap_border``: 'ignore', 'pet' or 'background'). Training
uses random 256x256 tiles from the first 90% of the TFDS train split; its last 10% is the validation split, and the
test split is scored at the end.
"""

import ml_collections
from ml_collections import config_dict

from experiments.configs import default


def get_config() -> ml_collections.ConfigDict:
  """Returns the config."""
  config = default.get_config()
  config.data = ml_collections.ConfigDict(
    {
      "name": "oxford_iiit_pet",
      "tfds_data_dir": config_dict.placeholder(str),
      "trimap_border": "ignore",
      "train_split": "train[:90%]",
      "eval_split": "train[90%:]",
      "test_split": "test",
      "num_threads": 4,
      "crop_size": 256,
      "eval_size_multiple": 32,
      "weight_map": {"enabled": False, "w0": 10.0, "class_weights": "balanced"},
    }
  )
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
