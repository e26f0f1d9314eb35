"""Per-image evaluators of the training loop."""

import numpy as np
import pytest

from segjax.errors import SegjaxError
from segjax.metrics import instance_average_precision, isbi_scores
from segjax.train.evaluators import best_over_thresholds, get_evaluators, run_evaluators


def test_isbi_evaluator_scores_cell_interior_with_class_one_as_membrane():
  label = np.zeros((6, 6), np.uint8)
  label[:, 3] = 1  # a membrane column splits two cells
  prediction = label.copy()
  prediction[2, 3] = 0  # a gap in the predicted membrane merges the cells
  (isbi,) = get_evaluators(["isbi"])
  scores = isbi(prediction, {"mask": label[..., None]})
  assert scores == isbi_scores(prediction != 1, label != 1)
  assert scores["pixel_error"] == pytest.approx(1 / 36)
  assert scores["rand_error"] > 0.3  # a merge of two equal cells is a large Rand error
  assert isbi(label, {"mask": label[..., None]}) == {"pixel_error": 0.0, "rand_error": 0.0}


def test_isbi_evaluator_sweeps_membrane_probability_thresholds():
  label = np.zeros((6, 6), np.uint8)
  label[:, 3] = 1
  probability = np.where(label == 1, 0.35, 0.05)  # a faint membrane: found only below threshold 0.35
  (isbi,) = get_evaluators(["isbi"])
  scores = isbi((probability > 0.5).astype(np.int32), {"mask": label[..., None], "foreground_probability": probability})
  assert set(scores) == {f"{m}/t{t / 10}" for m in ("pixel_error", "rand_error") for t in range(1, 10)}
  assert scores["pixel_error/t0.3"] == 0.0 and scores["pixel_error/t0.4"] == pytest.approx(6 / 36)
  best = best_over_thresholds({**scores, "mean_iou": 0.5})
  assert best["pixel_error"] == 0.0 and best["rand_error"] == 0.0
  assert best["pixel_error_threshold"] == 0.1 and best["mean_iou"] == 0.5


def test_instance_evaluator_labels_components_and_drops_tiny_ones():
  instances = np.zeros((20, 20), np.uint16)
  instances[2:8, 2:8] = 1
  instances[10:16, 10:16] = 2
  prediction = (instances > 0).astype(np.int32)
  prediction[18, 18] = 1  # one-pixel speck: dropped, not a false positive
  (instance,) = get_evaluators(["instances"])
  assert instance(prediction, {"instances": instances[..., None]}) == {"instance_ap": 1.0}
  prediction[2:8, 2:8] = 0
  expected = instance_average_precision(np.where(instances == 2, 1, 0), instances)
  assert run_evaluators((instance,), prediction, {"instances": instances[..., None]})["instance_ap"] == expected == 0.5


def test_unknown_evaluator_and_missing_instances_are_clear_errors():
  with pytest.raises(SegjaxError, match="unknown evaluator 'dice' \\(config key evaluators\\)"):
    get_evaluators(["dice"])
  (instance,) = get_evaluators(["instances"])
  with pytest.raises(SegjaxError, match="needs a dataset with instance maps"):
    instance(np.zeros((4, 4), np.int32), {"mask": np.zeros((4, 4, 1))})
