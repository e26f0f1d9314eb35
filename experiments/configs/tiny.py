"""A seconds-long version of the default experiment for tests and smoke runs: tiny data, tiny U-Net, few steps.

python -m experiments.train --config=experiments/configs/tiny.py --workdir=/tmp/segjax_tiny
"""

import ml_collections

from experiments.configs import synthetic_cells


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  """The default config shrunk: ``tiny`` (64x64, 16 train images) or ``tiny_rgb`` data, a depth-2 width-8 U-Net."""
  config = synthetic_cells.get_config()
  config.data.variant = variant or "tiny"
  config.data.num_threads = 1
  config.model.kwargs.depth = 2
  config.model.kwargs.base_width = 8
  config.optimizer.warmup_steps = 2
  config.batch_size = 4
  config.eval_batch_size = 8
  config.num_train_steps = 6
  config.log_every_steps = 2
  config.eval_every_steps = 3
  config.checkpoint_every_steps = 3
  config.num_sample_images = 2
  config.num_test_images = 2
  return config
