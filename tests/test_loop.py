"""Checks of the training loop that need no training: data state on resume, evaluators, training geometry."""

import ml_collections
import pytest

from experiments.configs import isbi2012_unet, synthetic_cells
from segjax.data import Dataset
from segjax.errors import SegjaxError
from segjax.models import create_model
from segjax.train.evaluators import check_evaluators, evaluator_keys
from segjax.train.loop import check_data_state, data_state, training_geometry


def _dataset(**kwargs) -> Dataset:
  return Dataset("toy", 2, 1, ("a", "b"), {}, **{"source": "toy/default/1.0.0", **kwargs})


def test_resume_is_refused_when_the_input_stream_would_change():
  config = synthetic_cells.get_config()
  saved = data_state(config, 200, _dataset(), 512)
  check_data_state(saved, data_state(config, 200, _dataset(), 512))  # same stream: fine
  check_data_state(None, data_state(config, 200, _dataset(), 512))  # old checkpoints without a data state
  with pytest.raises(SegjaxError, match="had 512 examples when the checkpoint was written and has 500 now"):
    check_data_state(saved, data_state(config, 200, _dataset(), 500))
  other = ml_collections.ConfigDict(config.to_dict())
  other.seed, other.batch_size = 1, 4
  with pytest.raises(SegjaxError, match="differs from this run's in seed, batch_size \\(was 0, 8\\)"):
    check_data_state(saved, data_state(other, 200, _dataset(), 512))
  with pytest.raises(SegjaxError, match="in source \\(was 'toy/default/1.0.0'\\)"):
    check_data_state(saved, data_state(config, 200, _dataset(source="toy/other/1.0.0"), 512))


def test_evaluators_needing_instances_are_refused_before_training():
  check_evaluators(["isbi"], has_instances=False)
  assert evaluator_keys(["isbi"]) == ("mask",) and evaluator_keys([]) == ()
  assert evaluator_keys(["isbi", "instances"]) == ("mask", "instances")
  with pytest.raises(SegjaxError, match="evaluator 'instances' needs a dataset with instance maps"):
    check_evaluators(["instances"], has_instances=False)


def test_training_geometry_checks_tiles_against_the_model():
  config = isbi2012_unet.get_config()
  model = create_model(config.model, 2)
  geometry, crop = training_geometry(config, model, _dataset(), (512, 512, 1))
  assert (geometry.margin, crop) == (92, 572) and geometry.output_size(572) == 388
  config.data.crop_size = 570
  with pytest.raises(SegjaxError, match="data.crop_size 570 does not fit model 'unet_valid'; .* 572"):
    training_geometry(config, model, _dataset(), (512, 512, 1))
  config.data.crop_size = None
  with pytest.raises(SegjaxError, match="cannot take the 512x512 training images whole; set data.crop_size"):
    training_geometry(config, model, _dataset(), (512, 512, 1))
  with pytest.raises(SegjaxError, match="images of different sizes; set data.crop_size"):
    training_geometry(config, model, _dataset(same_size=False), (512, 512, 1))
  # a same-padded U-Net takes any tile; eval_size_multiple only rounds whole images up for evaluation
  same = synthetic_cells.get_config()
  same.data.crop_size, same.data.eval_size_multiple = 40, 32
  geometry, crop = training_geometry(same, create_model(same.model, 2), _dataset(), (128, 128, 1))
  assert crop == 40 and geometry.input_size_for_output(100) == 128


def test_a_bad_config_is_refused_before_any_data_is_prepared_or_workdir_made(tmp_path, monkeypatch):
  from experiments.configs import tiny
  from segjax.train import setup

  def no_data(*args, **kwargs):
    raise AssertionError("data prepared for a config that cannot run")

  monkeypatch.setattr(setup, "load_dataset", no_data)
  for section, key, value, message in [
    ("optimizer", "name", "adamx", "unknown optimizer 'adamx'"),
    ("model", "kernels", "gpu", "unknown kernels 'gpu'"),
    (None, "evaluators", ("isbi", "nope"), "unknown evaluator 'nope'"),
  ]:
    config = tiny.get_config()
    (config[section] if section else config)[key] = value
    with pytest.raises(SegjaxError, match=message):
      setup.build(config, workdir=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_training_builds_each_part_of_the_experiment_once(tmp_path, tfds_dir, monkeypatch):
  """``train_and_evaluate`` builds the optimizer, loss, augmentation, evaluators, model and steps once (in
  ``setup.build``), where the loop used to build them twice and look the evaluators up at every evaluation."""
  import collections

  from experiments.configs import tiny
  from segjax.train import evaluation, loop, setup

  calls = collections.Counter()

  def counted(module, name):
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
      calls[name] += 1
      return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)

  for name in ("create_optimizer", "get_loss", "make_augment_fn", "get_evaluators", "create_model", "make_eval_step"):
    counted(setup, name)
  counted(evaluation, "get_evaluators")
  config = tiny.get_config()
  config.data.tfds_data_dir = tfds_dir
  config.num_train_steps, config.eval_every_steps = 2, 1  # two evaluations in the loop, then validation and test
  config.num_sample_images = config.num_test_images = 0
  summary = loop.train_and_evaluate(config, str(tmp_path))
  assert summary["steps"] == 2 and "test" in summary
  assert calls == {
    "create_optimizer": 1,
    "get_loss": 1,
    "make_augment_fn": 1,
    "get_evaluators": 1,
    "create_model": 1,
    "make_eval_step": 1,
  }, calls
