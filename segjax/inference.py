"""Prediction with a trained checkpoint: load, read images, predict label maps.

The checkpoint carries its config (with the dataset's number of classes and channels), so a workdir alone is enough.
Images go through the same ``normalize_image`` as training. Models take any height and width (the U-Net pads
internally), so whole images are predicted in one jitted call per distinct shape.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from segjax import checkpoint
from segjax.data.pipeline import normalize_image, pad_image_for_model
from segjax.losses import model_outputs
from segjax.models import create_model
from segjax.models.geometry import Geometry, eval_geometry
from segjax.train.optim import create_optimizer
from segjax.train.state import LossScale, TrainState, compute_dtype, create_train_state
from segjax.train.step import predict_classes, predict_logits

_logits = jax.jit(predict_logits)


@dataclasses.dataclass
class Predictor:
  """A restored model ready to predict: its config, state and checkpoint step."""

  config: ml_collections.ConfigDict
  state: TrainState
  step: int
  geometry: Geometry = dataclasses.field(default_factory=Geometry)

  @property
  def num_channels(self) -> int:
    return int(self.config.dataset_info.num_channels)

  def predict_logits(self, image: np.ndarray) -> np.ndarray:
    """Image (H, W, C) uint8/uint16 -> logits (H, W, num_classes), float32.

    For the unpadded U-Net the image is mirrored at its borders to the input whose output covers it (one tile of
    the paper's overlap-tile strategy) and the output is cropped to the image.
    """
    height, width = image.shape[:2]
    padded = pad_image_for_model(normalize_image(image), self.geometry)
    return np.asarray(_logits(self.state, padded[None])[0, :height, :width])

  def predict_probabilities(self, image: np.ndarray) -> np.ndarray:
    """Image (H, W, C) uint8/uint16 -> class probabilities (H, W, num_classes), float32.

    A one-logit binary model's sigmoid p gives the two classes' probabilities (1 - p, p).
    """
    logits = self.predict_logits(image)
    if logits.shape[-1] == 1:
      p = np.asarray(jax.nn.sigmoid(logits))
      return np.concatenate([1.0 - p, p], -1)
    return np.asarray(jax.nn.softmax(logits, -1))

  def predict_labels(self, image: np.ndarray) -> np.ndarray:
    """Image (H, W, C) -> label map (H, W) of class ids, uint8."""
    return np.asarray(predict_classes(self.predict_logits(image))).astype(np.uint8)


def load_predictor(workdir: str, step: int | None = None) -> Predictor:
  """Restores the checkpoint at ``step`` (default latest) of ``workdir``; SegjaxError if there is none."""
  config, step = checkpoint.restore_config(workdir, step)
  info = config.dataset_info
  model = create_model(config.model, model_outputs(config.loss, info.num_classes), dtype=compute_dtype(config))
  tx = create_optimizer(config.optimizer, config.num_train_steps)
  geometry = eval_geometry(model, config.data)
  side = geometry.input_size_for_output(32)
  loss_scale = LossScale.create() if compute_dtype(config) == jnp.float16 else None
  # The restore target only needs shapes: build it abstractly instead of initialising the model.
  template = jax.eval_shape(
    lambda: create_train_state(
      jax.random.PRNGKey(0),
      model,
      tx,
      (1, side, side, info.num_channels),
      ema=config.get("ema_decay", 0.0) > 0,
      loss_scale=loss_scale,
    )
  )
  manager = checkpoint.create_manager(workdir, read_only=True)
  state = checkpoint.restore_state(manager, template, step)
  manager.close()
  # A run with EMA was evaluated with the averaged weights: predict with them too.
  return Predictor(config=config, state=state.for_eval(), step=step, geometry=geometry)
