"""Who this process is in the job: detect the cluster, start `jax.distributed`, say so in one line.

Multi-process jobs come from explicit flags, a SLURM job step, Open MPI, the
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment, or a Cloud TPU VM pod
slice, in that order; JAX_COORDINATOR_ADDRESS also overrides a scheduler's coordinator. Anything
else runs as a single process with no coordinator.
"""

import dataclasses
import ipaddress
import json
import os
import re
import socket
import time

import jax
from absl import logging

from launcher.errors import PeerUnreachable, UsageError


@dataclasses.dataclass(frozen=True)
class Job:
  """How to join the job; None fields are left for jax's own cluster detection to fill."""

  source: str
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None


# How each Job.source reads in the line a process logs when it joins.
JOB_SOURCES = {
  "flags": "a job given by flags",
  "slurm": "a slurm job",
  "openmpi": "an Open MPI job",
  "env": "a job given by JAX_* environment variables",
  "tpu": "a TPU pod slice",
}


def detect(
  *,
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  local_device_ids: tuple[int, ...] | None = None,
  one_process_per: str = "auto",
  environ=os.environ,
) -> Job | None:
  """The multi-process job this process belongs to, or None when it runs alone."""
  check_address(environ.get("JAX_COORDINATOR_ADDRESS") or None, "JAX_COORDINATOR_ADDRESS")
  slurm = _slurm_step(environ)
  scheduler_count = (slurm or {}).get("num_processes") or _int(environ, "OMPI_COMM_WORLD_SIZE")
  if coordinator_address or num_processes is not None or process_id is not None:
    missing = [
      name
      for name, value in (
        ("--coordinator_address", coordinator_address),
        ("--num_processes", num_processes),
        ("--process_id", process_id),
      )
      if value is None
    ]
    if missing:
      raise UsageError(
        f"a multi-process job given by flags needs all of --coordinator_address, "
        f"--num_processes and --process_id; missing: {', '.join(missing)}"
      )
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise UsageError(
        f"--num_processes={num_processes} --process_id={process_id}: a job has at "
        "least one process, and --process_id counts from 0 to --num_processes-1"
      )
    _agree(num_processes, "--num_processes", scheduler_count)
    check_address(coordinator_address, "--coordinator_address")
    job = Job("flags", coordinator_address, num_processes, process_id, local_device_ids)
  elif slurm:
    _agree(_int(environ, "JAX_NUM_PROCESSES"), "JAX_NUM_PROCESSES", slurm["num_processes"])
    job = Job(
      "slurm",
      environ.get("JAX_COORDINATOR_ADDRESS") or slurm["coordinator_address"],
      slurm["num_processes"],
      slurm["process_id"],
      local_device_ids or slurm_local_device_ids(environ, one_process_per),
    )
  elif "OMPI_MCA_orte_hnp_uri" in environ and (scheduler_count or 1) > 1:
    _agree(_int(environ, "JAX_NUM_PROCESSES"), "JAX_NUM_PROCESSES", scheduler_count)
    job = Job("openmpi", environ.get("JAX_COORDINATOR_ADDRESS"), local_device_ids=local_device_ids)
  elif environ.get("JAX_COORDINATOR_ADDRESS"):
    try:
      count, index = int(environ["JAX_NUM_PROCESSES"]), int(environ["JAX_PROCESS_ID"])
    except (KeyError, ValueError) as e:
      raise UsageError(
        "JAX_COORDINATOR_ADDRESS is set, so JAX_NUM_PROCESSES and JAX_PROCESS_ID "
        f"must be set to integers too ({e!r})"
      ) from None
    job = Job("env", environ["JAX_COORDINATOR_ADDRESS"], count, index, local_device_ids)
  elif _on_cloud_tpu_vm():
    return Job("tpu", local_device_ids=local_device_ids)
  else:
    if "SLURM_JOB_ID" in environ and "SLURM_STEP_NODELIST" not in environ:
      logging.warning(
        "SLURM_JOB_ID is set but this is not a SLURM job step: run the launcher "
        "through `srun` so that every task joins one job; running as one process."
      )
    if local_device_ids:
      raise UsageError(
        f"--local_device_ids={','.join(map(str, local_device_ids))} is for a process of a "
        "multi-process job (jax.distributed takes it), and this process runs alone, on every "
        "device it sees: choose its devices with CUDA_VISIBLE_DEVICES (GPU) or "
        "TPU_VISIBLE_CHIPS (TPU) instead, or drop the flag"
      )
    return None
  hosts = sorted(set(slurm["nodes"])) if slurm else []
  if len(hosts) > 1 and job.coordinator_address and _is_loopback(job.coordinator_address):
    raise UsageError(
      f"the coordinator address {job.coordinator_address} is a loopback address, but this job "
      f"spans {len(hosts)} hosts ({', '.join(hosts[:4])}{', ...' if len(hosts) > 4 else ''}): "
      "the other hosts would wait for a coordinator on themselves. Unset "
      "JAX_COORDINATOR_ADDRESS or give the first host's name or IP address."
    )
  return job


