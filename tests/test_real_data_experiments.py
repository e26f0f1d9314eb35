"""End to end on the real-data configs, shrunk to a few steps: isbi2012_unet, dsb2018_unet and folder_unet.

The ISBI and DSB runs read ``../shared/data`` (or ``$SEGJAX_DATA``) and skip when it is absent; the folder run
writes its own small data set.
"""

import json
import os

import numpy as np
import pytest
from PIL import Image

from segjax.data import data_root
from tests.test_datasets import DSB, _dsb_subset, needs_dsb, needs_isbi
from tests.test_experiments import _run

SHRINK = (
  "--config.num_train_steps=2",
  "--config.log_every_steps=1",
  "--config.eval_every_steps=2",
  "--config.checkpoint_every_steps=2",
  "--config.num_sample_images=2",
  "--config.num_test_images=1",
  "--config.data.num_threads=1",
)


def _summary(workdir):
  with open(os.path.join(workdir, "summary.json")) as f:
    return json.load(f)


@needs_isbi
def test_isbi2012_unet_trains_and_reports_the_challenge_errors(tmp_path):
  workdir = str(tmp_path / "run")
  result = _run(
    "experiments.train",
    "--config=experiments/configs/isbi2012_unet.py",
    f"--workdir={workdir}",
    f"--config.data.tfds_data_dir={tmp_path / 'tfds'}",
    f"--config.data.manual_dir={os.path.join(data_root(), 'isbi2012')}",
    "--config.data.crop_size=44",  # the smallest tile of the depth-2 unpadded U-Net: 44 -> 4
    "--config.model.kwargs.depth=2",
    "--config.model.kwargs.base_width=4",
    *SHRINK,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  validation = _summary(workdir)["validation"]
  assert 0.0 <= validation["pixel_error"] <= 1.0 and 0.0 <= validation["rand_error"] <= 1.0
  # at threshold 0.5 (the argmax) the pixel error of whole 512x512 slices is 1 - the pooled F1 of the interior class,
  # class 0, which the split's confusion matrix also gives
  assert validation["pixel_error/t0.5"] == pytest.approx(1.0 - validation["dice/0"], abs=1e-6)
  # the reported scores are the best over the interior-probability thresholds 0.0, 0.1, ..., 1.0, as in the challenge
  for name in ("pixel_error", "rand_error"):
    swept = [validation[f"{name}/t{t / 10}"] for t in range(11)]
    assert (
      validation[name] == np.nanmin(swept)
      and validation[f"{name}/t{validation[f'{name}_threshold']}"] == validation[name]
    )
  assert not any("_tp/" in key for key in validation)  # the raw counts stay out of the summary
  assert "rand_error" in result.stdout
  assert os.listdir(os.path.join(workdir, "test_images")) == ["validation_0000.png"]
  # prediction mirrors the slice for the unpadded U-Net and returns a label map of the slice's own size
  output = str(tmp_path / "predicted")
  predicted = _run(
    "experiments.predict", f"--workdir={workdir}", f"--input={workdir}/test_images", f"--output={output}"
  )
  assert predicted.returncode == 0, predicted.stderr[-3000:]
  with Image.open(os.path.join(output, "validation_0000_mask.png")) as mask:
    assert mask.size == (512, 512)


@needs_dsb
def test_dsb2018_unet_trains_contour_targets_on_mixed_sizes_and_scores_watershed_and_components(tmp_path):
  root, _ = _dsb_subset(tmp_path, count=12)
  workdir = str(tmp_path / "run")
  result = _run(
    "experiments.train",
    "--config=experiments/configs/dsb2018_unet.py:contour",
    f"--workdir={workdir}",
    f"--config.data.tfds_data_dir={tmp_path / 'tfds'}",
    f"--config.data.manual_dir={root}",
    "--config.data.crop_size=64",
    "--config.model.kwargs.base_width=4",
    "--config.model.kwargs.depth=2",
    *SHRINK,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  summary = _summary(workdir)
  for split in ("validation", "test"):
    for name in ("instance_ap", "aji", "pq", "f1"):  # the watershed's scores and those of connected components
      assert 0.0 <= summary[split][name] <= 1.0 and 0.0 <= summary[split][f"{name}/components"] <= 1.0
    assert "iou/2" in summary[split]  # three target classes: background, interior, boundary
  assert "instance_ap" in result.stdout
  output = str(tmp_path / "predicted")
  predicted = _run(
    "experiments.predict",
    f"--workdir={workdir}",
    f"--input={workdir}/test_images",
    f"--output={output}",
    "--outputs=labels,instances",
  )
  assert predicted.returncode == 0, predicted.stderr[-3000:]
  written = sorted(os.listdir(output))
  assert any(name.endswith("_instances.png") for name in written), written
  with Image.open(os.path.join(output, written[0])) as mask:  # a label map of the 3 target classes
    assert np.asarray(mask).max() <= 2
  assert os.path.isdir(DSB)


def _write_folder(root, count, size=(40, 52)):
  rng = np.random.default_rng(1)
  for kind in ("images", "masks"):
    (root / kind).mkdir(parents=True, exist_ok=True)
  for i in range(count):
    mask = np.zeros(size, np.uint8)
    y, x = rng.integers(5, 30), rng.integers(5, 40)
    mask[y : y + 10, x : x + 10] = 1
    image = (mask * 180 + rng.integers(0, 60, size)).astype(np.uint8)
    Image.fromarray(image).save(root / "images" / f"im{i}.png")
    Image.fromarray(mask).save(root / "masks" / f"im{i}.png")


def _folder_train_args(root, workdir, tmp_path) -> tuple[str, ...]:
  """`experiments.train` of a tiny folder_unet on the folder ``root`` (images/, masks/), by flags alone."""
  return (
    "experiments.train",
    "--config=experiments/configs/folder_unet.py",
    f"--workdir={workdir}",
    f"--config.data.image_dir={root / 'images'}",
    f"--config.data.mask_dir={root / 'masks'}",
    f"--config.data.tfds_data_dir={tmp_path / 'tfds'}",
    "--config.data.validation_fraction=0.34",
    "--config.data.crop_size=32",
    "--config.model.kwargs.depth=2",
    "--config.model.kwargs.base_width=4",
    "--config.batch_size=2",
  )


def test_folder_unet_trains_from_flags_alone_and_refuses_to_resume_on_changed_data(tmp_path):
  root = tmp_path / "mine"
  _write_folder(root, 6)
  workdir = str(tmp_path / "run")
  args = _folder_train_args(root, workdir, tmp_path)
  result = _run(*args, *SHRINK)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 0.0 <= _summary(workdir)["validation"]["mean_iou"] <= 1.0
  _write_folder(root, 9)  # three more images: the training split grows
  resumed = _run(*args, *SHRINK[1:], "--config.num_train_steps=4")
  assert resumed.returncode == 2
  assert "training split had 4 examples when the checkpoint was written and has 6 now" in resumed.stderr


def _write_touching_folder(root, count, size=(48, 48)):
  """Images of two touching squares with their instance maps (the case instance targets exist for)."""
  rng = np.random.default_rng(2)
  for kind in ("images", "masks", "instances"):
    (root / kind).mkdir(parents=True, exist_ok=True)
  for i in range(count):
    instances = np.zeros(size, np.uint16)
    y, x = rng.integers(4, 24), rng.integers(4, 14)
    instances[y : y + 16, x : x + 14] = 1
    instances[y : y + 16, x + 14 : x + 28] = 2  # shares an edge with object 1
    image = ((instances > 0) * 150 + rng.integers(0, 60, size)).astype(np.uint8)
    Image.fromarray(image).save(root / "images" / f"im{i}.png")
    Image.fromarray((instances > 0).astype(np.uint8)).save(root / "masks" / f"im{i}.png")
    Image.fromarray(instances).save(root / "instances" / f"im{i}.png")


def test_folder_unet_learns_contour_targets_from_an_instance_dir_by_flags_alone(tmp_path):
  root = tmp_path / "touching"
  _write_touching_folder(root, 6)
  workdir = str(tmp_path / "run")
  result = _run(
    *_folder_train_args(root, workdir, tmp_path),
    f"--config.data.instance_dir={root / 'instances'}",
    "--config.instances.targets=contour",
    "--config.instances.method=watershed",
    "--config.evaluators=('instances',)",
    *SHRINK,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  validation = _summary(workdir)["validation"]
  assert {"iou/0", "iou/1", "iou/2", "instance_ap", "aji", "pq", "f1", "instance_ap/components"} <= set(validation)
  _tune_and_check(workdir, tmp_path)


def _tune_and_check(workdir, tmp_path):
  """experiments.tune_instances picks the grid's best validation AP, writes it, and predict applies it."""
  from segjax.data import load_dataset
  from segjax.inference import load_predictor
  from segjax.instances import instances_from_predictions
  from segjax.metrics import instance_average_precision

  tuned = _run(
    "experiments.tune_instances",
    f"--workdir={workdir}",
    "--marker_thresholds=0.2,0.9",
    "--foreground_thresholds=0.3",
    "--min_sizes=1,3000",
    "--test_split=",
  )
  assert tuned.returncode == 0, tuned.stderr[-3000:]
  with open(os.path.join(workdir, "instances.json")) as f:
    record = json.load(f)
  # independent of the script: every grid point scored here with the watershed and the DSB AP directly
  predictor = load_predictor(workdir, tuned=False)
  source = load_dataset(predictor.config.data).split("validation")
  probabilities = [predictor.predict(np.asarray(source[i]["image"])) for i in range(len(source))]
  truths = [np.asarray(source[i]["instances"])[..., 0] for i in range(len(source))]
  by_setting = {}
  for marker in (0.2, 0.9):
    for min_size in (1, 3000):
      settings = {"min_size": min_size, "marker_threshold": marker, "foreground_threshold": 0.3}
      aps = [
        instance_average_precision(instances_from_predictions(p, "contour", **settings), t)
        for p, t in zip(probabilities, truths, strict=True)
      ]
      by_setting[(marker, min_size)] = float(np.mean(aps))
  chosen = (record["settings"]["marker_threshold"], record["settings"]["min_size"])
  assert by_setting[chosen] == pytest.approx(max(by_setting.values()), abs=1e-9)
  assert record["validation"]["instance_ap"] == pytest.approx(by_setting[chosen], abs=1e-9)
  assert by_setting[(0.2, 3000)] == 0.0  # larger than the image: nothing kept, nothing right
  applied = load_predictor(workdir).instances
  assert (applied.marker_threshold, applied.min_size, applied.foreground_threshold) == (*chosen, 0.3)
  pairs = zip(probabilities, truths, strict=True)
  applied_aps = [instance_average_precision(applied.to_instances(p), t) for p, t in pairs]
  assert float(np.mean(applied_aps)) == pytest.approx(by_setting[chosen], abs=1e-9)
  with open(os.path.join(workdir, "instances.json"), "w") as f:
    f.write('{"settings": {"marker_treshold": 0.5}}')
  with pytest.raises(Exception, match="instances.json is not a tune_instances result"):
    load_predictor(workdir)
