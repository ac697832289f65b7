"""Launcher config keys with their defaults, the checks on them, and the batch layout they imply."""

import ast
import dataclasses
import math
import os
import re

import ml_collections

from launcher.errors import UsageError

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
EXECUTORS = ("shard_map", "pmap", "fsdp")
COMPUTE_DTYPES = ("float32", "bfloat16")
SCHEDULES = ("constant", "warmup_cosine")
AUTO = "auto"  # config.steps_per_call chosen by the run (launcher/steps_per_call.py).
MAX_STEPS = 2**31 - 1  # The train state counts steps in an int32.


# Every key the launcher reads: its default and what it means (the README's reference and
# `python -m launcher --config=FILE --show_config` print these).
KEYS = {
  "workload": ("", "a module under workloads/, or any importable module (my_pkg.my_workload)"),
  "seed": (0, "parameter init, dropout and the data order; a resume must keep it"),
  "batch_size": (
    256,
    "the global batch, split evenly over processes, then over each process's "
    "devices: a multiple of the device count (times grad_accum_steps); a resume "
    "must keep it",
  ),
  "num_steps": (
    1000,
    "optimizer updates in the run (at most 2**31 - 1: the step counter is an int32); a multiple "
    "of steps_per_call",
  ),
  "steps_per_call": (
    1,
    "K updates inside one compiled call (lax.scan over K stacked batches; at most num_steps), or "
    '"auto": chosen from the first calls\' timings (docs/performance.md)',
  ),
  "max_calls_in_flight": (
    2,
    "compiled calls dispatched but not finished (CPU collectives abort when too many queue up)",
  ),
  "parallel": (
    "shard_map",
    "the executor: shard_map (jit(shard_map) over a Mesh of every "
    "device), pmap, or fsdp (the train state sharded over every device); same "
    "results",
  ),
  "mesh": (
    "",
    "under parallel=fsdp, the device mesh as data:D,fsdp:F,tensor:T (one of them may be -1: "
    "the devices left; tensor divides each process's device count): the state is split over "
    "fsdp (and over tensor where a workload names its dimensions), copied over data, the "
    'batch split over data and fsdp; "" = fsdp over each process\'s devices, data across '
    "processes",
  ),
  "axis_rules": (
    "",
    "under parallel=fsdp, logical axis name -> mesh axes, e.g. mlp:tensor,embed:fsdp,vocab:none "
    "(axes joined by +); each pair replaces that name's default (batch:data+fsdp, embed:fsdp, "
    "heads, kv, mlp, vocab:tensor, length and layers:none; docs/sharding.md)",
  ),
  "grad_accum_steps": (
    1,
    "M microbatches per step (lax.scan), gradients averaged; must divide the per-device batch",
  ),
  "compute_dtype": (
    "float32",
    "the dtype the loss computes in: float32 (the default: no casts), or bfloat16 (the "
    "launcher casts params and float inputs; a workload builds its layers with this dtype); "
    "params, gradients and optimizer state stay float32 either way. float16 is refused: it "
    "needs loss scaling",
  ),
  "compilation_cache_dir": (
    "",
    'persistent compilation cache: "" = ~/.cache/launcher/jax '
    "(or $XDG_CACHE_HOME), a path, or none",
  ),
  "optimizer": ("adamw", "sgd, momentum, adam or adamw (optax)"),
  "learning_rate": (1e-3, "peak learning rate; positive"),
  "schedule": (
    "constant",
    "constant, or warmup_cosine: linear warmup over warmup_steps from 0, "
    "cosine decay to 0 at num_steps",
  ),
  "warmup_steps": (0, "for warmup_cosine; below num_steps"),
  "momentum": (0.9, "for the momentum optimizer (adam(w) use optax's b1/b2)"),
  "weight_decay": (0.0, "for adamw"),
  "grad_clip_norm": (0.0, "clip gradients to this global norm; 0 disables"),
  "log_every_steps": (
    100,
    "steps between reports (metrics leave the devices only then); a multiple of steps_per_call",
  ),
  "eval_every_steps": (
    1000,
    "steps between evals, and after the last step; 0 disables eval; a multiple of steps_per_call",
  ),
  "eval_batches": (0, "0: the whole eval split; n: its first n global batches"),
  "profile_first_step": (
    0,
    "process 0 traces 5 steps from this step (TensorBoard's profile plugin); 0 disables",
  ),
  "checkpoint_every_steps": (
    1000,
    "steps between checkpoints (one is also saved after the last "
    "step and on a preemption notice); 0: only those; a multiple of "
    "steps_per_call",
  ),
  "keep_checkpoints": (3, "newest checkpoints kept"),
  "local_checkpoint_dir": (
    "",
    "a directory on each host (a RAM disk such as /dev/shm/launcher, or a local NVMe path) "
    "where every process also keeps its own shards of the state and a copy of one peer's, "
    "restored first; '': no local tier",
  ),
  "local_checkpoint_every_steps": (
    0,
    "steps between saves to config.local_checkpoint_dir (also on a preemption notice); "
    "a multiple of steps_per_call",
  ),
  "restore_from": (
    "",
    "another run's workdir, checkpoints dir or step dir to start from "
    "(ignored when this workdir has checkpoints: then the run resumes)",
  ),
  "restore_params_only": (
    True,
    "with restore_from: only the params (fresh optimizer, step 0), or everything",
  ),
  "allow_data_change": (
    False,
    "let a resume go on when the settings that make the batches (seed, batch_size, the "
    "workload's DATA_KEYS) differ from the checkpoint's, with a warning: the run's batches "
    "change from there",
  ),
  "data_workers": (
    0,
    "worker processes that read and transform the train records of a "
    "workload that reads through launcher.data.from_source (the lm with "
    "config.data); 0: in the main process; never changes the batches",
  ),
  "trackers": (
    "tensorboard",
    "where process 0 also logs each report: a comma-separated list "
    "of tensorboard, mlflow (MLFLOW_TRACKING_URI), wandb (WANDB_* variables), or "
    "none; mlflow and wandb are extras (pip install -e '.[mlflow]')",
  ),
  "experiment": (
    "",
    "the MLflow experiment (W&B project, unless WANDB_PROJECT is set) the run "
    'is logged under; "": the config file\'s name',
  ),
  "skip_nonfinite_steps": (
    False,
    "a step with a NaN/Inf loss or gradient norm leaves the state "
    "unchanged and is counted in skipped_steps, instead of stopping the "
    "run",
  ),
}


