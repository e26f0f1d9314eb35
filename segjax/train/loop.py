"""``train_and_evaluate``: the outer loop, where all I/O happens (data, logs, checkpoints, pictures).

The loop resumes from the latest checkpoint of its workdir, runs the jitted pure ``train_step``, logs every
``log_every_steps`` (the only host syncs), evaluates every ``eval_every_steps`` on the whole validation split with an
accumulated confusion matrix, and checkpoints every ``checkpoint_every_steps``. At the end it evaluates the validation
and test splits, plots curves and a sample grid, writes test-split predictions and prints a summary table.
"""

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from segjax import checkpoint, viz
from segjax.data import Dataset, load_dataset
from segjax.data.augment import make_augment_fn
from segjax.data.pipeline import eval_batches, prefetch_to_device, train_batches, train_dataset
from segjax.errors import SegjaxError
from segjax.logging_utils import MetricWriter
from segjax.losses import get_loss
from segjax.metrics import summarize_confusion
from segjax.models import get_model
from segjax.train.optim import create_optimizer, create_schedule
from segjax.train.state import TrainState, count_params, create_train_state
from segjax.train.step import make_eval_step, make_train_step


def check_workdir(workdir: str) -> None:
  """Creates ``workdir`` and proves it writable before any work starts; a SegjaxError says what to do otherwise."""
  probe = os.path.join(workdir, ".write_probe")
  try:
    os.makedirs(workdir, exist_ok=True)
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise SegjaxError(f"workdir '{workdir}' is not writable ({e.strerror}); pass a writable --workdir.") from e


def create_model(config: ml_collections.ConfigDict, num_classes: int):
  """The model named by ``config.model.name`` with ``config.model.kwargs``, for ``num_classes`` outputs."""
  return get_model(config.model.name, num_classes=num_classes, **config.model.get("kwargs", {}))


def run_config(config: ml_collections.ConfigDict, dataset: Dataset) -> ml_collections.ConfigDict:
  """The config saved with each checkpoint: the experiment config plus the dataset facts needed to predict."""
  saved = ml_collections.ConfigDict(config.to_dict())
  saved.dataset_info = {
    "name": dataset.name,
    "num_classes": dataset.num_classes,
    "num_channels": dataset.num_channels,
    "class_names": list(dataset.class_names),
  }
  return saved


def mean_metrics(history: list[dict[str, jax.Array]]) -> dict[str, float]:
  """Host-side means of per-step metric dicts (one device-to-host transfer for the whole list)."""
  history = jax.device_get(history)
  return {k: float(np.mean([h[k] for h in history])) for k in history[0]}


def evaluate(state: TrainState, eval_step, source: Any, *, batch_size: int, num_classes: int) -> dict[str, float]:
  """Runs ``eval_step`` over a whole split and returns loss and confusion-matrix metrics for the split."""
  confusion = np.zeros((num_classes, num_classes), np.int64)
  loss_sum = weight_sum = 0.0
  for batch in prefetch_to_device(eval_batches(source, batch_size=batch_size)):
    out = jax.device_get(eval_step(state, batch))
    confusion += out["confusion"]
    loss_sum += float(out["loss_sum"])
    weight_sum += float(out["weight_sum"])
  return {"loss": loss_sum / max(weight_sum, 1.0), **summarize_confusion(confusion)}


