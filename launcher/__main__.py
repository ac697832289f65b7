"""`python -m launcher --config=configs/lm.py --workdir=/tmp/run`: flags in, `train.run` out."""

from launcher import preemption

preemption.install()  # First of all: a notice during start-up is kept, not fatal.

import os  # pylint: disable=wrong-import-position,wrong-import-order
import re
import sys
import time
import traceback

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from launcher import config as config_lib
from launcher import console
from launcher.errors import (
  EXIT_OUT_OF_MEMORY,
  EXIT_PEER_LOST,
  EXIT_PREEMPTED,
  EXIT_STORAGE,
  EXIT_STORAGE_UNREACHABLE,
  PeerUnreachable,
  Preempted,
  StorageUnreachable,
  TransientError,
  UsageError,
  WorkloadError,
  causes,
)

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Config file with get_config(), e.g. configs/lm.py or configs/lm.py:tiny; "
  "override any key with --config.KEY=VALUE.",
)
_WORKDIR = flags.DEFINE_string(
  "workdir",
  None,
  "Where the run writes config, metrics, checkpoints and logs: a local path, a "
  "path every host shares, or gs://bucket/path.",
)
_SHOW_CONFIG = flags.DEFINE_bool(
  "show_config", False, "Print every key of --config with its value and meaning, and exit."
)
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", None, "host:port of process 0, for a multi-process job given by hand."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.", lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer(
  "process_id", None, "This process's index in the job.", lower_bound=0
)
_LOCAL_DEVICE_IDS = flags.DEFINE_list(
  "local_device_ids", None, "Devices this process uses, e.g. 0,1,2,3 (default: all it sees)."
)
flags.register_validator(
  "local_device_ids",
  lambda ids: ids is None or all(i.strip().isdigit() for i in ids),
  "--local_device_ids takes device numbers, e.g. 0,1,2,3",
)
flags.register_validator(
  "local_device_ids",
  lambda ids: ids is None or len(set(ids)) == len(ids),
  "--local_device_ids names a device twice",
)
_ONE_PROCESS_PER = flags.DEFINE_enum(
  "one_process_per",
  "auto",
  ["auto", "node", "device"],
  "Under SLURM on GPUs: each task drives all GPUs of its node, or one GPU; auto picks `node` "
  "when a node runs one task.",
)
_INIT_TIMEOUT = flags.DEFINE_integer(
  "initialization_timeout", 300, "Seconds to wait for every process to join the job.", lower_bound=1
)
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
  "heartbeat_timeout_seconds",
  100,
  "Seconds without a heartbeat before a process counts as lost.",
  lower_bound=1,
)
_PEER_TIMEOUT = flags.DEFINE_float(
  "peer_timeout_seconds",
  20,
  "In a multi-process job, end this process (the lost-peer line, "
  "exit 76) when another process has shown no sign of life, or process 0's key-value store has "
  "not answered, for this long (jax's own --heartbeat_timeout_seconds ends it later, without "
  "the line).",
  lower_bound=2,
)
_STORAGE_TIMEOUT = flags.DEFINE_float(
  "storage_timeout_seconds",
  120,
  "How long remote (gs://) storage may stay silent (no bytes moved while a request waits on "
  "it), retries included, before the run ends (one line, exit 69, which supervisors restart); "
  "a save or restore that moves bytes is never cut.",
  lower_bound=1,
)
_STEP_TIMEOUT = flags.DEFINE_float(
  "step_timeout_seconds",
  600,
  "End this process (exit 77, every thread's stack in its log) when no train call finishes "
  "for this long; compilation, eval and checkpoint saves do not count. 0 disables.",
  lower_bound=0,
)


