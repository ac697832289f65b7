"""Executors: how the train state and batches live on the devices, and the compiled calls over
them. `pmap` and `shard_map` run the workload's loss per device (axis name `batch`) on a replicated
state; `fsdp` runs it on global arrays with the state sharded. Same results.

  pmap       state replicated as [local_devices, ...]; batches [local_devices, per_device, ...]
  shard_map  state as whole arrays on every device of a Mesh (NamedSharding, P()); batches as
             global arrays split on their batch axis; no host-local <-> global conversion per call
             (under both, the compiled calls take the state packed: its small leaves in one
             vector, launcher/state.py's `Packing`)
  fsdp       each state array split over a (data, fsdp, tensor) Mesh: over `fsdp` on one array
             axis (`default_spec`), or over `fsdp` and `tensor` as the workload's logical
             dimension names and config.axis_rules say (launcher/sharding.py); copied over
             `data`; batches split over data and fsdp; the step is traced on global arrays (the
             loss sees the global batch) and partitioned by XLA

Every executor is an `Executor`; the sharding rules (`default_spec`, config.AXIS_RULES, the
mesh) sit beside them.
"""

import abc
import functools
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import jax_utils
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from launcher import config as config_lib
from launcher import sharding, step
from launcher import state as state_lib
from launcher.errors import UsageError
from launcher.state import TrainState
from launcher.step import AXIS

# The fsdp executor's mesh axes: copies of the state, its shards, and its tensor-parallel shards.
DATA, FSDP, TENSOR = config_lib.MESH_AXES


class Executor(abc.ABC):
  """What the training loop asks of an executor. Each is built for one run's train state (its
  shapes: `jax.eval_shape` of the initializer), so `state_shardings` is fixed from the start.

  Three layouts meet here: host values (numpy), job-wide arrays (what init creates, a checkpoint
  saves and restores: `state_shardings`), and the run's layout that the compiled calls take (the
  same as job-wide arrays under fsdp; packed under pmap and shard_map, whose leaves are
  [local_devices, ...] under pmap)."""

  state_shardings: Any
  """The job-wide sharding of each leaf of the train state: init creates in it, restore reads into
  it, and `map_train` compiles for it."""

  @abc.abstractmethod
  def describe(self) -> str:
    """How the state lies on the devices, for the start-up log."""

  @abc.abstractmethod
  def from_global(self, global_state):
    """Job-wide arrays (a fresh or restored state) -> the run's layout, with no host copy of
    anything larger than a packed leaf (state.SMALL_LEAF_BYTES)."""

  @abc.abstractmethod
  def to_global(self, run_state):
    """The run's layout -> job-wide arrays (what a checkpoint saves), with no host copy of
    anything larger than a packed leaf."""

  @abc.abstractmethod
  def run_shapes(self, state_shapes):
    """The run's layout of a state of job-wide `state_shapes` (to lower a call without one)."""

  @abc.abstractmethod
  def skipped_steps(self, run_state) -> int:
    """The state's count of skipped steps, read on the host (for a report)."""

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
    """The compiled eval call: (run_state, metrics, batch) -> metrics, of the state's params."""


