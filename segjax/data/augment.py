"""On-device augmentation: jit-compiled JAX functions applied jointly to image, label and weights.

Each op takes a key and one example dict (``image`` float32 (H, W, C) in [0, 1], ``label`` int32 (H, W), optional
``weights`` float32 (H, W)) and returns the transformed dict with the same shapes; ``make_augment_fn`` maps the
configured ops over a batch with one key per example. Keys come from ``fold_in(rng, step)`` in the train step, so
augmentations are a pure function of (seed, step).

Ops, listed by name in ``augment.ops`` and applied in that order; each takes its parameters from the optional config
sub-dict of the same name (``augment.<op>.<parameter>``, defaults in the op's keyword arguments). Every op also takes
``probability`` (default 1.0): the chance that the op is applied at all to an example.

* ``flip``: left-right and up-down flips, each with probability 1/2.
* ``rot90``: a random multiple of 90 degrees (square images).
* ``scale_crop`` (``min_scale=0.8``, ``max_scale=1.25``, ``mode``): zoom by a log-uniform factor about a random centre.
* ``rotate`` (``max_degrees=15.0``, ``mode``): rotation about the image centre, uniform in [-max, max] degrees.
* ``elastic`` (``grid_size=3``, ``sigma=10.0``, ``mode``): the U-Net elastic deformation (Ronneberger et al. 2015,
  Sec. 3.1), see :func:`elastic_displacement`.
* ``intensity`` (``brightness=0.1``, ``contrast=0.2``, ``gamma=0.2``, ``saturation=0.0``, ``color=0.0``): gray-value
  and colour jitter of the image only.
* ``noise`` (``max_std=0.05``): additive Gaussian noise on the image only.
* ``blur`` (``min_sigma=0.0``, ``max_sigma=1.0``): Gaussian blur of the image only.

For image classification (one label per image): ``hflip`` (left-right only), ``pad_crop`` (``padding=4``: the
CIFAR crop of He et al. 2015) and ``random_resized_crop`` (``size=0`` (the input's), ``min_area=0.08``,
``max_area=1.0``, ``min_ratio=3/4``, ``max_ratio=4/3``: the ImageNet crop); ``intensity``, ``noise`` and ``blur``
work for both tasks.

The geometric ops (``scale_crop``, ``rotate``, ``elastic``) share one resampler, :func:`warp`: each computes where
every output pixel samples the input (a coordinate map) and ``warp`` resamples all arrays with it, the image
bilinearly and label and weights by nearest neighbour (labels stay existing class ids; weights stay those of the label
they belong to, e.g. U-Net border weights). Consecutive geometric ops with the same ``mode`` are composed into one
resampling, so the image is interpolated once.

Border handling (``mode``): ``'reflect'`` (default) mirrors the image at its edges, without repeating the edge pixel,
like ``np.pad(mode='reflect')`` in the input pipeline and the paper's overlap-tile strategy (Fig. 2). ``'constant'``
fills the image with 0 where the output samples outside the input and sets ``weights`` there to 0 so those pixels are
excluded from the loss; an example without ``weights`` then gets them (ones inside), so downstream code sees a
``weights`` key whenever a ``'constant'`` warp is configured.

Example::

  config.augment = ml_collections.ConfigDict({
    "ops": ["flip", "rot90", "scale_crop", "rotate", "elastic", "intensity", "noise", "blur"],
    "elastic": {"grid_size": 3, "sigma": 10.0, "probability": 1.0},
    "rotate": {"max_degrees": 15.0},
  })
  augment = jax.jit(make_augment_fn(config.augment))
  batch = augment(jax.random.fold_in(rng, step), batch)
"""

import functools
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.scipy.ndimage import map_coordinates

from segjax.errors import SegjaxError
from segjax.registry import Registry

Example = dict[str, jax.Array]
Op = Callable[[jax.Array, Example], Example]
# (2, H, W) float32: for each output pixel, the (row, col) position in the input that it samples.
Coordinates = jax.Array
CoordinateMap = Callable[[jax.Array, Coordinates], Coordinates]
Stage = Callable[[Sequence[jax.Array], Example], Example]  # ops run on their keys, see make_augment_fn

