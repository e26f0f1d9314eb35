"""The one base config and the one place its defaults are applied.

:func:`base_config` holds every key an experiment has, with its default; every config in ``experiments/configs``
starts from it and overrides what it changes. :func:`with_defaults` fills the keys a config does not set (a config
built by hand in a notebook, or one saved by an older version with a checkpoint) from the base config and from the
defaults its data set registered (``register_dataset(name, defaults=...)``), so the library reads keys directly and no
default is written twice.

Sized for the default experiment (``synthetic_cells.py``: a small U-Net on 128x128 images on a 2-core CPU); the
data section holds only the keys every data set shares (each data set's own keys are its registered defaults).
"""

import copy

import ml_collections
from ml_collections import config_dict

OPAQUE = frozenset({"model.kwargs", "augment", "dataset_info"})
"""Sections taken whole from the config when it has them: their keys belong to the model, the ops or the data set
named, so the base config's (those of the default U-Net and augmentation) must not be mixed in."""


def base_config() -> ml_collections.ConfigDict:
  """The base config; ``data.name`` must be set by the experiment."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  # Modules imported before anything is built: where a research project registers its own models, losses, metrics,
  # augmentations or data sets (saved with the checkpoint, so experiments.predict imports them too).
  config.imports = ()

  # What is learned: 'segmentation' (a class per pixel) or 'classification' (a class per image, see
  # segjax.train.classification).
  config.task = "segmentation"

  config.data = ml_collections.ConfigDict()
  config.data.name = config_dict.placeholder(str)  # a registered data set (segjax.data.DATASETS)
  config.data.tfds_data_dir = config_dict.placeholder(str)  # None: TFDS's default (~/tensorflow_datasets)
  config.data.train_split = "train"
  config.data.eval_split = "validation"
  config.data.test_split = "test"
  config.data.num_threads = 2
  config.data.crop_size = config_dict.placeholder(int)  # None: train on whole images
  config.data.eval_size_multiple = 1  # whole images are padded up to a multiple of this for evaluation
  # Intensities -> [0, 1] (segjax.data.pipeline.Normalization): 'scale' by the bit depth; 'percentile' then clips to
  # data.intensity_range (low, high) in those units and stretches it; 'image_percentile' uses each image's 0.5 / 99.5
  # percentiles instead
  config.data.normalization = "scale"
  config.data.intensity_range = ()
  # The U-Net weight map w = w_c + w0 * border term (Ronneberger et al. 2015, Eq. 2); class_weights 'balanced' counts
  # the training pixels, or give one weight per class.
  config.data.weight_map = ml_collections.ConfigDict({"enabled": False, "w0": 10.0, "class_weights": "balanced"})

  config.model = ml_collections.ConfigDict()
  config.model.name = "unet"
  # The form of the convolutions and pools (segjax.models.layers.KERNELS): 'auto' picks XLA:CPU's faster forms
  # inside the traced program where it runs on the CPU and XLA's own elsewhere; 'xla' or 'cpu' force one.
  config.model.kernels = "auto"
  # A torchvision ResNet state dict (.pth / .safetensors / .npz) to start from (segjax.train.finetune): a classifier
  # keeps the file's head if it has the data set's number of classes, else a new one; a ResNet U-Net its encoder.
  config.model.init_from = config_dict.placeholder(str)
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
  config.optimizer.grad_clip_norm = 1.0  # 0 or None: no clipping
  config.optimizer.power = 0.9  # schedule 'polynomial': nnU-Net's poly exponent
  # schedule 'piecewise': the learning rate times decay_factor at each of the boundaries (steps), as He et al. 2015
  config.optimizer.boundaries = ()
  config.optimizer.decay_factor = 0.1
  # None: warm up linearly from 0 over warmup_steps; a value: hold it for warmup_steps (He et al.'s ResNet-110)
  config.optimizer.warmup_learning_rate = config_dict.placeholder(float)
  config.optimizer.momentum = 0.9  # name 'sgd'
  config.optimizer.nesterov = True  # name 'sgd'
  # 'adamw': decoupled weight decay; 'sgd': L2 regularisation of the kernels (weight_decay * w added to their
  # gradient, as the Flax ImageNet example's penalty on the parameters with more than one axis); 0: none
  config.optimizer.weight_decay = 0.0

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


def data_section(name: str | None) -> ml_collections.ConfigDict:
  """The base config's ``data`` section for data set ``name``: the shared keys, then the keys and defaults that data
  set registered (which may override a shared one, e.g. no ``test_split`` where the data has none). An unknown name
  gets the shared keys only (the name is refused when the experiment is built)."""
  from segjax.data import DATASETS  # the data sets register their defaults on import

  data = base_config().data
  data.name = name
  if name in DATASETS:
    for key, value in copy.deepcopy(dict(DATASETS.metadata(name).get("defaults", {}))).items():
      data[key] = value
  return data


def with_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of ``config`` with every key it lacks filled from :func:`base_config` and its data set's defaults.

  Keys the config sets are kept as they are (values, types and extra keys alike); sections in :data:`OPAQUE` are
  filled only when absent. Applying it twice changes nothing.
  """
  filled = copy.deepcopy(config)
  base = base_config()
  base.data = data_section(config.get("data", {}).get("name"))
  with filled.unlocked():
    _fill(filled, base, "")
  return filled


def with_data_defaults(data: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of a ``data`` section with the keys it lacks filled from :func:`data_section` of its data set."""
  filled = copy.deepcopy(data)
  with filled.unlocked():
    _fill(filled, data_section(data.get("name")), "data.")
  return filled


def _fill(target: ml_collections.ConfigDict, defaults: ml_collections.ConfigDict, prefix: str) -> None:
  for key in defaults.keys():
    path = prefix + key
    value = defaults[key]
    if key not in target:
      # a placeholder (None of a declared type) stays one, so a later override is still type-checked
      target[key] = config_dict.placeholder(defaults.get_type(key)) if value is None else copy.deepcopy(value)
    elif path not in OPAQUE and isinstance(value, ml_collections.ConfigDict):
      if isinstance(target[key], ml_collections.ConfigDict):
        _fill(target[key], value, path + ".")
      elif isinstance(target[key], dict):
        section = ml_collections.ConfigDict(target[key])
        _fill(section, value, path + ".")
        target[key] = section
