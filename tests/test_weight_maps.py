"""U-Net weight map (Ronneberger et al. 2015, Eq. 2): hand-computed values, brute-force agreement, validation."""

import math

import numpy as np
import pytest
from scipy import ndimage

from segjax import weight_maps
from segjax.errors import SegjaxError
from segjax.weight_maps import (
  border_cutoff,
  border_weights,
  class_balance_from_counts,
  class_balance_weights,
  class_pixel_counts,
  unet_weight_map,
)


def brute_force_border_weights(instances: np.ndarray, w0: float, sigma: float) -> np.ndarray:
  """Eq. 2's border term from a full-image distance transform per object and the exact two smallest distances."""
  ids = np.unique(instances)
  ids = ids[ids > 0]
  if len(ids) < 2:
    return np.zeros(instances.shape)
  dists = np.sort(np.stack([ndimage.distance_transform_edt(instances != k) for k in ids]), axis=0)
  term = w0 * np.exp(-((dists[0] + dists[1]) ** 2) / (2 * sigma**2))
  return np.where(instances == 0, term, 0.0)


def random_instances(rng: np.random.Generator, shape: tuple[int, int], num_objects: int) -> np.ndarray:
  """Random discs and rectangles, often touching or overlapping (later ones win), with non-consecutive ids."""
  out = np.zeros(shape, np.int32)
  rows, cols = np.indices(shape)
  ids = rng.choice(np.arange(1, 1000), num_objects, replace=False)
  for k in ids:
    r, c = rng.integers(0, shape[0]), rng.integers(0, shape[1])
    if rng.random() < 0.5:
      mask = (rows - r) ** 2 + (cols - c) ** 2 <= rng.integers(1, 6) ** 2
    else:
      mask = (abs(rows - r) <= rng.integers(0, 4)) & (abs(cols - c) <= rng.integers(0, 4))
    out[mask] = k
  return out


def test_hand_computed_line():
  # Objects 5, 9, 2 at columns 0, 3, 8. Column 1: d1 = 1 (to 5), d2 = 2 (to 9), d3 = 7 ignored -> d1 + d2 = 3.
  # Column 4: d = 1 (to 9), 4 (to 5), 4 (to 2) -> 5; columns 5, 6, 7: (2, 3), (3, 2), (4, 1) -> 5 as well.
  instances = np.array([[5, 0, 0, 9, 0, 0, 0, 0, 2]])
  near = 10 * math.exp(-(3**2) / (2 * 5**2))  # 10 exp(-0.18) = 8.35270211...
  gap = 10 * math.exp(-(5**2) / (2 * 5**2))  # 10 exp(-0.5) = 6.06530659...
  expected = [0.0, near, near, 0.0, gap, gap, gap, gap, 0.0]
  np.testing.assert_allclose(expected[1], 8.35270211411272)
  np.testing.assert_allclose(expected[4], 6.065306597126334)
  out = border_weights(instances)
  assert out.dtype == np.float32 and out.shape == (1, 9)
  np.testing.assert_allclose(out[0], expected, rtol=1e-6)


def test_hand_computed_diagonal():
  # Objects at opposite corners of a 3 x 3 image. Centre: d1 = d2 = sqrt(2) -> (2 sqrt 2)^2 = 8. Corner (0, 2):
  # d1 = d2 = 2 -> 16. Edge (0, 1): d1 = 1, d2 = sqrt(5) -> (1 + sqrt 5)^2.
  instances = np.array([[1, 0, 0], [0, 0, 0], [0, 0, 2]])
  out = border_weights(instances, w0=10.0, sigma=5.0)
  np.testing.assert_allclose(out[1, 1], 10 * math.exp(-8 / 50), rtol=1e-6)  # 8.52143789...
  np.testing.assert_allclose(out[0, 2], 10 * math.exp(-16 / 50), rtol=1e-6)  # 7.26149037...
  np.testing.assert_allclose(out[0, 1], 10 * math.exp(-((1 + math.sqrt(5)) ** 2) / 50), rtol=1e-6)
  assert out[0, 0] == 0 and out[2, 2] == 0


def test_symmetric_under_flips_and_transpose():
  instances = random_instances(np.random.default_rng(1), (30, 41), 12)
  out = border_weights(instances)
  np.testing.assert_allclose(border_weights(instances[::-1]), out[::-1], atol=1e-6)
  np.testing.assert_allclose(border_weights(instances[:, ::-1]), out[:, ::-1], atol=1e-6)
  np.testing.assert_allclose(border_weights(instances.T), out.T, atol=1e-6)


