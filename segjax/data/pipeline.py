"""The input pipeline: grain over random-access (TFDS array_record) data sources.

Training batches are addressed by step: the global batch of step ``s`` holds elements ``[s*B, (s+1)*B)`` of one
infinite, seeded shuffle of the split (reshuffled each epoch), each cropped at random to the training tile with a
generator seeded by (seed, element index). The batch is therefore a pure function of (seed, s): the number of reader
threads does not change it, and resuming at step ``s`` needs no iterator state but ``s`` itself (which the checkpoint
stores). With several processes, process ``p`` of ``P`` reads every P-th element of that stream, so the union of the
per-process batches of step ``s`` is exactly the single-process global batch of step ``s``.

Evaluation reads a split in order, pads each image to a size the model takes (mirroring the image at its borders;
padded pixels get weight 0) and groups images of the same padded size into fixed-size batches.
"""

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grain
import jax
import numpy as np

from segjax.errors import SegjaxError
from segjax.models.geometry import Geometry

Example = dict[str, np.ndarray]


NORMALIZATIONS = ("scale", "percentile", "image_percentile")
"""How raw intensities become the model's [0, 1] input (config key ``data.normalization``)."""


@dataclasses.dataclass(frozen=True)
class Normalization:
  """How an image's raw intensities map to [0, 1] (config keys ``data.normalization``, ``data.intensity_range``).

  * ``'scale'``: divided by the largest value of the dtype (255 or 65535).
  * ``'percentile'``: scaled as ``'scale'``, then clipped to the data set's ``(low, high)`` (in those [0, 1] units: the
    0.5 and 99.5 percentiles that ``experiments.plan``'s fingerprint reports) and mapped linearly onto [0, 1], so
    that a 16-bit image using a tenth of its range fills the input: nnU-Net's CT scheme (Isensee et al.
    2021), whose outlier clipping is what matters here; its global z-score after the clipping is an affine map of
    the input, which the first convolution and its normalisation absorb, so [0, 1] is kept for the intensity
    augmentations.
  * ``'image_percentile'``: the same with each image's own 0.5 / 99.5 percentiles (per channel), for data whose
    brightness varies between images (nnU-Net's per-image scheme, range-preserving).
  """

  mode: str = "scale"
  low: float | None = None
  high: float | None = None

  @classmethod
  def from_config(cls, data: Any) -> "Normalization":
    """From a ``data`` config section; a SegjaxError names the key of a bad value."""
    mode = data.normalization
    if mode not in NORMALIZATIONS:
      raise SegjaxError(f"unknown data.normalization {mode!r}; available: {', '.join(NORMALIZATIONS)}.")
    if mode != "percentile":
      return cls(mode)
    bounds = tuple(data.intensity_range or ())
    if len(bounds) != 2 or not 0.0 <= float(bounds[0]) < float(bounds[1]) <= 1.0:
      raise SegjaxError(
        f"data.normalization 'percentile' needs data.intensity_range = (low, high) with 0 <= low < high <= 1 "
        f"(fractions of the bit depth's range), got {data.intensity_range!r}; experiments.plan prints the data set's "
        "0.5 and 99.5 percentiles."
      )
    return cls(mode, float(bounds[0]), float(bounds[1]))

  def __call__(self, image: np.ndarray) -> np.ndarray:
    """(H, W, C) uint8 / uint16 -> float32 in [0, 1]."""
    scaled = image.astype(np.float32) / (65535.0 if image.dtype == np.uint16 else 255.0)
    if self.mode == "scale":
      return scaled
    if self.mode == "percentile":
      low, high = np.float32(self.low), np.float32(self.high)
    else:
      low, high = np.percentile(scaled, (0.5, 99.5), axis=(0, 1)).astype(np.float32)
      high = np.maximum(high, low + np.float32(1e-6))  # a flat image (or channel) maps to 0
    return np.clip((scaled - low) / (high - low), 0.0, 1.0)


def normalize_image(image: np.ndarray, normalization: Normalization | None = None) -> np.ndarray:
  """uint8 (or uint16) image (H, W, C) -> float32 in [0, 1] by ``normalization`` (default ``'scale'``). Training,
  evaluation and prediction all go through here."""
  return (normalization or Normalization())(image)


@dataclasses.dataclass(frozen=True)
class WeightMap:
  """The U-Net loss weight map w(x) = w_c(label(x)) + w0 * border(x) (Ronneberger et al. 2015, Eq. 2).

  Attributes:
    class_weights: w_c, one weight per class.
    w0: the factor of the border term (stored with the data as ``border_weights``, without w0).
  """

  class_weights: tuple[float, ...]
  w0: float = 10.0