# Config border mode -> jax.scipy.ndimage mode. JAX's 'mirror' is NumPy's 'reflect' (d c b | a b c d | c b a); in
# 'constant' mode the arrays are sampled with 'nearest' and the outside is masked afterwards (see `warp`).
BORDER_MODES = {"reflect": "mirror", "constant": "nearest"}

# The decision whether an op is applied uses a key folded from the op's key, so the op's own random stream (and the
# results of configs written before `probability` existed) does not depend on the probability.
_APPLY_STREAM = 0x5E6


def _applied(key: jax.Array, probability: float) -> jax.Array:
  """A boolean scalar, True with the given probability (always for 1.0, never for 0.0)."""
  return jax.random.bernoulli(jax.random.fold_in(key, _APPLY_STREAM), probability)


def _spatial(fn: Callable[[jax.Array], jax.Array], example: Example) -> Example:
  """Applies the same spatial transform (on the two leading axes) to every array of an example."""
  return {k: fn(v) for k, v in example.items()}


def _spatial_shape(example: Example) -> tuple[int, int]:
  height, width = example["image"].shape[:2]
  return height, width


def random_flip(key: jax.Array, example: Example, *, probability: float = 1.0) -> Example:
  """Flips left-right and up-down, each with probability 1/2."""
  flip_lr, flip_ud = jax.random.bernoulli(key, 0.5, (2,)) & _applied(key, probability)
  example = _spatial(lambda a: jnp.where(flip_lr, a[:, ::-1], a), example)
  return _spatial(lambda a: jnp.where(flip_ud, a[::-1], a), example)


def random_rot90(key: jax.Array, example: Example, *, probability: float = 1.0) -> Example:
  """Rotates by a uniformly random multiple of 90 degrees (square images only)."""
  height, width = _spatial_shape(example)
  if height != width:
    raise SegjaxError(
      f"augmentation rot90 needs square images, got {height}x{width}; remove 'rot90' from augment.ops or crop square."
    )
  k = jnp.where(_applied(key, probability), jax.random.randint(key, (), 0, 4), 0)
  branches = [lambda e, k=k: _spatial(lambda a: jnp.rot90(a, k, axes=(0, 1)), e) for k in range(4)]
  return jax.lax.switch(k, branches, example)


# --- Resampling shared by the geometric ops -----------------------------------------------------------------------


def identity_coordinates(shape: Sequence[int]) -> Coordinates:
  """The (2, H, W) coordinates of every pixel of an (H, W) image: warping with them returns the input unchanged."""
  rows, cols = jnp.meshgrid(jnp.arange(shape[0]), jnp.arange(shape[1]), indexing="ij")
  return jnp.stack([rows, cols]).astype(jnp.float32)


def _resample(array: jax.Array, coords: Coordinates, order: int, mode: str) -> jax.Array:
  """Samples an (H, W) or (H, W, C) array at (2, h, w) coordinates, channel by channel."""
  sample = lambda a: map_coordinates(a, [coords[0], coords[1]], order=order, mode=mode)
  if array.ndim == 2:
    return sample(array)
  flat = array.reshape(array.shape[:2] + (-1,))
  out = jax.vmap(sample, in_axes=2, out_axes=2)(flat)
  return out.reshape(out.shape[:2] + array.shape[2:])


