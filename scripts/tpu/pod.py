"""Runs the launcher on every worker of a Cloud TPU VM pod slice, as one job.

    python scripts/tpu/pod.py --tpu=my-v4-32 --zone=us-central2-b -- \
        --config=configs/lm.py --workdir=gs://my-bucket/run

1. copies this repository's committed HEAD (`git archive`) to ~/launcher on every worker and
   installs it with `[tpu]` (skip with --noinstall once done);
2. on every worker, ends stale users of the TPU (an earlier launcher, anything holding
   /dev/accel* or /dev/vfio/*) and removes a stale /tmp/libtpu_lockfile ("TPU in use");
3. starts the same launcher command on every worker at once (`--worker=i` each), each worker's
   output prefixed and kept in `--worker_logs/worker_<i>.log`; jax.distributed finds the slice's
   workers by itself;
4. when one worker fails, or on Ctrl-C, stops the launcher on every worker; with
   `--max_restarts=N`, then starts the job again, which resumes from its last checkpoint.

`--dry_run` prints every command it would run, and runs none.
"""

import os
import shlex
import subprocess
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from launcher import storage, supervise  # pylint: disable=wrong-import-position
from launcher.errors import UsageError  # pylint: disable=wrong-import-position
from launcher.supervise import ProcessGroup, workdir_of  # pylint: disable=wrong-import-position

_TPU = flags.DEFINE_string("tpu", None, "Name of the TPU VM (pod slice).", required=True)
_ZONE = flags.DEFINE_string("zone", None, "Its zone, e.g. us-central2-b.", required=True)
_PROJECT = flags.DEFINE_string("project", None, "GCP project (default: gcloud's).")
_NUM_WORKERS = flags.DEFINE_integer(
    "num_workers", None, "Workers in the slice (default: asked of `gcloud ... describe`).")
_INSTALL = flags.DEFINE_bool("install", True, "Copy the repository and pip install it with [tpu].")
_LOG_DIR = flags.DEFINE_string("worker_logs", "tpu-logs", "Where each worker's output is kept.")
_MAX_RESTARTS = flags.DEFINE_integer(
    "max_restarts", 0, "When a worker fails, stop the launcher on every worker and start the job "
    "again (it resumes from its last checkpoint) up to this many times; a preemption (exit 75) "
    "does not count, bad input (exit 2) never restarts.", lower_bound=0)
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print every command instead of running it.")

REMOTE_DIR = "~/launcher"
CLEANUP = ("pkill -9 -f '[p]ython3 -m launcher ' ; "
           "sudo fuser -k -9 /dev/accel* /dev/vfio/* 2>/dev/null ; "
           "sudo rm -f /tmp/libtpu_lockfile ; true")


def gcloud(*args: str) -> list[str]:
  project = [f"--project={_PROJECT.value}"] if _PROJECT.value else []
  return ["gcloud", "compute", "tpus", "tpu-vm", *args, f"--zone={_ZONE.value}", *project]


def ssh(worker: str, command: str) -> list[str]:
  return gcloud("ssh", _TPU.value, f"--worker={worker}", f"--command={command}")


def commands(launcher_args: list[str], num_workers: int) -> dict[str, list]:
  """Every command of a run, in order: setup on all workers, then one launcher per worker."""
  setup = []
  if _INSTALL.value:
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    archive = "/tmp/launcher-src.tar.gz"
    setup += [
        ["git", "-C", repo, "archive", "--format=tar.gz", f"--output={archive}", "HEAD"],
        gcloud("scp", "--worker=all", archive, f"{_TPU.value}:{archive}"),
        ssh("all", f"rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR} && "
                   f"tar -xzf {archive} -C {REMOTE_DIR} && cd {REMOTE_DIR} && "
                   "python3 -m pip install -q -e '.[tpu]'"),
    ]
  setup.append(ssh("all", CLEANUP))
  run = " ".join(shlex.quote(a) for a in launcher_args)
  workers = [ssh(str(i), f"cd {REMOTE_DIR} && python3 -m launcher {run}") for i in range(num_workers)]
  return {"setup": setup, "workers": workers, "stop": [ssh("all", CLEANUP)]}


def count_workers() -> int:
  describe = gcloud("describe", _TPU.value, "--format=value(networkEndpoints.len())")
  if _DRY_RUN.value:
    print(shlex.join(describe))
    if _NUM_WORKERS.value is None:
      raise app.UsageError("--dry_run cannot ask gcloud: pass --num_workers")
    return _NUM_WORKERS.value
  if _NUM_WORKERS.value:
    return _NUM_WORKERS.value
  return int(subprocess.run(describe, check=True, capture_output=True, text=True).stdout.strip())


def main(argv):
  launcher_args = argv[1:]
  if not launcher_args:
    raise app.UsageError("pass the launcher's arguments after --, e.g. -- --config=configs/lm.py "
                         "--workdir=gs://bucket/run")
  num_workers = count_workers()
  try:
    workdir = workdir_of(launcher_args)
    remote = storage.is_remote(storage.path(workdir))
  except UsageError as e:
    raise app.UsageError(str(e)) from None
  if num_workers > 1 and not remote:
    raise app.UsageError(
        f"--workdir={workdir} is a local path, but the workers of a {num_workers}-worker slice "
        "share no disk: each would keep its own checkpoints and the first save would hang. Use "
        "--workdir=gs://BUCKET/PATH (a bucket the TPU VM's service account can write).")
  plan = commands(launcher_args, num_workers)
  if _DRY_RUN.value:
    for step in ("setup", "workers", "stop"):
      print(f"# {step}")
      for command in plan[step]:
        print(shlex.join(command))
    return 0
  for command in plan["setup"]:
    print(f"[pod] {shlex.join(command)}", flush=True)
    subprocess.run(command, check=True)

  def stop_every_worker():
    print(f"[pod] stopping the launcher on every worker: {shlex.join(plan['stop'][0])}", flush=True)
    subprocess.run(plan["stop"][0], check=False)

  def start_job() -> ProcessGroup:
    return ProcessGroup(plan["workers"], log_dir=_LOG_DIR.value, name="worker", grace=10,
                        on_stop=stop_every_worker)

  # The workers' own logs name the step; this machine may have no access to the bucket.
  return supervise.supervise(start_job, workdir=None, max_restarts=_MAX_RESTARTS.value,
                             backoff_seconds=5.0, name="worker", prefix="[pod]")


if __name__ == "__main__":
  app.run(main)