@pytest.mark.parametrize("instances", [np.zeros((6, 7), np.int64), np.pad(np.full((2, 3), 4), 2)])
def test_fewer_than_two_objects_gives_zero(instances):
  out = border_weights(instances)
  assert out.shape == instances.shape
  np.testing.assert_array_equal(out, 0)


def test_far_apart_objects_negligible():
  instances = np.zeros((9, 200), np.int32)
  instances[3:6, 10:13] = 1
  instances[3:6, 150:153] = 2
  out = border_weights(instances, tolerance=1e-4)
  # Exact value at the best pixel (midway, d1 + d2 = 138) is 10 exp(-138^2 / 50) ~ 1e-164.
  assert out.max() <= 1e-4 * 10
  np.testing.assert_array_equal(out, 0)


def test_cutoff_bound():
  assert border_cutoff(5.0, 1e-4) == 22  # 5 sqrt(2 ln 1e4) = 21.46
  assert border_cutoff(3.0, 1e-2) == 10  # 3 sqrt(2 ln 100) = 9.10
  for sigma, tol in [(5.0, 1e-4), (3.0, 1e-2), (1.5, 0.3)]:
    m = border_cutoff(sigma, tol)
    assert math.exp(-(m**2) / (2 * sigma**2)) <= tol < math.exp(-((m - 1) ** 2) / (2 * sigma**2))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("sigma", "tolerance"), [(3.0, 1e-2), (5.0, 1e-4), (2.0, 0.2)])
def test_matches_brute_force_within_documented_tolerance(seed, sigma, tolerance):
  rng = np.random.default_rng(seed)
  instances = random_instances(rng, (40, 57), int(rng.integers(2, 25)))
  w0 = 10.0
  expected = brute_force_border_weights(instances, w0, sigma)
  out = border_weights(instances, w0=w0, sigma=sigma, tolerance=tolerance)
  # The documented bound tolerance * w0, plus float32 rounding of values up to w0.
  assert np.abs(out - expected).max() <= tolerance * w0 + 1e-6 * w0
  # With a cutoff beyond the image size nothing is dropped: the same as brute force up to float32 rounding.
  exact = border_weights(instances, w0=w0, sigma=sigma, tolerance=1e-300)
  assert border_cutoff(sigma, 1e-300) > max(instances.shape)
  np.testing.assert_allclose(exact, expected, rtol=1e-6, atol=1e-30)


def test_distance_transforms_only_on_grown_boxes(monkeypatch):
  # Speed sanity without timing: every distance transform covers an object's box grown by the cutoff, not the image.
  shapes = []
  edt = ndimage.distance_transform_edt

  def recording_edt(x, *args, **kwargs):
    shapes.append(x.shape)
    return edt(x, *args, **kwargs)

  monkeypatch.setattr(weight_maps.ndimage, "distance_transform_edt", recording_edt)
  instances = np.zeros((300, 300), np.int32)
  for i, (r, c) in enumerate(np.ndindex(6, 6)):
    instances[50 * r + 10 : 50 * r + 16, 50 * c + 10 : 50 * c + 16] = 3 * i + 7
  border_weights(instances, sigma=5.0, tolerance=1e-4)
  m = border_cutoff(5.0, 1e-4)
  assert len(shapes) == 36
  assert max(h * w for h, w in shapes) <= (6 + 2 * m) ** 2


def test_non_consecutive_and_huge_ids_match_relabelled():
  instances = random_instances(np.random.default_rng(7), (25, 30), 10)
  _, consecutive = np.unique(instances, return_inverse=True)
  consecutive = consecutive.reshape(instances.shape)
  huge = np.where(instances > 0, instances.astype(np.uint64) + np.uint64(2**62), 0).astype(np.uint64)
  expected = border_weights(consecutive)
  np.testing.assert_array_equal(border_weights(instances), expected)
  np.testing.assert_array_equal(border_weights(huge), expected)
  np.testing.assert_array_equal(border_weights(instances.astype(np.uint16)), expected)


