"""The workload contract, and the loader that finds a workload module from `config.workload`.

A workload module defines:

    init(config, rng) -> params
    loss(config, params, batch, rng) -> (scalar loss, dict of scalar metrics)
    dataset(config, split, process_index, process_count, start=0) -> iterator of dicts of numpy
        arrays; the train split's first batch is global batch `start` (a resumed run starts there;
        a dataset without `start` is read from the beginning and the first `start` batches skipped)
    tokens_per_example(config) -> int          # optional: the run reports tokens/s
    flops_per_example(config) -> float         # optional: model FLOP/s and MFU
    partition(config, params) -> names per param  # optional: logical dimension names (fsdp)
    DATA_KEYS = ("seq_len", ...)               # optional: the config keys that change the batches

A checkpoint records the values of DATA_KEYS (with the seed and the global batch size), and a
resume whose values differ is refused (config.allow_data_change goes on deliberately).
A module that breaks the contract is a UsageError naming what to change; an exception raised by
the workload's own code is a WorkloadError that says which of its functions raised.
"""

import contextlib
import importlib
import inspect
import itertools
import pkgutil
import types
from collections.abc import Iterator
from typing import Any

import numpy as np
from absl import logging

from launcher.errors import UsageError, WorkloadError

# Each function with the arguments the launcher passes it.
SIGNATURES = {
  "init": ("config", "rng"),
  "loss": ("config", "params", "batch", "rng"),
  "dataset": ("config", "split", "process_index", "process_count"),
  "tokens_per_example": ("config",),
  "flops_per_example": ("config",),
  "partition": ("config", "params"),
}
REQUIRED = ("init", "loss", "dataset")


def available() -> list[str]:
  """Names of the workloads shipped under workloads/."""
  import workloads  # pylint: disable=import-outside-toplevel

  return sorted(m.name for m in pkgutil.iter_modules(workloads.__path__))


def load(name: str) -> types.ModuleType:
  """Imports `workloads.<name>`, else the module `name` from PYTHONPATH, and checks the contract."""
  module = None
  for candidate in (f"workloads.{name}", name):
    try:
      module = importlib.import_module(candidate)
      break
    except Exception as e:  # pylint: disable=broad-except
      # Only "this very module is missing" means keep looking; anything else, a missing
      # dependency of the workload included, is the user's real error and surfaces as it is.
      if isinstance(e, ModuleNotFoundError) and e.name in _parents(candidate):
        continue
      raise WorkloadError(
        f"importing workload module {candidate} raised {type(e).__name__}: {e}"
      ) from e
  if module is None:
    raise UsageError(
      f"config.workload={name!r} is not a workload: it is neither under workloads/ "
      f"({', '.join(available())}) nor an importable module. For your own module, put its "
      f"folder on PYTHONPATH."
    )
  missing = [f for f in REQUIRED if not callable(getattr(module, f, None))]
  if missing:
    raise UsageError(
      f"workload module {module.__name__} ({module.__file__}) does not define "
      f"{', '.join(missing)}: a workload defines init, loss and dataset."
    )
  for function, arguments in SIGNATURES.items():
    if hasattr(module, function):
      _check_signature(module, function, arguments)
  data_keys = getattr(module, "DATA_KEYS", ())
  if not isinstance(data_keys, (tuple, list)) or not all(isinstance(k, str) for k in data_keys):
    raise UsageError(
      f"workload {module.__name__}'s DATA_KEYS is {data_keys!r}: make it a tuple of the names "
      'of the config keys that change its batches, e.g. DATA_KEYS = ("seq_len",)'
    )
  return module


def check_data_keys(module: types.ModuleType, config) -> None:
  """Every name in the workload's DATA_KEYS is a key of the config (a misspelt one would leave
  that setting unguarded on resume)."""
  unknown = [key for key in getattr(module, "DATA_KEYS", ()) if key not in config]
  if unknown:
    raise UsageError(
      f"workload {module.__name__}'s DATA_KEYS names {', '.join(unknown)}, which the config "
      "does not have: name the config keys its dataset reads, or add them to get_config()"
    )


def _check_signature(module: types.ModuleType, function: str, arguments: tuple[str, ...]) -> None:
  """A function the launcher could not call as `function(*arguments)` is one line naming both."""
  try:
    signature = inspect.signature(getattr(module, function))
  except (TypeError, ValueError):
    return
  try:
    signature.bind(*arguments)
  except TypeError:
    raise UsageError(
      f"workload {module.__name__}'s {function}{signature} cannot be called as "
      f"{function}({', '.join(arguments)}): give it those arguments, in that "
      "order"
    ) from None


@contextlib.contextmanager
def calling(module: types.ModuleType, call: str):
  """Turns an exception raised inside the workload's own code (not a contract check) into a
  WorkloadError that names the call, with the original as its cause."""
  try:
    yield
  except (UsageError, WorkloadError):
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise WorkloadError(
      f"workload {module.__name__}'s {call} raised {type(e).__name__}: {e}"
    ) from e