def warp(example: Example, coords: Coordinates, *, mode: str = "reflect") -> Example:
  """Resamples every array of an example at ``coords``: the one resampler of all geometric augmentations.

  The image is interpolated bilinearly; ``label``, ``weights`` and any other array by nearest neighbour, so labels
  keep only existing class ids and each pixel keeps the weight of its label.

  Args:
    example: ``image`` (H, W, C), ``label`` (H, W) and optional ``weights`` (H, W).
    coords: (2, h, w) float32 input positions (row, col) sampled by each output pixel, e.g. from
      :func:`identity_coordinates` transformed by a coordinate map; the output has spatial shape (h, w).
    mode: ``'reflect'`` mirrors the input at its edges (NumPy's ``'reflect'``); ``'constant'`` gives image 0 and
      ``weights`` 0 (creating ``weights`` as ones when absent) where the nearest input pixel is outside the image.

  Returns:
    The warped example; with ``mode='constant'`` it always has ``weights``.

  Raises:
    SegjaxError: for an unknown mode.
  """
  if mode not in BORDER_MODES:
    raise SegjaxError(f"unknown border mode {mode!r} (config key augment.<op>.mode); use 'reflect' or 'constant'.")
  jax_mode = BORDER_MODES[mode]
  coords = jnp.asarray(coords, jnp.float32)
  out = {
    key: _resample(value, coords, order=1 if key == "image" else 0, mode=jax_mode) for key, value in example.items()
  }
  if mode == "constant":
    height, width = _spatial_shape(example)
    # The pixel's nearest input pixel (map_coordinates' order-0 rounding: half away from zero) lies in the image.
    nearest = jax.lax.round(coords)
    inside = (nearest[0] >= 0) & (nearest[0] <= height - 1) & (nearest[1] >= 0) & (nearest[1] <= width - 1)
    out["image"] = jnp.where(inside[..., None], out["image"], jnp.zeros((), out["image"].dtype))
    weights = out.get("weights", jnp.ones(coords.shape[1:], jnp.float32))
    out["weights"] = jnp.where(inside, weights, jnp.zeros((), weights.dtype))
  return out


def _centre(coords: Coordinates) -> jax.Array:
  """The (2, 1, 1) centre of the image the (2, H, W) coordinates belong to."""
  return ((jnp.asarray(coords.shape[1:], jnp.float32) - 1) / 2).reshape(2, 1, 1)


def rotation_coordinates(coords: Coordinates, degrees: jax.typing.ArrayLike) -> Coordinates:
  """Maps output coordinates to the input positions of an image rotated by ``degrees`` about its centre.

  Positive angles rotate the content counter-clockwise as displayed (row axis down), like ``jnp.rot90``: 90 degrees
  is ``jnp.rot90(image, 1)`` for square images.
  """
  radians = jnp.deg2rad(jnp.asarray(degrees, jnp.float32))
  cos, sin = jnp.cos(radians), jnp.sin(radians)
  centre = _centre(coords)
  d_row, d_col = coords - centre
  return jnp.stack([cos * d_row + sin * d_col, cos * d_col - sin * d_row]) + centre


def scale_coordinates(coords: Coordinates, scale: jax.typing.ArrayLike, centre: jax.typing.ArrayLike) -> Coordinates:
  """Maps output coordinates to the input positions of a zoom by ``scale`` (> 1 enlarges) about input ``centre``.

  The input point ``centre`` (row, col) lands on the output's centre pixel.
  """
  centre = jnp.asarray(centre, jnp.float32).reshape(2, 1, 1)
  return centre + (coords - _centre(coords)) / scale


def elastic_displacement(key: jax.Array, shape: Sequence[int], *, grid_size: int = 3, sigma: float = 10.0) -> jax.Array:
  """The U-Net paper's smooth random displacement field (Ronneberger et al. 2015, Sec. 3.1).

  "Random displacement vectors on a coarse 3 by 3 grid [...] sampled from a Gaussian distribution with 10 pixels
  standard deviation. Per-pixel displacements are then computed using bicubic interpolation." The ``grid_size`` x
  ``grid_size`` nodes are spread evenly over the image with the outer nodes on the border pixels (for 3 x 3: the
  corners, the edge midpoints and the centre), and the field is interpolated between them with the Keys cubic kernel
  (``jax.image`` 'cubic', align-corners placement), so at each node it equals the node's vector.

  Args:
    key: the random key.
    shape: the image's (H, W), each at least 2.
    grid_size: nodes per side of the coarse grid.
    sigma: standard deviation of each displacement component, in pixels (the paper's tiles are 572 pixels wide).

  Returns:
    (2, H, W) float32 displacements (rows, cols) in pixels.
  """
  height, width = shape[0], shape[1]
  nodes = sigma * jax.random.normal(key, (2, grid_size, grid_size), jnp.float32)
  # Align corners: output pixel 0 samples node 0 and pixel n - 1 the last node (jax.image uses half-pixel centres).
  scale = ((height - 1) / (grid_size - 1), (width - 1) / (grid_size - 1))
  translation = tuple(0.5 * (1 - s) for s in scale)
  return jax.image.scale_and_translate(
    nodes, (2, height, width), (1, 2), jnp.asarray(scale), jnp.asarray(translation), "cubic", antialias=False
  )


