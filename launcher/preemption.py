"""Preemption notices: SIGTERM, or SIGUSR1 from SLURM's --signal, turned into "save and stop" at
the same step on every process of the job.

`install()` runs first thing in the process (before the heavy imports, the join and the
restore), so a notice that arrives during start-up is kept, not fatal: the loop honours it at
its first step, the first point at which a save is possible. jax is imported only when needed.
"""

import os
import signal

from absl import logging

_notice: str | None = None  # The first notice's signal name, once one arrived.
_NOTICES = (signal.SIGTERM, signal.SIGUSR1)


def install() -> None:
  """Keeps SIGTERM and SIGUSR1 as a notice from now on (their default action kills)."""
  for signum in _NOTICES:
    signal.signal(signum, _note)


def _note(signum, frame):
  del frame
  global _notice
  if _notice is None:
    _notice = signal.Signals(signum).name
  logging.warning(
    "received %s: saving a checkpoint and stopping at the next step", signal.Signals(signum).name
  )


def joined(distributed: bool) -> None:
  """Call right after `jax.distributed.initialize`: jax's preemption service now owns SIGTERM
  and agrees on a step with every process. SIGUSR1 is passed on to it as a SIGTERM, and so is a
  notice that arrived before the join."""
  if not distributed:
    return
  signal.signal(signal.SIGUSR1, _forward_usr1)
  if _notice is not None:
    os.kill(os.getpid(), signal.SIGTERM)


def _forward_usr1(signum, frame):
  del signum, frame
  logging.warning("received SIGUSR1: the scheduler will stop this job soon")
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
