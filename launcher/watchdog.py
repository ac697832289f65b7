"""Failure handling beside the loop: a stuck-step watchdog, one clear line when a peer is lost
(from a failed collective, the peers' liveness in jax's key-value store, or jax's own abort when
process 0 is gone), and bad input seen by one process told to every other.

Each ends the process with a documented exit code (launcher/errors.py) that a supervisor reads.
"""

import atexit
import ctypes
import faulthandler
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable

from launcher.errors import EXIT_PEER_LOST, EXIT_STUCK, EXIT_USAGE

# Keys in jax's key-value store: a process's bad-input line, and the processes that heard one.
_BAD_INPUT = "launcher/bad_input/"
_HEARD = "launcher/heard_bad_input/"
_LEAVING = "launcher/leaving_on_bad_input/"
# How long a process that saw bad input waits for every other to hear of it before it leaves.
BAD_INPUT_TELL_S = 5.0
# The line of bad input a peer saw (once this process heard of it): it ends this process with 2.
_peer_bad_input: list[str] = []
_leaving_on_bad_input: list[str] = []  # This process's own bad-input line, once it is leaving.

# Words of the errors a collective raises when another process of the job is gone.
_PEER_LOST_SIGNS = (
  "Gloo",
  "Connection reset by peer",
  "Connection closed",
  "Socket closed",
  "heartbeat",
  "unhealthy",
  "UNAVAILABLE",
  "DEADLINE_EXCEEDED",
  "failed to connect",
  "Broken pipe",
)


class StepWatchdog:
  """Ends the process when no train call completes within `timeout` seconds of the last one.

  Armed only while the loop trains: `pause()` around compilation, eval and checkpoint saves. On
  expiry it writes every thread's Python stack (faulthandler: works while the main thread is
  blocked in native code), says at which step and for how long it waited, and exits EXIT_STUCK.
  """

  def __init__(self, timeout: float, describe_process: str = ""):
    self._timeout = timeout
    self._who = describe_process
    self._deadline = None
    self._last_step = 0
    self._condition = threading.Condition()
    if timeout > 0:
      threading.Thread(target=self._watch, name="step-watchdog", daemon=True).start()

  def completed(self, step: int) -> None:
    """A train call finished at `step`: the next one has `timeout` seconds from now."""
    with self._condition:
      self._last_step = step
      self._deadline = time.monotonic() + self._timeout
      self._condition.notify()

  @property
  def last_completed_step(self) -> int:
    return self._last_step

  def pause(self) -> None:
    """Until the next `completed`, nothing counts (compilation, eval, saves)."""
    with self._condition:
      self._deadline = None

  def _watch(self) -> None:
    with self._condition:
      while True:
        if self._deadline is None:
          self._condition.wait()
          continue
        left = self._deadline - time.monotonic()
        if left > 0:
          self._condition.wait(left)
          continue
        break
    sys.stderr.write(
      f"error: {self._who}stuck: no train call finished within --step_timeout_seconds="
      f"{self._timeout:g} after step {self._last_step} (waited {self._timeout:g} s for the "
      f"next one); the stack of every thread follows, then the process exits with "
      f"{EXIT_STUCK} so that a supervisor restarts the job from its last checkpoint\n"
    )
    sys.stderr.flush()
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    sys.stderr.flush()
    os._exit(EXIT_STUCK)  # pylint: disable=protected-access


# A peer whose liveness counter has not moved for this long is lost. jax's own heartbeat timeout
# (--heartbeat_timeout_seconds, 100 s) ends the job later, in a C++ abort without the line.
PEER_TIMEOUT_S = 20.0


