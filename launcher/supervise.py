"""Restarts a failed job from its last checkpoint: the supervisor of `launcher.local
--max_restarts` and `scripts/tpu/pod.py --max_restarts`. It talks to the job only through exit
codes (launcher/errors.py) and the workdir (the last reported step, the last checkpoint).
"""

import json
import signal
import sys
import time
from typing import Callable

from launcher import storage
from launcher.errors import EXIT_PREEMPTED, EXIT_USAGE

MAX_BACKOFF_S = 60.0


def describe_exit(code: int) -> str:
  """`exited with 1`, or `was killed by SIGKILL` for a negative Popen code."""
  return f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with {code}"


def shell_code(code: int) -> int:
  """A Popen return code as a shell reports it: 128 + N for a process killed by signal N."""
  return 128 - code if code < 0 else code


def last_step(workdir: str | None, process: int) -> int | None:
  """The last step process `process` reported in WORKDIR/hosts/process_<i>.jsonl, if readable."""
  if workdir is None:
    return None
  try:
    text = storage.read_text(storage.path(workdir) / "hosts" / f"process_{process}.jsonl")
  except Exception:  # pylint: disable=broad-except  # Only for a log line.
    return None
  steps = []
  for line in (text or "").splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    steps.append(record.get("step", record.get("first_step")))
  steps = [s for s in steps if s is not None]
  return steps[-1] if steps else None


def last_checkpoint(workdir: str | None) -> int | None:
  """The newest step orbax finished writing in WORKDIR/checkpoints (local, shared or gs://)."""
  if workdir is None:
    return None
  try:
    checkpoints = storage.path(workdir) / "checkpoints"
    if not checkpoints.exists():
      return None
    complete = [int(p.name) for p in checkpoints.iterdir() if p.name.isdigit() and (
        not storage.is_remote(p) or (p / "commit_success.txt").exists())]
  except Exception:  # pylint: disable=broad-except  # Only for a log line.
    return None
  return max(complete, default=None)


def supervise(start_job: Callable[[], "ProcessGroup"], *, workdir: str | None, max_restarts: int,
              backoff_seconds: float, name: str = "process", prefix: str = "[local]") -> int:
  """Runs the job until it succeeds; restarts it after a failure at most `max_restarts` times.

  A preemption exit (75) restarts without counting; bad input (2) never restarts. Each restart
  is one line (with the step and checkpoint read from `workdir`, when given); when the restarts run out, a summary of the first failure, and its exit code.
  """
  current = {}

  def stop(signum, frame):
    del frame
    print(f"{prefix} {signal.Signals(signum).name}: stopping every {name}", flush=True)
    if current:
      current["group"].stop()
    sys.exit(128 + signum)

  signal.signal(signal.SIGINT, stop)
  signal.signal(signal.SIGTERM, stop)
  restarts, first_failure = 0, None
  while True:
    current["group"] = start_job()
    code = current["group"].wait()
    if code == 0:
      print(f"{prefix} the job finished" + (f" after {restarts} restart(s)" if restarts else ""),
            flush=True)
      return 0
    process, raw = current["group"].first_failure
    step = last_step(workdir, process)
    failure = (f"{name} {process} {describe_exit(raw)}"
               f"{f' at step {step}' if step is not None else ' before its first step'}")
    if code == EXIT_USAGE:
      print(f"{prefix} {failure}: bad input, which a restart cannot fix; not restarting",
            flush=True)
      return code
    if code == EXIT_PREEMPTED and max_restarts:
      print(f"{prefix} {failure} (preempted); restarting without counting it", flush=True)
      continue
    first_failure = first_failure or (failure, code)
    if restarts >= max_restarts:
      if max_restarts:
        print(f"{prefix} giving up after {restarts} restart(s); the first failure: "
              f"{first_failure[0]}; the last: {failure}", flush=True)
      else:
        print(f"{prefix} {failure}; no restart asked (--max_restarts=0)", flush=True)
      return first_failure[1]
    restarts += 1
    checkpoint = last_checkpoint(workdir)
    resume = ("its last checkpoint" if workdir is None else f"checkpoint {checkpoint}"
              if checkpoint is not None else "the start (no checkpoint yet)")
    print(f"{prefix} restart {restarts}/{max_restarts} after {failure}; resuming from {resume}",
          flush=True)
    time.sleep(min(backoff_seconds * 2 ** (restarts - 1), MAX_BACKOFF_S))