def defaults() -> ml_collections.ConfigDict:
  """Every key the launcher reads; a config file starts here and adds its workload's keys."""
  config = ml_collections.ConfigDict({key: default for key, (default, _) in KEYS.items()})
  # An int or "auto", from a config file or the command line (parsed as a Python literal).
  config.steps_per_call = ml_collections.FieldReference(1, field_type=object)
  return config


def check(config: ml_collections.ConfigDict) -> None:
  """Raises one UsageError listing every bad value, each with what to change."""
  problems = _wrong_types(config)
  if problems:
    raise _bad_config(problems)

  def need(ok, message):
    if not ok:
      problems.append(message)

  need(
    isinstance(config.workload, str) and config.workload,
    "config.workload is empty: set it to a module under workloads/ (e.g. --config.workload=lm) "
    "or to any importable module",
  )
  auto = config.steps_per_call == AUTO
  for key in (
    "batch_size",
    "num_steps",
    *(() if auto else ("steps_per_call",)),
    "max_calls_in_flight",
    "log_every_steps",
    "keep_checkpoints",
    "grad_accum_steps",
  ):
    need(config[key] >= 1, f"config.{key}={config[key]} must be a positive integer")
  for key in (
    "eval_every_steps",
    "eval_batches",
    "warmup_steps",
    "profile_first_step",
    "checkpoint_every_steps",
    "data_workers",
  ):
    need(config[key] >= 0, f"config.{key}={config[key]} must be 0 or more")
  for key in (  # steps_per_call: at most num_steps (below).
    "num_steps",
    "log_every_steps",
    "eval_every_steps",
    "checkpoint_every_steps",
    "local_checkpoint_every_steps",
    "warmup_steps",
    "profile_first_step",
  ):
    need(
      config[key] <= MAX_STEPS,
      f"config.{key}={config[key]} is more steps than a run counts (its step counter is an "
      f"int32): use at most {MAX_STEPS}",
    )
  need(
    math.isfinite(config.learning_rate) and config.learning_rate > 0,
    f"config.learning_rate={config.learning_rate} must be a positive finite number (e.g. 3e-4)",
  )
  need(
    config.optimizer in OPTIMIZERS,
    f"config.optimizer={config.optimizer!r} is not one of {', '.join(OPTIMIZERS)}",
  )
  need(
    config.schedule in SCHEDULES,
    f"config.schedule={config.schedule!r} is not one of {', '.join(SCHEDULES)}",
  )
  need(
    config.schedule != "warmup_cosine" or config.warmup_steps < config.num_steps,
    f"config.warmup_steps={config.warmup_steps} must be below config.num_steps={config.num_steps}",
  )
  need(
    config.parallel in EXECUTORS,
    f"config.parallel={config.parallel!r} is not one of {', '.join(EXECUTORS)}",
  )
  if config.mesh:
    try:
      parse_mesh(config.mesh)
      need(
        config.parallel == "fsdp",
        f"config.mesh={config.mesh!r} splits the train state, "
        f"which only parallel=fsdp does: add --config.parallel=fsdp, or leave config.mesh "
        f"empty under parallel={config.parallel}",
      )
    except UsageError as e:
      problems.append(str(e))
  if config.axis_rules:
    try:
      parse_axis_rules(config.axis_rules)
      need(
        config.parallel == "fsdp",
        f"config.axis_rules={config.axis_rules!r} says how parallel=fsdp splits arrays: add "
        f"--config.parallel=fsdp, or leave config.axis_rules empty under "
        f"parallel={config.parallel}",
      )
    except UsageError as e:
      problems.append(str(e))
  try:
    from launcher import trackers  # pylint: disable=import-outside-toplevel  # Brings jax.

    trackers.names(config.trackers)
  except UsageError as e:
    problems.append(str(e))
  if config.compute_dtype == "float16":
    problems.append(
      "config.compute_dtype='float16' would train without loss scaling, so small "
      "gradients underflow to zero: use bfloat16 (float32's range, the same speed "
      "on GPUs and TPUs)"
    )
  else:
    need(
      config.compute_dtype in COMPUTE_DTYPES,
      f"config.compute_dtype={config.compute_dtype!r} is not one of {', '.join(COMPUTE_DTYPES)}",
    )
  need(
    config.grad_clip_norm >= 0, f"config.grad_clip_norm={config.grad_clip_norm} must be 0 or more"
  )
  need(config.weight_decay >= 0, f"config.weight_decay={config.weight_decay} must be 0 or more")
  need(0 <= config.momentum < 1, f"config.momentum={config.momentum} must be in [0, 1), e.g. 0.9")
  need(config.seed >= 0, f"config.seed={config.seed} must be 0 or more")
  need(
    config.local_checkpoint_every_steps >= 0,
    f"config.local_checkpoint_every_steps={config.local_checkpoint_every_steps} must be 0 or more",
  )
  need(
    config.local_checkpoint_every_steps < 0
    or bool(config.local_checkpoint_dir) == (config.local_checkpoint_every_steps > 0),
    "config.local_checkpoint_dir and config.local_checkpoint_every_steps go together: set both "
    "(e.g. --config.local_checkpoint_dir=/dev/shm/launcher "
    "--config.local_checkpoint_every_steps=100) or neither",
  )
  k = config.steps_per_call
  if not auto and 1 <= config.num_steps < k:
    problems.append(
      f"config.steps_per_call={k} is more than config.num_steps={config.num_steps}: a call runs "
      f"steps_per_call steps, so use at most {config.num_steps} (or auto)"
    )
  elif not auto and 1 <= k <= MAX_STEPS:
    for key in (
      "num_steps",
      "log_every_steps",
      "eval_every_steps",
      "checkpoint_every_steps",
      "local_checkpoint_every_steps",
    ):
      value = config[key]
      if value > 0 and value % k:
        lower, upper = (value // k) * k, (value // k + 1) * k
        nearest = " or ".join(str(v) for v in (lower, upper) if v > 0)
        problems.append(
          f"config.{key}={value} is not a multiple of config.steps_per_call={k}: "
          f"steps happen {k} per call, so use {nearest}"
        )
  if problems:
    raise _bad_config(problems)


def _bad_config(problems: list[str]) -> UsageError:
  if len(problems) == 1:
    return UsageError(problems[0])
  return UsageError(f"{len(problems)} bad config values:\n  " + "\n  ".join(problems))


def _wrong_types(config: ml_collections.ConfigDict) -> list[str]:
  """A message for every launcher key whose value is not of its default's type (an int is a float)."""
  problems = []
  for key, (default, _) in KEYS.items():
    if key not in config:
      problems.append(f"config.{key} is missing: start the config from launcher.config.defaults()")
      continue
    value, wanted = config[key], type(default)
    if key == "steps_per_call" and value == AUTO:
      continue
    ok = isinstance(value, wanted) and (wanted is bool or not isinstance(value, bool))
    if wanted is float and isinstance(value, int) and not isinstance(value, bool):
      ok = True
    if not ok:
      also = f' or "{AUTO}"' if key == "steps_per_call" else ""
      article = "an" if wanted.__name__[0] in "aeiou" else "a"
      problems.append(
        f"config.{key}={value!r} is a {type(value).__name__}: it must be {article} "
        f"{wanted.__name__}{also} (default {default!r})"
      )
  return problems


def describe(config: ml_collections.ConfigDict, meanings: dict[str, str]) -> str:
  """Every key of `config` with its value and meaning: the launcher's keys, then the config file's
  own (`meanings`: their comments in the file)."""
  rows = [(key, repr(config[key]), KEYS[key][1]) for key in KEYS if key in config]
  own = [(key, repr(config[key]), meanings.get(key, "")) for key in config if key not in KEYS]
  width = max(len(key) + len(value) + 3 for key, value, _ in rows + own)

  def lines(rows):
    return [f"{f'{key} = {value}':<{width}}  {meaning}".rstrip() for key, value, meaning in rows]

  return "\n".join(
    [
      "# the launcher's keys",
      *lines(rows),
      "# the workload's keys (from the config file)",
      *lines(own),
    ]
  )


def check_file(config_file: str) -> None:
  """`--config=PATH[:VARIANT]` names a readable Python file that defines get_config()."""
  path = config_file.split(":", 1)[0]
  if not os.path.isfile(path):
    raise UsageError(
      f"--config={config_file}: there is no file {path!r} (relative to "
      f"{os.getcwd()}): give a config file's path, e.g. configs/lm.py:tiny"
    )
  with open(path) as f:
    source = f.read()
  try:
    tree = ast.parse(source, path)
  except SyntaxError as e:
    raise UsageError(
      f"--config={config_file}: {path} line {e.lineno}: {e.msg}: fix the file's Python syntax"
    ) from None
  if not any(isinstance(node, ast.FunctionDef) and node.name == "get_config" for node in tree.body):
    raise UsageError(
      f"--config={config_file}: {path} defines no get_config(): a config file "
      "defines get_config() returning launcher.config.defaults() plus its own keys"
    )


def file_comments(config_file: str) -> dict[str, str]:
  """The trailing comments of `config.KEY = ...` lines in a config file: its keys' meanings."""
  path = config_file.split(":", 1)[0]
  try:
    with open(path) as f:
      source = f.read()
  except OSError:
    return {}
  return {
    m.group(1): m.group(2).strip()
    for m in re.finditer(r"^\s*config\.(\w+)\s*=[^#\n]*#\s*(.+)$", source, re.MULTILINE)
  }


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where this process sits in the job, and how the global batch splits over it."""

  process_index: int
  process_count: int
  local_device_count: int
  global_batch_size: int
  host_batch_size: int
  per_device_batch_size: int
  batch_copies: int = 1
  """The devices that hold the same rows (a tensor group when the `batch` rule leaves tensor out)."""

  @property
  def global_device_count(self) -> int:
    return self.process_count * self.local_device_count

  def describe(self) -> str:
    """ "global batch 64 = 1 process(es) x 8 devices / tensor:4 x 32 per device (...)"."""
    copies = (
      f" / tensor:{self.batch_copies}" * (self.batch_copies > 1),
      " (a tensor group holds the same rows)" * (self.batch_copies > 1),
    )
    return (
      f"global batch {self.global_batch_size} = {self.process_count} process(es) x "
      f"{self.local_device_count} devices{copies[0]} x {self.per_device_batch_size} per device"
      f"{copies[1]}"
    )


MESH_AXES = ("data", "fsdp", "tensor")


def parse_mesh(mesh: str) -> dict[str, int]:
  """`config.mesh` ("data:2,fsdp:4,tensor:1", one size may be -1) as {axis: size}, every axis
  present (a missing one is 1)."""
  shape = {}
  for part in mesh.split(","):
    name, _, size = part.strip().partition(":")
    if name not in MESH_AXES or name in shape or not re.fullmatch(r"-1|[1-9]\d*", size.strip()):
      raise UsageError(
        f"config.mesh={mesh!r} is not a mesh: write axis:size pairs of the axes "
        f"{', '.join(MESH_AXES)}, each once, each size positive or -1 for the "
        "devices left (one axis at most), e.g. --config.mesh=data:2,fsdp:4 or "
        "--config.mesh=data:1,fsdp:2,tensor:4"
      )
    shape[name] = int(size)
  if list(shape.values()).count(-1) > 1:
    raise UsageError(
      f"config.mesh={mesh!r}: -1 stands for the devices left, so only one axis "
      "may have it, e.g. --config.mesh=data:2,fsdp:-1"
    )
  return {name: shape.get(name, 1) for name in MESH_AXES}


def mesh_shape(
  mesh: str, parallel: str, process_count: int, local_device_count: int
) -> dict[str, int] | None:
  """`config.mesh` as {"data": D, "fsdp": F, "tensor": T} with D * F * T the job's devices (None
  when the executor takes no mesh); "" is fsdp over each process's devices and data across
  processes. A tensor group stays inside a process: T divides its device count."""
  if parallel != "fsdp":
    return None
  if not mesh:
    return {"data": process_count, "fsdp": local_device_count, "tensor": 1}
  device_count = process_count * local_device_count
  shape = parse_mesh(mesh)
  known = math.prod(size for size in shape.values() if size != -1)
  if -1 in shape.values() and device_count % known == 0:
    shape = {name: device_count // known if size == -1 else size for name, size in shape.items()}
  if math.prod(shape.values()) != device_count:
    raise UsageError(
      f"config.mesh={mesh!r} does not fit the job's {device_count} devices ({process_count} "
      f"process(es) x {local_device_count} devices): make data x fsdp x tensor = "
      f"{device_count}, e.g. --config.mesh=data:{process_count},fsdp:{local_device_count} "
      "(fsdp within each process, the default)"
    )
  if local_device_count % shape["tensor"]:
    sizes = [t for t in range(1, local_device_count + 1) if local_device_count % t == 0]
    raise UsageError(
      f"config.mesh={mesh!r}: tensor:{shape['tensor']} would span processes (each has "
      f"{local_device_count} devices), and a tensor group's collectives run in every layer: "
      f"use a tensor size that divides {local_device_count} ({', '.join(map(str, sizes))})"
    )
  return shape


# config.axis_rules' defaults: logical axis name -> mesh axes (docs/sharding.md).
AXIS_RULES = {
  "batch": ("data", "fsdp"),
  "length": (),
  "layers": (),
  "embed": ("fsdp",),
  "heads": ("tensor",),
  "kv": ("tensor",),
  "mlp": ("tensor",),
  "vocab": ("tensor",),
}


def parse_axis_rules(rules: str) -> dict[str, tuple[str, ...]]:
  """`config.axis_rules` ("mlp:tensor,vocab:none,embed:fsdp+tensor") over the defaults
  (AXIS_RULES): {logical name: mesh axes}, () for whole."""
  parsed = dict(AXIS_RULES)
  given = set()
  for part in filter(None, (p.strip() for p in rules.split(","))):
    name, colon, axes = (s.strip() for s in part.partition(":"))
    axes = () if axes == "none" else tuple(axes.split("+"))
    if (
      not colon
      or not re.fullmatch(r"[A-Za-z_]\w*", name)
      or name in MESH_AXES
      or name in given
      or any(axis not in MESH_AXES for axis in axes)
      or len(set(axes)) < len(axes)
    ):
      raise UsageError(
        f"config.axis_rules={rules!r}: {part!r} is not a rule: write name:axes pairs, each "
        f"name once and not itself a mesh axis, axes from {', '.join(MESH_AXES)} joined by + "
        "or none, e.g. --config.axis_rules=mlp:tensor,vocab:none"
      )
    given.add(name)
    parsed[name] = axes
  if not {"data", "fsdp"} <= set(parsed["batch"]):
    raise UsageError(
      f"config.axis_rules={rules!r}: batch:{'+'.join(parsed['batch']) or 'none'} leaves "
      "the batch whole over data or fsdp, where each device must take its own examples: "
      "keep both, e.g. batch:data+fsdp"
    )
  return parsed


def compute_dtype(config: ml_collections.ConfigDict):
  """The dtype the loss computes in, or None for float32 (no casts at all)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  return None if config.compute_dtype == "float32" else jnp.dtype(config.compute_dtype)