class PeerMonitor:
  """Ends this process with the lost-peer line (exit 76) within PEER_TIMEOUT_S + 1 s of another
  process of the job stopping, whatever the main thread is doing (a collective waiting for the
  gone peer included); and with exit 2 and the peer's line when another process saw bad input.

  Every second each process bumps its counter under `launcher/alive/` in jax's coordination
  key-value store and reads the others'. A counter that has not moved for `timeout` seconds, or
  a store that has not answered for `timeout` seconds (process 0, which hosts it, is gone; a
  failed call alone is retried), is a lost peer, named with its host (published at the start).
  A process that exits normally (return, sys.exit) says so first (atexit), so a finished peer is
  never taken for a lost one.
  """

  def __init__(
    self,
    client,
    process_index: int,
    process_count: int,
    *,
    describe_process: str,
    timeout: float = PEER_TIMEOUT_S,
    interval: float = 1.0,
  ):
    self._client, self._index, self._count = client, process_index, process_count
    self._who, self._timeout, self._interval = describe_process, timeout, interval
    self.progress: Callable[[], tuple[int, int | None]] = lambda: (0, None)
    self._stopped = threading.Event()
    self._hosts: dict[int, str] = {}
    client.key_value_set(
      f"launcher/host/{process_index}", socket.gethostname(), allow_overwrite=True
    )
    # Published now, not after the first interval: a process that dies within it is still seen.
    client.key_value_set(f"launcher/alive/{process_index}", "0", allow_overwrite=True)
    self._answered, self._store_error = time.monotonic(), ""
    _monitors[:] = [self]
    atexit.register(self.stop)
    threading.Thread(target=self._watch, name="peer-monitor", daemon=True).start()
    threading.Thread(target=self._watch_store, name="peer-monitor-store", daemon=True).start()

  def stop(self) -> None:
    """This process is ending normally: its peers stop watching it, and it stops watching them."""
    if not self._stopped.is_set():
      self._stopped.set()
      try:
        self._client.key_value_set(f"launcher/alive/{self._index}", "done", allow_overwrite=True)
      except Exception:  # pylint: disable=broad-except  # The store may be gone at the end.
        pass

  def _watch(self) -> None:
    counter, last_seen, changed = 0, {}, {}
    while not self._stopped.wait(self._interval):
      counter += 1
      try:
        self._client.key_value_set(
          f"launcher/alive/{self._index}", str(counter), allow_overwrite=True
        )
        alive = dict(self._client.key_value_dir_get("launcher/alive/"))
        bad_input = self._client.key_value_dir_get(_BAD_INPUT)
        if len(self._hosts) < self._count:
          self._hosts = {
            int(key.rsplit("/", 1)[1]): host
            for key, host in self._client.key_value_dir_get("launcher/host/")
          }
      except Exception as e:  # pylint: disable=broad-except  # Retried until the store's bound.
        self._store_error = (str(e).splitlines() or [type(e).__name__])[0][:200]
        continue
      self._answered = time.monotonic()
      for key, line in bad_input:
        if int(key.rsplit("/", 1)[1]) != self._index:
          self._heard_bad_input(int(key.rsplit("/", 1)[1]), line)
      now = time.monotonic()
      for peer in range(self._count):
        value = alive.get(f"launcher/alive/{peer}")
        if peer == self._index or value in (None, "done"):  # Not started watching yet, or ended.
          continue
        if peer not in changed or value != last_seen[peer]:
          last_seen[peer], changed[peer] = value, now
        elif now - changed[peer] > self._timeout:
          self._lost(
            f"{self._name(peer)} sent no sign of life for {self._timeout:g} s (it was "
            "killed, crashed, or its host is gone)"
          )

  def _watch_store(self) -> None:
    """A store that has not answered for `timeout` seconds, its calls failing or hanging (a
    stopped or unreachable process 0), is a lost process 0."""
    while not self._stopped.wait(self._interval):
      silent = time.monotonic() - self._answered
      if silent > self._timeout:
        self._lost(
          f"the job's coordination service on {self._name(0)} did not answer for {silent:.0f} s"
          + (f" (last error: {self._store_error})" if self._store_error else "")
        )

  def _name(self, peer: int) -> str:
    host = self._hosts.get(peer)
    return f"process {peer}" + (f" on {host}" if host else "")

  def _heard_bad_input(self, peer: int, line: str) -> None:
    """Another process saw bad input: says it heard (that process leaves then), and exits 2 with
    its line. Most often the main thread does so first, when that process's exit breaks its
    collective (exit_peer_lost); this is for a main thread that is not in one."""
    _peer_bad_input.append(f"{self._name(peer)} saw bad input: {line}")
    self._stopped.set()
    try:
      self._client.key_value_set(f"{_HEARD}{self._index}", str(peer), allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except  # That process leaves within its bound anyway.
      pass
    _exit_heard_bad_input(self._who, after=3.0)

  def _lost(self, cause: str) -> None:
    if self._stopped.is_set():
      return
    last_step, last_checkpoint = self.progress()
    exit_peer_lost(
      RuntimeError(cause), process=self._who, last_step=last_step, last_checkpoint=last_checkpoint
    )


_monitors: list[PeerMonitor] = []  # The running one, once train.run has started it.


def exit_bad_input(message: str, client, process_index: int, process_count: int) -> None:
  """Bad input this process saw, perhaps alone (a file missing on its host): its line, then every
  other process is told through jax's key-value store (each ends with exit 2, naming this one),
  and this process exits 2 at once, without jax's shutdown barrier (where it would wait for
  peers held in a collective). It waits up to BAD_INPUT_TELL_S for the others to hear, since
  process 0's exit takes the store with it."""
  _leaving_on_bad_input.append(message)
  sys.stderr.write(f"error: {message}\n")
  sys.stderr.flush()
  sys.stdout.flush()
  for monitor in _monitors:
    monitor.stop()
  try:
    client.key_value_set(f"{_BAD_INPUT}{process_index}", message, allow_overwrite=True)
    others = set(range(process_count)) - {process_index}
    deadline = time.monotonic() + BAD_INPUT_TELL_S
    while time.monotonic() < deadline:
      told = {
        int(key.rsplit("/", 1)[1])
        for prefix in (_BAD_INPUT, _HEARD)
        for key, _ in client.key_value_dir_get(prefix)
      }
      done = {
        int(key.rsplit("/", 1)[1])
        for key, value in client.key_value_dir_get("launcher/alive/")
        if value == "done"
      }
      if others <= told | done:
        break
      time.sleep(0.05)
    if process_index != 0:
      client.key_value_set(f"{_LEAVING}{process_index}", "", allow_overwrite=True)
    else:  # Its exit takes the store: a peer still writing its own line would abort mid-way.
      _wait_for_peers_leaving(client, deadline)
  except Exception:  # pylint: disable=broad-except  # The store is gone: the exit code still says it.
    pass
  os._exit(EXIT_USAGE)  # pylint: disable=protected-access


def _wait_for_peers_leaving(client, deadline: float) -> None:
  """Until every process that saw bad input too has said it is leaving (or `deadline`)."""
  while time.monotonic() < deadline:
    seeing = {key.rsplit("/", 1)[1] for key, _ in client.key_value_dir_get(_BAD_INPUT)}
    leaving = {key.rsplit("/", 1)[1] for key, _ in client.key_value_dir_get(_LEAVING)}
    if seeing - {"0"} <= leaving:
      time.sleep(0.2)  # Between its key and its exit.
      return
    time.sleep(0.05)


_abort_handlers = []  # The installed handler, kept alive for C to call.
_coordinator: list[str] = []  # Process 0's address, on the other processes of a job.


def _coordinator_gone() -> str | None:
  """What to say when process 0, which hosts jax's coordination service, no longer accepts
  connections (its process is gone); None while it does, or on process 0 itself."""
  if not _coordinator:
    return None
  host, port = _coordinator[0].rsplit(":", 1)
  try:
    socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
  except OSError as e:
    return (
      f"process 0 ({_coordinator[0]}), which hosts the job's coordination service, is gone "
      f"({e.strerror or e})"
    )
  return None


def end_with_line_on_abort(coordinator_address: str, process: str) -> None:
  """Makes jax's abort on a gone process 0 end this process with the lost-peer line and exit 76.

  When process 0 (which hosts jax's coordination service) dies, jax aborts every other process
  from C++ within a second, before any Python handler or the PeerMonitor can act; jax's own
  callback for that error cannot call Python (its status has no Python type: std::bad_cast). A
  C-level SIGABRT handler can: if the coordinator no longer accepts connections, the abort was
  that, and the process ends with the line; any other abort goes on as it would have.
  """
  libc = ctypes.CDLL(None, use_errno=True)
  libc.signal.restype = ctypes.c_void_p
  libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
  _coordinator[:] = [coordinator_address]
  previous = []

  def on_abort(signum):
    if _leaving_on_bad_input:  # Process 0 left first on the same bad input: its line is said.
      os._exit(EXIT_USAGE)  # pylint: disable=protected-access
    gone = _coordinator_gone()
    if gone:
      last_step, last_checkpoint = _monitors[0].progress() if _monitors else (0, None)
      exit_peer_lost(
        RuntimeError(f"{gone}, and jax aborted this process"),
        process=process,
        last_step=last_step,
        last_checkpoint=last_checkpoint,
      )
    libc.signal(signum, previous[0])
    os.abort()

  handler = ctypes.CFUNCTYPE(None, ctypes.c_int)(on_abort)
  _abort_handlers[:] = [handler]
  previous.append(libc.signal(signal.SIGABRT, ctypes.cast(handler, ctypes.c_void_p)))


def _exit_heard_bad_input(process: str, after: float) -> None:
  """Exit 2 with the line of the peer that saw bad input, `after` seconds from now: that peer
  leaves first, so that a runner names it."""
  time.sleep(after)
  sys.stderr.write(
    f"error: {process} stops: {_peer_bad_input[0]} (exit {EXIT_USAGE}: a restart cannot fix it)\n"
  )
  sys.stderr.flush()
  os._exit(EXIT_USAGE)  # pylint: disable=protected-access


def is_peer_lost(error: BaseException) -> bool:
  """Whether a JAX runtime error says that another process of the job is gone."""
  text = str(error)
  return any(sign.lower() in text.lower() for sign in _PEER_LOST_SIGNS)


def exit_peer_lost(
  error: BaseException, *, process: str, last_step: int, last_checkpoint: int | None
) -> None:
  """One line naming what was lost and what is saved, then exit before jax's abort buries it; or,
  when the loss is a peer that left on bad input, that peer's line and exit 2."""
  if _leaving_on_bad_input:  # Its own bad-input line is said; a peer merely left first.
    os._exit(EXIT_USAGE)  # pylint: disable=protected-access
  if _peer_bad_input:
    _exit_heard_bad_input(process, after=0.5)
  first_line = (
    str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
  )
  if "coordination service" not in first_line:  # A collective may hear of process 0's loss first.
    first_line = _coordinator_gone() or first_line
  saved = (
    f"the last checkpoint is step {last_checkpoint}"
    if last_checkpoint is not None
    else "no checkpoint was saved yet"
  )
  sys.stderr.write(
    f"error: {process} lost another process of the job after step {last_step}; {saved}. A restart of "
    f"the whole job resumes from it (launcher.local --max_restarts, or the cluster scripts' "
    f"MAX_RESTARTS). Cause: {first_line}\n"
  )
  sys.stderr.flush()
  os._exit(EXIT_PEER_LOST)  # pylint: disable=protected-access
