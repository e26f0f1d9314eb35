"""Segmentation metrics: split-level class scores on device, per-image object scores on the host.

Class scores: per-batch confusion matrices are computed on device (``confusion_matrix``), summed on the host, and
turned into per-class IoU (Jaccard), Dice (F1), mean IoU and pixel accuracy at the end (``summarize_confusion``).
Accumulating counts rather than averaging per-batch scores gives the split-level metric exactly, whatever the batch
size.

Object scores are pure NumPy/SciPy functions of images' predictions and ground truths:

* ISBI 2012 (EM membranes): the challenge pools counts over all slices before forming one F-score per threshold and
  ranks by the best threshold. ``isbi_slice_counts`` gives one slice's counts (to be summed over slices and
  processes), ``isbi_errors_from_counts`` the pixel and Rand errors from the sums, ``isbi_challenge_errors`` both on a
  stack; ``pixel_f1_counts``, ``rand_f_counts`` and ``rand_error`` are their per-image pieces.
* Instance segmentation, per image (the caller averages over images): ``label_instances``,
  ``instance_average_precision`` (Data Science Bowl 2018), ``aggregated_jaccard_index``, ``panoptic_quality``,
  ``f1_at_iou``, and ``instance_scores`` for all of them from one contingency table.
"""

from collections.abc import Sequence
from typing import NamedTuple

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


ISBI_CHALLENGE_THRESHOLDS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))
"""Thresholds of the ISBI 2012 scoring, on the cell-interior probability: 0.0, 0.1, ..., 1.0 (the organisers' Fiji
calls ``getPixelErrorMaximalFScore(0.0, 1.0, 0.1)`` and ``getForegroundRestrictedRandIndexMaximalFScore(0.0, 1.0,
0.1)``)."""

ISBI_COUNT_NAMES: tuple[str, ...] = ("pixel_tp", "pixel_fp", "pixel_fn", "rand_tp", "rand_fp", "rand_fn")
"""The per-threshold counts of :func:`isbi_slice_counts`, keyed ``<name>/t<t>``."""


def f_score(tp: float, fp: float, fn: float) -> float:
  """F1 = 2 TP / (2 TP + FP + FN) of (pooled) counts; NaN where it is undefined (0 / 0: no positive on either side).

  Summing the counts of several images before calling this gives the pooled score the ISBI 2012 challenge ranks by,
  not the mean of per-image scores.
  """
  denominator = 2 * tp + fp + fn
  return float(2 * tp / denominator) if denominator > 0 else float("nan")


def pixel_f1_counts(interior_pred: np.ndarray, interior_true: np.ndarray) -> tuple[int, int, int]:
  """Pixel TP, FP, FN of the cell-interior class of one image, the counts of the ISBI 2012 pixel error.

  The challenge's pixel error is 1 - the F1 of the interior class with these counts summed over all slices
  (Arganda-Carreras et al. 2015, Front. Neuroanat. 9:142; Fiji ``trainableSegmentation.metrics.PixelError``).

  Args:
    interior_pred: (H, W) binary map, non-zero = predicted cell interior.
    interior_true: (H, W) binary map, non-zero = true cell interior.

  Returns:
    ``(tp, fp, fn)``: interior pixels predicted as interior, membrane pixels predicted as interior, interior pixels
    predicted as membrane.
  """
  pred, true = _same_shape(interior_pred, interior_true)
  pred, true = pred.astype(bool), true.astype(bool)
  return int(np.count_nonzero(pred & true)), int(np.count_nonzero(pred & ~true)), int(np.count_nonzero(~pred & true))