def main(argv):
  if len(argv) > 1:
    console.usage_error(f"unexpected arguments: {' '.join(argv[1:])}: flags start with --")
  if not flags.FLAGS["config"].present:
    console.usage_error("--config is required, e.g. --config=configs/lm.py:tiny")
  if not isinstance(_CONFIG.value, ml_collections.ConfigDict):
    console.usage_error(
      f"{flags.FLAGS['config'].config_filename}: get_config() returned a "
      f"{type(_CONFIG.value).__name__}; it must return an "
      "ml_collections.ConfigDict (start from launcher.config.defaults())"
    )
  if _SHOW_CONFIG.value:
    meanings = config_lib.file_comments(flags.FLAGS["config"].config_filename)
    print(config_lib.describe(_CONFIG.value, meanings))
    return
  if not _CONFIG.value.get("experiment", "x"):  # Trackers log under the config file's name.
    _CONFIG.value.experiment = os.path.splitext(
      os.path.basename(flags.FLAGS["config"].config_filename.split(":")[0])
    )[0]
  if not _WORKDIR.value:
    console.usage_error("--workdir is required: where the run writes, e.g. --workdir=/tmp/run")
  console.quiet_libraries()
  import jax  # pylint: disable=import-outside-toplevel

  from launcher import cluster, memory, storage, supervise, train, watchdog  # pylint: disable=import-outside-toplevel

  try:
    job = cluster.detect(
      coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
      local_device_ids=tuple(map(int, _LOCAL_DEVICE_IDS.value or ())) or None,
      one_process_per=_ONE_PROCESS_PER.value,
    )
    joining = time.time()
    cluster.initialize(
      job,
      initialization_timeout=_INIT_TIMEOUT.value,
      heartbeat_timeout_seconds=_HEARTBEAT_TIMEOUT.value,
    )
    preemption.joined(cluster.is_multiprocess())
    startup_parts = {"join the job": time.time() - joining}
    console.name_process(jax.process_index(), jax.process_count())
    if cluster.is_multiprocess() and jax.process_index() > 0 and cluster.coordinator_address():
      watchdog.end_with_line_on_abort(
        cluster.coordinator_address(), f"process {jax.process_index()}/{jax.process_count()}"
      )
    logging.info(cluster.describe())
    train.run(
      _CONFIG.value,
      _WORKDIR.value,
      step_timeout_seconds=_STEP_TIMEOUT.value,
      peer_timeout_seconds=_PEER_TIMEOUT.value,
      storage_timeout_seconds=_STORAGE_TIMEOUT.value,
      startup_parts=startup_parts,
    )
  except UsageError as e:
    if cluster.is_multiprocess() and cluster.coordination_client() is not None:
      watchdog.exit_bad_input(
        str(e), cluster.coordination_client(), jax.process_index(), jax.process_count()
      )
    console.usage_error(str(e))
  except PeerUnreachable as e:
    print(
      f"error: {e}; exiting with {EXIT_PEER_LOST} so that a supervisor tries again", file=sys.stderr
    )
    sys.exit(EXIT_PEER_LOST)
  except StorageUnreachable as e:  # Its line says what was given up on; jax's exit would wait.
    print(f"error: {e}", file=sys.stderr)
    sys.stderr.flush()
    os._exit(EXIT_STORAGE_UNREACHABLE)  # pylint: disable=protected-access
  except Preempted as e:
    logging.warning(
      "%s; exiting with %d: run the same command again to resume (a supervisor or a requeue "
      "does so by itself)",
      e,
      EXIT_PREEMPTED,
    )
    sys.exit(EXIT_PREEMPTED)
  except TransientError as e:  # Every process raises it; jax's exit would wait at a barrier.
    print(f"error: {e}", file=sys.stderr)
    sys.stderr.flush()
    os._exit(1)  # pylint: disable=protected-access
  except Exception as e:  # pylint: disable=broad-except
    refused = storage.refusal(e, _WORKDIR.value, supervise.last_checkpoint(_WORKDIR.value))
    if refused:  # A restart cannot make space: one line, and the code that says so.
      print(f"error: {refused}", file=sys.stderr)
      sys.stderr.flush()
      os._exit(EXIT_STORAGE)  # pylint: disable=protected-access
    if memory.is_out_of_memory(e):  # A restart would ask for the same memory again.
      print(
        f"error: {memory.describe_out_of_memory(e, _CONFIG.value)}; exiting with "
        f"{EXIT_OUT_OF_MEMORY}, which supervisors do not restart",
        file=sys.stderr,
      )
      sys.stderr.flush()
      os._exit(EXIT_OUT_OF_MEMORY)  # pylint: disable=protected-access
    if isinstance(e, WorkloadError):  # The user's code: its own traceback, headed by the call.
      print(f"error: {e}; its traceback:", file=sys.stderr)
      traceback.print_exception(e.__cause__, file=sys.stderr)
      sys.stderr.flush()
      os._exit(1)  # pylint: disable=protected-access
    if cluster.is_multiprocess() and any(watchdog.is_peer_lost(c) for c in causes(e)):
      watchdog.exit_peer_lost(  # Outside the loop: a restore, the final save.
        e,
        process=f"process {jax.process_index()}/{jax.process_count()}",
        last_step=supervise.last_step(_WORKDIR.value, jax.process_index()) or 0,
        last_checkpoint=supervise.last_checkpoint(_WORKDIR.value),
      )
    if not cluster.is_multiprocess():
      raise
    # jax's exit handler waits for every process at a barrier, and the others wait for this one
    # in their next collective: exit now, so that the job ends and a supervisor can restart it.
    traceback.print_exc()
    sys.stderr.flush()
    os._exit(1)  # pylint: disable=protected-access


