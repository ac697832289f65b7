"""The bound on train and eval calls dispatched but not finished (config.max_calls_in_flight)."""

import collections

import jax


class InFlight:
  """Bounds the calls dispatched but not finished: CPU collectives abort when too many queue up."""

  def __init__(self, limit: int):
    self._limit = limit
    self._outputs = collections.deque()

  def wait_for_room(self) -> None:
    """Blocks until fewer than `limit` calls are unfinished."""
    while len(self._outputs) >= self._limit:
      jax.block_until_ready(self._outputs.popleft())

  def add(self, output) -> None:
    """Tracks a call by an output of it that the next call does not donate."""
    self._outputs.append(output)
