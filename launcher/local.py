"""N launcher processes on this machine as one job: one per GPU (or per N GPUs) where the machine
has NVIDIA GPUs, else each with its own simulated CPU devices.

    python -m launcher.local -- --config=configs/lm.py --workdir=/tmp/run   # a GPU workstation
    python -m launcher.local --num_processes=2 --devices_per_process=4 -- \
        --config=configs/lm.py:tiny --workdir=/tmp/run                       # a laptop

The GPUs are found without starting jax: CUDA_VISIBLE_DEVICES when set, else `nvidia-smi -L`,
else /proc/driver/nvidia/gpus; each process gets its own through CUDA_VISIBLE_DEVICES.
`--platform=cpu` simulates CPU devices on a GPU machine too. Every process joins one
`jax.distributed` job over 127.0.0.1 on a free port. Each line a process
prints is shown prefixed with `[process i]` and kept in `--process_logs/process_<i>.log` (default
`WORKDIR/logs`, or `./logs` for a gs:// workdir: a log is appended line by line, on this machine;
what a full disk does not take is dropped from it and counted, and the job goes on).
When one process fails every process is asked to stop (SIGTERM), and killed after
`--grace_seconds` (5 s at most after a crash: the rest cannot save without it). Ctrl-C, SIGTERM and
SIGHUP (a dropped SSH session) are preemption notices: every process saves and stops, and the
runner exits 75 (a second Ctrl-C kills at once). With `--max_restarts=N` a failed job is started
again, on a fresh port, resuming from its last checkpoint (launcher/supervise.py). With
`--min_processes=M` (and `--host_check=CMD`) the job is elastic: a slot lost for good leaves the
job on the most healthy slots, at least M, that keep the global batch, with the microbatches that
keep the per-device batch, and a slot that passes its check again is taken back
(docs/elastic.md). The exit code
is the first failure's (128 + N for a process killed by signal N, as a shell reports it); bad
input (2) or out of memory (78) from any process is the job's, never restarted, and names that
process.
"""

import glob
import importlib.util
import itertools
import os
import re
import shutil
import socket
import subprocess
import sys
from typing import NamedTuple

from absl import flags

from launcher import config as config_lib
from launcher import console, storage, supervise
from launcher.errors import UsageError
from launcher.supervise import ProcessGroup, workdir_of

_PLATFORM = flags.DEFINE_enum(
  "platform",
  "auto",
  ["auto", "gpu", "cpu"],
  "gpu: one process per --devices_per_process GPUs; cpu: simulated CPU devices; auto: gpu when "
  "this machine shows NVIDIA GPUs (and JAX_PLATFORMS does not say cpu), else cpu.",
)
_NUM_PROCESSES = flags.DEFINE_integer(
  "num_processes",
  None,
  "Processes to start (default: on GPUs, every GPU used; on CPU, 2).",
  lower_bound=1,
)
_DEVICES = flags.DEFINE_integer(
  "devices_per_process",
  None,
  "GPUs of each process (default 1: one process per GPU), or simulated CPU devices of each "
  "(default 4).",
  lower_bound=1,
)
_GRACE = flags.DEFINE_float(
  "grace_seconds", 30.0, "Seconds a process gets to stop after SIGTERM before SIGKILL."
)

_LOG_DIR = flags.DEFINE_string(
  "process_logs",
  None,
  "Where each process's output is kept (default: WORKDIR/logs; ./logs for a gs:// workdir).",
)

