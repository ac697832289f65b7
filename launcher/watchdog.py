"""Failure handling beside the loop: a stuck-step watchdog, and one clear line when a peer is lost
(from a failed collective, or from the peers' liveness in jax's key-value store).

Each ends the process with a documented exit code (launcher/errors.py) that a supervisor restarts.
"""

import atexit
import faulthandler
import os
import socket
import sys
import threading
import time
from collections.abc import Callable

from launcher.errors import EXIT_PEER_LOST, EXIT_STUCK

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
  gone peer included).

  Every second each process bumps its counter under `launcher/alive/` in jax's coordination
  key-value store and reads the others'. A counter that has not moved for `timeout` seconds, or
  a store that cannot be reached (process 0, which hosts it, is gone), is a lost peer, named with
  its host (published at the start). A process that exits normally (return, sys.exit) says so
  first (atexit), so a finished peer is never taken for a lost one.
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
    atexit.register(self.stop)
    threading.Thread(target=self._watch, name="peer-monitor", daemon=True).start()

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
        if len(self._hosts) < self._count:
          self._hosts = {
            int(key.rsplit("/", 1)[1]): host
            for key, host in self._client.key_value_dir_get("launcher/host/")
          }
      except Exception as e:  # pylint: disable=broad-except  # Whatever the client raises.
        if self._stopped.is_set():
          return
        self._lost(
          f"the job's coordination service on {self._name(0)} cannot be reached "
          f"({(str(e).splitlines() or [type(e).__name__])[0][:200]})"
        )
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

  def _name(self, peer: int) -> str:
    host = self._hosts.get(peer)
    return f"process {peer}" + (f" on {host}" if host else "")

  def _lost(self, cause: str) -> None:
    if self._stopped.is_set():
      return
    last_step, last_checkpoint = self.progress()
    exit_peer_lost(
      RuntimeError(cause), process=self._who, last_step=last_step, last_checkpoint=last_checkpoint
    )


def is_peer_lost(error: BaseException) -> bool:
  """Whether a JAX runtime error says that another process of the job is gone."""
  text = str(error)
  return any(sign.lower() in text.lower() for sign in _PEER_LOST_SIGNS)


def exit_peer_lost(
  error: BaseException, *, process: str, last_step: int, last_checkpoint: int | None
) -> None:
  """One line naming what was lost and what is saved, then exit before jax's abort buries it."""
  first_line = (
    str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
  )
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