def rand_f_counts(pred_segments: np.ndarray, true_segments: np.ndarray) -> tuple[int, int, int]:
  """Pair counts TP, FP, FN of the foreground-restricted Rand F-score (V_rand) of the ISBI 2012 challenge, one image.

  Definition (Arganda-Carreras et al. 2015, Front. Neuroanat. 9:142, "Crowdsourcing the creation of image segmentation
  algorithms for connectomics"; Fiji ``trainableSegmentation.metrics.RandError``, ``foregroundRestrictedStatsN2``, the
  challenge's script):

  * Only pixels inside a ground-truth segment (``true_segments != 0``) count; ground-truth boundary is pruned.
  * ``n_ij`` is the number of those pixels in ground-truth segment i and predicted segment j != 0. Each of the ``N0``
    predicted boundary pixels (``pred_segments == 0``) inside ground-truth foreground is a singleton segment of its
    own, so thick predicted membranes cost a little (as splits) and never merge anything.
  * ``a_i = sum_j n_ij + (pixels of i predicted as boundary)``, ``b_j = sum_i n_ij``.
  * Counting ordered pixel pairs (self-pairs included): ``TP = sum_ij n_ij**2 + N0`` (same segment in both),
    ``FP = sum_j b_j**2 + N0 - TP`` (merged by the prediction), ``FN = sum_i a_i**2 - TP`` (split by it). These are
    Fiji's normalised values times n**2, so that they can be summed over slices.

  Then ``V_rand = 2 TP / (2 TP + FP + FN)`` (:func:`f_score`): the harmonic mean of the Rand merge score
  ``TP / (TP + FP)`` (precision) and the Rand split score ``TP / (TP + FN)`` (recall).

  Args:
    pred_segments: (H, W) integer segment ids, 0 = boundary. Any ids; only equality matters.
    true_segments: (H, W) integer segment ids of the ground truth, 0 = boundary.

  Returns:
    ``(tp, fp, fn)``; all 0 when the ground truth has no foreground pixel.
  """
  pred_segments, true_segments = _same_shape(pred_segments, true_segments)
  inside = true_segments != 0
  true = true_segments[inside]
  pred = pred_segments[inside]
  singletons = int(np.count_nonzero(pred == 0))  # each is its own segment: adds 1 to every sum of squared counts
  segmented = pred != 0
  sum_true = _sum_squared_counts(true)
  sum_pred = _sum_squared_counts(pred[segmented]) + singletons
  tp = _sum_squared_counts(_pair_ids(true[segmented], pred[segmented])) + singletons
  return tp, sum_pred - tp, sum_true - tp


def rand_error(pred_segments: np.ndarray, true_segments: np.ndarray) -> float:
  """Foreground-restricted Rand error ``1 - V_rand`` of one image, from :func:`rand_f_counts`.

  The ISBI 2012 challenge pools the counts over slices and takes the best threshold (:func:`isbi_challenge_errors`);
  this is the score of one segmentation.

  Args:
    pred_segments: (H, W) integer segment ids, 0 = boundary.
    true_segments: (H, W) integer segment ids of the ground truth, 0 = boundary.

  Returns:
    The error in [0, 1]: 0 for a prediction that matches the ground-truth segments; NaN when the ground truth has no
    foreground pixel.
  """
  return 1.0 - f_score(*rand_f_counts(pred_segments, true_segments))


def isbi_slice_counts(
  membrane_probability: np.ndarray,
  membrane_label: np.ndarray,
  *,
  thresholds: Sequence[float] = ISBI_CHALLENGE_THRESHOLDS,
) -> dict[str, int]:
  """Pixel and Rand counts of one slice at each threshold, to be summed (or averaged) over slices.

  At threshold t the predicted cell interior is ``1 - membrane_probability > t``: Fiji's ``proposal > t`` on the
  cell-interior probability map the challenge asked for, i.e. membrane where ``membrane_probability >= 1 - t``.
  Segments are the 4-connected components of the interiors, as in the challenge's script: a one-pixel membrane drawn
  as an 8-connected curve separates the cells on either side only under 4-connectivity. The ground truth does not
  depend on t (Fiji's ``label > t`` on the 0/255 label files).

  Args:
    membrane_probability: (H, W) membrane probability in [0, 1]; a 0/1 map scores a binary prediction.
    membrane_label: (H, W) binary ground truth, 1 (or True) = membrane, 0 = cell interior.
    thresholds: interior-probability thresholds in [0, 1].

  Returns:
    ``{'<name>/t<t>': count}`` for each name of ``ISBI_COUNT_NAMES`` and each t, see :func:`pixel_f1_counts` and
    :func:`rand_f_counts`. :func:`isbi_errors_from_counts` turns their sums into the errors.
  """
  probability, label = _isbi_inputs(membrane_probability, membrane_label)
  if probability.ndim != 2:
    raise ValueError(f"isbi_slice_counts takes one (H, W) slice, got shape {probability.shape}.")
  thresholds = _isbi_thresholds(thresholds)
  interior_true = label == 0
  true_segments = label_instances(interior_true)
  interior_probability = 1.0 - probability
  counts, previous, values = {}, None, ()
  for t in thresholds:
    interior_pred = interior_probability > t
    if previous is None or not np.array_equal(interior_pred, previous):  # a 0/1 map is the same at every t < 1
      pixel = pixel_f1_counts(interior_pred, interior_true)
      values = (*pixel, *rand_f_counts(label_instances(interior_pred), true_segments))
    previous = interior_pred
    for name, value in zip(ISBI_COUNT_NAMES, values, strict=True):
      counts[f"{name}/t{t}"] = value
  return counts


