"""Errors whose message is the whole story: the entry point prints it alone and exits."""

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on a notice with the work saved; run it again.


class UsageError(Exception):
  """Bad input (config, flags, environment, workload): the message says what to change."""


class NonFiniteError(UsageError):
  """Training diverged: a loss or gradient norm was NaN or infinite."""


class Preempted(Exception):
  """The job was told to stop and saved a checkpoint; exit with EXIT_PREEMPTED."""
