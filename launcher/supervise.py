"""Runs a job's processes as one group and restarts a failed job from its last checkpoint: what
`launcher.local` and `scripts/tpu/pod.py` (`--max_restarts`) share. It talks to the job only
through exit codes (launcher/errors.py) and the workdir (the last reported step, the last
checkpoint).
"""

import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

from launcher import config as config_lib
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


def has_local_tier(workdir: str | None) -> bool:
  """Whether the run's latest start (WORKDIR/config.json) had a local checkpoint tier, whose
  newer steps the restart may resume from."""
  if workdir is None:
    return False
  config_text = _looked_up(
    lambda: storage.read_text(workdir_lib.config_file(storage.path(workdir)))
  )
  try:
    return bool(json.loads(config_text or "{}").get("local_checkpoint_dir"))
  except ValueError:  # Torn by a kill mid-write: only a log line's wording depends on it.
    return False


def resuming_from(workdir: str | None) -> str:
  """What a restart resumes from, for its line: `checkpoint 20`, with `or a newer local step`
  where the run has a local checkpoint tier."""
  checkpoint = last_checkpoint(workdir)
  resume = (
    "its last checkpoint"
    if workdir is None
    else f"checkpoint {checkpoint}"
    if checkpoint is not None
    else "the start (no checkpoint yet)"
  )
  if has_local_tier(workdir):
    resume += " or a newer local step"
  return resume


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
    self.resized = False  # Whether `wait` stopped the job for an elastic resize.
    self.started = time.time()
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

  def wait(self, resize: Callable[[], bool] | None = None) -> int:
    """Waits for every process; the first to fail ends the others. Returns the group's exit code.

    `resize`, asked every 0.1 s, says when the job should stop to start on another count
    (`Elastic.should_grow`): every process is sent the preemption notice, saves and stops, and
    `resized` is set; a process that did not save is `first_failure`."""
    while True:
      if resize is not None and resize():
        self.resized = True
        codes = self.stop()
        unsaved = [(i, c) for i, c in enumerate(codes) if c not in (0, EXIT_PREEMPTED)]
        if unsaved:
          self.first_failure = unsaved[0]
        return shell_code(unsaved[0][1]) if unsaved else EXIT_PREEMPTED
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
HOST_CHECK_TIMEOUT_S = 60.0  # A host check that has not answered by then fails.


def host_check_failure(command: str, slot: int) -> str | None:
  """Why the shell command `command`, `{slot}` replaced by the slot's index, says the slot's host
  is unhealthy (`CMD` exited with 1, was not found, did not answer within HOST_CHECK_TIMEOUT_S);
  None when it exits 0. The check runs in its own process group, killed on a timeout, and dies
  with the runner."""
  shown = command.replace("{slot}", str(slot))
  try:
    check = subprocess.Popen(  # pylint: disable=consider-using-with
      shown,
      shell=True,
      stdin=subprocess.DEVNULL,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
      start_new_session=True,
      preexec_fn=_die_with_parent,
    )
  except OSError as e:
    return f"`{shown}` could not start ({e.strerror})"
  try:
    code = check.wait(timeout=HOST_CHECK_TIMEOUT_S)
  except subprocess.TimeoutExpired:
    _signal_group(check, signal.SIGKILL)
    check.wait()
    return f"`{shown}` did not answer within {HOST_CHECK_TIMEOUT_S:g} s"
  if code == 0:
    return None
  return f"`{shown}` {describe_exit(code)}" + (" (command not found)" if code == 127 else "")


def started_training(workdir: str | None, process: int, since: float) -> bool:
  """Whether process `process` recorded its first step after `since` (a time.time()) in
  WORKDIR/hosts/process_<i>.jsonl; False when that cannot be read within LOOK_UP_S."""
  if workdir is None:
    return False

  def look_up():
    records = storage.read_jsonl(workdir_lib.host_records(storage.path(workdir), process))
    return any(r["event"] == "first_step" and r["time"] >= since for r in records)

  return bool(_looked_up(look_up))


class Shape(NamedTuple):
  """What an elastic job starts on: the slot of each process, and the microbatches per step."""

  slots: tuple[int, ...]
  grad_accum_steps: int


def _hosts(slots) -> str:
  slots = sorted(slots)
  return f"host {slots[0]} is" if len(slots) == 1 else f"hosts {', '.join(map(str, slots))} are"


