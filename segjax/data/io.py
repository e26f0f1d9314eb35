"""Reading images and label maps from files, with errors that name the file.

Training data builders and ``experiments.predict`` read files through these functions, so a PNG, TIFF or JPEG is
decoded the same way everywhere: images become (H, W, C) uint8, or uint16 for 16-bit grayscale; label maps become
(H, W) integer arrays (8- or 16-bit, palette PNGs give their palette indices).
"""

import contextlib
import glob
import hashlib
import os
from collections.abc import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from segjax.errors import SegjaxError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")


def list_images(path: str) -> list[str]:
  """The image file ``path`` itself, the image files in folder ``path``, or those matching the glob pattern ``path``
  (e.g. ``'slides/*.tif'``), sorted; SegjaxError if there are none."""
  if os.path.isfile(path):
    return [path]
  if any(c in path for c in "*?[") and not os.path.exists(path):
    files = sorted(f for f in glob.glob(path) if os.path.isfile(f) and f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
      raise SegjaxError(
        f"no image file matches '{path}'; pass an image file, a folder or a pattern such as 'dir/*.png'."
      )
    return files
  if not os.path.isdir(path):
    raise SegjaxError(f"input '{path}' does not exist; pass an image file or a folder of images.")
  files = sorted(
    os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
  )
  if not files:
    raise SegjaxError(f"folder '{path}' holds no images ({', '.join(IMAGE_EXTENSIONS)}); point at a folder of images.")
  return files


def images_by_stem(folder: str) -> dict[str, str]:
  """File stem -> path of the image files of ``folder``; SegjaxError if two files share a stem or there are none."""
  stems: dict[str, str] = {}
  for path in list_images(folder) if os.path.isdir(folder) else _missing_folder(folder):
    stem = os.path.splitext(os.path.basename(path))[0]
    if stem in stems:
      raise SegjaxError(f"'{stems[stem]}' and '{path}' share the name '{stem}'; keep one image per name.")
    stems[stem] = path
  return stems


def pair_by_stem(images: dict[str, str], others: dict[str, str], *, what: str, folder: str) -> None:
  """Checks that every image has a file of kind ``what`` (mask, instance map) with its stem and size, and vice versa.

  Only file headers are read. Raises a SegjaxError naming the first file that breaks the pairing.
  """
  for stem, path in images.items():
    if stem not in others:
      raise SegjaxError(f"image '{path}' has no {what} named '{stem}' in {folder}; add one or remove the image.")
    if image_size(others[stem]) != image_size(path):
      raise SegjaxError(f"{what} '{others[stem]}' is {image_size(others[stem])} but its image is {image_size(path)}.")
  if extra := sorted(set(others) - set(images)):
    raise SegjaxError(f"{what} '{others[extra[0]]}' has no image named '{extra[0]}'; add the image or remove it.")


def files_fingerprint(paths: list[str]) -> str:
  """A hash of the files' paths, sizes and modification times: prepared data named after it is never stale."""
  digest = hashlib.sha1()
  for path in sorted(paths):
    stat = os.stat(path)
    digest.update(f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
  return digest.hexdigest()


def _missing_folder(folder: str) -> list[str]:
  raise SegjaxError(f"folder '{folder}' does not exist; check the path in the config.")


@contextlib.contextmanager
def open_image(path: str) -> Iterator[Image.Image]:
  """``PIL.Image.open`` whose failures become a SegjaxError naming the file."""
  try:
    with Image.open(path) as img:
      yield img
  except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
    raise SegjaxError(f"'{path}' is not a readable image ({type(e).__name__}); remove it or convert it to PNG.") from e


def image_size(path: str) -> tuple[int, int]:
  """(height, width) from the file header, without decoding the pixels."""
  with open_image(path) as img:
    return img.height, img.width


def is_sixteen_bit(path: str) -> bool:
  """Whether an image file holds 16-bit (or 32-bit integer) grayscale pixels."""
  with open_image(path) as img:
    return img.mode in _SIXTEEN_BIT_MODES


def read_image(path: str, num_channels: int, *, strict: bool = False) -> np.ndarray:
  """Reads an image file as (H, W, num_channels) uint8; 16-bit grayscale stays uint16 when ``num_channels`` is 1.

  RGBA and palette images are converted to RGB (or to luminance for one channel); grayscale becomes RGB for three.

  Args:
    path: the file.
    num_channels: 1 or 3.
    strict: refuse a colour image (channels that differ) for ``num_channels == 1`` instead of taking its luminance.

  Raises:
    SegjaxError: if the file is not a readable image, or (strict) a colour image for a grayscale model.
  """
  with open_image(path) as img:
    try:
      img.load()
    except (OSError, SyntaxError) as e:
      raise SegjaxError(f"'{path}' is not a readable image ({type(e).__name__}: {e}); re-export it as PNG.") from e
    if num_channels == 1 and img.mode in _SIXTEEN_BIT_MODES:
      array = np.clip(np.asarray(img), 0, 65535).astype(np.uint16)
    else:
      if strict and num_channels == 1 and img.mode not in ("L", "1", "LA"):
        rgb = np.asarray(img.convert("RGB"))
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
          raise SegjaxError(
            f"'{path}' is a colour image ({img.mode}) but the model takes 1 (grayscale) channel; convert it to "
            "grayscale or use a model trained on colour images."
          )
      array = np.asarray(img.convert("L" if num_channels == 1 else "RGB"))
  return array[..., None] if array.ndim == 2 else array


def read_label(path: str) -> np.ndarray:
  """Reads a label map (class ids or instance ids) as an (H, W) int64 array.

  8- and 16-bit grayscale and palette images give their stored values; an RGB(A) file is accepted only when its
  colour channels are equal (a gray image saved as RGB).

  Raises:
    SegjaxError: if the file is unreadable or a colour image.
  """
  with open_image(path) as img:
    try:
      img.load()
    except (OSError, SyntaxError) as e:
      raise SegjaxError(f"'{path}' is not a readable image ({type(e).__name__}: {e}); re-export it as PNG.") from e
    array = np.asarray(img)
  if array.ndim == 3:
    if not all(np.array_equal(array[..., 0], array[..., c]) for c in range(1, min(3, array.shape[-1]))):
      raise SegjaxError(
        f"label file '{path}' is a colour image; save masks as one-channel images of class (or instance) ids."
      )
    array = array[..., 0]
  return array.astype(np.int64)