def is_isbi_count_key(key: str) -> bool:
  """Whether ``key`` is one of the per-threshold counts of :func:`isbi_slice_counts` (``'rand_tp/t0.3'``)."""
  name, sep, threshold = key.partition("/t")
  return bool(sep) and name in ISBI_COUNT_NAMES and _is_number(threshold)


def isbi_errors_from_counts(counts: dict[str, float]) -> dict[str, float]:
  """ISBI 2012 errors from counts pooled over slices: per threshold and the best over thresholds.

  The challenge ranks by 1 - the maximal F-score over thresholds, each F formed from counts pooled over all slices
  (Arganda-Carreras et al. 2015, Front. Neuroanat. 9:142; Fiji ``PixelError.getPixelErrorMaximalFScore`` and
  ``RandError.getForegroundRestrictedRandIndexMaximalFScore``). Counts averaged over slices give the same F as their
  sums (the F-score is invariant to scaling all counts). A threshold where F is undefined (0 / 0) is skipped, as
  Fiji's NaN; ties go to the lowest threshold, as Fiji's strict ``>`` over increasing thresholds.

  Args:
    counts: ``{'<name>/t<t>': value}`` with every name of ``ISBI_COUNT_NAMES`` for each threshold t, e.g. the sum
      over slices of :func:`isbi_slice_counts`. Other keys are ignored.

  Returns:
    ``pixel_error/t<t>`` and ``rand_error/t<t>`` for each t, and ``pixel_error``, ``rand_error`` (the smallest of
    each) with ``pixel_error_threshold``, ``rand_error_threshold``: the interior-probability threshold t that gave it
    (interior where ``1 - membrane_probability > t``); NaN where no threshold is defined.
  """
  thresholds = sorted({float(k.partition("/t")[2]) for k in counts if is_isbi_count_key(k)})
  out: dict[str, float] = {}
  for metric in ("pixel", "rand"):
    errors = {}
    for t in thresholds:
      tp, fp, fn = (counts[f"{metric}_{c}/t{t}"] for c in ("tp", "fp", "fn"))
      errors[t] = out[f"{metric}_error/t{t}"] = 1.0 - f_score(tp, fp, fn)
    defined = {t: e for t, e in errors.items() if not np.isnan(e)}
    best = min(defined, key=defined.get) if defined else float("nan")
    out[f"{metric}_error"] = defined[best] if defined else float("nan")
    out[f"{metric}_error_threshold"] = best
  return out


def isbi_challenge_errors(
  membrane_probability: np.ndarray,
  membrane_label: np.ndarray,
  *,
  thresholds: Sequence[float] = ISBI_CHALLENGE_THRESHOLDS,
) -> dict[str, float]:
  """The ISBI 2012 challenge's pixel error and foreground-restricted Rand error of a stack of slices.

  As the challenge ranked submissions (Arganda-Carreras et al. 2015, Front. Neuroanat. 9:142; the organisers' Fiji
  script, ``trainableSegmentation.metrics``): the cell-interior probability ``1 - membrane_probability`` is binarised
  at each threshold t (interior where ``> t``); at each t the pixel F1 of the interior class and the Rand F-score
  (V_rand) are formed from TP, FP, FN summed over all slices; each error is 1 - the best F over t.

  Args:
    membrane_probability: (N, H, W) or (H, W) membrane probability in [0, 1]; a 0/1 map scores a binary prediction.
    membrane_label: the same shape, binary: 1 (or True) = membrane, 0 = cell interior (segjax's ``isbi2012`` classes;
      the challenge's label files hold 0 = membrane, 255 = interior).
    thresholds: interior-probability thresholds in [0, 1]; default 0.0, 0.1, ..., 1.0 as the challenge.

  Returns:
    ``pixel_error``, ``rand_error``, ``pixel_error_threshold``, ``rand_error_threshold`` (the threshold t on the
    interior probability that gave the best score: membrane where ``membrane_probability >= 1 - t``) and
    ``pixel_error/t<t>``, ``rand_error/t<t>`` for each t; see :func:`isbi_errors_from_counts`.

  Raises:
    ValueError: for shapes that differ or are not 2-D/3-D, an empty stack, labels other than 0/1, probabilities
      outside [0, 1] or thresholds outside [0, 1].

  Example:
    >>> label = np.array([[0, 0, 1, 0, 0]])  # two cells split by a membrane pixel
    >>> errors = isbi_challenge_errors(np.array([[0.05, 0.05, 0.25, 0.05, 0.05]]), label)
    >>> errors['rand_error/t0.5'], errors['rand_error'], errors['rand_error_threshold']
    (0.33333333333333337, 0.0, 0.8)
  """
  probability, label = _isbi_inputs(membrane_probability, membrane_label)
  if probability.ndim == 2:
    probability, label = probability[None], label[None]
  if probability.ndim != 3 or len(probability) == 0:
    raise ValueError(f"expected (N, H, W) or (H, W) slices with N >= 1, got shape {probability.shape}.")
  totals: dict[str, int] = {}
  for slice_probability, slice_label in zip(probability, label, strict=True):
    for key, value in isbi_slice_counts(slice_probability, slice_label, thresholds=thresholds).items():
      totals[key] = totals.get(key, 0) + value
  return isbi_errors_from_counts(totals)


