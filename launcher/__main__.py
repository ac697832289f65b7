"""`python -m launcher --config=configs/lm.py --workdir=/tmp/run`: flags in, `train.run` out."""

import os
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from launcher import cluster, train
from launcher.errors import EXIT_PREEMPTED, EXIT_USAGE, Preempted, UsageError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file with get_config(), e.g. configs/lm.py or configs/lm.py:tiny; "
    "override any key with --config.KEY=VALUE.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the run writes config, metrics and logs.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for a multi-process job given by hand.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in the job.")
_LOCAL_DEVICE_IDS = flags.DEFINE_list(
    "local_device_ids", None, "Devices this process uses, e.g. 0,1,2,3 (default: all it sees).")
_ONE_PROCESS_PER = flags.DEFINE_enum(
    "one_process_per", "auto", ["auto", "node", "device"],
    "Under SLURM on GPUs: each task drives all GPUs of its node, or one GPU; auto picks `node` "
    "when a node runs one task.")
_INIT_TIMEOUT = flags.DEFINE_integer(
    "initialization_timeout", 300, "Seconds to wait for every process to join the job.")
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout_seconds", 100, "Seconds without a heartbeat before a process counts as lost.")
_STEP_TIMEOUT = flags.DEFINE_float(
    "step_timeout_seconds", 600,
    "End this process (exit 77, every thread's stack in its log) when no train call finishes "
    "for this long; compilation, eval and checkpoint saves do not count. 0 disables.",
    lower_bound=0)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    job = cluster.detect(
        coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value,
        local_device_ids=tuple(map(int, _LOCAL_DEVICE_IDS.value or ())) or None,
        one_process_per=_ONE_PROCESS_PER.value)
    cluster.initialize(job, initialization_timeout=_INIT_TIMEOUT.value,
                       heartbeat_timeout_seconds=_HEARTBEAT_TIMEOUT.value)
    logging.info(cluster.describe())
    train.run(_CONFIG.value, _WORKDIR.value, step_timeout_seconds=_STEP_TIMEOUT.value)
  except UsageError as e:
    _usage_error(str(e))
  except Preempted as e:
    logging.warning("%s; exiting with %d so that a requeue restarts the job", e, EXIT_PREEMPTED)
    sys.exit(EXIT_PREEMPTED)
  except Exception:  # pylint: disable=broad-except
    if not cluster.is_multiprocess():
      raise
    # jax's exit handler waits for every process at a barrier, and the others wait for this one
    # in their next collective: exit now, so that the job ends and a supervisor can restart it.
    traceback.print_exc()
    sys.stderr.flush()
    os._exit(1)  # pylint: disable=protected-access


def _usage_error(message: str) -> None:
  """Bad input: one message, and the exit code that tells a supervisor not to restart."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(EXIT_USAGE)


def parse_flags(argv):
  """absl's flag parsing, but an override of a key the config lacks is one line, not a traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _usage_error(f"{e}\nPass --helpfull to see every flag.")
  except (AttributeError, KeyError) as e:
    while e.args and isinstance(e.args[0], BaseException):
      e = e.args[0]
    reason = str(e.args[0] if e.args else e).strip("'").replace("\\n", " ").replace("\n", " ")
    _usage_error(f"the config has no key {reason}. Overridable keys are the config file's; "
                 "a new one belongs in its get_config().")


def entry():
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  entry()
