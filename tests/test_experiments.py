"""End to end: `python -m experiments.train` and `experiments.predict` on the tiny config, and their errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "experiments/configs/tiny.py"
EMA = "--config.ema_decay=0.9"  # the shared tiny run keeps an EMA, so evaluation and predict run with one


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "XLA_FLAGS": ""}
  return subprocess.run(
    [sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
  )


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tfds_dir):
  workdir = str(tmp_path_factory.mktemp("run"))
  result = _run(
    "experiments.train", f"--config={TINY}", f"--workdir={workdir}", f"--config.data.tfds_data_dir={tfds_dir}", EMA
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_train_writes_checkpoints_logs_plots_and_summary(trained):
  workdir, result = trained
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
  records = _records(workdir)
  assert [r["step"] for r in records if r["split"] == "train"] == [2, 3, 4, 6]  # every 2, and at checkpoints
  assert [r["step"] for r in records if r["split"] == "validation"] == [3, 6]
  assert all(np.isfinite(r["loss"]) for r in records)
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tensorboard")))
  for picture in ("curves.png", "samples.png"):
    with Image.open(os.path.join(workdir, picture)) as img:
      assert img.size[0] > 200 and img.size[1] > 200
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  assert summary["steps"] == 6
  assert 0.0 <= summary["validation"]["mean_iou"] <= 1.0
  assert "foreground_iou" in result.stdout and "1: cell" in result.stdout
  assert sorted(os.listdir(os.path.join(workdir, "test_images"))) == ["test_0000.png", "test_0001.png"]


def test_train_again_resumes_from_latest_checkpoint(trained, tfds_dir, tmp_path):
  workdir, _ = trained
  import shutil

  resumed = str(tmp_path / "resumed")
  shutil.copytree(workdir, resumed)
  result = _run(
    "experiments.train",
    f"--config={TINY}",
    f"--workdir={resumed}",
    f"--config.data.tfds_data_dir={tfds_dir}",
    "--config.num_train_steps=8",
    EMA,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "resuming from step 6" in result.stdout
  steps = [r["step"] for r in _records(resumed) if r["split"] == "train"]
  assert steps == [2, 3, 4, 6, 8]
  assert json.load(open(os.path.join(resumed, "summary.json")))["trained_steps_this_run"] == 2


def test_an_ensemble_averages_its_members_probabilities_and_predict_takes_a_folder_of_folds(trained, tmp_path):
  import dataclasses
  import shutil

  import jax

  from segjax.data.io import read_image
  from segjax.inference import Ensemble, ensemble_workdirs, load_ensemble, load_predictor

  workdir, _ = trained
  folds = tmp_path / "folds"
  for name in ("fold0", "fold1"):  # two identical members
    shutil.copytree(workdir, folds / name)
  (folds / "notes").mkdir()  # not a workdir: ignored
  assert ensemble_workdirs(str(folds)) == [str(folds / "fold0"), str(folds / "fold1")]
  single = load_predictor(workdir)
  image = read_image(os.path.join(workdir, "test_images", "test_0000.png"), single.num_channels)
  ensemble = load_ensemble(str(folds))
  assert isinstance(ensemble, Ensemble) and len(ensemble.members) == 2
  np.testing.assert_allclose(ensemble.predict(image), single.predict(image), atol=1e-6)  # two identical = one

  other = dataclasses.replace(
    single, state=single.state.replace(params=jax.tree.map(lambda x: -x, single.state.params))
  )
  mixed = Ensemble([single, other]).predict(image)
  expected = (single.predict(image).astype(np.float64) + other.predict(image)) / 2
  np.testing.assert_allclose(mixed, expected, atol=1e-6)
  assert np.abs(mixed - single.predict(image)).max() > 1e-2  # the second member counts

  out = tmp_path / "pred"
  result = _run("experiments.predict", f"--workdir={folds}", f"--input={workdir}/test_images", f"--output={out}")
  assert result.returncode == 0, result.stderr[-3000:]
  np.testing.assert_array_equal(np.asarray(Image.open(out / "test_0000_mask.png")), single.predict_labels(image))
  empty = tmp_path / "empty"
  empty.mkdir()
  result = _run("experiments.predict", f"--workdir={empty}", f"--input={workdir}/test_images", f"--output={out}")
  _assert_one_line_error(result, "holds no checkpoints/ and no workdirs with checkpoints")


def test_predict_writes_masks_equal_to_in_process_prediction(trained, tmp_path):
  workdir, _ = trained
  out = tmp_path / "pred"
  result = _run("experiments.predict", f"--workdir={workdir}", f"--input={workdir}/test_images", f"--output={out}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert sorted(os.listdir(out)) == [
    "test_0000_mask.png",
    "test_0000_overlay.png",
    "test_0001_mask.png",
    "test_0001_overlay.png",
  ]

  from segjax.data.io import read_image
  from segjax.inference import load_predictor

  predictor = load_predictor(workdir)
  assert predictor.step == 6
  image = read_image(os.path.join(workdir, "test_images", "test_0000.png"), predictor.num_channels)
  written = np.asarray(Image.open(out / "test_0000_mask.png"))
  assert written.shape == image.shape[:2]
  np.testing.assert_array_equal(written, predictor.predict_labels(image))
  overlay = np.asarray(Image.open(out / "test_0000_overlay.png"))
  assert overlay.shape == (*image.shape[:2], 3)


def test_a_run_with_ema_evaluates_and_predicts_with_the_averaged_weights(trained):
  import jax
  import orbax.checkpoint as ocp

  from segjax.data import load_dataset
  from segjax.inference import load_predictor
  from segjax.losses import softmax_cross_entropy
  from segjax.train import checkpoint, parallel
  from segjax.train.loop import evaluate
  from segjax.train.step import make_eval_step

  workdir, _ = trained
  manager = checkpoint.create_manager(workdir, read_only=True)
  earlier, saved = (
    manager.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"] for s in (3, 6)
  )
  manager.close()
  predictor = load_predictor(workdir)
  assert predictor.config.ema_decay == 0.9 and predictor.step == 6
  # experiments.predict's model is the checkpoint's average, which is not the trained weights ...
  for part in ("params", "batch_stats"):
    jax.tree_util.tree_map(np.testing.assert_array_equal, getattr(predictor.state, part), saved["ema"][part])
  leaves = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(tree)])  # noqa: E731
  ema, trained_params = leaves(saved["ema"]["params"]), leaves(saved["params"])
  assert np.abs(ema - trained_params).max() > 1e-4
  # ... but follows them: from step 3 to step 6 it moved towards the trained weights (the step's own EMA is checked
  # against a NumPy recurrence in test_parallel.py)
  distance = lambda x: np.linalg.norm(x - trained_params)  # noqa: E731
  assert distance(ema) < 0.9 * distance(leaves(earlier["ema"]["params"]))
  # and the run's final validation scores are those of the average, not of the trained weights
  data = predictor.config.data
  source = load_dataset(data).split(data.eval_split)
  score = lambda state: evaluate(  # noqa: E731
    state,
    jax.jit(make_eval_step(softmax_cross_entropy, 2)),
    source,
    batch_size=predictor.config.eval_batch_size,
    num_classes=2,
    geometry=predictor.geometry,
    mesh=parallel.create_mesh(predictor.devices),
  )
  logged = json.load(open(os.path.join(workdir, "summary.json")))["validation"]
  averaged = score(predictor.state)
  weights = jax.device_put(
    {"params": saved["params"], "batch_stats": saved["batch_stats"]}, predictor.state.step.sharding
  )
  trained_weights = score(predictor.state.replace(**weights))
  assert averaged["loss"] == pytest.approx(logged["loss"], rel=1e-5)
  assert abs(trained_weights["loss"] - logged["loss"]) > 1e-3 * logged["loss"], (trained_weights, logged)


def _assert_one_line_error(result, *fragments):
  assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: "), result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  for fragment in fragments:
    assert fragment in last, last


def test_missing_config_file_is_one_line_error(tmp_path):
  result = _run("experiments.train", "--config=experiments/configs/nope.py", f"--workdir={tmp_path}")
  _assert_one_line_error(result, "experiments/configs/nope.py", "does not exist", "synthetic_cells.py")


def test_a_mistyped_override_key_is_one_line_naming_the_key_and_the_close_match(tmp_path):
  result = _run(
    "experiments.train",
    "--config=experiments/configs/folder_unet.py",
    f"--workdir={tmp_path}",
    "--config.model.kwargs.deppth=3",
  )
  _assert_one_line_error(result, "unknown config key 'model.kwargs.deppth'", "did you mean 'model.kwargs.depth'?")
  result = _run("experiments.train", f"--config={TINY}", "--config.nope=1", f"--workdir={tmp_path}")
  _assert_one_line_error(result, "unknown config key 'nope'", "the config has: augment, batch_size")


def test_a_config_file_with_a_syntax_error_is_one_line_naming_the_file_and_line(tmp_path):
  path = tmp_path / "broken.py"
  path.write_text(
    "import ml_collections\n\ndef get_config():\n  config = ml_collections.ConfigDict(\n  return config\n"
  )
  result = _run("experiments.train", f"--config={path}", f"--workdir={tmp_path / 'run'}")
  _assert_one_line_error(result, f"config file '{path}' line 4", "fix the file")


def test_unknown_model_name_is_one_line_error(tmp_path, tfds_dir):
  result = _run(
    "experiments.train",
    f"--config={TINY}",
    f"--workdir={tmp_path}",
    f"--config.data.tfds_data_dir={tfds_dir}",
    "--config.model.name=unet_typo",
  )
  _assert_one_line_error(result, "unknown model 'unet_typo'", "model.name", "resnet18")
  assert not os.path.exists(tmp_path / "checkpoints")


def test_predict_without_checkpoint_is_one_line_error(tmp_path):
  image = tmp_path / "a.png"
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(image)
  result = _run(
    "experiments.predict", f"--workdir={tmp_path / 'empty'}", f"--input={image}", f"--output={tmp_path / 'o'}"
  )
  _assert_one_line_error(result, "no checkpoint", "train first")


def test_predict_on_non_image_and_empty_folder_are_one_line_errors(trained, tmp_path):
  workdir, _ = trained
  bad = tmp_path / "notes.png"
  bad.write_text("not an image")
  out = tmp_path / "out"
  result = _run("experiments.predict", f"--workdir={workdir}", f"--input={bad}", f"--output={out}")
  _assert_one_line_error(result, str(bad), "not a readable image")
  assert not out.exists()  # nothing half-written
  empty = tmp_path / "empty"
  empty.mkdir()
  result = _run("experiments.predict", f"--workdir={workdir}", f"--input={empty}", f"--output={out}")
  _assert_one_line_error(result, str(empty), "holds no images")


def test_non_finite_loss_stops_with_step_and_keeps_last_checkpoint(tmp_path, tfds_dir):
  from experiments.configs import tiny
  from segjax.errors import SegjaxError
  from segjax.train.loop import train_and_evaluate

  config = tiny.get_config()
  config.data.tfds_data_dir = tfds_dir
  config.num_train_steps = 3
  train_and_evaluate(config, str(tmp_path))  # a good checkpoint at step 3
  config.num_train_steps = 6
  config.optimizer.learning_rate = 1e30  # same state structure, so it resumes, then blows up
  config.log_every_steps = 1
  with pytest.raises(
    SegjaxError, match=r"non-finite loss, gradient or parameters at step 4 \(.*\); the last checkpoint is kept"
  ):
    train_and_evaluate(config, str(tmp_path))
  assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()) == [3]


def test_multiclass_rgb_variant_trains_and_predicts_four_classes(tmp_path, tfds_dir):
  from experiments.configs import tiny
  from segjax.data.io import read_image
  from segjax.inference import load_predictor
  from segjax.train.loop import train_and_evaluate

  config = tiny.get_config("tiny_rgb")
  config.data.tfds_data_dir = tfds_dir
  config.num_train_steps = 2
  summary = train_and_evaluate(config, str(tmp_path))
  assert {f"iou/{c}" for c in range(4)} <= set(summary["validation"])
  predictor = load_predictor(str(tmp_path))
  assert predictor.num_channels == 3 and predictor.config.dataset_info.num_classes == 4
  image = read_image(str(tmp_path / "test_images" / "test_0000.png"), 3)
  assert image.shape == (64, 64, 3)
  probabilities = predictor.predict_probabilities(image)
  assert probabilities.shape == (64, 64, 4)
  np.testing.assert_allclose(probabilities.sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(predictor.predict_labels(image), probabilities.argmax(-1))


def _tiny(tfds_dir, **overrides):
  from experiments.configs import tiny

  config = tiny.get_config()
  config.data.tfds_data_dir = tfds_dir
  for key, value in overrides.items():
    config[key] = value
  return config


def test_resume_with_incompatible_config_names_differing_keys(tmp_path, tfds_dir):
  from segjax.errors import SegjaxError
  from segjax.train.loop import train_and_evaluate

  train_and_evaluate(_tiny(tfds_dir, num_train_steps=3), str(tmp_path))
  wider = _tiny(tfds_dir, num_train_steps=6)
  wider.model.kwargs.base_width = 4
  with pytest.raises(SegjaxError, match=r"does not fit this config \(differing keys: model.kwargs.base_width\)"):
    train_and_evaluate(wider, str(tmp_path))


def test_classifier_model_is_refused_for_segmentation(tmp_path, tfds_dir):
  from segjax.errors import SegjaxError
  from segjax.train.loop import train_and_evaluate

  config = _tiny(tfds_dir)
  config.model.name = "resnet18"
  config.model.kwargs = {}
  with pytest.raises(SegjaxError, match="model 'resnet18' .* it is a classifier"):
    train_and_evaluate(config, str(tmp_path))


def test_one_logit_sigmoid_loss_trains_evaluates_and_predicts_two_classes(tmp_path, tfds_dir):
  from experiments.configs import tiny
  from segjax.data.io import read_image
  from segjax.inference import load_predictor
  from segjax.train.loop import train_and_evaluate

  config = tiny.get_config()
  config.data.tfds_data_dir = tfds_dir
  config.num_train_steps = 2
  config.loss = "sigmoid_dice_loss"
  summary = train_and_evaluate(config, str(tmp_path))
  assert 0.0 <= summary["validation"]["mean_iou"] <= 1.0
  predictor = load_predictor(str(tmp_path))
  image = read_image(str(tmp_path / "test_images" / "test_0000.png"), 1)
  assert predictor.predict_logits(image).shape == (*image.shape[:2], 1)  # one foreground logit
  probabilities = predictor.predict_probabilities(image)
  assert probabilities.shape == (*image.shape[:2], 2)
  np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-6)
  np.testing.assert_array_equal(predictor.predict_labels(image), probabilities[..., 1] > 0.5)


def test_binary_loss_on_multiclass_data_is_a_clear_error(tmp_path, tfds_dir):
  from experiments.configs import tiny
  from segjax.errors import SegjaxError
  from segjax.train.loop import train_and_evaluate

  config = tiny.get_config("tiny_rgb")
  config.data.tfds_data_dir = tfds_dir
  config.loss = "sigmoid_cross_entropy"
  with pytest.raises(SegjaxError, match="loss 'sigmoid_cross_entropy' \\(config key loss\\) is binary, but the data"):
    train_and_evaluate(config, str(tmp_path))


def test_predict_tiles_with_tta_writes_every_output_kind_and_reports_bad_files_but_does_the_rest(trained, tmp_path):
  workdir, _ = trained
  folder = tmp_path / "in"
  folder.mkdir()
  Image.open(os.path.join(workdir, "test_images", "test_0000.png")).save(folder / "good.tif")
  (folder / "broken.png").write_text("not an image")
  rng = np.random.default_rng(0)
  Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(folder / "colour.png")
  out = tmp_path / "out"
  result = _run(
    "experiments.predict",
    f"--workdir={workdir}",
    f"--input={folder}/*",
    f"--output={out}",
    "--tiling=sliding_window",
    "--tile_size=32",
    "--overlap=0.25",
    "--tta=flips",
    "--outputs=labels,instances,probabilities,overlay",
  )
  assert result.returncode == 2  # two files failed ...
  assert "'" + str(folder / "broken.png") + "' is not a readable image" in result.stderr
  assert "colour.png' is a colour image (RGB) but the model takes 1 (grayscale) channel" in result.stderr
  assert "2 of 3 images could not be predicted" in result.stderr.strip().splitlines()[-1]
  # ... and the good one was still done, equal to the in-process prediction
  assert sorted(os.listdir(out)) == [
    "good_instances.png",
    "good_mask.png",
    "good_overlay.png",
    "good_probabilities.npy",
  ]
  from segjax.data.io import read_image
  from segjax.inference import load_predictor
  from segjax.tiling import Tiling

  predictor = load_predictor(workdir)
  image = read_image(str(folder / "good.tif"), 1)
  expected = predictor.predict(image, Tiling(mode="sliding_window", tile_size=32, overlap=0.25, tta="flips"))
  np.testing.assert_allclose(np.load(out / "good_probabilities.npy"), expected, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(Image.open(out / "good_mask.png")), np.argmax(expected, -1))
  instances = np.asarray(Image.open(out / "good_instances.png"))
  assert instances.dtype == np.uint16 and ((instances > 0) <= (np.argmax(expected, -1) > 0)).all()


def test_exported_predictor_reloads_in_a_fresh_process_without_segjax(trained, tmp_path):
  workdir, _ = trained
  artifact = tmp_path / "model.jax_export"
  result = _run(
    "experiments.export", f"--workdir={workdir}", f"--output={artifact}", "--tile_size=64", "--input_dtype=uint8"
  )
  assert result.returncode == 0, result.stderr[-3000:]
  from segjax.inference import load_predictor
  from segjax.tiling import Tiling

  predictor = load_predictor(workdir)
  tiles = (np.random.default_rng(1).random((3, 64, 64, 1)) * 255).astype(np.uint8)
  np.save(tmp_path / "tiles.npy", tiles)
  expected = np.stack([predictor.predict(tile, Tiling(mode="whole")) for tile in tiles])
  script = (
    "import sys, jax, numpy as np\n"
    f"call = jax.export.deserialize(bytearray(open({str(artifact)!r}, 'rb').read())).call\n"
    f"tiles = np.load({str(tmp_path / 'tiles.npy')!r})\n"
    f"np.save({str(tmp_path / 'out.npy')!r}, np.concatenate([call(tiles[:1]), call(tiles[1:])]))\n"
    "assert not any(m.startswith(('segjax', 'flax')) for m in sys.modules), 'model code was imported'\n"
  )
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  reloaded = subprocess.run(
    [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
  )
  assert reloaded.returncode == 0, reloaded.stderr[-3000:]
  np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, atol=1e-5)  # batch sizes 1 and 2


def test_prediction_restores_the_model_variables_without_building_an_optimizer(trained, monkeypatch):
  import jax

  from segjax.errors import SegjaxError
  from segjax.inference import load_predictor
  from segjax.train import checkpoint, optim

  workdir, _ = trained
  reference = load_predictor(workdir)
  monkeypatch.setattr(optim, "OPTIMIZERS", optim.Registry("optimizer", "optimizer.name"))  # no optimizer exists
  predictor = load_predictor(workdir)
  jax.tree_util.tree_map(np.testing.assert_array_equal, predictor.state.params, reference.state.params)
  manager = checkpoint.create_manager(workdir, read_only=True)
  wrong = jax.tree_util.tree_map(
    lambda x: jax.ShapeDtypeStruct((*x.shape[:-1], x.shape[-1] + 1), x.dtype), reference.state.params
  )
  with pytest.raises(SegjaxError, match="holds no model variables of this model's shapes"):
    checkpoint.restore_variables(manager, wrong, reference.state.batch_stats, ema=True)
  manager.close()