class Elastic:
  """Which slots (a host's place in the job, with its devices) of an elastic job are lost, and
  the shape it runs on: the most healthy slots, at least `min_count`, whose devices divide the
  global batch into per-device microbatches no larger than the full job's and fit `mesh` (under
  parallel=fsdp). `failure(slot)` says why a slot's health check fails (None: it passes); a
  check that fails for every slot at the first start is bad input. A slot is lost when
  its health check fails, or when its process failed before its first step `failed_starts_lost`
  starts in a row; a lost slot whose check passes again is taken back, by one save and restart,
  at most once per `resize_interval` seconds (a grow that the re-check before its start finds
  failing again counts; its check polled every `check_interval`); one lost by failed starts stays
  lost while this runner runs."""

  def __init__(
    self,
    *,
    slot_count: int,
    min_count: int,
    devices_per_slot: int,
    batch_size: int,
    grad_accum_steps: int,
    failure: Callable[[int], str | None],
    failed_starts_lost: int,
    resize_interval: float,
    check_interval: float,
    prefix: str,
    parallel: str = "",
    mesh: str = "",
  ):
    self.slot_count, self.min_count, self.devices = slot_count, min_count, devices_per_slot
    self.batch_size = batch_size
    self.microbatch_size = batch_size // (slot_count * devices_per_slot) // grad_accum_steps
    self.parallel, self.mesh = parallel, mesh
    self._failure, self._failed_starts_lost = failure, failed_starts_lost
    self.failures: dict[int, str] = {}  # Why each slot failed its latest check.
    self._resize_interval, self._check_interval, self._prefix = (
      resize_interval,
      check_interval,
      prefix,
    )
    self.lost: set[int] = set()
    self.shape: Shape | None = None
    self._failed_starts = [0] * slot_count
    self._failed_out: set[int] = set()  # Lost by failed starts: not taken back in this run.
    self._gone: set[int] = set()  # Lost since the last shape was chosen, for its line.
    self._announced = False  # Whether the next shape's line was said already (a grow).
    self._last_resize = time.monotonic()
    self._last_check = 0.0
    self._pending: tuple[threading.Thread, list] | None = None  # A check beside the job.

  def fit(self, healthy: list[int]) -> Shape | None:
    """The shape on the most of the `healthy` slots (the lowest first) that keeps the batch and
    fits the mesh."""
    for count in range(len(healthy), self.min_count - 1, -1):
      accum = config_lib.microbatches_to_keep(
        self.batch_size, count * self.devices, self.microbatch_size
      )
      if accum and config_lib.mesh_fits(self.mesh, self.parallel, count, self.devices):
        return Shape(tuple(healthy[:count]), accum)
    return None

  def describe(self, shape: Shape) -> str:
    microbatches = (
      f"{shape.grad_accum_steps} microbatch{'es' if shape.grad_accum_steps > 1 else ''}"
    )
    return (
      f"{len(shape.slots)} processes x {self.devices} devices; global batch {self.batch_size} "
      f"kept as {microbatches}"
    )

  def _check(self, slots) -> set[int]:
    """The slots among `slots` whose health check fails, checked side by side in daemon threads
    (a check that hangs never keeps the runner from exiting); why each failed in `failures`."""
    found = {}

    def check(slot):
      found[slot] = self._failure(slot)

    threads = [threading.Thread(target=check, args=(s,), daemon=True) for s in sorted(slots)]
    for thread in threads:
      thread.start()
    for thread in threads:
      thread.join()
    failed = {slot: why for slot, why in found.items() if why is not None}
    self.failures.update(failed)
    return set(failed)

  def _lose(self, slots: set[int]) -> bool:
    slots -= self.lost
    self.lost |= slots
    self._gone |= slots
    return bool(slots)

  def next_shape(self) -> Shape | None:
    """Before a start: every slot not lost is checked, and the shape chosen; a change says its
    line. None (after one line) when the slots left cannot keep the job; a UsageError when the
    check fails for every slot at the first start (the check, not the hosts, is wrong)."""
    failed = self._check(set(range(self.slot_count)) - self.lost)
    if self.shape is None and len(failed) == self.slot_count:
      raise UsageError(
        f"--host_check fails for every slot at the start ({self.failures[0]}): fix the "
        "command ({slot} is replaced by the slot's index; exit 0 means healthy), or leave "
        "--host_check out"
      )
    self._lose(failed)
    healthy = sorted(set(range(self.slot_count)) - self.lost)
    shape = self.fit(healthy)
    gone = f"{_hosts(self._gone)} gone" if self._gone else "the hosts left"
    if shape is None:
      say(f"{self._prefix} {gone}: {self._why_not(healthy)}; giving up")
      self._gone = set()
      return None
    if self._gone:
      say(f"{self._prefix} {gone}: continuing on {self.describe(shape)}")
    elif shape != self.shape and self.shape is not None and not self._announced:
      say(f"{self._prefix} continuing on {self.describe(shape)}")
    if self.shape is not None and shape != self.shape:
      self._last_resize = time.monotonic()
    self._gone, self._announced, self.shape = set(), False, shape
    return shape

  def _why_not(self, healthy: list[int]) -> str:
    """Why no shape fits the `healthy` slots, for the line that gives up."""
    if not healthy:
      why = [self.failures[slot] for slot in sorted(self.lost) if slot in self.failures]
      return f"no healthy host left ({why[0]})" if why else "no healthy host left"
    if len(healthy) < self.min_count:
      return f"{len(healthy)} healthy host(s) left, fewer than --min_processes={self.min_count}"
    mesh = f" and config.mesh={self.mesh!r}" if self.parallel == "fsdp" and self.mesh else ""
    return (
      f"{len(healthy)} healthy host(s) left, and no count of them from "
      f"--min_processes={self.min_count} up splits global batch {self.batch_size} over "
      f"{self.devices} devices each without growing the per-device batch{mesh}"
    )

  def after_failure(self, process: int, trained: bool) -> bool:
    """After the job failed (`process` first, `trained`: whether it had reached its first
    step): whether a slot is lost now, so that the restart is a resize."""
    slot = self.shape.slots[process]
    if trained:
      self._failed_starts = [0] * self.slot_count
    else:
      self._failed_starts[slot] += 1
    if self._failed_starts[slot] >= self._failed_starts_lost:
      self._failed_out.add(slot)
    return self._lose(self._failed_out | self._check(self.shape.slots))

  def should_grow(self) -> bool:
    """Asked while the job runs: whether a lost slot passes its check again, the job would run
    on more processes with it, and the last resize is `resize_interval` ago. Checks run beside
    the job, one every `check_interval` at most."""
    if not self.lost - self._failed_out:
      return False
    now = time.monotonic()
    if self._pending is None:
      if now - self._last_check >= self._check_interval:
        self._last_check = now
        found = []
        checking = threading.Thread(
          target=lambda: found.append(self._check(self.lost - self._failed_out)), daemon=True
        )
        checking.start()
        self._pending = checking, found
      return False
    checking, found = self._pending
    if checking.is_alive():
      return False
    self._pending = None
    if not found:  # The check itself raised: taken as still failing.
      return False
    back = self.lost - self._failed_out - found[0]
    if not back or now - self._last_resize < self._resize_interval:
      return False
    healthy = sorted(set(range(self.slot_count)) - self.lost | back)
    shape = self.fit(healthy)
    if shape is None or len(shape.slots) <= len(self.shape.slots):
      return False
    self.lost -= back
    self._failed_starts = [0] * self.slot_count
    self._announced = True
    self._last_resize = now  # Even if the re-check before the start finds it failing again.
    say(
      f"{self._prefix} {_hosts(back)} back: the job saves, then continues on {self.describe(shape)}"
    )
    return True


