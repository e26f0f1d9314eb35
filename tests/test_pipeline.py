"""Input pipeline (grain): batches addressed by step, random tiles of any-size images, padded evaluation."""

import functools

import numpy as np
import pytest

from segjax.data.pipeline import (
  WeightMap,
  eval_batches,
  pad_for_model,
  random_crop,
  to_model_inputs,
  train_batches,
  train_dataset,
)
from segjax.errors import SegjaxError
from segjax.models import create
from segjax.models.geometry import Geometry, model_geometry

prepare = functools.partial(to_model_inputs, num_classes=2)


class _Source:
  """A random-access source of n examples whose image encodes the example index."""

  def __init__(self, n: int, size: int = 4, sizes=None):
    self.n, self.size, self.sizes = n, size, sizes

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    h, w = self.sizes[i % len(self.sizes)] if self.sizes else (self.size, self.size)
    image = np.full((h, w, 1), i, np.uint8)
    return {"image": image, "mask": (image > 10).astype(np.uint8)}


def _ids(batch):
  return np.round(batch["image"][:, 0, 0, 0] * 255).astype(int).tolist()


def test_batch_of_step_is_pure_function_of_seed_and_step():
  ds = train_dataset(_Source(20), batch_size=4, seed=3, prepare=prepare)
  first = [_ids(b) for b, _ in zip(train_batches(ds, num_threads=2), range(12), strict=False)]
  resumed = [_ids(b) for b, _ in zip(train_batches(ds, start_step=7, num_threads=0), range(5), strict=False)]
  assert first[7:] == resumed
  # each epoch (5 steps) sees every example once, in a different order per epoch
  assert sorted(sum(first[:5], [])) == list(range(20))
  assert sorted(sum(first[5:10], [])) == list(range(20))
  assert sum(first[:5], []) != sum(first[5:10], [])
  other_seed = train_dataset(_Source(20), batch_size=4, seed=4, prepare=prepare)
  assert _ids(other_seed[0]) != first[0]


def test_process_shards_are_the_rows_of_the_global_batch_with_the_same_crops():
  source = _Source(30, sizes=[(9, 7), (6, 12)])
  kwargs = dict(batch_size=6, seed=0, prepare=prepare, crop_size=5)
  whole = train_dataset(source, **kwargs)
  shards = [train_dataset(source, **kwargs, process_index=p, process_count=3) for p in range(3)]
  for step in (0, 4, 9):
    union = np.concatenate([s[step]["image"] for s in shards])
    assert all(s[step]["image"].shape == (2, 5, 5, 1) for s in shards)
    # the same examples, in the same rows, with the same random tiles, whatever the number of processes
    np.testing.assert_array_equal(union, whole[step]["image"])


def test_batch_size_not_divisible_by_processes_is_a_clear_error():
  with pytest.raises(SegjaxError, match="batch_size 5 .* not divisible by the 2 processes"):
    train_dataset(_Source(10), batch_size=5, seed=0, prepare=prepare, process_index=0, process_count=2)


def test_to_model_inputs_excludes_ignored_pixels_and_applies_the_weight_map():
  mask = np.array([[0, 1], [255, 1]], np.uint8)[..., None]
  features = {"image": np.zeros((2, 2, 1), np.uint8), "mask": mask, "border_weights": np.array([[0.5, 0], [1, 0]])}
  plain = to_model_inputs(features, num_classes=2)
  np.testing.assert_array_equal(plain["label"], [[0, 1], [0, 1]])
  np.testing.assert_array_equal(plain["weights"], [[1, 1], [0, 1]])
  weighted = to_model_inputs(features, num_classes=2, weight_map=WeightMap((0.5, 2.0), w0=10.0))
  # w = w_c(label) + w0 * border, and 0 where there is no label
  np.testing.assert_allclose(weighted["weights"], [[0.5 + 5.0, 2.0], [0.0, 2.0]])


def _example(h, w):
  image = np.arange(h * w, dtype=np.float32).reshape(h, w, 1)
  return {"image": image, "label": np.arange(h * w).reshape(h, w), "weights": np.ones((h, w), np.float32)}


def test_random_crop_keeps_output_window_inside_the_image_and_mirrors_context():
  example = _example(10, 12)
  rng = np.random.default_rng(0)
  for _ in range(30):
    tile = random_crop(example, rng, size=8, margin=2)
    assert tile["image"].shape == (8, 8, 1) and tile["label"].shape == (8, 8)
    centre = tile["label"][2:6, 2:6]
    # the 4x4 output window is a contiguous window of the image's labels, all with weight 1
    top, left = divmod(int(centre[0, 0]), 12)
    np.testing.assert_array_equal(centre, example["label"][top : top + 4, left : left + 4])
    assert tile["weights"][2:6, 2:6].min() == 1
    np.testing.assert_array_equal(tile["image"][2:6, 2:6, 0], centre)
  # a window at the corner mirrors the image (reflect) into the margin
  corner = random_crop(_example(4, 4), np.random.default_rng(0), size=8, margin=2)
  np.testing.assert_array_equal(corner["image"][:, :, 0], np.pad(_example(4, 4)["image"][..., 0], 2, mode="reflect"))
  np.testing.assert_array_equal(corner["weights"], np.pad(np.ones((4, 4)), 2))


def test_random_crop_grows_small_images_with_zero_weight():
  tile = random_crop(_example(3, 5), np.random.default_rng(1), size=6)
  assert tile["image"].shape == (6, 6, 1)
  assert tile["weights"].sum() == 15  # only the 3x5 real pixels count


def test_pad_for_model_puts_output_pixel_zero_on_image_pixel_zero():
  model = create("unet_valid", num_classes=2, depth=2, base_width=4)
  geometry = model_geometry(model)
  assert geometry.margin == 20  # depth 2: 44 -> 4
  padded, size = pad_for_model(_example(30, 17), geometry)
  assert size == (30, 17)
  in_h, in_w = padded["image"].shape[:2]
  assert geometry.fit(in_h) == in_h and geometry.output_size(in_h) >= 30 and geometry.output_size(in_w) >= 17
  out_h, out_w = geometry.output_size(in_h), geometry.output_size(in_w)
  centre = padded["label"][20 : 20 + out_h, 20 : 20 + out_w]
  np.testing.assert_array_equal(centre[:30, :17], _example(30, 17)["label"])
  assert padded["weights"][20 : 20 + out_h, 20 : 20 + out_w].sum() == 30 * 17


def test_eval_batches_cover_split_once_grouped_by_size_with_padding_weights():
  source = _Source(10, sizes=[(4, 4), (4, 6)])
  batches = list(eval_batches(source, batch_size=4, prepare=prepare, geometry=Geometry(), keep=("mask",)))
  seen = []
  for batch, infos in batches:
    assert batch["image"].shape[0] == 4
    assert len({info["size"] for info in infos}) == 1
    assert batch["image"].shape[1:3] == infos[0]["size"]
    valid = len(infos)
    assert batch["weights"][:valid].min() == 1 and batch["weights"][valid:].max(initial=0) == 0
    seen += [info["index"] for info in infos]
    assert all(info["mask"].shape[:2] == info["size"] for info in infos)
  assert sorted(seen) == list(range(10))
