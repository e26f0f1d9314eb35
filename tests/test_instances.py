"""Instance targets (contour, distance) and the watershed that turns their probabilities back into instances."""

import os
import time

import numpy as np
import pytest

from segjax.data.io import read_label
from segjax.errors import SegjaxError
from segjax.instances import instance_targets, instances_from_predictions, normalised_distance, num_target_classes
from segjax.metrics import instance_average_precision
from tests.test_datasets import DSB, needs_dsb

# A scikit-image deprecation (or any other warning) in the post-processing fails the test that triggers it.
pytestmark = pytest.mark.filterwarnings("error")


def _one_hot(targets: np.ndarray, num_classes: int) -> np.ndarray:
  return np.eye(num_classes, dtype=np.float32)[targets]


def _disc(shape, centre, radius) -> np.ndarray:
  rows, cols = np.indices(shape)
  return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


def _touching_discs() -> np.ndarray:
  """Two radius-8 discs 15 px apart on row 20: they overlap in a sliver, which the second id wins."""
  instances = np.zeros((40, 56), np.int32)
  instances[_disc(instances.shape, (20, 20), 8)] = 1
  instances[_disc(instances.shape, (20, 35), 8)] = 2
  return instances


def _iou(a: np.ndarray, b: np.ndarray) -> float:
  return np.count_nonzero(a & b) / np.count_nonzero(a | b)


def _matched_owners(predicted: np.ndarray, instances: np.ndarray) -> list[int]:
  """For each true object 1..K, the predicted instance that covers most of it (0 if background does)."""
  return [int(np.bincount(predicted[instances == k]).argmax()) for k in range(1, instances.max() + 1)]


def _matched_ious(predicted: np.ndarray, instances: np.ndarray) -> list[float]:
  """For each true object, the IoU of the predicted instance that covers most of it."""
  owners = _matched_owners(predicted, instances)
  return [_iou(predicted == owner, instances == k + 1) if owner else 0.0 for k, owner in enumerate(owners)]


def test_num_target_classes():
  assert num_target_classes("contour") == 3
  assert num_target_classes("distance") == 5
  assert num_target_classes("distance", distance_bins=8) == 9


def test_contour_boundary_on_both_sides_of_the_contact_line_of_touching_discs():
  instances = _touching_discs()
  targets = instance_targets(instances, "contour")
  assert targets.dtype == np.uint8 and targets.shape == instances.shape
  # on row 20 disc 1 spans columns 12-28 and disc 2 27-43; disc 2 won the overlap, so disc 1 ends at 26
  row = instances[20]
  last_of_1 = np.flatnonzero(row == 1).max()
  assert row[last_of_1 + 1] == 2
  np.testing.assert_array_equal(targets[20, last_of_1 - 1 : last_of_1 + 3], [2, 2, 2, 2])  # width 2 on each side
  assert targets[20, 20] == 1 and targets[20, 35] == 1  # the centres are interior
  assert targets[0, 0] == 0
  # the interiors of the two discs are not even 8-adjacent, so they are two markers
  interior_1 = (targets == 1) & (instances == 1)
  interior_2 = (targets == 1) & (instances == 2)
  grown = np.zeros_like(interior_1)
  for dr in (-1, 0, 1):
    for dc in (-1, 0, 1):
      grown |= np.roll(interior_1, (dr, dc), axis=(0, 1))
  assert not (grown & interior_2).any()


@pytest.mark.parametrize("kind", ["contour", "distance"])
def test_one_hot_targets_of_touching_discs_give_back_the_two_discs(kind):
  instances = _touching_discs()
  targets = instance_targets(instances, kind)
  predicted = instances_from_predictions(_one_hot(targets, num_target_classes(kind)), kind)
  assert predicted.dtype == np.int32
  assert sorted(np.unique(predicted)) == [0, 1, 2]
  ious = _matched_ious(predicted, instances)
  assert min(ious) > 0.9, ious
  assert _matched_owners(predicted, instances) in ([1, 2], [2, 1])


def test_components_method_merges_the_touching_discs():
  targets = instance_targets(_touching_discs(), "contour")
  predicted = instances_from_predictions(_one_hot(targets, 3), "contour", method="components")
  assert predicted.dtype == np.int32 and predicted.max() == 1


