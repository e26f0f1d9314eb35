"""Multi-host start-up: ``jax.distributed.initialize`` from flags or from the cluster's environment.

Every process of a multi-host job runs the same command. JAX's distributed runtime connects them through a
coordinator (process 0's address); after that ``jax.devices()`` lists the devices of all processes and
``jax.process_index()`` tells a process who it is. On Cloud TPU pod slices, Slurm and Open MPI, JAX finds the
coordinator, the number of processes and the process id itself; elsewhere pass them (flags of
``experiments.train``, or the ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` variables).
"""

import os

import jax

# Environment variables that say this process is one of several of a cluster job that JAX can auto-detect.
CLUSTER_VARIABLES = ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")


def in_cluster_job(environ: dict[str, str] | None = None) -> bool:
  """Whether the environment describes a job of more than one process (Slurm, Open MPI, a TPU pod, or JAX's own)."""
  environ = os.environ if environ is None else environ
  if environ.get("JAX_COORDINATOR_ADDRESS"):
    return True
  for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    if environ.get(name, "1").isdigit() and int(environ.get(name, "1")) > 1:
      return True
  return "," in environ.get("TPU_WORKER_HOSTNAMES", "")


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  environ: dict[str, str] | None = None,
) -> bool:
  """Joins a multi-process job when one is described by the arguments or the environment; else does nothing.

  Must run before anything touches a JAX device. On CPU the processes talk through gloo collectives.

  Args:
    coordinator_address: ``host:port`` of process 0 (None: from the environment).
    num_processes: number of processes (None: from the environment).
    process_id: this process's index (None: from the environment).
    environ: the environment to inspect (default ``os.environ``).

  Returns:
    True if ``jax.distributed.initialize`` was called.
  """
  if coordinator_address is None and not in_cluster_job(environ):
    return False
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only used by CPU devices
  jax.distributed.initialize(coordinator_address, num_processes, process_id)
  return True
