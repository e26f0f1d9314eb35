"""Exports a trained model's predictor for use without segjax: serialized StableHLO (jax.export) or a TF SavedModel.

  python -m experiments.export --workdir=runs/synthetic_cells --output=runs/synthetic_cells/model.jax_export \
      --tile_size=128 --input_dtype=uint8
  python -m experiments.export --workdir=runs/synthetic_cells --output=runs/synthetic_cells/saved_model \
      --format=saved_model

Reload the StableHLO artifact with JAX alone:

  import jax, numpy as np
  predict = jax.export.deserialize(bytearray(open("model.jax_export", "rb").read())).call
  probabilities = predict(tiles)   # tiles: (any batch, tile, tile, channels) of --input_dtype
"""

from absl import flags

from experiments import cli
from segjax import export
from segjax.inference import load_predictor
from segjax.tiling import OUTPUTS, TTA_TRANSFORMS

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a training run (holds checkpoints/).")
_OUTPUT = flags.DEFINE_string("output", None, "File (stablehlo) or folder (saved_model) to write.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).")
_FORMAT = flags.DEFINE_enum("format", "stablehlo", ["stablehlo", "saved_model"], "jax.export or a TF SavedModel.")
_TILE_SIZE = flags.DEFINE_integer("tile_size", None, "Input tile side (default: the training tile, or 256).")
_INPUT_DTYPE = flags.DEFINE_enum("input_dtype", "float32", list(export.INPUT_DTYPES), "Input dtype; float32 in [0, 1].")
_OUTPUT_KIND = flags.DEFINE_enum("output_kind", "probabilities", OUTPUTS, "What the function returns.")
_TTA = flags.DEFINE_enum("tta", "none", tuple(TTA_TRANSFORMS), "Test-time augmentation built into the function.")
flags.mark_flags_as_required(["workdir", "output"])


def main(argv: list[str]) -> None:
  del argv
  predictor = load_predictor(_WORKDIR.value, _STEP.value)
  options = dict(tile_size=_TILE_SIZE.value, input_dtype=_INPUT_DTYPE.value, output=_OUTPUT_KIND.value, tta=_TTA.value)
  if _FORMAT.value == "saved_model":
    export.export_saved_model(predictor, _OUTPUT.value, **options)
  else:
    exported = export.export_predictor(predictor, **options)
    export.save_exported(exported, _OUTPUT.value)
    print(f"input {exported.in_avals[0]} -> output {exported.out_avals[0]}")
  print(f"exported step {predictor.step} of {_WORKDIR.value} to {_OUTPUT.value}")


if __name__ == "__main__":
  cli.run(main)
