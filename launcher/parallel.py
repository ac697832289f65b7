"""Runs a per-device function on every device of the job: `pmap`, or `jit` of `shard_map`.

Both executors take the same per-device step (axis name `batch`) and give the same results; they
differ in how state and batches live on the devices:

  pmap       state replicated as [local_devices, ...]; batches [local_devices, per_device, ...]
  shard_map  state as whole arrays on every device of a Mesh (NamedSharding, P()); batches as
             global arrays split on their batch axis; no host-local <-> global conversion per call
"""

import collections
import os

import jax
import numpy as np
from flax import jax_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from launcher.step import AXIS


class Pmap:
  """`jax.pmap` over the local devices; collectives span every device of every process."""

  def __init__(self):
    # One sharding object for every batch: pmap recognizes it (a cache keyed on the object) and
    # takes the batch as it is, where a new but equal object costs a re-layout per call.
    self._local_split = NamedSharding(Mesh(np.array(jax.local_devices()), ("_local",)),
                                      PartitionSpec("_local"))

  def map(self, fn, *, stacked: bool = False, donate_argnums=()):
    """fn(replicated, replicated, batch) on every local device; `stacked`: batch is [K, ...]."""
    del stacked
    return jax.pmap(fn, axis_name=AXIS, donate_argnums=donate_argnums)

  def replicate(self, tree):
    return jax_utils.replicate(tree)

  def unreplicate(self, tree):
    """One device's copy of a replicated tree (no gather across devices)."""
    return jax_utils.unreplicate(tree)

  def put(self, host_batch, *, stacked: bool = False):
    """[host_batch, ...] (or [K, host_batch, ...] when `stacked`) -> [devices, per_device, ...]
    (or [devices, K, per_device, ...]) on the devices."""
    d = jax.local_device_count()

    def split(x):
      if stacked:  # [K, host_b, ...] -> [d, K, b, ...]
        x = x.reshape((x.shape[0], d, x.shape[1] // d) + x.shape[2:])
        return np.swapaxes(x, 0, 1)
      return x.reshape((d, x.shape[0] // d) + x.shape[1:])

    return jax.device_put(jax.tree.map(lambda x: split(np.asarray(x)), host_batch),
                          self._local_split)

  def global_state(self, replicated_tree):
    """pmap-replicated leaves [local_devices, ...] -> one job-wide replicated array each, as a
    checkpoint wants them; no copy to the host."""
    sharding = job_replicated()

    def one(x):
      shards = {shard.device: shard.data for shard in x.addressable_shards}
      arrays = [shards[d].reshape(x.shape[1:]) for d in sharding.addressable_devices]
      return jax.make_array_from_single_device_arrays(x.shape[1:], sharding, arrays)

    return jax.tree.map(one, replicated_tree)


class ShardMap:
  """`jax.jit(jax.shard_map(...))` over a Mesh of every device of the job, batch on axis `batch`."""

  def __init__(self):
    self._replicated = job_replicated()
    self.mesh = self._replicated.mesh
    self._split = NamedSharding(self.mesh, PartitionSpec(AXIS))
    self._stacked_split = NamedSharding(self.mesh, PartitionSpec(None, AXIS))

  def map(self, fn, *, stacked: bool = False, donate_argnums=()):
    """fn(replicated, replicated, batch) on every device; `stacked`: batch is [K, ...]."""
    # check_vma=False: CLU's gather_from_model_output needs it, and with it jax.grad of the
    # replicated params is per device, exactly as under pmap (lax.pmean then averages it).
    batch_spec = (self._stacked_split if stacked else self._split).spec
    mapped = jax.shard_map(fn, mesh=self.mesh, in_specs=(PartitionSpec(), PartitionSpec(),
                                                         batch_spec),
                           out_specs=PartitionSpec(), check_vma=False)
    return jax.jit(mapped, donate_argnums=donate_argnums)

  def replicate(self, tree):
    """Whole arrays on every device of the job."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
        self._replicated, np.asarray(x)), tree)

  def unreplicate(self, tree):
    """This process's first device's copy (no gather across devices)."""
    return jax.tree.map(lambda x: x.addressable_shards[0].data, tree)

  def put(self, host_batch, *, stacked: bool = False):
    """This process's [host_batch, ...] (or [K, host_batch, ...]) as its part of a global batch."""
    sharding = self._stacked_split if stacked else self._split
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                        host_batch)

  def global_state(self, tree):
    """Already job-wide arrays."""
    return tree


def executor(name: str) -> Pmap | ShardMap:
  """The executor named by `config.parallel`."""
  return {"pmap": Pmap, "shard_map": ShardMap}[name]()


def job_replicated() -> NamedSharding:
  """Whole arrays on every device of every process."""
  return NamedSharding(Mesh(np.array(jax.devices()), (AXIS,)), PartitionSpec())


def enable_compilation_cache(directory: str) -> None:
  """Persists every compiled program (small ones too) in `directory`, so a second start of the
  same run skips compilation. "" picks ~/.cache/launcher/jax (or $XDG_CACHE_HOME); "none" is off."""
  if directory == "none":
    return
  if not directory:
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    directory = os.path.join(cache_home, "launcher", "jax")
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


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
