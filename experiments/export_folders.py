"""Writes the ISBI 2012 and DSB 2018 data as plain folders, the layout a user's own data has for `segmentation_folder`.

  python -m experiments.export_folders --dataset=isbi2012 --output=runs/folders/isbi2012
  python -m experiments.export_folders --dataset=dsb2018 --output=runs/folders/dsb2018

Each output holds ``images/`` (links to the source images), ``masks/`` (PNG class ids: ISBI 1 = membrane, DSB
1 = nucleus), for DSB ``instances/`` (links to the 16-bit instance maps), and ``train.txt`` / ``validation.txt`` /
``test.txt`` with the same splits as the named TFDS builders (ISBI: slices 25-29 held out; DSB: sorted ids at
positions 0 and 5 mod 10). Both `experiments/configs/reference_comparison.py` and `experiments/torch_reference.py`
read these folders, so segjax and the PyTorch reference train and score on the same files.
"""

import os

import numpy as np
from absl import app, flags
from PIL import Image

from segjax.data import data_root
from segjax.data.dsb2018 import paired_files, split_of
from segjax.data.io import read_label
from segjax.data.isbi2012 import NUM_SLICES

_DATASET = flags.DEFINE_enum("dataset", None, ["isbi2012", "dsb2018"], "Data set to export.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Output folder.", required=True)
_SOURCE = flags.DEFINE_string("source", None, "Source folder (default: <data root>/<dataset>).")


def _link(source: str, target: str) -> None:
  if os.path.lexists(target):
    os.remove(target)
  os.symlink(os.path.abspath(source), target)


def export(dataset: str, source: str, output: str) -> dict[str, list[str]]:
  """Writes the folder layout of the module docstring; returns split -> stems."""
  for sub in ("images", "masks") + (("instances",) if dataset == "dsb2018" else ()):
    os.makedirs(os.path.join(output, sub), exist_ok=True)
  splits: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
  if dataset == "isbi2012":
    for i in range(NUM_SLICES):
      stem = str(i)
      _link(os.path.join(source, "train", "image", f"{i}.png"), os.path.join(output, "images", f"{stem}.png"))
      membrane = read_label(os.path.join(source, "train", "label", f"{i}.png")) == 0
      Image.fromarray(membrane.astype(np.uint8)).save(os.path.join(output, "masks", f"{stem}.png"))
      splits["validation" if i >= 25 else "train"].append(stem)
  else:
    for position, (stem, image_path, instance_path) in enumerate(paired_files(source)):
      _link(image_path, os.path.join(output, "images", f"{stem}.png"))
      _link(instance_path, os.path.join(output, "instances", f"{stem}.png"))
      nuclei = read_label(instance_path) > 0
      Image.fromarray(nuclei.astype(np.uint8)).save(os.path.join(output, "masks", f"{stem}.png"))
      splits[split_of(position)].append(stem)
  for split, stems in splits.items():
    if stems:
      with open(os.path.join(output, f"{split}.txt"), "w") as f:
        f.write("\n".join(stems) + "\n")
  return splits


def main(argv):
  del argv
  source = _SOURCE.value or os.path.join(data_root(), _DATASET.value)
  splits = export(_DATASET.value, source, _OUTPUT.value)
  print(", ".join(f"{split}: {len(stems)}" for split, stems in splits.items()), "->", _OUTPUT.value)


if __name__ == "__main__":
  app.run(main)