def _adjacent_squares() -> np.ndarray:
  """Two 6x6 squares, rows 2-7; id 1 in columns 2-7 and id 2 in columns 8-13 (they share the edge between 7 and 8)."""
  instances = np.zeros((10, 16), np.int32)
  instances[2:8, 2:8] = 1
  instances[2:8, 8:14] = 2
  return instances


def test_contour_width_2_on_two_squares_that_share_an_edge():
  targets = instance_targets(_adjacent_squares(), "contour", boundary_width=2)
  np.testing.assert_array_equal(targets[4, 6:10], [2, 2, 2, 2])  # two pixels each side of the contact line
  np.testing.assert_array_equal(targets[4, 2:4], [2, 2])  # a free edge gets two pixels
  np.testing.assert_array_equal(targets[2:4, 4], [2, 2])
  assert targets[4, 4] == targets[5, 5] == 1  # middle of square 1
  assert targets[4, 10] == targets[5, 11] == 1  # middle of square 2
  assert targets[0, 0] == targets[4, 0] == targets[4, 15] == targets[9, 8] == 0
  assert np.count_nonzero(targets == 1) == 2 * 4  # a 2x2 interior in each square


def test_contour_width_1_on_two_squares_that_share_an_edge():
  targets = instance_targets(_adjacent_squares(), "contour", boundary_width=1)
  np.testing.assert_array_equal(targets[4, 6:10], [1, 2, 2, 1])
  assert targets[4, 2] == 2 and targets[4, 3] == 1
  assert np.count_nonzero(targets == 1) == 2 * 16  # a 4x4 interior in each square


def test_contour_image_border_is_not_a_boundary():
  instances = np.zeros((8, 8), np.int32)
  instances[:, :4] = 1  # cut by the top, bottom and left edges of the image
  targets = instance_targets(instances, "contour", boundary_width=1)
  np.testing.assert_array_equal(targets[:, 3], 2)
  np.testing.assert_array_equal(targets[:, :3], 1)


def test_contour_tiny_objects_keep_an_interior_and_come_back():
  instances = np.zeros((16, 16), np.int32)
  instances[1:3, 1:3] = 1  # 2x2: all interior (no pixel can be boundary without emptying it)
  instances[6:9, 1:4] = 2  # 3x3: a one-pixel ring and its centre, even at width 2
  instances[2:14, 6:14] = 3  # a large object that a tiny one touches
  instances[12:14, 4:6] = 4  # 2x2 touching object 3 from the left
  targets = instance_targets(instances, "contour", boundary_width=2)
  np.testing.assert_array_equal(targets[1:3, 1:3], 1)
  assert targets[7, 2] == 1 and np.count_nonzero(targets[6:9, 1:4] == 2) == 8
  np.testing.assert_array_equal(targets[12:14, 4:6], 1)
  np.testing.assert_array_equal(targets[12:14, 6:8], 2)  # the large object's side of the contact
  predicted = instances_from_predictions(_one_hot(targets, 3), "contour", min_size=1)
  assert predicted.max() == 4
  owners = _matched_owners(predicted, instances)
  assert 0 not in owners and len(set(owners)) == 4
  for k in (1, 2, 4):  # each tiny object lies whole in its own instance
    assert np.all(predicted[instances == k] == owners[k - 1])
  assert _iou(predicted == owners[2], instances == 3) > 0.9  # the 2x2 may take a corner of the large one's boundary


def test_distance_levels_increase_towards_the_core():
  instances = np.zeros((13, 13), np.int32)
  instances[2:11, 2:11] = 1  # 9x9 square, centre (6, 6)
  targets = instance_targets(instances, "distance", distance_bins=4)
  assert targets.dtype == np.uint8 and set(np.unique(targets)) == {0, 1, 2, 3, 4}
  row = targets[6, 2:7]  # from the left edge to the centre
  assert row[0] == 1 and row[-1] == 4
  assert np.all(np.diff(row.astype(int)) >= 0)
  assert targets[6, 6] == 4 and targets[0, 0] == 0
  np.testing.assert_array_equal(targets[6], targets[:, 6])  # symmetric
  assert np.count_nonzero(targets == 4) < np.count_nonzero(targets == 1)


