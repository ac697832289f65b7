"""Executors: how the train state and batches live on the devices, and the compiled calls over
them. `pmap` and `shard_map` run the workload's loss per device (axis name `batch`) on a replicated
state; `fsdp` runs it on global arrays with the state sharded. Same results.

  pmap       state replicated as [local_devices, ...]; batches [local_devices, per_device, ...]
  shard_map  state as whole arrays on every device of a Mesh (NamedSharding, P()); batches as
             global arrays split on their batch axis; no host-local <-> global conversion per call
  fsdp       each state array split over the `fsdp` axis of a (data, fsdp) Mesh on one array
             axis, copied over `data`; batches split over both; the step is traced on global
             arrays (the loss sees the global batch) and partitioned by XLA

Every executor has: state_shardings(state) (the job-wide layout a checkpoint restores into and
init creates in), place(global_state) (-> the run's layout), global_state(run_state),
replicate/unreplicate (small host trees: metrics), put(host_batch), map_eval, map_train.
"""

import collections
import contextvars
import functools
import os
import tempfile

import jax
import numpy as np
from absl import logging
from flax import jax_utils
from jax import lax
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from launcher import config as config_lib
from launcher import step
from launcher.errors import UsageError
from launcher.state import TrainState
from launcher.step import AXIS

DATA, FSDP = "data", "fsdp"  # The fsdp executor's mesh axes: copies of the state, and its shards.


class Pmap:
  """`jax.pmap` over the local devices; collectives span every device of every process."""

  def __init__(self):
    # One sharding object for every batch: pmap recognizes it (a cache keyed on the object) and
    # takes the batch as it is, where a new but equal object costs a re-layout per call.
    self._local_split = NamedSharding(
      Mesh(np.array(jax.local_devices()), ("_local",)), PartitionSpec("_local")
    )
    # The sharding of pmap's own outputs: a state or metrics placed in it is taken as it is by
    # every call, where another layout (flax's replicate) compiles the step again.
    self._replicated = NamedSharding(
      Mesh(np.array(jax.local_devices()), (AXIS,)), PartitionSpec(AXIS)
    )

  def map(self, fn, *, stacked: bool = False, donate_argnums=()):
    """fn(replicated, replicated, batch) on every local device; `stacked`: batch is [K, ...]."""
    del stacked
    return jax.pmap(fn, axis_name=AXIS, donate_argnums=donate_argnums)

  def map_train(self, *, steps_per_call: int, **step_kwargs):
    """K train steps per call (step.train_call) on every device; the state argument is donated."""
    return self.map(
      functools.partial(
        step.train_call,
        steps_per_call=steps_per_call,
        one_gradient_all_reduce=combines_no_all_reduces(),
        **step_kwargs,
      ),
      stacked=steps_per_call > 1,
      donate_argnums=(0,),
    )

  def map_eval(self, loss_fn):
    """step.eval_step on every device."""
    return self.map(functools.partial(step.eval_step, loss_fn=loss_fn))

  def describe(self) -> str:
    return f"pmap, replicated on each of {jax.device_count()} devices"

  def state_shardings(self, state_like):
    """Whole arrays on every device of the job."""
    sharding = job_replicated()
    return jax.tree.map(lambda _: sharding, state_like)

  def place(self, global_state):
    """Job-wide replicated arrays -> [local_devices, ...] as pmap's outputs, no copy to the host."""
    devices = self._replicated.mesh.devices

    def one(x):
      shards = {shard.device: shard.data for shard in x.addressable_shards}
      return jax.make_array_from_single_device_arrays(
        (len(devices),) + x.shape, self._replicated, [shards[d][None] for d in devices]
      )

    return jax.tree.map(one, global_state)

  def replicate(self, tree):
    """[local_devices, ...]: one copy of each leaf per local device, laid out as pmap's outputs."""
    devices = self._replicated.mesh.devices

    def one(x):
      copies = [jax.device_put(np.asarray(x)[None], device) for device in devices]
      return jax.make_array_from_single_device_arrays(
        (len(devices),) + np.shape(x), self._replicated, copies
      )

    return jax.tree.map(one, tree)

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

    return jax.device_put(
      jax.tree.map(lambda x: split(np.asarray(x)), host_batch), self._local_split
    )

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
    mapped = jax.shard_map(
      fn,
      mesh=self.mesh,
      in_specs=(PartitionSpec(), PartitionSpec(), batch_spec),
      out_specs=PartitionSpec(),
      check_vma=False,
    )
    return jax.jit(mapped, donate_argnums=donate_argnums)

  map_train = Pmap.map_train
  map_eval = Pmap.map_eval

  def describe(self) -> str:
    return f"shard_map, replicated on each of {self.mesh.size} devices"

  def state_shardings(self, state_like):
    """Whole arrays on every device of the job."""
    return jax.tree.map(lambda _: self._replicated, state_like)

  def place(self, global_state):
    """Already in the run's layout."""
    return global_state

  def replicate(self, tree):
    """Whole arrays on every device of the job."""
    return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(self._replicated, np.asarray(x)), tree
    )

  def unreplicate(self, tree):
    """This process's first device's copy (no gather across devices)."""
    return jax.tree.map(lambda x: x.addressable_shards[0].data, tree)

  def put(self, host_batch, *, stacked: bool = False):
    """This process's [host_batch, ...] (or [K, host_batch, ...]) as its part of a global batch."""
    sharding = self._stacked_split if stacked else self._split
    return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), host_batch
    )

  def global_state(self, tree):
    """Already job-wide arrays."""
    return tree


