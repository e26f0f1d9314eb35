"""data.normalization: how raw intensities become the model's input, the same in training, evaluation and
prediction, against NumPy."""

import numpy as np
import pytest

from segjax.config import data_section
from segjax.data.pipeline import Normalization, to_model_inputs
from segjax.errors import SegjaxError


def _section(**settings):
  data = data_section("segmentation_folder")
  data.update(settings)
  return data


def test_the_three_normalisations_against_numpy():
  rng = np.random.default_rng(0)
  image = rng.integers(3000, 9000, (20, 30, 2)).astype(np.uint16)
  image[0, 0] = 60000  # an outlier
  scaled = image.astype(np.float64) / 65535
  np.testing.assert_allclose(Normalization()(image), scaled, rtol=1e-6)
  clipped = Normalization.from_config(_section(normalization="percentile", intensity_range=(0.05, 0.12)))(image)
  np.testing.assert_allclose(clipped, np.clip((scaled - 0.05) / 0.07, 0, 1), rtol=1e-5, atol=1e-6)
  own = Normalization.from_config(_section(normalization="image_percentile"))(image)
  for c in range(2):
    low, high = np.percentile(scaled[..., c], (0.5, 99.5))
    np.testing.assert_allclose(own[..., c], np.clip((scaled[..., c] - low) / (high - low), 0, 1), atol=1e-5)
  assert own.min() == 0.0 and own.max() == 1.0 and own[0, 0, 0] == 1.0  # the outlier is clipped, not the scale
  eight = rng.integers(0, 256, (4, 4, 1)).astype(np.uint8)
  np.testing.assert_allclose(Normalization()(eight), eight / 255.0, rtol=1e-6)
  flat = Normalization(mode="image_percentile")(np.full((4, 4, 1), 7, np.uint8))
  assert np.all(flat == 0.0)


@pytest.mark.parametrize(
  "settings, message",
  [
    ({"normalization": "zscore"}, "unknown data.normalization 'zscore'; available: scale, percentile"),
    ({"normalization": "percentile"}, "needs data.intensity_range = \\(low, high\\)"),
    ({"normalization": "percentile", "intensity_range": (0.4, 0.2)}, "0 <= low < high <= 1"),
  ],
)
def test_bad_normalisation_settings_name_the_key(settings, message):
  with pytest.raises(SegjaxError, match=message):
    Normalization.from_config(_section(**settings))


def test_training_batches_and_prediction_use_the_configured_normalisation(tfds_dir):
  import jax

  from experiments.configs import tiny
  from segjax.inference import Predictor
  from segjax.train.setup import build

  config = tiny.get_config()
  config.data.tfds_data_dir = tfds_dir
  config.data.normalization = "percentile"
  config.data.intensity_range = (0.2, 0.6)
  experiment = build(config)
  normalization = Normalization.from_config(experiment.config.data)
  candidates = [normalization(np.asarray(e["image"])) for e in experiment.train_source]
  batch = next(experiment.training_batches())
  for image in batch["image"]:  # every training image is a normalised training image
    assert min(float(np.abs(image - c).max()) for c in candidates) < 1e-6
  assert (batch["image"] == 0.0).mean() > 0.01 and (batch["image"] == 1.0).mean() > 0.01  # clipped at both ends
  example = experiment.train_source[0]
  np.testing.assert_allclose(
    to_model_inputs(example, 2, normalization=normalization)["image"], candidates[0], rtol=1e-6
  )
  # prediction: the same as a 'scale' predictor given the normalised image (as 16-bit values)
  state = experiment.initial_state().for_eval()  # replicated over the devices, as load_predictor places it
  image = np.asarray(example["image"])
  devices, geometry = tuple(jax.local_devices()), experiment.geometry
  clipped = Predictor(config=experiment.run_config(), state=state, step=0, geometry=geometry, devices=devices)
  plain_config = experiment.run_config()
  plain_config.data.normalization = "scale"
  plain = Predictor(config=plain_config, state=state, step=0, geometry=geometry, devices=devices)
  pre = np.round(normalization(image) * 65535).astype(np.uint16)
  np.testing.assert_allclose(clipped.predict(image), plain.predict(pre), atol=2e-4)
  assert np.abs(clipped.predict(image) - plain.predict(image)).max() > 1e-3  # the normalisation matters
