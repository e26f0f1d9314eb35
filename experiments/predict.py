"""Predicts label masks for an image or a folder of images with a trained checkpoint.

  python -m experiments.predict --workdir=runs/synthetic_cells --input=my_images/ --output=my_predictions/

Writes ``<stem>_mask.png`` (pixel value = class id) and ``<stem>_overlay.png`` (colours over the image) per input.
"""

import os

from absl import flags, logging

from experiments import cli
from segjax import viz
from segjax.data.io import check_images, list_images, read_image
from segjax.inference import load_predictor

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a training run (holds checkpoints/).")
_INPUT = flags.DEFINE_string("input", None, "An image file or a folder of images.")
_OUTPUT = flags.DEFINE_string("output", None, "Folder for the predicted masks and overlays.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to use (default: the latest).")
flags.mark_flags_as_required(["workdir", "input", "output"])


def main(argv: list[str]) -> None:
  del argv
  files = list_images(_INPUT.value)
  predictor = load_predictor(_WORKDIR.value, _STEP.value)
  logging.info("predicting %d images with step %d of %s", len(files), predictor.step, _WORKDIR.value)
  check_images(files)
  for path in files:
    image = read_image(path, predictor.num_channels)
    stem = os.path.splitext(os.path.basename(path))[0]
    mask_path, _ = viz.save_prediction(_OUTPUT.value, stem, image, predictor.predict_labels(image))
    print(mask_path)


if __name__ == "__main__":
  cli.run(main)
