"""The classifier with one slow host: from global train batch `slow_from_batch` on, the last
process's batches take `slow_seconds` each (tests/hooked_config.py's keys), the others' are as
fast as ever. Its input pipeline holds the others back: a straggler for `launcher.report`."""

import time

from workloads import classifier

init = classifier.init
loss = classifier.loss


def dataset(config, split, process_index, process_count, start=0):
  batches = classifier.dataset(config, split, process_index, process_count, start=start)
  for index, batch in enumerate(batches, start):
    if split == "train" and process_index == process_count - 1 and index >= config.slow_from_batch:
      time.sleep(config.slow_seconds)
    yield batch
