"""The training loop: `run(config, workdir)` sets up a run in named steps, then trains and reports."""

import contextlib
import functools
import itertools
import math
import time
import types
from typing import NamedTuple

import jax
import ml_collections
from absl import logging

from launcher import (
  calls_in_flight,
  cluster,
  compilation_cache,
  data,
  memory,
  optimizer,
  parallel,
  preemption,
  step,
  storage,
  trackers,
  writers,
)
from launcher import checkpoint as checkpoint_lib
from launcher import config as config_lib
from launcher import local_tier as local_tier_lib
from launcher import state as state_lib
from launcher import steps_per_call as steps_per_call_lib
from launcher import watchdog as watchdog_lib
from launcher import workdir as workdir_lib
from launcher import workload as workload_lib
from launcher.errors import NonFiniteError, Preempted, UsageError

# How long a failing run waits for the saves it started when they may never finish.
LAST_SAVES_GRACE_S = 30.0


def run(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  step_timeout_seconds: float = 0,
  peer_timeout_seconds: float = watchdog_lib.PEER_TIMEOUT_S,
  storage_timeout_seconds: float = storage.STORAGE_TIMEOUT_S,
  startup_parts: dict[str, float] | None = None,
) -> state_lib.TrainState:
  """Trains `config.workload` data-parallel on every device of every process; returns the state.

  `workdir` is a local path, a path on a filesystem every host shares, or gs://bucket/path. A
  workdir that holds checkpoints continues from the newest complete one; a finished run is left
  as it is. A train call that does not finish within `step_timeout_seconds` (0: never) ends the
  process (watchdog.StepWatchdog); in a multi-process job, so does another process showing no
  sign of life for `peer_timeout_seconds` (watchdog.PeerMonitor); and so does remote storage
  that does not answer within `storage_timeout_seconds`. `startup_parts`: seconds the
  caller spent on named parts of the start (e.g. joining the job); the start-up line shows them,
  and the rest before as imports.
  """
  started = time.time()
  startup_parts = startup_parts or {}
  parts = {
    "imports": writers.seconds_before(started) - sum(startup_parts.values()),
    **startup_parts,
  }
  storage.bound_calls(storage_timeout_seconds)
  memory.keep_freed_host_memory()
  with _timed(parts, "checks"):
    config_lib.check(config)
    if jax.process_count() > 1 and cluster.coordination_client() is not None:
      cluster.check_same_config(
        config.to_json(), cluster.coordination_client(), jax.process_index(), jax.process_count()
      )
    compilation_cache.enable(config.compilation_cache_dir)
    workdir = storage.path(workdir)
    workload = workload_lib.load(config.workload)
    workload_lib.check_data_keys(workload, config)
    layout = config_lib.layout(
      config.batch_size,
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
      config.grad_accum_steps,
      batch_copies=config_lib.batch_copies(config, jax.process_count(), jax.local_device_count()),
    )
    freshness = workdir_lib.freshness(workdir) if layout.process_index == 0 else None
    storage.check_workdir(
      workdir_lib.token_file(workdir), layout.process_index, layout.process_count
    )
  client = cluster.coordination_client() if layout.process_count > 1 else None
  peers = (
    watchdog_lib.PeerMonitor(
      client,
      layout.process_index,
      layout.process_count,
      timeout=peer_timeout_seconds,
      describe_process=f"process {layout.process_index}/{layout.process_count}",
    )
    if client is not None
    else None
  )
  try:  # Bad input found before the run's first write leaves a fresh workdir as it was.
    with _timed(parts, "init"):
      executor, loss_fn, tx, fresh, state_target = _build(config, workload)
    data_record = checkpoint_lib.data_record(config, workload, layout.global_batch_size)
    checkpoints, local_tier, restored, state = _resume_or_start(
      config, workdir, layout, data_record, fresh, state_target, parts
    )
    first_step = int(state.step.addressable_data(0))
    local_tier_lib.record_start(
      workdir, first_step, layout.process_index, layout.process_count, local_tier
    )
    if first_step >= config.num_steps:
      _say_already_finished(workdir, first_step, config.num_steps)
      checkpoints.close()
      return state
    plan = steps_per_call_lib.Plan(config, first_step, layout.process_count)
    if (config.num_steps - first_step) % plan.k:  # "auto" fits any start.
      raise UsageError(
        f"the run resumes at step {first_step}, from which config.num_steps="
        f"{config.num_steps} is not reached in whole calls of "
        f"config.steps_per_call={plan.k}: use the steps_per_call it was saved with, or auto"
      )
    with _timed(parts, "first batch"):
      example_batch, train_batches, workload_metric_names = _open_train_data(
        config, workload, layout, loss_fn, state, executor, first_step, plan
      )
      if config.eval_every_steps:
        _check_eval_data(config, workload, layout)
  except UsageError:
    if freshness:
      workdir_lib.remove_first_writes(workdir, freshness)
    raise
  if layout.process_index == 0:  # Only now: a start that cannot resume leaves the old one.
    storage.write_text(workdir_lib.config_file(workdir), config.to_json(indent=2))
  say = logging.info if layout.process_index == 0 else logging.debug  # Facts of the whole job.
  say("%s: %s params; %s", config.workload, f"{_count_params(state.params):,}", layout.describe())

  report_writer = _report_writer(
    config, workload, workdir, layout, first_step, started, trackers.names(config.trackers)
  )
  report_writer.restored_from(restored.describe())
  report_writer.first_report_also(  # Each start's shape: an elastic run changes it.
    process_count=layout.process_count,
    devices_per_process=layout.local_device_count,
    grad_accum_steps=config.grad_accum_steps,
  )
  stop_notice = preemption.Preemption()
  watchdog = watchdog_lib.StepWatchdog(
    step_timeout_seconds, f"process {layout.process_index}/{layout.process_count} "
  )
  if peers:
    peers.progress = lambda: (watchdog.last_completed_step, checkpoints.latest_step())
  eval_call = executor.map_eval(loss_fn)

  def evaluate(replicated_state) -> dict[str, float]:
    eval_host_batches = workload_lib.open_dataset(
      workload, config, "eval", layout.process_index, layout.process_count
    )
    if config.eval_batches:
      eval_host_batches = itertools.islice(eval_host_batches, config.eval_batches)
    eval_metrics = executor.to_devices(step.empty_metrics(["loss", *workload_metric_names]))
    in_flight = calls_in_flight.InFlight(config.max_calls_in_flight)
    for batch in data.eval_batches(
      eval_host_batches,
      example=example_batch,
      host_batch_size=layout.host_batch_size,
      process_count=layout.process_count,
      put=executor.batch_to_devices,
      check=functools.partial(
        workload_lib.check_batch,
        workload,
        "eval",
        rows=None,
        max_rows=layout.host_batch_size,
        like=example_batch,
      ),
    ):
      in_flight.wait_for_room()
      eval_metrics = eval_call(replicated_state, eval_metrics, batch)
      in_flight.add(eval_metrics)
    computed = executor.to_host(eval_metrics).compute()
    return {f"eval_{name}": value for name, value in computed.items()}

  replicated_state = executor.from_global(state)
  del state  # Its arrays now belong to the run's state, which each call donates.
  train_metric_set = step.MetricSet([*step.TRAIN_METRICS, *workload_metric_names])
  train_calls = functools.cache(  # The compiled call of each K (two at most: see `plan`).
    functools.partial(
      executor.map_train,
      metric_set=train_metric_set,
      loss_fn=loss_fn,
      tx=tx,
      schedule=optimizer.schedule(config),
      grad_accum_steps=config.grad_accum_steps,
      compute_dtype=config_lib.compute_dtype(config),
      skip_nonfinite=config.skip_nonfinite_steps,
    )
  )
  state_bytes = memory.state_bytes_per_device(replicated_state)
  say("train state: %.1f MB on the fullest device (%s)", state_bytes / 2**20, executor.describe())
  report_writer.first_report_also(state_bytes_per_device=state_bytes)
  no_train_metrics = executor.to_devices(train_metric_set.zeros)
  train_metrics = no_train_metrics
  in_flight = calls_in_flight.InFlight(config.max_calls_in_flight)
  preempted = saves_may_hang = False
  outcome = "FAILED"  # What the trackers' run ends as, unless the loop completes.
  settings = types.SimpleNamespace(**config.to_dict())  # A ConfigDict lookup costs ~2 µs a call.
  try:
    calls, last_step, compiled_lengths = 0, first_step, set()
    while last_step < settings.num_steps:
      calls += 1
      with jax.transfer_guard_device_to_host("disallow"):  # No host sync between reports.
        plan.call_starts()
        with report_writer.waiting_for_data():
          k, batches = next(train_batches, (plan.k_at(last_step), None))
        last_step += k
        if batches is None:
          raise UsageError(
            f"workload {config.workload}'s train dataset ended before step "
            f"{last_step}: dataset(config, 'train', ...) must be endless"
          )
        plan.data_ready()
        if k not in compiled_lengths:  # This call compiles (auto's K): not a stuck step.
          watchdog.pause()
          compiled_lengths.add(k)
        train_call = train_calls(steps_per_call=k)
        in_flight.wait_for_room()
        replicated_state, train_metrics = train_call(replicated_state, train_metrics, batches)
        in_flight.add(train_metrics)
        if calls == 1:
          jax.block_until_ready(train_metrics)
          report_writer.first_report_also(
            **memory.step_memory(train_call, replicated_state, train_metrics, batches)
          )
          report_writer.first_step_done(parts, last_step)
        watchdog.completed(last_step - k)
        report_writer.after_steps(last_step - k + 1, last_step)
        preempted = stop_notice.reached(calls)
        choice = plan.call_done(train_metrics)
        if choice:  # Once: a fixed K after the first call, auto's when chosen.
          report_writer.first_report_also(steps_per_call=choice.k)
          if plan.auto:
            say("steps_per_call=auto chose %d (%s)", choice.k, choice.why)

      due = _due(settings, last_step, preempted)
      if not any(due):
        continue
      watchdog.pause()
      # The fetch waits for the steps, and raises if a peer's collective failed (where
      # block_until_ready would wait on it for ever).
      train_vector = jax.device_get(executor.to_host(train_metrics))
      if due.report:
        report_writer.steps_finished()
      train_scalars = train_metric_set.compute(train_vector)
      if not config.skip_nonfinite_steps:
        _check_finite(last_step, train_scalars, checkpoints.latest_step())
      if due.save or due.local_save:
        jax.block_until_ready(replicated_state)  # Compute time is not checkpoint time.
        with report_writer.blocked_by_checkpoint():
          global_state = executor.to_global(replicated_state)
          if due.local_save:  # First: on a preemption notice it is the one sure to finish.
            local_tier.save(last_step, global_state, data_record)
          if due.save:
            data_position = {"step": last_step, **data_record}
            checkpoints.save(last_step, global_state, data_position)
      scalars = {}
      if due.evaluate:
        with report_writer.evaluating(scalars):
          scalars.update(evaluate(replicated_state))
      if due.report:  # After the save and eval, which its window times apart from the steps.
        scalars.update(train_scalars)
        scalars.update(report_writer.throughput(last_step))
        scalars["skipped_steps"] = executor.skipped_steps(replicated_state)
        train_metrics = no_train_metrics
      if scalars:
        report_writer.write(last_step, scalars)
      if preempted:
        break
      if last_step < settings.num_steps:  # The final save and the exit are not a train call.
        watchdog.completed(last_step)
    outcome = "KILLED" if preempted else "FINISHED"
  except jax.errors.JaxRuntimeError as e:
    if layout.process_count > 1 and watchdog_lib.is_peer_lost(e):
      watchdog_lib.exit_peer_lost(
        e,
        process=f"process {layout.process_index}/{layout.process_count}",
        last_step=watchdog.last_completed_step,
        last_checkpoint=checkpoints.latest_step(),
      )
    raise
  except UsageError:
    # Raised by one process alone (its host's data), the others wait in a collective: the saves
    # in flight get a bounded wait, then every process hears of it (watchdog.exit_bad_input).
    saves_may_hang = layout.process_count > 1
    raise
  except BaseException:
    # Raised here alone (a bug, a full disk under one process's append): the saves in flight
    # may wait for ever for another process, which waits in a collective for this one.
    saves_may_hang = layout.process_count > 1
    raise
  finally:
    watchdog.pause()
    if not storage.gave_up():  # Else nothing more can be written.
      _finish_writes(checkpoints, report_writer, saves_may_hang, outcome)
  if preempted:
    raise Preempted(
      f"stopped on a preemption notice after saving the checkpoint of step {last_step}"
    )
  if layout.process_index == 0:
    logging.info(
      "%s",
      writers.finished_line(
        config.num_steps, first_step, report_writer.last_scalars, time.time() - started, workdir
      ),
    )
  return executor.to_global(replicated_state)


