"""The training loop: `run(config, workdir)` joins the parts and reads top to bottom."""

import functools
import itertools
import os

import jax
import ml_collections
from absl import logging

from launcher import config as config_lib
from launcher import data, metrics, parallel, step
from launcher import state as state_lib
from launcher import workload as workload_lib
from launcher.errors import UsageError


def run(config: ml_collections.ConfigDict, workdir: str) -> state_lib.TrainState:
  """Trains `config.workload` data-parallel on every device of every process; returns the state."""
  config_lib.check(config)
  workload = workload_lib.load(config.workload)
  layout = config_lib.layout(config.batch_size, jax.process_index(), jax.process_count(),
                             jax.local_device_count())
  os.makedirs(workdir, exist_ok=True)
  if layout.process_index == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json(indent=2))

  host_batches = workload.dataset(config, "train", layout.process_index, layout.process_count)
  example_batch = next(host_batches)
  host_batches = itertools.chain([example_batch], host_batches)
  loss_fn = functools.partial(workload.loss, config)
  tx = state_lib.optimizer(config)
  state = state_lib.create(config, workload.init, tx)
  workload_metric_names = step.metric_names(loss_fn, state.params, example_batch)
  logging.info("%s: %s params; global batch %d = %d process(es) x %d devices x %d per device",
               config.workload, f"{_count_params(state.params):,}", layout.global_batch_size,
               layout.process_count, layout.local_device_count, layout.per_device_batch_size)

  train_call = parallel.over_devices(
      functools.partial(step.train_call, steps_per_call=config.steps_per_call, loss_fn=loss_fn,
                        tx=tx, schedule=state_lib.schedule(config)),
      donate_argnums=(0,))
  eval_call = parallel.over_devices(functools.partial(step.eval_step, loss_fn=loss_fn))
  train_batches = data.train_batches(
      host_batches, host_batch_size=layout.host_batch_size,
      local_device_count=layout.local_device_count, steps_per_call=config.steps_per_call)
  tokens_per_example = getattr(workload, "tokens_per_example", None)
  reporter = metrics.Reporter(
      workdir, process_index=layout.process_index, process_count=layout.process_count,
      num_steps=config.num_steps, log_every_steps=config.log_every_steps,
      examples_per_step=layout.global_batch_size,
      tokens_per_example=tokens_per_example(config) if tokens_per_example else None,
      profile_first_step=config.profile_first_step)

  def evaluate(replicated_params) -> dict[str, float]:
    eval_host_batches = workload.dataset(config, "eval", layout.process_index, layout.process_count)
    if config.eval_batches:
      eval_host_batches = itertools.islice(eval_host_batches, config.eval_batches)
    eval_metrics = state_lib.replicate(step.empty_metrics(["loss", *workload_metric_names]))
    in_flight = parallel.InFlight(config.max_calls_in_flight)
    for batch in data.eval_batches(
        eval_host_batches, example=example_batch, host_batch_size=layout.host_batch_size,
        local_device_count=layout.local_device_count, process_count=layout.process_count):
      in_flight.wait_for_room()
      eval_metrics = eval_call(replicated_params, eval_metrics, batch)
      in_flight.add(eval_metrics)
    computed = state_lib.unreplicate(eval_metrics).compute()
    return {f"eval_{name}": value for name, value in computed.items()}

  replicated_state = state_lib.replicate(state)
  no_train_metrics = state_lib.replicate(
      step.empty_metrics(["loss", "grad_norm", "learning_rate", *workload_metric_names]))
  train_metrics = no_train_metrics
  in_flight = parallel.InFlight(config.max_calls_in_flight)
  k = config.steps_per_call
  for last_step in range(k, config.num_steps + 1, k):
    with reporter.waiting_for_data():
      batches = next(train_batches, None)
    if batches is None:
      raise UsageError(f"workload {config.workload}'s train dataset ended before step "
                       f"{last_step}: dataset(config, 'train', ...) must be endless")
    in_flight.wait_for_room()
    replicated_state, train_metrics = train_call(replicated_state, train_metrics, batches)
    in_flight.add(train_metrics)
    reporter.after_steps(last_step - k + 1, last_step)

    scalars = {}
    if last_step % config.log_every_steps == 0 or last_step == config.num_steps:
      scalars.update(state_lib.unreplicate(train_metrics).compute())
      scalars.update(reporter.throughput(last_step))
      train_metrics = no_train_metrics
    if config.eval_every_steps and (last_step % config.eval_every_steps == 0
                                    or last_step == config.num_steps):
      with reporter.progress.timed("eval"):
        scalars.update(evaluate(replicated_state.params))
    if scalars:
      reporter.write(last_step, scalars)

  reporter.close()
  return state_lib.unreplicate(replicated_state)


def _count_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
