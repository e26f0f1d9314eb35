"""config.instances: one-line errors naming the key, and the data set view of instance targets."""

import numpy as np
import pytest

from segjax.data import Dataset
from segjax.data.instance_targets import InstanceSettings, with_instance_targets
from segjax.errors import SegjaxError


@pytest.mark.parametrize(
  ("values", "message"),
  [
    ({"targets": "contours"}, "instances.targets must be None, 'contour' or 'distance'"),
    ({"method": "flood"}, "instances.method must be 'watershed' or 'components'"),
    ({"method": "watershed"}, "'watershed' needs instances.targets"),
    ({"boundry_width": 2}, "unknown config key instances.boundry_width"),
    ({"targets": "contour", "boundary_width": 0}, "instances.boundary_width must be a positive integer"),
    ({"marker_threshold": 1.5}, "instances.marker_threshold must be in \\[0, 1\\)"),
  ],
)
def test_bad_instance_settings_name_the_key(values, message):
  with pytest.raises(SegjaxError, match=message):
    InstanceSettings.from_config(values)


def test_missing_section_is_connected_components():
  assert InstanceSettings.from_config(None) == InstanceSettings(method="components", targets=None)


def _dataset(has_instances: bool) -> Dataset:
  instances = np.zeros((6, 8, 1), np.uint16)
  instances[1:5, 1:4, 0], instances[1:5, 4:7, 0] = 1, 2  # two squares sharing an edge
  mask = (instances > 0).astype(np.uint8)
  mask[0, 0, 0] = 255  # an unlabelled pixel stays unlabelled
  example = {"image": np.zeros((6, 8, 1), np.uint8), "mask": mask, "instances": instances}
  return Dataset("toy", 2, 1, ("background", "cell"), {"train": [example]}, has_instances=has_instances)


def test_instance_targets_replace_the_mask_and_keep_ignored_pixels():
  view = with_instance_targets(_dataset(True), InstanceSettings(targets="contour", boundary_width=1))
  assert view.num_classes == 3 and view.class_names == ("background", "interior", "boundary")
  mask = view.split("train")[0]["mask"][..., 0]
  assert mask[0, 0] == 255 and mask[0, 1] == 0
  assert mask[2, 3] == 2 and mask[2, 4] == 2  # both sides of the contact line are boundary
  assert mask[2, 2] == 1 and mask[2, 5] == 1  # each square keeps an interior
  assert view.split("train")[0]["mask"] is view.split("train")[0]["mask"]  # computed once, then cached


def test_instance_targets_need_instance_maps():
  with pytest.raises(SegjaxError, match="instances.targets 'contour' needs instance maps"):
    with_instance_targets(_dataset(False), InstanceSettings(targets="contour"))
  assert with_instance_targets(_dataset(False), InstanceSettings()).num_classes == 2
