"""What every segjax segmentation data set stores, and the TFDS builder base class they share.

An example is a dict of

* ``image``: (H, W, C) uint8 PNG (or a zlib-compressed uint16 tensor for 16-bit images), C = 1 or 3;
* ``mask``: (H, W, 1) uint8 PNG of class ids (``IGNORE_LABEL`` for pixels without a label);
* ``instances`` (optional): (H, W, 1) uint16 instance ids, 0 = background;
* ``border_weights`` (optional): (H, W) float32, the U-Net border term ``exp(-(d1 + d2)**2 / (2 sigma**2))`` computed
  from the instances at preparation (Ronneberger et al. 2015, Eq. 2, without its factor w0, which the pipeline applies
  so it can be changed without preparing the data again);
* ``name``: the source file's stem, for error messages and outputs.

Heights and widths may differ between examples. Builders write ArrayRecord files in key order so that
``as_data_source(split)[i]`` is example ``i`` and grain can read it at random.
"""

from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from segjax.errors import SegjaxError

IGNORE_LABEL = 255
"""Mask value of pixels that have no class (excluded from losses and metrics)."""


def segmentation_features(
  num_channels: int, *, image_dtype: Any = np.uint8, instances: bool = False
) -> tfds.features.FeaturesDict:
  """The TFDS features of a segmentation example (see the module docstring)."""
  zlib = tfds.features.Encoding.ZLIB
  if np.dtype(image_dtype) == np.uint8:
    image = tfds.features.Image(shape=(None, None, num_channels), dtype=np.uint8)
  else:  # TFDS cannot decode 16-bit PNGs in `as_data_source` without OpenCV; a zlib tensor is lossless and numpy-only.
    image = tfds.features.Tensor(shape=(None, None, num_channels), dtype=np.uint16, encoding=zlib)
  features = {
    "image": image,
    "mask": tfds.features.Image(shape=(None, None, 1), dtype=np.uint8),
    "name": tfds.features.Text(),
  }
  if instances:
    features["instances"] = tfds.features.Tensor(shape=(None, None, 1), dtype=np.uint16, encoding=zlib)
    features["border_weights"] = tfds.features.Tensor(shape=(None, None), dtype=np.float32, encoding=zlib)
  return tfds.features.FeaturesDict(features)


def make_example(
  name: str,
  image: np.ndarray,
  mask: np.ndarray,
  instances: np.ndarray | None = None,
  *,
  border_sigma: float = 5.0,
) -> dict[str, Any]:
  """Assembles one example, computing the border term of the weight map when ``instances`` are given.

  Args:
    name: the example's name (file stem).
    image: (H, W, C) uint8 or uint16.
    mask: (H, W) class ids (< 256).
    instances: optional (H, W) instance ids (< 65536).
    border_sigma: sigma of the border term in pixels.
  """
  from segjax.weight_maps import border_weights

  if mask.shape != image.shape[:2]:
    raise SegjaxError(f"'{name}': mask size {mask.shape} differs from image size {image.shape[:2]}.")
  example = {"name": name, "image": image, "mask": mask.astype(np.uint8)[..., None]}
  if instances is not None:
    if instances.shape != mask.shape:
      raise SegjaxError(f"'{name}': instance map size {instances.shape} differs from image size {mask.shape}.")
    if instances.max(initial=0) > np.iinfo(np.uint16).max:
      raise SegjaxError(f"'{name}': more than 65535 instance ids; relabel the instances consecutively.")
    example["instances"] = instances.astype(np.uint16)[..., None]
    example["border_weights"] = border_weights(instances, w0=1.0, sigma=border_sigma).astype(np.float32)
  return example


class SegmentationBuilder(tfds.core.GeneratorBasedBuilder):
  """Base of segjax's TFDS builders: ArrayRecord files, records kept in key order.

  Subclasses set ``code_path = epath.Path(__file__)``: TFDS 4.9.10 derives it through ``importlib_resources``, which
  it imports but does not install on Python >= 3.9 (tensorflow/datasets#11212).
  """

  def __init__(self, *, file_format: str | tfds.core.FileFormat | None = None, **kwargs: Any):
    """Builds with ArrayRecord files unless another ``file_format`` is asked for (TFDS's default is TFRecord)."""
    super().__init__(file_format=file_format or tfds.core.FileFormat.ARRAY_RECORD, **kwargs)