class _PerDevice(Executor):
  """pmap and shard_map: the step runs per device (step.train_call, collectives on axis `batch`)
  on a state replicated whole on every device, which the run holds packed (state.Packed): its
  small leaves in one vector, so that each call takes and returns few arrays."""

  def __init__(self, state_like):
    sharding = job_replicated()
    self.state_shardings = jax.tree.map(lambda _: sharding, state_like)
    self._packing = state_lib.Packing(state_like)

  @abc.abstractmethod
  def map(self, fn, *, stacked: bool = False, donate_argnums=()):
    """fn(replicated, replicated, batch) on every device; `stacked`: batch is [K, ...]."""

  @abc.abstractmethod
  def _place(self, replicated):
    """Job-wide replicated arrays -> the layout of `map`'s replicated arguments."""

  @abc.abstractmethod
  def _unplace(self, placed):
    """`_place`'s inverse."""

  def from_global(self, global_state):
    """The small leaves packed on the host (a few kB), the large ones placed as they are."""
    large, small = self._packing.split(global_state)
    small = jax.device_get([x.addressable_shards[0].data for x in small])
    return state_lib.Packed(self._place(large), self.to_devices(self._packing.pack_small(small)))

  def to_global(self, run_state):
    replicated = job_replicated()
    return self._packing.join(
      self._unplace(run_state.large),
      [
        jax.make_array_from_process_local_data(replicated, x)
        for x in self._small_leaves_on_host(run_state)
      ],
    )

  def skipped_steps(self, run_state) -> int:
    small = self._small_leaves_on_host(run_state)
    return int(self._packing.join([None] * len(run_state.large), small).skipped_steps)

  def _small_leaves_on_host(self, run_state) -> list:
    """The packed small leaves as numpy arrays, in `Packing.split`'s order."""
    return self._packing.unpack_small(jax.device_get(self.to_host(run_state.small)))

  def map_train(self, *, steps_per_call: int, **step_kwargs):
    packing = self._packing

    def packed_call(packed, metrics, batches):
      state, metrics = step.train_call(
        packing.unpack(packed),
        metrics,
        batches,
        steps_per_call=steps_per_call,
        gradient_bucket_bytes=gradient_bucket_bytes(),
        **step_kwargs,
      )
      return packing.pack(state), metrics

    return self.map(packed_call, stacked=steps_per_call > 1, donate_argnums=(0,))

  def map_eval(self, loss_fn):
    packing = self._packing

    def packed_eval(packed, metrics, batch):
      return step.eval_step(packing.unpack(packed).params, metrics, batch, loss_fn=loss_fn)

    return self.map(packed_eval)


