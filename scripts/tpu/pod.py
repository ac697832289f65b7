"""Runs the launcher on every worker of a Cloud TPU VM pod slice, as one job.

    python scripts/tpu/pod.py --tpu=my-v4-32 --zone=us-central2-b -- \
        --config=configs/lm.py --workdir=gs://my-bucket/run

1. copies this repository as it is (its committed HEAD plus uncommitted changes to tracked
   files, through `git archive`) to ~/launcher on every worker, and installs it with its `[tpu]`
   extra into a virtualenv of its own, ~/launcher-venv, made by `uv` with Python 3.11: the images
   Cloud TPU recommends for JAX (tpu-ubuntu2204-base, v2-alpha-tpuv5-lite, v2-alpha-tpuv5,
   v2-alpha-tpuv6e) are Ubuntu 22.04, whose python3 (3.10) is too old for jax. `uv` comes from the
   image's pip; uv finds a Python 3.11 on the worker or downloads one. `--worker_python=PATH`
   installs into an interpreter of yours instead. A worker that has this very source installed
   skips the install; `--noinstall` skips the copy too;
2. on every worker, ends stale users of the TPU (an earlier launcher of this interpreter, anything
   holding /dev/accel* or /dev/vfio/*) and removes a stale /tmp/libtpu_lockfile ("TPU in use");
3. starts the same launcher command on every worker at once (`--worker=i` each), each worker's
   output prefixed and kept in `--worker_logs/worker_<i>.log`; jax.distributed finds the slice's
   workers by itself;
4. when one worker fails, or on Ctrl-C, stops the launcher on every worker; with
   `--max_restarts=N`, then starts the job again, which resumes from its last checkpoint. A
   single slice cannot shrink (its topology is fixed): a lost worker restarts it in place, on
   every worker, never on fewer (docs/elastic.md).

`--dry_run` prints every command it would run, and runs none.
"""

import os
import re
import shlex
import subprocess
import sys

from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
from launcher import console, storage, supervise  # pylint: disable=wrong-import-position
from launcher.errors import UsageError  # pylint: disable=wrong-import-position
from launcher.supervise import ProcessGroup, workdir_of  # pylint: disable=wrong-import-position

_TPU = flags.DEFINE_string("tpu", None, "Name of the TPU VM (pod slice).", required=True)
_ZONE = flags.DEFINE_string("zone", None, "Its zone, e.g. us-central2-b.", required=True)
_PROJECT = flags.DEFINE_string("project", None, "GCP project (default: gcloud's).")
_NUM_WORKERS = flags.DEFINE_integer(
  "num_workers", None, "Workers in the slice (default: asked of `gcloud ... describe`)."
)
_INSTALL = flags.DEFINE_bool(
  "install",
  True,
  "Copy the repository to the workers and install it "
  "(skipped on a worker that has this very source installed).",
)
_PYTHON = flags.DEFINE_string(
  "python", "3.11", "The Python version of the workers' virtualenv (uv's --python)."
)
_WORKER_VENV = flags.DEFINE_string(
  "worker_venv", "~/launcher-venv", "Where the workers' virtualenv is made."
)
_WORKER_PYTHON = flags.DEFINE_string(
  "worker_python",
  None,
  "An interpreter already on every worker (Python >= 3.11, e.g. "
  "~/my-env/bin/python): the project is installed into it with its pip, and no virtualenv is "
  "made.",
)
_EXTRAS = flags.DEFINE_string(
  "extras",
  "tpu",
  "The project's extras installed on the workers (comma-separated; empty for none).",
)
_LOG_DIR = flags.DEFINE_string("worker_logs", "tpu-logs", "Where each worker's output is kept.")
_MAX_RESTARTS = flags.DEFINE_integer(
  "max_restarts",
  0,
  "When a worker fails, stop the launcher on every worker and start the job "
  "again (it resumes from its last checkpoint) up to this many times; a preemption (exit 75) "
  "does not count; bad input (exit 2), storage that refuses writes (74) and out of memory (78) "
  "never restart.",
  lower_bound=0,
)
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print every command instead of running it.")

REMOTE_DIR = "~/launcher"
ARCHIVE = "launcher-src.tar.gz"  # In /tmp here, in the home directory on the workers.


def gcloud(*args: str) -> list[str]:
  project = [f"--project={_PROJECT.value}"] if _PROJECT.value else []
  return ["gcloud", "compute", "tpus", "tpu-vm", *args, f"--zone={_ZONE.value}", *project]


def ssh(worker: str, command: str) -> list[str]:
  return gcloud("ssh", _TPU.value, f"--worker={worker}", f"--command={command}")


def _on_worker(path: str) -> str:
  """`path` for a worker's shell: a leading ~ expanded there, the rest quoted."""
  if path.startswith("~/"):
    return f'"$HOME"/{shlex.quote(path[2:])}'
  return shlex.quote(path)


def worker_python() -> str:
  """The interpreter that runs the launcher on the workers, as their shell reads it."""
  return _on_worker(_WORKER_PYTHON.value or f"{_WORKER_VENV.value.rstrip('/')}/bin/python")


def source_tree() -> tuple[str, str]:
  """What to copy (a commit of the working tree as it is) and its tree hash, which names an
  install: a worker whose ~/launcher/.installed holds it skips the install."""

  def git(*args):
    return subprocess.run(
      ["git", "-C", REPO, *args], check=True, capture_output=True, text=True
    ).stdout.strip()

  commit = git("stash", "create") or "HEAD"
  return commit, git("rev-parse", f"{commit}^{{tree}}")


def install_script(tree: str) -> str:
  """The shell script each worker runs to unpack the source and install it, unless installed."""
  key = shlex.quote(f"{tree} {_EXTRAS.value} {_WORKER_PYTHON.value or _PYTHON.value}")
  project = f'"$HOME/launcher[{_EXTRAS.value}]"' if _EXTRAS.value else '"$HOME/launcher"'
  if _WORKER_PYTHON.value:
    python = worker_python()
    install = [
      f"{python} -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {{ echo "
      f'"--worker_python={_WORKER_PYTHON.value} is not Python >= 3.11 on $(hostname)"; '
      "exit 2; }",
      f"{python} -m pip install -q -e {project}",
    ]
  else:
    venv = _on_worker(_WORKER_VENV.value)
    install = [
      'export PATH="$HOME/.local/bin:$PATH"',
      "command -v uv >/dev/null || python3 -m pip install -q --user uv || "
      "python3 -m pip install -q --user --break-system-packages uv",
      f"rm -rf {venv}",
      f"uv venv -q --python {shlex.quote(_PYTHON.value)} {venv}",
      f"uv pip install -q --python {venv}/bin/python -e {project}",
    ]
  return "\n".join(
    [
      "set -e",
      f'if [ "$(cat {REMOTE_DIR}/.installed 2>/dev/null)" = {key} ]; then '
      'echo "launcher already installed: $(hostname)"; exit 0; fi',
      f"rm -rf {REMOTE_DIR}",
      f"mkdir -p {REMOTE_DIR}",
      f"tar -xzf ~/{ARCHIVE} -C {REMOTE_DIR}",
      *install,
      f"echo {key} > {REMOTE_DIR}/.installed",
    ]
  )


def cleanup() -> str:
  """Ends the launchers of this interpreter and every other user of the TPU on a worker."""
  return (
    f"pkill -9 -f ^{worker_python()}' -m launcher ' ; "
    "sudo fuser -k -9 /dev/accel* /dev/vfio/* 2>/dev/null ; "
    "sudo rm -f /tmp/libtpu_lockfile ; true"
  )


