"""Errors whose message is the whole story, and the exit codes a supervisor reads.

| code | meaning | a supervisor (launcher.local --max_restarts, the SLURM and TPU scripts) |
| ---: | --- | --- |
| 0 | the run finished | stops |
| 69 | remote storage (gs://) did not answer within --storage_timeout_seconds; nothing is lost beyond the last complete checkpoint | restarts |
| 2 | bad input (config, flags, storage, workload contract): the line says what to change | never restarts |
| 74 | the workdir's storage refused a write that a restart cannot fix (full, quota, read-only, no permission); the last complete checkpoint is kept | never restarts |
| 75 | stopped on a preemption notice with a checkpoint saved | restarts without counting it |
| 76 | another process of the job was lost (a collective failed), or process 0 could not be reached at the start | restarts |
| 77 | stuck: no train call finished within --step_timeout_seconds | restarts |
| 78 | out of memory (a device's or the host's) outside a restore: the line names what was asked for, what there is, and the config keys that reduce it | never restarts |
| other | a crash (1: a Python exception, the workload's own included; 128+N: killed by signal N) | restarts |
"""

EXIT_USAGE = 2
EXIT_STORAGE_UNREACHABLE = 69  # EX_UNAVAILABLE: the storage went away; a later start may find it.
EXIT_STORAGE = 74  # EX_IOERR: the storage refuses writes; a person has to make room or fix it.
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on a notice with the work saved; run it again.
EXIT_PEER_LOST = 76
EXIT_STUCK = 77
EXIT_OUT_OF_MEMORY = 78  # EX_CONFIG: the config does not fit the memory; a restart asks again.


class UsageError(Exception):
  """Bad input (config, flags, environment, workload): the message says what to change."""


class NonFiniteError(UsageError):
  """Training diverged: a loss or gradient norm was NaN or infinite."""


class WorkloadError(Exception):
  """The workload's own code raised: the message names the call, `__cause__` is the exception."""


class PeerUnreachable(Exception):
  """Another process of the job (the coordinator) could not be reached: a transient condition
  (it may be starting slowly, or restarting); exit with EXIT_PEER_LOST so that it is retried."""


class StorageUnreachable(Exception):
  """Remote storage did not answer within the bound: one line, exit EXIT_STORAGE_UNREACHABLE."""


class Preempted(Exception):
  """The job was told to stop and saved a checkpoint; exit with EXIT_PREEMPTED."""


class TransientError(Exception):
  """A condition of this machine that may pass (out of memory, too many open files, a stale
  file handle) outlasted its retries: one line, exit 1, which supervisors restart."""


def causes(error: BaseException | None):
  """`error` and each error it was raised from or while handling, outermost first."""
  while error is not None:
    yield error
    error = error.__cause__ or error.__context__


def innermost(error: BaseException) -> BaseException:
  """The error `error` was raised from, and so on down: the library's own word."""
  while error.__cause__ is not None:
    error = error.__cause__
  return error


def one_line(error: BaseException, limit: int = 300) -> str:
  """`Type: the first line of its message` (at most `limit` characters of it)."""
  return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:limit]}"
