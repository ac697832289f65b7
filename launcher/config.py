"""Launcher config keys with their defaults, the checks on them, and the batch layout they imply."""

import dataclasses
import math

import jax.numpy as jnp
import ml_collections

from launcher.errors import UsageError

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
EXECUTORS = ("pmap", "shard_map", "fsdp")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
SCHEDULES = ("constant", "warmup_cosine")


def defaults() -> ml_collections.ConfigDict:
  """Every key the launcher reads; a config file starts here and adds its workload's keys."""
  config = ml_collections.ConfigDict()
  config.workload = ""  # A name under workloads/, or any importable module.
  config.seed = 0
  config.batch_size = 256  # Global: summed over every device of every process.
  config.num_steps = 1000
  config.steps_per_call = 1  # K optimizer steps inside one compiled call (lax.scan).
  config.max_calls_in_flight = 2  # Dispatched calls not yet finished; CPU collectives need a bound.
  config.parallel = "pmap"  # Or "shard_map" (jit(shard_map) over a Mesh), or "fsdp" (state sharded).
  config.grad_accum_steps = 1  # M microbatches per step (lax.scan), gradients averaged.
  config.compute_dtype = "float32"  # Or bfloat16 / float16 for the loss; params stay float32.
  config.compilation_cache_dir = ""  # "": ~/.cache/launcher/jax (XDG_CACHE_HOME); "none": off.
  config.optimizer = "adamw"
  config.learning_rate = 1e-3
  config.schedule = "constant"
  config.warmup_steps = 0
  config.momentum = 0.9  # For `momentum`; adam(w) uses optax's b1/b2.
  config.weight_decay = 0.0  # For `adamw`.
  config.grad_clip_norm = 0.0  # 0 disables clipping.
  config.log_every_steps = 100
  config.eval_every_steps = 1000  # 0 disables eval; eval also runs after the last step.
  config.eval_batches = 0  # 0: the whole eval split; n: its first n global batches.
  config.profile_first_step = 0  # Process 0 traces a few steps from this step on; 0 disables.
  config.checkpoint_every_steps = 1000  # 0: only after the last step (and on preemption).
  config.keep_checkpoints = 3
  config.restore_from = ""  # Another run's workdir or checkpoint: start from its state.
  config.restore_params_only = True  # With restore_from: params only (fresh optimizer, step 0).
  config.skip_nonfinite_steps = False  # True: a step with a non-finite loss or gradient is skipped.
  return config


def check(config: ml_collections.ConfigDict) -> None:
  """Raises one UsageError listing every bad value, each with what to change."""
  problems = []

  def need(ok, message):
    if not ok:
      problems.append(message)

  need(isinstance(config.workload, str) and config.workload,
       "config.workload is empty: set it to a module under workloads/ (e.g. --config.workload=lm) "
       "or to any importable module")
  for key in ("batch_size", "num_steps", "steps_per_call", "max_calls_in_flight", "log_every_steps",
              "keep_checkpoints", "grad_accum_steps"):
    need(config[key] >= 1, f"config.{key}={config[key]} must be a positive integer")
  for key in ("eval_every_steps", "eval_batches", "warmup_steps", "profile_first_step",
              "checkpoint_every_steps"):
    need(config[key] >= 0, f"config.{key}={config[key]} must be 0 or more")
  need(math.isfinite(config.learning_rate) and config.learning_rate > 0,
       f"config.learning_rate={config.learning_rate} must be a positive finite number (e.g. 3e-4)")
  need(config.optimizer in OPTIMIZERS,
       f"config.optimizer={config.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
  need(config.schedule in SCHEDULES,
       f"config.schedule={config.schedule!r} is not one of {', '.join(SCHEDULES)}")
  need(config.schedule != "warmup_cosine" or config.warmup_steps < config.num_steps,
       f"config.warmup_steps={config.warmup_steps} must be below config.num_steps={config.num_steps}")
  need(config.parallel in EXECUTORS,
       f"config.parallel={config.parallel!r} is not one of {', '.join(EXECUTORS)}")
  need(config.compute_dtype in COMPUTE_DTYPES,
       f"config.compute_dtype={config.compute_dtype!r} is not one of {', '.join(COMPUTE_DTYPES)}")
  need(config.grad_clip_norm >= 0, f"config.grad_clip_norm={config.grad_clip_norm} must be 0 or more")
  k = config.steps_per_call
  if k >= 1:
    for key in ("num_steps", "log_every_steps", "eval_every_steps", "checkpoint_every_steps"):
      value = config[key]
      if value > 0 and value % k:
        lower, upper = (value // k) * k, (value // k + 1) * k
        nearest = " or ".join(str(v) for v in (lower, upper) if v > 0)
        problems.append(f"config.{key}={value} is not a multiple of config.steps_per_call={k}: "
                        f"steps happen {k} per call, so use {nearest}")
  if problems:
    raise UsageError("bad config:\n  " + "\n  ".join(problems))


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where this process sits in the job, and how the global batch splits over it."""
  process_index: int
  process_count: int
  local_device_count: int
  global_batch_size: int
  host_batch_size: int
  per_device_batch_size: int

  @property
  def global_device_count(self) -> int:
    return self.process_count * self.local_device_count


def compute_dtype(config: ml_collections.ConfigDict):
  """The dtype the loss computes in, or None for float32 (no casts at all)."""
  return None if config.compute_dtype == "float32" else jnp.dtype(config.compute_dtype)


def layout(batch_size: int, process_index: int, process_count: int,
           local_device_count: int, grad_accum_steps: int = 1) -> Layout:
  """Splits a global batch over processes and their devices, or says which sizes would split."""
  device_count = process_count * local_device_count
  if batch_size % device_count:
    lower = (batch_size // device_count) * device_count
    upper = lower + device_count
    nearest = " or ".join(str(v) for v in (lower, upper) if v > 0)
    raise UsageError(
        f"config.batch_size={batch_size} does not divide over {device_count} devices "
        f"({process_count} process(es) x {local_device_count} local devices): "
        f"use a multiple of {device_count}, e.g. {nearest}")
  host_batch_size = batch_size // process_count
  per_device = host_batch_size // local_device_count
  if per_device % grad_accum_steps:
    raise UsageError(
        f"config.grad_accum_steps={grad_accum_steps} does not divide the per-device batch of "
        f"{per_device} (config.batch_size={batch_size} over {device_count} devices): use a "
        f"batch size that is a multiple of {device_count * grad_accum_steps}, or fewer steps")
  return Layout(process_index=process_index, process_count=process_count,
                local_device_count=local_device_count, global_batch_size=batch_size,
                host_batch_size=host_batch_size,
                per_device_batch_size=host_batch_size // local_device_count)
