"""The one base config: every key an experiment has, with its default. Every config in this folder starts here and
overrides what it changes; `segjax.train.setup.validate_config` (the first step of `setup.build`) checks the values.

Sized for the default experiment (``synthetic_cells.py``: a small U-Net on 128x128 images on a 2-core CPU); the
data section holds only the keys every data set shares (each data set's own keys are in its config).
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  """The base config; ``data.name`` must be set by the experiment."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  # Modules imported before anything is built: where a research project registers its own models, losses, metrics,
  # augmentations or data sets (saved with the checkpoint, so experiments.predict imports them too).
  config.imports = ()

  config.data = ml_collections.ConfigDict()
  config.data.name = config_dict.placeholder(str)  # a registered data set (segjax.data.DATASETS)
  config.data.tfds_data_dir = config_dict.placeholder(str)  # None: TFDS's default (~/tensorflow_datasets)
  config.data.train_split = "train"
  config.data.eval_split = "validation"
  config.data.test_split = "test"
  config.data.num_threads = 2
  config.data.crop_size = config_dict.placeholder(int)  # None: train on whole images
  # The U-Net weight map w = w_c + w0 * border term (Ronneberger et al. 2015, Eq. 2); class_weights 'balanced' counts
  # the training pixels, or give one weight per class.
  config.data.weight_map = ml_collections.ConfigDict({"enabled": False, "w0": 10.0, "class_weights": "balanced"})

  config.model = ml_collections.ConfigDict()
  config.model.name = "unet"
  # The form of the convolutions and pools (segjax.models.layers.KERNELS): 'auto' picks XLA:CPU's faster forms
  # inside the traced program where it runs on the CPU and XLA's own elsewhere; 'xla' or 'cpu' force one.
  config.model.kernels = "auto"
  config.model.kwargs = ml_collections.ConfigDict(
    {"depth": 3, "base_width": 16, "norm": "batch", "upsample": "transpose", "dropout_rate": 0.0}
  )

  # Instance-aware targets and post-processing (segjax.data.instance_targets, segjax.instances): targets 'contour'
  # (background / interior / boundary) or 'distance' (levels of the normalised distance to the boundary) are made
  # from the data set's instance maps and learned as classes; method 'watershed' turns the predicted probabilities
  # into instances (evaluator 'instances', experiments.predict --outputs=instances), 'components' labels the
  # connected components of the foreground.
  config.instances = ml_collections.ConfigDict(
    {
      "targets": config_dict.placeholder(str),
      "boundary_width": 2,
      "distance_bins": 4,
      "method": "components",
      "min_size": 10,
      "marker_threshold": 0.5,
      "foreground_threshold": 0.5,
    }
  )

  config.loss = "softmax_cross_entropy"
  config.augment = ml_collections.ConfigDict({"ops": ("flip", "rot90")})
  config.evaluators = ()  # per-image metrics on the host, e.g. ('isbi',) or ('instances',)

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 3e-3
  config.optimizer.schedule = "warmup_cosine"
  config.optimizer.warmup_steps = 50
  config.optimizer.end_learning_rate_factor = 0.01
  config.optimizer.grad_clip_norm = 1.0

  # Scale-out and precision (segjax.train.parallel): 'jit' shards the global batch over a device Mesh; 'pmap' runs
  # the same step under jax.pmap. half_precision: bfloat16 (or float16 with dynamic loss scaling) activations with
  # float32 parameters and optimizer state.
  config.parallelism = "jit"
  config.half_precision = False
  config.half_precision_dtype = "bfloat16"
  config.grad_accum_steps = 1  # micro-batches per step; batch_size is the whole step's batch
  config.ema_decay = 0.0  # e.g. 0.999: evaluate an exponential moving average of the weights; 0 turns it off

  config.batch_size = 8
  config.eval_batch_size = 16
  # Test-time augmentation of every evaluation, averaged in probability: 'none', 'flips' or 'flips_rot90' (the
  # 8 dihedral transforms, as the U-Net paper's ISBI submission).
  config.eval_tta = "none"
  config.num_train_steps = 800
  config.log_every_steps = 25
  config.eval_every_steps = 200
  config.checkpoint_every_steps = 200
  config.max_checkpoints_to_keep = 3  # the newest, for resuming
  # ...plus the best by this validation metric ('' keeps only the newest); saved at steps that also evaluate.
  config.checkpoint_best_metric = "mean_iou"
  config.checkpoint_best_mode = "max"
  config.max_best_checkpoints_to_keep = 1
  config.num_sample_images = 6
  config.num_test_images = 16
  return config