def expand_hostlist(hostlist: str) -> list[str]:
  """SLURM's compressed host list, e.g. `node[001-003,007],gpu-a[1-2]b` -> every host name."""
  hosts = []
  for part in _split_top_level(hostlist):
    hosts.extend(_expand_brackets(part))
  return hosts


def expand_tasks_per_node(counts: str) -> list[int]:
  """SLURM's compressed task counts, e.g. `2(x3),1` -> [2, 2, 2, 1]."""
  tasks = []
  for part in counts.split(","):
    match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
    if not match:
      raise UsageError(f"cannot read SLURM task counts {counts!r} (at {part!r})")
    tasks.extend([int(match[1])] * int(match[2] or 1))
  return tasks


def slurm_local_device_ids(environ, one_process_per: str = "auto") -> tuple[int, ...] | None:
  """The GPUs this SLURM task drives: all of its node's (`node`) or the one of its local rank
  (`device`); `auto` picks by the number of tasks on this node. None where no GPU is listed."""
  if environ.get("CUDA_VISIBLE_DEVICES"):
    visible = list(range(len(environ["CUDA_VISIBLE_DEVICES"].split(","))))
  elif environ.get("SLURM_STEP_GPUS") or environ.get("SLURM_JOB_GPUS"):
    visible = [
      int(g) for g in (environ.get("SLURM_STEP_GPUS") or environ["SLURM_JOB_GPUS"]).split(",")
    ]
  else:
    return None
  if one_process_per == "auto":
    one_process_per = "node" if _tasks_on_this_node(environ) == 1 else "device"
  if one_process_per == "node":
    return tuple(visible)
  if one_process_per != "device":
    raise UsageError(f"--one_process_per={one_process_per!r} must be auto, node or device")
  local_rank = int(environ.get("SLURM_LOCALID", "0"))
  if len(visible) == 1:
    return tuple(visible)
  if local_rank >= len(visible):
    raise UsageError(
      f"SLURM task with local rank {local_rank} but only {len(visible)} GPUs are "
      "visible to it: ask for one GPU per task, or use --one_process_per=node"
    )
  return (visible[local_rank],)


def _slurm_step(environ) -> dict | None:
  """This SLURM job step's shape when it has several tasks; None outside a step or for one task."""
  if "SLURM_JOB_ID" not in environ or "SLURM_STEP_NODELIST" not in environ:
    return None
  count = _int(environ, "SLURM_STEP_NUM_TASKS") or _int(environ, "SLURM_NTASKS") or 1
  if count <= 1:
    return None
  nodes = expand_hostlist(environ["SLURM_STEP_NODELIST"])
  port = _int(environ, "JAX_COORDINATOR_PORT") or int(environ["SLURM_JOB_ID"]) % 4096 + 61440
  return {
    "nodes": nodes,
    "num_processes": count,
    "process_id": int(environ["SLURM_PROCID"]),
    "coordinator_address": f"{nodes[0]}:{port}",
  }


