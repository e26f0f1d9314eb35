"""Metric values on hand-computed cases: confusion-matrix scores, ISBI 2012 pixel/Rand errors, DSB 2018 AP."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from segjax.metrics import (
  DSB2018_IOU_THRESHOLDS,
  confusion_matrix,
  instance_average_precision,
  instance_precisions,
  isbi_scores,
  label_instances,
  pixel_error,
  rand_error,
  summarize_confusion,
)

# Confusion matrix (device) and its summary.


def test_confusion_matrix_counts_pairs_and_skips_ignored_and_padding():
  labels = jnp.array([[0, 0, 1, 1], [2, 2, 255, 1]])
  preds = jnp.array([[0, 1, 1, 1], [2, 0, 0, 1]])
  weights = jnp.array([[1, 1, 1, 1], [1, 1, 1, 0]])
  m = np.asarray(confusion_matrix(preds, labels, 3, weights))
  expected = np.array([[1, 1, 0], [0, 2, 0], [1, 0, 1]])
  np.testing.assert_array_equal(m, expected)


def test_confusion_matrix_ignore_label_without_weights():
  labels = jnp.array([255, 0, 1, 255, -1])
  preds = jnp.array([1, 0, 1, 0, 1])
  m = np.asarray(confusion_matrix(preds, labels, 2))
  np.testing.assert_array_equal(m, [[1, 0], [0, 1]])


def test_summary_iou_dice_accuracy_hand_computed():
  # rows = truth, cols = prediction
  m = np.array([[50, 10], [5, 35]])
  s = summarize_confusion(m)
  np.testing.assert_allclose(s["iou/0"], 50 / (50 + 10 + 5))
  np.testing.assert_allclose(s["iou/1"], 35 / (35 + 5 + 10))
  np.testing.assert_allclose(s["dice/1"], 2 * 35 / (2 * 35 + 5 + 10))
  np.testing.assert_allclose(s["mean_iou"], (50 / 65 + 35 / 50) / 2)
  np.testing.assert_allclose(s["foreground_iou"], 35 / 50)
  np.testing.assert_allclose(s["pixel_accuracy"], 85 / 100)


def test_absent_class_is_nan_and_left_out_of_means():
  m = np.array([[10, 0, 0], [0, 5, 0], [0, 0, 0]])
  s = summarize_confusion(m)
  assert math.isnan(s["iou/2"])
  assert s["mean_iou"] == 1.0
  assert s["foreground_iou"] == 1.0


def test_accumulating_batches_equals_whole_split():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, (6, 8, 8))
  preds = np.where(rng.random((6, 8, 8)) < 0.7, labels, rng.integers(0, 3, (6, 8, 8)))
  whole = np.asarray(confusion_matrix(jnp.asarray(preds), jnp.asarray(labels), 3))
  parts = sum(
    np.asarray(confusion_matrix(jnp.asarray(preds[i : i + 2]), jnp.asarray(labels[i : i + 2]), 3)) for i in (0, 2, 4)
  )
  np.testing.assert_array_equal(whole, parts)
  assert whole.sum() == labels.size


# ISBI 2012: pixel error and foreground-restricted Rand error.

# Ground truth of the hand-computed cases: segment A (8 px) | membrane column | segment B (4 px); n = 12.
TRUE_SEGMENTS = np.array(
  [
    [1, 1, 0, 2],
    [1, 1, 0, 2],
    [1, 1, 0, 2],
    [1, 1, 0, 2],
  ]
)


def test_pixel_error_counts_differing_pixels_in_mask():
  pred = np.array([[1, 0], [1, 1]], bool)
  true = np.array([[1, 1], [0, 1]], bool)
  assert pixel_error(pred, true) == 0.5
  assert pixel_error(pred, true, mask=np.array([[1, 1], [0, 0]])) == 0.5
  assert pixel_error(pred, true, mask=np.array([[1, 0], [0, 1]])) == 0.0
  assert math.isnan(pixel_error(pred, true, mask=np.zeros((2, 2))))


def test_rand_error_perfect_prediction_is_zero():
  assert rand_error(TRUE_SEGMENTS, TRUE_SEGMENTS) == 0.0
  # Boundary placement outside ground-truth foreground does not matter (only GT foreground pixels count).
  pred = np.array([[7, 7, 7, 9]] * 4)
  assert rand_error(pred, TRUE_SEGMENTS) == 0.0


def test_rand_error_split_hand_computed():
  # Prediction splits A into two 4-pixel halves (rows 0-1, rows 2-3); B intact.
  # Contingency counts n_ij: (A,1)=4, (A,3)=4, (B,2)=4. sum n_ij^2 = 48; GT sizes 8, 4 -> sum t^2 = 80;
  # predicted sizes 4, 4, 4 -> sum s^2 = 48. V_rand = 48 / (0.5*48 + 0.5*80) = 0.75, error 0.25.
  pred = np.array([[1, 1, 0, 2], [1, 1, 0, 2], [3, 3, 0, 2], [3, 3, 0, 2]])
  np.testing.assert_allclose(rand_error(pred, TRUE_SEGMENTS), 0.25)


def test_rand_error_merge_hand_computed():
  # Prediction merges A and B into one segment (the membrane column is inside it but is not counted).
  # n_ij: (A,1)=8, (B,1)=4 -> sum n^2 = 80; sum t^2 = 80; sum s^2 = 12^2 = 144. V = 80/112 = 5/7, error 2/7.
  pred = np.ones((4, 4), int)
  np.testing.assert_allclose(rand_error(pred, TRUE_SEGMENTS), 2 / 7)


def test_rand_error_predicted_boundary_pixels_are_singletons():
  # Split of A into 4 + 2 pixels by a predicted membrane row (2 pixels of A predicted as boundary); B loses one pixel
  # to predicted boundary:
  #   pred = 1 1 0 2
  #          1 1 0 2
  #          0 0 0 2
  #          3 3 0 0
  # n_ij: (A,1)=4, (A,3)=2, (B,2)=3, plus 3 singleton boundary pixels (2 in A, 1 in B) adding 1 each.
  # sum n^2 = 16 + 4 + 9 + 3 = 32; sum s^2 = 16 + 4 + 9 + 3 = 32; sum t^2 = 64 + 16 = 80.
  # V = 32 / (0.5*32 + 0.5*80) = 32/56 = 4/7, error 3/7.
  pred = np.array([[1, 1, 0, 2], [1, 1, 0, 2], [0, 0, 0, 2], [3, 3, 0, 0]])
  np.testing.assert_allclose(rand_error(pred, TRUE_SEGMENTS), 3 / 7)


def test_rand_error_without_ground_truth_foreground_is_nan():
  assert math.isnan(rand_error(np.ones((3, 3), int), np.zeros((3, 3), int)))


def brute_force_rand_error(pred, true):
  """1 - V_rand by counting ordered pixel pairs (self-pairs included) over ground-truth foreground pixels."""
  t, p = true[true != 0], pred[true != 0]
  same_true = t[:, None] == t[None, :]
  same_pred = ((p[:, None] == p[None, :]) & (p[:, None] != 0)) | np.eye(len(p), dtype=bool)  # boundary = singleton
  return 1 - (same_true & same_pred).sum() / (0.5 * same_pred.sum() + 0.5 * same_true.sum())


@pytest.mark.parametrize("seed", range(4))
def test_rand_error_matches_pair_counting_and_ignores_segment_ids(seed):
  rng = np.random.default_rng(seed)
  true = rng.integers(0, 4, (9, 10))
  pred = rng.integers(0, 5, (9, 10))
  expected = brute_force_rand_error(pred, true)
  np.testing.assert_allclose(rand_error(pred, true), expected)
  # Renumbering segments (keeping 0 = boundary) changes nothing.
  relabel_pred = np.array([0, 1000, 7, -3, 2**40])[pred]
  relabel_true = np.array([0, 5, 99, 3])[true]
  np.testing.assert_allclose(rand_error(relabel_pred, relabel_true), expected)


def test_isbi_scores_hand_computed():
  # Cell interior (True) vs membrane. The prediction adds a membrane row through cell A, splitting it into a 4-pixel
  # and a 2-pixel component (4-connectivity); its 2 membrane pixels inside A are singletons (see the test above).
  true_fg = TRUE_SEGMENTS != 0
  pred_fg = true_fg.copy()
  pred_fg[2, :2] = False
  # n_ij: 4, 2, 4 (B) + 2 singletons: sum n^2 = 16+4+16+2 = 38 = sum s^2; sum t^2 = 80. V = 38/59, error 21/59.
  scores = isbi_scores(pred_fg, true_fg)
  np.testing.assert_allclose(scores["pixel_error"], 2 / 16)
  np.testing.assert_allclose(scores["rand_error"], 21 / 59)
  assert isbi_scores(true_fg, true_fg) == {"pixel_error": 0.0, "rand_error": 0.0}


def test_isbi_segments_are_4_connected():
  # Two cells separated by a one-pixel diagonal membrane touch only at corners: they must stay two segments.
  true_fg = ~np.eye(4, dtype=bool)
  true_fg[0, 3] = true_fg[3, 0] = True
  assert label_instances(true_fg).max() == 2
  assert label_instances(true_fg, connectivity=2).max() == 1
  # A prediction that merges the two cells through the membrane scores a Rand error > 0.
  assert isbi_scores(np.ones((4, 4), bool), true_fg)["rand_error"] > 0


# Instance segmentation: connected components and the DSB 2018 average precision.


def test_label_instances_removes_small_objects_and_relabels_consecutively():
  foreground = np.array(
    [
      [1, 1, 0, 0, 1],
      [1, 1, 0, 0, 0],
      [0, 0, 0, 1, 1],
      [1, 0, 0, 1, 1],
    ],
    bool,
  )
  labels = label_instances(foreground)
  assert labels.dtype == np.int32 and labels.max() == 4
  big = label_instances(foreground, min_size=2)
  np.testing.assert_array_equal(np.unique(big), [0, 1, 2])
  np.testing.assert_array_equal(big == 1, np.isin(labels, labels[0, 0]))
  np.testing.assert_array_equal(big == 2, np.isin(labels, labels[3, 3]))
  assert label_instances(np.zeros((3, 3), bool)).max() == 0


def square(top, left, size=4, shape=(12, 12), value=1):
  out = np.zeros(shape, int)
  out[top : top + size, left : left + size] = value
  return out


def test_default_thresholds_are_the_dsb2018_ones():
  assert DSB2018_IOU_THRESHOLDS == (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


def test_ap_of_shifted_object_hand_computed():
  # A 4x4 object shifted by one column: intersection 12, union 20, IoU = 0.6. It matches at t = 0.5, 0.55 (IoU > t)
  # but not at 0.6 and above, where it is one FP and one FN: precision 0 / 2.
  true = square(2, 2)
  pred = square(2, 3)
  np.testing.assert_array_equal(instance_precisions(pred, true), [1, 1, 0, 0, 0, 0, 0, 0, 0, 0])
  assert instance_average_precision(pred, true) == pytest.approx(0.2)
  # A 4x4 object against its 4x3 left part: IoU 12/16 = 0.75, matches at t < 0.75.
  part = square(2, 2)
  part[:, 5] = 0
  np.testing.assert_array_equal(instance_precisions(part, true), [1, 1, 1, 1, 1, 0, 0, 0, 0, 0])


def test_ap_counts_false_positives_and_negatives():
  # Three true objects; predictions: one exact match, one spurious object, two true objects missed.
  true = square(0, 0) + square(0, 6, value=2) + square(6, 0, value=3)
  pred = square(0, 0, value=5) + square(7, 7, value=9)
  # Every threshold: TP 1, FP 1, FN 2 -> 1/4.
  np.testing.assert_allclose(instance_precisions(pred, true), np.full(10, 0.25))
  assert instance_average_precision(pred, true) == pytest.approx(0.25)


def test_ap_iou_of_exactly_half_does_not_match():
  true = square(0, 0)
  pred = np.zeros_like(true)
  pred[0:4, 0:2] = 1  # IoU = 8/16
  np.testing.assert_array_equal(instance_precisions(pred, true, thresholds=[0.5, 0.55]), [0, 0])
  pred[0, 2] = 1  # IoU = 9/16 > 0.55
  np.testing.assert_array_equal(instance_precisions(pred, true, thresholds=[0.5, 0.55, 0.6]), [1, 1, 0])


def test_ap_empty_images():
  empty = np.zeros((5, 5), int)
  assert instance_average_precision(empty, empty) == 1.0  # nothing to find, nothing predicted
  assert instance_average_precision(square(0, 0, shape=(5, 5)), empty) == 0.0
  assert instance_average_precision(empty, square(0, 0, shape=(5, 5))) == 0.0


def test_ap_is_invariant_to_relabelling():
  rng = np.random.default_rng(0)
  true = sum(
    square(r, c, size=4, shape=(24, 24), value=i + 1) for i, (r, c) in enumerate([(0, 0), (0, 8), (8, 0), (16, 16)])
  )
  pred = label_instances(np.roll(true > 0, 1, axis=1) | (rng.random((24, 24)) < 0.02))
  expected = instance_precisions(pred, true)
  assert 0 < expected.mean() < 1
  permuted_true = np.concatenate([[0], rng.permutation(true.max()) * 17 + 3])[true]
  permuted_pred = np.concatenate([[0], rng.permutation(pred.max()) + 10**9])[pred]
  np.testing.assert_array_equal(instance_precisions(permuted_pred, permuted_true), expected)
  np.testing.assert_array_equal(instance_precisions(pred, true, thresholds=[0.5]), expected[:1])


def test_ap_matches_pairwise_loop_on_random_instances():
  rng = np.random.default_rng(1)
  true = label_instances(rng.random((20, 20)) < 0.45)
  pred = label_instances(rng.random((20, 20)) < 0.45)
  ious = np.array(
    [
      [np.sum((true == i) & (pred == j)) / np.sum((true == i) | (pred == j)) for j in range(1, pred.max() + 1)]
      for i in range(1, true.max() + 1)
    ]
  )
  expected = [(ious > t).sum() / (true.max() + pred.max() - (ious > t).sum()) for t in DSB2018_IOU_THRESHOLDS]
  np.testing.assert_allclose(instance_precisions(pred, true), expected)


def test_ap_rejects_thresholds_below_one_half():
  with pytest.raises(ValueError, match="IoU thresholds must lie in \\[0.5, 1\\)"):
    instance_precisions(square(0, 0), square(0, 0), thresholds=[0.3])
