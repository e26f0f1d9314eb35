"""experiments.plan: the fingerprint of a generated folder, the planning rules on edge cases, the budget, and a
written plan that trains."""

import os

import numpy as np
import pytest
from PIL import Image

from segjax import plan
from segjax.errors import SegjaxError
from tests.test_experiments import _run


def _write(root, sizes, *, rgb=False, touching=True):
  """Images with two 4x6 objects (mask value 255): sharing an edge with ``touching``, apart without."""
  for kind in ("images", "masks", "instances"):
    (root / kind).mkdir(parents=True, exist_ok=True)
  for i, (h, w) in enumerate(sizes):
    instances = np.zeros((h, w), np.uint16)
    instances[2:6, 2:8] = 1
    if touching:
      instances[6:10, 2:8] = 2  # touches object 1 along a row
    else:
      instances[12:16, 2:8] = 2
    mask = np.where(instances > 0, 255, 0).astype(np.uint8)
    image = (instances > 0).astype(np.uint8) * 200 + 20
    if rgb:
      image = np.stack([image, image // 2, image // 4], -1)
    Image.fromarray(image).save(root / "images" / f"im{i}.png")
    Image.fromarray(mask).save(root / "masks" / f"im{i}.png")
    Image.fromarray(instances).save(root / "instances" / f"im{i}.png")


def test_the_fingerprint_of_a_generated_folder_is_what_was_written(tmp_path):
  _write(tmp_path, [(20, 30), (24, 24), (40, 20)])
  fp = plan.fingerprint_folder(str(tmp_path / "images"), str(tmp_path / "masks"), str(tmp_path / "instances"))
  assert fp["num_images"] == 3 and fp["channels"] == 1 and fp["bit_depth"] == 8
  assert fp["height"] == {"min": 20, "median": 24.0, "max": 40}
  assert fp["width"] == {"min": 20, "median": 24.0, "max": 30}
  assert fp["mask_values"] == [0, 255]
  total = 20 * 30 + 24 * 24 + 40 * 20
  assert fp["value_frequencies"]["255"] == pytest.approx(3 * 48 / total)
  foreground = fp["foreground_intensity"][0]
  assert foreground["mean"] == pytest.approx(220 / 255) and foreground["std"] < 1e-6
  assert fp["intensity"][0]["p0.5"] == pytest.approx(20 / 255)
  assert fp["objects"]["per_image_mean"] == 2 and fp["objects"]["size_median"] == 24
  assert fp["objects"]["touching_fraction"] == 1.0
  _write(tmp_path / "apart", [(20, 20)], touching=False, rgb=True)
  apart = plan.fingerprint_folder(*(str(tmp_path / "apart" / k) for k in ("images", "masks", "instances")))
  assert apart["objects"]["touching_fraction"] == 0.0 and apart["channels"] == 3
  assert apart["intensity"][2]["p99.5"] == pytest.approx((220 // 4) / 255, abs=1e-3)


def test_touching_objects_counts_4_adjacency_only():
  ids = np.zeros((6, 6), np.int32)
  ids[0, 0], ids[1, 1] = 1, 2  # diagonal: not touching
  ids[4, 2], ids[4, 3], ids[5, 5] = 3, 4, 5
  assert plan.touching_objects(ids) == (5, 2)


def _fingerprint(**overrides):
  fp = {
    "num_images": 10,
    "height": {"min": 512, "median": 512.0, "max": 512},
    "width": {"min": 512, "median": 512.0, "max": 512},
    "channels": 1,
    "bit_depth": 8,
    "mask_values": [0, 1],
    "value_frequencies": {"0": 0.7, "1": 0.3},
    "intensity": [{"mean": 0.5, "std": 0.2, "p0.5": 0.02, "p99.5": 0.98}],
  }
  fp.update(overrides)
  return fp


def _rows(fp, **kwargs):
  return {row.key: row.value for row in plan.plan_settings(fp, **kwargs)}


def test_plan_rules_on_edge_cases():
  cpu = _rows(_fingerprint())
  assert (cpu["data.crop_size"], cpu["model.kwargs.depth"], cpu["model.kwargs.base_width"]) == (256, 5, 16)
  assert cpu["loss"] == "softmax_cross_entropy" and "data.mask_values" not in cpu and cpu["data.num_classes"] == 2
  assert "elastic" in cpu["augment.ops"] and "instances.targets" not in cpu
  large = _fingerprint(height={"min": 3000, "median": 4000.0, "max": 5000})
  gpu = _rows(large, platform="gpu")
  assert (gpu["data.crop_size"], gpu["model.kwargs.depth"], gpu["model.kwargs.base_width"]) == (512, 5, 32)
  small = {"min": 20, "median": 24.0, "max": 30}
  tiny = _rows(_fingerprint(height=small, width=small))
  assert (tiny["data.crop_size"], tiny["model.kwargs.depth"], tiny["data.eval_size_multiple"]) == (32, 2, 4)
  rare = _rows(_fingerprint(mask_values=[0, 255], value_frequencies={"0": 0.98, "255": 0.02}, channels=3))
  assert rare["loss"] == "dice_cross_entropy" and rare["data.mask_values"] == "0:0,255:1"
  assert rare["data.num_channels"] == 3 and "elastic" not in rare["augment.ops"]
  odd = _rows(_fingerprint(mask_values=[0, 3, 7], value_frequencies={"0": 0.5, "3": 0.3, "7": 0.2}, bit_depth=16))
  assert odd["data.mask_values"] == "0:0,3:1,7:2" and odd["data.num_classes"] == 3
  objects = {"per_image_mean": 30, "size_median": 200, "size_p5": 40, "size_p95": 600, "touching_fraction": 0.2}
  cells = _rows(_fingerprint(objects=objects))
  assert (cells["instances.targets"], cells["instances.method"], cells["instances.min_size"]) == (
    "contour",
    "watershed",
    20,
  )
  assert cells["evaluators"] == ("instances",)
  apart = _rows(_fingerprint(objects={**objects, "touching_fraction": 0.01}))
  assert "instances.targets" not in apart
  assert cpu["data.normalization"] == "scale" and "data.intensity_range" not in cpu
  dim = _rows(_fingerprint(bit_depth=16, intensity=[{"mean": 0.05, "std": 0.01, "p0.5": 0.012, "p99.5": 0.094}]))
  assert dim["data.normalization"] == "percentile" and dim["data.intensity_range"] == (0.012, 0.094)


def test_the_number_of_steps_scales_with_the_budget():
  one = _rows(_fingerprint(), seconds_per_step=2.0, first_step_seconds=20.0, budget_seconds=1800)
  two = _rows(_fingerprint(), seconds_per_step=2.0, first_step_seconds=20.0, budget_seconds=3600)
  assert one["num_train_steps"] == int((0.9 * 1800 - 20) / 2.0) == 800
  assert two["num_train_steps"] == 1610
  assert one["optimizer.warmup_steps"] == 40 and two["optimizer.warmup_steps"] == 50
  assert one["eval_every_steps"] == 200 and one["checkpoint_every_steps"] == 200
  assert "num_train_steps" not in _rows(_fingerprint())  # nothing timed: no step count


@pytest.mark.parametrize("text, seconds", [("30m", 1800), ("4h", 14400), ("90s", 90), ("600", 600)])
def test_budgets_parse(text, seconds):
  assert plan.parse_budget(text) == seconds


def test_a_bad_budget_is_a_clear_error():
  with pytest.raises(SegjaxError, match="--time_budget must be a duration like 30m"):
    plan.parse_budget("soon")


def test_a_written_plan_loads_and_trains(tmp_path):
  import json

  _write(tmp_path / "data", [(40, 40)] * 6)
  (tmp_path / "data" / "train.txt").write_text("im0\nim1\nim2\nim3\n")
  (tmp_path / "data" / "val.txt").write_text("im4\nim5\n")
  output = tmp_path / "configs" / "mine.py"
  planned = _run(
    "experiments.plan",
    f"--image_dir={tmp_path / 'data' / 'images'}",
    f"--mask_dir={tmp_path / 'data' / 'masks'}",
    f"--instance_dir={tmp_path / 'data' / 'instances'}",
    "--time_budget=2m",
    f"--output={output}",
    "--timed_steps=2",
    "--split_files=train:" + str(tmp_path / "data" / "train.txt") + ",validation:" + str(tmp_path / "data" / "val.txt"),
  )
  assert planned.returncode == 0, planned.stderr[-3000:]
  assert "touching_fraction 1" in planned.stdout
  assert os.path.isfile(tmp_path / "configs" / "mine.fingerprint.json")
  text = output.read_text()
  assert "config.data.crop_size = 32  # median image 40x40" in text and "config.instances.targets = 'contour'" in text
  assert "config.num_train_steps = " in text
  assert f"'validation': '{tmp_path / 'data' / 'val.txt'}'" in text and "config.data.test_split = None" in text
  trained = _run(
    "experiments.train",
    f"--config={output}",
    f"--workdir={tmp_path / 'run'}",
    f"--config.data.tfds_data_dir={tmp_path / 'tfds'}",
    "--config.num_train_steps=2",
    "--config.eval_every_steps=2",
    "--config.checkpoint_every_steps=2",
    "--config.log_every_steps=1",
    "--config.batch_size=2",
    "--config.num_sample_images=1",
    "--config.num_test_images=1",
  )
  assert trained.returncode == 0, trained.stderr[-3000:]
  assert "instance_ap" in trained.stdout
  with open(tmp_path / "run" / "summary.json") as f:
    summary = json.load(f)
  assert "validation" in summary and "test" not in summary  # the listed splits, and no test split to look for


def test_plan_and_train_in_one_command_fits_the_budget(tmp_path):
  import json

  _write(tmp_path / "data", [(40, 40)] * 6)
  workdir = tmp_path / "run"
  result = _run(
    "experiments.plan",
    f"--image_dir={tmp_path / 'data' / 'images'}",
    f"--mask_dir={tmp_path / 'data' / 'masks'}",
    "--time_budget=20s",
    f"--output={tmp_path / 'mine.py'}",
    f"--workdir={workdir}",
    "--timed_steps=3",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  with open(workdir / "metrics.jsonl") as f:
    train = [r for r in map(json.loads, f) if r.get("split") == "train"]
  planned = int(
    next(line for line in (tmp_path / "mine.py").read_text().splitlines() if "num_train_steps" in line)
    .split("=")[1]
    .split("#")[0]
  )
  assert train[-1]["step"] == planned >= 10
  assert train[-1]["train_seconds"] < 60  # the planned steps take about the budget (20 s), not minutes
