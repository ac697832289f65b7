"""The train and eval steps: pure functions over one device's shard (axis name `batch`), and the
fsdp train call over the job's global arrays."""

import functools
import itertools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from clu import metrics as clu_metrics
from jax import flatten_util, lax

from launcher.state import TrainState

AXIS = "batch"

LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]  # (params, batch, rng)

# What train_step reports besides the workload's own metrics.
TRAIN_METRICS = ("loss", "grad_norm", "learning_rate")


def train_step(
  state: TrainState,
  batch: dict,
  *,
  loss_fn: LossFn,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  grad_accum_steps: int = 1,
  compute_dtype=None,
  skip_nonfinite: bool = False,
  gradient_bucket_bytes: int = 0,
) -> tuple[TrainState, dict]:
  """One update from this device's shard; gradients are averaged over every device, in few
  all-reduces with `gradient_bucket_bytes` (`mean_over_devices`).

  With `grad_accum_steps` M > 1 the shard is split into M microbatches whose gradients are
  averaged (lax.scan) before the one update: the same update as one step on the whole shard, in
  1/M of the activation memory. With `compute_dtype`, params and float inputs are cast to it for
  the loss; the float32 params are what the optimizer updates.
  With `skip_nonfinite`, a step whose mean loss or gradient norm is NaN or infinite leaves params
  and optimizer state as they were, is counted in `state.skipped_steps`, and is left out of the
  metrics (the `mask` entry of the returned metrics).
  """
  (loss, metrics), grads = gradients(
    state.params,
    batch,
    device_rng(state.rng, state.step),
    loss_fn=loss_fn,
    grad_accum_steps=grad_accum_steps,
    compute_dtype=compute_dtype,
  )
  grads, grad_norm, step_metrics = mean_over_devices(
    grads, gradient_bucket_bytes, riders={"loss": loss, **metrics}
  )
  return update(
    state,
    grads,
    step_metrics,
    tx=tx,
    schedule=schedule,
    skip_nonfinite=skip_nonfinite,
    mean_loss=lambda: step_metrics["loss"],
    grad_norm=grad_norm,
  )


def mean_over_devices(
  tree, bucket_bytes: int = 0, riders: dict | None = None
) -> tuple[Any, jax.Array, dict]:
  """`lax.pmean` over axis `batch` of every leaf of `tree` (the gradients) and of `riders` (the
  step's scalar loss and metrics, in the same all-reduces, so that they cost none of their own),
  and the averaged tree's global norm (riders left out). With `bucket_bytes` > 0 the leaves
  smaller than it are averaged together, concatenated into flat buckets of up to `bucket_bytes`
  (one all-reduce each, for a compiler that does not combine all-reduces itself: XLA on CPU,
  where each op also costs its start: the norm is then taken of the buckets); larger leaves,
  whose all-reduce costs more than its start, alone (no copy). The riders (as float32) end the
  last bucket."""
  riders = riders or {}
  if not bucket_bytes:
    means, rider_means = lax.pmean((tree, riders), AXIS)
    return means, optax.tree.norm(means), rider_means
  leaves, treedef = jax.tree.flatten(tree)
  rider_leaves, rider_treedef = jax.tree.flatten(riders)
  means = list(leaves)
  averaged = []  # What the norm is taken of: each bucket's gradients, each leaf averaged alone.
  buckets = {}  # dtype -> [[leaf index, ...], ...], the last one open
  for index, leaf in enumerate(leaves):
    if leaf.nbytes >= bucket_bytes:
      means[index] = lax.pmean(leaf, AXIS)
      averaged.append(means[index])
      continue
    dtype_buckets = buckets.setdefault(leaf.dtype, [[]])
    if sum(leaves[i].nbytes for i in dtype_buckets[-1]) + leaf.nbytes > bucket_bytes:
      dtype_buckets.append([])
    dtype_buckets[-1].append(index)
  groups = [bucket for bucket in itertools.chain.from_iterable(buckets.values()) if bucket]
  if rider_leaves and not groups:
    groups = [[]]
  rider_means = []
  for number, bucket in enumerate(groups):
    pieces = [leaves[i].ravel() for i in bucket]
    gradient_size = sum(leaves[i].size for i in bucket)
    carries_riders = rider_leaves and number == len(groups) - 1
    if carries_riders:
      dtype = pieces[0].dtype if pieces else jnp.float32
      pieces += [jnp.asarray(x, dtype).reshape((1,)) for x in rider_leaves]
    flat = lax.pmean(jnp.concatenate(pieces), AXIS)
    if bucket:
      averaged.append(flat[:gradient_size])
    if carries_riders:
      rider_means = list(flat[gradient_size:].astype(jnp.float32))
    offsets = itertools.accumulate((leaves[i].size for i in bucket), initial=0)
    for index, offset in zip(bucket, offsets, strict=False):
      means[index] = flat[offset : offset + leaves[index].size].reshape(leaves[index].shape)
  return (
    treedef.unflatten(means),
    optax.tree.norm(averaged),
    rider_treedef.unflatten(rider_means),
  )


