"""`synthetic_cells`: a TFDS data set of touching, irregular cells, rendered locally from a seed.

The default data set of segjax: nothing is downloaded, every example is a pure function of
``(config.seed, split, index)``, and preparing the default config takes seconds on a laptop CPU.

Each image shows packed blob-shaped cells with textured interiors on a dark, unevenly lit background with faint
debris, noise and a slight blur. Where two cells touch they are separated by a thin dark border; as in the U-Net
paper (Ronneberger et al., 2015, Sec. 3), those border pixels are background in the semantic mask and 0 in the
instance map, so a semantic model must learn to separate touching cells.

Multi-class configs draw three kinds of object, distinguishable by colour and by shape/texture:

* class 1: round, reddish, smooth interior;
* class 2: elongated, greenish, striated along the long axis;
* class 3: small, bluish, granular.

Example::

  import tensorflow_datasets as tfds
  from segjax.data import synthetic  # registers the builder

  builder = synthetic.SyntheticCells(config='tiny', data_dir='/tmp/tfds')
  builder.download_and_prepare()
  source = builder.as_data_source('train')  # random access, for grain
  example = source[0]  # {'image': (64, 64, 1) uint8, 'mask': (64, 64, 1) uint8, 'instances': (64, 64, 1) uint16}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from scipy import ndimage

from segjax.errors import SegjaxError
from segjax.weight_maps import border_weights

BORDER_SIGMA = 5.0
"""Sigma (pixels) of the stored U-Net border weight term (Ronneberger et al. 2015, Eq. 2, without w0)."""

SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}
"""Split name -> the integer mixed into the example seed ``[seed, split_id, index]``."""

# Cell kinds. GENERIC is used when there is a single object class; the others are object classes 1, 2, 3.
_GENERIC, _ROUND, _ELONGATED, _GRANULAR = 0, 1, 2, 3

# Base colours (RGB, linear intensity) per kind; GENERIC is white so it is neutral in RGB and gray alike.
_KIND_COLOURS = np.array(
  [
    [1.0, 1.0, 1.0],
    [0.95, 0.35, 0.30],
    [0.30, 0.90, 0.35],
    [0.35, 0.45, 1.00],
  ],
  dtype=np.float32,
)

_REFERENCE_SIZE = 128  # Geometry (radii, blur, borders) is specified at this image size and scaled linearly.


@dataclasses.dataclass(eq=False)
class SyntheticCellsConfig(tfds.core.BuilderConfig):
  """Configuration of a `synthetic_cells` variant.

  Attributes:
    image_size: Height and width of the square images, in pixels.
    num_channels: 1 (grayscale) or 3 (RGB).
    num_classes: Number of semantic classes including background: 2 (background / cell) up to 4 (background and
      three object kinds).
    num_train: Number of training examples.
    num_validation: Number of validation examples.
    num_test: Number of test examples.
    seed: Base seed; example ``i`` of split ``s`` uses ``np.random.default_rng([seed, SPLIT_IDS[s], i])``.
  """

  image_size: int = 128
  num_channels: int = 1
  num_classes: int = 2
  num_train: int = 512
  num_validation: int = 64
  num_test: int = 64
  seed: int = 0


def _check_render_args(image_size: int, num_channels: int, num_classes: int) -> None:
  if image_size < 32:
    raise SegjaxError(f"synthetic_cells: image_size={image_size} is too small; use at least 32.")
  if num_channels not in (1, 3):
    raise SegjaxError(f"synthetic_cells: num_channels={num_channels} is not supported; use 1 or 3.")
  if not 2 <= num_classes <= 4:
    raise SegjaxError(f"synthetic_cells: num_classes={num_classes} is not supported; use 2, 3 or 4.")


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
  """Gaussian-filtered white noise, normalised to zero mean and unit standard deviation."""
  field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
  return (field - field.mean()) / (field.std() + 1e-6)


def _place_centres(rng: np.random.Generator, radii: np.ndarray, size: int, packing: float) -> np.ndarray:
  """Places cell centres one by one so that neighbours overlap a little (and hence touch) but never coincide.

  Of a batch of random candidates that keep at least ``0.7 * (r_i + r_j)`` from every placed centre, the one nearest
  to an existing cell is taken with probability ``packing`` (growing clusters of touching cells), otherwise a random
  one (isolated cells). Cells that find no room are dropped.

  Returns:
    Array (n, 2) of (y, x) centres, n <= len(radii); the kept cells are the first n of ``radii``' order.
  """
  centres: list[np.ndarray] = []
  kept_radii: list[float] = []
  for radius in radii:
    candidates = rng.uniform(0.0, size, size=(48, 2))
    if centres:
      placed = np.asarray(centres)
      dist = np.linalg.norm(candidates[:, None, :] - placed[None, :, :], axis=-1)
      gap = dist - 0.7 * (radius + np.asarray(kept_radii))[None, :]
      ok = np.all(gap >= 0.0, axis=1)
      if not ok.any():
        continue
      if rng.random() < packing:
        best = int(np.argmin(np.where(ok, gap.min(axis=1), np.inf)))
      else:
        best = int(rng.choice(np.flatnonzero(ok)))
      centres.append(candidates[best])
    else:
      centres.append(candidates[0])
    kept_radii.append(float(radius))
  return np.asarray(centres, dtype=np.float32).reshape(-1, 2)


def _cell_kinds(rng: np.random.Generator, num_cells: int, num_classes: int) -> np.ndarray:
  """Kind of every cell; with one object class all cells are GENERIC, otherwise classes 1..num_classes-1 appear."""
  if num_classes == 2:
    return np.full(num_cells, _GENERIC, dtype=np.int32)
  return rng.integers(1, num_classes, size=num_cells).astype(np.int32)


def _rasterise_cells(
  rng: np.random.Generator, kinds: np.ndarray, radii: np.ndarray, centres: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Rasterises irregular cells, assigning contested pixels to the cell with the smallest normalised distance.

  Each cell is an ellipse (rotated, with a kind-dependent aspect ratio) whose boundary is perturbed by a few random
  harmonics, ``r(theta) = 1 + sum_k a_k cos(k theta + phi_k)`` in the ellipse's normalised coordinates. A pixel's
  normalised distance to cell i is ``q_i = e_i / r_i(theta_i)`` with ``e_i`` the elliptic radius; the pixel belongs to
  ``argmin_i q_i`` if that minimum is below 1, so overlapping neighbours share a Voronoi-like boundary.

  Returns:
    labels: (size, size) int32, 0 = background, i + 1 = cell i.
    q: (size, size) float32 normalised distance to the owning cell (in [0, 1) inside cells).
    along: (size, size) float32 coordinate along the owning cell's long axis, in pixels (0 outside cells).
  """
  n = len(radii)
  aspect = np.where(
    kinds == _ELONGATED,
    rng.uniform(2.2, 3.2, n),
    np.where(kinds == _ROUND, rng.uniform(1.0, 1.15, n), rng.uniform(1.0, 1.5, n)),
  ).astype(np.float32)
  wobble = np.where(kinds == _ROUND, 0.03, np.where(kinds == _GRANULAR, 0.08, 0.07)).astype(np.float32)
  angle = rng.uniform(0.0, np.pi, n).astype(np.float32)
  harmonics = np.arange(2, 6, dtype=np.float32)  # k = 2..5
  amplitudes = rng.uniform(0.0, 1.0, (n, len(harmonics))).astype(np.float32) * wobble[:, None]
  phases = rng.uniform(0.0, 2 * np.pi, (n, len(harmonics))).astype(np.float32)

  coords = np.arange(size, dtype=np.float32) + 0.5
  dy = coords[None, :, None] - centres[:, 0, None, None]  # (n, size, 1)
  dx = coords[None, None, :] - centres[:, 1, None, None]  # (n, 1, size)
  cos_a, sin_a = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
  along = dx * cos_a + dy * sin_a  # (n, size, size)
  across = -dx * sin_a + dy * cos_a
  semi_major = (radii * np.sqrt(aspect))[:, None, None]
  semi_minor = (radii / np.sqrt(aspect))[:, None, None]
  u, v = along / semi_major, across / semi_minor
  elliptic = np.sqrt(u * u + v * v)
  theta = np.arctan2(v, u)
  boundary = 1.0 + np.einsum(
    "nk,nkhw->nhw", amplitudes, np.cos(harmonics[None, :, None, None] * theta[:, None] + phases[:, :, None, None])
  )
  q = elliptic / boundary

  owner = np.argmin(q, axis=0)
  q_min = np.take_along_axis(q, owner[None], axis=0)[0]
  along_min = np.take_along_axis(along, owner[None], axis=0)[0]
  labels = np.where(q_min < 1.0, owner + 1, 0).astype(np.int32)
  return labels, np.where(labels > 0, q_min, 1.0).astype(np.float32), np.where(labels > 0, along_min, 0.0)


