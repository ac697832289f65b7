"""From a workload's host-local numpy batches to batches on the devices, two calls ahead.

Shapes: a host batch is [host_batch, ...]; with K steps per call, K of them are stacked to
[K, host_batch, ...]. The executor (launcher/parallel.py) places them: under pmap as
[local_devices, (K,) per_device_batch, ...], under shard_map as this process's part of a global
batch split on its batch axis.
"""

import collections
import functools
import itertools
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from absl import flags
from jax.experimental import multihost_utils

if TYPE_CHECKING:  # grain (0.1-0.2 s) is imported by the first call that uses it.
  import grain

Batch = dict[str, np.ndarray]


def batch_indices(
  num_records: int,
  *,
  batch_size: int,
  process_index: int,
  process_count: int,
  seed: int | None = None,
  repeat: bool = True,
  start: int = 0,
) -> "grain.MapDataset | InOrder":
  """Record indices of this process's share of each global batch: element t is its slice of
  batch start + t; `len`, `[t]` and `.map(fn)` like grain's MapDataset.

  Global batch t holds records t*batch_size ... (t+1)*batch_size - 1 of the (shuffled, repeated)
  record stream, and process i of n takes the i-th of n equal slices of it. The order depends on
  `seed` alone, so any process layout sees the same global batches, and batch t can be read
  without reading the ones before it. Shuffled through grain's MapDataset; without a seed (eval
  splits, data in a fixed order) the same elements come from `InOrder`, without importing grain.
  """
  share = batch_size // process_count
  if seed is None:
    return InOrder(
      num_records, share, repeat, first=process_index + start * process_count, stride=process_count
    )
  import grain  # pylint: disable=import-outside-toplevel

  indices = grain.MapDataset.range(num_records).shuffle(seed=seed)
  if repeat:
    indices = indices.repeat(None)
  indices = indices.batch(share, drop_remainder=False)
  return indices[process_index::process_count][start:]


class InOrder:
  """grain's `MapDataset.range(num_records).repeat().batch(share)[first::stride]` (no repeat when
  `repeat` is False: the last batch may be short), mapped by `fns` in turn; grain's import takes
  0.1-0.2 s, a quarter of a warm start's first step."""

  def __init__(self, num_records, share, repeat, *, first, stride, fns=()):
    self.num_records, self.share, self.repeat = num_records, share, repeat
    self.first, self.stride, self.fns = first, stride, tuple(fns)
    batches = -(-(sys.maxsize if repeat else num_records) // share)
    self._len = len(range(first, batches, stride))

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, t: int):
    if not 0 <= t < self._len:
      raise IndexError(f"batch {t} of {self._len}")
    begin = (self.first + t * self.stride) * self.share
    end = begin + self.share if self.repeat else min(begin + self.share, self.num_records)
    element = np.arange(begin, end) % self.num_records
    for fn in self.fns:
      element = fn(element)
    return element

  def map(self, fn: Callable) -> "InOrder":
    return InOrder(
      self.num_records,
      self.share,
      self.repeat,
      first=self.first,
      stride=self.stride,
      fns=(*self.fns, fn),
    )


def from_source(
  source: Any,
  config: Any,
  split: str,
  process_index: int,
  process_count: int,
  start: int = 0,
  transform: Callable[[Any], Batch] | None = None,
) -> Iterator[Batch]:
  """The contract's host batches from any random-access source (`len(source)`, `source[i]`:
  grain's ArrayRecordDataSource, launcher.corpus's sources, a numpy memmap, a Hugging Face
  Dataset): process i's slice of each global batch from `start` on, of
  `transform(source[record])` stacked (each a dict of arrays; the record itself without one).

  train: shuffled by config.seed and repeated for ever; other splits: once, in order. The record
  reads and transforms run in `config.data_workers` worker processes (0: in this one), each
  computing whole host batches in turn, prefetched one per worker; the batches are the same for
  any number of workers.
  """
  train = split == "train"
  indices = batch_indices(
    len(source),
    batch_size=config.batch_size,
    process_index=process_index,
    process_count=process_count,
    seed=config.seed if train else None,
    repeat=train,
    start=start,
  )
  host_batches = indices.map(_ReadBatch(source, transform))
  workers = config.get("data_workers", 0)
  if not workers or not train:
    return read(host_batches)
  return _in_workers(host_batches, workers)


class _ReadBatch:
  """Record indices -> one stacked host batch (picklable, for grain's worker processes)."""

  def __init__(self, source: Any, transform: Callable[[Any], Batch] | None):
    self.source, self.transform = source, transform

  def __call__(self, indices: np.ndarray) -> Batch:
    _end_with_parent()
    examples = [self.source[int(i)] for i in indices]
    if self.transform is not None:
      examples = [self.transform(example) for example in examples]
    return jax.tree.map(lambda *xs: np.stack(xs), *examples)


