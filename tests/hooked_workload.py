"""The classifier with faults a test can switch on from the config: slow, poisoned, failing or
blocking batches.

`slow_from_batch`: train batches from this global batch on take `slow_seconds` each, so a test can
kill the run at a known point. `trace_seconds`: each trace of the loss takes that long, as a large
model's compile does. `nan_at_batch`: that global train batch is all NaN.
`fault` ("raise", "usage": a UsageError, or "block") at global train batch `fault_at_batch`, on
process `fault_process` (-1: every process); with `fault_marker` set, only while that file does not exist (the fault
creates it), so a restarted job runs clean.
"""

import math
import os
import time

from launcher.errors import UsageError
from workloads import classifier

init = classifier.init


def loss(config, params, batch, rng):
  time.sleep(config.trace_seconds)  # Python runs once per trace, not per step.
  return classifier.loss(config, params, batch, rng)


def dataset(config, split, process_index, process_count, start=0):
  batches = classifier.dataset(config, split, process_index, process_count, start=start)
  for index, batch in enumerate(batches, start):
    if split == "train" and index == config.nan_at_batch:
      batch = {**batch, "image": batch["image"] * math.nan}
    if split == "train" and index >= config.slow_from_batch:
      time.sleep(config.slow_seconds)
    if split == "train" and index == config.fault_at_batch and _fault_armed(config, process_index):
      if config.fault == "raise":
        raise RuntimeError(f"hooked workload: a fault at batch {index}")
      if config.fault == "usage":
        raise UsageError(f"hooked workload: config.fault_at_batch={index} cannot be read here")
      _block_forever()
    yield batch


def _fault_armed(config, process_index: int) -> bool:
  if config.fault_process not in (-1, process_index):
    return False
  if config.fault_marker:
    if os.path.exists(config.fault_marker):
      return False
    with open(config.fault_marker, "w") as f:
      f.write(f"process {process_index}\n")
  return True


def _block_forever():
  """A data loader stuck on a dead network filesystem: alive, silent, never returning."""
  while True:
    time.sleep(3600)
