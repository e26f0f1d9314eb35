"""What a finished run leaves in its workdir besides checkpoints and metrics: curves, a sample grid, the summary
(``summary.json`` and a table for stdout) and test images for ``experiments.predict``."""

import json
import os
from typing import Any

import ml_collections
import numpy as np

from segjax import viz


def write_outputs(
  predict, config: ml_collections.ConfigDict, eval_source: Any, test_source: Any, workdir: str, summary: dict
) -> None:
  """Curves, the validation sample grid, ``summary.json``, and test-split images for ``experiments.predict``.

  ``predict(source, limit=n)`` returns images, labels and predictions of a split's first n examples. Without a test
  split, the validation images are exported instead.
  """
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(metrics_path):
    viz.plot_curves(viz.read_metrics(metrics_path), os.path.join(workdir, "curves.png"))
  if config.num_sample_images > 0:
    images, labels, predictions = predict(eval_source, limit=config.num_sample_images)
    viz.plot_samples(images, labels, predictions, os.path.join(workdir, "samples.png"))
  export_source, prefix = (test_source, "test") if test_source is not None else (eval_source, "validation")
  if config.num_test_images > 0:
    export_images(export_source, os.path.join(workdir, "test_images"), prefix, config.num_test_images)
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)


def export_images(source: Any, directory: str, prefix: str, limit: int) -> None:
  """Writes the first ``limit`` images of a split as PNG files ``<prefix>_<i>.png``."""
  from PIL import Image

  os.makedirs(directory, exist_ok=True)
  for i in range(min(limit, len(source))):
    image = np.asarray(source[i]["image"])
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(
      os.path.join(directory, f"{prefix}_{i:04d}.png")
    )


def format_summary(summary: dict, class_names: tuple[str, ...]) -> str:
  """A short table of the final per-class and mean scores for stdout."""
  splits = [s for s in ("validation", "test") if s in summary]
  header = f"{'':<22}" + "".join(f"{s:>24}" for s in splits)
  lines = [
    f"segjax: {summary['steps']} steps, {summary['num_params']:,} parameters, "
    f"{summary['train_seconds_this_run']:.0f} s training this run",
    header,
    f"{'':<22}" + "".join(f"{'IoU':>12}{'Dice':>12}" for _ in splits),
  ]
  for c, name in enumerate(class_names):
    row = f"{c}: {name}"[:21]
    lines.append(
      f"{row:<22}" + "".join(f"{summary[s][f'iou/{c}']:>12.4f}{summary[s][f'dice/{c}']:>12.4f}" for s in splits)
    )
  per_image = [k for k in ("pixel_error", "rand_error", "instance_ap") if k in summary[splits[0]]]
  for key in ("mean_iou", "foreground_iou", "pixel_accuracy", "loss", *per_image):
    lines.append(f"{key:<22}" + "".join(f"{summary[s].get(key, float('nan')):>24.4f}" for s in splits))
  return "\n".join(lines)