def parse_flags(argv):
  """absl's flag parsing, with every mistake in a flag or the config file as one line."""
  if any(arg in ("--help", "-h", "--helpshort", "-?") for arg in argv[1:]):
    console.print_help(sys.modules[__name__])
    sys.exit(0)
  config_file = console.flag_value(argv[1:], "--config")
  try:
    if config_file:
      config_lib.check_file(config_file)
    return flags.FLAGS(argv)
  except UsageError as e:
    console.usage_error(str(e))
  except flags.Error as e:
    message = str(e)
    if "Error whilst parsing config file" in message:  # get_config raised: its last line says why.
      reason = [line for line in message.splitlines() if line.strip()][-1]
      message = f"--config={config_file}: get_config raised {reason}"
    elif "Unknown command line flag" in message:
      message = _config_key_hint(message, argv) or f"{message}: --help lists the launcher's flags"
    console.usage_error(message)
  except (AttributeError, KeyError) as e:
    while e.args and isinstance(e.args[0], BaseException):
      e = e.args[0]
    key, _, suggestion = str(e.args[0] if e.args else e).partition("\n")
    suggestion = re.sub(r'Did you mean "(\w+)".*', r" (did you mean \1?)", suggestion)
    console.usage_error(
      f"the config has no key {key}{suggestion}: overridable keys are the "
      "config file's (--show_config lists them); a new one belongs in its "
      "get_config()"
    )
  except Exception as e:  # pylint: disable=broad-except
    console.usage_error(f"--config={config_file}: loading it raised {type(e).__name__}: {e}")


def _config_key_hint(message: str, argv: list[str]) -> str | None:
  """absl's unknown-flag message, pointing at `--config.num_steps=100` when the flag is a key of
  the config; None when it is not."""
  name = re.search(r"Unknown command line flag '(\w+)'", message)
  config = _CONFIG.value if isinstance(_CONFIG.value, ml_collections.ConfigDict) else {}
  if not name or name[1] not in (*config_lib.KEYS, *config):
    return None
  key = name[1]
  value = console.flag_value(argv[1:], f"--{key}")
  if value is None or value.startswith("--"):  # A bare --remat.
    value = (
      "True" if isinstance(config.get(key, config_lib.KEYS.get(key, ("",))[0]), bool) else "VALUE"
    )
  return (
    f"Unknown command line flag '{key}': did you mean --config.{key}={value}? (a config key is "
    "set as --config.KEY=VALUE; --help lists the launcher's flags)"
  )


def entry():
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  entry()