def _finish_writes(checkpoints, report_writer, saves_may_hang: bool, outcome: str) -> None:
  """Completes the saves the run started, even when it is failing (they hold good states), for
  at most LAST_SAVES_GRACE_S when they may wait for a failed process; then the last reports,
  and the trackers' run ends as `outcome`."""
  if not saves_may_hang:
    with report_writer.blocked_by_checkpoint():
      checkpoints.wait()
    checkpoints.close()
  elif checkpoints.wait_at_most(LAST_SAVES_GRACE_S):
    checkpoints.close()
  report_writer.close(outcome)


@contextlib.contextmanager
def _timed(parts: dict[str, float], name: str):
  """Adds the seconds spent in the block to `parts[name]` (the start-up line's parts)."""
  start = time.time()
  yield
  parts[name] = parts.get(name, 0.0) + time.time() - start


def _build(config, workload):
  """The executor, the loss bound to the config, the optimizer, the state's initializer and its
  shapes in the executor's shardings (nothing computed yet)."""
  loss_fn = functools.partial(workload.loss, config)
  tx = optimizer.build(config)
  fresh = state_lib.initializer(
    config, workload.init, tx, functools.partial(workload_lib.check_params, workload)
  )
  with workload_lib.calling(workload, "init(config, rng)"):
    state_shapes = jax.eval_shape(fresh)
  partition = getattr(workload, "partition", None)
  executor = parallel.executor(
    config.parallel,
    state_shapes,
    mesh=config.mesh,
    axis_rules=config.axis_rules,
    partition=functools.partial(partition, config) if partition else None,
  )
  return (
    executor,
    loss_fn,
    tx,
    fresh,
    checkpoint_lib.target(state_shapes, executor.state_shardings),
  )