def device_rng(rng: jax.Array, step: jax.Array) -> jax.Array:
  """The key of step `step` on this device."""
  return jax.random.fold_in(jax.random.fold_in(rng, step), lax.axis_index(AXIS))


def gradients(
  params: Any,
  batch: dict,
  rng: jax.Array,
  *,
  loss_fn: LossFn,
  grad_accum_steps: int = 1,
  compute_dtype=None,
  microbatch_sharding=None,
) -> tuple[tuple[jax.Array, dict], Any]:
  """((loss, metrics), grads) of `batch`: this device's shard (not yet averaged over devices), or
  a global batch when `microbatch_sharding` says how its [M, B/M, ...] microbatches lie."""
  grad_fn = jax.value_and_grad(_cast_loss(loss_fn, compute_dtype), has_aux=True)
  if grad_accum_steps == 1:
    return grad_fn(params, batch, rng)
  microbatches = jax.tree.map(
    functools.partial(_microbatches, count=grad_accum_steps, sharding=microbatch_sharding), batch
  )

  def accumulate(sums, indexed_microbatch):
    index, microbatch = indexed_microbatch
    outputs = grad_fn(params, microbatch, jax.random.fold_in(rng, index))
    return jax.tree.map(jnp.add, sums, outputs), None

  zeros = jax.tree.map(
    jnp.zeros_like, jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], microbatches), rng)
  )
  sums, _ = lax.scan(accumulate, zeros, (jnp.arange(grad_accum_steps), microbatches))
  return jax.tree.map(lambda x: x / grad_accum_steps, sums)


