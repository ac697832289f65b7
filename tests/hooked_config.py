"""configs/classifier.py, small and fast, running tests/hooked_workload.py."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs"))
import classifier as classifier_config  # pylint: disable=wrong-import-position


def get_config():
  config = classifier_config.get_config()
  config.workload = "tests.hooked_workload"
  config.hidden_sizes = (64,)
  config.batch_size = 64
  config.num_steps = 40
  config.schedule = "constant"
  config.log_every_steps = 1
  config.eval_every_steps = 0
  config.checkpoint_every_steps = 20
  config.slow_from_batch = 1 << 30
  config.slow_seconds = 0.5
  config.trace_seconds = 0.0
  config.nan_at_batch = -1
  config.fault = ""  # "raise", "usage" or "block"
  config.fault_at_batch = -1
  config.fault_process = -1
  config.fault_marker = ""
  return config