def test_class_balance_hand_example():
  # 6 pixels of class 0, 2 of class 1, none of class 2, 2 ignored; total 8 over 2 present classes:
  # w_0 = 8 / (2 * 6) = 2/3, w_1 = 8 / (2 * 2) = 2, w_2 = 0; mean weight over counted pixels (6 * 2/3 + 2 * 2) / 8 = 1.
  labels = np.array([[0, 0, 0, 1, 255], [0, 0, 0, 1, 255]])
  np.testing.assert_array_equal(class_pixel_counts(labels, 3, ignore_label=255), [6, 2, 0])
  weights = class_balance_weights(labels, 3, ignore_label=255)
  assert weights.dtype == np.float32
  np.testing.assert_allclose(weights, [2 / 3, 2.0, 0.0], rtol=1e-6)
  # Counts accumulated over a "dataset" of two images give the same weights as the images together.
  counts = class_pixel_counts(labels[:1], 3, ignore_label=255) + class_pixel_counts(labels[1:], 3, ignore_label=255)
  np.testing.assert_allclose(class_balance_from_counts(counts), weights)
  np.testing.assert_array_equal(class_balance_from_counts([0, 0]), [0, 0])


def test_unet_weight_map_adds_class_weights_and_zeroes_ignored():
  instances = np.array([[5, 0, 0, 9, 0, 0, 0, 0, 2]])
  labels = np.array([[1, 0, 255, 1, 0, 0, -1, 0, 1]])
  class_weights = np.array([0.5, 3.0], np.float32)
  out = unet_weight_map(instances, labels, class_weights)
  border = border_weights(instances)
  expected = np.array([3.0, 0.5, 0.0, 3.0, 0.5, 0.5, 0.0, 0.5, 3.0]) + np.where(labels[0] >= 0, border[0], 0)
  expected[2] = 0.0
  assert out.dtype == np.float32
  np.testing.assert_allclose(out[0], expected, rtol=1e-6)


@pytest.mark.parametrize(
  ("instances", "match"),
  [
    (np.zeros((2, 3, 4), np.int32), "2-D"),
    (np.zeros(5, np.int32), "2-D"),
    (np.array([[0, -1], [2, 0]]), ">= 0"),
    (np.zeros((3, 3), np.float32), "integer dtype"),
    (np.zeros((3, 3), bool), "integer dtype"),
  ],
)
def test_bad_instances_raise(instances, match):
  with pytest.raises(SegjaxError, match=match):
    border_weights(instances)
  with pytest.raises(SegjaxError, match=match):
    unet_weight_map(instances, np.zeros(instances.shape, np.int32), [1.0])


def test_bad_settings_and_labels_raise():
  instances = np.zeros((3, 3), np.int32)
  with pytest.raises(SegjaxError, match="sigma"):
    border_weights(instances, sigma=0.0)
  with pytest.raises(SegjaxError, match="tolerance"):
    border_weights(instances, tolerance=1.0)
  with pytest.raises(SegjaxError, match="differs"):
    unet_weight_map(instances, np.zeros((3, 4), np.int32), [1.0])
  with pytest.raises(SegjaxError, match="integer dtype"):
    unet_weight_map(instances, np.zeros((3, 3)), [1.0])
  with pytest.raises(SegjaxError, match=r"label 3 is outside \[0, 3\)"):
    class_pixel_counts(np.array([0, 1, 3]), 3)
  with pytest.raises(SegjaxError, match="counts"):
    class_balance_from_counts([1, -1])


def test_balanced_class_weights_of_the_config_are_inverse_training_pixel_frequencies():
  # data.weight_map.class_weights='balanced' counts the training split's pixels per class (labels outside the classes,
  # here 255, are not counted) and sets w_c = total / (num_present * count_c), 0 for a class with no pixel.
  import ml_collections

  from segjax.data import Dataset
  from segjax.train.loop import weight_map_of

  rng = np.random.default_rng(0)
  masks = [rng.choice([0, 0, 0, 0, 1, 1, 2, 255], size=(6, 5 + i, 1)).astype(np.uint8) for i in range(3)]
  source = [{"mask": mask} for mask in masks]
  dataset = Dataset(
    "fake", num_classes=4, num_channels=1, class_names=("bg", "a", "b", "c"), splits={}, has_instances=True
  )
  config = ml_collections.ConfigDict(
    {"data": {"weight_map": {"enabled": True, "class_weights": "balanced", "w0": 7.0}}}
  )
  weight_map = weight_map_of(config, dataset, source)
  counts = np.array([sum(int(np.sum(m == c)) for m in masks) for c in range(4)], np.float64)
  assert counts[3] == 0 and counts[:3].min() > 0
  expected = np.zeros(4)
  expected[:3] = counts.sum() / (3 * counts[:3])
  np.testing.assert_allclose(weight_map.class_weights, expected, rtol=1e-6)
  np.testing.assert_allclose(np.dot(counts, weight_map.class_weights) / counts.sum(), 1.0, rtol=1e-6)
  assert weight_map.w0 == 7.0
