"""The global batch of step t is the same whatever the process layout; shards land as specified."""

import itertools

import jax
import numpy as np
import pytest

from launcher import config as config_lib
from launcher import data, parallel
from launcher.errors import UsageError
from tests.helpers import load_config
from workloads import classifier, lm


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shares_are_disjoint_and_make_up_the_global_batch(process_count):
  single = data.batch_indices(1000, batch_size=64, process_index=0, process_count=1, seed=3)
  shares = [
    data.batch_indices(1000, batch_size=64, process_index=i, process_count=process_count, seed=3)
    for i in range(process_count)
  ]
  for t in (0, 1, 14, 15, 16, 40):  # Batch 15 straddles the first and second epoch.
    parts = [np.asarray(share[t]) for share in shares]
    assert all(len(p) == 64 // process_count for p in parts)
    np.testing.assert_array_equal(np.concatenate(parts), np.asarray(single[t]))
  first_epoch = np.concatenate([np.asarray(single[t]) for t in range(15)])
  assert len(set(first_epoch)) == len(first_epoch) == 960


@pytest.mark.parametrize(
  "name, module, arg", [("classifier", classifier, None), ("lm", lm, "tiny")]
)
def test_workload_shards_by_example_id(name, module, arg):
  """Two processes read disjoint example ids whose union is the one-process global batch."""
  config = load_config(name, arg, batch_size=32)
  whole = itertools.islice(module.dataset(config, "train", 0, 1), 3)
  halves = zip(module.dataset(config, "train", 0, 2), module.dataset(config, "train", 1, 2))
  for batch, (first, second) in zip(whole, halves):
    assert not set(first["id"]) & set(second["id"])
    np.testing.assert_array_equal(np.concatenate([first["id"], second["id"]]), batch["id"])


@pytest.mark.parametrize("name", ["pmap", "shard_map"])
def test_each_device_gets_its_slice_of_k_stacked_batches(name):
  host_batches = iter(
    [{"x": np.arange(16 * 3, dtype=np.float32).reshape(16, 3) + 100 * t} for t in range(4)]
  )
  executor = parallel.executor(name, state_like=None)
  device_batches = data.train_batches(
    host_batches, steps_per_call=2, put=executor.batch_to_devices, check=lambda batch, number: None
  )
  gathered = executor.map(
    lambda state, metrics, batch: jax.lax.all_gather(batch["x"], "batch"), stacked=True
  )
  every_device = np.asarray(gathered(np.zeros(8), np.zeros(8), next(device_batches)))
  if name == "pmap":  # One copy of the gathered array per device.
    every_device = every_device[0]
  device_3 = every_device[3]  # [K, per_device, ...]
  np.testing.assert_array_equal(device_3[0], np.arange(18, 24).reshape(2, 3))
  np.testing.assert_array_equal(device_3[1], np.arange(18, 24).reshape(2, 3) + 100)
  assert len(list(device_batches)) == 1


def test_pad_marks_real_rows():
  padded = data.pad({"x": np.ones((3, 2), np.float32)}, 8)
  assert padded["x"].shape == (8, 2) and padded["x"][3:].sum() == 0
  np.testing.assert_array_equal(padded["mask"], [1, 1, 1, 0, 0, 0, 0, 0])


def test_layout_splits_the_global_batch():
  layout = config_lib.layout(256, process_index=1, process_count=2, local_device_count=4)
  assert (layout.host_batch_size, layout.per_device_batch_size, layout.global_device_count) == (
    128,
    32,
    8,
  )


def test_layout_names_the_nearest_valid_sizes():
  with pytest.raises(
    UsageError,
    match=r"config.batch_size=100 does not divide over 16 devices "
    r"\(2 process\(es\) x 8 local devices\): use a multiple of 16, e.g. 96 or 112",
  ):
    config_lib.layout(100, process_index=0, process_count=2, local_device_count=8)
  with pytest.raises(UsageError, match="e.g. 8$"):
    config_lib.layout(3, process_index=0, process_count=1, local_device_count=8)