def _clean_labels(labels: np.ndarray, min_pixels: int) -> np.ndarray:
  """Keeps each cell's largest connected piece and drops cells smaller than ``min_pixels``."""
  cleaned = np.zeros_like(labels)
  objects = ndimage.find_objects(labels)
  for index, box in enumerate(objects):
    if box is None:
      continue
    piece = labels[box] == index + 1
    components, count = ndimage.label(piece)
    if count > 1:
      sizes = np.bincount(components.ravel())[1:]
      piece = components == 1 + int(np.argmax(sizes))
    if piece.sum() >= min_pixels:
      cleaned[box][piece] = index + 1
  return cleaned


def _separating_borders(labels: np.ndarray, width: int) -> np.ndarray:
  """Boolean map of the pixels of a cell within ``width`` pixels (Chebyshev) of a cell with a smaller label.

  Marking only one side of each contact keeps the border thin (about ``width`` pixels).
  """
  size = labels.shape[0]
  padded = np.pad(labels, width)
  border = np.zeros(labels.shape, dtype=bool)
  for oy in range(-width, width + 1):
    for ox in range(-width, width + 1):
      if oy == 0 and ox == 0:
        continue
      neighbour = padded[width + oy : width + oy + size, width + ox : width + ox + size]
      border |= (neighbour > 0) & (neighbour < labels)
  return border


