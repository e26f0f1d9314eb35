"""CIFAR-10 with the ResNets of He et al. 2015, Sec. 4.2 (Table 6), and the same recipe on generated data.

  python -m experiments.train --config=experiments/configs/cifar10_resnet.py:resnet20 --workdir=runs/cifar10_resnet20
  python -m experiments.train --config=experiments/configs/cifar10_resnet.py:shapes --workdir=runs/shapes_resnet20

The recipe is the paper's: batch 128, SGD with momentum 0.9 and weight decay 1e-4, learning rate 0.1 divided by 10
at 32k and 48k iterations, 64k iterations in all; 4 pixels padded on each side and a random 32x32 crop, and
horizontal flips; the 6n+2-layer networks with 3x3 convolutions, stride-2 down-sampling, identity shortcuts (option
A: zero-padded, so the networks have the paper's 0.27M ... 1.7M parameters), global average pooling and a 10-way
softmax. ResNet-110 starts at 0.01 for 400 iterations (the paper: until the training error is below 80%). The paper
trains on the 50k training images and reports the error on the 10k test images, which is the validation split here.

Test error to compare with (He et al. 2015, Table 6): ResNet-20 8.75%, ResNet-32 7.51%, ResNet-44 7.17%, ResNet-56
6.97%, ResNet-110 6.43% (best of 5 runs; mean 6.61 +- 0.16). Not run here: CIFAR-10 needs a download, done once with
``tfds build cifar10 --file_format=array_record`` (then ``--config.data.tfds_data_dir`` if not ~/tensorflow_datasets).

Variants: ``resnet20`` (default), ``resnet32``, ``resnet44``, ``resnet56``, ``resnet110``; ``shapes``: ResNet-20 and
the paper's recipe scaled to 1,500 iterations on the generated ``synthetic_shapes`` data (offline, minutes on a CPU;
README.md has its result); ``tiny``: the same for seconds, for tests.
"""

import ml_collections

from experiments.configs import default
from segjax.config import data_section

PAPER_TEST_ERROR = {"resnet20": 0.0875, "resnet32": 0.0751, "resnet44": 0.0717, "resnet56": 0.0697, "resnet110": 0.0643}
"""He et al. 2015, Table 6: CIFAR-10 test error of each depth."""


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config of ``variant`` (see the module docstring)."""
  variant = variant or "resnet20"
  if variant not in (*PAPER_TEST_ERROR, "shapes", "tiny"):
    raise ValueError(f"unknown cifar10_resnet variant '{variant}'; use {', '.join(PAPER_TEST_ERROR)}, shapes or tiny.")
  config = default.get_config()
  config.task = "classification"
  config.data = data_section("cifar10")  # validated on the 10k test images, as the paper reports them
  config.model.name = f"{variant if variant in PAPER_TEST_ERROR else 'resnet20'}_cifar"
  config.model.kwargs = ml_collections.ConfigDict()
  config.augment = ml_collections.ConfigDict({"ops": ("pad_crop", "hflip"), "pad_crop": {"padding": 4}})
  config.optimizer = ml_collections.ConfigDict(default.get_config().optimizer.to_dict())
  config.optimizer.update(
    name="sgd",
    momentum=0.9,
    nesterov=False,
    weight_decay=1e-4,
    learning_rate=0.1,
    schedule="piecewise",
    boundaries=(32000, 48000),
    decay_factor=0.1,
    warmup_steps=0,
    grad_clip_norm=None,
  )
  if variant == "resnet110":
    config.optimizer.warmup_steps = 400
    config.optimizer.warmup_learning_rate = 0.01
  config.batch_size = 128
  config.eval_batch_size = 500
  config.num_train_steps = 64000
  config.log_every_steps = 100
  config.eval_every_steps = 2000
  config.checkpoint_every_steps = 2000
  config.checkpoint_best_metric = "accuracy"
  config.num_sample_images = 16
  if variant in ("shapes", "tiny"):
    config.data = data_section("synthetic_shapes")  # 3,000 / 300 / 300 generated 32x32 RGB images of six shapes
    scale = 1500 / 64000 if variant == "shapes" else 150 / 64000
    config.num_train_steps = round(64000 * scale)
    config.optimizer.boundaries = tuple(round(b * scale) for b in (32000, 48000))
    config.eval_every_steps = config.checkpoint_every_steps = 500
  if variant == "tiny":  # 150 steps of batch 32 at half the rate: well above chance in about 40 s on 2 cores
    config.data.update(num_train=1024, num_validation=128, num_test=128)
    config.data.num_threads = 1
    config.optimizer.learning_rate = 0.05
    config.batch_size = 32
    config.eval_batch_size = 128
    config.log_every_steps = 10
    config.eval_every_steps = config.checkpoint_every_steps = 75
    config.num_sample_images = 4
  return config