def random_scale_crop_coordinates(
  key: jax.Array, coords: Coordinates, *, min_scale: float = 0.8, max_scale: float = 1.25, probability: float = 1.0
) -> Coordinates:
  """Coordinate map of ``scale_crop``: a zoom by a log-uniform factor in [min_scale, max_scale] (> 1 enlarges).

  The zoom centre is uniform over the positions that keep the output inside the image when zooming in, and the image
  inside the output when zooming out (the rest comes from the border ``mode``).
  """
  scale_key, centre_key = jax.random.split(key)
  scale = jnp.exp(jax.random.uniform(scale_key, (), minval=math.log(min_scale), maxval=math.log(max_scale)))
  scale = jnp.where(_applied(key, probability), scale, 1.0)
  size = jnp.asarray(coords.shape[1:], jnp.float32) - 1
  low, high = size / 2 / scale, size - size / 2 / scale
  centre = low + jax.random.uniform(centre_key, (2,)) * (high - low)
  return scale_coordinates(coords, scale, centre)


def random_rotation_coordinates(
  key: jax.Array, coords: Coordinates, *, max_degrees: float = 15.0, probability: float = 1.0
) -> Coordinates:
  """Coordinate map of ``rotate``: a rotation about the image centre, uniform in [-max_degrees, max_degrees]."""
  degrees = jax.random.uniform(key, (), minval=-max_degrees, maxval=max_degrees)
  return rotation_coordinates(coords, jnp.where(_applied(key, probability), degrees, 0.0))


def random_elastic_coordinates(
  key: jax.Array, coords: Coordinates, *, grid_size: int = 3, sigma: float = 10.0, probability: float = 1.0
) -> Coordinates:
  """Coordinate map of ``elastic``: ``coords + displacement(coords)`` with :func:`elastic_displacement`'s field.

  The field is defined on the pixel grid and read bilinearly at ``coords`` (exact on the identity grid; between
  pixels the smooth field is nearly linear), so the map composes with the other coordinate maps.
  """
  field = elastic_displacement(key, coords.shape[1:], grid_size=grid_size, sigma=sigma)
  field = jnp.where(_applied(key, probability), field, 0.0)
  displacement = jax.vmap(lambda f: map_coordinates(f, [coords[0], coords[1]], order=1, mode="nearest"))(field)
  return coords + displacement


def _warp_op(key: jax.Array, example: Example, coordinate_map: CoordinateMap, mode: str) -> Example:
  return warp(example, coordinate_map(key, identity_coordinates(_spatial_shape(example))), mode=mode)


def random_scale_crop(
  key: jax.Array,
  example: Example,
  *,
  min_scale: float = 0.8,
  max_scale: float = 1.25,
  probability: float = 1.0,
  mode: str = "reflect",
) -> Example:
  """Zooms by a log-uniform factor in [min_scale, max_scale] about a random centre, keeping the size.

  See :func:`random_scale_crop_coordinates` and :func:`warp` (``mode``).
  """
  coordinate_map = functools.partial(
    random_scale_crop_coordinates, min_scale=min_scale, max_scale=max_scale, probability=probability
  )
  return _warp_op(key, example, coordinate_map, mode)


def random_rotate(
  key: jax.Array, example: Example, *, max_degrees: float = 15.0, probability: float = 1.0, mode: str = "reflect"
) -> Example:
  """Rotates about the centre by a uniform angle in [-max_degrees, max_degrees]; see :func:`warp` (``mode``)."""
  coordinate_map = functools.partial(random_rotation_coordinates, max_degrees=max_degrees, probability=probability)
  return _warp_op(key, example, coordinate_map, mode)


