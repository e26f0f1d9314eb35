"""Image classification (config.task = 'classification'): metrics, loss, schedule, augmentations, data sets and
whole runs through experiments.train / experiments.predict, each against an independent computation."""

import csv
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from PIL import Image

from segjax.config import base_config, data_section
from segjax.data import augment, load_dataset
from segjax.data.classification import SHAPES, class_folder_splits, classification_inputs, shapes_splits
from segjax.errors import SegjaxError
from segjax.losses import softmax_cross_entropy
from segjax.metrics import summarize_classification, top_k_correct
from segjax.train.optim import create_optimizer, create_schedule

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- metrics and loss ------------------------------------------------------------------------------------------


def test_top_k_counts_match_a_numpy_loop():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(37, 10)).astype(np.float32)
  labels = rng.integers(0, 10, 37)
  weights = (rng.random(37) > 0.2).astype(np.float32)
  for k in (1, 3, 5, 10, 12):
    expected = sum(w for row, label, w in zip(logits, labels, weights, strict=True) if label in np.argsort(-row)[:k])
    got = float(top_k_correct(jnp.asarray(logits), jnp.asarray(labels), k, jnp.asarray(weights)))
    assert got == pytest.approx(expected), k
  assert float(top_k_correct(jnp.asarray(logits), jnp.asarray(labels), 10)) == 37.0


def test_split_metrics_from_summed_counts():
  confusion = np.array([[8, 2, 0], [1, 3, 0], [0, 0, 0]])  # class 2 has no example: no accuracy, not in the mean
  totals = {"loss_sum": 7.0, "weight_sum": 14.0, "top1": 11.0, "topk": 13.0, "confusion": confusion}
  metrics = summarize_classification(totals, ("a", "b", "c"), top_k=5)
  assert metrics["accuracy"] == pytest.approx(11 / 14) and metrics["error"] == pytest.approx(3 / 14)
  assert metrics["top5_accuracy"] == pytest.approx(13 / 14) and metrics["loss"] == pytest.approx(0.5)
  assert metrics["accuracy/a"] == pytest.approx(0.8) and metrics["accuracy/b"] == pytest.approx(0.75)
  assert math.isnan(metrics["accuracy/c"]) and metrics["mean_class_accuracy"] == pytest.approx(0.775)


def test_label_smoothing_is_the_cross_entropy_with_smoothed_targets():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(6, 4))
  labels = rng.integers(0, 4, 6)
  eps = 0.1
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  targets = np.full((6, 4), eps / 4)
  targets[np.arange(6), labels] += 1 - eps
  expected = float(np.mean(-(targets * log_p).sum(-1)))
  got = float(softmax_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), label_smoothing=eps))
  assert got == pytest.approx(expected, rel=1e-5)
  assert float(softmax_cross_entropy(jnp.asarray(logits), jnp.asarray(labels))) == pytest.approx(
    float(np.mean(-log_p[np.arange(6), labels])), rel=1e-5
  )


# --- the CIFAR recipe: schedule and weight decay --------------------------------------------------------------------


def test_cifar_schedule_divides_by_ten_at_32k_and_48k_and_resnet110_warms_up_at_0_01():
  from experiments.configs import cifar10_resnet

  schedule = create_schedule(cifar10_resnet.get_config("resnet20").optimizer, 64000)
  for step, lr in ((0, 0.1), (31999, 0.1), (32000, 0.01), (47999, 0.01), (48000, 0.001), (63999, 0.001)):
    assert float(schedule(step)) == pytest.approx(lr, rel=1e-6), step
  schedule = create_schedule(cifar10_resnet.get_config("resnet110").optimizer, 64000)
  for step, lr in ((0, 0.01), (399, 0.01), (400, 0.1), (31999, 0.1), (32000, 0.01), (48000, 0.001)):
    assert float(schedule(step)) == pytest.approx(lr, rel=1e-6), step