def to_model_inputs(
  features: Mapping[str, Any],
  num_classes: int,
  weight_map: WeightMap | None = None,
  normalization: Normalization | None = None,
) -> Example:
  """Decoded dataset features -> the model's inputs.

  Returns:
    ``image`` float32 (H, W, C) in [0, 1] (:func:`normalize_image` by ``normalization``), ``label`` int32 (H, W)
    and ``weights`` float32 (H, W): 0 where the mask holds no class (``features.IGNORE_LABEL`` or any value >=
    ``num_classes``; the label is set to 0 there), else 1, or the weight map's value when one is given.
  """
  label = np.asarray(features["mask"])[..., 0].astype(np.int32)
  valid = label < num_classes
  label = np.where(valid, label, 0)
  weights = valid.astype(np.float32)
  if weight_map is not None:
    class_weights = np.asarray(weight_map.class_weights, np.float32)
    border = np.asarray(features["border_weights"], np.float32)
    weights *= class_weights[label] + np.float32(weight_map.w0) * border
  return {"image": normalize_image(np.asarray(features["image"]), normalization), "label": label, "weights": weights}


def split_class_counts(source: Any, num_classes: int) -> np.ndarray:
  """Pixels per class over a whole split (pixels without a class are not counted)."""
  from segjax.weight_maps import class_pixel_counts as count_pixels

  counts = np.zeros(num_classes, np.int64)
  for i in range(len(source)):
    mask = np.asarray(source[i]["mask"])[..., 0]
    counts += count_pixels(
      np.where(mask < num_classes, mask, num_classes).astype(np.int64), num_classes, ignore_label=num_classes
    )
  return counts


def _pad(array: np.ndarray, before: tuple[int, int], after: tuple[int, int], mode: str) -> np.ndarray:
  widths = [(before[0], after[0]), (before[1], after[1])] + [(0, 0)] * (array.ndim - 2)
  if not any(before + after):
    return array
  return np.pad(array, widths, mode=mode) if mode == "reflect" else np.pad(array, widths)


def _pad_example(example: Example, before: tuple[int, int], after: tuple[int, int]) -> Example:
  """Pads an example's image by mirroring and its label and weights with 0 (padded pixels count nowhere)."""
  return {
    "image": _pad(example["image"], before, after, "reflect"),
    "label": _pad(example["label"], before, after, "constant"),
    "weights": _pad(example["weights"], before, after, "constant"),
  }


def random_crop(example: Example, rng: np.random.Generator, *, size: int, margin: int = 0) -> Example:
  """A random ``size`` x ``size`` training tile of an image of any size.

  The tile's central ``size - 2*margin`` output window lies inside the image where the image is large enough (with
  a margin, as for the unpadded U-Net, the context around it is mirrored where it leaves the image, as in the U-Net
  paper's overlap-tile strategy, Fig. 2). Images smaller than the output window are mirrored up to it, with weight 0
  on the added pixels.
  """
  out = size - 2 * margin
  height, width = example["label"].shape
  example = _pad_example(example, (0, 0), (max(out - height, 0), max(out - width, 0)))
  height, width = example["label"].shape
  top = int(rng.integers(0, height - out + 1))
  left = int(rng.integers(0, width - out + 1))
  # Crop out the output window plus the margin, mirroring only where the margin leaves the image.
  pad_before = (max(margin - top, 0), max(margin - left, 0))
  pad_after = (max(top + out + margin - height, 0), max(left + out + margin - width, 0))
  rows = slice(max(top - margin, 0), min(top + out + margin, height))
  cols = slice(max(left - margin, 0), min(left + out + margin, width))
  return _pad_example({k: v[rows, cols] for k, v in example.items()}, pad_before, pad_after)


def train_dataset(
  source: Any,
  *,
  batch_size: int,
  seed: int,
  prepare: Callable[[Mapping[str, Any]], Example],
  crop_size: int | None = None,
  margin: int = 0,
  process_index: int = 0,
  process_count: int = 1,
) -> grain.MapDataset:
  """An infinite dataset whose element ``s`` is this process's part of the global training batch of step ``s``.

  Process ``p`` of ``P`` reads only rows ``[p B/P, (p + 1) B/P)`` of the global batch ``B``: the rows its devices
  hold in the global array (:func:`segjax.train.parallel.global_batch`).

  Args:
    source: a random-access source of feature dicts (``len`` and ``__getitem__``).
    batch_size: the GLOBAL batch size; must be divisible by ``process_count``.
    seed: the shuffle and crop seed.
    prepare: features -> model inputs (e.g. ``functools.partial(to_model_inputs, num_classes=...)``).
    crop_size: side of the random training tiles (the model's input); None keeps whole images (all the same size).
    margin: context lost at each border by the model (unpadded U-Net), see :func:`random_crop`.
    process_index: this process (``jax.process_index()``).
    process_count: number of processes (``jax.process_count()``).
  """
  if batch_size % process_count:
    raise SegjaxError(
      f"batch_size {batch_size} (config key batch_size) is not divisible by the {process_count} processes; "
      "make it a multiple."
    )
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat().map(prepare)
  if crop_size is not None:
    # Seeded by (seed, global element index): the same tile whatever the number of processes or threads.
    ds = ds.random_map(lambda example, rng: random_crop(example, rng, size=crop_size, margin=margin), seed=seed)
  # Chunks of the per-process size; process p takes chunk p of every P: rows [p b, (p + 1) b) of each global batch,
  # so the global batch has the same rows in the same order whatever the number of processes.
  return ds.batch(batch_size // process_count, drop_remainder=True)[process_index::process_count]


def train_batches(dataset: grain.MapDataset, *, start_step: int = 0, num_threads: int = 2) -> Iterator[Example]:
  """Iterates ``dataset[start_step], dataset[start_step + 1], ...`` with background reader threads."""
  read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(2 * num_threads, 2))
  return iter(dataset[start_step:].to_iter_dataset(read_options))