def test_normalised_distance_measures_touching_objects_apart():
  distance = normalised_distance(_adjacent_squares())
  assert distance.dtype == np.float32
  # each 6x6 square peaks at 1 in its own middle (distance 3 of 3); the shared edge is the outermost ring of both
  assert distance[4, 4] == distance[4, 11] == 1.0
  assert distance[4, 7] == distance[4, 8] == pytest.approx(1 / 3)
  assert distance[0, 0] == 0


def test_min_size_removes_a_speck_and_holes_are_filled():
  instances = np.zeros((24, 24), np.int32)
  instances[2:14, 2:14] = 1
  instances[7:9, 7:9] = 0  # a 2x2 hole in the middle
  instances[18:20, 18:20] = 2  # a 4-pixel speck
  probabilities = _one_hot(instance_targets(instances, "contour"), 3)
  predicted = instances_from_predictions(probabilities, "contour", min_size=10)
  assert predicted.max() == 1
  np.testing.assert_array_equal(predicted[2:14, 2:14], 1)  # the hole belongs to the object
  assert not predicted[18:20, 18:20].any()
  kept = instances_from_predictions(probabilities, "contour", min_size=4)
  assert kept.max() == 2 and np.all(kept[18:20, 18:20] == 2)
  unfilled = instances_from_predictions(probabilities, "contour", fill_holes=False)
  assert not unfilled[7:9, 7:9].any()


def test_a_pocket_between_two_objects_is_not_a_hole():
  instances = np.zeros((12, 20), np.int32)
  instances[2:10, 2:10] = 1
  instances[2:10, 10:18] = 2
  instances[5:7, 8:12] = 0  # background pocket enclosed by the two objects together, by neither alone
  predicted = instances_from_predictions(_one_hot(instance_targets(instances), 3), "contour")
  assert predicted.max() == 2 and not predicted[5:7, 8:12].any()


def test_a_foreground_blob_without_a_confident_marker_is_its_own_instance():
  probabilities = np.zeros((20, 20, 3), np.float32)
  probabilities[..., 0] = 1.0
  probabilities[2:10, 2:10] = [0.0, 0.9, 0.1]  # a confident object
  probabilities[13:18, 13:18] = [0.1, 0.4, 0.5]  # foreground, but P(interior) never reaches 0.5
  predicted = instances_from_predictions(probabilities, "contour")
  assert predicted.max() == 2
  assert np.all(predicted[13:18, 13:18] == predicted[15, 15]) and predicted[15, 15] not in (0, predicted[5, 5])
  distance = np.zeros((20, 20, 5), np.float32)
  distance[..., 0] = 1.0
  distance[13:18, 13:18] = [0.2, 0.8, 0.0, 0.0, 0.0]  # foreground, all outermost level: no core above 0.5
  assert np.all(instances_from_predictions(distance, "distance")[13:18, 13:18] == 1)


def test_thresholds_decide_markers_and_foreground():
  probabilities = np.zeros((10, 10, 3), np.float32)
  probabilities[..., 0] = 1.0
  probabilities[2:8, 2:8] = [0.45, 0.55, 0.0]
  assert instances_from_predictions(probabilities, "contour").max() == 1
  assert instances_from_predictions(probabilities, "contour", foreground_threshold=0.6).max() == 0


def test_distance_marker_uses_the_expected_depth_given_foreground():
  # Left: P(core) = 0.6, P(background) = 0.4, so E given foreground is the core's centre 0.875 (unconditioned 0.525).
  # It is a marker of its own, split from the sure core on the right by a column of the outermost level.
  probabilities = np.zeros((10, 12, 5), np.float32)
  probabilities[..., 0] = 1.0
  probabilities[2:8, 2:6] = [0.4, 0.0, 0.0, 0.0, 0.6]
  probabilities[2:8, 6] = [0.0, 1.0, 0.0, 0.0, 0.0]
  probabilities[2:8, 7:11] = [0.0, 0.0, 0.0, 0.0, 1.0]
  predicted = instances_from_predictions(probabilities, "distance", marker_threshold=0.8, min_size=1)
  assert predicted.max() == 2 and predicted[4, 3] != predicted[4, 9]
  assert np.all(predicted[2:8, 2:6] == predicted[4, 3]) and np.all(predicted[2:8, 7:11] == predicted[4, 9])


