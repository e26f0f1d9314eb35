"""The worked extension examples (experiments/examples/extending.py) register, train and match docs/extending.md."""

import functools
import importlib
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from segjax import models
from segjax.data import DATASETS, load_dataset
from segjax.data.augment import AUGMENTATIONS, make_augment_fn
from segjax.data.features import IGNORE_LABEL
from segjax.data.pipeline import to_model_inputs
from segjax.errors import SegjaxError
from segjax.losses import LOSSES, get_loss
from segjax.train.evaluators import EVALUATORS, get_evaluators
from segjax.train.loop import train_and_evaluate
from segjax.train.optim import create_optimizer
from segjax.train.state import create_train_state
from segjax.train.step import make_gradient_fn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE = "experiments.examples.extending"
REGISTERED = {
  "toy_fcn": models.MODELS,
  "toy_l2_softmax": LOSSES,
  "foreground_fraction": EVALUATORS,
  "invert": AUGMENTATIONS,
  "toy_squares": DATASETS,
}


@pytest.fixture(scope="module")
def extending():
  """The examples module, imported here (not at collection) and unregistered afterwards: other tests list the
  registries and must see only the built-in names."""
  module = importlib.import_module(MODULE)
  yield module
  for name, registry in REGISTERED.items():
    registry.pop(name, None)
  sys.modules.pop(MODULE, None)


def _toy_squares_config(extending, **data) -> ml_collections.ConfigDict:
  config = extending.toy_config()
  config.data.name = "toy_squares"
  config.data.update(data)
  return config


# ------------------------------------------------------------------------------------------------ the docs


def _python_blocks(markdown: str) -> list[str]:
  return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def _lines(text: str) -> list[str]:
  return [line.strip() for line in text.splitlines() if line.strip()]


def _contains_run(haystack: list[str], needle: list[str], start: int) -> int:
  """The index after the first occurrence of ``needle`` as consecutive items of ``haystack`` from ``start``, or -1."""
  for i in range(start, len(haystack) - len(needle) + 1):
    if haystack[i : i + len(needle)] == needle:
      return i + len(needle)
  return -1


def test_docs_quote_the_examples_module():
  with open(os.path.join(REPO, "docs", "extending.md")) as f:
    doc = f.read()
  with open(os.path.join(REPO, "experiments", "examples", "extending.py")) as f:
    source = _lines(f.read())
  blocks = _python_blocks(doc)
  assert len(blocks) >= 10 and "experiments/examples/extending.py" in doc
  for block in blocks:
    # A block is the module's text with parts elided at `# ...` lines: its pieces appear in order.
    position = 0
    for piece in re.split(r"^# \.\.\.$", block, flags=re.M):
      if _lines(piece):
        position = _contains_run(source, _lines(piece), position)
        assert position >= 0, f"docs/extending.md quotes code that is not in {MODULE}:\n{piece}"
  with open(os.path.join(REPO, "README.md")) as f:
    assert "docs/extending.md" in f.read()


# ------------------------------------------------------------------------------------------------ the registries


def test_registry_lookups_resolve_to_the_examples(extending):
  model = models.get_model("toy_fcn", num_classes=3, width=4, num_layers=1)
  assert isinstance(model, extending.ToyFCN) and (model.width, model.num_layers) == (4, 1)
  with pytest.raises(ValueError, match="registered twice"):
    models.register_model("toy_fcn")(extending.ToyFCN)
  with pytest.raises(SegjaxError, match="cannot build model 'toy_fcn'"):
    models.get_model("toy_fcn", num_classes=2, depth=3)
  assert get_loss("toy_l2_softmax") is extending.l2_softmax_loss
  assert get_loss({"name": "toy_l2_softmax", "ignore_label": 255}).keywords == {"ignore_label": 255}
  with pytest.raises(SegjaxError, match="loss 'toy_l2_softmax' has no option 'gamma'"):
    get_loss({"name": "toy_l2_softmax", "gamma": 2.0})
  assert get_evaluators(["foreground_fraction"]) == (extending.foreground_fraction_evaluator,)
  with pytest.raises(SegjaxError, match="unknown parameter augment.invert.strength"):
    make_augment_fn(ml_collections.ConfigDict({"ops": ["invert"], "invert": {"strength": 1.0}}))
  assert DATASETS["toy_squares"] is extending.load_toy_squares


# ------------------------------------------------------------------------------------------------ each example


def test_toy_fcn_keeps_the_resolution_and_has_the_expected_parameters(extending):
  model = models.get_model("toy_fcn", num_classes=2, width=8, num_layers=2)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 12, 10, 1)), train=False)
  assert model.apply(variables, jnp.ones((2, 12, 10, 1)), train=False).shape == (2, 12, 10, 2)
  # conv 3*3*1*8 + 8, BN 2*8, conv 3*3*8*8 + 8, BN 2*8, classifier 8*2 + 2
  assert sum(x.size for x in jax.tree_util.tree_leaves(variables["params"])) == 80 + 16 + 584 + 16 + 18


