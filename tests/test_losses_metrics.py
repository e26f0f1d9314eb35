"""Loss and metric values on hand-computed cases."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from segjax.errors import SegjaxError
from segjax.losses import get_loss, softmax_cross_entropy
from segjax.metrics import confusion_matrix, summarize_confusion


def test_cross_entropy_matches_hand_computation():
  # Two pixels, 2 classes. Pixel 0: logits (0, 0) label 1 -> ln 2. Pixel 1: logits (ln 3, 0) label 0 -> ln(4/3).
  logits = jnp.array([[[0.0, 0.0], [math.log(3.0), 0.0]]])
  labels = jnp.array([[1, 0]])
  expected = (math.log(2.0) + math.log(4.0 / 3.0)) / 2
  np.testing.assert_allclose(softmax_cross_entropy(logits, labels), expected, rtol=1e-6)


def test_cross_entropy_weights_select_and_scale_pixels():
  logits = jnp.array([[[0.0, 0.0], [math.log(3.0), 0.0]]])
  labels = jnp.array([[1, 0]])
  only_second = softmax_cross_entropy(logits, labels, jnp.array([[0.0, 1.0]]))
  np.testing.assert_allclose(only_second, math.log(4.0 / 3.0), rtol=1e-6)
  # w = (1, 3): (ln2 + 3 ln(4/3)) / 4, the U-Net paper's weighted energy normalised by the total weight.
  weighted = softmax_cross_entropy(logits, labels, jnp.array([[1.0, 3.0]]))
  np.testing.assert_allclose(weighted, (math.log(2.0) + 3 * math.log(4.0 / 3.0)) / 4, rtol=1e-6)


def test_unknown_loss_names_the_config_key():
  with pytest.raises(SegjaxError, match="unknown loss 'dice_typo' \\(config key loss\\)"):
    get_loss("dice_typo")


def test_confusion_matrix_counts_pairs_and_skips_ignored_and_padding():
  labels = jnp.array([[0, 0, 1, 1], [2, 2, 255, 1]])
  preds = jnp.array([[0, 1, 1, 1], [2, 0, 0, 1]])
  weights = jnp.array([[1, 1, 1, 1], [1, 1, 1, 0]])
  m = np.asarray(confusion_matrix(preds, labels, 3, weights))
  expected = np.array([[1, 1, 0], [0, 2, 0], [1, 0, 1]])
  np.testing.assert_array_equal(m, expected)


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


def test_downsample_nearest_matches_ceil_sizes_of_decoder_levels():
  from segjax.losses import downsample_nearest

  x = jnp.arange(37 * 50).reshape(1, 37, 50)
  out = downsample_nearest(x, 10, 13)  # ceil(37/4), ceil(50/4)
  np.testing.assert_array_equal(out, x[:, ::4, ::4])
  with pytest.raises(ValueError, match="power-of-two"):
    downsample_nearest(x, 11, 13)


def test_deep_supervision_loss_weights_outputs_by_resolution():
  from segjax.losses import deep_supervision_loss

  labels = jnp.zeros((1, 8, 8), jnp.int32)
  perfect = jnp.stack([jnp.full((8, 8), 20.0), jnp.zeros((8, 8))], -1)[None]
  wrong_coarse = jnp.stack([jnp.zeros((2, 2)), jnp.full((2, 2), math.log(3.0))], -1)[None]  # CE = ln 4
  mid = jnp.stack([jnp.full((4, 4), 20.0), jnp.zeros((4, 4))], -1)[None]
  loss = deep_supervision_loss(softmax_cross_entropy, perfect, (wrong_coarse, mid), labels)
  # weights 1, 1/2, 1/4 for resolutions 1, 1/2, 1/4; only the 1/4 output has loss ln 4 (others ~ 2e-9).
  np.testing.assert_allclose(loss, 0.25 * math.log(4.0) / 1.75, rtol=1e-5)
