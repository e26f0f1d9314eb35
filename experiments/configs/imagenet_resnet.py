"""ImageNet (ILSVRC 2012) with the torchvision-exact ResNets, the recipe of the Flax ImageNet example and Goyal et
al. 2017.

  python -m experiments.train --config=experiments/configs/imagenet_resnet.py:resnet50 --workdir=gs://bucket/resnet50

SGD with Nesterov momentum 0.9 and weight decay 1e-4 (on the kernels), batch 256 (e.g. 32 per device on 8 devices)
at learning rate 0.1: for another batch B set ``--config.batch_size=B --config.optimizer.learning_rate=0.1*B/256``
(the linear scaling rule, Goyal et al. 2017) and scale the step counts below by 256/B. Five epochs of linear warm-up,
then cosine decay over 90 epochs (1,281,167 images: 5,005 steps per epoch at batch 256). Training images go through
a random resized crop (area 8-100%, aspect 3/4-4/3) to 224x224 and horizontal flips on the device, from their centre
square resized to 256 on the host; evaluation takes the centre 224 of the image resized to 256 (shorter side).
bfloat16 activations (float32 parameters) as on TPUs and GPUs; ``--config.half_precision=False`` on a CPU. Label
smoothing is off as in the Flax example; ``--config.loss.label_smoothing=0.1`` turns it on.

Top-1 accuracy to compare with: about 76% for ResNet-50 (the Flax example: 76.3%; Goyal et al. 2017: 76.4%, 23.6%
top-1 error). Not run here: ImageNet needs its manual download (README.md). Variants: ``resnet18``, ``resnet34``,
``resnet50`` (default), ``resnet101``, ``resnet152``; ``tiny``: ResNet-18 on generated 64x64 data for seconds
(tests).
"""

import ml_collections

from experiments.configs import default
from segjax.config import data_section

DEPTHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
STEPS_PER_EPOCH = 5005  # ceil(1,281,167 / 256)


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config of ``variant`` (see the module docstring)."""
  variant = variant or "resnet50"
  if variant not in (*DEPTHS, "tiny"):
    raise ValueError(f"unknown imagenet_resnet variant '{variant}'; use {', '.join(DEPTHS)} or tiny.")
  config = default.get_config()
  config.task = "classification"
  config.data = data_section("imagenet2012")  # image_size 224, load_size 256, crop_fraction 0.875
  config.data.num_threads = 16
  config.model.name = variant if variant in DEPTHS else "resnet18"
  config.model.kwargs = ml_collections.ConfigDict()
  del config["loss"]  # a loss with options: a dict in place of the base config's name
  config.loss = ml_collections.ConfigDict({"name": "softmax_cross_entropy", "label_smoothing": 0.0})
  config.augment = ml_collections.ConfigDict(
    {"ops": ("random_resized_crop", "hflip"), "random_resized_crop": {"size": 224}}
  )
  config.optimizer.update(
    name="sgd",
    momentum=0.9,
    nesterov=True,
    weight_decay=1e-4,
    learning_rate=0.1,
    schedule="warmup_cosine",
    warmup_steps=5 * STEPS_PER_EPOCH,
    end_learning_rate_factor=0.0,
    grad_clip_norm=None,
  )
  config.half_precision = True
  config.batch_size = 256
  config.eval_batch_size = 250
  config.num_train_steps = 90 * STEPS_PER_EPOCH
  config.log_every_steps = 100
  config.eval_every_steps = config.checkpoint_every_steps = STEPS_PER_EPOCH
  config.checkpoint_best_metric = "accuracy"
  config.num_sample_images = 16
  if variant == "tiny":
    config.data = data_section("synthetic_shapes")
    config.data.update(image_size=64, load_size=72, num_train=64, num_validation=16, num_test=16, num_threads=1)
    config.augment.random_resized_crop.size = 64
    config.half_precision = False
    config.optimizer.warmup_steps = 2
    config.batch_size = 16
    config.eval_batch_size = 16
    config.num_train_steps = 4
    config.log_every_steps = 2
    config.eval_every_steps = config.checkpoint_every_steps = 4
    config.num_sample_images = 4
  return config