def _resume_or_start(config, workdir, layout, data_record, fresh, state_target, parts):
  """The run's persistent checkpoints, its local tier (None without config.local_checkpoint_dir),
  where the state came from (local_tier.Restored), and the state to start from as job-wide arrays
  in `state_target`'s shardings: the newest step the whole job can read from the local tier or
  this workdir's checkpoints (after checking its `data_record`, the settings that make the
  batches, against this run's), else `config.restore_from`, else a fresh state. Each array is
  created or read in its sharding; the time goes to `parts` "init" and "restore"."""
  with _timed(parts, "restore"):
    checkpoints = checkpoint_lib.Checkpoints(workdir, keep=config.keep_checkpoints)
    tier = local_tier_lib.open_tier(
      config, workdir, state_target, layout.process_index, layout.process_count
    )
    restored, state = local_tier_lib.restore_newest(
      tier, checkpoints, state_target, data_record, allow_data_change=config.allow_data_change
    )
    if restored.source == local_tier_lib.PERSISTENT:
      logging.info(
        "resuming from the checkpoint of step %d in %s", restored.step, checkpoints.directory
      )
    elif state is not None:
      logging.info("resuming from step %d of %s in %s", restored.step, restored.source, tier.root)
    if state is not None:
      return checkpoints, tier, restored, state
    if config.restore_from and not config.restore_params_only:
      state = checkpoint_lib.restore_from(config.restore_from, into=state_target, params_only=False)
      return checkpoints, tier, restored, state
  with _timed(parts, "init"):
    state = jax.jit(fresh, out_shardings=jax.tree.map(lambda x: x.sharding, state_target))()
  if config.restore_from:
    with _timed(parts, "restore"):
      state = state.replace(
        params=checkpoint_lib.restore_from(config.restore_from, into=state_target, params_only=True)
      )
  return checkpoints, tier, restored, state


