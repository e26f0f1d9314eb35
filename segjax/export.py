"""Export a trained predictor for use without segjax: ``jax.export`` (serialized StableHLO) or a TF SavedModel.

The exported function maps a batch of square tiles ``(b, T, T, C)`` (``b`` symbolic: any batch size) to the
model's class probabilities (or logits) ``(b, T', T', K)``, with ``T' = T`` for same-padded models and ``T - 2 margin``
for the unpadded U-Net. The weights are constants inside the artifact, and the input normalisation (``x / 255`` for
uint8, ``x / 65535`` for uint16, then the run's ``data.normalization`` clipping; float32 input is taken as already
normalised) and test-time augmentation can be
built in, so that reloading needs only ``jax`` (``jax.export.deserialize(data).call(x)``) or TensorFlow.
"""

import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from segjax.data.pipeline import Normalization
from segjax.errors import SegjaxError
from segjax.tiling import TTA_TRANSFORMS, predict_tiles

INPUT_DTYPES = {"float32": (jnp.float32, 1.0), "uint8": (jnp.uint8, 255.0), "uint16": (jnp.uint16, 65535.0)}


def predictor_function(predictor, *, input_dtype: str = "float32", output: str = "probabilities", tta: str = "none"):
  """The pure function that is exported: tiles of ``input_dtype`` -> probabilities or logits, weights closed over."""
  if input_dtype not in INPUT_DTYPES:
    raise SegjaxError(f"unknown --input_dtype '{input_dtype}'; choose one of {', '.join(INPUT_DTYPES)}.")
  if tta not in TTA_TRANSFORMS:
    raise SegjaxError(f"unknown --tta '{tta}'; choose one of {', '.join(TTA_TRANSFORMS)}.")
  state = jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_data(0)), predictor.state)
  scale = INPUT_DTYPES[input_dtype][1]
  normalization = Normalization.from_config(predictor.config.data)
  if normalization.mode == "image_percentile":
    raise SegjaxError(
      "the run used data.normalization 'image_percentile', which takes the percentiles of the whole image, not of a "
      "tile; predict with experiments.predict, or export with float32 input normalised as segjax.data.pipeline does."
    )

  def predict(tiles: jax.Array) -> jax.Array:
    x = tiles.astype(jnp.float32) / scale
    if normalization.mode == "percentile" and input_dtype != "float32":  # the run's clipping, inside the artifact
      x = jnp.clip((x - normalization.low) / (normalization.high - normalization.low), 0.0, 1.0)
    return predict_tiles(state, x, tta=tta, output=output)

  return predict


def _input_spec(predictor, tile_size: int | None, input_dtype: str, batch) -> jax.ShapeDtypeStruct:
  tile = tile_size or predictor.default_tile_size()
  if predictor.geometry.fit(tile) != tile:
    raise SegjaxError(
      f"--tile_size {tile} is not an input size this model takes; the nearest larger one is "
      f"{predictor.geometry.fit(tile)}."
    )
  return jax.ShapeDtypeStruct((batch, tile, tile, predictor.num_channels), INPUT_DTYPES[input_dtype][0])


def export_predictor(
  predictor,
  *,
  tile_size: int | None = None,
  input_dtype: str = "float32",
  output: str = "probabilities",
  tta: str = "none",
) -> jax.export.Exported:
  """``jax.export`` of :func:`predictor_function` for tiles of ``tile_size`` with a symbolic batch dimension ``b``.

  Args:
    predictor: a :class:`segjax.inference.Predictor`.
    tile_size: the tile side (default: the training tile); must be a size the model takes.
    input_dtype: ``'float32'`` (already in [0, 1]), ``'uint8'`` or ``'uint16'`` (normalised inside).
    output: ``'probabilities'`` or ``'logits'``.
    tta: test-time augmentation built in (``'none'``, ``'flips'``, ``'flips_rot90'``).

  Returns:
    The Exported; ``exported.serialize()`` gives the bytes to store.
  """
  (batch,) = jax.export.symbolic_shape("b")
  spec = _input_spec(predictor, tile_size, input_dtype, batch)
  function = predictor_function(predictor, input_dtype=input_dtype, output=output, tta=tta)
  return jax.export.export(jax.jit(function))(spec)


def save_exported(exported: jax.export.Exported, path: str) -> None:
  """Writes the serialized artifact (written to ``path.tmp`` first, so a failed write leaves no partial file)."""
  data = exported.serialize()
  try:
    with open(f"{path}.tmp", "wb") as f:
      f.write(data)
    os.replace(f"{path}.tmp", path)
  except OSError as e:
    raise SegjaxError(f"cannot write '{path}' ({e.strerror or e}); pass a writable --output.") from e


def load_exported(path: str) -> Callable[[np.ndarray], jax.Array]:
  """The exported function of an artifact written by :func:`save_exported` (needs only ``jax``)."""
  with open(path, "rb") as f:
    return jax.export.deserialize(bytearray(f.read())).call


def export_saved_model(predictor, directory: str, **kwargs) -> None:
  """Writes a TensorFlow SavedModel (for TF Serving) through ``jax2tf`` with a polymorphic batch dimension.

  The signature ``serving_default`` takes ``tiles`` of the exported shape and dtype. Keyword arguments as
  :func:`export_predictor`.
  """
  import tensorflow as tf
  from jax.experimental import jax2tf

  spec = _input_spec(predictor, kwargs.pop("tile_size", None), kwargs.get("input_dtype", "float32"), 1)
  function = predictor_function(predictor, **kwargs)
  _, tile, _, channels = spec.shape
  converted = jax2tf.convert(
    function, polymorphic_shapes=[f"(b, {tile}, {tile}, {channels})"], native_serialization=True
  )
  module = tf.Module()
  signature = tf.TensorSpec((None, tile, tile, channels), tf.as_dtype(np.dtype(spec.dtype)), name="tiles")
  module.predict = tf.function(lambda tiles: converted(tiles), input_signature=[signature], autograph=False)
  tf.saved_model.save(module, directory, signatures={"serving_default": module.predict})
