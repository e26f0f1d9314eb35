"""``train_and_evaluate``: the outer loop, where all I/O happens (data, logs, checkpoints, pictures).

The loop builds the experiment once (:func:`segjax.train.setup.build`), resumes from the latest checkpoint of its
workdir, runs the compiled pure ``train_step``, fetches metrics every ``log_every_steps`` and before every checkpoint
(the only host syncs), evaluates every ``eval_every_steps`` on the whole validation split with an accumulated
confusion matrix (:mod:`segjax.train.evaluation`), and checkpoints every ``checkpoint_every_steps``. At the end it
evaluates the validation and test splits and writes the outputs (:mod:`segjax.train.outputs`).

The names of the setup, evaluation and output modules are also importable from here, where they lived before.
"""

import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from segjax.data.pipeline import eval_batches, prefetch_to_device
from segjax.errors import SegjaxError
from segjax.logging_utils import MetricWriter
from segjax.metrics import summarize_confusion
from segjax.train import checkpoint, parallel
from segjax.train.evaluation import evaluate, predict_split
from segjax.train.outputs import export_images, format_summary, write_outputs
from segjax.train.preemption import Preemption
from segjax.train.setup import (
  Experiment,
  build,
  check_data_state,
  check_divisible,
  check_segmentation_output,
  check_workdir,
  data_state,
  run_config,
  training_batches,
  training_geometry,
  validate_config,
  weight_map_of,
)
from segjax.train.state import count_params
from segjax.train.step import make_train_step

__all__ = [
  "Experiment",
  "build",
  "check_data_state",
  "check_divisible",
  "check_segmentation_output",
  "check_workdir",
  "data_state",
  "eval_batches",
  "evaluate",
  "export_images",
  "format_summary",
  "mean_metrics",
  "predict_split",
  "run_config",
  "summarize_confusion",
  "train_and_evaluate",
  "training_batches",
  "training_geometry",
  "validate_config",
  "weight_map_of",
  "write_outputs",
]