class Pmap(_PerDevice):
  """`jax.pmap` over the local devices; collectives span every device of every process."""

  def __init__(self, state_like):
    super().__init__(state_like)
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

  def _place(self, replicated):
    """Job-wide replicated arrays -> [local_devices, ...] as pmap's outputs."""
    devices = self._replicated.mesh.devices

    def one(x):
      shards = {shard.device: shard.data for shard in x.addressable_shards}
      return jax.make_array_from_single_device_arrays(
        (len(devices),) + x.shape, self._replicated, [shards[d][None] for d in devices]
      )

    return jax.tree.map(one, replicated)

  def _unplace(self, placed):
    """[local_devices, ...] leaves -> one job-wide replicated array each."""
    sharding = job_replicated()

    def one(x):
      shards = {shard.device: shard.data for shard in x.addressable_shards}
      arrays = [shards[d].reshape(x.shape[1:]) for d in sharding.addressable_devices]
      return jax.make_array_from_single_device_arrays(x.shape[1:], sharding, arrays)

    return jax.tree.map(one, placed)

  def run_shapes(self, state_shapes):
    return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct((jax.local_device_count(),) + x.shape, x.dtype),
      jax.eval_shape(self._packing.pack, state_shapes),
    )

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
    """-> [devices, per_device, ...] (or [devices, K, per_device, ...]) host arrays: pmap's own
    dispatch copies them to the devices, faster than a device_put of the launcher's."""
    d = jax.local_device_count()

    def split(x):
      if stacked:  # [K, host_b, ...] -> [d, K, b, ...]
        x = x.reshape((x.shape[0], d, x.shape[1] // d) + x.shape[2:])
        return np.swapaxes(x, 0, 1)
      return x.reshape((d, x.shape[0] // d) + x.shape[1:])

    return jax.tree.map(lambda x: split(np.asarray(x)), host_batch)


class _GlobalArrays(Executor):
  """shard_map and fsdp: the run's layout is job-wide arrays, and a batch is a global array split
  over the mesh on its batch axis."""

  def __init__(self, mesh: Mesh, batch_axes):
    self.mesh = mesh
    self._replicated = NamedSharding(mesh, PartitionSpec())
    self._split = NamedSharding(mesh, PartitionSpec(batch_axes))
    self._stacked_split = NamedSharding(mesh, PartitionSpec(None, batch_axes))

  def batch_sharding(self, stacked: bool) -> NamedSharding:
    """Where a batch ([global_batch, ...], or [K, global_batch, ...] when `stacked`) lives."""
    return self._stacked_split if stacked else self._split

  def batch_to_devices(self, host_batch, *, stacked: bool = False):
    """In one process, the host arrays themselves: the compiled calls place them (their
    `in_shardings`) in jit's own dispatch, ~0.1 ms a call less than a device_put of the launcher's."""
    if jax.process_count() == 1:
      return jax.tree.map(np.asarray, host_batch)
    sharding = self._stacked_split if stacked else self._split
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
    batch_spec = self.batch_sharding(stacked).spec
    mapped = jax.shard_map(
      fn,
      mesh=self.mesh,
      in_specs=(PartitionSpec(), PartitionSpec(), batch_spec),
      out_specs=PartitionSpec(),
      check_vma=False,
    )
    return jax.jit(
      mapped, donate_argnums=donate_argnums, in_shardings=(None, None, self.batch_sharding(stacked))
    )

  def describe(self) -> str:
    return f"shard_map, replicated on each of {self.mesh.size} devices"

  def _place(self, replicated):
    return replicated

  def _unplace(self, placed):
    return placed

  def run_shapes(self, state_shapes):
    return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self._replicated),
      jax.eval_shape(self._packing.pack, state_shapes),
    )

  def to_devices(self, host_tree):
    """Whole arrays on every device of the job."""
    return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(self._replicated, np.asarray(x)), host_tree
    )

  def to_host(self, tree):
    """This process's first device's copy (no gather across devices)."""
    return jax.tree.map(lambda x: x.addressable_shards[0].data, tree)


class Fsdp(_GlobalArrays):
  """The state split over the `fsdp` axis of a data x fsdp x tensor Mesh (and over `tensor`
  where the workload names its dimensions) and copied over `data` (ZeRO-3 / HSDP, with Megatron
  tensor parallelism). The step is traced on global arrays (step.global_train_call) and XLA
  gathers each param where it is used and reduces its gradient into the param's shards, so the
  whole state is never on one device: not at init, in a step, or at restore. The loss sees the
  whole global batch."""

  def __init__(self, state_like, mesh: Mesh, partition=None, axis_rules: str = ""):
    """`partition(params)`: per param a PartitionSpec or tuple of logical names or mesh axes
    (None: `default_spec`), resolved by `axis_rules` (config.axis_rules over AXIS_RULES)."""
    self.rules = config_lib.parse_axis_rules(axis_rules)
    super().__init__(mesh, self.rules["batch"])
    self._given_rules = {
      name for name, axes in self.rules.items() if config_lib.AXIS_RULES.get(name) != axes
    }
    self._unused_rules_told = False
    self._param_specs, self._param_names = self._resolve_params(state_like.params, partition)
    self.state_shardings = self.shardings(state_like)

  def _resolve_params(self, params, partition):
    """Each param's PartitionSpec (a path -> (shape, spec) dict) and the logical names the
    params use; logs one line per dimension the mesh cannot split as asked."""
    mesh_shape = dict(self.mesh.shape)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    named = [None] * len(leaves) if partition is None else _names_per_param(params, partition)
    specs, names_used, fallbacks = {}, set(), {}
    for (path, leaf), names in zip(leaves, named, strict=True):
      shape = np.shape(leaf)
      spec = None
      if names is not None:
        where = f"param {jax.tree_util.keystr(path)}"
        resolved = sharding.resolve(names, shape, self.rules, mesh_shape, where)
        names_used.update(n for entry in names if entry for n in sharding.as_tuple(entry))
        for fallback in resolved.fallbacks:
          fallbacks.setdefault(fallback, []).append(jax.tree_util.keystr(path))
        if resolved.spec != PartitionSpec() or not resolved.asked:
          spec = resolved.spec
      # No names, or names the mesh leaves whole (axes of size 1): split as today's rule does.
      specs[tuple(path)] = (shape, default_spec(shape, mesh_shape[FSDP]) if spec is None else spec)
    for fallback, arrays in fallbacks.items():
      logging.warning("%s", sharding.fallback_line(fallback, mesh_shape, arrays))
    split_over_tensor = TENSOR in self.rules["batch"] or any(
      TENSOR in sharding.as_tuple(entry) for _, spec in specs.values() for entry in spec if entry
    )
    if mesh_shape[TENSOR] > 1 and not split_over_tensor:
      named_none = (
        "names no param dimensions (no partition())"
        if partition is None
        else "names no param dimension that config.axis_rules maps to tensor"
      )
      logging.warning(
        "sharding: the workload %s, so each param is split over fsdp alone and tensor:%d holds "
        "copies that repeat the same work: name them (docs/sharding.md) or leave tensor out of "
        "config.mesh",
        named_none,
        mesh_shape[TENSOR],
      )
    return specs, names_used

  def shardings(self, tree):
    """A NamedSharding per leaf: `default_spec`; a TrainState's params as resolved, and each
    optimizer leaf that mirrors a param (AdamW's moments: the param's path at its end, the
    param's shape) as that param."""
    size = self.mesh.shape[FSDP]

    def spec(path, x):
      shape = np.shape(x)
      if isinstance(tree, TrainState):
        for start in range(len(path)):
          if path[start:] in self._param_specs and self._param_specs[path[start:]][0] == shape:
            return self._param_specs[path[start:]][1]
      return default_spec(shape, size)

    return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(self.mesh, spec(_params_relative(path, tree), x)), tree
    )

  def describe(self) -> str:
    """The mesh, how many processes an fsdp group spans (1: its gathers stay in a host), and
    how many params each mesh axis splits."""
    shape = dict(self.mesh.shape)
    fsdp_groups = np.moveaxis(self.mesh.devices, 1, -1).reshape(-1, shape[FSDP])
    spans = max(len({device.process_index for device in group}) for group in fsdp_groups)
    mesh = f"data:{shape[DATA]} x fsdp:{shape[FSDP]}"
    if shape[TENSOR] > 1:
      mesh += f" x tensor:{shape[TENSOR]}"
    specs = [spec for _, spec in self._param_specs.values()]
    sizes = [int(np.prod(shape)) for shape, _ in self._param_specs.values()]
    return (
      f"fsdp on a {mesh} mesh, each fsdp group within {spans} process(es); "
      f"{sharding.split_summary(specs, sizes, shape)}"
    )

  def from_global(self, global_state):
    return global_state

  def to_global(self, run_state):
    return run_state

  def run_shapes(self, state_shapes):
    return state_shapes

  def skipped_steps(self, run_state) -> int:
    return int(run_state.skipped_steps)

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

    def state_eval(state, metrics, batch):
      return step.eval_step(state.params, metrics, batch, loss_fn=loss_fn, axis_name=None)

    return jax.jit(
      state_eval,
      in_shardings=(None, None, self.batch_sharding(stacked=False)),
      out_shardings=self._replicated,
    )

  def map_train(self, *, steps_per_call: int, **step_kwargs):
    """K train steps per call over the sharded state (step.global_train_call); the loss is traced
    with `sharding.constrain` on."""
    call = functools.partial(
      step.global_train_call,
      steps_per_call=steps_per_call,
      param_shardings=self.state_shardings.params,
      microbatch_sharding=self._stacked_split,
      **step_kwargs,
    )

    def traced(*args):
      with sharding.tracing(self.mesh, self.rules) as trace:
        outputs = call(*args)
      self._tell_unused_rules(trace.names_seen)
      return outputs

    return jax.jit(
      traced,
      donate_argnums=(0,),
      in_shardings=(None, None, self.batch_sharding(stacked=steps_per_call > 1)),
      out_shardings=(self.state_shardings, self._replicated),
    )

  def _tell_unused_rules(self, activation_names: set) -> None:
    """One warning, at the first trace, for each rule of config.axis_rules that no param's or
    traced activation's dimension names: it does nothing."""
    unused = sorted(self._given_rules - self._param_names - activation_names - {"batch"})
    if unused and not self._unused_rules_told:
      logging.warning(
        "sharding: config.axis_rules maps %s, which no param or activation of the workload "
        "names, so those rules do nothing (the names used: %s): fix the names or drop them",
        ", ".join(unused),
        ", ".join(sorted(self._param_names | activation_names)) or "none",
      )
    self._unused_rules_told = True