def render_example(
  rng: np.random.Generator, *, image_size: int = 128, num_channels: int = 1, num_classes: int = 2
) -> dict[str, np.ndarray]:
  """Renders one synthetic microscopy image with its semantic mask and instance map.

  Pure function of the generator state: the same seed gives the same arrays.

  Args:
    rng: Source of randomness, e.g. ``np.random.default_rng([seed, split_id, index])``.
    image_size: Height and width in pixels (geometry scales with it; defined at 128).
    num_channels: 1 (grayscale) or 3 (RGB).
    num_classes: Semantic classes including background, 2 to 4. With 2, all cells are of one generic kind; with
      more, cells are round/reddish (1), elongated/greenish/striated (2) or small/bluish/granular (3).

  Returns:
    Dict with ``image`` (H, W, C) uint8, ``mask`` (H, W, 1) uint8 with values in ``[0, num_classes)`` and
    ``instances`` (H, W, 1) uint16 with 0 for background and separating borders and 1..n for the cells.

  Raises:
    SegjaxError: If a setting is out of the supported range.
  """
  _check_render_args(image_size, num_channels, num_classes)
  size = image_size
  scale = size / _REFERENCE_SIZE

  # Geometry: the number of cells (independent of size) and a target foreground fraction set the typical radius.
  num_cells = int(rng.integers(6, 26))
  fraction = rng.uniform(0.35, 0.6)
  kinds = _cell_kinds(rng, num_cells, num_classes)
  kind_scale = np.where(kinds == _GRANULAR, 0.6, np.where(kinds == _ELONGATED, 0.95, 1.0))
  typical = np.sqrt(fraction * size * size / (np.pi * np.mean(kind_scale**2) * num_cells))
  radii = (typical * kind_scale * rng.uniform(0.75, 1.25, num_cells)).astype(np.float32)
  order = np.argsort(-radii)  # Big cells first, so small ones fill the gaps.
  radii, kinds = radii[order], kinds[order]
  centres = _place_centres(rng, radii, size, packing=rng.uniform(0.6, 0.95))
  radii, kinds = radii[: len(centres)], kinds[: len(centres)]

  labels, q, along = _rasterise_cells(rng, kinds, radii, centres, size)
  min_pixels = max(6, int(20 * scale**2))
  labels = _clean_labels(labels, min_pixels)
  border = _separating_borders(labels, width=max(1, int(round(scale))))
  # Cutting the borders can shrink or split a cell: clean again. `drawn` is what gets painted: the kept cells
  # including their borders; dropped cells and dropped pieces are painted as background, so they stay unlabelled.
  cells = _clean_labels(np.where(border, 0, labels), min_pixels)
  kept = np.zeros(len(radii) + 1, dtype=bool)
  kept[np.unique(cells)] = True
  kept[0] = False
  drawn = np.where(border, labels, cells)
  drawn = np.where(kept[drawn], drawn, 0)
  border &= drawn > 0

  # Consecutive instance ids 1..n; one semantic class per instance.
  relabel = np.zeros(len(radii) + 1, dtype=np.int32)
  relabel[kept] = np.arange(1, int(kept.sum()) + 1)
  instances = relabel[cells]
  cell_class = np.concatenate([[0], np.where(kinds == _GENERIC, 1, kinds)]).astype(np.int32)
  mask = cell_class[cells]

  # Appearance. Per-cell brightness (a few dim cells), a soft fall-off towards the edge and kind-specific texture.
  n = len(radii)
  brightness = rng.uniform(0.4, 0.85, n)
  dim = rng.random(n) < 0.2
  brightness[dim] = rng.uniform(0.2, 0.35, int(dim.sum()))
  texture_amp = rng.uniform(0.1, 0.3, n)
  brightness = np.concatenate([[0.0], brightness]).astype(np.float32)
  texture_amp = np.concatenate([[0.0], texture_amp]).astype(np.float32)
  kind_of = np.concatenate([[_GENERIC], kinds])

  smooth = _smooth_noise(rng, (size, size), 2.0 * scale)
  granular = _smooth_noise(rng, (size, size), 0.6 * scale)
  stripe_period = rng.uniform(3.0, 5.0) * scale
  stripes = np.cos(2 * np.pi * along / stripe_period + 0.5 * smooth)

  pixel_kind = kind_of[drawn]
  texture = np.where(
    pixel_kind == _GRANULAR, 1.6 * granular, np.where(pixel_kind == _ELONGATED, 0.6 * smooth + 0.9 * stripes, smooth)
  )
  profile = 0.7 + 0.3 * (1.0 - q * q)
  cell_intensity = brightness[drawn] * profile * (1.0 + texture_amp[drawn] * texture)
  # Separating borders are dark grooves: most of the cell signal is removed there.
  cell_intensity = np.where(border, 0.25 * cell_intensity, cell_intensity).astype(np.float32)

  # Per-cell colour: the kind's base colour, jittered a little so colour stays informative but not exact.
  colours = _KIND_COLOURS[kind_of] * rng.uniform(0.85, 1.15, (n + 1, 3)).astype(np.float32)
  colour = colours[drawn]  # (H, W, 3)
  image = cell_intensity[..., None] * colour

  # Background: dark, slightly tinted, unevenly lit, with faint unlabelled debris.
  background = rng.uniform(0.06, 0.18)
  tint = rng.uniform(0.8, 1.2, 3).astype(np.float32)
  image = image + background * tint
  num_debris = int(rng.integers(5, 30))
  debris = np.zeros((size, size), dtype=np.float32)
  if num_debris:
    ys, xs = rng.integers(0, size, (2, num_debris))
    debris[ys, xs] = rng.uniform(1.0, 4.0, num_debris) * scale**2
    debris = ndimage.gaussian_filter(debris, rng.uniform(0.8, 1.8) * scale)
    debris = np.minimum(debris, 0.3)
  debris_colour = rng.uniform(0.7, 1.0, 3).astype(np.float32)
  image = image + debris[..., None] * debris_colour

  yy, xx = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
  gy, gx = rng.uniform(-0.25, 0.25, 2)
  vignette = rng.uniform(0.0, 0.25)
  illumination = (1.0 + gy * yy + gx * xx - vignette * (yy * yy + xx * xx) / 2).astype(np.float32)
  image = image * illumination[..., None]

  if num_channels == 1:
    image = image @ np.array([0.299, 0.587, 0.114], dtype=np.float32)[:, None]
  blur = rng.uniform(0.5, 0.9) * scale
  image = ndimage.gaussian_filter(image, (blur, blur, 0))
  image = image + rng.uniform(0.02, 0.06) * rng.standard_normal(image.shape).astype(np.float32)
  image = np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)

  return {
    "image": image,
    "mask": mask.astype(np.uint8)[..., None],
    "instances": instances.astype(np.uint16)[..., None],
    "border_weights": border_weights(instances, w0=1.0, sigma=BORDER_SIGMA),
  }