def random_elastic(
  key: jax.Array,
  example: Example,
  *,
  grid_size: int = 3,
  sigma: float = 10.0,
  probability: float = 1.0,
  mode: str = "reflect",
) -> Example:
  """The U-Net elastic deformation (Ronneberger et al. 2015, Sec. 3.1); see :func:`elastic_displacement`."""
  coordinate_map = functools.partial(
    random_elastic_coordinates, grid_size=grid_size, sigma=sigma, probability=probability
  )
  return _warp_op(key, example, coordinate_map, mode)


# --- Image-only ops -------------------------------------------------------------------------------------------------


def _uniform(key: jax.Array, low: float, high: float, shape: tuple[int, ...] = ()) -> jax.Array:
  return jax.random.uniform(key, shape, jnp.float32, minval=low, maxval=high)


def _with_image(example: Example, key: jax.Array, probability: float, image: jax.Array) -> Example:
  """The example with ``image`` replaced, in [0, 1], if the op is applied (with the given probability)."""
  image = jnp.clip(image, 0.0, 1.0).astype(example["image"].dtype)
  return {**example, "image": jnp.where(_applied(key, probability), image, example["image"])}


def random_intensity(
  key: jax.Array,
  example: Example,
  *,
  brightness: float = 0.1,
  contrast: float = 0.2,
  gamma: float = 0.2,
  saturation: float = 0.0,
  color: float = 0.0,
  probability: float = 1.0,
) -> Example:
  """Gray-value and colour jitter of the image (label and weights unchanged); the result is clipped to [0, 1].

  Applied in this order: gamma ``x ** g`` with ``g`` log-uniform in [1 / (1 + gamma), 1 + gamma]; contrast, a factor
  uniform in [1 - contrast, 1 + contrast] about the image mean; brightness, an offset uniform in [-brightness,
  brightness]. For 3-channel images only: ``color`` scales each channel by a factor in [1 - color, 1 + color] and
  ``saturation`` scales the distance from the gray value (ITU-R 601 luma) by a factor in [1 - saturation,
  1 + saturation]; both are 0 (off) by default.
  """
  image = example["image"]
  gamma_key, contrast_key, brightness_key, color_key, saturation_key = jax.random.split(key, 5)
  out = jnp.clip(image, 0.0, 1.0) ** jnp.exp(_uniform(gamma_key, -math.log1p(gamma), math.log1p(gamma)))
  mean = jnp.mean(out)
  out = mean + (out - mean) * _uniform(contrast_key, 1 - contrast, 1 + contrast)
  out = out + _uniform(brightness_key, -brightness, brightness)
  if image.shape[-1] == 3:
    out = out * _uniform(color_key, 1 - color, 1 + color, (3,))
    gray = out @ jnp.asarray([0.299, 0.587, 0.114], out.dtype)
    out = gray[..., None] + (out - gray[..., None]) * _uniform(saturation_key, 1 - saturation, 1 + saturation)
  return _with_image(example, key, probability, out)


def random_noise(key: jax.Array, example: Example, *, max_std: float = 0.05, probability: float = 1.0) -> Example:
  """Adds Gaussian noise with a standard deviation uniform in [0, max_std] to the image, clipped to [0, 1]."""
  std_key, noise_key = jax.random.split(key)
  image = example["image"]
  noise = _uniform(std_key, 0.0, max_std) * jax.random.normal(noise_key, image.shape, image.dtype)
  return _with_image(example, key, probability, image + noise)


def gaussian_blur(image: jax.Array, sigma: jax.typing.ArrayLike, radius: int) -> jax.Array:
  """Blurs an (H, W, C) image with a separable Gaussian of std ``sigma`` (may be traced; ~0 is the identity).

  The kernel has the static size ``2 * radius + 1`` (clipped below the image size); the image is mirrored at its
  edges (NumPy's 'reflect').
  """
  radius = max(0, min(radius, image.shape[0] - 1, image.shape[1] - 1))
  offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  kernel = jnp.exp(-0.5 * (offsets / jnp.maximum(sigma, 1e-3)) ** 2)
  kernel = kernel / jnp.sum(kernel)
  for axis in (0, 1):
    pad = [(0, 0)] * image.ndim
    pad[axis] = (radius, radius)
    padded = jnp.pad(image, pad, mode="reflect")
    size = image.shape[axis]
    image = sum(kernel[i] * jax.lax.slice_in_dim(padded, i, i + size, axis=axis) for i in range(2 * radius + 1))
  return image


