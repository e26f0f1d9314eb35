"""Tests for the `synthetic_cells` TFDS builder and its pure renderer."""

from __future__ import annotations

import numpy as np
import pytest

from segjax.data import synthetic
from segjax.errors import SegjaxError

SPLITS = ("train", "validation", "test")


def _prepare(config: str | synthetic.SyntheticCellsConfig, data_dir) -> synthetic.SyntheticCells:
  builder = synthetic.SyntheticCells(config=config, data_dir=str(data_dir))
  builder.download_and_prepare()
  return builder


def _load(builder: synthetic.SyntheticCells, split: str) -> list[dict[str, np.ndarray]]:
  source = builder.as_data_source(split)
  return [source[i] for i in range(len(source))]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def tiny(data_dir):
  return _prepare("tiny", data_dir)


@pytest.fixture(scope="module")
def tiny_rgb(data_dir):
  return _prepare("tiny_rgb", data_dir)


@pytest.fixture(scope="module", params=["tiny", "tiny_rgb"])
def prepared(request, tiny, tiny_rgb):
  return {"tiny": tiny, "tiny_rgb": tiny_rgb}[request.param]


def _touching_pairs(instances: np.ndarray) -> set[tuple[int, int]]:
  """Pairs of distinct instances with pixels exactly 2 apart (Chebyshev): one pixel in between."""
  size = instances.shape[0]
  padded = np.pad(instances, 2)
  pairs = set()
  for oy in range(-2, 3):
    for ox in range(-2, 3):
      if max(abs(oy), abs(ox)) != 2:
        continue
      neighbour = padded[2 + oy : 2 + oy + size, 2 + ox : 2 + ox + size]
      hit = (instances > 0) & (neighbour > 0) & (neighbour != instances)
      pairs.update(zip(instances[hit].tolist(), neighbour[hit].tolist(), strict=True))
  return {(min(a, b), max(a, b)) for a, b in pairs}


def test_builder_configs():
  configs = {config.name: config for config in synthetic.SyntheticCells.BUILDER_CONFIGS}
  assert synthetic.SyntheticCells.BUILDER_CONFIGS[0].name == "gray"
  assert synthetic.SyntheticCells.DEFAULT_CONFIG_NAME == "gray"
  gray, rgb = configs["gray"], configs["rgb"]
  assert (gray.image_size, gray.num_channels, gray.num_classes, gray.seed) == (128, 1, 2, 0)
  assert (gray.num_train, gray.num_validation, gray.num_test) == (512, 64, 64)
  assert (rgb.image_size, rgb.num_channels, rgb.num_classes) == (128, 3, 4)
  assert (configs["tiny"].image_size, configs["tiny"].num_train, configs["tiny"].num_test) == (64, 16, 8)
  assert (configs["tiny_rgb"].num_channels, configs["tiny_rgb"].num_classes) == (3, 4)


def test_split_sizes_and_file_format(prepared):
  config = prepared.builder_config
  expected = {"train": config.num_train, "validation": config.num_validation, "test": config.num_test}
  assert {name: split.num_examples for name, split in prepared.info.splits.items()} == expected
  assert prepared.info.file_format.value == "array_record"
  for split, count in expected.items():
    assert len(prepared.as_data_source(split)) == count


def test_data_source_shapes_and_dtypes(prepared):
  config = prepared.builder_config
  size = config.image_size
  for split in SPLITS:
    example = prepared.as_data_source(split)[0]
    assert set(example) == {"image", "mask", "instances", "border_weights"}
    assert all(isinstance(value, np.ndarray) for value in example.values())
    assert example["image"].shape == (size, size, config.num_channels)
    assert example["image"].dtype == np.uint8
    assert example["mask"].shape == (size, size, 1)
    assert example["mask"].dtype == np.uint8
    assert example["instances"].shape == (size, size, 1)
    assert example["instances"].dtype == np.uint16
    assert example["border_weights"].shape == (size, size)
    assert example["border_weights"].dtype == np.float32


def test_data_source_matches_render_example(prepared):
  config = prepared.builder_config
  source = prepared.as_data_source("validation")
  for index in (0, len(source) - 1):
    rng = np.random.default_rng([config.seed, synthetic.SPLIT_IDS["validation"], index])
    expected = synthetic.render_example(
      rng, image_size=config.image_size, num_channels=config.num_channels, num_classes=config.num_classes
    )
    for key, value in expected.items():
      np.testing.assert_array_equal(source[index][key], value, err_msg=key)


def test_gray_mask_is_instances_above_zero(tiny):
  for split in SPLITS:
    for example in _load(tiny, split):
      assert example["mask"].max() <= 1
      np.testing.assert_array_equal(example["mask"], (example["instances"] > 0).astype(np.uint8))


