"""The one base config and with_defaults: every default written once, filled into hand-built and old configs."""

import ast
import glob
import json
import os

import ml_collections
import numpy as np
import pytest

from segjax.config import base_config, data_section, with_data_defaults, with_defaults
from segjax.data import DATASETS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _leaves(tree: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict) and prefix + key != "model.kwargs":
      out.update(_leaves(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


def test_a_minimal_config_gets_every_base_key_and_its_data_sets_own():
  config = ml_collections.ConfigDict({"data": {"name": "isbi2012"}, "batch_size": 2, "extra": "kept"})
  filled = with_defaults(config)
  base = _leaves(base_config().to_dict())
  got = _leaves(filled.to_dict())
  for key, value in base.items():
    if key not in ("batch_size", "data.name", "data.test_split"):
      assert got[key] == value, key
  assert filled.batch_size == 2 and filled.extra == "kept" and filled.data.name == "isbi2012"
  # isbi2012's registered keys come in, and its own default overrides a shared one (no test split)
  assert tuple(filled.data.validation_slices) == (25, 26, 27, 28, 29) and filled.data.border_sigma == 5.0
  assert filled.data.test_split is None and base_config().data.test_split == "test"
  assert "validation_slices" not in config.data  # the argument is not changed


def test_with_defaults_keeps_what_is_set_and_applying_it_twice_changes_nothing():
  config = base_config()
  config.data.name = "segmentation_folder"
  config.optimizer.momentum = 0.99
  config.model.kwargs = ml_collections.ConfigDict({"depth": 2})
  once = with_defaults(config)
  assert once.optimizer.momentum == 0.99 and once.data.validation_fraction == 0.1
  assert with_defaults(once).to_dict() == once.to_dict()


def test_model_kwargs_and_augment_are_not_mixed_with_the_default_u_nets():
  # a ResNet's kwargs must not receive the U-Net's 'upsample' or 'depth', nor an op list the default flips
  config = ml_collections.ConfigDict(
    {"data": {"name": "synthetic_cells"}, "model": {"name": "resnet18", "kwargs": {}}, "augment": {"ops": ()}}
  )
  filled = with_defaults(config)
  assert filled.model.kwargs.to_dict() == {} and filled.model.kernels == "auto"
  assert tuple(filled.augment.ops) == ()
  # absent sections are filled whole
  assert tuple(with_defaults(ml_collections.ConfigDict({"data": {"name": "synthetic_cells"}})).augment.ops) == (
    "flip",
    "rot90",
  )


def test_a_filled_placeholder_keeps_its_type_check():
  filled = with_defaults(ml_collections.ConfigDict({"data": {"name": "synthetic_cells"}}))
  assert filled.data.crop_size is None
  filled.data.crop_size = 64
  with pytest.raises(TypeError):
    filled.data.crop_size = "big"


def test_data_sections_of_every_registered_data_set_hold_its_registered_keys():
  for name in DATASETS:
    section = data_section(name)
    defaults = dict(DATASETS.metadata(name)["defaults"])
    assert section.name == name and set(defaults) <= set(section)
    assert set(base_config().data) <= set(section)
  partial = with_data_defaults(ml_collections.ConfigDict({"name": "segmentation_folder", "num_classes": 3}))
  assert partial.num_classes == 3 and partial.test_fraction == 0.0 and partial.num_folds == 0


def _config_key_names() -> set[str]:
  names = set()
  for key in _leaves(base_config().to_dict()):
    names.update(key.split("."))
  for name in DATASETS:
    names.update(DATASETS.metadata(name)["defaults"])
  return names


def test_the_library_reads_config_keys_directly_never_with_a_second_default():
  # `config.get("warmup_steps", 0)` is how defaults came to be written twice (and to disagree: 0 here, 50 in the
  # base config); every key of the base config or of a data set's defaults is read directly.
  keys = _config_key_names()
  offenders = []
  for path in sorted(glob.glob(os.path.join(REPO, "segjax", "**", "*.py"), recursive=True)):
    if path.endswith(os.path.join("segjax", "config.py")):
      continue
    with open(path) as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "get"
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and node.args[0].value in keys
        and any(word in ast.unparse(node.func.value) for word in ("config", "data"))
      ):
        offenders.append(f"{os.path.relpath(path, REPO)}:{node.lineno} {ast.unparse(node)}")
  assert not offenders, "\n".join(offenders)


def test_a_checkpoint_whose_config_predates_keys_predicts_and_resumes(tmp_path, tfds_dir):
  from experiments.configs import tiny
  from segjax.inference import load_predictor
  from segjax.train.loop import train_and_evaluate

  config = tiny.get_config()
  config.data.tfds_data_dir = tfds_dir
  config.num_train_steps = 2
  config.checkpoint_every_steps = 2
  train_and_evaluate(config, str(tmp_path))
  # Rewrite the saved config as an older version wrote it: without keys added since.
  path = str(tmp_path / "checkpoints" / "2" / "config" / "metadata")  # Orbax's JsonSave file
  with open(path) as f:
    saved = json.load(f)
  for section, key in (
    ("model", "kernels"),
    ("optimizer", "power"),
    ("optimizer", "weight_decay"),
    ("data", "eval_size_multiple"),
  ):
    del saved[section][key]
  del saved["eval_tta"], saved["instances"]
  with open(path, "w") as f:
    json.dump(saved, f)
  predictor = load_predictor(str(tmp_path))
  assert predictor.config.model.kernels == "auto" and predictor.config.eval_tta == "none"
  probabilities = predictor.predict_probabilities(np.zeros((64, 64, 1), np.uint8))
  np.testing.assert_allclose(probabilities.sum(-1), 1.0, rtol=1e-5)
  # resuming compares the saved config with this one: the filled-in defaults are no difference
  config.num_train_steps = 3
  summary = train_and_evaluate(config, str(tmp_path))
  assert summary["steps"] == 3
