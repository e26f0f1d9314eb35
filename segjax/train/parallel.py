"""Data parallelism: one device ``Mesh`` with a ``data`` axis, and the train step compiled over it.

Two ways to run the same pure train step (``config.parallelism``):

- ``'jit'`` (default): ``jax.jit`` with ``NamedSharding``s. The global batch is split along the ``data`` axis over
  every device of every process, the state is replicated, and XLA inserts the collectives. BatchNorm statistics and
  the loss are global by construction (the step is written as if for one device).
- ``'pmap'``: ``jax.pmap`` over this process's devices with ``axis_name='data'``. The step averages gradients and
  metrics with ``lax.pmean`` and BatchNorm reduces over the axis (the model gets ``bn_axis_name='data'``). The state
  goes in with ``in_axes=None`` and comes out with ``out_axes=None``: no ``replicate``/``unreplicate``.

Multi-host: each process holds ``batch_size / process_count`` examples of every global batch (its rows of it, see
:func:`segjax.data.pipeline.train_dataset`); :func:`global_batch` assembles them into one global array without
moving data between hosts.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from segjax.errors import SegjaxError

DATA_AXIS = "data"
PARALLELISMS = ("jit", "pmap")


def create_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over ``devices`` (default: all devices of all processes) with the single axis ``data``."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """The sharding of the train state: a full copy on every device of the mesh."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """The sharding of a batch: its leading (example) axis split over the ``data`` axis."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def local_devices(mesh: Mesh) -> list[jax.Device]:
  """The mesh's devices that belong to this process, in mesh order."""
  return [d for d in mesh.devices.flat if d.process_index == jax.process_index()]


def check_batch_size(batch_size: int, mesh: Mesh, *, key: str = "batch_size") -> None:
  """Refuses a global batch that does not split evenly over the mesh's devices."""
  if batch_size % mesh.size:
    raise SegjaxError(
      f"{key} {batch_size} (config key {key}) does not split over the {mesh.size} devices; make it a multiple of "
      f"{mesh.size}."
    )


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Puts a pytree (identical on every process) on every device of ``mesh``, as fully replicated global arrays."""
  sharding = replicated(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def put(x):
    x = np.asarray(_local_value(x))
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree_util.tree_map(put, tree)


def _local_value(x: Any) -> Any:
  """A value readable on this process: the first local shard of a replicated global array, else ``x`` itself."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return x.addressable_data(0)
  return x


def fetch(x: Any) -> np.ndarray:
  """A replicated array's value on the host, on any process (e.g. ``int(fetch(state.step))``)."""
  return np.asarray(_local_value(x))


def to_local(tree: Any, mesh: Mesh) -> Any:
  """A replicated state (global, or from pmap) as a copy on this process's devices of ``mesh`` (for evaluation)."""
  local_mesh = Mesh(np.asarray(local_devices(mesh)), (DATA_AXIS,))
  return jax.device_put(jax.tree_util.tree_map(_local_value, tree), replicated(local_mesh))


def global_batch(local_batch: Any, mesh: Mesh) -> Any:
  """Assembles each process's rows of a batch into global arrays sharded over the mesh's ``data`` axis."""
  sharding = batch_sharded(mesh)
  if jax.process_count() == 1:
    return jax.device_put(local_batch, sharding)
  return jax.tree_util.tree_map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def split_for_pmap(local_batch: Any, mesh: Mesh) -> Any:
  """Reshapes a process's batch to ``(local devices, examples per device, ...)`` on those devices, for ``pmap``."""
  devices = local_devices(mesh)
  sharding = NamedSharding(Mesh(np.asarray(devices), (DATA_AXIS,)), PartitionSpec(DATA_AXIS))
  return jax.tree_util.tree_map(
    lambda x: jax.device_put(np.asarray(x).reshape(len(devices), -1, *x.shape[1:]), sharding), local_batch
  )


def compile_train_step(train_step: Callable, mesh: Mesh, parallelism: str = "jit") -> tuple[Callable, Callable]:
  """Compiles ``train_step(state, batch) -> (state, metrics)`` for ``mesh``.

  Args:
    train_step: the pure step; for ``'pmap'`` it must have been built with ``axis_name=DATA_AXIS``.
    mesh: the device mesh.
    parallelism: ``'jit'`` or ``'pmap'`` (config key ``parallelism``).

  Returns:
    ``(step, place_batch)``: the compiled step, taking a replicated state and a placed batch, and the function that
    places a process's numpy batch for it (used by the prefetcher, so copies overlap with the previous step).
  """
  if parallelism == "jit":
    step = jax.jit(
      train_step,
      in_shardings=(replicated(mesh), batch_sharded(mesh)),
      out_shardings=(replicated(mesh), replicated(mesh)),
      donate_argnums=0,
    )
    return step, lambda batch: global_batch(batch, mesh)
  if parallelism == "pmap":
    devices = local_devices(mesh) if jax.process_count() == 1 else None  # multi-host pmap spans all devices
    step = jax.pmap(train_step, axis_name=DATA_AXIS, in_axes=(None, 0), out_axes=(None, None), devices=devices)
    return step, lambda batch: split_for_pmap(batch, mesh)
  raise SegjaxError(
    f"unknown parallelism '{parallelism}' (config key parallelism); available: {', '.join(PARALLELISMS)}."
  )
