"""The classifier with faults a test can switch on from the config: slow or poisoned batches.

`slow_from_batch`: train batches from this global batch on take `slow_seconds` each, so a test can
kill the run at a known point. `nan_at_batch`: that global train batch is all NaN.
"""

import math
import time

from workloads import classifier

init = classifier.init
loss = classifier.loss


def dataset(config, split, process_index, process_count, start=0):
  batches = classifier.dataset(config, split, process_index, process_count, start=start)
  for index, batch in enumerate(batches, start):
    if split == "train" and index == config.nan_at_batch:
      batch = {**batch, "image": batch["image"] * math.nan}
    if split == "train" and index >= config.slow_from_batch:
      time.sleep(config.slow_seconds)
    yield batch