def test_sgd_weight_decay_adds_the_l2_gradient_to_the_kernels_only():
  config = base_config().optimizer
  config.update(name="sgd", momentum=0.9, nesterov=False, weight_decay=0.01, learning_rate=0.5, schedule="constant")
  config.grad_clip_norm = None
  tx = create_optimizer(config, 10)
  params = {"kernel": jnp.full((2, 3), 2.0), "bias": jnp.full((3,), 2.0)}
  grads = {"kernel": jnp.full((2, 3), 0.1), "bias": jnp.full((3,), 0.1)}
  updates, _ = tx.update(grads, tx.init(params), params)
  # first step of momentum SGD: -lr * (g + wd * w) for kernels, -lr * g for the bias
  np.testing.assert_allclose(updates["kernel"], -0.5 * (0.1 + 0.01 * 2.0), rtol=1e-6)
  np.testing.assert_allclose(updates["bias"], -0.5 * 0.1, rtol=1e-6)


# --- augmentations ---------------------------------------------------------------------------------------------


def _example(size=12, channels=3):
  image = jnp.asarray(np.random.default_rng(2).random((size, size, channels)), jnp.float32)
  return {"image": image, "label": jnp.int32(4)}


def test_pad_crop_is_a_crop_of_the_zero_padded_image_and_keeps_the_label():
  example = _example()
  padded = np.pad(np.asarray(example["image"]), ((4, 4), (4, 4), (0, 0)))
  offsets = set()
  for seed in range(40):
    key = jax.random.PRNGKey(seed)
    out = augment.random_pad_crop(key, example, padding=4)
    assert int(out["label"]) == 4
    np.testing.assert_array_equal(out["image"], augment.random_pad_crop(key, example, padding=4)["image"])
    found = [(t, c) for t in range(9) for c in range(9) if np.array_equal(padded[t : t + 12, c : c + 12], out["image"])]
    assert found, seed
    offsets.add(found[0])
  assert len(offsets) > 15  # offsets vary over the 81 positions


def test_hflip_flips_left_right_only_and_half_the_time():
  example = _example()
  flipped = 0
  for seed in range(40):
    out = augment.random_hflip(jax.random.PRNGKey(seed), example)
    same = np.array_equal(out["image"], example["image"])
    assert same or np.array_equal(out["image"], example["image"][:, ::-1])
    flipped += not same
    assert int(out["label"]) == 4
  assert 10 <= flipped <= 30


def test_random_resized_crop_box_stays_inside_and_samples_the_area_and_aspect_ranges():
  boxes = np.stack([np.asarray(augment.random_resized_crop_box(jax.random.PRNGKey(s), 100, 80)) for s in range(300)])
  top, left, h, w = boxes.T
  assert np.all(top >= 0) and np.all(left >= 0) and np.all(top + h <= 100) and np.all(left + w <= 80)
  area = h * w / 8000
  assert area.min() >= 0.07 and area.max() <= 1.0 and np.median(area) > 0.3
  ratio = w / h
  assert ratio.min() > 0.7 and ratio.max() < 1.4
  assert area.max() - area.min() > 0.6  # spread over the range, not one box


def test_random_resized_crop_resizes_the_box_and_is_the_identity_when_not_applied():
  example = _example(16)
  out = augment.random_resized_crop(jax.random.PRNGKey(0), example, size=8)
  assert out["image"].shape == (8, 8, 3) and int(out["label"]) == 4
  same = augment.random_resized_crop(jax.random.PRNGKey(0), example, size=16, probability=0.0)
  np.testing.assert_allclose(same["image"], example["image"], atol=1e-6)
  # a 2x down-scaling of the whole image samples between pixel pairs: the bilinear mean of each 2x2 block
  half = augment.random_resized_crop(jax.random.PRNGKey(0), example, size=8, probability=0.0)["image"]
  blocks = np.asarray(example["image"]).reshape(8, 2, 8, 2, 3).mean((1, 3))
  np.testing.assert_allclose(half, blocks, atol=1e-6)


def test_image_level_ops_refuse_per_pixel_labels():
  with pytest.raises(SegjaxError, match="pad_crop is for image classification"):
    augment.random_pad_crop(jax.random.PRNGKey(0), {"image": jnp.zeros((8, 8, 1)), "label": jnp.zeros((8, 8))})


