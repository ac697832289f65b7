"""Preemption notices: SIGTERM, SIGUSR1 from SLURM's --signal, or Ctrl-C (SIGINT), turned into
"save and stop" at the same step on every process of the job. A second Ctrl-C stops at once.

`install()` runs first thing in the process (before the heavy imports, the join and the
restore), so a notice that arrives during start-up is kept, not fatal: the loop honours it at
its first step, the first point at which a save is possible. jax is imported only when needed.
"""

import os
import signal
import sys

from absl import logging

_notice: str | None = None  # The first notice's signal name, once one arrived.
_NOTICES = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
EXIT_INTERRUPTED = 128 + signal.SIGINT  # A second Ctrl-C: what a shell reports for SIGINT.


def install() -> None:
  """Keeps SIGTERM, SIGUSR1 and Ctrl-C as a notice from now on (their default action kills, or
  raises KeyboardInterrupt, which loses the work since the last checkpoint)."""
  for signum in _NOTICES:
    signal.signal(signum, _note)


def _note(signum, frame):
  del frame
  global _notice
  if signum == signal.SIGINT and _notice is not None:
    _stop_at_once()
  if _notice is None:
    _notice = signal.Signals(signum).name
  logging.warning(
    "received %s: saving a checkpoint and stopping at the next step%s",
    signal.Signals(signum).name,
    " (Ctrl-C again to stop at once, without saving)" if signum == signal.SIGINT else "",
  )


def _stop_at_once() -> None:
  """A second Ctrl-C: the person wants the process gone now, not after a save."""
  sys.stderr.write("SIGINT again: stopping at once, without saving\n")
  sys.stderr.flush()
  os._exit(EXIT_INTERRUPTED)  # pylint: disable=protected-access


def joined(distributed: bool) -> None:
  """Call right after `jax.distributed.initialize`: jax's preemption service now owns SIGTERM
  and agrees on a step with every process. SIGUSR1 and the first Ctrl-C are passed on to it as a
  SIGTERM, and so is a notice that arrived before the join."""
  if not distributed:
    return
  signal.signal(signal.SIGUSR1, _forward)
  signal.signal(signal.SIGINT, _forward)
  if _notice is not None:
    os.kill(os.getpid(), signal.SIGTERM)


def _forward(signum, frame):
  del frame
  global _notice
  if signum == signal.SIGINT and _notice is not None:
    _stop_at_once()
  _notice = _notice or signal.Signals(signum).name
  logging.warning(
    "received %s: saving a checkpoint with every process and stopping",
    signal.Signals(signum).name,
  )
  os.kill(os.getpid(), signal.SIGTERM)


class Preemption:
  """Whether the job was told to stop, agreed on by every process at the same step."""

  def __init__(self):
    import jax  # pylint: disable=import-outside-toplevel

    self._distributed = jax.process_count() > 1
    if not self._distributed:
      install()  # A run started from Python (train.run) rather than `python -m launcher`.

  def reached(self, step: int) -> bool:
    """True once, on every process at the same step, after a notice reached any process."""
    if self._distributed:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

      return multihost_utils.reached_preemption_sync_point(step)
    return _notice is not None