class SyntheticCells(tfds.core.GeneratorBasedBuilder):
  """TFDS builder for `synthetic_cells`, written in the ArrayRecord format for random access (grain).

  Usage: ``SyntheticCells(config='gray', data_dir=...)`` or with a custom
  ``SyntheticCellsConfig(name='mine', image_size=256, ...)``; then ``download_and_prepare()`` and
  ``as_data_source(split)``.
  """

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "Initial release.", "1.1.0": "U-Net border weight term (`border_weights`)."}
  BUILDER_CONFIGS = [
    SyntheticCellsConfig(name="gray", description="Grayscale cells, 128x128, background / cell."),
    SyntheticCellsConfig(
      name="rgb",
      description="RGB, 128x128, background + round reddish, elongated greenish and small bluish granular objects.",
      num_channels=3,
      num_classes=4,
    ),
    SyntheticCellsConfig(
      name="tiny",
      description="Grayscale 64x64 cells, 16/8/8 examples, for tests.",
      image_size=64,
      num_train=16,
      num_validation=8,
      num_test=8,
    ),
    SyntheticCellsConfig(
      name="tiny_rgb",
      description="RGB 64x64 with 3 object classes, 16/8/8 examples, for tests.",
      image_size=64,
      num_channels=3,
      num_classes=4,
      num_train=16,
      num_validation=8,
      num_test=8,
    ),
  ]
  DEFAULT_CONFIG_NAME = "gray"
  # TFDS 4.9.10 derives `code_path` via `importlib_resources`, which it imports but does not install on Python >= 3.9
  # (tensorflow/datasets#11212); giving the path explicitly avoids that import.
  code_path = epath.Path(__file__)

  def __init__(self, *, file_format: str | tfds.core.FileFormat | None = None, **kwargs: Any):
    """Builds with ArrayRecord files unless another ``file_format`` is asked for (TFDS's default is TFRecord)."""
    super().__init__(file_format=file_format or tfds.core.FileFormat.ARRAY_RECORD, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    _check_render_args(config.image_size, config.num_channels, config.num_classes)
    size = config.image_size
    return self.dataset_info_from_configs(
      description=(
        "Synthetic fluorescence-like images of touching, irregular cells with semantic masks (separating borders "
        "are background) and instance maps, rendered deterministically from a seed."
      ),
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(size, size, config.num_channels), dtype=np.uint8),
          "mask": tfds.features.Image(shape=(size, size, 1), dtype=np.uint8),
          # A uint16 `Image` (16-bit PNG) cannot be decoded by `as_data_source` without OpenCV in TFDS 4.9.10, so
          # the instance map is a zlib-compressed tensor (lossless, decoded with numpy alone).
          "instances": tfds.features.Tensor(
            shape=(size, size, 1), dtype=np.uint16, encoding=tfds.features.Encoding.ZLIB
          ),
          "border_weights": tfds.features.Tensor(
            shape=(size, size), dtype=np.float32, encoding=tfds.features.Encoding.ZLIB
          ),
        }
      ),
      supervised_keys=("image", "mask"),
      # Keep records in key order, so that `as_data_source(split)[i]` is example i (shuffling is the pipeline's job).
      disable_shuffling=True,
      citation="segjax synthetic_cells, generated locally; no external source.",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator[Any]]:
    del dl_manager  # Nothing to download.
    config = self.builder_config
    sizes = {"train": config.num_train, "validation": config.num_validation, "test": config.num_test}
    return {split: self._generate_examples(split, count) for split, count in sizes.items()}

  def _generate_examples(self, split: str, count: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    config = self.builder_config
    for index in range(count):
      rng = np.random.default_rng([config.seed, SPLIT_IDS[split], index])
      yield (
        index,
        render_example(
          rng, image_size=config.image_size, num_channels=config.num_channels, num_classes=config.num_classes
        ),
      )
