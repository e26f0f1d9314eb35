"""Run outputs: metric logs, pictures, and the config checks that run before any work."""

import json

import numpy as np
import pytest

from experiments.configs import synthetic_cells
from segjax import viz
from segjax.errors import SegjaxError
from segjax.logging_utils import MetricWriter
from segjax.train.loop import validate_config


def test_metric_writer_drops_records_after_resume_step_and_a_cut_line(tmp_path):
  writer = MetricWriter(str(tmp_path))
  for step in (10, 20, 30):
    writer.write(step, "train", {"loss": 1.0 / step})
  writer.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 40, "split": "tr')  # a process killed mid-write
  writer = MetricWriter(str(tmp_path), resume_step=20)
  writer.write(30, "train", {"loss": 0.5})
  writer.close()
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [(r["step"], r["loss"]) for r in records] == [(10, 0.1), (20, 0.05), (30, 0.5)]


def test_colorize_and_overlay():
  labels = np.array([[0, 1], [2, 0]])
  colors = viz.colorize(labels)
  assert colors.shape == (2, 2, 3) and colors.dtype == np.uint8
  np.testing.assert_array_equal(colors[0, 0], [0, 0, 0])
  assert not np.array_equal(colors[0, 1], colors[1, 0])
  image = np.full((2, 2, 1), 100, np.uint8)
  out = viz.overlay(image, labels)
  np.testing.assert_array_equal(out[0, 0], [100, 100, 100])  # background left as is
  assert not np.array_equal(out[0, 1], [100, 100, 100])


def test_sixteen_bit_images_keep_their_gray_levels():
  image = np.array([[0, 16384], [32768, 65535]], np.uint16)[..., None]
  rgb = viz.to_rgb_uint8(image)
  np.testing.assert_array_equal(rgb[..., 0], [[0, 64], [128, 255]])


@pytest.mark.parametrize(
  ("key", "value", "message"),
  [
    ("eval_every_steps", 0, "eval_every_steps must be a positive integer"),
    ("batch_size", -1, "batch_size must be a positive integer"),
    ("model.name", "unet_typo", "unknown model 'unet_typo'"),
    ("model.kwargs.norm", "layer", "norm"),
    ("data.name", "imagenet", "unknown dataset 'imagenet' \\(config key data.name\\)"),
    ("loss", "focal", "unknown loss 'focal'"),
    ("optimizer.schedule", "step", "unknown schedule 'step'"),
  ],
)
def test_validate_config_names_the_bad_key(key, value, message):
  config = synthetic_cells.get_config()
  section, _, name = key.rpartition(".")
  target = config
  for part in filter(None, section.split(".")):
    target = target[part]
  target[name] = value
  with pytest.raises(SegjaxError, match=message):
    validate_config(config)


def test_default_config_is_valid():
  validate_config(synthetic_cells.get_config())
  validate_config(synthetic_cells.get_config("rgb"))
