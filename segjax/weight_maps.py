"""The U-Net pixel weight map (Ronneberger et al. 2015, Sec. 3, Eq. 2), computed with NumPy when preparing a dataset.

    w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))**2 / (2 * sigma**2))

``w_c`` balances the class frequencies and the second (border) term up-weights the thin background gaps between
touching objects (Fig. 3c, d); ``d1`` and ``d2`` are the distances to the nearest and second-nearest object.

Example::

  counts = sum(class_pixel_counts(labels, 2) for labels in train_labels)  # accumulated over the training set
  class_weights = class_balance_from_counts(counts)
  weights = unet_weight_map(instances, labels, class_weights)  # float32 (H, W), fed to the loss as pixel weights
"""

import math

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from segjax.errors import SegjaxError

DEFAULT_W0 = 10.0
DEFAULT_SIGMA = 5.0
DEFAULT_TOLERANCE = 1e-4


def _check_integer_map(name: str, array: npt.ArrayLike) -> np.ndarray:
  """The input as a 2-D integer array, or SegjaxError naming what is wrong with it."""
  array = np.asarray(array)
  if array.ndim != 2:
    raise SegjaxError(f"{name} must be a 2-D (H, W) array, got shape {array.shape}.")
  if not np.issubdtype(array.dtype, np.integer):
    raise SegjaxError(f"{name} must have an integer dtype, got {array.dtype}; cast label images to int.")
  return array


def _check_instances(instances: npt.ArrayLike) -> np.ndarray:
  instances = _check_integer_map("instances", instances)
  if instances.size and instances.min() < 0:
    raise SegjaxError(f"instances must be >= 0 (0 = background, k > 0 = object k), got min {instances.min()}.")
  return instances


def border_cutoff(sigma: float = DEFAULT_SIGMA, tolerance: float = DEFAULT_TOLERANCE) -> int:
  """Distance in pixels beyond which an object cannot change the border term by more than ``tolerance * w0``.

  The cutoff is ``m = ceil(sigma * sqrt(2 * ln(1 / tolerance)))``, the smallest integer with
  ``exp(-m**2 / (2 * sigma**2)) <= tolerance``: if ``d2 > m`` (hence ``d1 + d2 > m``) the term of Eq. 2 is below
  ``tolerance * w0``. With the defaults (sigma 5, tolerance 1e-4) it is 22 px.

  Args:
    sigma: the Gaussian width of Eq. 2 in pixels, > 0.
    tolerance: the allowed error relative to ``w0``, in (0, 1).

  Returns:
    The cutoff ``m`` in pixels.

  Raises:
    SegjaxError: for a non-positive sigma or a tolerance outside (0, 1).
  """
  if not sigma > 0:
    raise SegjaxError(f"sigma must be > 0 pixels, got {sigma}.")
  if not 0 < tolerance < 1:
    raise SegjaxError(f"tolerance must be in (0, 1), got {tolerance}.")
  return math.ceil(sigma * math.sqrt(2.0 * math.log(1.0 / tolerance)))


def border_weights(
  instances: npt.ArrayLike,
  *,
  w0: float = DEFAULT_W0,
  sigma: float = DEFAULT_SIGMA,
  tolerance: float = DEFAULT_TOLERANCE,
) -> np.ndarray:
  """The border term of the U-Net weight map, ``w0 * exp(-(d1 + d2)**2 / (2 * sigma**2))`` (Sec. 3, Eq. 2).

  ``d1(x)`` and ``d2(x)`` are the Euclidean distances from pixel ``x`` to the nearest pixel of the nearest and of the
  second-nearest object. Choices where the paper is silent:

  * The term is applied to background pixels (instance id 0) only and is 0 inside objects: it is meant for the
    background gaps separating touching cells (Fig. 3d).
  * With fewer than two objects ``d2`` is undefined and the term is 0 everywhere.

  Speed: each object's distance transform is computed only inside its bounding box grown by
  ``m = border_cutoff(sigma, tolerance)`` pixels, keeping the running smallest and second-smallest distance per
  pixel. Objects farther than ``m`` from a pixel are thus not seen by it. This changes the result only at pixels whose
  true ``d2`` exceeds ``m``, where both the exact and the computed term (whose ``d2`` can only be larger) lie in
  ``[0, w0 * exp(-m**2 / (2 * sigma**2))]``; so every pixel is within ``tolerance * |w0|`` of the exact term.

  Args:
    instances: (H, W) integer instance ids, 0 = background, k > 0 = object k; ids need not be consecutive.
    w0: the weight of the border term (10 in the paper).
    sigma: its width in pixels (5 in the paper).
    tolerance: the maximum error per pixel relative to ``w0`` (see above).

  Returns:
    float32 (H, W) border weights.

  Raises:
    SegjaxError: for a non-2-D, non-integer or negative instance map, or a bad sigma or tolerance.

  References:
    Ronneberger, Fischer, Brox. U-Net: Convolutional Networks for Biomedical Image Segmentation. MICCAI 2015.
  """
  instances = _check_instances(instances)
  margin = border_cutoff(sigma, tolerance)
  out = np.zeros(instances.shape, np.float32)
  ids = np.unique(instances)
  ids = ids[ids > 0]
  if len(ids) < 2 or w0 == 0:
    return out
  # Consecutive ids 1..n so find_objects' list is as long as the number of objects, whatever the ids are.
  compact = np.searchsorted(ids, instances).astype(np.intp) + 1
  compact[instances == 0] = 0
  height, width = instances.shape
  d1 = np.full(instances.shape, np.inf)
  d2 = np.full(instances.shape, np.inf)
  for label, box in enumerate(ndimage.find_objects(compact), start=1):
    rows, cols = box
    crop = (
      slice(max(rows.start - margin, 0), min(rows.stop + margin, height)),
      slice(max(cols.start - margin, 0), min(cols.stop + margin, width)),
    )
    # The crop holds the whole object, so these are its exact distances at every pixel of the crop.
    dist = ndimage.distance_transform_edt(compact[crop] != label)
    near, second = d1[crop], d2[crop]
    np.minimum(second, np.maximum(near, dist), out=second)
    np.minimum(near, dist, out=near)
  background = instances == 0
  total = d1[background] + d2[background]  # inf where fewer than two objects are within the cutoff: term 0
  out[background] = w0 * np.exp(-(total**2) / (2.0 * sigma**2))
  return out


