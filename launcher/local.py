"""N launcher processes on this machine, each with its own simulated CPU devices, as one job.

    python -m launcher.local --num_processes=2 --devices_per_process=4 -- \
        --config=configs/lm.py:tiny --workdir=/tmp/run

Every process joins one `jax.distributed` job over 127.0.0.1 on a free port. Each line a process
prints is shown prefixed with `[process i]` and kept in `--process_logs/process_<i>.log` (default
`WORKDIR/logs`, or `./logs` for a gs:// workdir: a log is appended line by line, on this machine).
When one process fails, or on Ctrl-C or SIGTERM, every process is asked to stop (SIGTERM), and
killed after `--grace_seconds` (5 s at most after a crash: the rest cannot save without it). With
`--max_restarts=N` a failed job is started again, on a fresh port, resuming from its last
checkpoint (launcher/supervise.py). The exit code is the first failure's (128 + N for a process
killed by signal N, as a shell reports it).
"""

import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable

from absl import app, flags

from launcher import supervise
from launcher.errors import EXIT_PEER_LOST, EXIT_PREEMPTED

_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 2, "Processes to start.", lower_bound=1)
_DEVICES = flags.DEFINE_integer("devices_per_process", 4, "Simulated CPU devices of each process.",
                                lower_bound=1)
_GRACE = flags.DEFINE_float("grace_seconds", 30.0,
                            "Seconds a process gets to stop after SIGTERM before SIGKILL.")

_LOG_DIR = flags.DEFINE_string(
    "process_logs", None, "Where each process's output is kept (default: WORKDIR/logs; ./logs for a "
    "gs:// workdir).")

_MAX_RESTARTS = flags.DEFINE_integer(
    "max_restarts", 0, "When a process fails, stop them all and start the job again (resuming "
    "from its last checkpoint) up to this many times; a preemption (exit 75) does not count, bad "
    "input (exit 2) never restarts.", lower_bound=0)
_BACKOFF = flags.DEFINE_float("restart_backoff_seconds", 1.0,
                              "Wait before restart i: this times 2^(i-1), at most 60 s.",
                              lower_bound=0)

_PR_SET_PDEATHSIG = 1


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on right now."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def workdir_of(launcher_args: list[str]) -> str:
  """The --workdir among the launcher's arguments (both `--workdir=X` and `--workdir X`)."""
  for i, arg in enumerate(launcher_args):
    if arg.startswith("--workdir="):
      return arg.split("=", 1)[1]
    if arg == "--workdir" and i + 1 < len(launcher_args):
      return launcher_args[i + 1]
  raise app.UsageError("pass the launcher's arguments after --, including --workdir=DIR")


def process_env(process_id: int, num_processes: int, devices: int, port: int) -> dict[str, str]:
  """The environment of process `process_id`: its simulated devices and its place in the job."""
  xla_flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
               if not f.startswith("--xla_force_host_platform_device_count")]
  return {**os.environ,
          "XLA_FLAGS": " ".join(xla_flags + [f"--xla_force_host_platform_device_count={devices}"]),
          "JAX_PLATFORMS": "cpu",
          "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
          "JAX_COORDINATOR_BIND_ADDRESS": f"127.0.0.1:{port}",
          "JAX_NUM_PROCESSES": str(num_processes),
          "JAX_PROCESS_ID": str(process_id),
          "PYTHONUNBUFFERED": "1"}


def _die_with_parent():
  """In the child before exec: the kernel kills it if the runner dies, even by SIGKILL."""
  ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class ProcessGroup:
  """Processes that live and die together: their output pumped to per-process logs, the first
  failure ends the rest. Also used by scripts/tpu/pod.py for the workers of a pod slice.

  `first_failure` is (index, Popen return code) of the first process that failed, once one has.
  """

  def __init__(self, commands: list[list[str]], *, log_dir: str, name: str = "process",
               envs: list[dict[str, str]] | None = None, grace: float = 30.0,
               on_stop: Callable[[], None] | None = None):
    self.grace, self._name, self._on_stop = grace, name, on_stop
    os.makedirs(log_dir, exist_ok=True)
    self.processes, self._pumps = [], []
    self.first_failure = None
    for i, command in enumerate(commands):
      process = subprocess.Popen(
          command, env=envs[i] if envs else None, stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
          preexec_fn=_die_with_parent)
      self.processes.append(process)
      pump = threading.Thread(target=_pump, daemon=True, args=(
          process.stdout, os.path.join(log_dir, f"{name}_{i}.log"), f"[{name} {i}] "))
      pump.start()
      self._pumps.append(pump)

  def wait(self) -> int:
    """Waits for every process; the first to fail ends the others. Returns the group's exit code."""
    while True:
      codes = [p.poll() for p in self.processes]
      # Seen in one poll, a lost-peer exit is the others' reaction, not the cause.
      failed = sorted(((i, c) for i, c in enumerate(codes) if c not in (None, 0)),
                      key=lambda failure: failure[1] == EXIT_PEER_LOST)
      if failed:
        self.first_failure = i, code = failed[0]
        print(f"[local] {self._name} {i} {supervise.describe_exit(code)}: stopping the others",
              flush=True)
        # A preempted job saves and exits by itself; after a crash the rest cannot save (every
        # save needs every process), so they get a short grace.
        self.stop(self.grace if code == EXIT_PREEMPTED else min(self.grace, 5.0))
        return supervise.shell_code(code)
      if all(c == 0 for c in codes):
        self._drain()
        return 0
      time.sleep(0.1)

  def stop(self, grace: float | None = None) -> None:
    """SIGTERM to every process group still running, SIGKILL to any left after the grace period."""
    for process in self.processes:
      _signal_group(process, signal.SIGTERM)
    deadline = time.monotonic() + (self.grace if grace is None else grace)
    for process in self.processes:
      try:
        process.wait(timeout=max(0.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        pass
    for process in self.processes:
      _signal_group(process, signal.SIGKILL)
      process.wait()
    self._drain()
    if self._on_stop:
      self._on_stop()

  def _drain(self):
    for pump in self._pumps:
      pump.join(timeout=5)


def _signal_group(process: subprocess.Popen, signum: int) -> None:
  try:
    os.killpg(process.pid, signum)
  except ProcessLookupError:
    pass


def _pump(stream, log_path: str, prefix: str) -> None:
  """Copies a process's output line by line to its log file and, prefixed, to our stdout."""
  with open(log_path, "ab") as log:
    for line in iter(stream.readline, b""):
      log.write(line)
      log.flush()
      sys.stdout.buffer.write(prefix.encode() + line)
      sys.stdout.buffer.flush()


def main(argv):
  launcher_args = argv[1:]
  num_processes, devices = _NUM_PROCESSES.value, _DEVICES.value
  workdir = workdir_of(launcher_args)
  log_dir = _LOG_DIR.value or ("logs" if "://" in workdir else os.path.join(workdir, "logs"))

  def start_job() -> ProcessGroup:
    port = free_port()  # A fresh coordinator for every start.
    print(f"[local] {num_processes} processes x {devices} devices, coordinator 127.0.0.1:{port}, "
          f"logs in {log_dir}", flush=True)
    return ProcessGroup(
        [[sys.executable, "-m", "launcher", *launcher_args]] * num_processes, log_dir=log_dir,
        envs=[process_env(i, num_processes, devices, port) for i in range(num_processes)],
        grace=_GRACE.value)

  sys.exit(supervise.supervise(start_job, workdir=workdir, max_restarts=_MAX_RESTARTS.value,
                               backoff_seconds=_BACKOFF.value))


if __name__ == "__main__":
  app.run(main)
