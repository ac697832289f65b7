"""A distributed training launcher for JAX: one command from a laptop to a TPU pod slice."""

import time

IMPORTED_AT = (
  time.time()
)  # The first line of the launcher a process runs: start-up is timed from here.