class Fsdp:
  """The state split over the `fsdp` axis of a data x fsdp Mesh and copied over `data` (ZeRO-3 /
  HSDP). The step is traced on global arrays (step.global_train_call) and XLA gathers each param
  where it is used and reduces its gradient into the param's shards, so the whole state is never
  on one device:
  not at init, in a step, or at restore. The loss sees the whole global batch."""

  def __init__(self, mesh: Mesh, partition=None):
    """`partition(params) -> PartitionSpecs` (axis name `fsdp`) overrides `default_spec`."""
    self.mesh = mesh
    self._partition = partition
    self._state_shardings = None
    self._replicated = NamedSharding(mesh, PartitionSpec())
    batch_axes = tuple(mesh.axis_names)
    self._split = NamedSharding(mesh, PartitionSpec(batch_axes))
    self._stacked_split = NamedSharding(mesh, PartitionSpec(None, batch_axes))

  def shardings(self, tree):
    """A NamedSharding per leaf (`default_spec`; the params of a TrainState by `partition`)."""
    size = self.mesh.shape[FSDP]
    shardings = jax.tree.map(
      lambda x: NamedSharding(self.mesh, default_spec(np.shape(x), size)), tree
    )
    if isinstance(tree, TrainState) and self._partition is not None:
      specs = self._partition(tree.params)
      shardings = shardings.replace(
        params=jax.tree.map(
          lambda spec: NamedSharding(self.mesh, spec),
          specs,
          is_leaf=lambda x: isinstance(x, PartitionSpec),
        )
      )
    return shardings

  def describe(self) -> str:
    """The mesh, and how many processes an fsdp group spans (1: its gathers stay in a host)."""
    spans = max(len({device.process_index for device in group}) for group in self.mesh.devices)
    return (
      f"fsdp on a data:{self.mesh.shape[DATA]} x fsdp:{self.mesh.shape[FSDP]} mesh, each "
      f"fsdp group within {spans} process(es)"
    )

  def state_shardings(self, state_like: TrainState):
    """The job-wide shardings of the train state (fixed for the run: map_train compiles to them)."""
    self._state_shardings = self.shardings(state_like)
    return self._state_shardings

  place = ShardMap.place
  global_state = ShardMap.global_state

  def replicate(self, tree):
    """Host values split over the devices as `shardings` says (the state is not copied whole)."""
    shardings = self.state_shardings(tree) if isinstance(tree, TrainState) else self.shardings(tree)
    return jax.tree.map(
      lambda x, sharding: jax.make_array_from_callback(
        np.shape(x),
        sharding,
        lambda index, x=np.asarray(x): x[index],  # noqa: B008
      ),
      tree,
      shardings,
    )

  def unreplicate(self, tree):
    """Whole arrays: a replicated one from this process's first device, a sharded one gathered
    (small trees only: metrics, or a test's look at a state)."""

    def whole(x):
      if x.sharding.is_fully_replicated:
        return x.addressable_shards[0].data
      return multihost_utils.process_allgather(x, tiled=True)

    return jax.tree.map(whole, tree)

  put = ShardMap.put

  def map_eval(self, loss_fn):
    """step.eval_step on global arrays: the params stay sharded, the batch split over every device."""
    return jax.jit(
      functools.partial(step.eval_step, loss_fn=loss_fn, axis_name=None),
      out_shardings=self._replicated,
    )

  def map_train(self, *, steps_per_call: int, **step_kwargs):
    """K train steps per call over the sharded state (step.global_train_call); the loss is traced
    with `constrain_to_batch` on."""
    if self._state_shardings is None:
      raise RuntimeError("Fsdp needs the state's shardings: call state_shardings(state) first")
    call = functools.partial(
      step.global_train_call,
      steps_per_call=steps_per_call,
      param_shardings=self._state_shardings.params,
      microbatch_sharding=self._stacked_split,
      **step_kwargs,
    )

    def traced(*args):
      token = _BATCH_SHARDING.set(self._split)
      try:
        return call(*args)
      finally:
        _BATCH_SHARDING.reset(token)

    return jax.jit(
      traced, donate_argnums=(0,), out_shardings=(self._state_shardings, self._replicated)
    )


_BATCH_SHARDING = contextvars.ContextVar("batch_sharding", default=None)