def _tasks_on_this_node(environ) -> int:
  nodes = expand_hostlist(environ.get("SLURM_STEP_NODELIST", ""))
  counts = expand_tasks_per_node(
    environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE") or "1"
  )
  name = environ.get("SLURMD_NODENAME")
  index = nodes.index(name) if name in nodes else 0
  return counts[index] if index < len(counts) else counts[-1]


def _agree(given: int | None, what: str, scheduler_count: int | None) -> None:
  if given is not None and scheduler_count is not None and given != scheduler_count:
    raise UsageError(
      f"{what}={given} disagrees with the scheduler, which started "
      f"{scheduler_count} processes for this job: drop {what} or make it "
      f"{scheduler_count}"
    )


def _int(environ, name: str) -> int | None:
  value = environ.get(name)
  return int(value) if value not in (None, "") else None


def check_address(address: str | None, where: str) -> None:
  """A coordinator address is host:port with a port in 1..65535."""
  if address is None:
    return
  host, _, port = address.rpartition(":")
  if not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
    raise UsageError(
      f"{where}={address!r} is not host:port: give the address of process 0 and a "
      "free port, e.g. 10.0.0.1:12345 or 127.0.0.1:12345 on one machine"
    )


def _is_loopback(address: str) -> bool:
  host = address.rsplit(":", 1)[0].strip("[]")
  if host == "localhost":
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


def _split_top_level(text: str) -> list[str]:
  parts, depth, current = [], 0, ""
  for char in text:
    depth += {"[": 1, "]": -1}.get(char, 0)
    if char == "," and depth == 0:
      parts.append(current)
      current = ""
    else:
      current += char
  return [p for p in parts + [current] if p]


def _expand_brackets(pattern: str) -> list[str]:
  match = re.search(r"\[([^\]]*)\]", pattern)
  if not match:
    return [pattern]
  head, tail = pattern[: match.start()], pattern[match.end() :]
  names = []
  for item in match[1].split(","):
    if "-" in item:
      low, high = item.split("-", 1)
      names.extend(str(i).zfill(len(low)) for i in range(int(low), int(high) + 1))
    else:
      names.append(item)
  return [head + name + rest for name in names for rest in _expand_brackets(tail)]


def initialize(
  job: Job | None, *, initialization_timeout: int = 300, heartbeat_timeout_seconds: int = 100
) -> None:
  """Starts `jax.distributed` for a multi-process job; idempotent; must run before any JAX work."""
  if job is None or jax.distributed.is_initialized():
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  logging.info(
    "joining %s as process %s of %s (coordinator %s, process 0)",
    JOB_SOURCES[job.source],
    "auto" if job.process_id is None else job.process_id,
    job.num_processes or "auto",
    job.coordinator_address or "auto",
  )
  if job.coordinator_address and job.process_id:
    wait_for_coordinator(job.coordinator_address, initialization_timeout)
  jax.distributed.initialize(
    coordinator_address=job.coordinator_address,
    num_processes=job.num_processes,
    process_id=job.process_id,
    local_device_ids=list(job.local_device_ids) if job.local_device_ids else None,
    initialization_timeout=initialization_timeout,
    heartbeat_timeout_seconds=heartbeat_timeout_seconds,
  )


def coordination_client():
  """The client of jax.distributed's coordination service (its key-value store), or None when
  this process runs alone or this jax keeps it elsewhere (said once). jax has no public API for
  it: it lives in jax._src.distributed, read here behind a guard."""
  try:
    from jax._src import distributed  # pylint: disable=import-outside-toplevel

    return distributed.global_state.client
  except (ImportError, AttributeError):
    logging.warning(
      "this jax has no coordination client in jax._src.distributed: a lost process is found "
      "by jax's own heartbeat timeout, not within --peer_timeout_seconds"
    )
    return None