def test_l2_softmax_loss_on_hand_checked_cases(extending):
  # pixel 0: p = (1/2, 1/2), label 0: (1/2)^2 + (1/2)^2 = 0.5; pixel 1: p ~ (1, 0), label 1: 1 + 1 = 2
  logits = jnp.array([[0.0, 0.0], [30.0, -30.0]])
  labels = jnp.array([0, 1])
  loss = extending.l2_softmax_loss
  np.testing.assert_allclose(loss(logits, labels), 1.25, rtol=1e-6)
  np.testing.assert_allclose(loss(logits, labels, jnp.array([1.0, 0.0])), 0.5, rtol=1e-6)
  np.testing.assert_allclose(loss(logits, jnp.array([0, 255]), ignore_label=255), 0.5, rtol=1e-6)
  perfect = loss(jnp.array([[30.0, -30.0], [-30.0, 30.0]]), labels)
  assert 0.0 <= float(perfect) < 1e-12


def test_foreground_fraction_evaluator_on_a_hand_checked_case(extending):
  mask = np.zeros((4, 4, 1), np.uint8)
  mask[0], mask[3] = 1, IGNORE_LABEL  # 12 labelled pixels, 4 of them foreground
  prediction = np.zeros((4, 4), np.uint8)
  prediction[:2] = 1  # 8 of the labelled pixels predicted foreground (the ignored row does not count)
  prediction[3] = 1
  result = extending.foreground_fraction_evaluator(prediction, {"mask": mask})
  np.testing.assert_allclose(result["foreground_fraction_error"], 8 / 12 - 4 / 12)
  unlabelled = np.full((4, 4, 1), IGNORE_LABEL, np.uint8)
  assert np.isnan(
    extending.foreground_fraction_evaluator(prediction, {"mask": unlabelled})["foreground_fraction_error"]
  )


def test_invert_changes_only_the_image_with_its_probability(extending):
  image = jax.random.uniform(jax.random.PRNGKey(0), (8, 8, 1))
  example = {"image": image, "label": jnp.arange(64).reshape(8, 8) % 2, "weights": jnp.ones((8, 8))}
  inverted = extending.random_invert(jax.random.PRNGKey(1), example, probability=1.0)
  np.testing.assert_array_equal(inverted["image"], 1.0 - image)
  np.testing.assert_array_equal(inverted["label"], example["label"])
  kept = extending.random_invert(jax.random.PRNGKey(1), example, probability=0.0)
  np.testing.assert_array_equal(kept["image"], image)
  # through the configured, batched augmentation of the train step
  augment = make_augment_fn(ml_collections.ConfigDict({"ops": ["invert"], "invert": {"probability": 1.0}}))
  batch = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), example)
  out = jax.jit(augment)(jax.random.PRNGKey(2), batch)
  np.testing.assert_allclose(out["image"], 1.0 - batch["image"])
  np.testing.assert_array_equal(out["label"], batch["label"])


def test_toy_squares_is_deterministic_and_feeds_the_pipeline(extending):
  config = _toy_squares_config(extending, image_size=16, num_train=4).data
  dataset = load_dataset(config)
  assert {name: len(split) for name, split in dataset.splits.items()} == {"train": 4, "validation": 8, "test": 8}
  assert dataset.source == "toy_squares/size=16/train=4/seed=0"
  again = load_dataset(config).split("train")[3]
  np.testing.assert_array_equal(again["image"], dataset.split("train")[3]["image"])
  inputs = to_model_inputs(dataset.split("train")[3], dataset.num_classes)
  assert inputs["image"].shape == (16, 16, 1) and inputs["label"].shape == (16, 16)
  assert set(np.unique(inputs["label"])) == {0, 1} and np.all(inputs["weights"] == 1)


# ------------------------------------------------------------------------------------------------ training


