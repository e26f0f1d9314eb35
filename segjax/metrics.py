"""Segmentation metrics from a confusion matrix accumulated over a whole evaluation split.

Per-batch confusion matrices are computed on device (``confusion_matrix``), summed on the host, and turned into
per-class IoU (Jaccard), Dice (F1), mean IoU and pixel accuracy at the end (``summarize_confusion``). Accumulating
counts rather than averaging per-batch scores gives the split-level metric exactly, whatever the batch size.
"""

import jax
import jax.numpy as jnp
import numpy as np


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