def class_pixel_counts(labels: npt.ArrayLike, num_classes: int, *, ignore_label: int | None = None) -> np.ndarray:
  """Pixels per class, int64 (num_classes,); sum it over a dataset and pass it to ``class_balance_from_counts``.

  Args:
    labels: integer class ids of any shape (one image or a stack).
    num_classes: the number of classes; every label must be in [0, num_classes) or equal ``ignore_label``.
    ignore_label: a label that is not counted (e.g. 255).

  Raises:
    SegjaxError: for non-integer labels, num_classes < 1, or a label outside [0, num_classes) that is not ignored.
  """
  labels = np.asarray(labels)
  if not np.issubdtype(labels.dtype, np.integer):
    raise SegjaxError(f"labels must have an integer dtype, got {labels.dtype}.")
  if num_classes < 1:
    raise SegjaxError(f"num_classes must be >= 1, got {num_classes}.")
  labels = labels.ravel()
  if ignore_label is not None:
    labels = labels[labels != ignore_label]
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    bad = labels.min() if labels.min() < 0 else labels.max()
    raise SegjaxError(f"label {bad} is outside [0, {num_classes}); set ignore_label or num_classes to match the data.")
  return np.bincount(labels, minlength=num_classes).astype(np.int64)


def class_balance_from_counts(counts: npt.ArrayLike) -> np.ndarray:
  """Class weights ``w_c`` of Eq. 2 from pixel counts per class: inverse frequency, mean pixel weight 1.

  ``w_c = total / (num_present * count_c)`` with ``total`` the number of counted pixels and ``num_present`` the
  number of classes with at least one pixel. Every present class thus gets the same total weight and the mean weight
  over the counted pixels is exactly 1, so the loss keeps the scale of the unweighted one. A class with no pixels gets
  weight 0 (it has nothing to balance; 0 also leaves it out of a loss if it shows up in other data).

  Args:
    counts: non-negative pixel counts (num_classes,), e.g. summed ``class_pixel_counts`` over a training set.

  Returns:
    float32 (num_classes,) class weights; all 0 when no pixel was counted.

  Raises:
    SegjaxError: for counts that are not a 1-D vector of non-negative numbers.
  """
  counts = np.asarray(counts, np.float64)
  if counts.ndim != 1 or not counts.size:
    raise SegjaxError(f"counts must be a non-empty 1-D vector (num_classes,), got shape {counts.shape}.")
  if not np.all(np.isfinite(counts)) or counts.min() < 0:
    raise SegjaxError(f"counts must be finite and >= 0, got {counts.tolist()}.")
  present = counts > 0
  weights = np.zeros(counts.shape, np.float64)
  weights[present] = counts.sum() / (present.sum() * counts[present])
  return weights.astype(np.float32)


def class_balance_weights(labels: npt.ArrayLike, num_classes: int, *, ignore_label: int | None = None) -> np.ndarray:
  """Class weights ``w_c`` of Eq. 2 from the pixel frequencies in ``labels``; see ``class_balance_from_counts``.

  Args:
    labels: integer class ids of any shape.
    num_classes: the number of classes.
    ignore_label: a label that is not counted.

  Returns:
    float32 (num_classes,) class weights.
  """
  return class_balance_from_counts(class_pixel_counts(labels, num_classes, ignore_label=ignore_label))


def unet_weight_map(
  instances: npt.ArrayLike,
  labels: npt.ArrayLike,
  class_weights: npt.ArrayLike,
  *,
  w0: float = DEFAULT_W0,
  sigma: float = DEFAULT_SIGMA,
  tolerance: float = DEFAULT_TOLERANCE,
) -> np.ndarray:
  """The U-Net weight map ``w(x) = w_c(x) + w0 * exp(-(d1 + d2)**2 / (2 * sigma**2))`` (Sec. 3, Eq. 2).

  Pixels whose label is outside ``[0, len(class_weights))`` (an ignore label such as 255 or -1) get weight 0.

  Args:
    instances: (H, W) integer instance ids (0 = background), for the border term; see ``border_weights``.
    labels: (H, W) integer class ids, for ``w_c``.
    class_weights: (num_classes,) weights ``w_c``, e.g. from ``class_balance_from_counts``.
    w0: the weight of the border term.
    sigma: its width in pixels.
    tolerance: the maximum error of the border term relative to ``w0``.

  Returns:
    float32 (H, W) pixel weights.

  Raises:
    SegjaxError: for bad instances or labels, or mismatched shapes.
  """
  instances = _check_instances(instances)
  labels = _check_integer_map("labels", labels)
  class_weights = np.asarray(class_weights, np.float32)
  if labels.shape != instances.shape:
    raise SegjaxError(f"labels shape {labels.shape} differs from instances shape {instances.shape}.")
  if class_weights.ndim != 1:
    raise SegjaxError(f"class_weights must be a 1-D vector (num_classes,), got shape {class_weights.shape}.")
  valid = (labels >= 0) & (labels < len(class_weights))
  weights = border_weights(instances, w0=w0, sigma=sigma, tolerance=tolerance)
  weights[valid] += class_weights[labels[valid]]
  weights[~valid] = 0.0
  return weights
