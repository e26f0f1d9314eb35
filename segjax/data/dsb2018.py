"""`dsb2018`: Data Science Bowl 2018 nuclei (BBBC038 stage 1 training set), from a manual dir.

The manual dir holds ``images/<id>.png`` (RGB; fluorescence, brightfield and H&E; nine sizes from 256x256 to
1388x1040) and ``instances/<id>.png`` (16-bit instance ids, 0 = background). Class 1 is nucleus. Touching nuclei are
the case the U-Net border weight map exists for (Ronneberger et al. 2015, Eq. 2); its border term is stored with each
example.

No labelled test set was released, so the ids, sorted, are split deterministically: position ``i % 10 == 0`` is
``validation``, ``i % 10 == 5`` is ``test``, the other 80% ``train`` (67 / 66 / 531 of the 664 images).

Cite Caicedo et al., Nature Methods 16, 1247-1253 (2019).
"""

import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from segjax.data.features import SegmentationBuilder, make_example, segmentation_features
from segjax.data.io import files_fingerprint, images_by_stem, pair_by_stem, read_image, read_label
from segjax.errors import SegjaxError


def split_of(position: int) -> str:
  """The split of the id at ``position`` in the sorted list of ids."""
  return {0: "validation", 5: "test"}.get(position % 10, "train")


def paired_files(manual_dir: str) -> list[tuple[str, str, str]]:
  """Sorted (id, image path, instance path) triples; SegjaxError naming the first unpaired or mis-sized file."""
  images = images_by_stem(os.path.join(manual_dir, "images"))
  instances = images_by_stem(os.path.join(manual_dir, "instances"))
  pair_by_stem(images, instances, what="instance map", folder=os.path.join(manual_dir, "instances"))
  return [(stem, images[stem], instances[stem]) for stem in sorted(images)]


@dataclasses.dataclass(eq=False)
class Dsb2018Config(tfds.core.BuilderConfig):
  """Attributes: border_sigma: sigma of the border weight term in pixels."""

  border_sigma: float = 5.0


class Dsb2018(SegmentationBuilder):
  """TFDS builder for the DSB 2018 nuclei (``train``, ``validation``, ``test``)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Place images/<id>.png and instances/<id>.png (16-bit ids) in the manual dir."
  BUILDER_CONFIGS = [Dsb2018Config(name="default", description="Sorted ids split 80/10/10 by position mod 10.")]
  DEFAULT_CONFIG_NAME = "default"
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      description="DSB 2018 nuclei: RGB images of mixed sizes, instance ids and the U-Net border weight term.",
      features=segmentation_features(3, instances=True),
      disable_shuffling=True,
      homepage="https://bbbc.broadinstitute.org/BBBC038",
      citation="Caicedo et al., Nature Methods 16, 1247-1253 (2019).",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator[Any]]:
    triples = paired_files(os.fspath(dl_manager.manual_dir))
    splits: dict[str, list[tuple[str, str, str]]] = {"train": [], "validation": [], "test": []}
    for position, triple in enumerate(triples):
      splits[split_of(position)].append(triple)
    return {name: self._generate_examples(items) for name, items in splits.items()}

  def _generate_examples(self, items: list[tuple[str, str, str]]) -> Iterator[tuple[int, dict[str, Any]]]:
    for key, (stem, image_path, instance_path) in enumerate(items):
      instances = read_label(instance_path)
      if instances.min() < 0 or instances.max() > np.iinfo(np.uint16).max:
        raise SegjaxError(f"dsb2018: '{instance_path}' holds ids outside 0-65535; save 16-bit instance ids.")
      mask = (instances > 0).astype(np.uint8)
      image = read_image(image_path, 3)
      yield key, make_example(stem, image, mask, instances, border_sigma=self.builder_config.border_sigma)


def builder_config(manual_dir: str, border_sigma: float) -> Dsb2018Config:
  """A config named after sigma and a fingerprint of the files, so other files or settings are prepared apart."""
  triples = paired_files(manual_dir)
  fingerprint = files_fingerprint([path for _, image, instances in triples for path in (image, instances)])
  return Dsb2018Config(
    name=f"sigma{border_sigma!r}_{fingerprint[:12]}".replace(".", "p"),
    description=f"files of {os.path.abspath(manual_dir)}",
    border_sigma=float(border_sigma),
  )
