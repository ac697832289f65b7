"""Executors: how the train state and batches live on the devices, and the compiled calls over
them. `pmap` and `shard_map` run the workload's loss per device (axis name `batch`) on a replicated
state; `fsdp` runs it on global arrays with the state sharded. Same results.

  pmap       state replicated as [local_devices, ...]; batches [local_devices, per_device, ...]
  shard_map  state as whole arrays on every device of a Mesh (NamedSharding, P()); batches as
             global arrays split on their batch axis; no host-local <-> global conversion per call
  fsdp       each state array split over the `fsdp` axis of a (data, fsdp) Mesh on one array
             axis, copied over `data`; batches split over both; the step is traced on global
             arrays (the loss sees the global batch) and partitioned by XLA

Every executor is an `Executor`; the sharding rules (`default_spec`, the mesh) sit beside them.
"""

import abc
import contextvars
import functools
from typing import Any

import jax
import numpy as np
from flax import jax_utils
from jax import lax
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from launcher import config as config_lib
from launcher import step
from launcher.state import TrainState
from launcher.step import AXIS

DATA, FSDP = "data", "fsdp"  # The fsdp executor's mesh axes: copies of the state, and its shards.


class Executor(abc.ABC):
  """What the training loop asks of an executor. Each is built for one run's train state (its
  shapes: `jax.eval_shape` of the initializer), so `state_shardings` is fixed from the start.

  Three layouts meet here: host values (numpy), job-wide arrays (what init creates, a checkpoint
  saves and restores: `state_shardings`), and the run's layout that the compiled calls take (the
  same as job-wide arrays except under pmap, where each leaf is [local_devices, ...])."""

  state_shardings: Any
  """The job-wide sharding of each leaf of the train state: init creates in it, restore reads into
  it, and `map_train` compiles for it."""

  @abc.abstractmethod
  def describe(self) -> str:
    """How the state lies on the devices, for the start-up log."""

  @abc.abstractmethod
  def from_global(self, global_state):
    """Job-wide arrays (a fresh or restored state) -> the run's layout, without a host copy."""

  @abc.abstractmethod
  def to_global(self, run_state):
    """The run's layout -> job-wide arrays (what a checkpoint saves), without a host copy."""

  @abc.abstractmethod
  def to_devices(self, host_tree):
    """Host values (metrics, or a state built on the host) -> the run's layout."""

  @abc.abstractmethod
  def to_host(self, tree):
    """A small tree in the run's layout (metrics) -> whole values, as one process sees them."""

  @abc.abstractmethod
  def batch_to_devices(self, host_batch, *, stacked: bool = False):
    """This process's [host_batch, ...] (or [K, host_batch, ...] when `stacked`) -> its part of
    the global batch, in the layout the compiled calls take."""

  @abc.abstractmethod
  def map_train(self, *, steps_per_call: int, **step_kwargs):
    """The compiled train call: (run_state, metrics, batches) -> (run_state, metrics), K steps,
    the state argument donated."""

  @abc.abstractmethod
  def map_eval(self, loss_fn):
    """The compiled eval call: (params, metrics, batch) -> metrics."""


class _PerDevice(Executor):
  """pmap and shard_map: the step runs per device (step.train_call, collectives on axis `batch`)
  on a state replicated whole on every device."""

  def __init__(self, state_like):
    sharding = job_replicated()
    self.state_shardings = jax.tree.map(lambda _: sharding, state_like)

  @abc.abstractmethod
  def map(self, fn, *, stacked: bool = False, donate_argnums=()):
    """fn(replicated, replicated, batch) on every device; `stacked`: batch is [K, ...]."""

  def map_train(self, *, steps_per_call: int, **step_kwargs):
    return self.map(
      functools.partial(
        step.train_call,
        steps_per_call=steps_per_call,
        gradient_bucket_bytes=gradient_bucket_bytes(),
        **step_kwargs,
      ),
      stacked=steps_per_call > 1,
      donate_argnums=(0,),
    )

  def map_eval(self, loss_fn):
    return self.map(functools.partial(step.eval_step, loss_fn=loss_fn))