def _logged_every_step(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  config.log_every_steps = 1
  return config


def _records(workdir: str, split: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["split"] == split]


@pytest.fixture(scope="module")
def toy_run(extending, tmp_path_factory, tfds_dir):
  """The toy config trained through train_and_evaluate, once for the tests below: ``(workdir, summary)``."""
  workdir = str(tmp_path_factory.mktemp("toy") / "run")
  return workdir, train_and_evaluate(_logged_every_step(extending.toy_config(tfds_dir)), workdir)


def test_toy_extensions_train_through_train_and_evaluate(toy_run):
  workdir, summary = toy_run
  assert summary["steps"] == 6 and summary["num_params"] == 714
  for split in ("validation", "test"):
    assert 0.0 <= summary[split]["foreground_fraction_error"] <= 1.0
    assert 0.0 <= summary[split]["loss"] <= 2.0  # the Brier score's range
  validation = _records(workdir, "validation")
  assert [r["step"] for r in validation] == [3, 6]
  assert all("foreground_fraction_error" in r for r in validation)
  with open(os.path.join(workdir, "summary.json")) as f:
    assert json.load(f)["validation"]["foreground_fraction_error"] == summary["validation"]["foreground_fraction_error"]


def test_predict_cli_imports_the_modules_the_run_was_trained_with(toy_run, tmp_path):
  # A fresh process that knows only the built-in names: the toy model is found through the saved config.imports.
  workdir, _ = toy_run
  output = tmp_path / "predictions"
  command = [sys.executable, "-m", "experiments.predict", f"--workdir={workdir}"]
  command += [f"--input={workdir}/test_images", f"--output={output}"]
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  images = sorted(os.listdir(os.path.join(workdir, "test_images")))
  assert images == ["test_0000.png", "test_0001.png"]
  for name in images:
    mask = np.asarray(Image.open(output / name.replace(".png", "_mask.png")))
    assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 1}


def _tiny_state_and_batch(extending):
  model = extending.ToyFCN(num_classes=2, width=4, num_layers=1)
  config = extending.toy_config()
  state = create_train_state(jax.random.PRNGKey(0), model, create_optimizer(config.optimizer, 10), (1, 8, 8, 1))
  keys = jax.random.split(jax.random.PRNGKey(1), 2)
  batch = {
    "image": jax.random.uniform(keys[0], (2, 8, 8, 1)),
    "label": jax.random.bernoulli(keys[1], 0.4, (2, 8, 8)).astype(jnp.int32),
    "weights": jnp.ones((2, 8, 8)),
  }
  return state, batch


def test_weight_decay_objective_adds_weight_decay_times_params_to_the_gradient(extending):
  np.testing.assert_allclose(extending.l2_penalty({"a": jnp.array([1.0, 2.0]), "b": jnp.array([[2.0]])}), 4.5)
  state, batch = _tiny_state_and_batch(extending)
  rng = jax.random.PRNGKey(2)
  loss_fn = get_loss("toy_l2_softmax")
  objective = extending.make_weight_decay_objective(loss_fn, weight_decay=0.1)
  plain = jax.jit(make_gradient_fn(loss_fn))(state, batch, rng)
  decayed = jax.jit(make_gradient_fn(loss_fn, objective=objective))(state, batch, rng)
  # (loss, pixel_accuracy, batch_stats, grads): the objective's value includes the penalty, the rest is the data term's
  np.testing.assert_allclose(decayed[0], plain[0] + 0.1 * extending.l2_penalty(state.params), rtol=1e-6)
  np.testing.assert_allclose(decayed[1], plain[1])
  jax.tree_util.tree_map(np.testing.assert_allclose, decayed[2], plain[2])  # the same BatchNorm statistics
  expected = jax.tree_util.tree_map(lambda g, p: g + 0.1 * p, plain[3], state.params)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), decayed[3], expected)


def test_train_and_evaluate_takes_the_objective_and_the_step(extending, toy_run, tmp_path, tfds_dir):
  workdir, _ = toy_run
  make_objective = functools.partial(extending.make_weight_decay_objective, weight_decay=0.01)
  summary = train_and_evaluate(
    _logged_every_step(extending.toy_config(tfds_dir)),
    str(tmp_path / "decay"),
    make_objective=make_objective,
    make_step=extending.make_penalty_logging_step,
  )
  assert summary["steps"] == 6 and 0.0 <= summary["validation"]["loss"] <= 2.0  # evaluated on the loss alone
  plain, decayed = _records(workdir, "train"), _records(str(tmp_path / "decay"), "train")
  assert [r["step"] for r in decayed] == [r["step"] for r in plain] == [1, 2, 3, 4, 5, 6]
  assert "l2_penalty" not in plain[0] and all(r["l2_penalty"] > 0 for r in decayed)
  # Step 1 starts both runs from the same parameters, batch and keys: the logged loss (the objective's value) differs
  # by the penalty of those parameters, which the step logs.
  np.testing.assert_allclose(decayed[0]["loss"] - plain[0]["loss"], 0.01 * decayed[0]["l2_penalty"], rtol=1e-4)
  # The penalty's gradient changes every update from step 2 (step 1's is 0: the warmup starts at learning rate 0).
  assert decayed[0]["param_norm"] == plain[0]["param_norm"]
  assert all(d["param_norm"] != p["param_norm"] for d, p in zip(decayed[1:], plain[1:], strict=True))
