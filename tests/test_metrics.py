"""Metric values on hand-computed cases: confusion-matrix scores, ISBI 2012 pixel/Rand errors, instance scores."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from segjax.metrics import (
  DSB2018_IOU_THRESHOLDS,
  ISBI_CHALLENGE_THRESHOLDS,
  aggregated_jaccard_index,
  confusion_matrix,
  f1_at_iou,
  f_score,
  instance_average_precision,
  instance_precisions,
  instance_scores,
  isbi_challenge_errors,
  label_instances,
  panoptic_quality,
  pixel_f1_counts,
  rand_error,
  rand_f_counts,
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


# ISBI 2012: pixel error and foreground-restricted Rand error, pooled over slices, best over thresholds.

# Ground truth of the hand-computed cases: segment A (8 px) | membrane column | segment B (4 px); n = 12.
TRUE_SEGMENTS = np.array(
  [
    [1, 1, 0, 2],
    [1, 1, 0, 2],
    [1, 1, 0, 2],
    [1, 1, 0, 2],
  ]
)


def test_default_thresholds_are_the_challenge_ones():
  assert ISBI_CHALLENGE_THRESHOLDS == (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def test_f_score_of_counts_and_its_undefined_case():
  assert f_score(3, 1, 1) == pytest.approx(6 / 8)
  assert f_score(0, 0, 5) == 0.0
  assert math.isnan(f_score(0, 0, 0))


def test_pixel_f1_counts_hand_computed():
  pred = np.array([[1, 0], [1, 1]], bool)
  true = np.array([[1, 1], [0, 1]], bool)
  # TP: (0, 0), (1, 1); FP: (1, 0) predicted interior on membrane; FN: (0, 1) interior predicted as membrane.
  assert pixel_f1_counts(pred, true) == (2, 1, 1)
  assert pixel_f1_counts(true, true) == (3, 0, 0)


def test_rand_error_perfect_prediction_is_zero():
  assert rand_error(TRUE_SEGMENTS, TRUE_SEGMENTS) == 0.0
  # Boundary placement outside ground-truth foreground does not matter (only GT foreground pixels count).
  pred = np.array([[7, 7, 7, 9]] * 4)
  assert rand_error(pred, TRUE_SEGMENTS) == 0.0


def test_rand_error_split_hand_computed():
  # Prediction splits A into two 4-pixel halves (rows 0-1, rows 2-3); B intact.
  # Contingency counts n_ij: (A,1)=4, (A,3)=4, (B,2)=4. TP = sum n_ij^2 = 48; predicted sizes 4, 4, 4 ->
  # sum b^2 = 48, FP = 0; GT sizes 8, 4 -> sum a^2 = 80, FN = 32. V_rand = 96 / (96 + 32) = 0.75, error 0.25.
  pred = np.array([[1, 1, 0, 2], [1, 1, 0, 2], [3, 3, 0, 2], [3, 3, 0, 2]])
  assert rand_f_counts(pred, TRUE_SEGMENTS) == (48, 0, 32)
  np.testing.assert_allclose(rand_error(pred, TRUE_SEGMENTS), 0.25)


def test_rand_error_merge_hand_computed():
  # Prediction merges A and B into one segment (the membrane column is inside it but is not counted).
  # n_ij: (A,1)=8, (B,1)=4 -> TP = 80; sum b^2 = 12^2 = 144, FP = 64; sum a^2 = 80, FN = 0. V = 160/224 = 5/7.
  pred = np.ones((4, 4), int)
  assert rand_f_counts(pred, TRUE_SEGMENTS) == (80, 64, 0)
  np.testing.assert_allclose(rand_error(pred, TRUE_SEGMENTS), 2 / 7)


def test_rand_error_predicted_boundary_pixels_are_singletons():
  # Split of A into 4 + 2 pixels by a predicted membrane row (2 pixels of A predicted as boundary); B loses one pixel
  # to predicted boundary:
  #   pred = 1 1 0 2
  #          1 1 0 2
  #          0 0 0 2
  #          3 3 0 0
  # n_ij: (A,1)=4, (A,3)=2, (B,2)=3, plus N0 = 3 singleton boundary pixels (2 in A, 1 in B) adding 1 each.
  # TP = 16 + 4 + 9 + 3 = 32; sum b^2 + N0 = 16 + 4 + 9 + 3 = 32, FP = 0; sum a^2 = 64 + 16 = 80, FN = 48.
  # V = 64 / (64 + 48) = 4/7, error 3/7.
  pred = np.array([[1, 1, 0, 2], [1, 1, 0, 2], [0, 0, 0, 2], [3, 3, 0, 0]])
  assert rand_f_counts(pred, TRUE_SEGMENTS) == (32, 0, 48)
  np.testing.assert_allclose(rand_error(pred, TRUE_SEGMENTS), 3 / 7)


def test_rand_error_without_ground_truth_foreground_is_nan():
  assert rand_f_counts(np.ones((3, 3), int), np.zeros((3, 3), int)) == (0, 0, 0)
  assert math.isnan(rand_error(np.ones((3, 3), int), np.zeros((3, 3), int)))


def pair_counted_rand_counts(pred, true):
  """TP, FP, FN of V_rand by visiting every ordered pair of ground-truth foreground pixels (self-pairs included).

  Two pixels are together in the prediction when they share a non-zero segment id, or are the same pixel (a
  predicted boundary pixel is a singleton).
  """
  pixels = [(r, c) for r in range(true.shape[0]) for c in range(true.shape[1]) if true[r, c] != 0]
  tp = fp = fn = 0
  for x in pixels:
    for y in pixels:
      same_true = true[x] == true[y]
      same_pred = x == y or (pred[x] == pred[y] and pred[x] != 0)
      tp += same_true and same_pred
      fp += same_pred and not same_true
      fn += same_true and not same_pred
  return tp, fp, fn


@pytest.mark.parametrize("seed", range(4))
def test_rand_counts_match_pair_counting_and_ignore_segment_ids(seed):
  rng = np.random.default_rng(seed)
  true = rng.integers(0, 4, (9, 10))
  pred = rng.integers(0, 5, (9, 10))
  expected = pair_counted_rand_counts(pred, true)
  assert rand_f_counts(pred, true) == expected
  np.testing.assert_allclose(rand_error(pred, true), 1 - 2 * expected[0] / (2 * expected[0] + sum(expected[1:])))
  # Renumbering segments (keeping 0 = boundary) changes nothing.
  relabel_pred = np.array([0, 1000, 7, -3, 2**40])[pred]
  relabel_true = np.array([0, 5, 99, 3])[true]
  assert rand_f_counts(relabel_pred, relabel_true) == expected


# Two 1x5 slices, hand-computed, where pooling the counts over slices differs from averaging per-slice errors.
# A: two cells split by a membrane pixel whose membrane probability 0.25 (interior 0.75) is missed for t <= 0.7.
# B: one cell, found for t <= 0.9.
SLICE_LABELS = np.array([[[0, 0, 1, 0, 0]], [[0, 0, 0, 0, 0]]])
SLICE_PROBABILITIES = np.array([[[0.05, 0.05, 0.25, 0.05, 0.05]], [[0.05] * 5]])


def test_isbi_challenge_errors_pool_counts_over_slices():
  errors = isbi_challenge_errors(SLICE_PROBABILITIES, SLICE_LABELS)
  # t = 0.5: A is predicted as one cell. Pixel: A TP 4, FP 1; B TP 5 -> pooled F = 18 / 19, error 1/19 (the mean of
  # the per-slice errors 1/9 and 0 would be 1/18). Rand: A n = (2, 2) in one predicted segment: TP 8, FP 16 - 8 = 8,
  # FN 8 - 8 = 0; B TP 25 -> pooled TP 33, FP 8, FN 0, F = 66 / 74, error 4/37 (per-slice mean (1/3 + 0) / 2 = 1/6).
  assert errors["pixel_error/t0.5"] == pytest.approx(1 / 19)
  assert errors["rand_error/t0.5"] == pytest.approx(4 / 37)
  per_slice = [isbi_challenge_errors(p, label) for p, label in zip(SLICE_PROBABILITIES, SLICE_LABELS, strict=True)]
  assert [e["pixel_error/t0.5"] for e in per_slice] == pytest.approx([1 / 9, 0])
  assert [e["rand_error/t0.5"] for e in per_slice] == pytest.approx([1 / 3, 0])
  # t = 1.0: no pixel has interior probability > 1. Pixel: TP 0, FN 9 -> F 0, error 1. Rand: all 9 foreground
  # pixels are singletons: A TP 4, FP 0, FN 8 - 4; B TP 5, FP 0, FN 25 - 5 -> F = 18 / (18 + 24), error 4/7.
  assert errors["pixel_error/t1.0"] == 1.0
  assert errors["rand_error/t1.0"] == pytest.approx(4 / 7)
  # The threshold sweep: t <= 0.7 merges A; t = 0.8 and 0.9 are perfect; the best is the lowest of them.
  for t in (0.0, 0.1, 0.2, 0.3, 0.4, 0.6, 0.7):
    assert errors[f"pixel_error/t{t}"] == pytest.approx(1 / 19) and errors[f"rand_error/t{t}"] == pytest.approx(4 / 37)
  assert errors["pixel_error/t0.8"] == errors["rand_error/t0.9"] == 0.0
  assert errors["pixel_error"] == errors["rand_error"] == 0.0
  assert errors["pixel_error_threshold"] == errors["rand_error_threshold"] == 0.8


def test_isbi_challenge_errors_pick_the_best_threshold_of_each_metric():
  # Cells A (cols 0-3) and B (cols 5-8), 12 px each, split by a membrane column (membrane probability 0.95) with a
  # weak pixel at (1, 4) (0.35: interior probability 0.65), and a halo of membrane probability 0.45 (interior 0.55) on
  # A's column 3. Interior where 1 - p > t.
  label = np.zeros((3, 9), int)
  label[:, 4] = 1
  probability = np.full((3, 9), 0.05)
  probability[:, 4] = 0.95
  probability[1, 4] = 0.35
  probability[:, 3] = 0.45
  errors = isbi_challenge_errors(probability, label)
  # t = 0.0: everything is interior. Pixel TP 24, FP 3 -> error 1 - 48/51 = 1/17. Rand: one segment, n = (12, 12):
  # TP 288, FP 576 - 288, FN 0 -> error 1/3.
  assert errors["pixel_error/t0.0"] == pytest.approx(1 / 17) and errors["rand_error/t0.0"] == pytest.approx(1 / 3)
  # t = 0.1 ... 0.5: the weak pixel leaks A into B: pixel TP 24, FP 1 -> error 1/49 (the best pixel error); Rand 1/3.
  for t in (0.1, 0.2, 0.3, 0.4, 0.5):
    assert errors[f"pixel_error/t{t}"] == pytest.approx(1 / 49) and errors[f"rand_error/t{t}"] == pytest.approx(1 / 3)
  # t = 0.6: the halo is membrane, which cuts A off from the weak pixel. Pixel TP 21, FP 1, FN 3 -> error 4/46.
  # Rand: n(A, cols 0-2) = 9, n(B, cols 5-8 + weak pixel) = 12, N0 = 3 halo singletons: TP = 81 + 144 + 3 = 228 =
  # sum b^2 + N0 (FP 0); sum a^2 = 288 (FN 60) -> error 60/516 = 5/43 (the best Rand error; t = 0.7 ties).
  assert errors["pixel_error/t0.6"] == pytest.approx(4 / 46) and errors["rand_error/t0.6"] == pytest.approx(5 / 43)
  # t = 0.7: the weak pixel is membrane too: pixel FP 0 -> error 3/45; Rand unchanged.
  assert errors["pixel_error/t0.7"] == pytest.approx(3 / 45) and errors["rand_error/t0.7"] == pytest.approx(5 / 43)
  assert errors["pixel_error"] == pytest.approx(1 / 49) and errors["pixel_error_threshold"] == 0.1
  assert errors["rand_error"] == pytest.approx(5 / 43) and errors["rand_error_threshold"] == 0.6
  assert set(errors) == {
    *(f"{m}_error/t{t}" for m in ("pixel", "rand") for t in ISBI_CHALLENGE_THRESHOLDS),
    *(f"{m}_error{s}" for m in ("pixel", "rand") for s in ("", "_threshold")),
  }


def test_isbi_challenge_errors_binary_prediction_hand_computed():
  # Cell interior vs membrane. The prediction adds a membrane row through cell A, splitting it into a 4-pixel and a
  # 2-pixel component (4-connectivity); its 2 membrane pixels inside A are singletons (see the test above).
  true_fg = TRUE_SEGMENTS != 0
  pred_fg = true_fg.copy()
  pred_fg[2, :2] = False
  errors = isbi_challenge_errors((~pred_fg).astype(float), ~true_fg)
  # Pixel: TP 10, FP 0, FN 2 -> F1 = 20 / 22, error 1/11.
  # Rand: n_ij 4, 2, 4 (B) + 2 singletons: TP = 16+4+16+2 = 38 = sum b^2 + N0 (FP 0); sum a^2 = 80 (FN 42).
  # V = 76 / 118 = 38/59, error 21/59. A binary map scores the same at every t < 1; the best is t = 0.0.
  assert errors["pixel_error"] == pytest.approx(1 / 11)
  assert errors["rand_error"] == pytest.approx(21 / 59)
  assert errors["pixel_error_threshold"] == errors["rand_error_threshold"] == 0.0
  assert all(errors[f"rand_error/t{t}"] == errors["rand_error"] for t in ISBI_CHALLENGE_THRESHOLDS[:-1])


def test_isbi_challenge_errors_of_a_perfect_prediction_are_zero():
  rng = np.random.default_rng(0)
  label = rng.random((3, 12, 12)) < 0.3
  probability = np.where(label, rng.uniform(0.55, 1.0, label.shape), rng.uniform(0.0, 0.45, label.shape))
  errors = isbi_challenge_errors(probability, label)
  assert errors["pixel_error"] == errors["rand_error"] == 0.0
  assert errors["pixel_error/t0.5"] == errors["rand_error/t0.5"] == 0.0
  assert errors["pixel_error_threshold"] == 0.5  # t < 0.5 takes some membranes (interior > t) for interior


def flood_fill_segments(foreground):
  """4-connected components by breadth-first search: an implementation independent of scipy.ndimage."""
  segments = np.zeros(foreground.shape, int)
  count = 0
  for start in zip(*np.nonzero(foreground), strict=True):
    if segments[start]:
      continue
    count += 1
    segments[start] = count
    queue = [start]
    while queue:
      r, c = queue.pop()
      for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
        inside = 0 <= nr < foreground.shape[0] and 0 <= nc < foreground.shape[1]
        if inside and foreground[nr, nc] and not segments[nr, nc]:
          segments[nr, nc] = count
          queue.append((nr, nc))
  return segments


def reference_isbi_errors(probability, label, thresholds):
  """Best 1 - F over thresholds, the counts summed over slices, from pair counting and flood filling."""
  pixel, rand = {}, {}
  for t in thresholds:
    pixel_counts, rand_counts = np.zeros(3), np.zeros(3)
    for p, m in zip(probability, label, strict=True):
      interior_pred, interior_true = 1 - p > t, m == 0
      pixel_counts += [
        np.sum(interior_pred & interior_true),
        np.sum(interior_pred & ~interior_true),
        np.sum(~interior_pred & interior_true),
      ]
      rand_counts += pair_counted_rand_counts(flood_fill_segments(interior_pred), flood_fill_segments(interior_true))
    for out, (tp, fp, fn) in ((pixel, pixel_counts), (rand, rand_counts)):
      if 2 * tp + fp + fn > 0:
        out[t] = 1 - 2 * tp / (2 * tp + fp + fn)
  return min(pixel.values()), min(rand.values()), pixel, rand


@pytest.mark.parametrize("seed", range(3))
def test_isbi_challenge_errors_match_an_independent_reference(seed):
  rng = np.random.default_rng(seed)
  label = rng.random((3, 6, 7)) < 0.35
  probability = np.clip(label * 0.6 + rng.normal(0.2, 0.25, label.shape), 0, 1)
  pixel, rand, pixel_at, rand_at = reference_isbi_errors(probability, label, ISBI_CHALLENGE_THRESHOLDS)
  errors = isbi_challenge_errors(probability, label)
  assert errors["pixel_error"] == pytest.approx(pixel) and errors["rand_error"] == pytest.approx(rand)
  for t in ISBI_CHALLENGE_THRESHOLDS:
    assert errors[f"pixel_error/t{t}"] == pytest.approx(pixel_at[t])
    assert errors[f"rand_error/t{t}"] == pytest.approx(rand_at[t])


def test_isbi_segments_are_4_connected():
  # Two cells separated by a one-pixel diagonal membrane touch only at corners: they must stay two segments.
  true_fg = ~np.eye(4, dtype=bool)
  true_fg[0, 3] = true_fg[3, 0] = True
  assert label_instances(true_fg).max() == 2
  assert label_instances(true_fg, connectivity=2).max() == 1
  # A prediction that merges the two cells through the membrane scores a Rand error > 0.
  assert isbi_challenge_errors(np.zeros((4, 4)), ~true_fg)["rand_error"] > 0


def test_isbi_challenge_errors_reject_bad_inputs():
  with pytest.raises(ValueError, match="membrane probability shape \\(2, 3\\) differs from label shape \\(3, 2\\)"):
    isbi_challenge_errors(np.zeros((2, 3)), np.zeros((3, 2)))
  with pytest.raises(ValueError, match="expected \\(N, H, W\\) or \\(H, W\\) slices"):
    isbi_challenge_errors(np.zeros((1, 2, 3, 3)), np.zeros((1, 2, 3, 3)))
  with pytest.raises(ValueError, match="must lie in \\[0, 1\\]"):
    isbi_challenge_errors(np.full((3, 3), 2.0), np.zeros((3, 3)))
  with pytest.raises(ValueError, match="membrane labels must be 0/1"):
    isbi_challenge_errors(np.zeros((3, 3)), np.full((3, 3), 255))
  with pytest.raises(ValueError, match="ISBI thresholds must be a non-empty sequence in \\[0, 1\\]"):
    isbi_challenge_errors(np.zeros((3, 3)), np.zeros((3, 3)), thresholds=(1.5,))


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


# Instance segmentation: AJI (Kumar et al. 2017), panoptic quality (Kirillov et al. 2019) and object F1.


def test_aji_of_a_split_object_differs_from_mean_iou():
  # A 4x4 true object (16 px) predicted as its left and right halves (8 px each): both IoU 8/16, the first is chosen.
  # C = 8, U = |G u S1| + |S2| (never chosen) = 16 + 8 -> AJI = 1/3, while the chosen match's IoU is 1/2.
  true = square(2, 2)
  pred = np.zeros_like(true)
  pred[2:6, 2:4] = 1
  pred[2:6, 4:6] = 2
  assert aggregated_jaccard_index(pred, true) == pytest.approx(1 / 3)
  # IoU 1/2 is no match for PQ and F1 (IoU > 0.5): TP 0, FP 2, FN 1.
  assert panoptic_quality(pred, true) == {"pq": 0.0, "sq": 0.0, "rq": 0.0}
  assert f1_at_iou(pred, true) == 0.0


def test_aji_counts_missed_and_spurious_objects():
  # G1 4x4 against S1 shifted by one column: intersection 12, union 20. G2 overlaps no prediction: U += 16, and it
  # chooses none. S2 overlaps no true object and is never chosen: U += 16. AJI = 12 / (20 + 16 + 16) = 3/13.
  true = square(0, 0) + square(0, 6, value=2)
  pred = square(0, 1) + square(7, 7, value=2)
  assert aggregated_jaccard_index(pred, true) == pytest.approx(3 / 13)


def test_aji_counts_a_merging_prediction_in_every_union():
  # Two adjacent 4x4 true objects, one prediction covering both (32 px): each chooses it (IoU 16/32), so, as in
  # Algorithm 1, its area is in both unions: C = 16 + 16, U = 32 + 32 -> 1/2, not 32/32.
  true = square(0, 0, shape=(8, 8)) + square(0, 4, shape=(8, 8), value=2)
  pred = (true > 0).astype(int)
  assert aggregated_jaccard_index(pred, true) == 0.5


def test_panoptic_quality_f1_and_instance_scores_hand_computed():
  # True: G1 (0, 0), G2 (0, 6), G3 (6, 0). Predicted: S1 = G1 shifted one column (IoU 12/20 = 0.6), S2 = G2 exactly
  # (IoU 1), S3 spurious at (7, 7); G3 missed. TP 2, FP 1, FN 1.
  true = square(0, 0) + square(0, 6, value=2) + square(6, 0, value=3)
  pred = square(0, 1, value=4) + square(0, 6, value=7) + square(7, 7, value=9)
  # SQ = (0.6 + 1) / 2 = 0.8; RQ = 2 / (2 + 1/2 + 1/2) = 2/3; PQ = 8/15. F1 = 2*2 / (4 + 1 + 1) = 2/3.
  expected = {"pq": 8 / 15, "sq": 0.8, "rq": 2 / 3}
  assert panoptic_quality(pred, true) == pytest.approx(expected)
  assert f1_at_iou(pred, true) == pytest.approx(2 / 3)
  # At IoU > 0.7 only S2 matches: TP 1, FP 2, FN 2: SQ 1, RQ 1 / 3, PQ 1/3.
  assert panoptic_quality(pred, true, iou_threshold=0.7) == pytest.approx({"pq": 1 / 3, "sq": 1.0, "rq": 1 / 3})
  assert f1_at_iou(pred, true, iou_threshold=0.7) == pytest.approx(1 / 3)
  # AJI: C = 12 + 16, U = 20 + 16 + 16 (G3 alone) + 16 (S3 never chosen) -> 28/68 = 7/17.
  # DSB AP: t = 0.5, 0.55: TP 2 -> 2 / (3 + 3 - 2) = 1/2; t >= 0.6 (8 thresholds): TP 1 -> 1/5. Mean 0.26.
  assert instance_scores(pred, true) == pytest.approx({"instance_ap": 0.26, "aji": 7 / 17, **expected, "f1": 2 / 3})


def test_instance_scores_of_empty_images():
  empty = np.zeros((5, 5), int)
  one = square(0, 0, shape=(5, 5))
  # Nothing to find and nothing predicted: a perfect prediction.
  assert instance_scores(empty, empty) == {"instance_ap": 1.0, "aji": 1.0, "pq": 1.0, "sq": 1.0, "rq": 1.0, "f1": 1.0}
  # Objects on one side only: everything 0 (SQ of no match is 0, so that PQ = SQ x RQ).
  zeros = {"instance_ap": 0.0, "aji": 0.0, "pq": 0.0, "sq": 0.0, "rq": 0.0, "f1": 0.0}
  assert instance_scores(one, empty) == zeros
  assert instance_scores(empty, one) == zeros
  assert aggregated_jaccard_index(empty, empty) == 1.0 and aggregated_jaccard_index(one, empty) == 0.0
  assert panoptic_quality(empty, one) == {"pq": 0.0, "sq": 0.0, "rq": 0.0}
  assert f1_at_iou(empty, empty) == 1.0 and f1_at_iou(empty, one) == 0.0


def test_perfect_instances_score_one():
  true = square(0, 0) + square(0, 6, value=2) + square(6, 6, value=3)
  relabelled = np.array([0, 30, 10, 20])[true]
  assert instance_scores(relabelled, true) == {
    "instance_ap": 1.0,
    "aji": 1.0,
    "pq": 1.0,
    "sq": 1.0,
    "rq": 1.0,
    "f1": 1.0,
  }


def reference_aji(pred, true):
  """Algorithm 1 of Kumar et al. 2017 as a loop over objects and masks (a true object overlapping nothing chooses
  none)."""
  pred_ids = [j for j in np.unique(pred) if j != 0]
  intersection = union = 0
  chosen = set()
  for i in np.unique(true):
    if i == 0:
      continue
    g = true == i
    ious = [np.sum(g & (pred == j)) / np.sum(g | (pred == j)) for j in pred_ids]
    if not ious or max(ious) == 0:
      union += g.sum()
      continue
    j = pred_ids[int(np.argmax(ious))]
    intersection += np.sum(g & (pred == j))
    union += np.sum(g | (pred == j))
    chosen.add(j)
  union += sum(np.sum(pred == j) for j in pred_ids if j not in chosen)
  return intersection / union


def reference_panoptic(pred, true, threshold):
  matches = [
    np.sum((true == i) & (pred == j)) / np.sum((true == i) | (pred == j))
    for i in np.unique(true[true != 0])
    for j in np.unique(pred[pred != 0])
  ]
  matches = [iou for iou in matches if iou > threshold]
  tp, fp, fn = (
    len(matches),
    len(np.unique(pred[pred != 0])) - len(matches),
    len(np.unique(true[true != 0])) - len(matches),
  )
  sq = sum(matches) / tp if tp else 0.0
  rq = tp / (tp + fp / 2 + fn / 2)
  return {"pq": sq * rq, "sq": sq, "rq": rq}


@pytest.mark.parametrize("seed", range(3))
def test_aji_and_panoptic_quality_match_loops_over_objects(seed):
  rng = np.random.default_rng(seed)
  true = label_instances(rng.random((16, 16)) < 0.5)
  pred = label_instances(np.roll(true > 0, 1, axis=0) ^ (rng.random((16, 16)) < 0.15))
  assert aggregated_jaccard_index(pred, true) == pytest.approx(reference_aji(pred, true))
  for threshold in (0.5, 0.6):
    assert panoptic_quality(pred, true, iou_threshold=threshold) == pytest.approx(
      reference_panoptic(pred, true, threshold)
    )


def test_panoptic_quality_rejects_thresholds_below_one_half():
  with pytest.raises(ValueError, match="iou_threshold must lie in \\[0.5, 1\\)"):
    panoptic_quality(square(0, 0), square(0, 0), iou_threshold=0.3)
  with pytest.raises(ValueError, match="iou_threshold must lie in \\[0.5, 1\\)"):
    f1_at_iou(square(0, 0), square(0, 0), iou_threshold=1.0)