def coordinator_address() -> str | None:
  """host:port of the job's coordinator (process 0) as jax.distributed joined it, or None."""
  try:
    from jax._src import distributed  # pylint: disable=import-outside-toplevel

    return distributed.global_state.coordinator_address
  except (ImportError, AttributeError):
    return None


def wait_for_coordinator(address: str, timeout: float) -> None:
  """Returns once the coordinator accepts connections; a clear error after `timeout` seconds.

  jax aborts the process with "another task died" when it cannot reach the coordinator; this
  says what actually happened, and before any JAX state exists.
  """
  host, port = address.rsplit(":", 1)
  deadline = time.monotonic() + timeout
  while True:
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=5):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise PeerUnreachable(
          f"could not reach the coordinator {address} (process 0) within "
          f"--initialization_timeout={timeout:g} s ({e.strerror or e}): check that process 0 "
          "is running and that this host can reach that address and port"
        ) from None
      time.sleep(0.5)


def is_multiprocess() -> bool:
  """Whether this process is one of several in a `jax.distributed` job."""
  return jax.distributed.is_initialized() and jax.process_count() > 1


def describe() -> str:
  """One line: process i/n, host, local and global device counts, platform."""
  return (
    f"process {jax.process_index()}/{jax.process_count()} on {socket.gethostname()}: "
    f"{jax.local_device_count()} local / {jax.device_count()} global devices, "
    f"platform {jax.devices()[0].platform}"
  )


def _on_cloud_tpu_vm() -> bool:
  """True on a Cloud TPU VM, where jax.distributed finds the pod slice's workers by itself."""
  try:
    from jax._src.cloud_tpu_init import running_in_cloud_tpu_vm  # pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  return bool(running_in_cloud_tpu_vm)


# How long a process waits for process 0's config (process 0 may still be importing or loading).
SAME_CONFIG_WAIT_S = 120.0
_CONFIG_KEY = "launcher/config"
_CONFIG_CHECKED = "launcher/config_checked/"


def check_same_config(config_json: str, client, process_index: int, process_count: int) -> None:
  """Every process of a job runs process 0's config: a key that differs is bad input, named in
  one line on every process before any collective (a mesh or batch that differed would end in a
  collective's abort or a hang). Process 0 publishes its config in jax's key-value store; each
  other process compares and publishes what differs; process 0 waits for every verdict."""
  wait_ms = int(SAME_CONFIG_WAIT_S * 1000)
  try:
    if process_index == 0:
      client.key_value_set(_CONFIG_KEY, config_json, allow_overwrite=True)
      for other in range(1, process_count):
        differs = client.blocking_key_value_get(f"{_CONFIG_CHECKED}{other}", wait_ms)
        if differs:
          raise UsageError(differs)
      return
    published = client.blocking_key_value_get(_CONFIG_KEY, wait_ms)
  except UsageError:
    raise
  except Exception:  # pylint: disable=broad-except  # A process is gone: the peer checks say so.
    return
  ours, theirs = _flat(json.loads(config_json)), _flat(json.loads(published))
  differing = sorted(key for key in ours.keys() | theirs.keys() if ours.get(key) != theirs.get(key))
  message = ""
  if differing:
    shown = "; ".join(
      f"config.{key}={ours.get(key, '(unset)')!r} on process {process_index}, "
      f"{theirs.get(key, '(unset)')!r} on process 0"
      for key in differing[:3]
    ) + (f"; and {len(differing) - 3} more" if len(differing) > 3 else "")
    message = (
      f"process {process_index} runs another config than process 0: {shown}. Every process of "
      "a job must be given the same --config file and --config.* overrides"
    )
  client.key_value_set(f"{_CONFIG_CHECKED}{process_index}", message, allow_overwrite=True)
  if message:
    raise UsageError(message)


def _flat(tree: dict, prefix: str = "") -> dict:
  """A config's JSON as {"a.b": value}."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flat(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat
