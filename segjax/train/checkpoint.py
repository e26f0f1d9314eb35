"""Orbax checkpoints of the train state and the config that made it.

A checkpoint directory ``<workdir>/checkpoints/<step>/`` holds three items: ``state`` (step, params, batch_stats,
opt_state, rng as a plain state dict), ``config`` (the experiment config as JSON), so a checkpoint alone is enough
to rebuild the model for prediction, and ``data_state`` (JSON: where the input pipeline resumes, see
:func:`segjax.data.pipeline.train_dataset`). Saving is asynchronous; ``close`` (or ``wait_until_finished``) waits.
"""

import os
import shutil
import sys
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as preservation

from segjax.config import with_defaults
from segjax.errors import SegjaxError
from segjax.train.state import TrainState

ITEMS = ("state", "config", "data_state")

COMPATIBILITY_SECTIONS = (
  "model",
  "optimizer",
  "data",
  "dataset_info",
  "ema_decay",
  "half_precision",
  "half_precision_dtype",
)
"""Config keys whose change can make a saved state not fit the model: compared when a restore fails."""


def checkpoint_dir(workdir: str) -> str:
  """Where the checkpoints of a workdir live (absolute, as Orbax requires)."""
  return os.path.abspath(os.path.join(workdir, "checkpoints"))


def create_manager(
  workdir: str,
  *,
  max_to_keep: int = 3,
  best_metric: str | None = None,
  best_mode: str = "max",
  keep_best: int = 1,
  read_only: bool = False,
) -> ocp.CheckpointManager:
  """A CheckpointManager for ``<workdir>/checkpoints``, saving asynchronously.

  Args:
    workdir: the run directory.
    max_to_keep: the newest checkpoints kept (for resuming).
    best_metric: a validation metric (e.g. ``'mean_iou'``); the ``keep_best`` checkpoints with the best values of it
      are kept as well, whatever their age. None keeps only the newest.
    best_mode: ``'max'`` or ``'min'``: whether larger values of ``best_metric`` are better.
    keep_best: how many best checkpoints to keep.
    read_only: open existing checkpoints for restoring only: nothing is created, and nothing may be saved.
  """
  if read_only:
    options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False, read_only=True)
  elif best_metric:
    get_metric = lambda metrics: metrics[best_metric]  # noqa: E731
    policy = preservation.AnyPreservationPolicy(
      [
        preservation.LatestN(n=max_to_keep),
        preservation.BestN(
          get_metric_fn=get_metric, reverse=best_mode == "min", n=keep_best, keep_checkpoints_without_metrics=False
        ),
      ]
    )
    options = ocp.CheckpointManagerOptions(preservation_policy=policy, best_fn=get_metric, best_mode=best_mode)
  else:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)


def save(
  manager: ocp.CheckpointManager,
  state: TrainState,
  config: ml_collections.ConfigDict,
  data_state: dict[str, Any] | None = None,
  metrics: dict[str, float] | None = None,
) -> None:
  """Starts saving ``state`` (at its own step), ``config`` and ``data_state``; returns before the write completes.

  ``metrics`` (validation metrics of this step) rank the checkpoint for the manager's ``best_metric``; a checkpoint
  saved without them is kept only while it is among the newest.
  """
  step = int(np.asarray(state.step.addressable_data(0)))  # readable on every process of a multi-host run
  items = {
    "state": ocp.args.StandardSave(serialization.to_state_dict(state)),
    "config": ocp.args.JsonSave(config.to_dict()),
  }
  if data_state is not None:
    items["data_state"] = ocp.args.JsonSave(data_state)
  manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)


def best_step(workdir: str, metric: str, mode: str = "max") -> int | None:
  """The step of the saved checkpoint with the best validation ``metric`` (None if none has it)."""
  manager = create_manager(workdir, read_only=True)
  scored = {}
  for step in manager.all_steps():
    metrics = manager.metrics(step)
    if metrics and metric in metrics and np.isfinite(metrics[metric]):
      scored[step] = metrics[metric]
  manager.close()
  if not scored:
    return None
  return (max if mode == "max" else min)(scored, key=scored.get)