def predict_split(state: TrainState, source: Any, *, batch_size: int, limit: int) -> tuple[np.ndarray, ...]:
  """Images, labels and predicted label maps of the first ``limit`` examples of a split."""
  predict = jax.jit(
    lambda s, x: jnp.argmax(s.apply_fn({"params": s.params, "batch_stats": s.batch_stats}, x, train=False), -1)
  )
  images, labels, predictions = [], [], []
  for batch in eval_batches(source, batch_size=batch_size):
    valid = int(batch["weights"][:, 0, 0].sum())
    images.append(batch["image"][:valid])
    labels.append(batch["label"][:valid])
    predictions.append(np.asarray(predict(state, batch["image"]))[:valid])
    if sum(len(x) for x in images) >= limit:
      break
  return tuple(np.concatenate(x)[:limit] for x in (images, labels, predictions))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains, evaluates, checkpoints and writes the run's outputs into ``workdir``.

  Running it again on the same workdir resumes from the latest checkpoint (and, when training had finished, only
  redoes the final evaluation and outputs).

  Args:
    config: the experiment config (see ``experiments/configs/default.py`` for every key).
    workdir: the run directory; created if missing.

  Returns:
    The final summary: ``{'validation': metrics, 'test': metrics, 'steps', 'train_seconds', ...}``.

  Raises:
    SegjaxError: for bad config values, an unknown model/dataset/loss name, or an unwritable workdir.
  """
  check_workdir(workdir)
  is_main = jax.process_index() == 0
  dataset = load_dataset(config.data)
  train_source = dataset.split(config.data.train_split)
  eval_source = dataset.split(config.data.eval_split)
  model = create_model(config, dataset.num_classes)
  total_steps = config.num_train_steps
  tx = create_optimizer(config.optimizer, total_steps)
  schedule = create_schedule(config.optimizer, total_steps)
  input_shape = (1, *np.asarray(train_source[0]["image"]).shape)
  state = create_train_state(jax.random.PRNGKey(config.seed), model, tx, input_shape)
  if is_main:
    print(f"model {config.model.name}: {count_params(state.params):,} parameters; workdir {workdir}")

  manager = checkpoint.create_manager(workdir, max_to_keep=config.max_checkpoints_to_keep)
  if manager.latest_step() is not None:
    state = checkpoint.restore_state(manager, state)
    if is_main:
      print(f"resuming from step {int(state.step)} of {checkpoint.checkpoint_dir(workdir)}")
  start_step = int(state.step)
  saved_config = run_config(config, dataset)

  loss_fn = get_loss(config.loss)
  train_step = jax.jit(make_train_step(loss_fn, make_augment_fn(config.augment)), donate_argnums=0)
  eval_step = jax.jit(make_eval_step(loss_fn, dataset.num_classes))
  writer = MetricWriter(workdir, resume_step=start_step, enabled=is_main)
  batches = prefetch_to_device(
    train_batches(
      train_dataset(
        train_source,
        batch_size=config.batch_size,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
      ),
      start_step=start_step,
      num_threads=config.data.num_threads,
    )
  )

  def run_eval(step: int) -> dict[str, float]:
    metrics = evaluate(
      state, eval_step, eval_source, batch_size=config.eval_batch_size, num_classes=dataset.num_classes
    )
    writer.write(step, "validation", metrics)
    return metrics

  train_start = time.perf_counter()
  pending: list[dict[str, jax.Array]] = []
  val_metrics = None
  try:
    with tqdm(total=total_steps, initial=start_step, desc="train", unit="step", disable=not is_main) as bar:
      for step in range(start_step + 1, total_steps + 1):
        state, metrics = train_step(state, next(batches))
        pending.append(metrics)
        checkpoint_now = step % config.checkpoint_every_steps == 0 or step == total_steps
        # Metrics are also fetched before every checkpoint, so a non-finite state is never saved.
        if step % config.log_every_steps == 0 or checkpoint_now:
          logged = {**mean_metrics(pending), "learning_rate": float(schedule(step - 1))}
          pending = []
          if not (np.isfinite(logged["loss"]) and np.isfinite(logged["grad_norm"])):
            raise SegjaxError(
              f"non-finite loss or gradient (loss {logged['loss']}, grad_norm {logged['grad_norm']}) at or before "
              f"step {step}; the last checkpoint is kept. Lower optimizer.learning_rate or set "
              "optimizer.grad_clip_norm."
            )
          writer.write(step, "train", logged)
          bar.set_postfix(loss=f"{logged['loss']:.4f}")
        if step % config.eval_every_steps == 0 or step == total_steps:
          val_metrics = run_eval(step)
          bar.write(f"step {step}: validation loss {val_metrics['loss']:.4f}, mean IoU {val_metrics['mean_iou']:.4f}")
        if checkpoint_now:
          checkpoint.save(manager, state, saved_config)
        bar.update(1)
  finally:
    manager.wait_until_finished()
    manager.close()
    writer.flush()
  train_seconds = time.perf_counter() - train_start

  if val_metrics is None:  # resumed a finished run: evaluate the restored state again
    val_metrics = evaluate(
      state, eval_step, eval_source, batch_size=config.eval_batch_size, num_classes=dataset.num_classes
    )
  summary = {
    "steps": int(state.step),
    "trained_steps_this_run": int(state.step) - start_step,
    "train_seconds_this_run": round(train_seconds, 2),
    "num_params": count_params(state.params),
    "validation": val_metrics,
  }
  test_split = config.data.get("test_split")
  if test_split and test_split in dataset.splits:
    summary["test"] = evaluate(
      state, eval_step, dataset.split(test_split), batch_size=config.eval_batch_size, num_classes=dataset.num_classes
    )
  writer.close()
  if is_main:
    write_outputs(state, config, dataset, workdir, summary)
    print(format_summary(summary, dataset.class_names))
  return summary


def write_outputs(
  state: TrainState, config: ml_collections.ConfigDict, dataset: Dataset, workdir: str, summary: dict
) -> None:
  """Curves, the validation sample grid, ``summary.json``, and test-split images for ``experiments.predict``."""
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(metrics_path):
    viz.plot_curves(viz.read_metrics(metrics_path), os.path.join(workdir, "curves.png"))
  images, labels, predictions = predict_split(
    state, dataset.split(config.data.eval_split), batch_size=config.eval_batch_size, limit=config.num_sample_images
  )
  viz.plot_samples(images, labels, predictions, os.path.join(workdir, "samples.png"))
  test_split = config.data.get("test_split")
  if test_split and test_split in dataset.splits and config.num_test_images > 0:
    export_images(dataset.split(test_split), os.path.join(workdir, "test_images"), test_split, config.num_test_images)
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)


def export_images(source, directory: str, prefix: str, limit: int) -> None:
  """Writes the first ``limit`` images of a split as PNG files ``<prefix>_<i>.png``."""
  from PIL import Image

  os.makedirs(directory, exist_ok=True)
  for i in range(min(limit, len(source))):
    image = np.asarray(source[i]["image"])
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(
      os.path.join(directory, f"{prefix}_{i:04d}.png")
    )


def format_summary(summary: dict, class_names: tuple[str, ...]) -> str:
  """A short table of the final per-class and mean scores for stdout."""
  splits = [s for s in ("validation", "test") if s in summary]
  header = f"{'':<22}" + "".join(f"{s:>24}" for s in splits)
  lines = [
    f"segjax: {summary['steps']} steps, {summary['num_params']:,} parameters, "
    f"{summary['train_seconds_this_run']:.0f} s training this run",
    header,
    f"{'':<22}" + "".join(f"{'IoU':>12}{'Dice':>12}" for _ in splits),
  ]
  for c, name in enumerate(class_names):
    row = f"{c}: {name}"[:21]
    lines.append(
      f"{row:<22}" + "".join(f"{summary[s][f'iou/{c}']:>12.4f}{summary[s][f'dice/{c}']:>12.4f}" for s in splits)
    )
  for key in ("mean_iou", "foreground_iou", "pixel_accuracy", "loss"):
    lines.append(f"{key:<22}" + "".join(f"{summary[s][key]:>24.4f}" for s in splits))
  return "\n".join(lines)