def _microbatches(x: jax.Array, *, count: int, sharding=None) -> jax.Array:
  """[B, ...] -> [count, B/count, ...]. A device's shard splits into consecutive parts; a global
  batch split over the devices is dealt out (part m takes every count-th example), so each
  device's rows divide evenly among the parts and no part moves between devices."""
  if sharding is None:
    return x.reshape((count, x.shape[0] // count) + x.shape[1:])
  dealt = jnp.swapaxes(x.reshape((x.shape[0] // count, count) + x.shape[1:]), 0, 1)
  return lax.with_sharding_constraint(dealt, sharding)


def update(
  state: TrainState,
  grads: Any,
  metrics: dict,
  *,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  skip_nonfinite: bool,
  mean_loss: Callable[[], jax.Array],
  grad_norm: jax.Array | None = None,
) -> tuple[TrainState, dict]:
  """The optimizer step from gradients averaged over every device (whole or sharded arrays);
  `grad_norm`: their global norm, when the caller has it."""
  if grad_norm is None:
    grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new_state = state.replace(
    step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state
  )
  # The optimizer's schedule counts the updates it applied: a skipped step does not advance it.
  applied_updates = state.step - state.skipped_steps
  metrics = {
    "loss": metrics["loss"],
    "grad_norm": grad_norm,
    "learning_rate": schedule(applied_updates),
    **metrics,
  }
  if not skip_nonfinite:
    return new_state, metrics
  finite = jnp.isfinite(mean_loss()) & jnp.isfinite(grad_norm)

  def keep(new, old):
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

  new_state = new_state.replace(
    params=keep(new_state.params, state.params),
    opt_state=keep(new_state.opt_state, state.opt_state),
    skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32),
  )
  return new_state, {**metrics, "mask": finite}


def _cast_loss(loss_fn: LossFn, compute_dtype, param_shardings=None) -> LossFn:
  """`loss_fn` computing in `compute_dtype` (params and float inputs cast), returning float32.
  With `param_shardings` each param is cast on its shards, before XLA gathers it (XLA's CPU
  backend still moves the cast after the gather)."""
  if compute_dtype is None:
    return loss_fn

  def loss(params, batch, rng):
    params = _cast(params, compute_dtype)
    if param_shardings is not None:
      params = lax.with_sharding_constraint(params, param_shardings)
    value, metrics = loss_fn(params, _cast(batch, compute_dtype), rng)
    return value.astype(jnp.float32), jax.tree.map(lambda m: m.astype(jnp.float32), metrics)

  return loss


def _cast(tree, dtype):
  """Every float array of `tree` in `dtype`."""
  return jax.tree.map(
    lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
  )


class MetricSet:
  """Named scalar averages (CLU `Average` metrics) carried from call to call as one float32
  vector: every array a call takes and returns costs dispatch time, and a CLU Collection is two
  per metric. Adding two vectors merges the collections they hold. A count is a number of steps
  (each step's values are averaged over the devices first), exact in float32 up to 2**24 steps
  a window."""

  def __init__(self, names):
    self.names = tuple(names)
    self.empty = empty_metrics(self.names)
    self.zeros, self._unravel = flatten_util.ravel_pytree(self.empty)

  def pack(self, collection: clu_metrics.Collection) -> jax.Array:
    return flatten_util.ravel_pytree(collection)[0]

  def unpack(self, vector: jax.Array) -> clu_metrics.Collection:
    return self._unravel(vector)

  def compute(self, vector) -> dict[str, float]:
    """The mean of each metric over the steps it counts; a metric that counts none (every step
    of the window was skipped) is left out."""
    metrics = {name: getattr(self.unpack(vector), name) for name in self.names}
    return {
      name: float(metric.compute()) for name, metric in metrics.items() if float(metric.count) > 0
    }

  def single(self, values: dict) -> clu_metrics.Collection:
    """One step's metrics as a collection that counts the step once: each value is averaged over
    whatever device axis it still has, and a false `mask` (a skipped step) leaves it out."""
    mask = jnp.reshape(jnp.all(values.get("mask", True)), (1,))
    means = {
      name: jnp.reshape(jnp.mean(value), (1,)) for name, value in values.items() if name != "mask"
    }
    return type(self.empty).single_from_model_output(**means, mask=mask)


def train_call(
  state: TrainState,
  metrics: jax.Array,
  batches: dict,
  *,
  steps_per_call: int,
  metric_set: MetricSet,
  **step_kwargs,
) -> tuple[TrainState, jax.Array]:
  """K steps in one call (lax.scan over [K, per_device, ...] batches). Each step's metrics are
  averaged over the devices in its gradients' all-reduce (`mean_over_devices`), so every device
  sums the same values over the K steps and adds them to `metrics`: no all-reduce of its own."""

  state, local = _steps(
    lambda state, batch: train_step(state, batch, **step_kwargs),
    state,
    batches,
    steps_per_call=steps_per_call,
    metric_set=metric_set,
    like=metrics,
  )
  return state, metrics + metric_set.pack(local)


def _steps(
  step_fn,
  state: TrainState,
  batches: dict,
  *,
  steps_per_call: int,
  metric_set: MetricSet,
  like: jax.Array,
) -> tuple[TrainState, clu_metrics.Collection]:
  """`step_fn(state, batch) -> (state, step metrics)` over K batches (lax.scan when K > 1), the
  steps' metrics summed into a fresh collection (built from `like`, a metrics vector, inside
  the trace: no constants)."""

  def one_step(carry, batch):
    state, local = carry
    state, step_metrics = step_fn(state, batch)
    return (state, local.merge(metric_set.single(step_metrics))), None

  carry = (state, metric_set.unpack(jnp.zeros_like(like)))
  if steps_per_call == 1:
    return one_step(carry, batches)[0]
  return lax.scan(one_step, carry, batches)[0]


def global_train_call(
  state: TrainState,
  metrics: jax.Array,
  batches: dict,
  *,
  steps_per_call: int,
  metric_set: MetricSet,
  param_shardings: Any,
  microbatch_sharding: jax.sharding.Sharding,
  loss_fn: LossFn,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  grad_accum_steps: int = 1,
  compute_dtype=None,
  skip_nonfinite: bool = False,
) -> tuple[TrainState, jax.Array]:
  """`train_call` traced on the job's global arrays, for a state sharded over the devices (fsdp).

  The loss sees the whole global batch (one array split over the devices) and one rng per step;
  XLA's SPMD partitioner gathers each param where the loss uses it and reduces its gradient into
  the param's sharding (`param_shardings`), so no device holds every param or every gradient at
  once.
  """

  cast_loss = _cast_loss(loss_fn, compute_dtype, param_shardings)

  def one_step(state, batch):
    (loss, values), grads = gradients(
      state.params,
      batch,
      jax.random.fold_in(state.rng, state.step),
      loss_fn=cast_loss,
      grad_accum_steps=grad_accum_steps,
      microbatch_sharding=microbatch_sharding,
    )
    grads = lax.with_sharding_constraint(grads, param_shardings)
    return update(
      state,
      grads,
      {"loss": loss, **values},
      tx=tx,
      schedule=schedule,
      skip_nonfinite=skip_nonfinite,
      mean_loss=lambda: loss,
    )

  state, local = _steps(
    one_step, state, batches, steps_per_call=steps_per_call, metric_set=metric_set, like=metrics
  )
  return state, metrics + metric_set.pack(local)


def eval_step(
  params: Any, metrics: clu_metrics.Collection, batch: dict, *, loss_fn: LossFn, axis_name=AXIS
) -> clu_metrics.Collection:
  """Adds one padded batch to the eval metrics; each real example counts once, padding not at all.

  The workload's loss sees one example at a time (vmap), so padding never enters a mean; its rng
  is None, which tells it to run deterministically (no dropout). `batch` is this device's shard
  (summed over the devices of `axis_name`), or with `axis_name` None a global batch (fsdp).
  """
  examples = {name: x for name, x in batch.items() if name != "mask"}

  def per_example(example):
    loss, metrics = loss_fn(params, jax.tree.map(lambda x: x[None], example), None)
    return {"loss": loss, **metrics}

  values = jax.vmap(per_example)(examples)
  if axis_name is None:
    return metrics.merge(type(metrics).single_from_model_output(mask=batch["mask"], **values))
  return metrics.merge(
    type(metrics).gather_from_model_output(axis_name=axis_name, mask=batch["mask"], **values)
  )


def empty_metrics(names: list[str]) -> clu_metrics.Collection:
  """An empty collection averaging each named scalar."""
  return clu_metrics.Collection.create(
    **{name: clu_metrics.Average.from_output(name) for name in names}
  ).empty()
