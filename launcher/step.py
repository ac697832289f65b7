"""The per-device train and eval steps: pure functions over one device's shard, axis name `batch`."""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from clu import metrics as clu_metrics
from jax import lax

from launcher.state import TrainState

AXIS = "batch"

LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]  # (params, batch, rng)


def train_step(state: TrainState, batch: dict, *, loss_fn: LossFn, tx: optax.GradientTransformation,
               schedule: optax.Schedule) -> tuple[TrainState, dict]:
  """One update from this device's shard; gradients are averaged over every device."""
  rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), lax.axis_index(AXIS))
  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng)
  grads = lax.pmean(grads, AXIS)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                            opt_state=opt_state)
  return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads),
                     "learning_rate": schedule(state.step), **metrics}


def train_call(state: TrainState, metrics: clu_metrics.Collection, batches: dict, *,
               steps_per_call: int, **step_kwargs) -> tuple[TrainState, clu_metrics.Collection]:
  """K steps in one call (lax.scan over [K, per_device, ...] batches); metrics gathered on device."""

  def one_step(carry, batch):
    state, metrics = carry
    state, step_metrics = train_step(state, batch, **step_kwargs)
    return (state, metrics.merge(type(metrics).gather_from_model_output(axis_name=AXIS,
                                                                          **step_metrics))), None

  if steps_per_call == 1:
    return one_step((state, metrics), batches)[0]
  return lax.scan(one_step, (state, metrics), batches)[0]


def eval_step(params: Any, metrics: clu_metrics.Collection, batch: dict, *,
              loss_fn: LossFn) -> clu_metrics.Collection:
  """Adds one padded batch to the eval metrics; each real example counts once, padding not at all.

  The workload's loss sees one example at a time (vmap), so padding never enters a mean; its rng
  is None, which tells it to run deterministically (no dropout).
  """
  examples = {name: x for name, x in batch.items() if name != "mask"}

  def per_example(example):
    loss, metrics = loss_fn(params, jax.tree.map(lambda x: x[None], example), None)
    return {"loss": loss, **metrics}

  values = jax.vmap(per_example)(examples)
  return metrics.merge(type(metrics).gather_from_model_output(axis_name=AXIS, mask=batch["mask"], **values))


def metric_names(loss_fn: LossFn, params: Any, example_batch: dict) -> list[str]:
  """The names of the workload's metrics, read from the shapes of its loss (no compute)."""
  _, metrics = jax.eval_shape(loss_fn, params, example_batch, None)
  return list(metrics)


def empty_metrics(names: list[str]) -> clu_metrics.Collection:
  """An empty collection averaging each named scalar."""
  return clu_metrics.Collection.create(
      **{name: clu_metrics.Average.from_output(name) for name in names}).empty()
