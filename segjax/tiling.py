"""Prediction of images of any size in tiles: the U-Net paper's overlap-tile strategy, sliding windows with Gaussian
blending, and test-time augmentation, compiled into one program per image and tile shape.

Overlap-tile (Ronneberger et al. 2015, Sec. 2 and Fig. 2), for the unpadded U-Net: the image is mirrored at its
borders to supply the context the valid convolutions consume, and cut into input tiles whose outputs tile the image
exactly. Consecutive tiles are ``S`` output pixels apart, where ``S`` is the tile's output size rounded down to a
multiple of the down-sampling factor, so every tile sees the max-pooling grid of the whole image: the tiled result
equals the whole-image prediction (test), seamlessly.

Sliding window, for same-padded models: tiles of ``tile_size`` overlapping by a fraction, whose class probabilities
(or logits) are averaged with a Gaussian importance weight (sigma = tile / 8, as nnU-Net) or uniformly, then the
argmax is taken. Images smaller than a tile are padded by mirroring or with zeros.

One jitted function does all of it: a ``lax.scan`` over batches of tiles cut with ``dynamic_slice`` from the padded
image, the model applied to a batch (sharded over the devices when there are several), test-time augmentation
inside, and the weighted results added into an output canvas. Memory is bounded by the image, the canvas and one
batch of tiles; no Python loop runs per tile.
"""

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from segjax.errors import SegjaxError
from segjax.models.geometry import Geometry
from segjax.train.state import TrainState
from segjax.train.step import predict_logits

MODES = ("auto", "whole", "overlap_tile", "sliding_window")
BLENDS = ("gaussian", "uniform")
PADDINGS = ("reflect", "constant")
OUTPUTS = ("probabilities", "logits")
# Test-time augmentations: indices into the dihedral group of :func:`_dihedral` (identity, flips, rotations).
TTA_TRANSFORMS = {"none": (0,), "flips": (0, 4, 6, 2), "flips_rot90": tuple(range(8))}


@dataclasses.dataclass(frozen=True)
class Tiling:
  """How to predict an image (the options of ``experiments.predict``).

  Attributes:
    mode: ``'auto'`` (overlap-tile for the unpadded U-Net; for other models sliding windows when the image is larger
      than a tile, else the whole image at once), ``'whole'``, ``'overlap_tile'`` or ``'sliding_window'``.
    tile_size: the input side of a tile; None picks the model's training tile (``data.crop_size``) or 256.
    overlap: sliding windows: the fraction of a tile shared with its neighbour, in [0, 1).
    blend: sliding windows: ``'gaussian'`` (sigma = tile / 8) or ``'uniform'`` weights.
    padding: how an image smaller than a tile is padded: ``'reflect'`` (mirror) or ``'constant'`` (zeros).
    tta: test-time augmentation averaged in probability space: ``'none'``, ``'flips'`` (4 flips) or
      ``'flips_rot90'`` (the 8 flips and 90-degree rotations).
    batch: tiles per model call (bounds memory; rounded up to a multiple of the number of devices).
  """

  mode: str = "auto"
  tile_size: int | None = None
  overlap: float = 0.5
  blend: str = "gaussian"
  padding: str = "reflect"
  tta: str = "none"
  batch: int = 4

  def __post_init__(self):
    for name, value, allowed in (
      ("tiling", self.mode, MODES),
      ("blend", self.blend, BLENDS),
      ("padding", self.padding, PADDINGS),
      ("tta", self.tta, tuple(TTA_TRANSFORMS)),
    ):
      if value not in allowed:
        raise SegjaxError(f"unknown --{name} '{value}'; choose one of {', '.join(allowed)}.")
    if not 0.0 <= self.overlap < 1.0:
      raise SegjaxError(f"--overlap must be in [0, 1), got {self.overlap}.")
    if self.tile_size is not None and self.tile_size <= 0:
      raise SegjaxError(f"--tile_size must be positive, got {self.tile_size}.")
    if self.batch <= 0:
      raise SegjaxError(f"--tile_batch must be positive, got {self.batch}.")


@dataclasses.dataclass(frozen=True)
class TilePlan:
  """Where the tiles of one image go.

  The image is padded by ``pad_before`` / ``pad_after`` (rows, cols); tile ``i`` reads the input window of side
  ``tile_in`` at ``input_origins[i]`` of the padded image and adds its first ``used`` x ``used`` output pixels, times
  the weight map, at ``output_origins[i]`` of a canvas of ``canvas_shape``, whose top-left ``image_shape`` is the
  image.
  """

  image_shape: tuple[int, int]
  pad_before: tuple[int, int]
  pad_after: tuple[int, int]
  tile_in: int
  used: int
  canvas_shape: tuple[int, int]
  input_origins: np.ndarray
  output_origins: np.ndarray

  @property
  def num_tiles(self) -> int:
    """How many tiles the image is cut into."""
    return len(self.input_origins)


def _grid(origins_y: Sequence[int], origins_x: Sequence[int]) -> np.ndarray:
  return np.asarray([(y, x) for y in origins_y for x in origins_x], np.int32).reshape(-1, 2)