def test_augmentation_of_a_batch_is_a_pure_function_of_the_key():
  fn = augment.make_augment_fn(ml_collections.ConfigDict({"ops": ("pad_crop", "hflip")}))
  batch = {"image": jnp.asarray(np.random.default_rng(3).random((4, 12, 12, 3)), jnp.float32), "label": jnp.arange(4)}
  a, b = fn(jax.random.PRNGKey(5), batch), fn(jax.random.PRNGKey(5), batch)
  np.testing.assert_array_equal(a["image"], b["image"])
  np.testing.assert_array_equal(a["label"], batch["label"])
  assert not np.array_equal(a["image"], fn(jax.random.PRNGKey(6), batch)["image"])


# --- data ------------------------------------------------------------------------------------------------------


def test_generated_shapes_are_balanced_deterministic_and_distinct():
  splits = shapes_splits(image_size=32, num_channels=3, counts={"train": 60, "validation": 12}, seed=0)
  labels = [e["label"] for e in splits["train"]]
  assert sorted(np.bincount(labels)) == [10] * len(SHAPES)
  again = shapes_splits(image_size=32, num_channels=3, counts={"train": 60, "validation": 12}, seed=0)
  np.testing.assert_array_equal(splits["train"][7]["image"], again["train"][7]["image"])
  assert not np.array_equal(splits["train"][0]["image"], splits["validation"][0]["image"])
  assert splits["train"][0]["image"].shape == (32, 32, 3) and splits["train"][0]["image"].dtype == np.uint8


def test_host_inputs_resize_the_shorter_side_and_take_the_centre():
  image = np.zeros((40, 80, 3), np.uint8)
  image[:, 20:60] = 255  # the centre 40x40 square is white
  out = classification_inputs({"image": image, "label": 3}, size=20)
  assert out["image"].shape == (20, 20, 3) and out["label"] == 3
  np.testing.assert_allclose(out["image"][:, 1:-1], 1.0)  # the centre square, resized (edges blend)
  standardised = classification_inputs({"image": image, "label": 3}, size=20, mean=(0.5,) * 3, std=(0.25,) * 3)
  np.testing.assert_allclose(standardised["image"], (out["image"] - 0.5) / 0.25, rtol=1e-6)


def _class_folder(root, counts, size=(10, 12)):
  for name, count in counts.items():
    os.makedirs(root / name, exist_ok=True)
    for i in range(count):
      Image.fromarray(np.full((*size, 3), (40 * i) % 256, np.uint8)).save(root / name / f"{i:02d}.png")


def test_class_folder_splits_per_class_and_labels_in_sorted_order(tmp_path):
  _class_folder(tmp_path, {"zebra": 10, "ant": 5})
  classes, splits = class_folder_splits(str(tmp_path), num_channels=3, validation_fraction=0.2, test_fraction=0.2)
  assert classes == ("ant", "zebra")
  counts = {s: np.bincount([label for _, label in src.items], minlength=2).tolist() for s, src in splits.items()}
  assert counts == {"train": [3, 6], "validation": [1, 2], "test": [1, 2]}
  every = sorted(p for src in splits.values() for p, _ in src.items)
  assert len(every) == 15 and len(set(every)) == 15  # each file in exactly one split
  example = splits["train"][0]
  assert example["image"].shape == (10, 12, 3) and example["label"] == 0
  # ready-made split folders
  _class_folder(tmp_path / "ready" / "train", {"a": 2, "b": 2})
  _class_folder(tmp_path / "ready" / "val", {"a": 1, "b": 1})
  classes, splits = class_folder_splits(
    str(tmp_path / "ready"), num_channels=3, validation_fraction=0.1, test_fraction=0
  )
  assert classes == ("a", "b") and {s: len(v) for s, v in splits.items()} == {"train": 4, "validation": 2}