def restore_latest(
  manager: ocp.CheckpointManager, template: TrainState, config: ml_collections.ConfigDict
) -> tuple[TrainState, dict[str, Any] | None] | None:
  """Restores the newest checkpoint that reads back, moving damaged ones aside.

  A checkpoint whose files cannot be read (cut short, truncated, deleted parts) is renamed to ``<step>.damaged``
  with a warning naming it, and the next older one is tried. A checkpoint that reads but does not fit ``template``
  is refused, never set aside: the SegjaxError names the config keys that differ from ``config``, or says that the
  state's layout differs.

  Returns:
    ``(state, data_state)``, or None when no checkpoint is left.
  """
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      saved = with_defaults(
        ml_collections.ConfigDict(
          manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        )
      )
    except Exception as e:  # noqa: BLE001 - any failure to read the config means damaged files
      _set_aside(manager, step, e)
      continue
    differing = config_differences(saved, config, sections=COMPATIBILITY_SECTIONS)
    try:
      return restore_state(manager, template, step), restore_data_state(manager, step)
    except Exception as e:  # Orbax raises assorted errors for missing files and for structure or shape mismatches
      if differing:
        raise SegjaxError(
          f"the checkpoint at step {step} in '{manager.directory}' does not fit this config (differing keys: "
          f"{', '.join(differing)}); resume with the original config or pass a new --workdir."
        ) from e
      if _structure_mismatch(e):  # same config, other state layout: written by different code, not damaged
        raise SegjaxError(
          f"the checkpoint at step {step} in '{manager.directory}' holds a state of another layout than this "
          f"version of segjax builds ({str(e).splitlines()[0][:150]}); resume with the version that wrote it or "
          "pass a new --workdir."
        ) from e
      _set_aside(manager, step, e)
      continue
  return None


def _set_aside(manager: ocp.CheckpointManager, step: int, error: Exception) -> None:
  """Renames a damaged step directory so that it is neither restored nor deleted, and warns once (process 0)."""
  source = os.path.join(str(manager.directory), str(step))
  target = f"{source}.damaged"
  if jax.process_index() == 0:
    os.replace(source, target) if not os.path.exists(target) else shutil.rmtree(source)
    message = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
    print(
      f"warning: checkpoint at step {step} is damaged ({message}); moved it to {target} and trying the previous one.",
      file=sys.stderr,
      flush=True,
    )
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"segjax set aside checkpoint {step}")
  manager.reload()


def restore_data_state(manager: ocp.CheckpointManager, step: int) -> dict[str, Any] | None:
  """The input pipeline's state saved at ``step``, or None for a checkpoint saved without one."""
  if not os.path.isdir(os.path.join(str(manager.directory), str(step), "data_state")):
    return None
  return dict(manager.restore(step, args=ocp.args.Composite(data_state=ocp.args.JsonRestore()))["data_state"])


def restore_state(manager: ocp.CheckpointManager, template: TrainState, step: int | None = None) -> TrainState:
  """Restores the state saved at ``step`` (default: the latest) into the structure of ``template``."""
  step = manager.latest_step() if step is None else step
  target = serialization.to_state_dict(template)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  except ValueError as e:
    # A checkpoint written before the optional parts of the state (ema, loss_scale) existed lacks their entries.
    optional = {k: v for k, v in target.items() if v is not None}
    if not _structure_mismatch(e) or optional.keys() == target.keys():
      raise
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(optional)))
  return serialization.from_state_dict(template, _fill_empty(target, restored["state"]))