def overlap_tile_plan(height: int, width: int, geometry: Geometry, tile_size: int) -> TilePlan:
  """The overlap-tile layout of an image for a model that loses ``geometry.margin`` pixels at each border.

  Raises:
    SegjaxError: if the tile is not an input size the model takes, or too small to advance by a whole pooling grid.
  """
  if geometry.fit(tile_size) != tile_size:
    raise SegjaxError(
      f"--tile_size {tile_size} is not an input size this model takes; the nearest larger one is "
      f"{geometry.fit(tile_size)}."
    )
  out = geometry.output_size(tile_size)
  step = out // geometry.align * geometry.align
  if step <= 0:
    raise SegjaxError(
      f"--tile_size {tile_size} gives {out} output pixels, less than one pooling grid ({geometry.align}); use a "
      f"larger tile, e.g. {geometry.fit(geometry.align + 2 * geometry.margin)}."
    )
  rows, cols = math.ceil(height / step), math.ceil(width / step)
  m = geometry.margin
  padded = ((rows - 1) * step + tile_size, (cols - 1) * step + tile_size)
  return TilePlan(
    image_shape=(height, width),
    pad_before=(m, m),
    pad_after=(padded[0] - height - m, padded[1] - width - m),
    tile_in=tile_size,
    used=step,
    canvas_shape=(rows * step, cols * step),
    input_origins=_grid(range(0, rows * step, step), range(0, cols * step, step)),
    output_origins=_grid(range(0, rows * step, step), range(0, cols * step, step)),
  )


def _starts(size: int, tile: int, stride: int) -> list[int]:
  """Window origins from 0 with ``stride``, the last one flush with the end (windows stay inside ``size``)."""
  starts = list(range(0, size - tile + 1, stride))
  if starts[-1] != size - tile:
    starts.append(size - tile)
  return starts


def sliding_window_plan(height: int, width: int, tile_size: int, overlap: float) -> TilePlan:
  """Windows of ``tile_size`` overlapping by ``overlap``; an image smaller than a tile is padded up to one."""
  padded = (max(height, tile_size), max(width, tile_size))
  stride = max(1, int(round(tile_size * (1.0 - overlap))))
  origins = _grid(_starts(padded[0], tile_size, stride), _starts(padded[1], tile_size, stride))
  return TilePlan(
    image_shape=(height, width),
    pad_before=(0, 0),
    pad_after=(padded[0] - height, padded[1] - width),
    tile_in=tile_size,
    used=tile_size,
    canvas_shape=padded,
    input_origins=origins,
    output_origins=origins,
  )


def gaussian_weights(size: int, sigma_scale: float = 1.0 / 8) -> np.ndarray:
  """A (size, size) Gaussian importance map, peak 1 at the centre, sigma = ``sigma_scale * size``.

  Values are floored at 1e-6 so that every pixel of a tile keeps a positive weight.
  """
  centre, sigma = (size - 1) / 2.0, sigma_scale * size
  axis = np.exp(-((np.arange(size) - centre) ** 2) / (2.0 * sigma**2))
  return np.maximum(np.outer(axis, axis) / axis.max() ** 2, 1e-6).astype(np.float32)


def _dihedral(tiles: jax.Array, index: int, inverse: bool = False) -> jax.Array:
  """Transform ``index`` of the dihedral group (0-3: rotations by 90 degrees; 4-7: the same after a flip) of NHWC
  tiles, or its inverse. Indices 0, 4, 6, 2 are the identity and the three flips."""
  rotations, flip = index % 4, index >= 4
  if not inverse:
    tiles = jnp.flip(tiles, 2) if flip else tiles
    return jnp.rot90(tiles, rotations, axes=(1, 2))
  tiles = jnp.rot90(tiles, -rotations, axes=(1, 2))
  return jnp.flip(tiles, 2) if flip else tiles


def to_probabilities(logits: jax.Array) -> jax.Array:
  """Class probabilities from logits; a one-logit model's sigmoid p gives the two classes (1 - p, p)."""
  logits = logits.astype(jnp.float32)
  if logits.shape[-1] == 1:
    p = jax.nn.sigmoid(logits)
    return jnp.concatenate([1.0 - p, p], -1)
  return jax.nn.softmax(logits, -1)


def predict_tiles(
  state: TrainState, tiles: jax.Array, *, tta: str = "none", output: str = "probabilities"
) -> jax.Array:
  """The model's probabilities (or logits) of a batch of tiles, averaged over the test-time augmentations."""
  total = None
  for index in TTA_TRANSFORMS[tta]:
    logits = _dihedral(predict_logits(state, _dihedral(tiles, index)), index, inverse=True)
    result = to_probabilities(logits) if output == "probabilities" else logits.astype(jnp.float32)
    total = result if total is None else total + result
  return total / len(TTA_TRANSFORMS[tta])


def tta_log_probabilities(state: TrainState, images: jax.Array, *, tta: str) -> jax.Array:
  """Log of the probabilities averaged over the test-time augmentations ``tta``: logits whose softmax is that
  average, for the eval step (:func:`segjax.train.step.make_eval_step`'s ``predict``)."""
  return jnp.log(jnp.maximum(predict_tiles(state, images, tta=tta), jnp.finfo(jnp.float32).tiny))