_MAX_RESTARTS = flags.DEFINE_integer(
  "max_restarts",
  0,
  "When a process fails, stop them all and start the job again (resuming "
  "from its last checkpoint) up to this many times; a preemption (exit 75) does not count; bad "
  "input (exit 2), storage that refuses writes (74) and out of memory (78) never restart.",
  lower_bound=0,
)
_BACKOFF = flags.DEFINE_float(
  "restart_backoff_seconds",
  1.0,
  "Wait before restart i: this times 2^(i-1), at most 60 s.",
  lower_bound=0,
)
_MAX_PREEMPTIONS = flags.DEFINE_integer(
  "max_preemptions_per_hour",
  supervise.MAX_PREEMPTIONS_PER_HOUR,
  "With --max_restarts: restarts after a preemption (exit 75) back off like the others and "
  "stop after this many within an hour.",
  lower_bound=1,
)
_MIN_PROCESSES = flags.DEFINE_integer(
  "min_processes",
  None,
  "Elastic: when a host (slot) is lost for good, continue on the most healthy slots, at least "
  "this many, whose devices keep the global batch (gradient accumulation keeps the per-device "
  "batch); fewer left: give up. Default: the job's count (no shrinking).",
  lower_bound=1,
)
_HOST_CHECK = flags.DEFINE_string(
  "host_check",
  None,
  "Elastic: a shell command, {slot} replaced by a slot's index, that exits 0 when the slot's "
  "host is healthy; run before each start, after a failure, and on lost slots while the job runs "
  "(60 s at most). One that fails for every slot at the first start is bad input (exit 2).",
)
_HOST_CHECK_INTERVAL = flags.DEFINE_float(
  "host_check_interval_seconds",
  30.0,
  "Elastic: how often a lost slot's --host_check is run while the job goes on without it.",
  lower_bound=0,
)
_RESIZE_INTERVAL = flags.DEFINE_float(
  "resize_interval_seconds",
  600.0,
  "Elastic: a lost slot that passes its check again is taken back (the job saves and restarts "
  "on more processes) at most once per this many seconds.",
  lower_bound=0,
)
_FAILED_STARTS_LOST = flags.DEFINE_integer(
  "failed_starts_lost",
  3,
  "Elastic: a slot whose process fails before its first step this many starts in a row is lost.",
  lower_bound=1,
)
SHOW_CONFIG_TIMEOUT_S = 120.0


class JobBatch(NamedTuple):
  """The config keys an elastic job's shapes depend on."""

  batch_size: int
  grad_accum_steps: int
  parallel: str
  mesh: str


def job_batch(launcher_args: list[str]) -> JobBatch:
  """The job's config.batch_size, grad_accum_steps, parallel and mesh, as the launcher resolves
  them from its arguments (`--show_config`, without starting jax); the launcher's own error,
  exit 2, when they do not load."""
  shown = subprocess.run(
    [sys.executable, "-m", "launcher", *launcher_args, "--show_config"],
    capture_output=True,
    text=True,
    timeout=SHOW_CONFIG_TIMEOUT_S,
    check=False,
  )
  values = dict(re.findall(r"^(batch_size|grad_accum_steps) = (\d+)\b", shown.stdout, re.M))
  values.update(re.findall(r"^(parallel|mesh) = '([^']*)'", shown.stdout, re.M))
  if shown.returncode or len(values) < 4:
    sys.stderr.write(shown.stderr)
    raise SystemExit(shown.returncode or 2)
  return JobBatch(
    int(values["batch_size"]), int(values["grad_accum_steps"]), values["parallel"], values["mesh"]
  )


def check_mesh_can_shrink(
  batch: JobBatch, count: int, min_count: int, devices: int, min_flag: str = "--min_processes"
) -> None:
  """A config.mesh with fixed sizes that fits no count below the job's cannot shrink: a
  UsageError before any start, rather than after a host is lost (`min_flag`: how the user set
  the minimum, for the line)."""
  if min_count >= count or not batch.mesh or batch.parallel != "fsdp":
    return
  if not any(
    config_lib.mesh_fits(batch.mesh, batch.parallel, n, devices) for n in range(min_count, count)
  ):
    raise UsageError(
      f"config.mesh={batch.mesh!r} fits only the job's {count} processes x {devices} devices, "
      f"so it cannot shrink to {min_flag}={min_count}: give one axis as -1 (the devices "
      f"left, e.g. data:-1), or leave {min_flag} out"
    )