def _open_train_data(config, workload, layout, loss_fn, state, executor, first_step, plan):
  """The first host batch (checked), (K, per-call device batches) from `first_step` on (K as
  `plan` says), and the names of the workload's metrics (its loss traced once on the first batch, rng None)."""
  host_batches = workload_lib.open_dataset(
    workload, config, "train", layout.process_index, layout.process_count, start=first_step
  )
  example_batch = next(host_batches, None)
  if example_batch is None:
    raise UsageError(
      f"workload {config.workload}'s train dataset yielded no batch: "
      "dataset(config, 'train', ...) must be endless"
    )
  check = functools.partial(
    workload_lib.check_batch, workload, "train", rows=layout.host_batch_size, like=example_batch
  )
  check(example_batch)
  with workload_lib.calling(workload, "loss(config, params, batch, rng=None)"):
    loss_shapes = jax.eval_shape(loss_fn, state.params, example_batch, None)
  metric_names = workload_lib.check_loss_output(workload, loss_shapes)
  train_batches = steps_per_call_lib.train_batches(
    itertools.chain([example_batch], host_batches),
    plan,
    put=executor.batch_to_devices,
    check=check,
    first_step=first_step,
  )
  return example_batch, train_batches, metric_names


def _check_eval_data(config, workload, layout) -> None:
  """An eval set with no batch at all, on any process, is a mistake to name before training."""
  first = next(
    workload_lib.open_dataset(workload, config, "eval", layout.process_index, layout.process_count),
    None,
  )
  if first is not None:
    workload_lib.check_batch(workload, "eval", first, rows=None, max_rows=layout.host_batch_size)
  if not data.any_process(first is not None, layout.process_count):
    raise UsageError(
      f"workload {config.workload}'s eval dataset is empty: dataset(config, "
      "'eval', ...) must yield at least one batch, or set "
      "--config.eval_every_steps=0 to train without eval"
    )


