"""The file-based data sets (isbi2012, dsb2018, segmentation_folder) and oxford_iiit_pet through a config.

Tests on the real ISBI 2012 and DSB 2018 files skip when ``../shared/data`` (or ``$SEGJAX_DATA``) does not hold them.
"""

import os

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from segjax.data import data_root, load_dataset
from segjax.data.features import IGNORE_LABEL
from segjax.data.folder import assign_splits
from segjax.errors import SegjaxError

ISBI = os.path.join(data_root(), "isbi2012")
DSB = os.path.join(data_root(), "dsb2018")
needs_isbi = pytest.mark.skipif(not os.path.isdir(ISBI), reason=f"ISBI 2012 data not at {ISBI}")
needs_dsb = pytest.mark.skipif(not os.path.isdir(DSB), reason=f"DSB 2018 data not at {DSB}")


def _name(example) -> str:
  name = example["name"]
  return name.decode() if isinstance(name, bytes) else str(name)


def _config(**data) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(data)


@needs_isbi
def test_isbi2012_splits_classes_and_border_weights(tmp_path):
  dataset = load_dataset(_config(name="isbi2012", tfds_data_dir=str(tmp_path), validation_slices=(3, 7)))
  assert (dataset.num_classes, dataset.num_channels) == (2, 1)
  train, validation = dataset.split("train"), dataset.split("validation")
  assert (len(train), len(validation)) == (28, 2)
  example = validation[1]
  assert _name(example) == "7"
  label = np.asarray(Image.open(os.path.join(ISBI, "train", "label", "7.png")))
  np.testing.assert_array_equal(example["mask"][..., 0], (label == 0).astype(np.uint8))  # class 1 = membrane
  image = np.asarray(Image.open(os.path.join(ISBI, "train", "image", "7.png")))
  np.testing.assert_array_equal(example["image"][..., 0], image)
  # instances are the cell interiors; the border term lives on membrane pixels between two cells
  assert example["instances"].max() > 10
  border = example["border_weights"]
  assert border.max() > 0.5 and np.all(border[example["mask"][..., 0] == 0] == 0)


def _dsb_subset(tmp_path, count=12):
  ids = sorted(os.path.splitext(f)[0] for f in os.listdir(os.path.join(DSB, "images")))[:count]
  root = tmp_path / "dsb"
  for kind in ("images", "instances"):
    (root / kind).mkdir(parents=True)
    for i in ids:
      os.symlink(os.path.join(DSB, kind, f"{i}.png"), root / kind / f"{i}.png")
  return root, ids


@needs_dsb
def test_dsb2018_split_by_sorted_position_with_instances(tmp_path):
  root, ids = _dsb_subset(tmp_path)
  dataset = load_dataset(_config(name="dsb2018", manual_dir=str(root), tfds_data_dir=str(tmp_path / "tfds")))
  assert not dataset.same_size and dataset.has_instances
  names = {split: [_name(e) for e in dataset.split(split)] for split in ("train", "validation", "test")}
  assert names["validation"] == [ids[0], ids[10]] and names["test"] == [ids[5]]
  assert len(names["train"]) == 9
  example = dataset.split("validation")[0]
  instances = np.asarray(Image.open(os.path.join(DSB, "instances", f"{ids[0]}.png"))).astype(np.int64)
  np.testing.assert_array_equal(example["instances"][..., 0], instances)
  np.testing.assert_array_equal(example["mask"][..., 0], instances > 0)
  assert example["image"].shape == (*instances.shape, 3)
  assert example["border_weights"].shape == instances.shape


@needs_dsb
def test_dsb2018_unpaired_or_missized_files_are_named_and_nothing_is_prepared(tmp_path):
  root, ids = _dsb_subset(tmp_path, count=3)
  os.remove(root / "instances" / f"{ids[1]}.png")
  config = _config(name="dsb2018", manual_dir=str(root), tfds_data_dir=str(tmp_path / "tfds"))
  with pytest.raises(SegjaxError, match=f"images/{ids[1]}.png' has no instance map named '{ids[1]}'"):
    load_dataset(config)
  Image.fromarray(np.zeros((5, 5), np.uint16)).save(root / "instances" / f"{ids[1]}.png")
  with pytest.raises(SegjaxError, match=f"instances/{ids[1]}.png' is \\(5, 5\\) but its image is"):
    load_dataset(config)
  assert not list(tmp_path.rglob("dataset_info.json"))


