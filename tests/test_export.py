"""The TF SavedModel export (jax2tf) gives the predictor's outputs; the StableHLO export is tested end to end in
test_experiments.py."""

import jax
import ml_collections
import numpy as np
import optax
import pytest

from segjax import export
from segjax.config import with_defaults
from segjax.errors import SegjaxError
from segjax.inference import Predictor
from segjax.models import get_model
from segjax.models.geometry import model_geometry
from segjax.tiling import Tiling
from segjax.train.state import create_train_state


def _predictor(name="unet", data=None, **kwargs):
  model = get_model(name, num_classes=2, depth=2, base_width=4, **kwargs)
  state = create_train_state(jax.random.PRNGKey(0), model, optax.sgd(0.1), (1, 64, 64, 1))
  data = {"name": "synthetic_cells", "crop_size": 32, **(data or {})}
  config = with_defaults(
    ml_collections.ConfigDict({"dataset_info": {"num_channels": 1, "num_classes": 2}, "data": data})
  )
  return Predictor(config=config, state=state, step=0, geometry=model_geometry(model), devices=(jax.devices()[0],))


def test_saved_model_gives_the_predictor_outputs(tmp_path):
  tf = pytest.importorskip("tensorflow")
  predictor = _predictor()
  export.export_saved_model(predictor, str(tmp_path / "saved"), tile_size=32, input_dtype="uint8", tta="flips")
  loaded = tf.saved_model.load(str(tmp_path / "saved"))
  tiles = (np.random.default_rng(0).random((5, 32, 32, 1)) * 255).astype(np.uint8)
  out = next(iter(loaded.signatures["serving_default"](tiles=tf.constant(tiles)).values())).numpy()
  expected = np.stack([predictor.predict(t, Tiling(mode="whole", tta="flips")) for t in tiles])
  np.testing.assert_allclose(out, expected, atol=1e-5)


def test_unpadded_unet_exports_its_smaller_output_and_bad_tiles_are_refused():
  predictor = _predictor("unet_valid")
  tile = predictor.geometry.fit(60)
  exported = export.export_predictor(predictor, tile_size=tile)
  assert exported.out_avals[0].shape[1:] == (tile - 2 * predictor.geometry.margin,) * 2 + (2,)
  assert str(exported.in_avals[0].shape[0]) == "b"  # symbolic batch
  with pytest.raises(SegjaxError, match=f"--tile_size {tile + 1} is not an input size this model takes"):
    export.export_predictor(predictor, tile_size=tile + 1)


def test_an_export_clips_as_the_run_normalised():
  predictor = _predictor(data={"normalization": "percentile", "intensity_range": (0.2, 0.6)})
  fn = jax.jit(export.predictor_function(predictor, input_dtype="uint8"))
  tiles = (np.random.default_rng(1).random((2, 32, 32, 1)) * 255).astype(np.uint8)
  expected = np.stack([predictor.predict(t, Tiling(mode="whole")) for t in tiles])
  np.testing.assert_allclose(np.asarray(fn(tiles)), expected, atol=1e-5)
  with pytest.raises(SegjaxError, match="'image_percentile', which takes the percentiles of the whole image"):
    export.predictor_function(_predictor(data={"normalization": "image_percentile"}), input_dtype="uint8")