def elastic_of(job: "Plan", launcher_args: list[str]) -> supervise.Elastic | None:
  """The elastic part of the runner when --min_processes or --host_check asks for it."""
  if _MIN_PROCESSES.value is None and _HOST_CHECK.value is None:
    return None
  count = len(job.devices)
  min_count = count if _MIN_PROCESSES.value is None else _MIN_PROCESSES.value
  if min_count > count:
    raise UsageError(
      f"--min_processes={min_count} is more than the job's {count} processes: pass at most {count}"
    )
  batch = job_batch(launcher_args)
  devices = job.devices[0] if job.platform == "cpu" else len(job.devices[0])
  config_lib.layout(batch.batch_size, 0, count, devices, batch.grad_accum_steps)  # Full job fits.
  config_lib.mesh_shape(batch.mesh, batch.parallel, count, devices)
  check_mesh_can_shrink(batch, count, min_count, devices)
  check = _HOST_CHECK.value
  return supervise.Elastic(
    slot_count=count,
    min_count=min_count,
    devices_per_slot=devices,
    batch_size=batch.batch_size,
    grad_accum_steps=batch.grad_accum_steps,
    parallel=batch.parallel,
    mesh=batch.mesh,
    failure=(lambda slot: supervise.host_check_failure(check, slot)) if check else (lambda _: None),
    failed_starts_lost=_FAILED_STARTS_LOST.value,
    resize_interval=_RESIZE_INTERVAL.value,
    check_interval=_HOST_CHECK_INTERVAL.value,
    prefix="[local]",
  )


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on right now."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def find_gpus(environ) -> tuple[list[str], str]:
  """This machine's NVIDIA GPUs as CUDA_VISIBLE_DEVICES names them, and where that was read:
  CUDA_VISIBLE_DEVICES when set (empty or -1: none), else `nvidia-smi -L`, else
  /proc/driver/nvidia/gpus. jax is not started."""
  if "CUDA_VISIBLE_DEVICES" in environ:
    visible = [d.strip() for d in environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    return list(itertools.takewhile(lambda d: d != "-1", visible)), "CUDA_VISIBLE_DEVICES"
  nvidia_smi = shutil.which("nvidia-smi", path=environ.get("PATH"))
  if nvidia_smi:
    try:
      listing = subprocess.run(
        [nvidia_smi, "-L"], capture_output=True, text=True, timeout=30, check=False
      ).stdout
    except (OSError, subprocess.TimeoutExpired):
      listing = ""
    gpus = re.findall(r"^GPU (\d+):", listing, re.MULTILINE)
    if gpus:
      return gpus, "nvidia-smi -L"
  gpus = glob.glob("/proc/driver/nvidia/gpus/*")
  return [str(i) for i in range(len(gpus))], "/proc/driver/nvidia/gpus"


class Plan(NamedTuple):
  """Where the job runs: its platform and each process's devices (GPU names, or a count of
  simulated CPU devices)."""

  platform: str  # "gpu" or "cpu"
  devices: list  # Per process: the GPUs it sees (CUDA_VISIBLE_DEVICES), or its CPU device count.
  why: str  # What chose the platform, for the start-up line.

  def describe(self) -> str:
    count = len(self.devices)
    if self.platform == "gpu":
      groups = " | ".join(",".join(group) for group in self.devices)
      return (
        f"{count} processes x {len(self.devices[0])} GPU(s) (CUDA_VISIBLE_DEVICES {groups}: "
        f"{self.why})"
      )
    return f"{count} processes x {self.devices[0]} devices (CPU, simulated: {self.why})"


def plan(
  platform: str, gpus: list[str], source: str, environ, num_processes, devices_per_process
) -> Plan:
  """The job's platform and each process's devices, from the flags and the GPUs found; a plan
  that cannot run is a UsageError."""
  if platform == "auto":
    if environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
      platform, why = "cpu", "JAX_PLATFORMS=cpu"
    elif gpus:
      platform, why = "gpu", f"{len(gpus)} found by {source}"
    elif glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
      raise UsageError(
        "this machine has TPU chips: run python -m launcher directly (one process drives every "
        "chip of a TPU VM), or pass --platform=cpu for simulated CPU devices"
      )
    else:
      platform, why = "cpu", "no GPU found"
  else:
    why = f"--platform={platform}"
  if platform == "cpu":
    devices = devices_per_process or 4
    return Plan("cpu", [devices] * (num_processes or 2), why)
  per_process = devices_per_process or 1
  if not gpus:
    raise UsageError(
      f"--platform=gpu, but {source} shows no GPU: leave --platform out to simulate CPU devices"
    )
  count = num_processes or len(gpus) // per_process
  if count < 1 or count * per_process > len(gpus):
    raise UsageError(
      f"{num_processes or 1} process(es) x --devices_per_process={per_process} GPUs need "
      f"{max(count, 1) * per_process} GPUs; {source} shows {len(gpus)} ({','.join(gpus)}): "
      "ask for fewer, or pass --platform=cpu to simulate CPU devices"
    )
  return Plan("gpu", [gpus[i * per_process : (i + 1) * per_process] for i in range(count)], why)


def check_cuda_plugin(job: Plan) -> None:
  """A GPU job needs jax's CUDA plugin (`pip install 'jax[cuda12]'`): without it every process
  would fail to start its backend. Checked without importing jax."""
  plugins = ("jax_cuda12_plugin", "jax_cuda13_plugin")
  if job.platform == "gpu" and not any(importlib.util.find_spec(name) for name in plugins):
    raise UsageError(
      f"this machine shows {sum(map(len, job.devices))} GPU(s) to use, but jax has no CUDA "
      "build: pip install -e '.[cuda]' in this repository, or pip install -U 'jax[cuda12]' (or "
      "pass --platform=cpu to simulate CPU devices)"
    )


def process_env(
  process_id: int, num_processes: int, devices: int | list[str], port: int
) -> dict[str, str]:
  """The environment of process `process_id`: its devices (a number of simulated CPU devices, or
  the GPUs it sees) and its place in the job."""
  if isinstance(devices, int):
    xla_flags = [
      f
      for f in os.environ.get("XLA_FLAGS", "").split()
      if not f.startswith("--xla_force_host_platform_device_count")
    ]
    platform = {
      "XLA_FLAGS": " ".join(xla_flags + [f"--xla_force_host_platform_device_count={devices}"]),
      "JAX_PLATFORMS": "cpu",
    }
  else:
    platform = {"JAX_PLATFORMS": "cuda", "CUDA_VISIBLE_DEVICES": ",".join(devices)}
  return {
    **os.environ,
    **platform,
    "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
    "JAX_COORDINATOR_BIND_ADDRESS": f"127.0.0.1:{port}",
    "JAX_NUM_PROCESSES": str(num_processes),
    "JAX_PROCESS_ID": str(process_id),
    "PYTHONUNBUFFERED": "1",
  }


def main(argv):
  launcher_args = argv[1:]
  workdir = workdir_of(launcher_args)
  gpus, source = find_gpus(os.environ) if _PLATFORM.value != "cpu" else ([], "")
  job = plan(_PLATFORM.value, gpus, source, os.environ, _NUM_PROCESSES.value, _DEVICES.value)
  check_cuda_plugin(job)
  num_processes = len(job.devices)
  log_dir = _LOG_DIR.value or (
    "logs" if storage.is_remote(storage.path(workdir)) else os.path.join(workdir, "logs")
  )

  elastic = elastic_of(job, launcher_args)

  def start_job() -> ProcessGroup:
    port = free_port()  # A fresh coordinator for every start.
    slots, args, shown = range(num_processes), launcher_args, job
    if elastic and elastic.shape.slots != tuple(slots):
      slots = elastic.shape.slots
      args = [*launcher_args, f"--config.grad_accum_steps={elastic.shape.grad_accum_steps}"]
      shown = job._replace(devices=[job.devices[slot] for slot in slots])
    supervise.say(f"[local] {shown.describe()}, coordinator 127.0.0.1:{port}, logs in {log_dir}")
    return ProcessGroup(
      [[sys.executable, "-m", "launcher", *args]] * len(slots),
      log_dir=log_dir,
      envs=[process_env(i, len(slots), job.devices[slot], port) for i, slot in enumerate(slots)],
      grace=_GRACE.value,
      prefix="[local]",
    )

  sys.exit(
    supervise.supervise(
      start_job,
      workdir=workdir,
      max_restarts=_MAX_RESTARTS.value,
      backoff_seconds=_BACKOFF.value,
      max_preemptions_per_hour=_MAX_PREEMPTIONS.value,
      prefix="[local]",
      elastic=elastic,
    )
  )


if __name__ == "__main__":
  console.run_tool(main, prefix="[local] error:")