def supervise(
  start_job: Callable[[], "ProcessGroup"],
  *,
  workdir: str | None,
  max_restarts: int,
  backoff_seconds: float,
  name: str = "process",
  prefix: str,
  max_preemptions_per_hour: int = MAX_PREEMPTIONS_PER_HOUR,
  elastic: Elastic | None = None,
) -> int:
  """Runs the job until it succeeds; restarts it after a failure at most `max_restarts` times.

  With `elastic`, `start_job` starts the job on `elastic.shape`, chosen before each start: a
  failure that loses a slot restarts on the slots left without counting, and a lost slot that
  comes back stops the job (it saves) to restart on more; a process that did not save for that
  stop is one line, and the start resumes from the last checkpoint.

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
  code = None
  while True:
    if elastic and elastic.next_shape() is None:
      return code or EXIT_PEER_LOST
    group = current["group"] = start_job()
    code = group.wait(elastic.should_grow) if elastic else group.wait()
    if code == 0:
      say(f"{prefix} the job finished" + (f" after {restarts} restart(s)" if restarts else ""))
      return 0
    if elastic and group.resized and code == EXIT_PREEMPTED:
      continue  # Every process saved for the resize.
    if elastic and not group.resized and code not in (EXIT_PREEMPTED, *NOT_RESTARTED):
      process, _ = group.first_failure
      if elastic.after_failure(process, started_training(workdir, process, group.started)):
        continue
    process, raw = current["group"].first_failure
    step = last_step(workdir, process)
    failure = f"{name} {process} {describe_exit(raw)}"
    if workdir is not None:
      failure += f" at step {step}" if step is not None else " before its first step"
    if code in NOT_RESTARTED:
      say(f"{prefix} {failure}: {NOT_RESTARTED[code]}, which a restart cannot fix; not restarting")
      return code
    if elastic and group.resized:
      say(
        f"{prefix} {failure} before it saved for the resize (a longer --grace_seconds lets the "
        f"save finish); resuming from {resuming_from(workdir)} without counting it"
      )
      continue
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
    say(
      f"{prefix} restart {restarts}/{max_restarts} after {failure}; resuming from "
      f"{resuming_from(workdir)}"
    )
    time.sleep(min(backoff_seconds * 2 ** (restarts - 1), MAX_BACKOFF_S))
