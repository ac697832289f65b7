"""Runs a job's processes as one group and restarts a failed job from its last checkpoint: what
`launcher.local` and `scripts/tpu/pod.py` (`--max_restarts`) share. It talks to the job only
through exit codes (launcher/errors.py) and the workdir (the last reported step, the last
checkpoint).
"""

import ctypes
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from launcher import console, storage
from launcher import workdir as workdir_lib
from launcher.errors import (
  EXIT_OUT_OF_MEMORY,
  EXIT_PEER_LOST,
  EXIT_PREEMPTED,
  EXIT_STORAGE,
  EXIT_USAGE,
  UsageError,
)

MAX_BACKOFF_S = 60.0
# Exits that a restart would only repeat, and what each says (launcher/errors.py).
NOT_RESTARTED = {
  EXIT_USAGE: "bad input",
  EXIT_STORAGE: "its storage refused to write",
  EXIT_OUT_OF_MEMORY: "out of memory (its line above says what to change)",
}
_PR_SET_PDEATHSIG = 1


def signal_name(signum: int) -> str:
  """SIGKILL, SIGRTMIN+1 for a real-time signal, or `signal 99` for a number with no name."""
  try:
    return signal.Signals(signum).name
  except ValueError:
    if signal.SIGRTMIN <= signum <= signal.SIGRTMAX:
      return f"SIGRTMIN+{signum - signal.SIGRTMIN}"
    return f"signal {signum}"


def describe_exit(code: int) -> str:
  """`exited with 1`, or `was killed by SIGKILL` for a negative Popen code."""
  return f"was killed by {signal_name(-code)}" if code < 0 else f"exited with {code}"


def say(line: str) -> None:
  """One line on our stdout. A closed console (`| head`, a dropped SSH session) never stops the
  runner: from the first failed write on, stdout goes to /dev/null."""
  try:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
  except OSError:
    _drop_stdout()


def _drop_stdout() -> None:
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, sys.stdout.fileno())
  os.close(devnull)


def shell_code(code: int) -> int:
  """A Popen return code as a shell reports it: 128 + N for a process killed by signal N."""
  return 128 - code if code < 0 else code


LOOK_UP_S = 10.0  # How long a look at the workdir for a log line may take (a silent bucket).


def _looked_up(look_up: Callable[[], int | None]) -> int | None:
  """`look_up()`, or None when it fails or takes longer than LOOK_UP_S: what it finds only goes
  into a line, and a storage that does not answer must never hold up the runner."""
  found = []

  def run():
    try:
      found.append(look_up())
    except Exception:  # pylint: disable=broad-except  # Only for a log line.
      pass

  looking = threading.Thread(target=run, name="workdir-look-up", daemon=True)
  looking.start()
  looking.join(LOOK_UP_S)
  return found[0] if found else None


def last_step(workdir: str | None, process: int) -> int | None:
  """The last step process `process` reported in WORKDIR/hosts/process_<i>.jsonl, if readable
  within LOOK_UP_S."""
  if workdir is None:
    return None

  def look_up():
    records = storage.read_jsonl(workdir_lib.host_records(storage.path(workdir), process))
    steps = [r.get("step", r.get("first_step")) for r in records]
    steps = [s for s in steps if s is not None]
    return steps[-1] if steps else None

  return _looked_up(look_up)


def last_checkpoint(workdir: str | None) -> int | None:
  """The newest step orbax finished writing in WORKDIR/checkpoints (local, shared or gs://), if
  readable within LOOK_UP_S."""
  if workdir is None:
    return None

  def look_up():
    steps = workdir_lib.complete_checkpoint_steps(
      workdir_lib.checkpoints_dir(storage.path(workdir))
    )
    return steps[-1] if steps else None

  return _looked_up(look_up)


def workdir_of(launcher_args: list[str]) -> str:
  """The --workdir among the launcher's arguments (both `--workdir=X` and `--workdir X`; the
  last one, which the launcher uses)."""
  workdir = console.flag_value(launcher_args, "--workdir")
  if workdir is None:
    raise UsageError("pass the launcher's arguments after --, including --workdir=DIR")
  return workdir