def constrain_to_batch(x: jax.Array) -> jax.Array:
  """`x` ([batch, ...], an activation in a workload's loss) split over the devices on its batch
  axis. Under fsdp this keeps XLA from splitting activations over features, as it may when the
  params are split that way (it then holds them whole on every device); under the other
  executors, and in eval, it changes nothing."""
  sharding = _BATCH_SHARDING.get()
  return x if sharding is None else lax.with_sharding_constraint(x, sharding)


def combines_no_all_reduces() -> bool:
  """XLA's GPU and TPU compilers combine the all-reduces of a step into few; its CPU compiler
  does not, and each costs ~0.1 ms on 8 simulated devices (a 4-array MLP step: 1.06 ms with one
  all-reduce per gradient array, 0.60 ms with one for all of them, benchmarks/dispatch.py)."""
  return jax.devices()[0].platform == "cpu"


def default_spec(shape: tuple[int, ...], device_count: int) -> PartitionSpec:
  """Split over the `fsdp` axis on the largest array axis that divides by its size (the first of
  equal ones); replicated when none does."""
  divisible = [
    axis
    for axis in range(len(shape))
    if shape[axis] % device_count == 0 and shape[axis] >= device_count
  ]
  if not divisible:
    return PartitionSpec()
  axis = max(divisible, key=lambda a: (shape[a], -a))
  return PartitionSpec(*([None] * axis), FSDP)


def executor(name: str, *, mesh: str = "", partition=None) -> Pmap | ShardMap | Fsdp:
  """The executor named by `config.parallel`; under fsdp on `config.mesh` (config.mesh_shape:
  "" is fsdp within each process) with `partition(params)`, the workload's rule."""
  if name == "fsdp":
    shape = config_lib.mesh_shape(mesh, name, jax.process_count(), jax.local_device_count())
    return Fsdp(data_fsdp_mesh(shape), partition)
  return {"pmap": Pmap, "shard_map": ShardMap}[name]()


def data_fsdp_mesh(mesh_shape: dict[str, int]) -> Mesh:
  """A (data, fsdp) Mesh of every device. An fsdp group that fits in a process stays inside it
  (its gathers never cross the slower network between hosts), with `data` across processes; a
  larger one spans whole processes. Either way process p holds the p-th part of every batch."""
  data, fsdp = mesh_shape["data"], mesh_shape["fsdp"]
  local = jax.local_device_count()
  if local % fsdp == 0 and jax.process_count() > 1:
    devices = mesh_utils.create_hybrid_device_mesh(
      (local // fsdp, fsdp), (jax.process_count(), 1), jax.devices(), process_is_granule=True
    )
  else:
    devices = np.array(sorted(jax.devices(), key=lambda d: (d.process_index, d.id)))
    devices = devices.reshape(data, fsdp)
  return Mesh(devices, (DATA, FSDP))


def step_memory(mapped_fn, *args) -> dict[str, int]:
  """Device memory of one call of `mapped_fn(*args)`: the platform's peak where it reports one
  (GPU, TPU), else the compiled program's own estimate per device (arguments + outputs +
  temporaries - donated buffers), for jitted calls only: lowering a pmap compiles it again
  (8 s for lm tiny here), so under pmap on CPU nothing is reported."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return {"peak_bytes_per_device": int(stats["peak_bytes_in_use"])}
  if not isinstance(mapped_fn, jax.stages.Wrapped) or not hasattr(mapped_fn, "trace"):
    return {}
  analysis = mapped_fn.lower(*args).compile().memory_analysis()
  if analysis is None:
    return {}
  return {
    "step_memory_bytes_per_device": int(
      analysis.argument_size_in_bytes
      + analysis.output_size_in_bytes
      + analysis.temp_size_in_bytes
      - analysis.alias_size_in_bytes
    )
  }


def state_bytes_per_device(tree) -> int:
  """Bytes of `tree` on this process's fullest device."""
  per_device = collections.Counter()
  for x in jax.tree.leaves(tree):
    for shard in x.addressable_shards:
      per_device[shard.device] += shard.data.nbytes
  return max(per_device.values(), default=0)


def job_replicated() -> NamedSharding:
  """Whole arrays on every device of every process."""
  return NamedSharding(Mesh(np.array(jax.devices()), (AXIS,)), PartitionSpec())


def enable_compilation_cache(directory: str) -> None:
  """Persists every compiled program (small ones too) in `directory`, so a second start of the
  same run skips compilation. "" picks ~/.cache/launcher/jax (or $XDG_CACHE_HOME); "none" is off."""
  if directory == "none":
    return
  given = directory
  if not directory:
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    directory = os.path.join(cache_home, "launcher", "jax")
  if "://" not in directory:
    try:
      os.makedirs(directory, exist_ok=True)
      with tempfile.NamedTemporaryFile(dir=directory):
        pass
    except OSError as e:
      if given:
        raise UsageError(
          f"config.compilation_cache_dir={given!r} cannot be used ({e}): give a "
          "directory this user can write, or none to compile every start"
        ) from None
      logging.warning(
        "the compilation cache %s cannot be used (%s): compiling every start; "
        "set --config.compilation_cache_dir to a writable directory",
        directory,
        e,
      )
      return
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