def test_rgb_classes(tiny_rgb):
  seen = set()
  for example in _load(tiny_rgb, "train"):
    mask, instances = example["mask"][..., 0], example["instances"][..., 0]
    assert mask.max() < 4
    np.testing.assert_array_equal(mask > 0, instances > 0)
    for cell in np.unique(instances[instances > 0]):
      classes = np.unique(mask[instances == cell])
      assert len(classes) == 1, f"instance {cell} has classes {classes}"
      seen.add(int(classes[0]))
  assert seen == {1, 2, 3}


def test_instances_consecutive_and_separated(prepared):
  """Ids are 1..n, and distinct cells are never 8-adjacent: a background border always lies between them."""
  touching = 0
  for example in _load(prepared, "train"):
    instances = example["instances"][..., 0].astype(np.int32)
    ids = np.unique(instances)
    np.testing.assert_array_equal(ids, np.arange(ids.max() + 1))
    padded = np.pad(instances, 1)
    for oy in (-1, 0, 1):
      for ox in (-1, 0, 1):
        neighbour = padded[1 + oy : 1 + oy + instances.shape[0], 1 + ox : 1 + ox + instances.shape[1]]
        assert not np.any((instances > 0) & (neighbour > 0) & (neighbour != instances))
    touching += len(_touching_pairs(instances))
  assert touching >= 3 * prepared.builder_config.num_train  # Many cells touch, separated by a one-pixel border.


def test_borders_are_darker_than_the_cells_they_separate(tiny):
  """Pixels between two touching cells (cell, border, cell in a row) are darker than the cells on either side."""
  border_values, cell_values = [], []
  for example in _load(tiny, "train"):
    image, instances = example["image"][..., 0].astype(np.float32), example["instances"][..., 0].astype(np.int32)
    left, middle, right = instances[:, :-2], instances[:, 1:-1], instances[:, 2:]
    between = (left > 0) & (right > 0) & (left != right) & (middle == 0)
    border_values.append(image[:, 1:-1][between])
    cell_values.append(0.5 * (image[:, :-2][between] + image[:, 2:][between]))
  assert np.concatenate(border_values).mean() < 0.9 * np.concatenate(cell_values).mean()


def test_foreground_fraction_and_contrast(prepared):
  fractions, cell_means, background_means = [], [], []
  for example in _load(prepared, "train"):
    foreground = example["mask"][..., 0] > 0
    gray = example["image"].mean(axis=-1)
    fractions.append(foreground.mean())
    cell_means.append(gray[foreground].mean())
    background_means.append(gray[~foreground].mean())
  assert 0.2 <= np.mean(fractions) <= 0.7
  assert min(fractions) > 0.1 and max(fractions) < 0.8
  assert np.mean(cell_means) > 1.5 * np.mean(background_means)


def test_prepare_is_deterministic(tiny, tmp_path):
  again = _prepare("tiny", tmp_path)
  for split in SPLITS:
    for first, second in zip(_load(tiny, split), _load(again, split), strict=True):
      for key in first:
        np.testing.assert_array_equal(first[key], second[key], err_msg=f"{split}/{key}")


def test_custom_config_and_seed_changes_images(tiny, tmp_path):
  config = synthetic.SyntheticCellsConfig(
    name="tiny_seed1", image_size=64, num_train=2, num_validation=1, num_test=1, seed=1
  )
  other = _prepare(config, tmp_path)
  assert other.data_dir.startswith(str(tmp_path))
  assert len(other.as_data_source("train")) == 2
  first, second = tiny.as_data_source("train")[0], other.as_data_source("train")[0]
  assert first["image"].shape == second["image"].shape
  assert not np.array_equal(first["image"], second["image"])


@pytest.mark.parametrize("num_channels,num_classes", [(1, 2), (3, 4), (1, 4), (3, 2)])
def test_render_example_is_deterministic(num_channels, num_classes):
  kwargs = dict(image_size=48, num_channels=num_channels, num_classes=num_classes)
  first = synthetic.render_example(np.random.default_rng([3, 0, 5]), **kwargs)
  second = synthetic.render_example(np.random.default_rng([3, 0, 5]), **kwargs)
  other = synthetic.render_example(np.random.default_rng([3, 0, 6]), **kwargs)
  for key in first:
    np.testing.assert_array_equal(first[key], second[key], err_msg=key)
  assert not np.array_equal(first["image"], other["image"])
  assert first["image"].shape == (48, 48, num_channels)
  assert first["mask"].max() < num_classes


@pytest.mark.parametrize(
  "kwargs", [dict(num_channels=2), dict(num_classes=1), dict(num_classes=5), dict(image_size=16)]
)
def test_render_example_rejects_bad_settings(kwargs):
  with pytest.raises(SegjaxError):
    synthetic.render_example(np.random.default_rng(0), **kwargs)