@pytest.mark.parametrize(
  ("kwargs", "message"),
  [
    (dict(probabilities=np.zeros((4, 4)), kind="contour"), "must be an \\(H, W, C\\) array"),
    (dict(probabilities=np.zeros((2, 4, 4, 3)), kind="contour"), "must be an \\(H, W, C\\) array"),
    (dict(probabilities=np.zeros((4, 4, 5)), kind="contour"), "need C = 3"),
    (dict(probabilities=np.zeros((4, 4, 2)), kind="distance"), "distance_bins \\+ 1 >= 3"),
    (dict(probabilities=np.full((4, 4, 3), np.nan), kind="contour"), "NaN"),
    (dict(probabilities=np.full((4, 4, 3), 2.5), kind="contour"), "not the logits"),
    (dict(probabilities=np.full((4, 4, 3), -0.5), kind="contour"), "must lie in \\[0, 1\\]"),
    (dict(probabilities=np.full((4, 4, 3), "a"), kind="contour"), "must be numbers"),
    (dict(probabilities=np.zeros((4, 4, 3)), kind="energy"), "kind must be one of contour, distance"),
    (dict(probabilities=np.zeros((4, 4, 3)), kind="contour", method="cc"), "method must be one of"),
  ],
)
def test_instances_from_predictions_rejects_bad_input(kwargs, message):
  with pytest.raises(SegjaxError, match=message):
    instances_from_predictions(**kwargs)
  with pytest.raises(ValueError):  # SegjaxError is a ValueError
    instances_from_predictions(**kwargs)


@pytest.mark.parametrize(
  ("instances", "kwargs", "message"),
  [
    (np.zeros((4, 4, 1), np.int32), {}, "2-D"),
    (np.zeros((4, 4), np.float32), {}, "integer dtype"),
    (np.full((4, 4), -1), {}, ">= 0"),
    (np.zeros((4, 4), np.int32), dict(kind="edges"), "kind must be one of"),
    (np.zeros((4, 4), np.int32), dict(boundary_width=0), "boundary_width must be an integer >= 1"),
    (np.zeros((4, 4), np.int32), dict(boundary_width=1.5), "boundary_width must be an integer >= 1"),
    (np.zeros((4, 4), np.int32), dict(kind="distance", distance_bins=1), "distance_bins must be an integer >= 2"),
  ],
)
def test_instance_targets_rejects_bad_input(instances, kwargs, message):
  with pytest.raises(SegjaxError, match=message):
    instance_targets(instances, **kwargs)


def test_empty_inputs():
  assert not instance_targets(np.zeros((5, 6), np.int32)).any()
  assert not instance_targets(np.zeros((5, 6), np.int32), "distance").any()
  background = _one_hot(np.zeros((5, 6), np.int32), 3)
  assert instances_from_predictions(background).shape == (5, 6) and not instances_from_predictions(background).any()


@needs_dsb
def test_oracle_targets_of_the_dsb2018_validation_split_separate_touching_nuclei():
  """Targets of the true instances, post-processed back, score a DSB AP of >= 0.95; connected components 0.814."""
  start = time.perf_counter()
  folder = os.path.join(DSB, "instances")
  ids = sorted(os.path.splitext(name)[0] for name in os.listdir(folder))
  validation = [ids[position] for position in range(len(ids)) if position % 10 == 0]
  scores = {"components": [], "contour": [], "distance": []}
  for stem in validation:
    instances = read_label(os.path.join(folder, f"{stem}.png"))
    contour = _one_hot(instance_targets(instances, "contour"), 3)
    scores["contour"].append(instance_average_precision(instances_from_predictions(contour, "contour"), instances))
    scores["components"].append(
      instance_average_precision(instances_from_predictions(contour, "contour", method="components"), instances)
    )
    distance = _one_hot(instance_targets(instances, "distance"), 5)
    scores["distance"].append(instance_average_precision(instances_from_predictions(distance, "distance"), instances))
  means = {name: float(np.mean(values)) for name, values in scores.items()}
  print(f"DSB 2018 validation oracle AP over {len(validation)} images: {means} ({time.perf_counter() - start:.1f} s)")
  assert len(validation) == 67
  assert means["components"] == pytest.approx(0.815, abs=0.005)  # touching nuclei merge
  assert means["contour"] >= 0.95
  assert means["distance"] >= 0.95
