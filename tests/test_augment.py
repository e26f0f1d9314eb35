"""On-device augmentation ops (segjax.data.augment)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from segjax.data import augment
from segjax.data.augment import (
  AUGMENTATIONS,
  PARAMETER_CHECKS,
  elastic_displacement,
  identity_coordinates,
  make_augment_fn,
  op_parameters,
  random_elastic,
  random_flip,
  random_rot90,
  random_rotate,
  random_scale_crop,
  rotation_coordinates,
  warp,
)
from segjax.errors import SegjaxError

SIZE = 32
KEY = jax.random.PRNGKey(0)
WARPS = {
  "scale_crop": (random_scale_crop, {"min_scale": 0.7, "max_scale": 1.4}),
  "rotate": (random_rotate, {"max_degrees": 30.0}),
  "elastic": (random_elastic, {"sigma": 4.0}),
}


def _example():
  image = jnp.arange(5 * 5 * 2, dtype=jnp.float32).reshape(5, 5, 2)
  return {"image": image, "label": image[..., 0].astype(jnp.int32), "weights": image[..., 1]}


def _blocks(size: int = SIZE, block: int = 8, num_classes: int = 3) -> dict[str, jax.Array]:
  """Label of square blocks with classes 1..num_classes; the image is its one-hot encoding, weights = 2 * label."""
  rows, cols = np.indices((size, size)) // block
  label = jnp.asarray((rows + 2 * cols) % num_classes + 1, jnp.int32)
  image = jax.nn.one_hot(label - 1, num_classes, dtype=jnp.float32)
  return {"image": image, "label": label, "weights": 2.0 * label.astype(jnp.float32)}


@pytest.mark.parametrize("op", [random_flip, random_rot90])
def test_flip_and_rot90_move_image_label_and_weights_together(op):
  seen = set()
  for seed in range(16):
    out = op(jax.random.PRNGKey(seed), _example())
    np.testing.assert_array_equal(out["label"], out["image"][..., 0].astype(jnp.int32))
    np.testing.assert_array_equal(out["weights"], out["image"][..., 1])
    seen.add(tuple(np.asarray(out["label"]).ravel()))
  assert len(seen) == 4  # 4 flip combinations / 4 rotations, all reached


def test_rot90_on_non_square_images_is_a_clear_error():
  example = {"image": jnp.zeros((4, 6, 1)), "label": jnp.zeros((4, 6), jnp.int32)}
  with pytest.raises(SegjaxError, match="rot90 needs square images, got 4x6"):
    random_rot90(jax.random.PRNGKey(0), example)


@pytest.mark.parametrize(
  "name, params",
  [
    ("scale_crop", {"min_scale": 1.0, "max_scale": 1.0}),
    ("rotate", {"max_degrees": 0.0}),
    ("elastic", {"sigma": 0.0}),
    ("rotate", {"max_degrees": 45.0, "probability": 0.0, "mode": "constant"}),
    ("intensity", {"probability": 0.0}),
    ("noise", {"probability": 0.0}),
    ("blur", {"min_sigma": 0.0, "max_sigma": 0.0}),
    ("flip", {"probability": 0.0}),
  ],
)
def test_identity_settings_reproduce_the_input(name, params):
  example = _blocks()
  example["image"] = jax.random.uniform(KEY, (SIZE, SIZE, 3))
  out = AUGMENTATIONS[name](jax.random.PRNGKey(3), example, **params)
  for key in example:
    np.testing.assert_array_equal(out[key], example[key], err_msg=key)


@pytest.mark.parametrize("name", list(WARPS))
@pytest.mark.parametrize("mode", ["reflect", "constant"])
def test_warps_keep_label_values_dtypes_and_move_image_and_label_together(name, mode):
  op, params = WARPS[name]
  example = _blocks()
  out = op(jax.random.PRNGKey(1), example, mode=mode, **params)
  assert {k: (v.shape, v.dtype) for k, v in out.items()} == {k: (v.shape, v.dtype) for k, v in example.items()}
  assert set(np.unique(out["label"])) <= {1, 2, 3}
  assert not np.array_equal(out["label"], example["label"])
  # Where all 4 bilinear neighbours agree (image exactly one-hot), the nearest-neighbour label is the same class.
  clear = np.asarray(out["image"].max(-1) > 0.999)
  assert clear.mean() > 0.5
  np.testing.assert_array_equal(np.argmax(out["image"], -1)[clear] + 1, np.asarray(out["label"])[clear])
  # Weights follow their label (weights = 2 * label) wherever they are not excluded.
  kept = np.asarray(out["weights"] > 0)
  np.testing.assert_array_equal(np.asarray(out["weights"])[kept], 2.0 * np.asarray(out["label"])[kept])
  if mode == "reflect":
    assert kept.all()


def test_constant_mode_excludes_pixels_from_outside_and_creates_weights():
  example = {"image": jnp.ones((SIZE, SIZE, 1)), "label": jnp.ones((SIZE, SIZE), jnp.int32)}
  out = random_scale_crop(KEY, example, min_scale=0.5, max_scale=0.5, mode="constant")  # zoom out: image is 16x16
  assert out["weights"].dtype == jnp.float32
  assert float(out["weights"].sum()) == 16 * 16
  np.testing.assert_array_equal(out["image"][..., 0], out["weights"])  # image 0 exactly where excluded
  np.testing.assert_array_equal(out["label"], 1)  # no new class id outside
  assert "weights" not in random_scale_crop(KEY, example, min_scale=0.5, max_scale=0.5)  # reflect: nothing excluded


def test_rotation_by_90_degrees_matches_rot90():
  example = _blocks()
  example["image"] = jax.random.uniform(KEY, (SIZE, SIZE, 2))
  out = warp(example, rotation_coordinates(identity_coordinates((SIZE, SIZE)), 90.0))
  np.testing.assert_allclose(out["image"], jnp.rot90(example["image"], 1, axes=(0, 1)), atol=1e-5)
  np.testing.assert_array_equal(out["label"], jnp.rot90(example["label"], 1))
  np.testing.assert_array_equal(out["weights"], jnp.rot90(example["weights"], 1))


def test_elastic_displacement_follows_the_paper_grid():
  sigma, shape = 10.0, (33, 33)  # 3x3 nodes at rows/cols 0, 16, 32
  keys = jax.random.split(KEY, 256)
  fields = jax.jit(jax.vmap(lambda k: elastic_displacement(k, shape, grid_size=3, sigma=sigma)))(keys)
  assert fields.shape == (256, 2, 33, 33)
  at_nodes = fields[:, :, ::16, ::16]
  # The per-pixel field passes through the node vectors, which are N(0, sigma^2) per component.
  nodes = jax.vmap(lambda k: sigma * jax.random.normal(k, (2, 3, 3)))(keys)
  np.testing.assert_allclose(at_nodes, nodes, atol=1e-4)
  assert abs(float(jnp.std(at_nodes)) - sigma) < 0.1 * sigma
  assert abs(float(jnp.mean(at_nodes))) < 0.1 * sigma
  # Smooth: neighbouring pixels move alike (the nodes are 16 pixels apart).
  assert float(jnp.abs(jnp.diff(fields, axis=2)).max()) < sigma
  assert float(jnp.abs(jnp.diff(fields, axis=2)).mean()) < 0.1 * sigma


def test_image_only_ops_leave_label_and_weights_and_keep_range():
  example = _blocks()
  example["image"] = jax.random.uniform(KEY, (SIZE, SIZE, 3))
  for name, params in [
    ("intensity", {"saturation": 0.5, "color": 0.2}),
    ("noise", {"max_std": 0.2}),
    ("blur", {"min_sigma": 1.0, "max_sigma": 2.0}),
  ]:
    out = AUGMENTATIONS[name](jax.random.PRNGKey(5), example, **params)
    np.testing.assert_array_equal(out["label"], example["label"])
    np.testing.assert_array_equal(out["weights"], example["weights"])
    assert out["image"].dtype == jnp.float32 and out["image"].shape == example["image"].shape
    assert 0.0 <= float(out["image"].min()) and float(out["image"].max()) <= 1.0
    assert float(jnp.abs(out["image"] - example["image"]).mean()) > 1e-3, name
  # A blur keeps a constant image and smooths a random one.
  flat = augment.gaussian_blur(jnp.full((SIZE, SIZE, 1), 0.25), 1.5, radius=5)
  np.testing.assert_allclose(flat, 0.25, atol=1e-6)
  assert float(augment.gaussian_blur(example["image"], 1.5, radius=5).std()) < 0.5 * float(example["image"].std())


def _config(ops, **params) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"ops": ops, **params})


def test_augment_fn_compiles_once_keeps_shapes_and_is_deterministic():
  traces = []
  config = _config(
    ["flip", "rot90", "scale_crop", "rotate", "elastic", "intensity", "noise", "blur"],
    elastic={"grid_size": 3, "sigma": 3.0},
    rotate={"max_degrees": 15.0, "mode": "constant"},
    blur={"probability": 0.5},
  )
  fn = make_augment_fn(config)

  @jax.jit
  def augment_batch(key, batch):
    traces.append(1)
    return fn(key, batch)

  batch = jax.tree_util.tree_map(lambda x: jnp.stack([x] * 4), _blocks())
  del batch["weights"]
  out = augment_batch(jax.random.PRNGKey(0), batch)
  again = augment_batch(jax.random.PRNGKey(0), batch)
  other = augment_batch(jax.random.PRNGKey(1), batch)
  assert len(traces) == 1
  # A 'constant' warp adds weights (ones where the pixel comes from inside the image).
  assert set(out) == {"image", "label", "weights"}
  assert out["image"].shape == batch["image"].shape and out["image"].dtype == jnp.float32
  assert out["label"].shape == batch["label"].shape and out["label"].dtype == jnp.int32
  assert out["weights"].shape == batch["label"].shape and out["weights"].dtype == jnp.float32
  assert set(np.unique(out["weights"])) <= {0.0, 1.0}
  assert set(np.unique(out["label"])) <= {1, 2, 3}
  for key in out:
    np.testing.assert_array_equal(out[key], again[key])
  assert not np.array_equal(out["image"], other["image"])
  assert len({np.asarray(x).tobytes() for x in out["label"]}) == 4  # one key per example


def test_consecutive_warps_are_one_resampling_of_the_same_transform():
  # A linear ramp image: bilinear resampling is exact on it, so one-by-one and composed warps agree where the
  # sampled positions stay inside the image (the centre), and the composition order is checked.
  rows, cols = np.indices((SIZE, SIZE)) / SIZE
  example = {"image": jnp.asarray(np.stack([rows, cols], -1), jnp.float32), "label": jnp.zeros((SIZE, SIZE), int)}
  config = _config(["rotate", "elastic"], rotate={"max_degrees": 20.0}, elastic={"sigma": 2.0})
  fused = make_augment_fn(config)(KEY, jax.tree_util.tree_map(lambda x: x[None], example))["image"][0]
  rotate_key, elastic_key = jax.random.split(jax.random.split(KEY, 1)[0], 2)  # the keys make_augment_fn gives
  one_by_one = random_elastic(elastic_key, random_rotate(rotate_key, example, max_degrees=20.0), sigma=2.0)
  swapped = random_rotate(rotate_key, random_elastic(elastic_key, example, sigma=2.0), max_degrees=20.0)
  centre = (slice(8, 24), slice(8, 24))
  np.testing.assert_allclose(fused[centre], one_by_one["image"][centre], atol=1e-5)
  assert float(jnp.abs(fused - swapped["image"])[centre].max()) > 1e-2
  assert float(jnp.abs(fused - example["image"])[centre].max()) > 1e-2


def test_make_augment_fn_without_ops_is_none():
  assert make_augment_fn(_config([])) is None


@pytest.mark.parametrize(
  "config, message",
  [
    (_config(["flip", "shear"]), "unknown augmentation 'shear'"),
    (_config(["rotate"], rotate={"max_angle": 10.0}), r"unknown parameter augment.rotate.max_angle; rotate takes: "),
    (_config(["elastic"], elastic={"grid_size": 1}), r"augment.elastic.grid_size must be an integer >= 2, got 1"),
    (_config(["elastic"], elastic={"sigma": -1.0}), r"augment.elastic.sigma must be a number >= 0"),
    (_config(["noise"], noise={"probability": 1.5}), r"augment.noise.probability must be a number in \[0, 1\]"),
    (_config(["rotate"], rotate={"mode": "wrap"}), r"augment.rotate.mode must be 'reflect' or 'constant'"),
    (_config(["blur"], blur={"min_sigma": 2.0}), r"augment.blur.min_sigma \(2.0\) must not exceed .*max_sigma"),
    (_config(["scale_crop"], scale_crop={"min_scale": 0}), r"augment.scale_crop.min_scale must be a number > 0"),
    (_config(["intensity"], intensity={"contrast": "high"}), r"augment.intensity.contrast must be a number in"),
    (_config(["rotate"], rotate=15.0), r"config key augment.rotate must be a dict of rotate parameters"),
  ],
)
def test_config_errors_name_the_key(config, message):
  with pytest.raises(SegjaxError, match=message):
    make_augment_fn(config)


def test_every_op_parameter_is_checked_and_has_a_valid_default():
  for name in AUGMENTATIONS:
    for key, default in op_parameters(name).items():
      check, _ = PARAMETER_CHECKS[key]
      assert check(default), f"{name}.{key}"
    assert "probability" in op_parameters(name)
