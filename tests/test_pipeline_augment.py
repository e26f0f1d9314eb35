"""Input pipeline (grain) and on-device augmentation."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from segjax.data.augment import make_augment_fn, random_flip, random_rot90
from segjax.data.pipeline import eval_batches, train_batches, train_dataset
from segjax.errors import SegjaxError


class _Source:
  """A random-access source of n examples whose image encodes the example index."""

  def __init__(self, n: int, size: int = 4):
    self.n, self.size = n, size

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    image = np.full((self.size, self.size, 1), i, np.uint8)
    return {"image": image, "mask": (image > 10).astype(np.uint8)}


def _ids(batch):
  return np.round(batch["image"][:, 0, 0, 0] * 255).astype(int).tolist()


def test_batch_of_step_is_pure_function_of_seed_and_step():
  ds = train_dataset(_Source(20), batch_size=4, seed=3)
  first = [_ids(b) for b, _ in zip(train_batches(ds, num_threads=2), range(12), strict=False)]
  resumed = [_ids(b) for b, _ in zip(train_batches(ds, start_step=7, num_threads=0), range(5), strict=False)]
  assert first[7:] == resumed
  # each epoch (5 steps) sees every example once, in a different order per epoch
  assert sorted(sum(first[:5], [])) == list(range(20))
  assert sorted(sum(first[5:10], [])) == list(range(20))
  assert sum(first[:5], []) != sum(first[5:10], [])
  other_seed = train_dataset(_Source(20), batch_size=4, seed=4)
  assert _ids(other_seed[0]) != first[0]


def test_process_shards_make_up_the_global_batch():
  whole = train_dataset(_Source(30), batch_size=6, seed=0)
  shards = [train_dataset(_Source(30), batch_size=6, seed=0, process_index=p, process_count=3) for p in range(3)]
  for step in (0, 4, 9):
    union = sorted(sum((_ids(s[step]) for s in shards), []))
    assert union == sorted(_ids(whole[step]))
    assert all(s[step]["image"].shape[0] == 2 for s in shards)


def test_eval_batches_cover_split_once_with_padding_weights():
  batches = list(eval_batches(_Source(10), batch_size=4))
  assert [b["image"].shape[0] for b in batches] == [4, 4, 4]
  weights = np.concatenate([b["weights"][:, 0, 0] for b in batches])
  np.testing.assert_array_equal(weights, [1] * 10 + [0] * 2)
  ids = sum((_ids(b) for b in batches), [])[:10]
  assert ids == list(range(10))


def _example():
  image = jnp.arange(5 * 5 * 2, dtype=jnp.float32).reshape(5, 5, 2)
  return {"image": image, "label": image[..., 0].astype(jnp.int32), "weights": image[..., 1]}


@pytest.mark.parametrize("op", [random_flip, random_rot90])
def test_augmentations_move_image_label_and_weights_together(op):
  seen = set()
  for seed in range(16):
    out = op(jax.random.PRNGKey(seed), _example())
    np.testing.assert_array_equal(out["label"], out["image"][..., 0].astype(jnp.int32))
    np.testing.assert_array_equal(out["weights"], out["image"][..., 1])
    seen.add(tuple(np.asarray(out["label"]).ravel()))
  assert len(seen) == 4  # 4 flip combinations / 4 rotations, all reached


def test_make_augment_fn_batches_and_validates_names():
  assert make_augment_fn(ml_collections.ConfigDict({"ops": []})) is None
  with pytest.raises(SegjaxError, match="unknown augmentation 'shear'"):
    make_augment_fn(ml_collections.ConfigDict({"ops": ["flip", "shear"]}))
  augment = jax.jit(make_augment_fn(ml_collections.ConfigDict({"ops": ["flip", "rot90"]})))
  batch = jax.tree_util.tree_map(lambda x: jnp.stack([x] * 8), _example())
  out = augment(jax.random.PRNGKey(0), batch)
  assert out["image"].shape == batch["image"].shape
  # examples get different keys, so not all 8 are transformed alike
  assert len({tuple(np.asarray(x).ravel()) for x in out["label"]}) > 1
  again = augment(jax.random.PRNGKey(0), batch)
  np.testing.assert_array_equal(out["image"], again["image"])


def test_rot90_on_non_square_images_is_a_clear_error():
  example = {"image": jnp.zeros((4, 6, 1)), "label": jnp.zeros((4, 6), jnp.int32)}
  with pytest.raises(SegjaxError, match="rot90 needs square images, got 4x6"):
    random_rot90(jax.random.PRNGKey(0), example)


def test_batch_size_not_divisible_by_processes_is_a_clear_error():
  with pytest.raises(SegjaxError, match="batch_size 5 .* not divisible by the 2 processes"):
    train_dataset(_Source(10), batch_size=5, seed=0, process_index=0, process_count=2)