def random_blur(
  key: jax.Array, example: Example, *, min_sigma: float = 0.0, max_sigma: float = 1.0, probability: float = 1.0
) -> Example:
  """Blurs the image with a Gaussian of std uniform in [min_sigma, max_sigma] pixels (kernel radius ceil(3 max))."""
  sigma = _uniform(key, min_sigma, max_sigma)
  return _with_image(example, key, probability, gaussian_blur(example["image"], sigma, math.ceil(3 * max_sigma)))


# --- Image-level ops (classification: the label is one class per image) -------------------------------------------


def _image_level(example: Example, name: str) -> None:
  if example["label"].ndim:
    raise SegjaxError(
      f"augmentation {name} is for image classification (one label per image) but the labels are per pixel; use "
      "flip / scale_crop for segmentation."
    )


def random_hflip(key: jax.Array, example: Example, *, probability: float = 1.0) -> Example:
  """Left-right flip with probability 1/2 (no up-down flip: natural images have an up); per-pixel labels and
  weights, if any, flip with the image."""
  flip = jax.random.bernoulli(key, 0.5) & _applied(key, probability)
  return {k: jnp.where(flip, v[:, ::-1], v) if v.ndim >= 2 else v for k, v in example.items()}


def random_pad_crop(key: jax.Array, example: Example, *, padding: int = 4, probability: float = 1.0) -> Example:
  """The CIFAR crop (He et al. 2015, Sec. 4.2): pad ``padding`` zero pixels on each side and take a random crop of
  the original size (each offset uniform over the ``2 * padding + 1`` positions)."""
  _image_level(example, "pad_crop")
  image = example["image"]
  height, width = image.shape[:2]
  padded = jnp.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  top, left = jax.random.randint(key, (2,), 0, 2 * padding + 1)
  top, left = jnp.where(_applied(key, probability), jnp.stack([top, left]), padding)
  crop = jax.lax.dynamic_slice(padded, (top, left, 0), (height, width, image.shape[2]))
  return {**example, "image": crop}


def random_resized_crop_box(
  key: jax.Array,
  height: int,
  width: int,
  *,
  min_area: float = 0.08,
  max_area: float = 1.0,
  min_ratio: float = 3 / 4,
  max_ratio: float = 4 / 3,
  attempts: int = 10,
) -> jax.Array:
  """``(top, left, h, w)`` of the Inception crop (Szegedy et al. 2015; torchvision's ``RandomResizedCrop``): an
  area fraction uniform in [min_area, max_area] and an aspect ratio log-uniform in [min_ratio, max_ratio]; the first
  of ``attempts`` draws that fits the image, else the whole image."""
  k_area, k_ratio, k_top, k_left = jax.random.split(key, 4)
  area = height * width * jax.random.uniform(k_area, (attempts,), minval=min_area, maxval=max_area)
  ratio = jnp.exp(jax.random.uniform(k_ratio, (attempts,), minval=math.log(min_ratio), maxval=math.log(max_ratio)))
  w = jnp.round(jnp.sqrt(area * ratio))
  h = jnp.round(jnp.sqrt(area / ratio))
  fits = (w >= 1) & (h >= 1) & (w <= width) & (h <= height)
  first = jnp.argmax(fits)
  h = jnp.where(fits[first], h[first], height)
  w = jnp.where(fits[first], w[first], width)
  top = jnp.floor(jax.random.uniform(k_top) * (height - h + 1))
  left = jnp.floor(jax.random.uniform(k_left) * (width - w + 1))
  return jnp.stack([top, left, h, w])


