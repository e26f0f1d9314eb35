"""Per-image evaluators of the training loop."""

import numpy as np
import pytest

from segjax.data.instance_targets import InstanceSettings
from segjax.errors import SegjaxError
from segjax.instances import instance_targets
from segjax.metrics import instance_average_precision, isbi_challenge_errors
from segjax.train.evaluators import ISBI_THRESHOLDS, best_over_thresholds, get_evaluators, run_evaluators


def split_mean(per_image):
  """The loop's reduction of a split: the mean of each per-image metric over the images."""
  return {key: float(np.mean([m[key] for m in per_image])) for key in per_image[0]}


COUNT_KEYS = {f"{m}_{c}/t{t}" for m in ("pixel", "rand") for c in ("tp", "fp", "fn") for t in ISBI_THRESHOLDS}
ERROR_KEYS = {
  *(f"{m}_error/t{t}" for m in ("pixel", "rand") for t in ISBI_THRESHOLDS),
  *(f"{m}_error{s}" for m in ("pixel", "rand") for s in ("", "_threshold")),
}


def test_isbi_evaluator_scores_the_label_map_with_class_one_as_membrane():
  label = np.zeros((6, 6), np.uint8)
  label[:, 3] = 1  # a membrane column splits two cells: 18 px (cols 0-2) and 12 px (cols 4-5)
  prediction = label.copy()
  prediction[2, 3] = 0  # a gap in the predicted membrane merges the cells
  (isbi,) = get_evaluators(["isbi"])
  counts = isbi(prediction, {"mask": label[..., None]})
  assert set(counts) == COUNT_KEYS
  # Pixel (interior class): TP 30, FP 1 (the gap), FN 0. Rand: n = (18, 12) in one predicted segment: TP = 324 + 144,
  # FP = 30^2 - 468 = 432, FN = 0. The same at every t < 1 for a 0/1 map.
  assert [counts[f"{k}/t0.5"] for k in ("pixel_tp", "pixel_fp", "pixel_fn")] == [30, 1, 0]
  assert [counts[f"{k}/t0.5"] for k in ("rand_tp", "rand_fp", "rand_fn")] == [468, 432, 0]
  errors = best_over_thresholds({**counts, "mean_iou": 0.5})
  assert set(errors) == ERROR_KEYS | {"mean_iou"}
  # 1 - 60/61 and 1 - 936/1368 = 6/19 (a merge of two cells is a large Rand error); the best is the lowest threshold.
  assert errors["pixel_error"] == pytest.approx(1 / 61) and errors["rand_error"] == pytest.approx(6 / 19)
  assert errors["pixel_error_threshold"] == errors["rand_error_threshold"] == 0.0
  assert errors["mean_iou"] == 0.5
  perfect = best_over_thresholds(isbi(label, {"mask": label[..., None]}))
  assert perfect["pixel_error"] == perfect["rand_error"] == 0.0


def test_isbi_evaluator_counts_pool_over_slices_hand_computed():
  # Slice A: two cells split by a membrane pixel of membrane probability 0.25 (interior 0.75), missed for t <= 0.7;
  # slice B: one cell. At t = 0.5: pixel A TP 4, FP 1, B TP 5 -> pooled error 1 - 18/19 = 1/19 (the mean of the
  # per-slice errors would be 1/18); Rand A TP 8, FP 8, B TP 25 -> pooled error 1 - 66/74 = 4/37 (mean 1/6).
  (isbi,) = get_evaluators(["isbi"])
  labels = [np.array([[0, 0, 1, 0, 0]]), np.zeros((1, 5), int)]
  probabilities = [np.array([[0.05, 0.05, 0.25, 0.05, 0.05]]), np.full((1, 5), 0.05)]
  per_image = [
    isbi((p > 0.5).astype(np.int32), {"mask": m[..., None], "foreground_probability": p})
    for p, m in zip(probabilities, labels, strict=True)
  ]
  errors = best_over_thresholds(split_mean(per_image))
  assert errors["pixel_error/t0.5"] == pytest.approx(1 / 19) and errors["rand_error/t0.5"] == pytest.approx(4 / 37)
  # t = 0.8 finds the membrane pixel and every cell: both errors 0.
  assert errors["pixel_error"] == errors["rand_error"] == 0.0
  assert errors["pixel_error_threshold"] == errors["rand_error_threshold"] == 0.8