@pytest.mark.parametrize(
  "make, message",
  [
    (lambda root: os.makedirs(root), "has no class sub-folders"),
    (lambda root: (_class_folder(root, {"a": 3}), os.makedirs(root / "b")), "class folder '.*b' holds no images"),
    (
      lambda root: (_class_folder(root, {"a": 3}), (root / "a" / "notes.txt").write_text("x")),
      "notes.txt' is not an image",
    ),
  ],
)
def test_bad_class_folders_give_one_line_errors(tmp_path, make, message):
  root = tmp_path / "data"
  make(root)
  config = data_section("image_folder")
  config.root = str(root)
  with pytest.raises(SegjaxError, match=message) as error:
    load_dataset(config)
  assert "\n" not in str(error.value)


def _tiny(module: str) -> ml_collections.ConfigDict:
  import importlib

  return importlib.import_module(f"experiments.configs.{module}").get_config("tiny")


# --- whole runs ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_classifier(tmp_path_factory):
  from segjax.train.loop import train_and_evaluate

  workdir = str(tmp_path_factory.mktemp("classifier"))
  config = _tiny("cifar10_resnet")
  summary = train_and_evaluate(config, workdir)
  return config, workdir, summary


def test_a_resnet20_run_on_generated_shapes_lowers_the_loss_and_beats_chance(trained_classifier):
  import json

  config, workdir, summary = trained_classifier
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    train = [r for r in map(json.loads, f) if r["split"] == "train"]
  assert train[-1]["loss"] < 0.8 * train[0]["loss"]
  assert "accuracy" in train[-1] and "pixel_accuracy" not in train[-1]
  chance = 1 / len(SHAPES)
  assert summary["validation"]["accuracy"] > chance + 0.15 and summary["test"]["accuracy"] > chance + 0.15
  assert summary["validation"]["top5_accuracy"] >= summary["validation"]["accuracy"]
  for name in ("curves.png", "samples.png", "summary.json"):
    assert os.path.isfile(os.path.join(workdir, name))