def layout(
  batch_size: int,
  process_index: int,
  process_count: int,
  local_device_count: int,
  grad_accum_steps: int = 1,
  batch_copies: int = 1,
) -> Layout:
  """Splits a global batch over processes and their devices, each row on `batch_copies` devices
  of a process (`batch_copies()`), or says which sizes would split."""
  splits = local_device_count // batch_copies
  device_count = process_count * splits
  devices = f"{device_count} devices ({process_count} process(es) x {local_device_count} local"
  devices += (
    f" devices / tensor:{batch_copies}: a tensor group holds the same rows)"
    if batch_copies > 1
    else " devices)"
  )
  if batch_size % device_count:
    lower = (batch_size // device_count) * device_count
    upper = lower + device_count
    nearest = " or ".join(str(v) for v in (lower, upper) if v > 0)
    raise UsageError(
      f"config.batch_size={batch_size} does not divide over {devices}: "
      f"use a multiple of {device_count}, e.g. {nearest}"
    )
  host_batch_size = batch_size // process_count
  per_device = host_batch_size // splits
  if per_device % grad_accum_steps:
    raise UsageError(
      f"config.grad_accum_steps={grad_accum_steps} does not divide the per-device batch of "
      f"{per_device} (config.batch_size={batch_size} over {devices}): use a "
      f"batch size that is a multiple of {device_count * grad_accum_steps}, or fewer steps"
    )
  return Layout(
    process_index=process_index,
    process_count=process_count,
    local_device_count=local_device_count,
    global_batch_size=batch_size,
    host_batch_size=host_batch_size,
    per_device_batch_size=per_device,
    batch_copies=batch_copies,
  )


def batch_copies(config: ml_collections.ConfigDict, process_count: int, local_device_count: int):
  """How many devices hold each row of a batch: under fsdp the tensor size when the `batch` rule
  of config.axis_rules leaves tensor out (a tensor group computes on the same rows), else 1."""
  shape = mesh_shape(config.mesh, config.parallel, process_count, local_device_count)
  if shape is None or "tensor" in parse_axis_rules(config.axis_rules)["batch"]:
    return 1
  return shape["tensor"]


def mesh_fits(mesh: str, parallel: str, process_count: int, local_device_count: int) -> bool:
  """Whether `config.mesh` fits a job of `process_count` processes (mesh_shape's check): which
  counts an elastic job may shrink to."""
  try:
    mesh_shape(mesh, parallel, process_count, local_device_count)
  except UsageError:
    return False
  return True


def microbatches_to_keep(batch_size: int, device_count: int, microbatch_size: int) -> int | None:
  """The fewest microbatches (grad_accum_steps) that split the per-device batch of `batch_size`
  over `device_count` devices into equal microbatches of at most `microbatch_size` examples: an
  elastic restart's accumulation, so a device never holds more than it did. None when the batch
  does not divide over the devices or no count keeps the bound."""
  if batch_size % device_count:
    return None
  per_device = batch_size // device_count
  return next(
    (
      count
      for count in range(1, per_device + 1)
      if per_device % count == 0 and per_device // count <= microbatch_size
    ),
    None,
  )
