"""Image classification data: examples ``{'image': uint8 (H, W, C), 'label': int, 'name': str}``.

Three kinds of source, all random-access (``len`` and ``__getitem__``) and read with grain like the segmentation
data: :func:`shapes_splits` generates a labelled data set of shapes in memory (the offline default, tests and the
notebook), :func:`class_folder_splits` reads a folder of class sub-folders (``root/<class>/*.png``) and
``segjax.data``'s TFDS loaders read any prepared TFDS image-classification data set (``image`` / ``label``).

:func:`classification_inputs` turns an example into the model's inputs on the host: every image becomes a square
of one size (resized, shorter side first, and centre-cropped), so that batches have one shape; the random crops and
flips run on the device (``segjax.data.augment``: ``pad_crop``, ``random_resized_crop``, ``hflip``).
"""

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from segjax.data.io import IMAGE_EXTENSIONS, read_image
from segjax.errors import SegjaxError

SHAPES = ("disc", "ring", "square", "triangle", "cross", "bars")
"""The classes of the generated data set, in label order."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
"""The channel statistics torchvision's ImageNet weights were trained with (images in [0, 1])."""


def _shape_mask(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
  """A boolean (size, size) mask of one shape of ``kind``, of random size, position and orientation."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
  radius = rng.uniform(0.22, 0.36) * size
  cy, cx = rng.uniform(radius, size - radius, 2)
  angle = rng.uniform(0, np.pi)
  # coordinates in the shape's own rotated frame, in units of its radius
  u = ((xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)) / radius
  v = (-(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)) / radius
  r = np.hypot(u, v)
  if kind == "disc":
    return r <= 1.0
  if kind == "ring":
    return (r <= 1.0) & (r >= 0.55)
  if kind == "square":
    return (np.abs(u) <= 0.75) & (np.abs(v) <= 0.75)
  if kind == "triangle":  # equilateral, inscribed in the unit circle
    return (v >= -0.5) & (np.sqrt(3) * np.abs(u) <= 1.0 - v)
  if kind == "cross":
    return ((np.abs(u) <= 0.25) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.25) & (np.abs(u) <= 1.0))
  if kind == "bars":  # three parallel bars
    return (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0) & (np.mod(v + 1.0, 0.8) < 0.4)
  raise ValueError(f"unknown shape {kind!r}")


def render_shape(rng: np.random.Generator, label: int, size: int, num_channels: int) -> np.ndarray:
  """One uint8 (size, size, num_channels) image of shape ``SHAPES[label]`` in a random colour on a random, noisy,
  smoothly shaded background; the colours of shape and background differ by at least 0.25 in gray value."""
  mask = _shape_mask(SHAPES[label], rng, size)
  background = rng.uniform(0.0, 1.0, num_channels)
  contrast = rng.uniform(0.25, 0.6) * rng.choice([-1.0, 1.0])
  foreground = background + contrast
  if foreground.mean() > 1.0 or foreground.mean() < 0.0:  # keep the contrast, flip its sign
    foreground = background - contrast
  foreground = np.clip(foreground + rng.normal(0, 0.1, num_channels), 0.0, 1.0)
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
  shading = rng.normal(0, 0.1) * (yy - 0.5) + rng.normal(0, 0.1) * (xx - 0.5)
  image = np.where(mask[..., None], foreground, background) + shading[..., None]
  image = image + rng.normal(0.0, 0.06, image.shape)
  return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


def shapes_splits(
  *, image_size: int, num_channels: int, counts: Mapping[str, int], seed: int
) -> dict[str, list[dict[str, Any]]]:
  """The generated data set: ``counts[split]`` examples per split, labels balanced (example i has label
  ``i mod len(SHAPES)`` before a seeded shuffle), each split a pure function of ``(seed, split)``."""
  splits = {}
  for index, (split, count) in enumerate(counts.items()):
    rng = np.random.default_rng([seed, index])
    labels = rng.permutation(np.arange(count) % len(SHAPES))
    splits[split] = [
      {
        "image": render_shape(rng, int(label), image_size, num_channels),
        "label": int(label),
        "name": f"{split}_{i:05d}",
      }
      for i, label in enumerate(labels)
    ]
  return splits


class FileSource:
  """Random access to ``(path, label)`` pairs, each image read when it is asked for."""

  def __init__(self, items: Sequence[tuple[str, int]], num_channels: int):
    self.items, self.num_channels = list(items), num_channels

  def __len__(self) -> int:
    return len(self.items)

  def __getitem__(self, index: int) -> dict[str, Any]:
    path, label = self.items[index]
    return {"image": read_image(path, self.num_channels), "label": label, "name": os.path.basename(path)}


SPLIT_FOLDERS = {"train": ("train",), "validation": ("validation", "val", "valid"), "test": ("test",)}
"""Sub-folders of a class-folder root that are taken as ready-made splits, each holding the class folders."""


def _class_files(root: str) -> tuple[tuple[str, ...], dict[str, list[str]]]:
  """The class names (sorted sub-folder names) of ``root`` and each class's image files, checked."""
  if not os.path.isdir(root):
    raise SegjaxError(f"data.root '{root}' does not exist; point it at a folder of class sub-folders.")
  classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
  if not classes:
    raise SegjaxError(
      f"data.root '{root}' has no class sub-folders; put each class's images in root/<class>/ (e.g. root/cat/1.png)."
    )
  files = {}
  for name in classes:
    folder = os.path.join(root, name)
    entries = sorted(f for f in os.listdir(folder) if not f.startswith("."))
    if bad := [f for f in entries if not f.lower().endswith(IMAGE_EXTENSIONS)]:
      raise SegjaxError(
        f"'{os.path.join(folder, bad[0])}' is not an image ({', '.join(IMAGE_EXTENSIONS)}); remove it from the class "
        "folders."
      )
    if not entries:
      raise SegjaxError(f"class folder '{folder}' holds no images; remove it or add its images.")
    files[name] = [os.path.join(folder, f) for f in entries]
  return tuple(classes), files


def class_folder_splits(
  root: str, *, num_channels: int, validation_fraction: float, test_fraction: float
) -> tuple[tuple[str, ...], dict[str, FileSource]]:
  """``(class_names, splits)`` of a folder of class sub-folders.

  ``root/train/<class>/...`` (with ``val``/``validation`` and ``test`` beside it) are taken as the splits, else
  ``root/<class>/...`` is split per class by the sorted file names: of every class, ``round(n * fraction)`` files
  (at least one where the fraction is positive and the class has two or more) go to validation and to test,
  spread evenly over the sorted names. Labels are the class indices in sorted class-name order.
  """
  present = {
    split: os.path.join(root, name)
    for split, names in SPLIT_FOLDERS.items()
    for name in names
    if os.path.isdir(os.path.join(root, name))
  }
  if "train" in present:
    classes, _ = _class_files(present["train"])
    splits = {}
    for split, folder in present.items():
      names, files = _class_files(folder)
      if unknown := sorted(set(names) - set(classes)):
        raise SegjaxError(f"'{folder}' has class '{unknown[0]}', which '{present['train']}' does not have.")
      items = [(path, classes.index(name)) for name in names for path in files[name]]
      splits[split] = FileSource(items, num_channels)
    return classes, splits
  classes, files = _class_files(root)
  items: dict[str, list[tuple[str, int]]] = {"train": [], "validation": [], "test": []}
  for label, name in enumerate(classes):
    paths = files[name]
    held = {}
    for split, fraction in (("validation", validation_fraction), ("test", test_fraction)):
      held[split] = max(1, round(len(paths) * fraction)) if fraction > 0 and len(paths) > 1 else 0
    if held["validation"] + held["test"] >= len(paths):
      raise SegjaxError(
        f"class '{name}' has {len(paths)} images, too few for data.validation_fraction {validation_fraction} and "
        f"data.test_fraction {test_fraction}; add images or lower the fractions."
      )
    chosen = np.linspace(0, len(paths), held["validation"] + held["test"], endpoint=False).astype(int)
    ordered = [int(i) for i in list(chosen[::2]) + list(chosen[1::2])]  # validation and test interleaved
    assigned = {i: "validation" for i in ordered[: held["validation"]]} | {
      i: "test" for i in ordered[held["validation"] :]
    }
    for index, path in enumerate(paths):
      items[assigned.get(index, "train")].append((path, label))
  return classes, {split: FileSource(pairs, num_channels) for split, pairs in items.items() if pairs}


def _resize_shorter(image: np.ndarray, side: int) -> np.ndarray:
  """Resizes (bilinear, antialiased) so that the shorter side is ``side``; uint8 stays uint8."""
  height, width = image.shape[:2]
  if min(height, width) == side:
    return image
  scale = side / min(height, width)
  size = (max(side, round(width * scale)), max(side, round(height * scale)))
  channels = image.shape[2]
  pil = Image.fromarray(image[..., 0] if channels == 1 else image)
  out = np.asarray(pil.resize(size, Image.BILINEAR, reducing_gap=None))
  return out[..., None] if out.ndim == 2 else out


def _centre_crop(image: np.ndarray, side: int) -> np.ndarray:
  top, left = (image.shape[0] - side) // 2, (image.shape[1] - side) // 2
  return image[top : top + side, left : left + side]


def square_image(image: np.ndarray, side: int, *, crop_fraction: float = 1.0) -> np.ndarray:
  """The centre ``side`` x ``side`` square of the image resized so its shorter side is ``side / crop_fraction``
  (the ImageNet evaluation transform: shorter side 256, centre 224, is ``crop_fraction`` 0.875)."""
  if image.shape[:2] == (side, side) and crop_fraction == 1.0:
    return image
  return _centre_crop(_resize_shorter(image, round(side / crop_fraction)), side)


def classification_inputs(
  features: Mapping[str, Any],
  *,
  size: int,
  crop_fraction: float = 1.0,
  mean: Sequence[float] | None = None,
  std: Sequence[float] | None = None,
) -> dict[str, np.ndarray]:
  """An example -> ``{'image': float32 (size, size, C), 'label': int32 ()}``: squared by :func:`square_image`, scaled
  to [0, 1], then standardised per channel with ``mean`` / ``std`` when given (e.g. :data:`IMAGENET_MEAN`)."""
  image = square_image(np.asarray(features["image"]), size, crop_fraction=crop_fraction)
  image = image.astype(np.float32) / (65535.0 if image.dtype == np.uint16 else 255.0)
  if mean is not None:
    image = (image - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
  return {"image": image, "label": np.int32(features["label"])}
