"""How many steps each compiled train call runs (K): the config's number, or with
`steps_per_call="auto"` one chosen from the first calls' timings, so that the host's work per call
is a small share of the call and a call still ends within a second of a preemption notice."""

import itertools
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils

from launcher import data
from launcher.config import AUTO

# The lengths a run may compile (two at most: 1 and the chosen one): 4 and 5 between 2 and 10, for
# steps of a few hundred ms that the 1 s bound holds to a few a call; 25 divides intervals of 50.
CANDIDATES = (1, 2, 4, 5, 10, 20, 25, 50, 100)
# The most of a call that the host's per-call work may take.
HOST_SHARE = 0.01
# The longest a call may run: a preemption notice waits for the call in flight to end.
MAX_CALL_S = 1.0
# Calls timed (after the first, which compiles) before K is chosen.
MEASURED_CALLS = 5


class Timing(NamedTuple):
  """What one K=1 call cost: `data_s` waiting for its batch, `host_s` from then until the call
  was dispatched and the loop's own work done, `device_s` from there until its result was ready."""

  data_s: float
  host_s: float
  device_s: float


class Choice(NamedTuple):
  k: int
  why: str


def choose(
  timing: Timing, intervals, *, host_share: float = HOST_SHARE, max_call_s: float = MAX_CALL_S
) -> Choice:
  """The smallest K of CANDIDATES whose call the host's work takes at most `host_share` of, among
  those that divide every nonzero interval (report, eval, checkpoint) and run at most `max_call_s`
  a call; else the largest of those (the host then takes more); 1 when none other fits."""
  fits = [k for k in CANDIDATES if all(n % k == 0 for n in intervals if n)]
  # A call of K steps takes K x (host + device): on CPU devices much of a step runs in the
  # dispatching thread (XLA's CPU client), so the host's time grows with K too.
  step_s = timing.host_s + timing.device_s
  short = [k for k in fits if k == 1 or k * step_s <= max_call_s]

  def share(k):
    return timing.host_s / (timing.host_s + k * timing.device_s) if timing.host_s > 0 else 0.0

  k = next((k for k in short if share(k) <= host_share), short[-1])
  limits = []  # What kept K from a longer call, when the host's share is still above target.
  if share(k) > host_share and len(short) < len(fits):
    limits.append(f"K={fits[len(short)]} would run past {max_call_s:g} s a call")
  if share(k) > host_share and fits[-1] < CANDIDATES[-1]:
    limits.append(f"K divides the report/eval/checkpoint intervals {[n for n in intervals if n]}")
  why = (
    f"host {1e3 * timing.host_s:.2f} ms a call, device {1e3 * timing.device_s:.2f} ms a step, "
    f"data {1e3 * timing.data_s:.2f} ms a step: the host takes {100 * share(k):.1f}% of a call"
    f" (target {100 * host_share:g}%)" + "".join(f"; {limit}" for limit in limits)
  )
  return Choice(k, why)


class Plan:
  """The K of each call of a run from `first_step` to `num_steps`. A fixed K is every call's.
  Under "auto" the calls run at K=1 until the first MEASURED_CALLS after the compiling one are
  timed (each waited for); from the chosen K on, a call starts at a multiple of K (K=1 calls fill
  up to it and the end), so calls end on every report, eval and checkpoint step as before."""

  def __init__(self, config, first_step: int, process_count: int = 1):
    self.auto = config.steps_per_call == AUTO
    self.k = 1 if self.auto else config.steps_per_call
    self._num_steps = config.num_steps
    self._intervals = (
      config.log_every_steps,
      config.eval_every_steps,
      config.checkpoint_every_steps,
      config.local_checkpoint_every_steps,
    )
    self._process_count = process_count
    self._calls = 0
    self._timings: list[Timing] = []
    self._decided = not self.auto
    self._started = self._data_ready = 0.0

  def k_at(self, step: int) -> int:
    """The K of the call that starts after `step`."""
    if self._decided and step % self.k == 0 and step + self.k <= self._num_steps:
      return self.k
    return 1 if self.auto else self.k

  def call_starts(self) -> None:
    self._started = time.perf_counter()

  def data_ready(self) -> None:
    self._data_ready = time.perf_counter()

  def call_done(self, outputs) -> Choice | None:
    """After each call's host work: the choice, once (on the first call for a fixed K; under
    "auto" once the calls are timed, the same on every process), else None. While timing, waits
    for `outputs` (the call's result)."""
    self._calls += 1
    if not self.auto:
      return Choice(self.k, "config.steps_per_call") if self._calls == 1 else None
    if self._decided:
      return None
    host_done = time.perf_counter()
    jax.block_until_ready(outputs)
    if self._calls > 1:  # The first call compiles.
      self._timings.append(
        Timing(
          data_s=self._data_ready - self._started,
          host_s=host_done - self._data_ready,
          device_s=time.perf_counter() - host_done,
        )
      )
    if len(self._timings) < MEASURED_CALLS:
      return None
    median = Timing(*(statistics.median(values) for values in zip(*self._timings, strict=True)))
    choice = choose(median, self._intervals, host_share=HOST_SHARE, max_call_s=MAX_CALL_S)
    self.k = agreed(choice.k, self._process_count)
    self._decided = True
    return choice._replace(k=self.k)


def agreed(k: int, process_count: int) -> int:
  """Process 0's K on every process (their timings differ; their calls must not)."""
  if process_count == 1:
    return k
  return int(multihost_utils.broadcast_one_to_all(np.int32(k)))


def train_batches(
  host_batches: Iterator,
  plan: Plan,
  *,
  put: Callable[..., Any],
  check: Callable[..., None],
  first_step: int,
) -> Iterator[tuple[int, Any]]:
  """(K, that call's batches on the devices) for each call from `first_step` on, two calls ahead:
  K host batches stacked to [K, ...] when K > 1 (data.train_batches, one call's worth at a time)."""
  checked = data.train_batches(
    host_batches,
    steps_per_call=1,
    put=lambda batch, stacked: batch,
    check=check,
    first_number=first_step,
  )

  def calls():
    step = first_step
    while True:
      k = plan.k_at(step)
      group = next(data.group(itertools.islice(checked, k), k), None)
      if group is None:
        return
      yield k, group
      step += k

  return data.prefetch(calls(), lambda call: (call[0], put(call[1], stacked=call[0] > 1)))
