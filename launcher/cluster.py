"""Who this process is in the job: detect the cluster, start `jax.distributed`, say so in one line.

Multi-process jobs come from explicit flags, the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID environment, or are auto-detected (SLURM step, Open MPI, Cloud TPU VM), in that
order. Anything else runs as a single process with no coordinator.
"""

import dataclasses
import os
import socket

import jax
from absl import logging

from launcher.errors import UsageError


@dataclasses.dataclass(frozen=True)
class Job:
  """How to join the job; None fields are left for jax's own cluster detection to fill."""
  source: str
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None


def detect(*, coordinator_address: str | None = None, num_processes: int | None = None,
           process_id: int | None = None, local_device_ids: tuple[int, ...] | None = None,
           environ=os.environ) -> Job | None:
  """The multi-process job this process belongs to, or None when it runs alone."""
  if coordinator_address or num_processes or process_id is not None:
    missing = [name for name, value in (("--coordinator_address", coordinator_address),
                                         ("--num_processes", num_processes),
                                         ("--process_id", process_id)) if value is None]
    if missing:
      raise UsageError(f"a multi-process job given by flags needs all of --coordinator_address, "
                       f"--num_processes and --process_id; missing: {', '.join(missing)}")
    return Job("flags", coordinator_address, num_processes, process_id, local_device_ids)
  if environ.get("JAX_COORDINATOR_ADDRESS"):
    try:
      count, index = int(environ["JAX_NUM_PROCESSES"]), int(environ["JAX_PROCESS_ID"])
    except (KeyError, ValueError) as e:
      raise UsageError("JAX_COORDINATOR_ADDRESS is set, so JAX_NUM_PROCESSES and JAX_PROCESS_ID "
                       f"must be set to integers too ({e!r})") from None
    return Job("env", environ["JAX_COORDINATOR_ADDRESS"], count, index, local_device_ids)
  if "SLURM_JOB_ID" in environ:
    if "SLURM_STEP_NODELIST" not in environ:
      logging.warning("SLURM_JOB_ID is set but this is not a SLURM job step: run the launcher "
                      "through `srun` so that every task joins one job; running as one process.")
    elif int(environ.get("SLURM_NTASKS", "1")) > 1:
      return Job("slurm", local_device_ids=local_device_ids)
  if "OMPI_MCA_orte_hnp_uri" in environ and int(environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return Job("openmpi", local_device_ids=local_device_ids)
  if _on_cloud_tpu_vm():
    return Job("tpu", local_device_ids=local_device_ids)
  return None


def initialize(job: Job | None, *, initialization_timeout: int = 300,
               heartbeat_timeout_seconds: int = 100) -> None:
  """Starts `jax.distributed` for a multi-process job; idempotent; must run before any JAX work."""
  if job is None or jax.distributed.is_initialized():
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  logging.info("joining a %s job (coordinator %s)", job.source, job.coordinator_address or "auto")
  jax.distributed.initialize(
      coordinator_address=job.coordinator_address, num_processes=job.num_processes,
      process_id=job.process_id,
      local_device_ids=list(job.local_device_ids) if job.local_device_ids else None,
      initialization_timeout=initialization_timeout,
      heartbeat_timeout_seconds=heartbeat_timeout_seconds)


def describe() -> str:
  """One line: process i/n, host, local and global device counts, platform."""
  return (f"process {jax.process_index()}/{jax.process_count()} on {socket.gethostname()}: "
          f"{jax.local_device_count()} local / {jax.device_count()} global devices, "
          f"platform {jax.devices()[0].platform}")


def _on_cloud_tpu_vm() -> bool:
  """True on a Cloud TPU VM, where jax.distributed finds the pod slice's workers by itself."""
  try:
    from jax._src.cloud_tpu_init import running_in_cloud_tpu_vm  # pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  return bool(running_in_cloud_tpu_vm)
