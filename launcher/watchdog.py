"""Failure handling beside the loop: a stuck-step watchdog, and one clear line when a peer is lost.

Both end the process with a documented exit code (launcher/errors.py) that a supervisor restarts.
"""

import faulthandler
import os
import sys
import threading
import time

from launcher.errors import EXIT_PEER_LOST, EXIT_STUCK

# Words of the errors a collective raises when another process of the job is gone.
_PEER_LOST_SIGNS = ("Gloo", "Connection reset by peer", "Connection closed", "Socket closed",
                    "heartbeat", "unhealthy", "UNAVAILABLE", "DEADLINE_EXCEEDED",
                    "failed to connect", "Broken pipe")


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
        f"{EXIT_STUCK} so that a supervisor restarts the job from its last checkpoint\n")
    sys.stderr.flush()
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    sys.stderr.flush()
    os._exit(EXIT_STUCK)  # pylint: disable=protected-access


def is_peer_lost(error: BaseException) -> bool:
  """Whether a JAX runtime error says that another process of the job is gone."""
  text = str(error)
  return any(sign.lower() in text.lower() for sign in _PEER_LOST_SIGNS)


def exit_peer_lost(error: BaseException, *, process: str, last_step: int,
                   last_checkpoint: int | None) -> None:
  """One line naming what was lost and what is saved, then exit before jax's abort buries it."""
  first_line = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
  saved = (f"the last checkpoint is step {last_checkpoint}" if last_checkpoint is not None
           else "no checkpoint was saved yet")
  sys.stderr.write(
      f"error: {process} lost another process of the job after step {last_step}; {saved}. A restart of "
      f"the whole job resumes from it (launcher.local --max_restarts, or the cluster scripts' "
      f"MAX_RESTARTS). Cause: {first_line}\n")
  sys.stderr.flush()
  os._exit(EXIT_PEER_LOST)  # pylint: disable=protected-access