@functools.cache
def _end_with_parent() -> None:
  """In a worker process (multiprocessing's), a thread that ends it once its parent is gone: a
  launcher killed with -9 leaves no workers behind."""
  parent = multiprocessing.parent_process()
  if parent is None:
    return

  def watch():
    while parent.is_alive():
      time.sleep(1.0)
    os._exit(0)  # pylint: disable=protected-access

  threading.Thread(target=watch, name="end-with-parent", daemon=True).start()


def _in_workers(host_batches: "grain.MapDataset | InOrder", workers: int) -> Iterator[Batch]:
  """Host batches computed in `workers` grain worker processes, in order."""
  import grain  # pylint: disable=import-outside-toplevel

  if not isinstance(host_batches, grain.MapDataset):  # InOrder: a train split without a seed.
    host_batches = grain.MapDataset.source(host_batches)
  if not flags.FLAGS.is_parsed():  # grain reads its absl flags; outside an absl app, defaults.
    flags.FLAGS.mark_as_parsed()
  dataset = grain.experimental.WithOptionsIterDataset(
    host_batches.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)),
    grain.experimental.DatasetOptions(min_shm_size=1 << 62),
  )  # Batches come back pickled.
  iterator = iter(dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers)))
  try:
    yield from iterator
  finally:
    iterator.close()


def read(dataset: "grain.MapDataset | InOrder") -> Iterator:
  """The elements of a MapDataset (or InOrder) in order, by random access: grain's own iterator
  adds a prefetch stage with per-element bookkeeping that a loop of millisecond steps feels
  (benchmarks/data.py measures the pipeline)."""
  for index in range(len(dataset)):
    yield dataset[index]


def group(host_batches: Iterator[Batch], steps_per_call: int) -> Iterator[Batch]:
  """One host batch per call, or K of them stacked to [K, host_batch, ...]."""
  while True:
    batches = list(itertools.islice(host_batches, steps_per_call))
    if len(batches) < steps_per_call:
      return
    if steps_per_call == 1:
      yield batches[0]
    else:
      yield jax.tree.map(lambda *xs: np.stack(xs), *batches)


def prefetch(batches: Iterator, put: Callable[[Batch], Any], size: int = 2) -> Iterator:
  """`put` (an async copy to the devices) `size` batches ahead of the consumer."""
  queue = collections.deque()
  for batch in batches:
    queue.append(put(batch))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def train_batches(
  host_batches: Iterator[Batch],
  *,
  steps_per_call: int,
  put: Callable[..., Any],
  check: Callable[..., None],
  first_number: int = 0,
) -> Iterator:
  """Per-call batches on the devices, two calls ahead; `put` is the executor's placement and
  `check(batch, number=t)` raises on a batch that breaks the workload contract (the first host
  batch is global batch `first_number`)."""
  return prefetch(
    group(_checked(host_batches, check, first_number), steps_per_call),
    lambda batch: put(batch, stacked=steps_per_call > 1),
  )


def _checked(
  batches: Iterator[Batch], check: Callable[..., None], first_number: int = 0
) -> Iterator[Batch]:
  for number, batch in enumerate(batches, start=first_number):
    check(batch, number=number)
    yield batch


def eval_batches(
  host_batches: Iterator[Batch],
  *,
  example: Batch,
  host_batch_size: int,
  process_count: int,
  put: Callable[..., Any],
  check: Callable[[Batch], None],
) -> Iterator:
  """Eval batches padded to the host batch size with a `mask` (1 = real example), on the devices;
  `check` raises on a batch that breaks the workload contract.

  Every process yields the same number of batches: a process whose share ran out feeds
  all-padding batches (shaped like `example`) until every process's share has run out.
  """
  empty = jax.tree.map(lambda x: np.zeros((0,) + x.shape[1:], x.dtype), example)

  def padded():
    checked = _checked(host_batches, check)
    while True:
      batch = next(checked, None)
      if not any_process(batch is not None, process_count):
        return
      yield pad(empty if batch is None else batch, host_batch_size)

  return prefetch(padded(), put)


def any_process(value: bool, process_count: int) -> bool:
  """Whether `value` holds on any process of the job (a collective: every process calls it)."""
  if process_count == 1:
    return value
  return bool(multihost_utils.process_allgather(np.int32(value)).any())


def pad(batch: Batch, size: int) -> Batch:
  """Pads every leaf to `size` rows with zeros and adds `mask` marking the real rows."""
  rows = len(next(iter(batch.values())))
  if rows > size:
    raise ValueError(f"eval batch has {rows} rows, more than the host batch size {size}")
  padded = {
    k: np.concatenate([v, np.zeros((size - rows,) + v.shape[1:], v.dtype)])
    for k, v in batch.items()
  }
  padded["mask"] = (np.arange(size) < rows).astype(np.float32)
  return padded
