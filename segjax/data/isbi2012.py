"""`isbi2012`: the ISBI 2012 EM segmentation challenge data (the U-Net paper's first experiment), from a manual dir.

The manual dir holds ``train/image/{0..29}.png`` (512x512 8-bit serial-section TEM slices of the Drosophila ventral
nerve cord) and ``train/label/{0..29}.png`` (0 = membrane, 255 = cell interior). Class 1 is membrane, class 0 the
cell interior. The challenge's test labels were never released, so the labelled slices are split into ``train`` and
``validation`` (the held-out slices, default 25-29). The unlabelled ``test/`` slices are predicted with
``experiments.predict``.

Instances are the 4-connected components of the cell interior, so the U-Net border weight map (Ronneberger et al.
2015, Eq. 2) up-weights the thin membranes between neighbouring cells.

Cite Cardona et al. 2010 (PLoS Biol 8(10):e1000502) and Arganda-Carreras et al. 2015 (Front. Neuroanat. 9:142).
"""

import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from scipy import ndimage

from segjax.data.features import SegmentationBuilder, make_example, segmentation_features
from segjax.data.io import files_fingerprint, read_image, read_label
from segjax.errors import SegjaxError

NUM_SLICES = 30
MEMBRANE, INTERIOR = 1, 0


@dataclasses.dataclass(eq=False)
class Isbi2012Config(tfds.core.BuilderConfig):
  """Which labelled slices are held out for validation, and the border term's sigma.

  Attributes:
    validation_slices: slice indices (0-29) of the ``validation`` split; the others form ``train``.
    border_sigma: sigma of the border weight term in pixels.
  """

  validation_slices: tuple[int, ...] = (25, 26, 27, 28, 29)
  border_sigma: float = 5.0


def slice_label_to_classes(label: np.ndarray, path: str) -> np.ndarray:
  """ISBI label image (0 = membrane, 255 = interior) -> class ids (1 = membrane, 0 = interior)."""
  values = set(np.unique(label).tolist())
  if not values <= {0, 255}:
    raise SegjaxError(
      f"'{path}' has values {sorted(values - {0, 255})[:5]} besides 0 and 255; it is not an ISBI label."
    )
  return np.where(label == 0, MEMBRANE, INTERIOR).astype(np.uint8)


def check_manual_dir(manual_dir: str) -> None:
  """Fails with one line naming the first missing file of the expected layout."""
  for i in range(NUM_SLICES):
    for kind in ("image", "label"):
      path = os.path.join(manual_dir, "train", kind, f"{i}.png")
      if not os.path.isfile(path):
        raise SegjaxError(
          f"isbi2012: '{path}' is missing; data.manual_dir must hold train/image/{{0..29}}.png and "
          "train/label/{0..29}.png (see segjax/data/isbi2012.py)."
        )


class Isbi2012(SegmentationBuilder):
  """TFDS builder for the ISBI 2012 labelled slices (``train`` and ``validation``)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Place train/image/{0..29}.png and train/label/{0..29}.png in the manual dir."
  BUILDER_CONFIGS = [Isbi2012Config(name="default", description="Slices 25-29 held out for validation.")]
  DEFAULT_CONFIG_NAME = "default"
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      description="ISBI 2012 EM membrane segmentation: 30 labelled 512x512 slices; class 1 = membrane.",
      features=segmentation_features(1, instances=True),
      disable_shuffling=True,
      homepage="https://imagej.net/events/isbi-2012-segmentation-challenge",
      citation="Cardona et al. 2010, PLoS Biol 8(10):e1000502; Arganda-Carreras et al. 2015, Front. Neuroanat. 9:142.",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator[Any]]:
    manual_dir = os.fspath(dl_manager.manual_dir)
    check_manual_dir(manual_dir)
    held_out = set(self.builder_config.validation_slices)
    train = [i for i in range(NUM_SLICES) if i not in held_out]
    return {
      "train": self._generate_examples(manual_dir, train),
      "validation": self._generate_examples(manual_dir, sorted(held_out)),
    }

  def _generate_examples(self, manual_dir: str, slices: list[int]) -> Iterator[tuple[int, dict[str, Any]]]:
    for i in slices:
      image = read_image(os.path.join(manual_dir, "train", "image", f"{i}.png"), 1)
      label_path = os.path.join(manual_dir, "train", "label", f"{i}.png")
      mask = slice_label_to_classes(read_label(label_path), label_path)
      instances, _ = ndimage.label(mask == INTERIOR)
      yield i, make_example(str(i), image, mask, instances, border_sigma=self.builder_config.border_sigma)


def builder_config(manual_dir: str, validation_slices: tuple[int, ...], border_sigma: float) -> Isbi2012Config:
  """A config named after its settings and a fingerprint of the files, so other files or settings are prepared apart.

  Raises:
    SegjaxError: for bad validation slices or a missing file.
  """
  if bad := [i for i in validation_slices if not 0 <= i < NUM_SLICES]:
    raise SegjaxError(f"isbi2012: validation slices {bad} are not in 0-29 (config key data.validation_slices).")
  if len(set(validation_slices)) in (0, NUM_SLICES):
    raise SegjaxError("isbi2012: data.validation_slices must hold some but not all of the slices 0-29.")
  check_manual_dir(manual_dir)
  files = [
    os.path.join(manual_dir, "train", kind, f"{i}.png") for kind in ("image", "label") for i in range(NUM_SLICES)
  ]
  slices = tuple(sorted(set(validation_slices)))
  name = "val_" + "_".join(map(str, slices)) + f"_sigma{border_sigma!r}_{files_fingerprint(files)[:12]}"
  return Isbi2012Config(
    name=name.replace(".", "p"),
    description=f"files of {os.path.abspath(manual_dir)}",
    validation_slices=slices,
    border_sigma=float(border_sigma),
  )
