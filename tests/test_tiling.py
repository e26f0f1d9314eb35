"""Tiled prediction: overlap-tile equals the whole-image prediction, sliding windows blend, TTA, one compilation."""

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from segjax.config import with_defaults
from segjax.errors import SegjaxError
from segjax.inference import Predictor
from segjax.models import get_model
from segjax.models.geometry import model_geometry
from segjax.tiling import (
  Tiling,
  gaussian_weights,
  overlap_tile_plan,
  predict_tiled,
  predict_tiles,
  sliding_window_plan,
)
from segjax.train.state import create_train_state


def _predictor(name="unet", crop_size=None, model=None, **kwargs):
  model = model or get_model(name, num_classes=3, **kwargs)
  geometry = model_geometry(model)
  side = geometry.fit(geometry.margin * 2 + 16)
  state = create_train_state(jax.random.PRNGKey(0), model, optax.sgd(0.1), (1, side, side, 1))
  # non-trivial BatchNorm statistics, so eval mode is not the identity
  state = state.replace(batch_stats=jax.tree_util.tree_map(lambda x: x + 0.1, state.batch_stats))
  config = with_defaults(
    ml_collections.ConfigDict(
      {
        "dataset_info": {"num_channels": 1, "num_classes": 3},
        "data": {"name": "synthetic_cells", "crop_size": crop_size},
      }
    )
  )
  devices = tuple(jax.local_devices())
  replicated = jax.device_put(
    state, jax.sharding.NamedSharding(jax.sharding.Mesh(np.asarray(devices), ("d",)), jax.sharding.PartitionSpec())
  )
  return Predictor(config=config, state=replicated, step=0, geometry=geometry, devices=devices)