def restore_variables(
  manager: ocp.CheckpointManager,
  params: Any,
  batch_stats: Any,
  step: int | None = None,
  *,
  ema: bool = False,
  sharding: jax.sharding.Sharding | None = None,
) -> tuple[Any, Any]:
  """Restores only the model variables of the state saved at ``step`` (default: the latest): ``(params,
  batch_stats)`` shaped like the given (abstract) trees, or with ``ema`` the exponential moving average of both.
  The optimizer state, RNG and loss scale are not read, so no optimizer is needed (prediction, export).

  Raises:
    SegjaxError: naming the directory when the checkpoint's variables do not fit the given trees.
  """
  step = manager.latest_step() if step is None else step
  variables = {"params": params, **({"batch_stats": batch_stats} if jax.tree_util.tree_leaves(batch_stats) else {})}

  def abstract(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

  target = jax.tree_util.tree_map(abstract, serialization.to_state_dict(variables))
  target = {"ema": target} if ema else target
  try:
    restored = manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
        )
      ),
    )["state"]
  except (ValueError, KeyError) as e:
    raise SegjaxError(
      f"the checkpoint at step {step} in '{manager.directory}' holds no model variables of this model's shapes "
      f"({type(e).__name__}: {str(e)[:200]}); predict with the config it was trained with."
    ) from e
  restored = restored["ema"] if ema else restored
  wanted = jax.tree_util.tree_map(lambda x: x.shape, target["ema"] if ema else target)
  found = jax.tree_util.tree_map(lambda x: x.shape, restored)
  if found != wanted:
    raise SegjaxError(
      f"the checkpoint at step {step} in '{manager.directory}' holds no model variables of this model's shapes; "
      "predict with the config it was trained with."
    )
  params = serialization.from_state_dict(params, restored["params"])
  if "batch_stats" in variables:
    batch_stats = serialization.from_state_dict(batch_stats, restored["batch_stats"])
  return params, batch_stats


def _structure_mismatch(error: Exception) -> bool:
  """Whether Orbax refused a restore because the saved tree differs from the target (not because of bad files)."""
  return isinstance(error, ValueError) and "structure" in str(error).lower()


def restore_config(workdir: str, step: int | None = None) -> tuple[ml_collections.ConfigDict, int]:
  """Reads the config saved with a checkpoint of ``workdir``.

  Args:
    workdir: the training run's directory.
    step: a checkpoint step; default the latest.

  Returns:
    ``(config, step)``.

  Raises:
    SegjaxError: if the workdir has no checkpoint, or not the requested step.
  """
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    raise SegjaxError(
      f"no checkpoint in '{workdir}' ({directory} does not exist); train first with "
      f"'python -m experiments.train --workdir={workdir}' or pass the workdir of a finished run."
    )
  manager = create_manager(workdir, read_only=True)
  steps = manager.all_steps()
  if not steps:
    raise SegjaxError(f"no checkpoint in '{directory}'; train first or pass the workdir of a finished run.")
  if step is None:
    step = max(steps)
  elif step not in steps:
    raise SegjaxError(f"no checkpoint at step {step} in '{directory}'; available steps: {sorted(steps)}.")
  restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  manager.close()
  # a config saved before a key existed takes its default (what that version did)
  return with_defaults(ml_collections.ConfigDict(restored["config"])), step


def config_differences(
  a: ml_collections.ConfigDict, b: ml_collections.ConfigDict, *, sections: tuple[str, ...]
) -> list[str]:
  """Dotted keys under ``sections`` whose values differ between two configs (missing on one side counts)."""
  flat_a, flat_b = _flatten(a.to_dict()), _flatten(b.to_dict())
  keys = sorted(set(flat_a) | set(flat_b))
  return [k for k in keys if k.split(".")[0] in sections and flat_a.get(k) != flat_b.get(k)]


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:  # a tuple comes back from the checkpoint's JSON as a list: the same value
      out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
  return out


def _fill_empty(target: Any, restored: Any) -> Any:
  """Puts back empty containers (e.g. no batch_stats) that the checkpoint format drops."""
  if isinstance(target, dict):
    restored = dict(restored or {})
    return {k: _fill_empty(v, restored.get(k)) for k, v in target.items()}
  return restored if restored is not None else target