def random_resized_crop(
  key: jax.Array,
  example: Example,
  *,
  size: int = 0,
  min_area: float = 0.08,
  max_area: float = 1.0,
  min_ratio: float = 3 / 4,
  max_ratio: float = 4 / 3,
  probability: float = 1.0,
) -> Example:
  """The ImageNet training crop: a :func:`random_resized_crop_box` resized (bilinear) to ``size`` x ``size`` (0: the
  input's size); when not applied, the whole image resized."""
  _image_level(example, "random_resized_crop")
  image = example["image"]
  height, width = image.shape[:2]
  out = size or height
  box = random_resized_crop_box(
    key, height, width, min_area=min_area, max_area=max_area, min_ratio=min_ratio, max_ratio=max_ratio
  )
  top, left, h, w = jnp.where(_applied(key, probability), box, jnp.asarray([0.0, 0.0, height, width]))
  centres = (jnp.arange(out, dtype=jnp.float32) + 0.5) / out
  rows = top + centres * h - 0.5
  cols = left + centres * w - 0.5
  coords = jnp.stack(jnp.meshgrid(rows, cols, indexing="ij"))
  return {**example, "image": _resample(image, coords, 1, "nearest")}


AUGMENTATIONS: Registry[Op] = Registry("augmentation", "augment.ops")
"""The augmentation ops by name. Metadata ``coordinates``: a geometric op's coordinate map, which `make_augment_fn`
composes with its neighbours' into one `warp`."""
AUGMENTATIONS.register("flip", random_flip)
AUGMENTATIONS.register("rot90", random_rot90)
AUGMENTATIONS.register("scale_crop", random_scale_crop, coordinates=random_scale_crop_coordinates)
AUGMENTATIONS.register("rotate", random_rotate, coordinates=random_rotation_coordinates)
AUGMENTATIONS.register("elastic", random_elastic, coordinates=random_elastic_coordinates)
AUGMENTATIONS.register("intensity", random_intensity)
AUGMENTATIONS.register("noise", random_noise)
AUGMENTATIONS.register("blur", random_blur)
AUGMENTATIONS.register("hflip", random_hflip)
AUGMENTATIONS.register("pad_crop", random_pad_crop)
AUGMENTATIONS.register("random_resized_crop", random_resized_crop)


def _coordinates(name: str) -> Callable[..., Coordinates] | None:
  return AUGMENTATIONS.metadata(name).get("coordinates")


# --- Configuration --------------------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
  return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _in_range(low: float, high: float, *, high_open: bool = False) -> Callable[[Any], bool]:
  return lambda v: _is_number(v) and low <= v and (v < high if high_open else v <= high)


_NON_NEGATIVE = (_in_range(0.0, math.inf), "a number >= 0")
_POSITIVE = (lambda v: _is_number(v) and v > 0, "a number > 0")
_FRACTION = (_in_range(0.0, 1.0, high_open=True), "a number in [0, 1)")

# Parameter name -> (check, what it must be); shared by all ops.
PARAMETER_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
  "probability": (_in_range(0.0, 1.0), "a number in [0, 1]"),
  "mode": (lambda v: isinstance(v, str) and v in BORDER_MODES, "'reflect' or 'constant'"),
  "min_scale": _POSITIVE,
  "max_scale": _POSITIVE,
  "max_degrees": _NON_NEGATIVE,
  "grid_size": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 2, "an integer >= 2"),
  "sigma": _NON_NEGATIVE,
  "brightness": _NON_NEGATIVE,
  "contrast": _FRACTION,
  "gamma": _NON_NEGATIVE,
  "saturation": (_in_range(0.0, 1.0), "a number in [0, 1]"),
  "color": _FRACTION,
  "max_std": _NON_NEGATIVE,
  "min_sigma": _NON_NEGATIVE,
  "max_sigma": _NON_NEGATIVE,
  "padding": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0"),
  "size": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0 (0: the input's)"),
  "min_area": (_in_range(0.0, 1.0), "a number in [0, 1]"),
  "max_area": (_in_range(0.0, 1.0), "a number in [0, 1]"),
  "min_ratio": _POSITIVE,
  "max_ratio": _POSITIVE,
}