@functools.partial(
  jax.jit, static_argnames=("tile_in", "used", "canvas_shape", "batch", "tta", "output", "devices", "num_outputs")
)
def _tiled(
  state,
  image,
  input_origins,
  output_origins,
  valid,
  weights,
  *,
  tile_in,
  used,
  canvas_shape,
  batch,
  tta,
  output,
  devices,
  num_outputs,
):
  """The compiled tiling: scan over tile batches, predict, add the weighted outputs into the canvas, normalise."""
  channels = image.shape[-1]
  canvas = jnp.zeros((*canvas_shape, num_outputs), jnp.float32)
  total = jnp.zeros(canvas_shape, jnp.float32)
  sharding = NamedSharding(Mesh(np.asarray(devices), ("data",)), PartitionSpec("data")) if len(devices) > 1 else None

  def cut(origin):
    return jax.lax.dynamic_slice(image, (origin[0], origin[1], 0), (tile_in, tile_in, channels))

  def add_batch(carry, inputs):
    origins_in, origins_out, keep = inputs
    tiles = jax.vmap(cut)(origins_in)
    if sharding is not None:
      tiles = jax.lax.with_sharding_constraint(tiles, sharding)
    outputs = predict_tiles(state, tiles, tta=tta, output=output)[:, :used, :used]
    tile_weights = weights[None] * keep[:, None, None]

    def add_one(i, carry):
      canvas, total = carry
      y, x = origins_out[i, 0], origins_out[i, 1]
      region = jax.lax.dynamic_slice(canvas, (y, x, 0), (used, used, num_outputs))
      canvas = jax.lax.dynamic_update_slice(canvas, region + outputs[i] * tile_weights[i][..., None], (y, x, 0))
      counted = jax.lax.dynamic_slice(total, (y, x), (used, used))
      return canvas, jax.lax.dynamic_update_slice(total, counted + tile_weights[i], (y, x))

    return jax.lax.fori_loop(0, batch, add_one, carry), None

  groups = input_origins.shape[0] // batch
  inputs = (
    input_origins.reshape(groups, batch, 2),
    output_origins.reshape(groups, batch, 2),
    valid.reshape(groups, batch),
  )
  (canvas, total), _ = jax.lax.scan(add_batch, (canvas, total), inputs)
  return canvas / jnp.maximum(total, 1e-12)[..., None]


def predict_tiled(
  state: TrainState,
  image: np.ndarray,
  plan: TilePlan,
  *,
  weights: np.ndarray | None = None,
  padding: str = "reflect",
  tta: str = "none",
  batch: int = 4,
  output: str = "probabilities",
  devices: Sequence[jax.Device] | None = None,
) -> np.ndarray:
  """Predicts a normalised (H, W, C) float image tile by tile following ``plan``.

  Args:
    state: the model's state; replicated over ``devices`` when there are several.
    image: the normalised image (see :func:`segjax.data.pipeline.normalize_image`).
    plan: from :func:`overlap_tile_plan` or :func:`sliding_window_plan`.
    weights: (used, used) blending weights; None for uniform.
    padding: ``'reflect'`` or ``'constant'`` for the image's padding.
    tta: test-time augmentation, see :class:`Tiling`.
    batch: tiles per model call.
    output: ``'probabilities'`` or ``'logits'`` (blended as they are).
    devices: the devices the tile batches are split over (default: this process's devices).

  Returns:
    (H, W, K) float32 probabilities or logits.
  """
  devices = tuple(jax.local_devices() if devices is None else devices)
  batch = -(-batch // len(devices)) * len(devices)
  mode = "reflect" if padding == "reflect" else "constant"
  pads = [(plan.pad_before[0], plan.pad_after[0]), (plan.pad_before[1], plan.pad_after[1]), (0, 0)]
  padded = np.pad(np.asarray(image, np.float32), pads, mode=mode)
  missing = -plan.num_tiles % batch
  valid = np.concatenate([np.ones(plan.num_tiles, np.float32), np.zeros(missing, np.float32)])
  extend = lambda origins: np.concatenate([origins, np.zeros((missing, 2), np.int32)])  # noqa: E731
  if weights is None:
    weights = np.ones((plan.used, plan.used), np.float32)
  num_outputs = jax.eval_shape(
    lambda s, t: predict_tiles(s, t, output=output),
    state,
    jax.ShapeDtypeStruct((1, plan.tile_in, plan.tile_in, image.shape[-1]), jnp.float32),
  ).shape[-1]
  result = _tiled(
    state,
    padded,
    extend(plan.input_origins),
    extend(plan.output_origins),
    valid,
    weights,
    tile_in=plan.tile_in,
    used=plan.used,
    canvas_shape=plan.canvas_shape,
    batch=batch,
    tta=tta,
    output=output,
    devices=devices,
    num_outputs=num_outputs,
  )
  height, width = plan.image_shape
  return np.asarray(result)[:height, :width]
