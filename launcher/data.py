"""From a workload's host-local numpy batches to per-device shards on the devices.

Shapes: a host batch is [host_batch, ...]; `shard` makes it [local_devices, per_device_batch, ...];
with K steps per call, K host batches become [local_devices, K, per_device_batch, ...].
"""

import itertools
from typing import Iterator

import grain
import jax
import numpy as np
from flax import jax_utils
from jax.experimental import multihost_utils

Batch = dict[str, np.ndarray]


def batch_indices(num_records: int, *, batch_size: int, process_index: int, process_count: int,
                  seed: int | None = None, repeat: bool = True, start: int = 0) -> grain.MapDataset:
  """Record indices of this process's share of each global batch: element t is its slice of
  batch start + t.

  Global batch t holds records t*batch_size ... (t+1)*batch_size - 1 of the (shuffled, repeated)
  record stream, and process i of n takes the i-th of n equal slices of it. The order depends on
  `seed` alone, so any process layout sees the same global batches, and batch t can be read
  without reading the ones before it.
  """
  indices = grain.MapDataset.range(num_records)
  if seed is not None:
    indices = indices.shuffle(seed=seed)
  if repeat:
    indices = indices.repeat(None)
  indices = indices.batch(batch_size // process_count, drop_remainder=False)
  return indices[process_index::process_count][start:]


def shard(host_batch: Batch, local_device_count: int) -> Batch:
  """[host_batch, ...] -> [local_devices, per_device_batch, ...]."""
  return jax.tree.map(
      lambda x: x.reshape((local_device_count, x.shape[0] // local_device_count) + x.shape[1:]),
      host_batch)


def train_batches(host_batches: Iterator[Batch], *, host_batch_size: int, local_device_count: int,
                  steps_per_call: int, prefetch: int = 2) -> Iterator[Batch]:
  """Per-call device batches: [devices, per_device, ...], or [devices, K, per_device, ...] for K > 1."""

  def per_call():
    while True:
      group = list(itertools.islice(host_batches, steps_per_call))
      if len(group) < steps_per_call:
        return
      for batch in group:
        _check_size(batch, host_batch_size)
      if steps_per_call == 1:
        yield shard(group[0], local_device_count)
      else:
        stacked = jax.tree.map(lambda *xs: np.stack(xs, axis=1), *(
            shard(b, local_device_count) for b in group))
        yield stacked

  return jax_utils.prefetch_to_device(per_call(), prefetch)


def eval_batches(host_batches: Iterator[Batch], *, example: Batch, host_batch_size: int,
                 local_device_count: int, process_count: int, prefetch: int = 2) -> Iterator[Batch]:
  """Eval batches padded to the host batch size with a `mask` (1 = real example), on the devices.

  Every process yields the same number of batches: a process whose share ran out feeds
  all-padding batches (shaped like `example`) until every process's share has run out.
  """
  empty = jax.tree.map(lambda x: np.zeros((0,) + x.shape[1:], x.dtype), example)

  def padded():
    while True:
      batch = next(host_batches, None)
      if process_count > 1:
        if not multihost_utils.process_allgather(np.int32(batch is not None)).any():
          return
      elif batch is None:
        return
      yield shard(pad(empty if batch is None else batch, host_batch_size), local_device_count)

  return jax_utils.prefetch_to_device(padded(), prefetch)


def pad(batch: Batch, size: int) -> Batch:
  """Pads every leaf to `size` rows with zeros and adds `mask` marking the real rows."""
  rows = len(next(iter(batch.values())))
  if rows > size:
    raise ValueError(f"eval batch has {rows} rows, more than the host batch size {size}")
  padded = {k: np.concatenate([v, np.zeros((size - rows,) + v.shape[1:], v.dtype)])
            for k, v in batch.items()}
  padded["mask"] = (np.arange(size) < rows).astype(np.float32)
  return padded


def _check_size(batch: Batch, host_batch_size: int) -> None:
  for name, x in batch.items():
    if x.shape[0] != host_batch_size:
      raise ValueError(f"the workload's train batch has {x.shape[0]} rows in {name!r}, but this "
                       f"process's share of config.batch_size is {host_batch_size}")
