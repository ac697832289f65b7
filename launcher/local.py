"""N launcher processes on this machine, each with its own simulated CPU devices, as one job.

    python -m launcher.local --num_processes=2 --devices_per_process=4 -- \
        --config=configs/lm.py:tiny --workdir=/tmp/run

Every process joins one `jax.distributed` job over 127.0.0.1 on a free port. Each line a process
prints is shown prefixed with `[process i]` and kept in `--process_logs/process_<i>.log` (default
`WORKDIR/logs`, or `./logs` for a gs:// workdir: a log is appended line by line, on this machine;
what a full disk does not take is dropped from it and counted, and the job goes on).
When one process fails every process is asked to stop (SIGTERM), and killed after
`--grace_seconds` (5 s at most after a crash: the rest cannot save without it). Ctrl-C, SIGTERM and
SIGHUP (a dropped SSH session) are preemption notices: every process saves and stops, and the
runner exits 75 (a second Ctrl-C kills at once). With `--max_restarts=N` a failed job is started
again, on a fresh port, resuming from its last checkpoint (launcher/supervise.py). The exit code
is the first failure's (128 + N for a process killed by signal N, as a shell reports it); bad
input (2) from any process is the job's, never restarted, and names that process.
"""

import os
import socket
import sys

from absl import flags

from launcher import console, storage, supervise
from launcher.supervise import ProcessGroup, workdir_of

_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 2, "Processes to start.", lower_bound=1)
_DEVICES = flags.DEFINE_integer(
  "devices_per_process", 4, "Simulated CPU devices of each process.", lower_bound=1
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
  "from its last checkpoint) up to this many times; a preemption (exit 75) does not count, bad "
  "input (exit 2) never restarts.",
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


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on right now."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(process_id: int, num_processes: int, devices: int, port: int) -> dict[str, str]:
  """The environment of process `process_id`: its simulated devices and its place in the job."""
  xla_flags = [
    f
    for f in os.environ.get("XLA_FLAGS", "").split()
    if not f.startswith("--xla_force_host_platform_device_count")
  ]
  return {
    **os.environ,
    "XLA_FLAGS": " ".join(xla_flags + [f"--xla_force_host_platform_device_count={devices}"]),
    "JAX_PLATFORMS": "cpu",
    "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
    "JAX_COORDINATOR_BIND_ADDRESS": f"127.0.0.1:{port}",
    "JAX_NUM_PROCESSES": str(num_processes),
    "JAX_PROCESS_ID": str(process_id),
    "PYTHONUNBUFFERED": "1",
  }


def main(argv):
  launcher_args = argv[1:]
  num_processes, devices = _NUM_PROCESSES.value, _DEVICES.value
  workdir = workdir_of(launcher_args)
  log_dir = _LOG_DIR.value or (
    "logs" if storage.is_remote(storage.path(workdir)) else os.path.join(workdir, "logs")
  )

  def start_job() -> ProcessGroup:
    port = free_port()  # A fresh coordinator for every start.
    supervise.say(
      f"[local] {num_processes} processes x {devices} devices, coordinator "
      f"127.0.0.1:{port}, logs in {log_dir}"
    )
    return ProcessGroup(
      [[sys.executable, "-m", "launcher", *launcher_args]] * num_processes,
      log_dir=log_dir,
      envs=[process_env(i, num_processes, devices, port) for i in range(num_processes)],
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
    )
  )


if __name__ == "__main__":
  console.run_tool(main, prefix="[local] error:")
