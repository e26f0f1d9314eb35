"""Predicts images of any size with a trained checkpoint: label masks, instances, probabilities and overlays.

  python -m experiments.predict --workdir=runs/synthetic_cells --input=my_images/ --output=my_predictions/
  python -m experiments.predict --workdir=runs/isbi2012 --input='sections/*.tif' --output=out/ \
      --tiling=overlap_tile --tta=flips --outputs=labels,probabilities
  python -m experiments.predict --workdir=runs/dsb2018 --input=slide.png --output=out/ --tiling=sliding_window \
      --tile_size=256 --overlap=0.5 --outputs=labels,instances,overlay

--workdir may also name several runs (comma-separated, or a folder of workdirs such as the folds of a k-fold
cross-validation, ``data.num_folds``): their probabilities are averaged before the argmax or the instances.

--input is an image file, a folder or a glob pattern (PNG, TIFF, JPEG; grayscale or RGB; 8 or 16 bit). Per image it
writes, as asked by --outputs: ``<stem>_mask.png`` (pixel value = class id), ``<stem>_overlay.png`` (colours over
the image), ``<stem>_instances.png`` (16-bit instance ids by the run's ``config.instances``: the marker-controlled
watershed of instance targets, or connected components of the foreground; small ones removed) and
``<stem>_probabilities.npy`` ((H, W, classes) float32). An image that cannot be predicted is reported with its name
and the others are still done; the exit status is then 2.

A classifier's workdir (``config.task = 'classification'``) writes ``<output>/predictions.csv`` instead: per image
its --top_k most probable labels and their probabilities (averaged over the workdirs when there are several).
"""

import dataclasses
import os
import sys

from absl import flags, logging
from tqdm import tqdm

from experiments import cli
from segjax.data.io import list_images, read_image
from segjax.errors import SegjaxError
from segjax.inference import OUTPUT_KINDS, load_ensemble, save_outputs, write_classifications
from segjax.tiling import BLENDS, MODES, PADDINGS, TTA_TRANSFORMS, Tiling

_WORKDIR = flags.DEFINE_string(
  "workdir",
  None,
  "Workdir of a training run (holds checkpoints/); or several, comma-separated, or a folder of workdirs (e.g. the "
  "folds of a cross-validation), whose probabilities are averaged.",
)
_INPUT = flags.DEFINE_string("input", None, "An image file, a folder of images or a glob pattern.")
_OUTPUT = flags.DEFINE_string("output", None, "Folder for the outputs.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to use (default: the latest).")
_TILING = flags.DEFINE_enum("tiling", "auto", MODES, "Whole image, overlap-tile (unpadded U-Net) or sliding window.")
_TILE_SIZE = flags.DEFINE_integer("tile_size", None, "Input side of a tile (default: the training tile, or 256).")
_OVERLAP = flags.DEFINE_float("overlap", 0.5, "Sliding window: fraction of a tile shared with its neighbour.")
_BLEND = flags.DEFINE_enum("blend", "gaussian", BLENDS, "Sliding window: weights of overlapping tiles.")
_PADDING = flags.DEFINE_enum("padding", "reflect", PADDINGS, "Sliding window: padding of images smaller than a tile.")
_TTA = flags.DEFINE_enum("tta", "none", tuple(TTA_TRANSFORMS), "Test-time augmentation, averaged in probability.")
_TILE_BATCH = flags.DEFINE_integer("tile_batch", 4, "Tiles per model call (bounds memory).")
_OUTPUT_KINDS = flags.DEFINE_list(
  "outputs", ["labels", "overlay"], f"What to write, any of: {', '.join(OUTPUT_KINDS)}."
)
_MIN_SIZE = flags.DEFINE_integer(
  "min_instance_size", None, "Instances: drop those with fewer pixels (default: the run's instances.min_size)."
)
_TOP_K = flags.DEFINE_integer("top_k", 5, "Classifiers: the most probable labels written per image.")
flags.mark_flags_as_required(["workdir", "input", "output"])


def main(argv: list[str]) -> None:
  del argv
  if unknown := [k for k in _OUTPUT_KINDS.value if k not in OUTPUT_KINDS]:
    raise SegjaxError(f"unknown --outputs '{unknown[0]}'; choose from {', '.join(OUTPUT_KINDS)}.")
  tiling = Tiling(
    mode=_TILING.value,
    tile_size=_TILE_SIZE.value,
    overlap=_OVERLAP.value,
    blend=_BLEND.value,
    padding=_PADDING.value,
    tta=_TTA.value,
    batch=_TILE_BATCH.value,
  )
  files = list_images(_INPUT.value)
  predictor = load_ensemble(_WORKDIR.value, _STEP.value)
  if predictor.config.task == "classification":
    return classify(predictor, files)
  instances = predictor.instances
  if _MIN_SIZE.value is not None:
    instances = dataclasses.replace(instances, min_size=_MIN_SIZE.value)
  logging.info("predicting %d images with step %d of %s", len(files), predictor.step, _WORKDIR.value)
  failures = []
  for path in tqdm(files, desc="predict", unit="image", disable=len(files) == 1):
    try:
      image = read_image(path, predictor.num_channels, strict=True)
      predictor.check_image(image, path)
      probabilities = predictor.predict(image, tiling)
      stem = os.path.splitext(os.path.basename(path))[0]
      save_outputs(_OUTPUT.value, stem, image, probabilities, _OUTPUT_KINDS.value, instances=instances)
      tqdm.write(os.path.join(_OUTPUT.value, stem))
    except SegjaxError as e:
      failures.append(str(e))
      tqdm.write(f"error: {e}", file=sys.stderr)
  if failures:
    raise SegjaxError(f"{len(failures)} of {len(files)} images could not be predicted; the first: {failures[0]}")


def classify(predictor, files: list[str]) -> None:
  """A classifier's run: ``<output>/predictions.csv`` with the --top_k most probable labels of every image."""
  rows, failures = [], []
  for path in tqdm(files, desc="classify", unit="image", disable=len(files) == 1):
    try:
      image = read_image(path, predictor.num_channels)
      predictor.check_image(image, path)
      rows.append((os.path.basename(path), predictor.top_k(predictor.predict(image), _TOP_K.value)))
    except SegjaxError as e:
      failures.append(str(e))
      tqdm.write(f"error: {e}", file=sys.stderr)
  os.makedirs(_OUTPUT.value, exist_ok=True)
  path = os.path.join(_OUTPUT.value, "predictions.csv")
  write_classifications(path, rows)
  print(f"{len(rows)} images classified: {path}")
  if failures:
    raise SegjaxError(f"{len(failures)} of {len(files)} images could not be classified; the first: {failures[0]}")


if __name__ == "__main__":
  cli.run(main)
