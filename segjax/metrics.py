"""Segmentation metrics: split-level class scores on device, per-image object scores on the host.

Class scores: per-batch confusion matrices are computed on device (``confusion_matrix``), summed on the host, and
turned into per-class IoU (Jaccard), Dice (F1), mean IoU and pixel accuracy at the end (``summarize_confusion``).
Accumulating counts rather than averaging per-batch scores gives the split-level metric exactly, whatever the batch
size.

Object scores are pure NumPy/SciPy functions of one image's prediction and ground truth; the caller averages them over
images, as the challenges that define them do:

* ISBI 2012 (EM membranes): ``pixel_error`` and ``rand_error``, both via ``isbi_scores``.
* Data Science Bowl 2018 (nuclei): ``label_instances`` and ``instance_average_precision``.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage


def confusion_matrix(
  predictions: jax.Array, labels: jax.Array, num_classes: int, weights: jax.Array | None = None
) -> jax.Array:
  """Counts (label, prediction) pairs.

  Args:
    predictions: integer predicted class ids, any shape.
    labels: integer true class ids, the predictions' shape.
    num_classes: C. Labels outside [0, C) (e.g. an ignore value of 255) are not counted.
    weights: optional 0/1 mask of the same shape; pixels with weight 0 (padding) are not counted.

  Returns:
    int32 (C, C) matrix ``m`` with ``m[i, j]`` = number of pixels of true class i predicted as class j.
  """
  labels = labels.reshape(-1).astype(jnp.int32)
  predictions = predictions.reshape(-1).astype(jnp.int32)
  valid = (labels >= 0) & (labels < num_classes)
  if weights is not None:
    valid &= weights.reshape(-1) > 0
  index = jnp.where(valid, labels * num_classes + predictions, num_classes * num_classes)
  counts = jnp.bincount(index, length=num_classes * num_classes + 1)[:-1]
  return counts.reshape(num_classes, num_classes).astype(jnp.int32)


def summarize_confusion(matrix: np.ndarray, *, foreground_classes: tuple[int, ...] | None = None) -> dict[str, float]:
  """Turns a confusion matrix into scalar metrics.

  IoU_c = TP / (TP + FP + FN) and Dice_c = 2 TP / (2 TP + FP + FN) for each class c. A class that appears neither in
  the labels nor in the predictions has no defined score; it is reported as NaN and left out of the means.

  Args:
    matrix: (C, C) counts, rows = true class, columns = predicted class.
    foreground_classes: classes averaged into ``foreground_iou``; default all but class 0.

  Returns:
    Dict with ``pixel_accuracy``, ``mean_iou``, ``mean_dice``, ``foreground_iou``, ``iou/<c>`` and ``dice/<c>``.
  """
  matrix = np.asarray(matrix, dtype=np.float64)
  num_classes = matrix.shape[0]
  tp = np.diag(matrix)
  fp = matrix.sum(axis=0) - tp
  fn = matrix.sum(axis=1) - tp
  with np.errstate(invalid="ignore", divide="ignore"):
    iou = np.where(tp + fp + fn > 0, tp / (tp + fp + fn), np.nan)
    dice = np.where(tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
  total = matrix.sum()
  if foreground_classes is None:
    foreground_classes = tuple(range(1, num_classes)) if num_classes > 1 else (0,)
  fg = iou[list(foreground_classes)]
  out = {
    "pixel_accuracy": float(tp.sum() / total) if total > 0 else float("nan"),
    "mean_iou": _nanmean(iou),
    "mean_dice": _nanmean(dice),
    "foreground_iou": _nanmean(fg),
  }
  for c in range(num_classes):
    out[f"iou/{c}"] = float(iou[c])
    out[f"dice/{c}"] = float(dice[c])
  return out


def _nanmean(values: np.ndarray) -> float:
  values = values[~np.isnan(values)]
  return float(values.mean()) if values.size else float("nan")


def pixel_error(prediction: np.ndarray, label: np.ndarray, mask: np.ndarray | None = None) -> float:
  """Fraction of pixels where two binary maps differ: 1 - pixel accuracy.

  This is the ISBI 2012 challenge's pixel error for a binary proposal (Arganda-Carreras et al. 2015, Front.
  Neuroanat. 9:142; Fiji ``trainableSegmentation.metrics.PixelError``: the mean squared difference of the binarised
  maps). Non-zero values count as True.

  Args:
    prediction: (H, W) binary map, e.g. predicted cell interior.
    label: (H, W) binary map of the same meaning.
    mask: optional (H, W) map; only pixels where it is non-zero are counted.

  Returns:
    The error in [0, 1]; NaN when the mask selects no pixel.
  """
  prediction, label = _same_shape(prediction, label)
  differ = prediction.astype(bool) != label.astype(bool)
  if mask is not None:
    differ = differ[np.broadcast_to(np.asarray(mask).astype(bool), differ.shape)]
  return float(differ.mean()) if differ.size else float("nan")


def rand_error(pred_segments: np.ndarray, true_segments: np.ndarray) -> float:
  """Foreground-restricted Rand error ``1 - V_rand`` of the ISBI 2012 challenge.

  Definition (Arganda-Carreras et al. 2015, Front. Neuroanat. 9:142, "Crowdsourcing the creation of image segmentation
  algorithms for connectomics"; Fiji
  ``trainableSegmentation.metrics.RandError.getForegroundRestrictedRandIndexStatsN2``, the challenge's script):

  * Only the n pixels inside a ground-truth segment (``true_segments != 0``) count; ground-truth boundary is pruned.
  * ``p_ij`` is the fraction of those pixels in ground-truth segment i and predicted segment j != 0. A predicted
    boundary pixel (``pred_segments == 0``) inside ground-truth foreground is a singleton segment of its own: it adds
    ``1/n**2`` to ``sum p_ij**2`` and to ``sum s_j**2``, so thick predicted membranes cost a little (as splits) and
    never merge anything.
  * ``t_i = sum_j p_ij`` (ground truth, including the singletons), ``s_j = sum_i p_ij`` (prediction).
  * ``V_rand = sum_ij p_ij**2 / (0.5 sum_j s_j**2 + 0.5 sum_i t_i**2)``: the harmonic mean (F-score, alpha = 0.5) of
    the Rand merge score ``sum p**2 / sum s**2`` (precision) and the Rand split score ``sum p**2 / sum t**2`` (recall).

  The challenge took the best score over binarisation thresholds of a probability map; for a binary prediction there
  is one threshold. The revised leaderboard's ``V_rand (thinned)`` additionally thins both boundary maps to one pixel
  first (skeletonisation), which this function does not do.

  Args:
    pred_segments: (H, W) integer segment ids, 0 = boundary. Any ids; only equality matters.
    true_segments: (H, W) integer segment ids of the ground truth, 0 = boundary.

  Returns:
    The error in [0, 1]: 0 for a prediction that matches the ground-truth segments; NaN when the ground truth has no
    foreground pixel.
  """
  pred_segments, true_segments = _same_shape(pred_segments, true_segments)
  inside = true_segments != 0
  true = true_segments[inside]
  pred = pred_segments[inside]
  if true.size == 0:
    return float("nan")
  singletons = np.count_nonzero(pred == 0)  # each is its own segment: adds 1 to every sum of squared counts
  segmented = pred != 0
  sum_true = _sum_squared_counts(true)
  sum_pred = _sum_squared_counts(pred[segmented]) + singletons
  sum_joint = _sum_squared_counts(_pair_ids(true[segmented], pred[segmented])) + singletons
  return float(1.0 - sum_joint / (0.5 * sum_pred + 0.5 * sum_true))


def isbi_scores(pred_foreground: np.ndarray, true_foreground: np.ndarray) -> dict[str, float]:
  """ISBI 2012 pixel and Rand errors of a binary cell-interior prediction.

  Segments are the 4-connected components of the foreground, as in the challenge's Fiji script: a one-pixel membrane
  drawn as an 8-connected curve separates the cells on either side only under 4-connectivity (with 8-connectivity
  they would leak into each other through the curve's diagonal steps).

  Args:
    pred_foreground: (H, W) bool, True for predicted cell interior (non-membrane). In segjax class 1 is membrane, so
      pass ``prediction != 1``.
    true_foreground: (H, W) bool, True for ground-truth cell interior.

  Returns:
    ``{'pixel_error', 'rand_error'}``, see :func:`pixel_error` and :func:`rand_error`.
  """
  pred_foreground, true_foreground = _same_shape(pred_foreground, true_foreground)
  return {
    "pixel_error": pixel_error(pred_foreground, true_foreground),
    "rand_error": rand_error(label_instances(pred_foreground), label_instances(true_foreground)),
  }


def label_instances(foreground: np.ndarray, *, min_size: int = 0, connectivity: int = 1) -> np.ndarray:
  """Connected components of a binary map, without those smaller than ``min_size``, numbered 1..K (0 = background).

  Args:
    foreground: (H, W) binary map (non-zero = foreground).
    min_size: components with fewer pixels are removed (set to background); the rest are relabelled consecutively
      in scan order.
    connectivity: 1 for the 4-neighbourhood (edges only; the default, as scipy and the ISBI script), 2 for the
      8-neighbourhood (diagonals too).

  Returns:
    int32 (H, W) instance ids.
  """
  foreground = np.asarray(foreground).astype(bool)
  structure = ndimage.generate_binary_structure(foreground.ndim, connectivity)
  labels, count = ndimage.label(foreground, structure=structure)
  if min_size > 0 and count > 0:
    keep = np.bincount(labels.ravel(), minlength=count + 1) >= min_size
    keep[0] = False
    new_ids = np.zeros(count + 1, np.int32)
    new_ids[keep] = np.arange(1, np.count_nonzero(keep) + 1, dtype=np.int32)
    labels = new_ids[labels]
  return labels.astype(np.int32)


DSB2018_IOU_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


def instance_precisions(
  pred_instances: np.ndarray, true_instances: np.ndarray, thresholds: Sequence[float] = DSB2018_IOU_THRESHOLDS
) -> np.ndarray:
  """Object-level precision ``TP / (TP + FP + FN)`` at each IoU threshold (Data Science Bowl 2018 metric).

  At threshold t a predicted object matches (is a true positive for) a true object when their IoU > t; for t >= 0.5
  each object has at most one such partner, so the matching is unique. Unmatched predicted objects are false
  positives, unmatched true objects false negatives (Caicedo et al. 2019, Nat. Methods 16:1247, Online Methods). The
  IoUs of all object pairs come from one contingency table (``np.bincount`` of paired ids), not a loop over pairs.

  Args:
    pred_instances: (H, W) integer instance ids, 0 = background. Any ids; only equality matters.
    true_instances: (H, W) integer instance ids of the ground truth, 0 = background.
    thresholds: IoU thresholds, each in [0.5, 1); default 0.5, 0.55, ..., 0.95.

  Returns:
    float64 array of one precision per threshold. An image with neither true nor predicted objects scores 1.0 (a
    perfect empty prediction); one with objects on only one side scores 0.0.
  """
  thresholds = np.asarray(thresholds, np.float64)
  if thresholds.ndim != 1 or np.any(thresholds < 0.5) or np.any(thresholds >= 1.0):
    raise ValueError(f"IoU thresholds must lie in [0.5, 1) so that matches are unique, got {thresholds.tolist()}.")
  pred_instances, true_instances = _same_shape(pred_instances, true_instances)
  true_ids, num_true = _consecutive_ids(true_instances)
  pred_ids, num_pred = _consecutive_ids(pred_instances)
  if num_true == 0 and num_pred == 0:
    return np.ones(len(thresholds))
  table = np.bincount(
    (true_ids * (num_pred + 1) + pred_ids).ravel(), minlength=(num_true + 1) * (num_pred + 1)
  ).reshape(num_true + 1, num_pred + 1)
  intersection = table[1:, 1:]
  union = table[1:].sum(1)[:, None] + table[:, 1:].sum(0)[None, :] - intersection
  iou = intersection / np.maximum(union, 1)
  true_positives = np.count_nonzero(iou[None] > thresholds[:, None, None], axis=(1, 2))
  return true_positives / (num_true + num_pred - true_positives)


def instance_average_precision(
  pred_instances: np.ndarray, true_instances: np.ndarray, thresholds: Sequence[float] = DSB2018_IOU_THRESHOLDS
) -> float:
  """Mean over IoU thresholds of :func:`instance_precisions`: the Data Science Bowl 2018 score of one image."""
  return float(np.mean(instance_precisions(pred_instances, true_instances, thresholds)))


def _same_shape(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  a, b = np.asarray(a), np.asarray(b)
  if a.shape != b.shape:
    raise ValueError(f"prediction shape {a.shape} differs from ground-truth shape {b.shape}.")
  return a, b


def _consecutive_ids(instances: np.ndarray) -> tuple[np.ndarray, int]:
  """Maps the non-zero ids of ``instances`` onto 1..K in sorted order (0 stays 0); returns the map and K."""
  ids = np.unique(instances[instances != 0])
  return np.where(instances != 0, np.searchsorted(ids, instances) + 1, 0), len(ids)


def _pair_ids(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """One integer per distinct (a, b) pair of two equally long 1-D id arrays."""
  _, a_index = np.unique(a, return_inverse=True)
  b_values, b_index = np.unique(b, return_inverse=True)
  return a_index.astype(np.int64) * len(b_values) + b_index


def _sum_squared_counts(ids: np.ndarray) -> float:
  """Sum over distinct ids of (number of occurrences)**2: a sum of squared contingency-table entries."""
  _, counts = np.unique(ids, return_counts=True)
  return float(np.sum(counts.astype(np.float64) ** 2))