def test_missing_data_folder_is_a_clear_error(tmp_path):
  with pytest.raises(SegjaxError, match="data folder .* does not exist; set data.manual_dir"):
    load_dataset(_config(name="isbi2012", manual_dir=str(tmp_path / "nope")))


def _write_folder(root, sizes, *, sixteen_bit=False, rgb=False, mask_value=255):
  (root / "images").mkdir(parents=True)
  (root / "masks").mkdir()
  rng = np.random.default_rng(0)
  for i, (h, w) in enumerate(sizes):
    if sixteen_bit:
      image = rng.integers(0, 65535, (h, w), dtype=np.uint16)
      Image.fromarray(image).save(root / "images" / f"img{i}.tif")
    elif rgb:
      Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"img{i}.jpg")
    else:
      Image.fromarray(rng.integers(0, 255, (h, w), dtype=np.uint8)).save(root / "images" / f"img{i}.png")
    mask = np.zeros((h, w), np.uint8)
    mask[: h // 2] = mask_value
    mask[-1, -1] = 7  # an "unlabelled" value
    Image.fromarray(mask).save(root / "masks" / f"img{i}.png")


def _folder_config(root, tmp_path, **extra):
  return _config(
    name="segmentation_folder",
    image_dir=str(root / "images"),
    mask_dir=str(root / "masks"),
    mask_values={"0": 0, "255": 1},
    ignore_value=7,
    num_classes=2,
    num_channels=1,
    tfds_data_dir=str(tmp_path / "tfds"),
    **extra,
  )


def test_segmentation_folder_maps_values_keeps_16_bit_and_mixed_sizes(tmp_path):
  root = tmp_path / "data"
  _write_folder(root, [(20, 30), (24, 24), (31, 17), (20, 30), (16, 16)], sixteen_bit=True)
  dataset = load_dataset(_folder_config(root, tmp_path, validation_fraction=0.4))
  assert not dataset.same_size and dataset.num_classes == 2
  assert [len(dataset.split(s)) for s in ("train", "validation")] == [3, 2]
  example = dataset.split("validation")[0]
  name = _name(example)
  original = np.asarray(Image.open(root / "images" / f"{name}.tif"))
  np.testing.assert_array_equal(example["image"][..., 0], original)  # 16-bit kept exactly
  assert example["image"].dtype == np.uint16
  mask = example["mask"][..., 0]
  assert mask[0, 0] == 1 and mask[-2, 0] == 0 and mask[-1, -1] == IGNORE_LABEL


def test_segmentation_folder_with_instances_stores_the_border_term(tmp_path):
  root = tmp_path / "data"
  _write_folder(root, [(16, 20)] * 3)
  (root / "instances").mkdir()
  for i in range(3):
    instances = np.zeros((16, 20), np.uint16)
    instances[2:7, 2:9], instances[2:7, 11:18] = 1, 300  # two objects 2 px apart
    Image.fromarray(instances).save(root / "instances" / f"img{i}.png")
  dataset = load_dataset(_folder_config(root, tmp_path, instance_dir=str(root / "instances")))
  assert dataset.has_instances
  example = dataset.split("train")[0]
  assert example["instances"].max() == 300
  gap = example["border_weights"][4, 9]  # between the objects: d1 = 1, d2 = 2
  assert gap == pytest.approx(np.exp(-((1 + 2) ** 2) / (2 * 5.0**2)), rel=1e-5)


def test_segmentation_folder_split_files_and_rgb_jpeg(tmp_path):
  root = tmp_path / "data"
  _write_folder(root, [(12, 12)] * 4, rgb=True)
  (tmp_path / "val.txt").write_text("img2.jpg\nimg0\n")
  (tmp_path / "train.txt").write_text("img1\nimg3\n")
  config = _folder_config(
    root, tmp_path, split_files={"train": str(tmp_path / "train.txt"), "validation": str(tmp_path / "val.txt")}
  )
  config.num_channels = 3
  dataset = load_dataset(config)
  assert [_name(e) for e in dataset.split("validation")] == ["img2", "img0"]
  assert dataset.split("train")[0]["image"].shape == (12, 12, 3)


@pytest.mark.parametrize(
  "breakage, message",
  [
    (lambda root: os.remove(root / "masks" / "img1.png"), "img1.png' has no mask named 'img1'"),
    (
      lambda root: Image.fromarray(np.zeros((5, 5), np.uint8)).save(root / "masks" / "img1.png"),
      "masks/img1.png' is \\(5, 5\\) but its image is \\(10, 10\\)",
    ),
    (
      lambda root: Image.fromarray(np.full((10, 10), 128, np.uint8)).save(root / "masks" / "img1.png"),
      "masks/img1.png' holds value 128, which data.mask_values does not map",
    ),
    (lambda root: (root / "images" / "img1.png").write_bytes(b"not a png"), "images/img1.png' is not a readable"),
    (lambda root: Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "masks" / "extra.png"), "extra.png' has no"),
  ],
)
def test_segmentation_folder_bad_files_are_named_and_nothing_half_prepared_remains(tmp_path, breakage, message):
  root = tmp_path / "data"
  _write_folder(root, [(10, 10)] * 3)
  breakage(root)
  with pytest.raises(SegjaxError, match=message):
    load_dataset(_folder_config(root, tmp_path))
  assert not list(tmp_path.rglob("dataset_info.json"))