class Pmap(_PerDevice):
  """`jax.pmap` over the local devices; collectives span every device of every process."""

  def __init__(self, state_like):
    super().__init__(state_like)
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
    del stacked
    return jax.pmap(fn, axis_name=AXIS, donate_argnums=donate_argnums)

  def describe(self) -> str:
    return f"pmap, replicated on each of {jax.device_count()} devices"

  def from_global(self, global_state):
    """Job-wide replicated arrays -> [local_devices, ...] as pmap's outputs."""
    devices = self._replicated.mesh.devices

    def one(x):
      shards = {shard.device: shard.data for shard in x.addressable_shards}
      return jax.make_array_from_single_device_arrays(
        (len(devices),) + x.shape, self._replicated, [shards[d][None] for d in devices]
      )

    return jax.tree.map(one, global_state)

  def to_global(self, run_state):
    """[local_devices, ...] leaves -> one job-wide replicated array each."""
    sharding = job_replicated()

    def one(x):
      shards = {shard.device: shard.data for shard in x.addressable_shards}
      arrays = [shards[d].reshape(x.shape[1:]) for d in sharding.addressable_devices]
      return jax.make_array_from_single_device_arrays(x.shape[1:], sharding, arrays)

    return jax.tree.map(one, run_state)

  def to_devices(self, host_tree):
    """[local_devices, ...]: one copy of each leaf per local device, laid out as pmap's outputs."""
    devices = self._replicated.mesh.devices

    def one(x):
      copies = [jax.device_put(np.asarray(x)[None], device) for device in devices]
      return jax.make_array_from_single_device_arrays(
        (len(devices),) + np.shape(x), self._replicated, copies
      )

    return jax.tree.map(one, host_tree)

  def to_host(self, tree):
    """One device's copy of a replicated tree (no gather across devices)."""
    return jax_utils.unreplicate(tree)

  def batch_to_devices(self, host_batch, *, stacked: bool = False):
    """-> [devices, per_device, ...] (or [devices, K, per_device, ...])."""
    d = jax.local_device_count()

    def split(x):
      if stacked:  # [K, host_b, ...] -> [d, K, b, ...]
        x = x.reshape((x.shape[0], d, x.shape[1] // d) + x.shape[2:])
        return np.swapaxes(x, 0, 1)
      return x.reshape((d, x.shape[0] // d) + x.shape[1:])

    return jax.device_put(
      jax.tree.map(lambda x: split(np.asarray(x)), host_batch), self._local_split
    )


class _GlobalArrays(Executor):
  """shard_map and fsdp: the run's layout is job-wide arrays, and a batch is a global array split
  over the mesh on its batch axis."""

  def __init__(self, mesh: Mesh, batch_axes):
    self.mesh = mesh
    self._replicated = NamedSharding(mesh, PartitionSpec())
    self._split = NamedSharding(mesh, PartitionSpec(batch_axes))
    self._stacked_split = NamedSharding(mesh, PartitionSpec(None, batch_axes))

  def from_global(self, global_state):
    return global_state

  def to_global(self, run_state):
    return run_state

  def batch_to_devices(self, host_batch, *, stacked: bool = False):
    sharding = self._stacked_split if stacked else self._split
    if jax.process_count() == 1:  # This process's data is the global batch: one transfer.
      return jax.device_put(jax.tree.map(np.asarray, host_batch), sharding)
    return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), host_batch
    )


class ShardMap(_GlobalArrays, _PerDevice):
  """`jax.jit(jax.shard_map(...))` over a Mesh of every device of the job, batch on axis `batch`."""

  def __init__(self, state_like):
    _PerDevice.__init__(self, state_like)
    _GlobalArrays.__init__(self, job_replicated().mesh, AXIS)

  def map(self, fn, *, stacked: bool = False, donate_argnums=()):
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

  def describe(self) -> str:
    return f"shard_map, replicated on each of {self.mesh.size} devices"

  def to_devices(self, host_tree):
    """Whole arrays on every device of the job."""
    return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(self._replicated, np.asarray(x)), host_tree
    )

  def to_host(self, tree):
    """This process's first device's copy (no gather across devices)."""
    return jax.tree.map(lambda x: x.addressable_shards[0].data, tree)


class Fsdp(_GlobalArrays):
  """The state split over the `fsdp` axis of a data x fsdp Mesh and copied over `data` (ZeRO-3 /
  HSDP). The step is traced on global arrays (step.global_train_call) and XLA gathers each param
  where it is used and reduces its gradient into the param's shards, so the whole state is never
  on one device: not at init, in a step, or at restore. The loss sees the whole global batch."""

  def __init__(self, state_like, mesh: Mesh, partition=None):
    """`partition(params) -> PartitionSpecs` (axis name `fsdp`) overrides `default_spec`."""
    super().__init__(mesh, tuple(mesh.axis_names))
    self._partition = partition
    self.state_shardings = self.shardings(state_like)

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

  def to_devices(self, host_tree):
    """Split over the devices as `shardings` says (a host-built state is not copied whole)."""
    return jax.tree.map(
      lambda x, sharding: jax.make_array_from_callback(
        np.shape(x),
        sharding,
        lambda index, x=np.asarray(x): x[index],  # noqa: B008
      ),
      host_tree,
      self.shardings(host_tree),
    )

  def to_host(self, tree):
    """A replicated array from this process's first device, a sharded one gathered (small trees
    only: metrics, or a test's look at a state)."""

    def whole(x):
      if x.sharding.is_fully_replicated:
        return x.addressable_shards[0].data
      return multihost_utils.process_allgather(x, tiled=True)

    return jax.tree.map(whole, tree)

  def map_eval(self, loss_fn):
    """step.eval_step on global arrays: the params stay sharded, the batch split over every device."""
    return jax.jit(
      functools.partial(step.eval_step, loss_fn=loss_fn, axis_name=None),
      out_shardings=self._replicated,
    )

  def map_train(self, *, steps_per_call: int, **step_kwargs):
    """K train steps per call over the sharded state (step.global_train_call); the loss is traced
    with `constrain_to_batch` on."""
    call = functools.partial(
      step.global_train_call,
      steps_per_call=steps_per_call,
      param_shardings=self.state_shardings.params,
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
      traced, donate_argnums=(0,), out_shardings=(self.state_shardings, self._replicated)
    )


_BATCH_SHARDING = contextvars.ContextVar("batch_sharding", default=None)


def constrain_to_batch(x: jax.Array) -> jax.Array:
  """`x` ([batch, ...], an activation in a workload's loss) split over the devices on its batch
  axis. Under fsdp this keeps XLA from splitting activations over features, as it may when the
  params are split that way (it then holds them whole on every device); under the other
  executors, and in eval, it changes nothing."""
  sharding = _BATCH_SHARDING.get()
  return x if sharding is None else lax.with_sharding_constraint(x, sharding)


# On CPU: gradients smaller than this are averaged together in buckets of up to this size.
CPU_GRADIENT_BUCKET_BYTES = 1 << 20


def gradient_bucket_bytes() -> int:
  """XLA's GPU and TPU compilers combine the all-reduces of a step into few (0: leave it to
  them); its CPU compiler does not, and on simulated devices each all-reduce costs about as much
  as a small step's compute (benchmarks/dispatch.py measures it), so there the small gradients
  are averaged in flat buckets (step.mean_over_devices)."""
  return CPU_GRADIENT_BUCKET_BYTES if jax.devices()[0].platform == "cpu" else 0


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


def executor(name: str, state_like, *, mesh: str = "", partition=None) -> Executor:
  """The executor named by `config.parallel` for a train state like `state_like` (its shapes);
  under fsdp on `config.mesh` (config.mesh_shape: "" is fsdp within each process) with
  `partition(params)`, the workload's rule."""
  if name == "fsdp":
    shape = config_lib.mesh_shape(mesh, name, jax.process_count(), jax.local_device_count())
    return Fsdp(state_like, data_fsdp_mesh(shape), partition)
  return {"pmap": Pmap, "shard_map": ShardMap}[name](state_like)


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


def job_replicated() -> NamedSharding:
  """Whole arrays on every device of every process."""
  return NamedSharding(Mesh(np.array(jax.devices()), (AXIS,)), PartitionSpec())