def test_isbi_evaluator_and_best_over_thresholds_equal_the_challenge_errors_of_the_stack():
  rng = np.random.default_rng(0)
  labels = (rng.random((3, 10, 12)) < 0.3).astype(np.uint8)
  probabilities = np.clip(0.6 * labels + rng.normal(0.2, 0.2, labels.shape), 0, 1).astype(np.float32)
  (isbi,) = get_evaluators(["isbi"])
  per_image = [
    isbi((p > 0.5).astype(np.int32), {"mask": m[..., None], "foreground_probability": p})
    for p, m in zip(probabilities, labels, strict=True)
  ]
  errors = best_over_thresholds({**split_mean(per_image), "loss": 0.25})
  expected = isbi_challenge_errors(probabilities, labels)
  assert errors == pytest.approx({**expected, "loss": 0.25}, rel=1e-12)
  assert 0 < expected["rand_error"] < expected["rand_error/t0.0"]
  # Without the probability the label map is scored as a 0/1 membrane probability.
  predictions = (probabilities > 0.5).astype(np.int32)
  per_image = [isbi(p, {"mask": m[..., None]}) for p, m in zip(predictions, labels, strict=True)]
  expected = isbi_challenge_errors(predictions.astype(float), labels)
  assert best_over_thresholds(split_mean(per_image)) == pytest.approx(expected, rel=1e-12)


def test_best_over_thresholds_leaves_other_metrics_alone():
  metrics = {"loss": 0.5, "mean_iou": 0.25, "instance_ap": 0.75}
  assert best_over_thresholds(metrics) == metrics


def test_instance_evaluator_labels_components_and_drops_tiny_ones():
  instances = np.zeros((20, 20), np.uint16)
  instances[2:8, 2:8] = 1
  instances[10:16, 10:16] = 2
  prediction = (instances > 0).astype(np.int32)
  prediction[18, 18] = 1  # one-pixel speck: dropped, not a false positive
  (instance,) = get_evaluators(["instances"])
  perfect = instance(prediction, {"instances": instances[..., None]})
  assert perfect == {"instance_ap": 1.0, "aji": 1.0, "pq": 1.0, "sq": 1.0, "rq": 1.0, "f1": 1.0}
  prediction[2:8, 2:8] = 0
  expected = instance_average_precision(np.where(instances == 2, 1, 0), instances)
  scores = run_evaluators((instance,), prediction, {"instances": instances[..., None]})
  assert scores["instance_ap"] == expected == 0.5  # 1 TP, 1 FN at every threshold
  # AJI: C = 36, U = 36 + 36 (the missed object's area); F1 = 2 / (2 + 1); PQ = SQ 1 x RQ 2/3
  assert scores["aji"] == pytest.approx(0.5) and scores["f1"] == pytest.approx(2 / 3)
  assert scores["pq"] == pytest.approx(2 / 3) and scores["sq"] == pytest.approx(1.0)


def test_instance_evaluator_scores_the_watershed_and_the_components_of_one_prediction():
  instances = np.zeros((12, 20), np.uint16)
  instances[2:10, 2:10] = 1
  instances[2:10, 10:18] = 2  # shares an edge with object 1
  targets = instance_targets(instances, "contour", boundary_width=1)
  probabilities = np.eye(3, dtype=np.float32)[targets]
  settings = InstanceSettings(targets="contour", method="watershed", boundary_width=1)
  (instance,) = get_evaluators(["instances"], instances=settings)
  scores = instance(targets.astype(np.int32), {"instances": instances[..., None], "probabilities": probabilities})
  assert scores["instance_ap"] == 1.0 and scores["aji"] == 1.0  # the watershed splits the two squares again
  # the connected components of interior + boundary merge them: one predicted object of IoU 1/2 with each
  assert scores["instance_ap/components"] == 0.0 and scores["aji/components"] == pytest.approx(64 / 128)


def test_unknown_evaluator_and_missing_instances_are_clear_errors():
  with pytest.raises(SegjaxError, match="unknown evaluator 'dice' \\(config key evaluators\\)"):
    get_evaluators(["dice"])
  (instance,) = get_evaluators(["instances"])
  with pytest.raises(SegjaxError, match="needs a dataset with instance maps"):
    instance(np.zeros((4, 4), np.int32), {"mask": np.zeros((4, 4, 1))})