def test_segmentation_folder_empty_folder_is_a_clear_error(tmp_path):
  (tmp_path / "images").mkdir()
  (tmp_path / "masks").mkdir()
  config = _config(name="segmentation_folder", image_dir=str(tmp_path / "images"), mask_dir=str(tmp_path / "masks"))
  with pytest.raises(SegjaxError, match="holds no images"):
    load_dataset(config)


def test_segmentation_folder_changed_files_are_prepared_again(tmp_path):
  root = tmp_path / "data"
  _write_folder(root, [(10, 10)] * 3)
  first = load_dataset(_folder_config(root, tmp_path, validation_fraction=0.34))
  Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "masks" / "img2.png")
  os.utime(root / "masks" / "img2.png", (1, 1))
  second = load_dataset(_folder_config(root, tmp_path, validation_fraction=0.34))
  assert _name(first.split("validation")[0]) == "img2"
  assert first.split("validation")[0]["mask"].max() == IGNORE_LABEL
  assert second.split("validation")[0]["mask"].max() == 0


def _fake_pets(self, split, **kwargs):
  del self, kwargs
  rng = np.random.default_rng(len(split))
  examples = []
  for i in range(3):
    h, w = 20 + i, 30 - i
    trimap = rng.integers(1, 4, (h, w, 1), dtype=np.uint8)
    examples.append(
      {
        "image": rng.integers(0, 255, (h, w, 3), dtype=np.uint8),
        "segmentation_mask": trimap,
        "file_name": f"{split}_{i}.jpg",
      }
    )
  return examples


@pytest.mark.parametrize("border, expected", [("ignore", IGNORE_LABEL), ("pet", 1), ("background", 0)])
def test_oxford_iiit_pet_trimap_becomes_classes(border, expected):
  config = _config(
    name="oxford_iiit_pet",
    trimap_border=border,
    train_split="train[:90%]",
    eval_split="train[90%:]",
    test_split="test",
  )
  with tfds.testing.mock_data(num_examples=3, as_data_source_fn=_fake_pets):
    dataset = load_dataset(config)
    assert set(dataset.splits) == {"train[:90%]", "train[90%:]", "test"}
    example = dataset.split("train[:90%]")[1]
    trimap = _fake_pets(None, "train[:90%]")[1]["segmentation_mask"]
  np.testing.assert_array_equal(example["mask"][trimap == 1], 1)
  np.testing.assert_array_equal(example["mask"][trimap == 2], 0)
  np.testing.assert_array_equal(example["mask"][trimap == 3], expected)
  assert example["image"].shape[:2] == example["mask"].shape[:2]