def _names_per_param(params, partition) -> list:
  """`partition(params)` as one entry per param leaf (names, a PartitionSpec or None); a tree
  that does not match the params' is one line naming the keys that differ."""
  returned = partition(params)
  try:
    return jax.tree.structure(params).flatten_up_to(returned)
  except (ValueError, TypeError) as e:
    mismatch = str(e).splitlines()[0]
  wanted = {jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)}
  given = {
    jax.tree_util.keystr(path)
    for path, _ in jax.tree_util.tree_leaves_with_path(returned, is_leaf=_is_names)
  }
  if returned is None:
    mismatch = "returned None"
  elif wanted != given:
    missing, extra = sorted(wanted - given), sorted(given - wanted)
    mismatch = "; ".join(
      [f"has no entry for param {sharding.first_few(missing)}"] * bool(missing)
      + [f"has entries for {sharding.first_few(extra)}, which are not params"] * bool(extra)
    )
  raise UsageError(
    f"the workload's partition(config, params) {mismatch}: return one entry per param in the "
    "params' own structure (a tuple of names per dimension, a PartitionSpec, or None for the "
    "default rule; docs/sharding.md)"
  )


def _is_names(x) -> bool:
  """Whether `x` is one param's entry in a partition() tree, not a container of entries."""
  if x is None or isinstance(x, (str, PartitionSpec)):
    return True
  return isinstance(x, (tuple, list)) and all(e is None or isinstance(e, (str, tuple)) for e in x)


