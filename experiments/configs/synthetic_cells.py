"""The default experiment: a small U-Net on the embedded synthetic_cells data set, sized for a 2-core CPU.

  python -m experiments.train --config=experiments/configs/synthetic_cells.py --workdir=runs/synthetic_cells
  python -m experiments.train --config=experiments/configs/synthetic_cells.py:rgb --workdir=runs/synthetic_cells_rgb

The argument after ':' picks the data variant: ``gray`` (default; background / cell) or ``rgb`` (background and 3
object classes).
"""

import ml_collections
from ml_collections import config_dict


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config for data variant ``variant`` ('gray' or 'rgb')."""
  variant = variant or "gray"
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  config.data.name = "synthetic_cells"
  config.data.variant = variant
  config.data.tfds_data_dir = config_dict.placeholder(str)  # None: TFDS's default (~/tensorflow_datasets)
  config.data.train_split = "train"
  config.data.eval_split = "validation"
  config.data.test_split = "test"
  config.data.num_threads = 2
  config.data.crop_size = config_dict.placeholder(int)  # None: train on whole images (all 128x128 here)
  # The U-Net weight map w = w_c + w0 * border term (Ronneberger et al. 2015, Eq. 2); class_weights 'balanced' counts
  # the training pixels, or give one weight per class.
  config.data.weight_map = ml_collections.ConfigDict({"enabled": False, "w0": 10.0, "class_weights": "balanced"})

  config.model = ml_collections.ConfigDict()
  config.model.name = "unet"
  config.model.kwargs = ml_collections.ConfigDict(
    {"depth": 3, "base_width": 16, "norm": "batch", "upsample": "transpose", "dropout_rate": 0.0}
  )

  config.loss = "softmax_cross_entropy"
  config.augment = ml_collections.ConfigDict({"ops": ["flip", "rot90"]})
  config.evaluators = ()  # per-image metrics on the host, e.g. ('isbi',) or ('instances',)

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 3e-3
  config.optimizer.schedule = "warmup_cosine"
  config.optimizer.warmup_steps = 50
  config.optimizer.end_learning_rate_factor = 0.01
  config.optimizer.grad_clip_norm = 1.0

  config.batch_size = 8
  config.eval_batch_size = 16
  config.num_train_steps = 800
  config.log_every_steps = 25
  config.eval_every_steps = 200
  config.checkpoint_every_steps = 200
  config.max_checkpoints_to_keep = 3
  config.num_sample_images = 6
  config.num_test_images = 16
  return config