def test_a_classifier_checkpoint_predicts_a_folder_to_a_csv(trained_classifier, tmp_path):
  from segjax.inference import load_predictor

  _, workdir, _ = trained_classifier
  images = shapes_splits(image_size=40, num_channels=3, counts={"x": 4}, seed=9)["x"]  # another size: resized
  os.makedirs(tmp_path / "in")
  for e in images:
    Image.fromarray(e["image"]).save(tmp_path / "in" / f"{e['name']}.png")
  result = subprocess.run(
    [sys.executable, "-m", "experiments.predict", f"--workdir={workdir}", f"--input={tmp_path / 'in'}",
     f"--output={tmp_path / 'out'}", "--top_k=3"],
    cwd=REPO, capture_output=True, text=True, timeout=600,
  )  # fmt: skip
  assert result.returncode == 0, result.stderr[-2000:]
  with open(tmp_path / "out" / "predictions.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["file"] for r in rows] == [f"{e['name']}.png" for e in images]
  predictor = load_predictor(workdir)
  for row, e in zip(rows, images, strict=True):
    probabilities = predictor.predict(e["image"])
    order = np.argsort(-probabilities)[:3]
    assert [row[f"label_{i + 1}"] for i in range(3)] == [SHAPES[j] for j in order]
    np.testing.assert_allclose([float(row[f"probability_{i + 1}"]) for i in range(3)], probabilities[order], atol=1e-5)


def test_a_segmentation_model_or_data_set_is_refused_for_classification():
  from segjax.train.setup import build

  config = _tiny("cifar10_resnet")
  config.model.name = "unet"
  with pytest.raises(SegjaxError, match="it is a segmenter"):
    build(config).initial_state()
  config = _tiny("cifar10_resnet")
  config.task = "segmentation"
  with pytest.raises(SegjaxError, match="one label per image, not per pixel"):
    build(config)


@pytest.mark.parametrize("module", ["cifar10_resnet", "imagenet_resnet"])
def test_the_paper_configs_train_a_few_steps_on_mock_tfds_data(module, tmp_path):
  import importlib

  import tensorflow_datasets as tfds

  from segjax.train.loop import train_and_evaluate

  config = importlib.import_module(f"experiments.configs.{module}").get_config()
  config.data.tfds_data_dir = str(tmp_path / "tfds")  # nothing there: the mock serves the examples
  config.model.name = "resnet20_cifar" if module == "cifar10_resnet" else "resnet18"
  if module == "imagenet_resnet":  # the recipe at a CPU's size: 64 px crops of 72 px squares, width 8
    config.data.update(image_size=64, load_size=72)
    config.augment.random_resized_crop.size = 64
    config.model.kwargs = ml_collections.ConfigDict({"width": 8})
    config.half_precision = False
  config.update(batch_size=8, eval_batch_size=8, num_train_steps=2, log_every_steps=1, eval_every_steps=2)
  config.checkpoint_every_steps = 2
  config.num_sample_images = 2
  with tfds.testing.mock_data(num_examples=16):
    summary = train_and_evaluate(config, str(tmp_path / "run"))
  assert summary["steps"] == 2 and 0.0 <= summary["validation"]["accuracy"] <= 1.0
  assert np.isfinite(summary["validation"]["loss"])


def test_fine_tuning_from_torchvision_weights_replaces_only_the_head(tmp_path):
  from segjax import convert
  from segjax.train.classification import normalisation
  from segjax.train.setup import build

  config = _tiny("imagenet_resnet")
  config.model.kwargs = ml_collections.ConfigDict({"width": 4})
  fresh = build(config).initial_state()
  # a torchvision state dict of the same network with a 1000-way head
  template = jax.device_get({"params": fresh.params, "batch_stats": fresh.batch_stats})
  template["params"]["fc"] = {"kernel": np.zeros((32, 1000), np.float32), "bias": np.zeros(1000, np.float32)}
  # torchvision's names and layouts (O, I, kh, kw) / (O, I), random values
  rng = np.random.default_rng(0)
  state_dict = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(template)[0]:
    shape = np.shape(leaf)
    shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
    state_dict[convert._torch_name(tuple(p.key for p in path))] = rng.normal(size=shape).astype(np.float32)
  np.savez(tmp_path / "weights.npz", **state_dict)
  config.model.init_from = str(tmp_path / "weights.npz")
  assert normalisation(config)[0] == (0.485, 0.456, 0.406)  # ImageNet statistics with imported weights
  tuned = build(config).initial_state()
  conv = state_dict["conv1.weight"].transpose(2, 3, 1, 0)
  np.testing.assert_array_equal(tuned.params["conv1"]["kernel"], conv)
  np.testing.assert_array_equal(tuned.batch_stats["bn1"]["mean"], state_dict["bn1.running_mean"])
  # the 6-class head is the fresh one (the file's 1000-way head cannot be used), everything else the file's
  np.testing.assert_array_equal(tuned.params["fc"]["kernel"], fresh.params["fc"]["kernel"])
  assert tuned.params["fc"]["kernel"].shape == (32, len(SHAPES))
  changed = jax.tree_util.tree_map(lambda a, b: not np.array_equal(a, b), tuned.params, fresh.params)
  assert {k for k, v in changed.items() if not any(jax.tree_util.tree_leaves(v))} == {"fc"}
  assert optax.global_norm(tuned.params) != optax.global_norm(fresh.params)


def test_a_classifier_trains_under_pmap_with_ema_in_bfloat16_and_predicts(tmp_path):
  from segjax.inference import load_predictor
  from segjax.train.loop import train_and_evaluate

  config = _tiny("cifar10_resnet")
  config.update(parallelism="pmap", ema_decay=0.9, half_precision=True, num_train_steps=4, log_every_steps=2)
  config.data.update(num_train=64, num_validation=16, num_test=16)
  config.eval_every_steps = config.checkpoint_every_steps = 4
  summary = train_and_evaluate(config, str(tmp_path))
  assert summary["steps"] == 4 and np.isfinite(summary["validation"]["loss"])
  predictor = load_predictor(str(tmp_path))
  assert predictor.config.half_precision and predictor.state.params["conv1"]["kernel"].dtype == jnp.float32
  probabilities = predictor.predict(np.zeros((32, 32, 3), np.uint8))
  assert probabilities.shape == (len(SHAPES),) and probabilities.sum() == pytest.approx(1.0, abs=1e-5)