def check_params(module: types.ModuleType, params: Any) -> None:
  """`init` must return a pytree of float arrays (they are differentiated and updated); `params`
  may be traced (state.create calls this inside its trace of `init`)."""
  import jax  # pylint: disable=import-outside-toplevel

  where = f"workload {module.__name__}'s init"
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  not_arrays = [
    f"{jax.tree_util.keystr(path)} is a {type(leaf).__name__}"
    for path, leaf in leaves
    if not isinstance(leaf, (jax.Array, np.ndarray))
  ]
  if not_arrays or not leaves:
    raise UsageError(
      f"{where} must return a pytree (e.g. a dict) of float arrays; "
      f"{', '.join(not_arrays[:5]) or 'it returned none'}: make each leaf an "
      "array, e.g. jnp.zeros(shape)"
    )
  not_float = [
    f"{jax.tree_util.keystr(path)} is {leaf.dtype}"
    for path, leaf in leaves
    if not jax.numpy.issubdtype(leaf.dtype, jax.numpy.floating)  # bfloat16 too, unlike numpy's
  ]
  if not_float:
    raise UsageError(
      f"{where} returned params that are not float arrays "
      f"({', '.join(not_float[:5])}): they are differentiated, so keep integer "
      "values in the config or the batch"
    )
  empty = [f"{jax.tree_util.keystr(path)} {leaf.shape}" for path, leaf in leaves if not leaf.size]
  if empty:
    raise UsageError(
      f"{where} returned params of zero size ({', '.join(empty[:5])}): they hold nothing to "
      "train and a checkpoint cannot save them (orbax refuses empty arrays); drop them"
    )


def check_loss_output(module: types.ModuleType, output: Any) -> list[str]:
  """The metric names of `loss`'s (shapes of) output, after checking it is (scalar, {name: scalar})."""
  where = f"workload {module.__name__}'s loss"
  if not (isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], dict)):
    raise UsageError(
      f"{where} must return (loss, metrics), a scalar and a dict of scalars; it "
      f"returned {type(output).__name__}: return e.g. `loss, {{}}`"
    )
  loss_value, metrics = output
  problems = [] if np.shape(loss_value) == () else [f"the loss has shape {np.shape(loss_value)}"]
  problems += [
    f"metric {name!r} has shape {np.shape(value)}"
    for name, value in metrics.items()
    if np.shape(value) != ()
  ]
  if problems:
    raise UsageError(
      f"{where} must return scalars, averaged over the batch it sees: "
      f"{'; '.join(problems)}. Take their mean (e.g. jnp.mean) before returning"
    )
  return list(metrics)


def check_batch(
  module: types.ModuleType,
  split: str,
  batch: Any,
  rows: int | None,
  max_rows: int | None = None,
  like: dict | None = None,
  number: int | None = None,
) -> None:
  """A batch is a non-empty dict of arrays with `rows` rows each (or at most `max_rows`), and,
  given `like` (the first train batch), its keys and each entry's per-row shape and dtype."""
  where = f"workload {module.__name__}'s dataset(config, {split!r}, ...)"
  if not isinstance(batch, dict) or not batch:
    raise UsageError(
      f"{where} yielded a {type(batch).__name__}: a batch is a non-empty dict of "
      "numpy arrays, e.g. {'x': x, 'y': y}"
    )
  if like is not None:
    _check_like(where, batch, like, number)
  for name, x in batch.items():
    shape = np.shape(x)
    if not shape:
      raise UsageError(
        f"{where} yielded {name!r} without a batch dimension (shape {shape}): "
        "every entry has one row per example"
      )
    too_many = max_rows is not None and shape[0] > max_rows
    if (rows is not None and shape[0] != rows) or too_many:
      wanted = rows if rows is not None else f"at most {max_rows}"
      raise UsageError(
        f"{where} yielded {shape[0]} rows in {name!r}, but this process's share of "
        f"config.batch_size is {wanted} rows: a batch holds config.batch_size // process_count "
        "rows (the process's slice of the global batch)"
      )


def _check_like(where: str, batch: dict, like: dict, number: int | None) -> None:
  """Every batch has the first train batch's keys, per-row shapes and dtypes: the step was
  compiled for them."""
  which = f"batch {number}" if number is not None else "a batch"
  if sorted(batch) != sorted(like):
    raise UsageError(
      f"{where} yielded {which} with keys {sorted(batch)}, but the first train "
      f"batch had {sorted(like)}: every batch has the same keys"
    )
  for name, x in batch.items():
    got = (tuple(np.shape(x)[1:]), np.asarray(x).dtype)
    first = (tuple(np.shape(like[name])[1:]), np.asarray(like[name]).dtype)
    if got != first:
      raise UsageError(
        f"{where} yielded {which} whose {name!r} has rows of shape {got[0]} and "
        f"dtype {got[1]}, but the first train batch's had {first[0]} and "
        f"{first[1]}: every batch has the same per-row shapes and dtypes"
      )


def _parents(dotted: str) -> set[str]:
  parts = dotted.split(".")
  return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def open_dataset(
  module: types.ModuleType,
  config,
  split: str,
  process_index: int,
  process_count: int,
  start: int = 0,
) -> Iterator[dict]:
  """The workload's batches from global batch `start` on: sought directly when its `dataset`
  takes `start`, else read and skipped. An exception from the workload's code names the call."""
  call = f"dataset(config, {split!r}, {process_index}, {process_count})"
  with calling(module, call):
    if "start" in inspect.signature(module.dataset).parameters:
      batches = module.dataset(config, split, process_index, process_count, start=start)
    else:
      batches = module.dataset(config, split, process_index, process_count)
      if start:
        logging.warning(
          "%s.dataset has no `start` argument: reading and skipping %d batches to "
          "resume; give it one to seek directly",
          module.__name__,
          start,
        )
        batches = itertools.islice(batches, start, None)
  try:
    batches = iter(batches)
  except TypeError:
    raise UsageError(
      f"workload {module.__name__}'s {call} returned a "
      f"{type(batches).__name__}: it must return an iterator of batches (e.g. be "
      "a generator that yields dicts of numpy arrays)"
    ) from None
  return _named_errors(module, call, batches)


def _named_errors(module: types.ModuleType, call: str, batches: Iterator[dict]) -> Iterator[dict]:
  while True:
    with calling(module, f"iterator from {call}"):
      batch = next(batches, None)
    if batch is None:
      return
    yield batch
