"""ISBI 2012 errors of every checkpoint of training runs against their training time: the learning curve.

  python -m experiments.learning_curve --workdirs=runs/isbi2012_curve,runs/isbi2012_wide_curve \
      --output=docs/isbi2012_learning_curve

For each workdir it restores every kept checkpoint, predicts the held-out slices (25-29) whole with the 8 dihedral
test-time augmentations averaged in probability (as the U-Net paper's submission), scores them with the challenge's
pooled pixel and Rand errors (`segjax.metrics.isbi_challenge_errors`), and reads the checkpoint's training time
(evaluation excluded) from the run's ``metrics.jsonl``. It writes ``<output>.json`` (one row per checkpoint) and
``<output>.png`` (both errors against minutes of training, with the paper's numbers as lines).
"""

import json
import os

import numpy as np
from absl import app, flags

from segjax.data import data_root
from segjax.data.io import read_image, read_label
from segjax.inference import load_predictor
from segjax.metrics import isbi_challenge_errors
from segjax.tiling import Tiling
from segjax.train import checkpoint

_WORKDIRS = flags.DEFINE_list("workdirs", None, "Workdirs of isbi2012 training runs.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Output path without extension.", required=True)
_SLICES = flags.DEFINE_list("slices", ["25", "26", "27", "28", "29"], "Held-out slices to score.")
_TTA = flags.DEFINE_string("tta", "flips_rot90", "Test-time augmentation (segjax.tiling.TTA_TRANSFORMS).")

PAPER = {"pixel_error": 0.0611, "rand_error": 0.0382}
"""Ronneberger et al. 2015, Table 1 (official test slices; our held-out slices are from the training stack)."""


def train_seconds_by_step(workdir: str) -> dict[int, float]:
  """Step -> training seconds (evaluations excluded) from the run's logged training records."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return {r["step"]: r["train_seconds"] for r in records if r.get("split") == "train" and "train_seconds" in r}


def score_checkpoint(workdir: str, step: int, images: list, labels: np.ndarray) -> dict[str, float]:
  predictor = load_predictor(workdir, step)
  tiling = Tiling(tta=_TTA.value)
  membrane = np.stack([predictor.predict(image, tiling)[..., 1] for image in images])
  return isbi_challenge_errors(membrane, labels)


def plot(rows: list[dict], path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, key in zip(axes, ("pixel_error", "rand_error"), strict=True):
    for run in dict.fromkeys(r["run"] for r in rows):
      points = [(r["train_minutes"], r[key]) for r in rows if r["run"] == run]
      ax.plot(*zip(*points, strict=True), "o-", label=run)
    ax.axhline(PAPER[key], color="k", linestyle="--", label="U-Net paper (GPU, ~10 h)")
    ax.set_xlabel("minutes of training (2-core CPU)")
    ax.set_ylabel(f"{key.replace('_', ' ')} (challenge form, 8-fold TTA)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle("ISBI 2012, held-out slices 25-29")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv):
  del argv
  root = os.path.join(data_root(), "isbi2012", "train")
  slices = [int(s) for s in _SLICES.value]
  images = [read_image(os.path.join(root, "image", f"{i}.png"), 1) for i in slices]
  labels = np.stack([read_label(os.path.join(root, "label", f"{i}.png")) == 0 for i in slices]).astype(np.uint8)
  rows = []
  for workdir in _WORKDIRS.value:
    seconds = train_seconds_by_step(workdir)
    manager = checkpoint.create_manager(workdir, read_only=True)
    steps = sorted(manager.all_steps())
    manager.close()
    for step in steps:
      errors = score_checkpoint(workdir, step, images, labels)
      row = {
        "run": os.path.basename(os.path.normpath(workdir)),
        "step": step,
        "train_minutes": round(seconds.get(step, float("nan")) / 60, 2),
        **{k: v for k, v in errors.items() if "/" not in k},
      }
      print(json.dumps(row))
      rows.append(row)
  os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
  with open(_OUTPUT.value + ".json", "w") as f:
    json.dump(rows, f, indent=1)
  plot(rows, _OUTPUT.value + ".png")


if __name__ == "__main__":
  app.run(main)