def _isbi_inputs(membrane_probability: np.ndarray, membrane_label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Checked float64 probabilities and 0/1 labels of the same shape."""
  probability, label = np.asarray(membrane_probability), np.asarray(membrane_label)
  if probability.shape != label.shape:
    raise ValueError(f"membrane probability shape {probability.shape} differs from label shape {label.shape}.")
  probability = probability.astype(np.float64)
  if not np.all((probability >= 0) & (probability <= 1)):  # also rejects NaN
    raise ValueError("membrane probabilities must lie in [0, 1] (pass class 1's probability, not logits).")
  if not np.all((label == 0) | (label == 1)):
    raise ValueError(f"membrane labels must be 0/1 (1 = membrane), got values {np.unique(label)[:5].tolist()}.")
  return probability, label.astype(np.uint8)


def _isbi_thresholds(thresholds: Sequence[float]) -> tuple[float, ...]:
  values = tuple(float(t) for t in thresholds)
  if not values or any(not 0.0 <= t <= 1.0 for t in values):
    raise ValueError(f"ISBI thresholds must be a non-empty sequence in [0, 1], got {list(values)}.")
  return values


def _is_number(text: str) -> bool:
  try:
    float(text)
  except ValueError:
    return False
  return True


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
  return _precisions(_InstanceOverlaps.of(pred_instances, true_instances), thresholds)


def instance_average_precision(
  pred_instances: np.ndarray, true_instances: np.ndarray, thresholds: Sequence[float] = DSB2018_IOU_THRESHOLDS
) -> float:
  """Mean over IoU thresholds of :func:`instance_precisions`: the Data Science Bowl 2018 score of one image."""
  return float(np.mean(instance_precisions(pred_instances, true_instances, thresholds)))


def aggregated_jaccard_index(pred_instances: np.ndarray, true_instances: np.ndarray) -> float:
  """Aggregated Jaccard Index (AJI) of one image (Kumar et al. 2017, IEEE TMI 36:1550, Algorithm 1).

  Each ground-truth object G_i is paired with the predicted object S_j of largest IoU with it (the lowest id on
  ties); ``C += |G_i & S_j|`` and ``U += |G_i | S_j|``. Every predicted object never chosen adds its area to U, and
  AJI = C / U. Unlike a mean IoU, split and spurious objects enlarge U: a true object halved into two predictions
  scores 1/3, not 1/2. As in Algorithm 1, a prediction chosen by several true objects counts in each of their unions.

  Conventions: a true object that overlaps no prediction chooses none (C += 0, U += |G_i|) rather than an arbitrary
  non-overlapping one; an image with no object on either side scores 1.0 (a perfect empty prediction, as
  :func:`instance_precisions`); objects on only one side score 0.0.

  Args:
    pred_instances: (H, W) integer instance ids, 0 = background. Any ids; only equality matters.
    true_instances: (H, W) integer instance ids of the ground truth, 0 = background.

  Returns:
    AJI in [0, 1].
  """
  return _aji(_InstanceOverlaps.of(pred_instances, true_instances))


def panoptic_quality(
  pred_instances: np.ndarray, true_instances: np.ndarray, *, iou_threshold: float = 0.5
) -> dict[str, float]:
  """Panoptic quality PQ = SQ x RQ of one image's objects of one class (Kirillov et al. 2019, CVPR, Eq. 1-2).

  Objects match when their IoU > ``iou_threshold`` (unique for thresholds >= 0.5). SQ (segmentation quality) is the
  mean IoU of the TP matches; RQ (recognition quality) is ``TP / (TP + FP / 2 + FN / 2)``, the object F1 of
  :func:`f1_at_iou`.

  Conventions: no object on either side gives ``pq = sq = rq = 1.0`` (a perfect empty prediction); objects without a
  match give ``rq = pq = 0.0`` and ``sq = 0.0`` (the mean over no match, taken as 0 as the COCO panoptic API does, so
  that PQ = SQ x RQ).

  Args:
    pred_instances: (H, W) integer instance ids, 0 = background. Any ids; only equality matters.
    true_instances: (H, W) integer instance ids of the ground truth, 0 = background.
    iou_threshold: IoU a match must exceed, in [0.5, 1).

  Returns:
    ``{'pq', 'sq', 'rq'}``.
  """
  return _panoptic(_InstanceOverlaps.of(pred_instances, true_instances), iou_threshold)


def f1_at_iou(pred_instances: np.ndarray, true_instances: np.ndarray, *, iou_threshold: float = 0.5) -> float:
  """Object F1 = 2 TP / (2 TP + FP + FN) of one image, objects matching when their IoU > ``iou_threshold``.

  The matching is unique for thresholds >= 0.5 (as :func:`instance_precisions`). No object on either side scores 1.0;
  objects on only one side score 0.0. It equals the RQ of :func:`panoptic_quality` (Kirillov et al. 2019, Eq. 2).

  Args:
    pred_instances: (H, W) integer instance ids, 0 = background. Any ids; only equality matters.
    true_instances: (H, W) integer instance ids of the ground truth, 0 = background.
    iou_threshold: IoU a match must exceed, in [0.5, 1).

  Returns:
    The F1 in [0, 1].
  """
  return _panoptic(_InstanceOverlaps.of(pred_instances, true_instances), iou_threshold)["rq"]


def instance_scores(pred_instances: np.ndarray, true_instances: np.ndarray) -> dict[str, float]:
  """All instance scores of one image from one contingency table: DSB 2018 AP, AJI, PQ/SQ/RQ and F1 at IoU 0.5.

  Args:
    pred_instances: (H, W) integer instance ids, 0 = background.
    true_instances: (H, W) integer instance ids of the ground truth, 0 = background.

  Returns:
    ``{'instance_ap', 'aji', 'pq', 'sq', 'rq', 'f1'}``, see :func:`instance_average_precision`,
    :func:`aggregated_jaccard_index`, :func:`panoptic_quality` and :func:`f1_at_iou`.
  """
  overlaps = _InstanceOverlaps.of(pred_instances, true_instances)
  panoptic = _panoptic(overlaps, 0.5)
  return {
    "instance_ap": float(np.mean(_precisions(overlaps, DSB2018_IOU_THRESHOLDS))),
    "aji": _aji(overlaps),
    **panoptic,
    "f1": panoptic["rq"],
  }


class _InstanceOverlaps(NamedTuple):
  """Pixel counts of every (true, predicted) object pair, from one contingency table of an image."""

  intersection: np.ndarray  # (T, P) pixels in true object i and predicted object j
  true_area: np.ndarray  # (T,)
  pred_area: np.ndarray  # (P,)

  @classmethod
  def of(cls, pred_instances: np.ndarray, true_instances: np.ndarray) -> "_InstanceOverlaps":
    pred_instances, true_instances = _same_shape(pred_instances, true_instances)
    true_ids, num_true = _consecutive_ids(true_instances)
    pred_ids, num_pred = _consecutive_ids(pred_instances)
    table = np.bincount(
      (true_ids * (num_pred + 1) + pred_ids).ravel(), minlength=(num_true + 1) * (num_pred + 1)
    ).reshape(num_true + 1, num_pred + 1)
    return cls(table[1:, 1:], table[1:].sum(1), table[:, 1:].sum(0))

  @property
  def union(self) -> np.ndarray:
    return self.true_area[:, None] + self.pred_area[None, :] - self.intersection

  @property
  def iou(self) -> np.ndarray:
    return self.intersection / np.maximum(self.union, 1)


def _precisions(overlaps: _InstanceOverlaps, thresholds: Sequence[float]) -> np.ndarray:
  thresholds = np.asarray(thresholds, np.float64)
  if thresholds.ndim != 1 or np.any(thresholds < 0.5) or np.any(thresholds >= 1.0):
    raise ValueError(f"IoU thresholds must lie in [0.5, 1) so that matches are unique, got {thresholds.tolist()}.")
  num_true, num_pred = overlaps.intersection.shape
  if num_true == 0 and num_pred == 0:
    return np.ones(len(thresholds))
  true_positives = np.count_nonzero(overlaps.iou[None] > thresholds[:, None, None], axis=(1, 2))
  return true_positives / (num_true + num_pred - true_positives)


def _aji(overlaps: _InstanceOverlaps) -> float:
  num_true, num_pred = overlaps.intersection.shape
  if num_true == 0 and num_pred == 0:
    return 1.0
  if num_pred == 0:
    return 0.0
  rows = np.arange(num_true)
  best = np.argmax(overlaps.iou, axis=1)  # first maximum: the lowest id on ties
  overlapping = overlaps.intersection[rows, best] > 0
  chosen = np.zeros(num_pred, bool)
  chosen[best[overlapping]] = True
  intersection = overlaps.intersection[rows, best][overlapping].sum()
  union = (
    overlaps.union[rows, best][overlapping].sum()
    + overlaps.true_area[~overlapping].sum()
    + overlaps.pred_area[~chosen].sum()
  )
  return float(intersection / union)


def _panoptic(overlaps: _InstanceOverlaps, iou_threshold: float) -> dict[str, float]:
  if not 0.5 <= iou_threshold < 1.0:
    raise ValueError(f"iou_threshold must lie in [0.5, 1) so that matches are unique, got {iou_threshold}.")
  num_true, num_pred = overlaps.intersection.shape
  if num_true == 0 and num_pred == 0:
    return {"pq": 1.0, "sq": 1.0, "rq": 1.0}
  iou = overlaps.iou
  matched = iou[iou > iou_threshold]
  tp = matched.size
  sq = float(matched.mean()) if tp else 0.0
  rq = f_score(tp, num_pred - tp, num_true - tp)
  return {"pq": sq * rq, "sq": sq, "rq": rq}


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


def _sum_squared_counts(ids: np.ndarray) -> int:
  """Sum over distinct ids of (number of occurrences)**2: a sum of squared contingency-table entries (exact)."""
  _, counts = np.unique(ids, return_counts=True)
  return int(np.sum(counts.astype(np.int64) ** 2))


# --- Image classification -----------------------------------------------------------------------------------------


def top_k_correct(logits: jax.Array, labels: jax.Array, k: int, weights: jax.Array | None = None) -> jax.Array:
  """The (weighted) number of examples whose true label is among the ``k`` highest logits: the numerator of the
  top-k accuracy that ImageNet results report (Russakovsky et al. 2015; top-5 error = 1 - top-5 accuracy). Ties at
  the k-th logit count as correct only up to k classes (``lax.top_k``'s order: lower class index first).

  Args:
    logits: (B, C) scores.
    labels: (B,) integer class ids.
    k: how many of the highest scores count (k >= C counts every example).
    weights: optional (B,) weights (0 for padding examples).
  """
  k = min(k, logits.shape[-1])
  _, top = jax.lax.top_k(logits, k)
  hit = jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)
  return jnp.sum(hit if weights is None else hit * weights)


def summarize_classification(
  totals: dict[str, np.ndarray], class_names: tuple[str, ...], *, top_k: int
) -> dict[str, float]:
  """Split metrics from the summed counts of the classification eval step: ``accuracy`` (top-1), ``error``
  (1 - top-1, the quantity of He et al. 2015's CIFAR-10 table), ``top{k}_accuracy``, the loss and, where the
  confusion matrix was kept, ``accuracy/<class>`` (recall of each class) and ``mean_class_accuracy``."""
  count = max(float(totals["weight_sum"]), 1.0)
  top1 = float(totals["top1"]) / count
  metrics = {
    "loss": float(totals["loss_sum"]) / count,
    "accuracy": top1,
    "error": 1.0 - top1,
    f"top{top_k}_accuracy": float(totals["topk"]) / count,
  }
  if "confusion" in totals:
    confusion = np.asarray(totals["confusion"], np.float64)
    support = confusion.sum(1)
    per_class = np.where(support > 0, np.diag(confusion) / np.maximum(support, 1), np.nan)
    for name, value in zip(class_names, per_class, strict=True):
      metrics[f"accuracy/{name}"] = float(value)
    metrics["mean_class_accuracy"] = float(np.nanmean(per_class)) if np.any(support > 0) else float("nan")
  return metrics
