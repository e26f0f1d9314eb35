"""Pictures of a run: label colouring, overlays, loss/metric curves and a sample grid (matplotlib, Agg backend)."""

import json
from collections.abc import Sequence

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# Class 0 (background) is black; object classes get distinct, saturated colours.
PALETTE = np.array(
  [[0, 0, 0], [255, 214, 0], [0, 190, 255], [255, 64, 129], [118, 255, 3], [170, 0, 255], [255, 109, 0], [0, 229, 160]],
  dtype=np.uint8,
)


def colorize(labels: np.ndarray) -> np.ndarray:
  """Integer label map (H, W) -> RGB uint8 (H, W, 3)."""
  return PALETTE[np.asarray(labels) % len(PALETTE)]


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
  """Float image in [0, 1] or integer image (full range of its dtype), (H, W), (H, W, 1) or (H, W, 3) -> RGB uint8."""
  image = np.asarray(image)
  if np.issubdtype(image.dtype, np.integer) and image.dtype != np.uint8:
    image = image.astype(np.float32) / np.iinfo(image.dtype).max
  if image.dtype != np.uint8:
    image = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
  if image.ndim == 2:
    image = image[..., None]
  return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image[..., :3]


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.45) -> np.ndarray:
  """Blends the colourised labels over the image where the label is not background."""
  rgb = to_rgb_uint8(image).astype(np.float32)
  colors = colorize(labels).astype(np.float32)
  mask = (np.asarray(labels) > 0)[..., None]
  return np.where(mask, (1 - alpha) * rgb + alpha * colors, rgb).round().astype(np.uint8)


def read_metrics(path: str) -> list[dict]:
  """Reads a JSON-lines metrics file (one dict per line)."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


CURVE_METRICS = ("mean_iou", "foreground_iou", "pixel_accuracy", "accuracy", "top5_accuracy")
"""The validation metrics drawn against the step, where a run reports them (segmentation or classification)."""


def plot_curves(records: Sequence[dict], path: str) -> None:
  """Plots training loss and the validation loss and scores (:data:`CURVE_METRICS`) against the step into a PNG."""
  train = [r for r in records if r.get("split") == "train"]
  evals = [r for r in records if r.get("split") == "validation"]
  fig, (ax_loss, ax_iou) = plt.subplots(1, 2, figsize=(11, 4))
  ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
  if evals:
    ax_loss.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="validation loss")
    for key in CURVE_METRICS:
      if key in evals[0]:
        ax_iou.plot([r["step"] for r in evals], [r[key] for r in evals], "o-", label=key)
  ax_loss.set(xlabel="step", ylabel="loss", yscale="log", title="loss")
  ax_iou.set(xlabel="step", ylabel="score", title="validation metrics", ylim=(0, 1.02))
  for ax in (ax_loss, ax_iou):
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_samples(images: np.ndarray, labels: np.ndarray, predictions: np.ndarray, path: str) -> None:
  """A grid with one row per example: image, ground truth, prediction."""
  n = len(images)
  fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.5 * n), squeeze=False)
  for i in range(n):
    for ax, picture, title in zip(
      axes[i],
      (to_rgb_uint8(images[i]), colorize(labels[i]), colorize(predictions[i])),
      ("image", "ground truth", "prediction"),
      strict=True,
    ):
      ax.imshow(picture, interpolation="nearest")
      ax.set_axis_off()
      if i == 0:
        ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_classified(
  images: Sequence[np.ndarray],
  labels: np.ndarray,
  probabilities: np.ndarray,
  class_names: Sequence[str],
  path: str,
  *,
  columns: int = 4,
) -> None:
  """A grid of images, each titled with its predicted class and probability and its true class (green when right,
  red when wrong)."""
  n = len(images)
  rows = -(-n // columns)
  fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 3.0 * rows), squeeze=False, layout="constrained")
  for ax in axes.flat:
    ax.set_axis_off()
  for i in range(n):
    ax = axes.flat[i]
    predicted = int(np.argmax(probabilities[i]))
    ax.imshow(to_rgb_uint8(images[i]), interpolation="nearest")
    right = predicted == int(labels[i])
    ax.set_title(
      f"{class_names[predicted]} {probabilities[i][predicted]:.2f}\ntrue: {class_names[int(labels[i])]}",
      color="tab:green" if right else "tab:red",
      fontsize=9,
    )
  fig.savefig(path, dpi=100)
  plt.close(fig)