def model_padding(height: int, width: int, geometry: Geometry) -> tuple[tuple[int, int], tuple[int, int]]:
  """``(before, after)`` padding (rows, cols) that makes the model's output cover an image, pixel (0, 0) on (0, 0)."""
  m = geometry.margin
  in_h, in_w = geometry.input_size_for_output(height), geometry.input_size_for_output(width)
  return (m, m), (in_h - height - m, in_w - width - m)


def pad_image_for_model(image: np.ndarray, geometry: Geometry) -> np.ndarray:
  """Mirrors an (H, W, C) image at its borders to the input the model needs for an output covering it."""
  before, after = model_padding(image.shape[0], image.shape[1], geometry)
  return _pad(image, before, after, "reflect")


def pad_for_model(example: Example, geometry: Geometry) -> tuple[Example, tuple[int, int]]:
  """Pads a whole example so that the model's output covers it; returns the padded example and the original size.

  The image is mirrored at its borders (:func:`pad_image_for_model`); label and weights are padded with 0, so padded
  pixels count in no loss or metric. The label and weights keep the input's size: the train and eval steps
  centre-crop them to the output (:func:`segjax.train.step.crop_targets`), which puts the output's pixel (0, 0) on
  the image's pixel (0, 0).
  """
  height, width = example["label"].shape
  before, after = model_padding(height, width, geometry)
  return _pad_example(example, before, after), (height, width)


def eval_batches(
  source: Any,
  *,
  batch_size: int,
  prepare: Callable[[Mapping[str, Any]], Example],
  geometry: Geometry | None = None,
  keep: tuple[str, ...] = (),
) -> Iterator[tuple[Example, list[dict[str, Any]]]]:
  """The whole split, each image padded for the model, in fixed-size batches of equal-size images.

  Images are grouped by padded size (at most ``batch_size`` images of each size are held at once); a group's last
  batch is filled with copies of weight 0. Every batch of a size has the same shape, so the eval step compiles once
  per distinct padded size.

  Yields:
    ``(batch, info)``: the batch (``image``, ``label``, ``weights``) and, for each real example in it, a dict with its
    ``index`` in the split, original ``size`` (height, width) and the source features named in ``keep`` (e.g.
    ``instances``), for metrics computed on the host.
  """
  geometry = geometry or Geometry()
  groups: dict[tuple[int, ...], list[tuple[Example, dict[str, Any]]]] = {}

  def flush(items: list[tuple[Example, dict[str, Any]]]) -> tuple[Example, list[dict[str, Any]]]:
    examples = [e for e, _ in items]
    filler = {**examples[-1], "weights": np.zeros_like(examples[-1]["weights"])}
    examples += [filler] * (batch_size - len(examples))
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}, [info for _, info in items]

  for index in range(len(source)):
    features = source[index]
    example, size = pad_for_model(prepare(features), geometry)
    info = {"index": index, "size": size, **{k: np.asarray(features[k]) for k in keep if k in features}}
    group = groups.setdefault(example["image"].shape, [])
    group.append((example, info))
    if len(group) == batch_size:
      yield flush(group)
      group.clear()
  for group in groups.values():
    if group:
      yield flush(group)


def prefetch_to_device(
  batches: Iterator[Any], size: int = 2, place: Callable[[Any], Any] | None = None
) -> Iterator[Any]:
  """Keeps ``size`` batches in flight to the device(s) so host-to-device copies overlap with compute.

  ``place`` puts one host batch on the devices (default ``jax.device_put``); the training loop passes the one that
  shards it over the mesh (:func:`segjax.train.parallel.compile_train_step`).
  """
  place = place or jax.device_put
  queue = []
  for batch in batches:
    queue.append(place(batch))
    if len(queue) > size:
      yield queue.pop(0)
  yield from queue