def mean_metrics(history: list[tuple[int, dict[str, jax.Array]]], *, loss_scaled: bool = False) -> dict[str, float]:
  """Host-side means of per-step metric dicts (one device-to-host transfer for the whole list).

  Raises:
    SegjaxError: naming the first step whose loss, gradient or parameter norm is not finite. With float16 loss
      scaling a step with non-finite gradients was skipped (and counted in ``skipped``); only the parameters count.
  """
  steps = [step for step, _ in history]
  values = jax.device_get([m for _, m in history])
  checked = ("param_norm",) if loss_scaled else ("loss", "grad_norm", "param_norm")
  for step, m in zip(steps, values, strict=True):
    if not all(np.isfinite(m[k]) for k in checked):
      raise SegjaxError(
        f"non-finite loss, gradient or parameters at step {step} (loss {float(m['loss'])}, grad_norm "
        f"{float(m['grad_norm'])}, param_norm {float(m['param_norm'])}); the last checkpoint is kept. Lower "
        "optimizer.learning_rate or set optimizer.grad_clip_norm."
      )
  return {k: float(np.mean([m[k] for m in values])) for k in values[0]}


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  devices: list[jax.Device] | None = None,
  make_objective: Callable[[Any], Callable] | None = None,
  make_step: Callable[..., Callable] = make_train_step,
) -> dict[str, Any]:
  """Trains, evaluates, checkpoints and writes the run's outputs into ``workdir``.

  Running it again on the same workdir resumes from the latest checkpoint (and, when training had finished, only
  redoes the final evaluation and outputs). SIGTERM (preemption) makes it checkpoint the current step and return.
  Training is data-parallel over ``devices`` (:mod:`segjax.train.parallel`); with several processes
  (``jax.distributed``) every process runs this function, reads its rows of each batch and joins the collective
  checkpoint writes, and only process 0 writes logs and pictures.

  Args:
    config: the experiment config (see ``experiments/configs/synthetic_cells.py`` for every key).
    workdir: the run directory; created if missing.
    devices: the devices to train on; default all devices of all processes.
    make_objective: ``make_objective(loss_fn) -> objective`` changes what is differentiated (e.g. adds a
      regulariser; see :func:`segjax.train.step.make_gradient_fn`), keeping everything else of the standard step.
    make_step: builds the pure train step, called as ``make_step(loss_fn, augment_fn, axis_name=,
      grad_accum_steps=, ema_decay=, objective=)``; default :func:`segjax.train.step.make_train_step`.

  Returns:
    The final summary: ``{'validation': metrics, 'test': metrics, 'steps', 'train_seconds_this_run', ...}``, or
    ``{'preempted': True, 'steps': ...}`` after a SIGTERM.

  Raises:
    SegjaxError: for bad config values, an unknown model/dataset/loss name, an unwritable workdir, a checkpoint that
      does not fit the config, or a non-finite loss.
  """
  experiment = build(config, devices=devices, make_objective=make_objective, make_step=make_step, workdir=workdir)
  config = experiment.config  # with every default filled in (segjax.config.with_defaults)
  is_main = jax.process_index() == 0
  mesh, total_steps = experiment.mesh, config.num_train_steps
  state = experiment.initial_state()
  if is_main:
    print(
      f"model {config.model.name}: {count_params(state.params):,} parameters; {mesh.size} devices in "
      f"{jax.process_count()} processes ({config.parallelism}); workdir {workdir}"
    )

  saved_config = experiment.run_config()
  best_metric = config.checkpoint_best_metric or None
  manager = checkpoint.create_manager(
    workdir,
    max_to_keep=config.max_checkpoints_to_keep,
    best_metric=best_metric,
    best_mode=config.checkpoint_best_mode,
    keep_best=config.max_best_checkpoints_to_keep,
  )
  restored = checkpoint.restore_latest(manager, state, saved_config) if manager.all_steps() else None
  if restored is not None:
    state, saved_data_state = restored
    check_data_state(saved_data_state, experiment.data_state(int(parallel.fetch(state.step))))
    if is_main:
      print(f"resuming from step {int(parallel.fetch(state.step))} of {checkpoint.checkpoint_dir(workdir)}")
  start_step = int(parallel.fetch(state.step))

  local_eval_state = lambda: parallel.to_local(state.for_eval(), mesh)  # noqa: E731
  writer = MetricWriter(workdir, resume_step=start_step, enabled=is_main)
  batches = prefetch_to_device(experiment.training_batches(start_step), place=experiment.place_batch)

  train_start = time.perf_counter()
  pending: list[tuple[int, dict[str, jax.Array]]] = []
  val_metrics, preempted, eval_seconds = None, False, 0.0
  try:
    with (
      Preemption() as preemption,
      tqdm(total=total_steps, initial=start_step, desc="train", unit="step", disable=not is_main) as bar,
    ):
      for step in range(start_step + 1, total_steps + 1):
        state, metrics = experiment.train_step(state, next(batches))
        pending.append((step, metrics))
        preempted = preemption.reached(step)
        checkpoint_now = step % config.checkpoint_every_steps == 0 or step == total_steps or preempted
        # Metrics are also fetched before every checkpoint, so a non-finite state is never saved.
        if step % config.log_every_steps == 0 or checkpoint_now:
          logged = {
            **mean_metrics(pending, loss_scaled=experiment.loss_scale is not None),
            "learning_rate": float(experiment.schedule(step - 1)),
            # wall time of this run's training so far, evaluations excluded (for learning curves against time)
            "train_seconds": time.perf_counter() - train_start - eval_seconds,
          }
          pending = []
          writer.write(step, "train", logged)
          bar.set_postfix(loss=f"{logged['loss']:.4f}")
        step_metrics = None
        if (step % config.eval_every_steps == 0 or step == total_steps) and not preempted:
          eval_start = time.perf_counter()
          val_metrics = step_metrics = experiment.evaluate(local_eval_state(), experiment.eval_source)
          eval_seconds += time.perf_counter() - eval_start
          writer.write(step, "validation", val_metrics)
          if is_main:
            bar.write(f"step {step}: validation loss {val_metrics['loss']:.4f}, {experiment.headline(val_metrics)}")
        if checkpoint_now:
          ranked = step_metrics if best_metric and step_metrics and best_metric in step_metrics else None
          checkpoint.save(manager, state, saved_config, experiment.data_state(step), metrics=ranked)
        bar.update(1)
        if preempted:
          if is_main:
            bar.write(f"preempted (SIGTERM): saved the checkpoint of step {step}; run the same command to resume.")
          break
  finally:
    manager.wait_until_finished()
    manager.close()
    writer.close()
  train_seconds = time.perf_counter() - train_start
  if preempted:
    return {
      "preempted": True,
      "steps": int(parallel.fetch(state.step)),
      "trained_steps_this_run": int(parallel.fetch(state.step)) - start_step,
    }

  eval_state = local_eval_state()
  summary = {
    "steps": int(parallel.fetch(state.step)),
    "trained_steps_this_run": int(parallel.fetch(state.step)) - start_step,
    "train_seconds_this_run": round(train_seconds, 2),
    "num_params": count_params(state.params),
    # None when a finished run is resumed: evaluate the restored state again
    "validation": val_metrics or experiment.evaluate(eval_state, experiment.eval_source),
  }
  if experiment.test_source is not None:
    summary["test"] = experiment.evaluate(eval_state, experiment.test_source)
  if is_main:
    experiment.write_outputs(eval_state, workdir, summary)
    print(experiment.format_summary(summary))
  return summary
