"""The workload contract, and the loader that finds a workload module from `config.workload`.

A workload module defines:

    init(config, rng) -> params
    loss(config, params, batch, rng) -> (scalar loss, dict of scalar metrics)
    dataset(config, split, process_index, process_count, start=0) -> iterator of dicts of numpy
        arrays; the train split's first batch is global batch `start` (a resumed run starts there;
        a dataset without `start` is read from the beginning and the first `start` batches skipped)
    tokens_per_example(config) -> int          # optional: the run reports tokens/s
"""

import importlib
import inspect
import itertools
import pkgutil
import types
from typing import Iterator

from absl import logging

from launcher.errors import UsageError

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
    except ModuleNotFoundError as e:
      # Only "this very module is missing" means keep looking; a missing dependency of the
      # workload itself is the user's real error and must surface as it is.
      if e.name not in _parents(candidate):
        raise
  if module is None:
    raise UsageError(
        f"config.workload={name!r} is not a workload: it is neither under workloads/ "
        f"({', '.join(available())}) nor an importable module. For your own module, put its "
        f"folder on PYTHONPATH.")
  missing = [f for f in REQUIRED if not callable(getattr(module, f, None))]
  if missing:
    raise UsageError(f"workload module {module.__name__} ({module.__file__}) does not define "
                     f"{', '.join(missing)}: a workload defines init, loss and dataset.")
  return module


def _parents(dotted: str) -> set[str]:
  parts = dotted.split(".")
  return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def open_dataset(module: types.ModuleType, config, split: str, process_index: int,
                 process_count: int, start: int = 0) -> Iterator[dict]:
  """The workload's batches from global batch `start` on: sought directly when its `dataset`
  takes `start`, else read and skipped."""
  if "start" in inspect.signature(module.dataset).parameters:
    return module.dataset(config, split, process_index, process_count, start=start)
  batches = module.dataset(config, split, process_index, process_count)
  if start:
    logging.warning("%s.dataset has no `start` argument: reading and skipping %d batches to "
                    "resume; give it one to seek directly", module.__name__, start)
  return itertools.islice(batches, start, None)