def _image(height, width, seed=0):
  rng = np.random.default_rng(seed)
  smooth = rng.random((height // 4 + 2, width // 4 + 2))
  image = np.kron(smooth, np.ones((4, 4)))[:height, :width] * 200 + rng.random((height, width)) * 55
  return image.astype(np.uint8)[..., None]


def test_overlap_tile_equals_the_whole_image_prediction_of_the_unpadded_unet():
  predictor = _predictor("unet_valid", depth=3, base_width=4)  # its tile outputs are not multiples of 8
  geometry = predictor.geometry
  tile = geometry.fit(geometry.margin * 2 + 40)
  image = _image(95, 131)  # several tiles per axis, sizes unrelated to the tile
  plan = overlap_tile_plan(95, 131, geometry, tile)
  assert plan.num_tiles > 4 and plan.used % geometry.align == 0
  whole = predictor.predict(image, Tiling(mode="whole"))
  tiled = predictor.predict(image, Tiling(mode="overlap_tile", tile_size=tile, batch=3))
  assert tiled.shape == whole.shape == (95, 131, 3)
  np.testing.assert_allclose(tiled, whole, atol=2e-5)
  np.testing.assert_allclose(tiled.sum(-1), 1.0, atol=1e-5)


def test_the_default_tile_of_a_tiny_training_crop_still_advances_by_a_pooling_grid():
  predictor = _predictor("unet_valid", depth=3, base_width=4, crop_size=1)  # trained on the smallest tile
  geometry = predictor.geometry
  tile = predictor.default_tile_size()
  assert geometry.fit(tile) == tile and geometry.output_size(tile) >= geometry.align
  assert geometry.output_size(tile - geometry.align) < geometry.align  # and it is the smallest such tile
  assert predictor.predict(_image(40, 24), Tiling(mode="overlap_tile")).shape == (40, 24, 3)


def test_overlap_tile_outputs_tile_the_image_exactly():
  geometry = model_geometry(get_model("unet_valid", num_classes=2, depth=2))
  plan = overlap_tile_plan(50, 30, geometry, geometry.fit(60))
  covered = np.zeros(plan.canvas_shape, int)
  for y, x in plan.output_origins:
    covered[y : y + plan.used, x : x + plan.used] += 1
  assert (covered == 1).all() and plan.canvas_shape[0] >= 50 and plan.canvas_shape[1] >= 30
  with pytest.raises(SegjaxError, match="--tile_size 61 is not an input size this model takes"):
    overlap_tile_plan(50, 30, geometry, 61)


def test_sliding_window_with_one_tile_is_the_whole_image_and_blending_stays_close():
  predictor = _predictor(depth=2, base_width=4)
  image = _image(64, 64)
  whole = predictor.predict(image, Tiling(mode="whole"))
  one_tile = predictor.predict(image, Tiling(mode="sliding_window", tile_size=64))
  np.testing.assert_allclose(one_tile, whole, atol=1e-5)
  for blend in ("gaussian", "uniform"):
    tiled = predictor.predict(image, Tiling(mode="sliding_window", tile_size=32, overlap=0.5, blend=blend))
    np.testing.assert_allclose(tiled.sum(-1), 1.0, atol=1e-5)
    # a same-padded U-Net sees less context in a tile, so only the interior agrees closely
    assert np.abs(tiled - whole)[8:-8, 8:-8].mean() < 0.05


def test_sliding_window_plan_covers_the_image_and_pads_small_images():
  plan = sliding_window_plan(100, 70, 32, 0.25)
  covered = np.zeros(plan.canvas_shape, int)
  for y, x in plan.input_origins:
    covered[y : y + 32, x : x + 32] += 1
  assert covered.min() >= 1 and plan.input_origins.max(0).tolist() == [68, 38]
  small = sliding_window_plan(20, 50, 32, 0.5)
  assert small.canvas_shape == (32, 50) and small.pad_after == (12, 0)
  predictor = _predictor(depth=2, base_width=4)
  for padding in ("reflect", "constant"):
    out = predictor.predict(_image(20, 50), Tiling(mode="sliding_window", tile_size=32, padding=padding))
    assert out.shape == (20, 50, 3)


def test_gaussian_weights_peak_at_the_centre_with_sigma_an_eighth_of_the_tile():
  w = gaussian_weights(64)
  assert w.shape == (64, 64) and w.max() == pytest.approx(1.0, abs=0.01) and w.min() > 0
  centre = 31.5
  sigma = 8.0
  expected = np.exp(-((0 - centre) ** 2) / (2 * sigma**2)) * np.exp(-((31 - centre) ** 2) / (2 * sigma**2))
  assert w[0, 31] == pytest.approx(expected / np.exp(-(0.5**2) / (2 * sigma**2)) ** 2, rel=1e-4)


def test_test_time_augmentation_averages_the_flipped_predictions():
  predictor = _predictor(depth=2, base_width=4)
  state = jax.tree_util.tree_map(lambda x: x.addressable_data(0), predictor.state)
  tiles = jnp.asarray(_image(32, 32)[None].astype(np.float32) / 255.0)
  plain = lambda t: predict_tiles(state, t)  # noqa: E731
  expected = (
    plain(tiles)
    + jnp.flip(plain(jnp.flip(tiles, 2)), 2)
    + jnp.flip(plain(jnp.flip(tiles, 1)), 1)
    + jnp.flip(plain(jnp.flip(tiles, (1, 2))), (1, 2))
  ) / 4
  np.testing.assert_allclose(predict_tiles(state, tiles, tta="flips"), expected, atol=1e-6)
  assert not np.allclose(expected, plain(tiles), atol=1e-4)
  # the 8 dihedral transforms: a rotated image gives the rotated prediction
  eight = predict_tiles(state, tiles, tta="flips_rot90")
  rotated = predict_tiles(state, jnp.rot90(tiles, 1, axes=(1, 2)), tta="flips_rot90")
  np.testing.assert_allclose(jnp.rot90(eight, 1, axes=(1, 2)), rotated, atol=1e-5)


def test_tiled_prediction_of_a_1024_image_compiles_once(caplog):
  predictor = _predictor(depth=2, base_width=4)
  image = _image(1024, 1024)
  tiling = Tiling(mode="sliding_window", tile_size=128, overlap=0.25, batch=8)
  with jax.log_compiles(True), caplog.at_level(logging.WARNING, logger="jax"):
    labels = predictor.predict_labels(image, tiling)
  compiled = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compiling")]
  assert len(compiled) == 1, compiled
  assert labels.shape == (1024, 1024)


def test_instances_drop_small_components():
  predictor = _predictor(depth=2, base_width=4)
  instances = predictor.predict_instances(_image(48, 48), Tiling(mode="whole"), min_size=5)
  labels = predictor.predict_labels(_image(48, 48), Tiling(mode="whole"))
  assert instances.dtype == np.int32 and instances.shape == (48, 48)
  assert ((instances > 0) <= (labels > 0)).all()
  sizes = np.bincount(instances.ravel())[1:]
  assert (sizes >= 5).all()


def test_bad_tiling_options_are_clear_errors():
  with pytest.raises(SegjaxError, match="unknown --tiling 'tiles'"):
    Tiling(mode="tiles")
  with pytest.raises(SegjaxError, match="--overlap must be in"):
    Tiling(overlap=1.0)
  with pytest.raises(SegjaxError, match="unknown --tta 'all'"):
    Tiling(tta="all")


class _PositionalConv(nn.Module):
  """Same-padded: a 3x3 convolution plus a term of the pixel's position in the tile, so that the tiles overlapping a
  pixel predict it differently and any error in their blending shows."""

  @nn.compact
  def __call__(self, x, *, train):
    rows, cols = jnp.meshgrid(jnp.arange(x.shape[1]), jnp.arange(x.shape[2]), indexing="ij")
    position = jnp.stack([jnp.sin(rows * 0.3) * jnp.cos(cols * 0.2), rows / 16.0 - 1.0, 1.0 - cols / 16.0], -1)
    return nn.Conv(3, (3, 3), padding="SAME")(x) * 4.0 + 2.0 * position


def _numpy_softmax(logits):
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _numpy_gaussian(size):
  """The documented importance map: exp(-d^2 / (2 sigma^2)) of the distance d to the tile's centre, sigma = size / 8,
  scaled to peak 1, floored at 1e-6."""
  centre, sigma = (size - 1) / 2.0, size / 8.0
  y, x = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
  w = np.exp(-((y - centre) ** 2 + (x - centre) ** 2) / (2.0 * sigma**2))
  return np.maximum(w / w.max(), 1e-6)


def _numpy_blend(predictor, image, tile, origins_y, origins_x, weights, output="probabilities"):
  """Tile by tile in float64: sum over the tiles of weight * prediction, divided by the sum of the weights."""
  state = jax.tree_util.tree_map(lambda x: x.addressable_data(0), predictor.state)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  total = np.zeros((*image.shape[:2], 3))
  weight_sum = np.zeros((*image.shape[:2], 1))
  for y in origins_y:
    for x in origins_x:
      logits = np.asarray(
        state.apply_fn(variables, image[None, y : y + tile, x : x + tile], train=False)[0], np.float64
      )
      prediction = _numpy_softmax(logits) if output == "probabilities" else logits
      total[y : y + tile, x : x + tile] += weights[..., None] * prediction
      weight_sum[y : y + tile, x : x + tile] += weights[..., None]
  assert weight_sum.min() > 0  # every pixel covered
  return total / weight_sum


# 32-pixel tiles overlapping by half on a 50 x 70 image: stride 16 and a last window flush with the border
_ORIGINS_Y, _ORIGINS_X = (0, 16, 18), (0, 16, 32, 38)


def test_sliding_window_blends_gaussian_and_uniform_weights_like_a_numpy_loop_over_the_tiles():
  predictor = _predictor(model=_PositionalConv())
  image = _image(50, 70)
  plan = sliding_window_plan(50, 70, 32, 0.5)
  assert sorted({int(y) for y, _ in plan.input_origins}) == list(_ORIGINS_Y)
  assert sorted({int(x) for _, x in plan.input_origins}) == list(_ORIGINS_X)
  normalized = image.astype(np.float32) / 255.0
  results = {}
  for blend, weights in (("gaussian", _numpy_gaussian(32)), ("uniform", np.ones((32, 32)))):
    # 12 tiles in batches of 8 (5 rounded up to the 4 devices): the last batch is padded with 4 tiles that count nowhere
    tiling = Tiling(mode="sliding_window", tile_size=32, overlap=0.5, blend=blend, batch=5)
    results[blend] = predictor.predict(image, tiling)
    expected = _numpy_blend(predictor, normalized, 32, _ORIGINS_Y, _ORIGINS_X, weights)
    np.testing.assert_allclose(results[blend], expected, atol=1e-5)
  np.testing.assert_allclose(gaussian_weights(32), _numpy_gaussian(32), rtol=1e-6)
  assert np.abs(results["gaussian"] - results["uniform"]).max() > 0.05  # the weights matter for this model


def test_predict_tiled_blends_logits_as_they_are_over_overlapping_tiles():
  predictor = _predictor(model=_PositionalConv())
  image = _image(50, 70).astype(np.float32) / 255.0
  plan = sliding_window_plan(50, 70, 32, 0.5)
  weights = gaussian_weights(32)
  logits = predict_tiled(predictor.state, image, plan, weights=weights, output="logits")
  expected = _numpy_blend(predictor, image, 32, _ORIGINS_Y, _ORIGINS_X, _numpy_gaussian(32), output="logits")
  np.testing.assert_allclose(logits, expected, atol=1e-5)
  # the blended probabilities are not the softmax of the blended logits once several tiles overlap...
  probabilities = predict_tiled(predictor.state, image, plan, weights=weights)
  assert np.abs(_numpy_softmax(expected) - probabilities).max() > 1e-3
  # ...but they are with a single tile
  one = sliding_window_plan(50, 70, 70, 0.5)
  assert one.num_tiles == 1
  np.testing.assert_allclose(
    jax.nn.softmax(predict_tiled(predictor.state, image, one, output="logits"), -1),
    predict_tiled(predictor.state, image, one),
    atol=1e-5,
  )
