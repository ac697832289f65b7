"""The one exception type for input a user must fix; the entry point prints its message alone."""


class UsageError(Exception):
  """Bad input (config, flags, environment, workload): the message says what to change."""