def _report_writer(
  config, workload, workdir, layout, first_step, started, tracker_names
) -> writers.ReportWriter:
  tokens_per_example = getattr(workload, "tokens_per_example", None)
  flops_per_example = getattr(workload, "flops_per_example", None)
  device_kind = jax.devices()[0].device_kind
  peak = writers.peak_flops_per_device(device_kind)
  if flops_per_example and not peak and jax.devices()[0].platform != "cpu":
    logging.info(
      "MFU is not reported: no bf16 peak is known for device kind %r "
      "(writers.PEAK_FLOPS_PER_DEVICE)",
      device_kind,
    )
  return writers.ReportWriter(
    workdir,
    process_index=layout.process_index,
    process_count=layout.process_count,
    first_step=first_step,
    num_steps=config.num_steps,
    examples_per_step=layout.global_batch_size,
    tokens_per_example=tokens_per_example(config) if tokens_per_example else None,
    flops_per_example=flops_per_example(config) if flops_per_example else None,
    peak_flops=peak * layout.global_device_count if peak else None,
    profile_first_step=config.profile_first_step,
    started=started,
    grad_accum_steps=config.grad_accum_steps,
    job=f"{cluster.describe()}; {layout.process_count} process(es), "
    f"{layout.global_device_count} devices",
    config_json=config.to_json(indent=2),
    tensorboard="tensorboard" in tracker_names,
    trackers=_trackers(config, workdir, layout, tracker_names),
  )


def _trackers(config, workdir, layout, tracker_names) -> list:
  """Process 0's MLflow and W&B writers, the config as their run's parameters; none elsewhere."""
  if layout.process_index != 0:
    return []
  return trackers.open_writers(
    tracker_names,
    workdir,
    experiment=config.experiment or config.workload,
    params=trackers.flatten(config),
  )


class Due(NamedTuple):
  """What the loop does after the call that ended at a step."""

  report: bool
  save: bool
  evaluate: bool
  local_save: bool


def _due(config, last_step: int, preempted: bool) -> Due:
  """Reports, saves and evals are due every so many steps and after the last step; a preemption
  notice makes a save (and a local tier's save) due at once."""
  final = last_step == config.num_steps

  def every(steps):
    return bool(steps) and last_step % steps == 0

  return Due(
    report=final or every(config.log_every_steps),
    save=final or preempted or every(config.checkpoint_every_steps),
    evaluate=bool(config.eval_every_steps) and (final or every(config.eval_every_steps)),
    local_save=bool(config.local_checkpoint_dir)
    and (preempted or every(config.local_checkpoint_every_steps)),
  )


def _say_already_finished(workdir, step_number: int, num_steps: int) -> None:
  """A workdir whose checkpoint reached config.num_steps: how to train on from it instead."""
  logging.info(
    "the run in %s already finished: its checkpoint is at step %d and config.num_steps is %d. "
    "To train on from it, raise --config.num_steps (e.g. --config.num_steps=%d); to see it: "
    "python -m launcher.report %s; a fresh run needs another --workdir",
    workdir,
    step_number,
    num_steps,
    2 * step_number,
    workdir,
  )


def _check_finite(step_number: int, train_scalars: dict, last_checkpoint: int | None) -> None:
  """Stops a diverged run before its state can be saved over a good checkpoint."""
  bad = {
    name: float(train_scalars[name])
    for name in ("loss", "grad_norm")
    if not math.isfinite(train_scalars[name])
  }
  if bad:
    kept = (
      f"the checkpoint of step {last_checkpoint} is kept"
      if last_checkpoint is not None
      else "no checkpoint was written"
    )
    raise NonFiniteError(
      f"training diverged: {bad} in the steps up to step {step_number}; {kept}. Lower the "
      "learning rate, clip gradients (--config.grad_clip_norm=1.0) or skip such steps "
      "(--config.skip_nonfinite_steps=True)"
    )


def _count_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