def commands(launcher_args: list[str], num_workers: int) -> dict[str, list]:
  """Every command of a run: setup ((what, command) pairs: copy, cleanup, install on all
  workers), one launcher per worker, and the stop."""
  setup = []
  if _INSTALL.value:
    commit, tree = source_tree()
    archive = f"/tmp/{ARCHIVE}"
    setup += [
      (
        "packing the source",
        ["git", "-C", REPO, "archive", "--format=tar.gz", f"--output={archive}", commit],
      ),
      (
        "copying it to every worker",
        gcloud("scp", "--worker=all", archive, f"{_TPU.value}:{ARCHIVE}"),
      ),
    ]
  stop = ssh("all", cleanup())
  setup.append(("ending stale users of the TPU on every worker", stop))
  if _INSTALL.value:
    setup.append(
      (
        "installing it on every worker (skipped where this source is installed)",
        ssh("all", install_script(tree)),
      )
    )
  run = " ".join(shlex.quote(a) for a in launcher_args)
  workers = [
    ssh(str(i), f"cd {REMOTE_DIR} && exec {worker_python()} -m launcher {run}")
    for i in range(num_workers)
  ]
  return {"setup": setup, "workers": workers, "stop": [stop]}


def count_workers() -> int:
  describe = gcloud("describe", _TPU.value, "--format=value(networkEndpoints.len())")
  if _DRY_RUN.value:
    print(shlex.join(describe))
    if _NUM_WORKERS.value is None:
      raise UsageError("--dry_run cannot ask gcloud: pass --num_workers")
    return _NUM_WORKERS.value
  if _NUM_WORKERS.value:
    return _NUM_WORKERS.value
  result = subprocess.run(describe, capture_output=True, text=True, check=False)
  if result.returncode != 0:
    raise UsageError(
      f"cannot ask gcloud how many workers {_TPU.value} has ({result.stderr.strip()}); "
      "check --tpu, --zone and --project, or pass --num_workers"
    )
  return int(result.stdout.strip())


def main(argv):
  launcher_args = argv[1:]
  if not launcher_args:
    raise UsageError(
      "pass the launcher's arguments after --, e.g. -- --config=configs/lm.py "
      "--workdir=gs://bucket/run"
    )
  if not re.fullmatch(r"[a-z0-9_-]*(,[a-z0-9_-]+)*", _EXTRAS.value):
    raise UsageError(
      f"--extras={_EXTRAS.value!r} is not a comma-separated list of extras, e.g. tpu"
    )
  num_workers = count_workers()
  workdir = workdir_of(launcher_args)
  remote = storage.is_remote(storage.path(workdir))
  if num_workers > 1 and not remote:
    raise UsageError(
      f"--workdir={workdir} is a local path, but the workers of a {num_workers}-worker slice "
      "share no disk: each would keep its own checkpoints and the first save would hang. Use "
      "--workdir=gs://BUCKET/PATH (a bucket the TPU VM's service account can write)."
    )
  plan = commands(launcher_args, num_workers)
  if _DRY_RUN.value:
    print("# setup")
    for what, command in plan["setup"]:
      print(f"# {what}\n{shlex.join(command)}")
    for step in ("workers", "stop"):
      print(f"# {step}")
      for command in plan[step]:
        print(shlex.join(command))
    return 0
  for what, command in plan["setup"]:
    print(f"[pod] {what}", flush=True)
    code = subprocess.run(command, check=False).returncode
    if code != 0:
      print(
        f"[pod] {what} failed (exit {code}; its output is above; --dry_run shows the command)",
        flush=True,
      )
      return code

  def stop_every_worker():
    print(f"[pod] stopping the launcher on every worker: {shlex.join(plan['stop'][0])}", flush=True)
    subprocess.run(plan["stop"][0], check=False)

  def start_job() -> ProcessGroup:
    return ProcessGroup(
      plan["workers"],
      log_dir=_LOG_DIR.value,
      name="worker",
      grace=10,
      on_stop=stop_every_worker,
      prefix="[pod]",
    )

  # The workers' own logs name the step; this machine may have no access to the bucket.
  return supervise.supervise(
    start_job,
    workdir=None,
    max_restarts=_MAX_RESTARTS.value,
    backoff_seconds=5.0,
    name="worker",
    prefix="[pod]",
  )


if __name__ == "__main__":
  console.run_tool(main, prefix="[pod]")
