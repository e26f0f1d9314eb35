"""Orbax checkpoints of the train state and the config that made it.

A checkpoint directory ``<workdir>/checkpoints/<step>/`` holds three items: ``state`` (step, params, batch_stats,
opt_state, rng as a plain state dict), ``config`` (the experiment config as JSON), so a checkpoint alone is enough
to rebuild the model for prediction, and ``data_state`` (JSON: where the input pipeline resumes, see
:func:`segjax.data.pipeline.train_dataset`). Saving is asynchronous; ``close`` (or ``wait_until_finished``) waits.
"""

import os
from typing import Any

import ml_collections
import orbax.checkpoint as ocp
from flax import serialization

from segjax.errors import SegjaxError
from segjax.train.state import TrainState


def checkpoint_dir(workdir: str) -> str:
  """Where the checkpoints of a workdir live (absolute, as Orbax requires)."""
  return os.path.abspath(os.path.join(workdir, "checkpoints"))


def create_manager(workdir: str, *, max_to_keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
  """A CheckpointManager for ``<workdir>/checkpoints`` keeping the last ``max_to_keep`` steps.

  ``read_only`` opens existing checkpoints for restoring only: nothing is created, and nothing may be saved.
  """
  options = ocp.CheckpointManagerOptions(
    max_to_keep=max_to_keep, create=not read_only, enable_async_checkpointing=not read_only
  )
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=("state", "config", "data_state"))


def save(
  manager: ocp.CheckpointManager,
  state: TrainState,
  config: ml_collections.ConfigDict,
  data_state: dict[str, Any] | None = None,
) -> None:
  """Starts saving ``state`` (at its own step), ``config`` and ``data_state``; returns before the write completes."""
  step = int(state.step)
  items = {
    "state": ocp.args.StandardSave(serialization.to_state_dict(state)),
    "config": ocp.args.JsonSave(config.to_dict()),
  }
  if data_state is not None:
    items["data_state"] = ocp.args.JsonSave(data_state)
  manager.save(step, args=ocp.args.Composite(**items))


def restore_data_state(manager: ocp.CheckpointManager, step: int) -> dict[str, Any] | None:
  """The input pipeline's state saved at ``step``, or None for a checkpoint saved without one."""
  if not os.path.isdir(os.path.join(str(manager.directory), str(step), "data_state")):
    return None
  return dict(manager.restore(step, args=ocp.args.Composite(data_state=ocp.args.JsonRestore()))["data_state"])


def restore_state(manager: ocp.CheckpointManager, template: TrainState, step: int | None = None) -> TrainState:
  """Restores the state saved at ``step`` (default: the latest) into the structure of ``template``."""
  step = manager.latest_step() if step is None else step
  target = serialization.to_state_dict(template)
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  return serialization.from_state_dict(template, _fill_empty(target, restored["state"]))


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
  return ml_collections.ConfigDict(restored["config"]), step


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
    else:
      out[f"{prefix}{key}"] = value
  return out


def _fill_empty(target: Any, restored: Any) -> Any:
  """Puts back empty containers (e.g. no batch_stats) that the checkpoint format drops."""
  if isinstance(target, dict):
    restored = dict(restored or {})
    return {k: _fill_empty(v, restored.get(k)) for k, v in target.items()}
  return restored if restored is not None else target