def op_parameters(name: str) -> dict[str, Any]:
  """The configurable parameters of the op ``name`` and their defaults."""
  signature = inspect.signature(AUGMENTATIONS[name])
  return {p.name: p.default for p in signature.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def op_config(name: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
  """Checks the config sub-dict ``augment.<name>`` and returns all the op's parameters (defaults filled in).

  Raises:
    SegjaxError: naming ``augment.<name>.<key>`` for an unknown parameter or a bad value.
  """
  if isinstance(params, ml_collections.ConfigDict):
    params = params.to_dict()
  if params is None:
    params = {}
  if not isinstance(params, Mapping):
    raise SegjaxError(f"config key augment.{name} must be a dict of {name} parameters, got {params!r}.")
  defaults = op_parameters(name)
  for key in params:
    if key not in defaults:
      raise SegjaxError(f"unknown parameter augment.{name}.{key}; {name} takes: {', '.join(defaults)}.")
  merged = {**defaults, **params}
  for key, value in merged.items():
    check, what = PARAMETER_CHECKS[key]
    if not check(value):
      raise SegjaxError(f"config key augment.{name}.{key} must be {what}, got {value!r}.")
  for key, value in merged.items():
    upper = "max_" + key.removeprefix("min_")
    if key.startswith("min_") and upper in merged and value > merged[upper]:
      raise SegjaxError(
        f"config key augment.{name}.{key} ({value!r}) must not exceed augment.{name}.{upper} ({merged[upper]!r})."
      )
  return merged


def _composed_warp(coordinate_maps: list[CoordinateMap], mode: str) -> Stage:
  """One `warp` for consecutive geometric ops: op i's map is applied to the coordinates of the ops after it."""

  def apply(keys: Sequence[jax.Array], example: Example) -> Example:
    coords = identity_coordinates(_spatial_shape(example))
    for coordinate_map, key in reversed(list(zip(coordinate_maps, keys, strict=True))):
      coords = coordinate_map(key, coords)
    return warp(example, coords, mode=mode)

  return apply


def make_augment_fn(config: ml_collections.ConfigDict) -> Callable[[jax.Array, Example], Example] | None:
  """Builds ``augment(key, batch) -> batch`` from the ``augment`` config section.

  ``ops`` lists op names (applied in order); the optional sub-dict named like an op sets its parameters. Op ``i``
  of an example gets the ``i``-th key of its key's split, whether or not geometric ops are composed.

  Returns:
    The batched function ``augment(key, batch, *, axis_name=None)`` (example ``i`` of the batch gets the ``i``-th key
    of ``split(key, batch size)``, via ``vmap``; under ``pmap`` over ``axis_name``, the key of its row in the global
    batch), or None when no op is configured, so the train step
    skips augmentation entirely.

  Raises:
    SegjaxError: for an unknown op name (config key ``augment.ops``) or parameter (``augment.<op>.<key>``).
  """
  names = list(config.ops)
  for name in names:
    AUGMENTATIONS.lookup(name)
  if not names:
    return None
  params = [op_config(name, config.get(name)) for name in names]

  # Stages: (number of ops, fn(keys, example)); runs of geometric ops with the same mode become one warp.
  stages: list[tuple[int, Stage]] = []
  i = 0
  while i < len(names):
    if _coordinates(names[i]) is None:
      op = functools.partial(AUGMENTATIONS[names[i]], **params[i])
      stages.append((1, lambda keys, e, op=op: op(keys[0], e)))
      i += 1
      continue
    mode, maps = params[i]["mode"], []
    while i < len(names) and _coordinates(names[i]) is not None and params[i]["mode"] == mode:
      kwargs = {k: v for k, v in params[i].items() if k != "mode"}
      maps.append(functools.partial(_coordinates(names[i]), **kwargs))
      i += 1
    stages.append((len(maps), _composed_warp(maps, mode)))

  def augment_one(key: jax.Array, example: Example) -> Example:
    keys = list(jax.random.split(key, len(names)))
    for count, stage in stages:
      example, keys = stage(keys[:count], example), keys[count:]
    return example

  def augment(key: jax.Array, batch: Example, *, axis_name: str | None = None) -> Example:
    count = batch["image"].shape[0]
    if axis_name is None:
      keys = jax.random.split(key, count)
    else:  # this device's rows of the global batch get the keys they would get in one global batch
      keys = jax.random.split(key, count * jax.lax.axis_size(axis_name))
      keys = jax.lax.dynamic_slice_in_dim(keys, jax.lax.axis_index(axis_name) * count, count)
    return jax.vmap(augment_one)(keys, batch)

  return augment