def test_oxford_iiit_pet_unknown_trimap_border_is_a_clear_error():
  with pytest.raises(SegjaxError, match="unknown data.trimap_border 'edge'"):
    load_dataset(_config(name="oxford_iiit_pet", trimap_border="edge"))


@pytest.mark.parametrize(
  "n, validation, test, sizes",
  [
    (20, 0.1, 0.2, (14, 2, 4)),  # the fractions no longer compete: 4 test images, not 2
    (6, 0.1, 0.0, (5, 1, 0)),  # round(0.6) = 1: a positive fraction never makes an empty split
    (7, 0.25, 0.25, (3, 2, 2)),
    (10, 0.0, 0.3, (7, 0, 3)),
    (1000, 0.1, 0.05, (850, 100, 50)),
  ],
)
def test_fraction_splits_have_round_n_times_fraction_images_spread_over_the_names(n, validation, test, sizes):
  stems = [f"im{i:04d}" for i in range(n)]
  splits = assign_splits(stems[::-1], split_files=None, validation_fraction=validation, test_fraction=test)
  assert tuple(len(splits[s]) for s in ("train", "validation", "test")) == sizes
  assert sorted(splits["train"] + splits["validation"] + splits["test"]) == stems  # a partition
  assert splits == assign_splits(stems, split_files=None, validation_fraction=validation, test_fraction=test)
  for split in ("validation", "test"):  # spread: consecutive picks at most ceil(n / count) + 1 names apart
    positions = [stems.index(s) for s in splits[split]]
    if len(positions) > 1:
      assert max(np.diff(positions)) <= -(-n // len(positions)) + 1


def test_fractions_that_leave_no_training_image_name_the_keys():
  with pytest.raises(SegjaxError, match="data.validation_fraction=0.5 and data.test_fraction=0.4 of 2 images"):
    assign_splits(["a", "b"], split_files=None, validation_fraction=0.5, test_fraction=0.4)


def test_folder_dict_keys_are_settable_on_the_command_line(tmp_path):
  import subprocess
  import sys

  root = tmp_path / "data"
  _write_folder(root, [(10, 12)] * 4)
  (tmp_path / "t.txt").write_text("img0\nimg1.png\nimg2\n")
  (tmp_path / "v.txt").write_text("img3\n")
  script = tmp_path / "parse.py"
  script.write_text(
    "from absl import app\n"
    "from ml_collections import config_flags\n"
    "from segjax.data.folder import folder_config\n"
    "CONFIG = config_flags.DEFINE_config_file('config')\n"
    "def main(argv):\n"
    "  built = folder_config(CONFIG.value.data)\n"
    "  print(built.mask_values, dict(built.splits))\n"
    "app.run(main)\n"
  )
  args = [
    sys.executable,
    str(script),
    "--config=experiments/configs/folder_unet.py",
    f"--config.data.image_dir={root / 'images'}",
    f"--config.data.mask_dir={root / 'masks'}",
    f"--config.data.split_files=train:{tmp_path / 't.txt'},validation:{tmp_path / 'v.txt'}",
  ]
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "PYTHONPATH": repo}
  result = subprocess.run(
    [*args, "--config.data.mask_values=0:0, 255:1,7:1"], capture_output=True, text=True, cwd=repo, env=env
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert "((0, 0), (7, 1), (255, 1))" in result.stdout
  assert "'train': ('img0', 'img1', 'img2'), 'validation': ('img3',)" in result.stdout
  bad = subprocess.run(
    [*args, "--config.data.mask_values=0-0,255:1"], capture_output=True, text=True, cwd=repo, env=env
  )
  assert "config key data.mask_values must be pairs like 'a:b,c:d'" in bad.stderr


def test_k_folds_partition_the_non_test_images_and_are_stable():
  stems = [f"s{i:02d}" for i in range(23)]
  folds = [
    assign_splits(stems, split_files=None, validation_fraction=0.1, test_fraction=0.1, num_folds=5, fold=k)
    for k in range(5)
  ]
  test = folds[0]["test"]
  assert len(test) == 2 and all(f["test"] == test for f in folds)  # the test images are held out of every fold
  validations = [set(f["validation"]) for f in folds]
  assert sorted(len(v) for v in validations) == [4, 4, 4, 4, 5]
  assert set().union(*validations) == set(stems) - set(test) and sum(map(len, validations)) == 21  # a partition
  for f, v in zip(folds, validations, strict=True):
    assert set(f["train"]) == set(stems) - set(test) - v
  again = assign_splits(stems[::-1], split_files=None, validation_fraction=0.3, test_fraction=0.1, num_folds=5, fold=2)
  assert again == folds[2]  # stable: neither the listing order nor validation_fraction changes a fold
  assert folds[0]["validation"] != tuple(sorted(stems))[: len(folds[0]["validation"])]  # dealt, not the first names


@pytest.mark.parametrize(
  "kwargs, message",
  [
    ({"num_folds": 1}, "data.num_folds must be 0 \\(no folds\\) or an integer >= 2"),
    ({"num_folds": 5, "fold": 5}, "data.fold must be one of 0..4"),
    ({"num_folds": 9}, "data.num_folds=9 needs at least 9 images besides the 0 test images; the folder has 8"),
    ({"num_folds": 3, "split_files": {"train": "t.txt"}}, "unset data.split_files or data.num_folds"),
  ],
)
def test_bad_fold_settings_name_the_key(kwargs, message):
  args = {"split_files": None, "validation_fraction": 0.1, "test_fraction": 0.0, **kwargs}
  with pytest.raises(SegjaxError, match=message):
    assign_splits([f"s{i}" for i in range(8)], **args)


def test_binary_masks_saved_as_0_and_255_need_no_mask_values(tmp_path):
  from segjax.data.folder import folder_config

  root = tmp_path / "data"
  _write_folder(root, [(12, 10)] * 3)  # masks hold 0, 255 and one "unlabelled" 7
  base = {"name": "segmentation_folder", "image_dir": str(root / "images"), "mask_dir": str(root / "masks")}
  assert folder_config({**base, "ignore_value": 7}).mask_values == ((0, 0), (255, 1))
  assert folder_config(base).mask_values == ()  # 7 is neither 0 nor 255: values stay class ids, 7 is refused later
  assert folder_config({**base, "ignore_value": 7, "num_classes": 3}).mask_values == ()
  dataset = load_dataset(_config(**base, ignore_value=7, validation_fraction=0.34, tfds_data_dir=str(tmp_path / "t")))
  mask = dataset.split("train")[0]["mask"][..., 0]
  assert set(np.unique(mask)) == {0, 1, IGNORE_LABEL} and mask[0, 0] == 1


def test_per_split_folders_are_read_without_lists_or_links(tmp_path):
  root = tmp_path / "camvid"
  rng = np.random.default_rng(3)
  written = {}
  for folder, count in (("train", 3), ("val", 2)):  # the same names in both splits, different pixels
    for kind in (folder, folder + "annot"):
      (root / kind).mkdir(parents=True)
    for i in range(count):
      image = rng.integers(0, 255, (9, 11), dtype=np.uint8)
      Image.fromarray(image).save(root / folder / f"f{i}.png")
      Image.fromarray((image > 128).astype(np.uint8)).save(root / (folder + "annot") / f"f{i}.png")
      written[folder, f"f{i}"] = image
  config = _config(
    name="segmentation_folder",
    image_dir=str(root / "{split}"),
    mask_dir=str(root / "{split}annot"),
    tfds_data_dir=str(tmp_path / "tfds"),
  )
  dataset = load_dataset(config)
  assert (len(dataset.split("train")), len(dataset.split("validation"))) == (3, 2)
  assert "test" not in dataset.splits
  for split, folder in (("train", "train"), ("validation", "val")):
    for example in dataset.split(split):
      image = written[folder, _name(example)]
      np.testing.assert_array_equal(example["image"][..., 0], image)
      np.testing.assert_array_equal(example["mask"][..., 0], image > 128)
  with pytest.raises(SegjaxError, match="so data.mask_dir must too"):
    load_dataset(_config(**{**config.to_dict(), "mask_dir": str(root / "trainannot")}))
  with pytest.raises(SegjaxError, match="it needs at least a train folder"):
    load_dataset(_config(**{**config.to_dict(), "image_dir": str(root / "x{split}")}))
