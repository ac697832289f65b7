"""Preemption notices: SIGTERM, or SIGUSR1 from SLURM's --signal, turned into "save and stop" at
the same step on every process of the job."""

import os
import signal

import jax
from absl import logging
from jax.experimental import multihost_utils


class Preemption:
  """Whether the job was told to stop (SIGTERM, or SIGUSR1 from SLURM's --signal), agreed on by
  every process at the same step."""

  def __init__(self):
    self._distributed = jax.process_count() > 1
    self._signal = None
    if not self._distributed:
      signal.signal(signal.SIGTERM, self._note)
    # jax's preemption service listens for SIGTERM only: USR1 is turned into one.
    signal.signal(signal.SIGUSR1, self._forward_usr1)

  def _note(self, signum, frame):
    del frame
    self._signal = signal.Signals(signum).name
    logging.warning("received %s: saving a checkpoint and stopping at the next step", self._signal)

  def _forward_usr1(self, signum, frame):
    del frame
    logging.warning("received SIGUSR1: the scheduler will stop this job soon")
    if self._distributed:
      os.kill(os.getpid(), signal.SIGTERM)
    else:
      self._note(signum, None)

  def reached(self, step: int) -> bool:
    """True once, on every process at the same step, after a notice reached any process."""
    if self._distributed:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._signal is not None