def _params_relative(path: tuple, tree) -> tuple:
  """A TrainState leaf's path with the `.params` key dropped (a param's path in the params)."""
  if isinstance(tree, TrainState) and path and getattr(path[0], "name", None) == "params":
    return path[1:]
  return path


def constrain_to_batch(x: jax.Array) -> jax.Array:
  """`x` ([batch, ...], an activation in a workload's loss) split over the devices on its batch
  axis: `sharding.constrain(x, ("batch",))`. Under fsdp this keeps XLA from splitting
  activations over features, as it may when the params are split that way (it then holds them
  whole on every device); under the other executors, and in eval, it changes nothing."""
  return sharding.constrain(x, ("batch",))


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


def executor(name: str, state_like, *, mesh: str = "", partition=None, axis_rules: str = ""):
  """The executor named by `config.parallel` for a train state like `state_like` (its shapes);
  under fsdp on `config.mesh` (config.mesh_shape: "" is fsdp within each process) with
  `partition(params)`, the workload's names, resolved by `config.axis_rules`."""
  if name == "fsdp":
    shape = config_lib.mesh_shape(mesh, name, jax.process_count(), jax.local_device_count())
    return Fsdp(state_like, fsdp_mesh(shape), partition, axis_rules)
  return {"pmap": Pmap, "shard_map": ShardMap}[name](state_like)


def fsdp_mesh(mesh_shape: dict[str, int]) -> Mesh:
  """A (data, fsdp, tensor) Mesh of every device. A tensor group always lies inside a process,
  on consecutive devices; an fsdp x tensor block that fits in a process stays inside it (its
  gathers never cross the slower network between hosts), with `data` across processes; a larger
  one spans whole processes. Either way process p holds the p-th part of every batch."""
  data, fsdp, tensor = (mesh_shape[axis] for axis in config_lib.MESH_AXES)
  local = jax.local_device_count()
  if local % (fsdp * tensor) == 0 and jax.process_count() > 1:
    devices = mesh_utils.create_hybrid_device_mesh(
      (local // (fsdp * tensor), fsdp, tensor),
      (jax.process_count(), 1, 1),
      jax.devices(),
      process_is_granule=True,
    )
  else:
    devices = np.array(sorted(jax.devices(), key=lambda d: (d.process_index, d.id)))
    devices = devices.reshape(data, fsdp, tensor)
  return Mesh(devices, config_lib.MESH_AXES)


def job_replicated() -> NamedSharding:
  """Whole arrays on every device of every process."""
  return NamedSharding(Mesh(np.array(jax.devices()), (AXIS,)), PartitionSpec())