def _die_with_parent():
  """In the child before exec: the kernel kills it if the runner dies, even by SIGKILL."""
  ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class ProcessGroup:
  """Processes that live and die together: their output pumped to per-process logs, the first
  failure ends the rest. Also used by scripts/tpu/pod.py for the workers of a pod slice.

  `first_failure` is (index, Popen return code) of the first process that failed, once one has;
  a process that exited with a code no restart fixes (2 bad input, 74, 78 out of memory) by the
  time the others stopped takes its place, since the others' exits (76, a signal) were their
  reaction to it.
  """

  def __init__(
    self,
    commands: list[list[str]],
    *,
    log_dir: str,
    name: str = "process",
    envs: list[dict[str, str]] | None = None,
    grace: float = 30.0,
    on_stop: Callable[[], None] | None = None,
    prefix: str,
  ):
    self.grace, self._name, self._on_stop, self._prefix = grace, name, on_stop, prefix
    os.makedirs(log_dir, exist_ok=True)
    self.processes, self._pumps = [], []
    self.first_failure = None
    for i, command in enumerate(commands):
      process = subprocess.Popen(
        command,
        env=envs[i] if envs else None,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=_die_with_parent,
      )
      self.processes.append(process)
      pump = threading.Thread(
        target=_pump,
        daemon=True,
        args=(
          process.stdout,
          os.path.join(log_dir, f"{name}_{i}.log"),
          f"[{name} {i}] ",
          prefix,
        ),
      )
      pump.start()
      self._pumps.append(pump)

  def wait(self) -> int:
    """Waits for every process; the first to fail ends the others. Returns the group's exit code."""
    while True:
      codes = [p.poll() for p in self.processes]
      # Seen in one poll, bad input (or out of memory) is the cause and a lost-peer exit the
      # others' reaction.
      failed = sorted(
        ((i, c) for i, c in enumerate(codes) if c not in (None, 0)),
        key=lambda failure: (failure[1] not in NOT_RESTARTED, failure[1] == EXIT_PEER_LOST),
      )
      if failed:
        self.first_failure = i, code = failed[0]
        say(f"{self._prefix} {self._name} {i} {describe_exit(code)}: stopping the others")
        # A preempted job saves and exits by itself; after a crash the rest cannot save (every
        # save needs every process), so they get a short grace.
        codes = self.stop(self.grace if code == EXIT_PREEMPTED else min(self.grace, 5.0))
        verdict = next((c for c in codes if c in NOT_RESTARTED), None)
        if code not in NOT_RESTARTED and verdict is not None:  # What one process saw decides.
          self.first_failure = i, code = codes.index(verdict), verdict
          say(f"{self._prefix} {self._name} {i} {describe_exit(code)}: {NOT_RESTARTED[code]}")
        return shell_code(code)
      if all(c == 0 for c in codes):
        self._drain()
        return 0
      time.sleep(0.1)

  def stop(self, grace: float | None = None) -> list[int]:
    """SIGTERM to every process group still running, SIGKILL to any left after the grace period;
    returns every process's Popen return code."""
    for process in self.processes:
      _signal_group(process, signal.SIGTERM)
    deadline = time.monotonic() + (self.grace if grace is None else grace)
    for process in self.processes:
      try:
        process.wait(timeout=max(0.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        pass
    self.kill()
    if self._on_stop:
      self._on_stop()
    return [process.returncode for process in self.processes]

  def kill(self) -> None:
    """SIGKILL to every process group still running, and their output drained to the logs."""
    for process in self.processes:
      _signal_group(process, signal.SIGKILL)
      process.wait()
    self._drain()

  def _drain(self):
    for pump in self._pumps:
      pump.join(timeout=5)


def _signal_group(process: subprocess.Popen, signum: int) -> None:
  try:
    os.killpg(process.pid, signum)
  except ProcessLookupError:
    pass


# gloo's connection notices (C++, written to stdout by every thread, often interleaved): kept in
# the process's log, left off the console.
_CONSOLE_NOISE = re.compile(rb"\[Gloo\]|connected to \d+ peer ranks")


def _is_trouble(line: bytes) -> bool:
  """Whether a process's line (`[process i/n] ...`) is a warning, an error or a traceback, which
  the runner shows on its stderr (progress goes to stdout: `> log` keeps it, errors stay seen)."""
  body = line.split(b"] ", 1)[1] if line.startswith(b"[") and b"] " in line else line
  return body.startswith((b"error:", b"warning:", b"Traceback", b"WARNING:", b"ERROR:"))


def _pump(stream, log_path: str, prefix: str, runner: str) -> None:
  """Copies a process's output line by line to its log file and, prefixed, to our stdout, or our
  stderr for its warnings and errors (a launcher line that already starts with the same
  `[process i/n]` is shown as it is), to the
  end: a closed console leaves the log every line, and a log that cannot be written (a full disk)
  never stops the pipe being drained. Bytes the log could not take are dropped and counted: one
  line when it first happens, one with the count at the end."""
  own_prefix = prefix.rstrip("] ").encode() + b"/"
  who = prefix.strip("[] ")
  log, dropped, lines_dropped = None, 0, 0
  try:
    log = open(log_path, "ab", buffering=0)  # pylint: disable=consider-using-with
  except OSError as e:
    say(
      f"{runner} {who}'s log {log_path} cannot be opened ({e.strerror}): its output is shown "
      "here only"
    )
  for line in iter(stream.readline, b""):
    written = 0
    try:
      while log is not None and written < len(line):
        count = log.write(line[written:])
        if not count:
          break
        written += count
    except OSError as e:
      if not dropped:
        say(
          f"{runner} {who}'s log {log_path} cannot be written ({e.strerror}): what it cannot "
          "take is dropped from it and counted (the console still shows every line), and the "
          "job goes on"
        )
    if written < len(line):
      dropped += len(line) - written
      lines_dropped += 1
    if _CONSOLE_NOISE.search(line):
      continue
    shown = line if line.startswith(own_prefix) else prefix.encode() + line
    console = sys.stderr if _is_trouble(shown) else sys.stdout
    try:
      console.buffer.write(shown)
      console.buffer.flush()
    except OSError:
      if console is sys.stdout:
        _drop_stdout()
    except ValueError:  # The console was closed under us: the log still gets every line.
      pass
  if log is not None:
    log.close()
  if dropped:
    say(
      f"{runner} {who}'s log {log_path} is missing {dropped:,} bytes ({lines_dropped:,} "
      "lines) of its output: its storage did not take them"
    )


MAX_PREEMPTIONS_PER_HOUR = 10


def supervise(
  start_job: Callable[[], "ProcessGroup"],
  *,
  workdir: str | None,
  max_restarts: int,
  backoff_seconds: float,
  name: str = "process",
  prefix: str,
  max_preemptions_per_hour: int = MAX_PREEMPTIONS_PER_HOUR,
) -> int:
  """Runs the job until it succeeds; restarts it after a failure at most `max_restarts` times.

  A preemption exit (75) restarts without counting, with the same backoff, at most
  `max_preemptions_per_hour` times an hour; bad input (2), storage that refuses writes (74) and
  out of memory (78) never restart. Each restart is one
  line (with the step and checkpoint read from `workdir`, when given); when the restarts run
  out, a summary of the first failure, and its exit code.

  SIGTERM, SIGINT and SIGHUP (a dropped SSH session) are notices: every process is asked to save
  and stop, and the runner exits with what they did (75 when every one saved). A second notice
  kills them at once.
  """
  current, stopping = {}, []

  def stop(signum, frame):
    del frame
    if stopping:
      say(f"{prefix} {signal_name(signum)} again: killing every {name} now")
      if current:
        current["group"].kill()
      raise SystemExit(128 + signum)
    stopping.append(signum)
    say(
      f"{prefix} {signal_name(signum)}: asking every {name} to save and stop (again to kill "
      "at once)"
    )
    codes = current["group"].stop() if current else []
    saved = codes and all(code in (0, EXIT_PREEMPTED) for code in codes)
    if saved and EXIT_PREEMPTED in codes:
      say(
        f"{prefix} every {name} saved and stopped: exiting with {EXIT_PREEMPTED} (run the same "
        "command again to resume)"
      )
      raise SystemExit(EXIT_PREEMPTED)
    raise SystemExit(0 if saved else 128 + signum)

  for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(signum, stop)
  restarts, first_failure, preemptions = 0, None, []
  while True:
    current["group"] = start_job()
    code = current["group"].wait()
    if code == 0:
      say(f"{prefix} the job finished" + (f" after {restarts} restart(s)" if restarts else ""))
      return 0
    process, raw = current["group"].first_failure
    step = last_step(workdir, process)
    failure = f"{name} {process} {describe_exit(raw)}"
    if workdir is not None:
      failure += f" at step {step}" if step is not None else " before its first step"
    if code in NOT_RESTARTED:
      say(f"{prefix} {failure}: {NOT_RESTARTED[code]}, which a restart cannot fix; not restarting")
      return code
    if code == EXIT_PREEMPTED and max_restarts:
      now = time.monotonic()
      preemptions = [t for t in preemptions if now - t < 3600] + [now]
      if len(preemptions) > max_preemptions_per_hour:
        say(
          f"{prefix} {failure} (preempted) for the {len(preemptions)}th time within an hour; "
          f"giving up (at most {max_preemptions_per_hour} an hour)"
        )
        return code
      wait = min(backoff_seconds * 2 ** (len(preemptions) - 1), MAX_BACKOFF_S)
      say(f"{prefix} {failure} (preempted); restarting in {wait:g} s without counting it")
      time.sleep(wait)
      continue
    first_failure = first_failure or (failure, code)
    if restarts >= max_restarts:
      if max_restarts:
        say(
          f"{prefix} giving up after {restarts} restart(s); the first failure: "
          f"{first_failure[0]}; the last: {failure}"
        )
      else:
        say(f"{prefix} {failure}; no restart asked (--max_restarts=0)")
      return first_failure[1]
    restarts += 1
    checkpoint = last_checkpoint(workdir)
    resume = (
      "its last checkpoint"
      if workdir is None
      else f"checkpoint {checkpoint}"
      if checkpoint is not None
      else "the start (no checkpoint yet)"
    )
    say(f"{prefix} restart {restarts}/{max_restarts} after {failure}; resuming from {resume}")
    time.sleep(min(backoff_seconds * 2 ** (restarts - 1), MAX_BACKOFF_S))
