"""scripts/tpu/pod.py: the commands it runs on a pod slice, and that one failed worker stops all."""

import glob
import json
import os
import pathlib
import re
import shutil
import signal
import stat
import subprocess
import sys

import pytest

from launcher.local import free_port
from tests import fake_gcloud
from tests.gcs_emulator import Emulator
from tests.helpers import (
  REPO,
  assert_close,
  finish,
  load_config,
  load_params,
  losses_by_step,
  start,
  wait_for,
)

POD = [
  sys.executable,
  os.path.join(REPO, "scripts", "tpu", "pod.py"),
  "--tpu=my-v4-32",
  "--zone=us-central2-b",
]
STAND_IN_POD = [
  sys.executable,
  os.path.join(REPO, "scripts", "tpu", "pod.py"),
  "--tpu=stand-in",
  "--zone=us-central2-b",
  "--extras=classifier",  # tests/hooked_config.py trains the classifier (scikit-learn's digits).
]
CONFIG = "--config=tests/hooked_config.py"
LAUNCHER_ARGS = [
  "--",
  "--config=configs/lm.py",
  "--workdir=gs://bucket/run",
  "--config.learning_rate=3e-4",
]


def test_dry_run_prints_every_command():
  result = subprocess.run(
    [*POD, "--num_workers=4", "--dry_run", *LAUNCHER_ARGS],
    capture_output=True,
    text=True,
    timeout=60,
    check=True,
  )
  lines = result.stdout.splitlines()
  ssh = "gcloud compute tpus tpu-vm ssh my-v4-32"
  setup = "\n".join(lines[lines.index("# setup") : lines.index("# workers")])
  assert f"git -C {REPO} archive --format=tar.gz --output=/tmp/launcher-src.tar.gz" in setup
  assert (
    "scp --worker=all /tmp/launcher-src.tar.gz my-v4-32:launcher-src.tar.gz --zone=us-central2-b"
  ) in setup
  cleanup = lines[lines.index("# ending stale users of the TPU on every worker") + 1]
  assert cleanup.startswith(f"{ssh} --worker=all")
  assert "rm -f /tmp/libtpu_lockfile" in cleanup and "fuser -k -9 /dev/accel*" in cleanup
  # The image's python3 (3.10 on TPU VM images) is not used: uv makes a 3.11 virtualenv.
  assert 'uv venv -q --python 3.11 "$HOME"/launcher-venv' in setup
  assert (
    'uv pip install -q --python "$HOME"/launcher-venv/bin/python -e "$HOME/launcher[tpu]"' in setup
  )
  workers = lines[lines.index("# workers") + 1 : lines.index("# stop")]
  assert workers == [
    f'{ssh} --worker={i} \'--command=cd ~/launcher && exec "$HOME"/launcher-venv/bin/python -m '
    "launcher --config=configs/lm.py --workdir=gs://bucket/run --config.learning_rate=3e-4' "
    "--zone=us-central2-b"
    for i in range(4)
  ]
  assert lines[-1] == cleanup


FAKE_GCLOUD = """#!/usr/bin/env bash
# Records each call; worker 1's launcher fails, worker 0's runs until stopped.
echo "$*" >> "$GCLOUD_CALLS"
case "$*" in
  *describe*) echo 2 ;;
  *--worker=1*launcher*) echo "worker 1 fails"; exit 3 ;;
  *--worker=0*launcher*) echo "worker 0 trains"; sleep 60 ;;
esac
"""


def test_one_failed_worker_stops_every_worker(tmp_path):
  gcloud = tmp_path / "bin" / "gcloud"
  gcloud.parent.mkdir()
  gcloud.write_text(FAKE_GCLOUD)
  gcloud.chmod(gcloud.stat().st_mode | stat.S_IEXEC)
  calls = tmp_path / "calls"
  result = subprocess.run(
    [*POD, "--noinstall", f"--worker_logs={tmp_path / 'logs'}", *LAUNCHER_ARGS],
    capture_output=True,
    text=True,
    timeout=60,
    check=False,
    env={**os.environ, "PATH": f"{gcloud.parent}:{os.environ['PATH']}", "GCLOUD_CALLS": str(calls)},
  )
  assert result.returncode == 3, result.stdout + result.stderr
  assert "[pod] worker 1 exited with 3: stopping the others" in result.stdout
  assert "[worker 1] worker 1 fails" in result.stdout
  assert (tmp_path / "logs" / "worker_0.log").read_text() == "worker 0 trains\n"
  last_call = calls.read_text().splitlines()[-1]
  assert "--worker=all" in last_call and "pkill -9 -f" in last_call


def test_a_local_workdir_is_refused_for_a_slice_of_several_workers():
  local = ["--", "--config=configs/lm.py", "--workdir=/tmp/run"]
  result = subprocess.run(
    [*POD, "--num_workers=4", "--dry_run", *local],
    capture_output=True,
    text=True,
    timeout=60,
    check=False,
  )
  assert result.returncode != 0
  assert (
    "--workdir=/tmp/run is a local path, but the workers of a 4-worker slice share no disk"
    in result.stderr
  ) and "--workdir=gs://BUCKET/PATH" in result.stderr
  assert "# workers" not in result.stdout
  one_worker = subprocess.run(
    [*POD, "--num_workers=1", "--dry_run", *local],
    capture_output=True,
    text=True,
    timeout=60,
    check=True,
  )
  assert "--workdir=/tmp/run" in one_worker.stdout


def _image_python() -> str:
  """The workers' `python3`: a Python 3.10, as the Ubuntu 22.04 images of TPU VMs ship, where
  this machine has one; else this machine's own python3."""
  candidates = [
    *sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.10*/bin/python3.10"))),
    shutil.which("python3.10"),
    "/usr/bin/python3",
    sys._base_executable,
  ]
  for python in filter(None, candidates):
    if (
      subprocess.run(
        [python, "-m", "pip", "--version"], capture_output=True, check=False
      ).returncode
      == 0
    ):
      return python
  raise AssertionError("no python3 with pip on this machine")


@pytest.fixture
def tpu_slice(tmp_path):
  """A stand-in slice of 2 workers x 4 CPU devices (tests/fake_gcloud.py), a GCS emulator, and
  the environment that puts the stand-in's `gcloud` first; every remote command ended after."""
  gcs = Emulator(tmp_path / "gcs", tmp_path / "fake-gcs-server.log")
  gcs.bucket("pods")
  root = tmp_path / "slice"
  cache = os.path.expanduser("~/.cache")
  # What a worker's own system would configure: this machine's certificates and proxies.
  network = {
    name: value
    for name, value in os.environ.items()
    if re.search(r"CERT|SSL|PROXY|CA_BUNDLE", name, re.IGNORECASE)
  }
  gcloud_bin = fake_gcloud.make_slice(
    root,
    name="stand-in",
    zone="us-central2-b",
    num_workers=2,
    devices=4,
    coordinator_port=free_port(),
    image_python=_image_python(),
    env={**gcs.env, **network, "UV_CACHE_DIR": f"{cache}/uv", "PIP_CACHE_DIR": f"{cache}/pip"},
  )
  env = {**os.environ, "PATH": f"{gcloud_bin}:{os.environ['PATH']}", "FAKE_TPU_SLICE": str(root)}
  yield root, gcs, env
  pids = root / "pids"
  for pid in pids.read_text().split() if pids.exists() else []:
    try:
      os.killpg(int(pid), signal.SIGKILL)
    except ProcessLookupError:
      pass
  gcs.stop()


def _launchers(python: str) -> list[int]:
  """The launchers that `python` runs, as pod.py's cleanup finds them."""
  found = subprocess.run(
    ["pgrep", "-f", f"^{python} -m launcher "], capture_output=True, text=True, check=False
  )
  return [int(pid) for pid in found.stdout.split()]


@pytest.mark.slow  # Installs the project with uv, trains 40 steps with a restart: ~1 min here.
def test_the_pod_script_trains_on_a_stand_in_slice_survives_a_killed_worker_and_reinstalls_nothing(
  tpu_slice, straight, tmp_path
):
  root, gcs, env = tpu_slice
  homes = [root / "worker_0", root / "worker_1"]
  pythons = [f"{home}/launcher-venv/bin/python" for home in homes]
  mirror = gcs.root / "pods" / "run"
  pod = [
    *STAND_IN_POD,
    f"--worker_logs={tmp_path / 'tpu-logs'}",
    "--max_restarts=1",
    "--",
    CONFIG,
    "--workdir=gs://pods/run",
    "--config.slow_from_batch=22",
  ]
  log = tmp_path / "pod.log"
  process = start(pod, log, env=env)
  wait_for(
    lambda: (mirror / "checkpoints" / "20" / "commit_success.txt").exists(),
    600,
    "the step-20 checkpoint in the bucket",
    process,
  )
  (killed,) = _launchers(pythons[1])
  os.kill(killed, signal.SIGKILL)
  assert finish(process, 300) == 0, log.read_text()[-3000:]

  output = log.read_text()
  assert output.count("[pod] installing it on every worker") == 1
  assert "[pod] worker 1 exited with 255: stopping the others" in output
  assert "[pod] stopping the launcher on every worker" in output
  assert (
    "[pod] restart 1/1 after worker 1 exited with 255; resuming from its last checkpoint" in output
  )
  assert "[pod] the job finished after 1 restart(s)" in output
  assert "[worker 0] " in output and "[worker 1] " in output
  for i in (0, 1):
    worker_log = (tmp_path / "tpu-logs" / f"worker_{i}.log").read_text()
    assert "resuming from the checkpoint of step 20" in worker_log
  assert not _launchers(pythons[0]) and not _launchers(pythons[1])
  # The workers ran a Python 3.11 virtualenv of their own, whatever the image's python3 is.
  for python in pythons:
    version = subprocess.run([python, "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.startswith("Python 3.11"), version.stdout
  assert (homes[0] / "launcher" / "tests" / "hooked_config.py").exists()

  # The run: every step once, restarted at 20, as one process of 8 devices trains it.
  starts = [json.loads(line) for line in (mirror / "hosts" / "process_0.jsonl").open()]
  assert [r["first_step"] for r in starts if r["event"] == "start"] == [0, 20]
  assert {p.name for p in (mirror / "hosts").iterdir()} == {"process_0.jsonl", "process_1.jsonl"}
  config = load_config("../tests/hooked_config")
  assert_close(config, load_params(str(mirror), 40), load_params(straight("1x8"), 40))
  two, one = losses_by_step(str(mirror)), losses_by_step(straight("1x8"))
  assert list(two) == list(range(1, 41))
  assert [two[s] for s in two] == pytest.approx([one[s] for s in one], rel=1e-4)

  # Again, unchanged: nothing is installed; a stale launcher and libtpu's lock file are cleared.
  stale = subprocess.Popen(
    ["bash", "-c", f"exec -a '{pythons[0]} -m launcher --stale' sleep 300"], start_new_session=True
  )
  lock = pathlib.Path("/tmp/libtpu_lockfile")
  lock.touch()
  again = subprocess.run(
    pod, cwd=REPO, env=env, capture_output=True, text=True, timeout=240, check=False
  )
  assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
  assert again.stdout.count("launcher already installed") == 2
  assert stale.wait(timeout=10) == -signal.SIGKILL and not lock.exists()
  assert again.stdout.count("already finished") == 2


@pytest.mark.slow  # Starts the GCS emulator and the stand-in's processes.
def test_a_worker_python_older_than_3_11_is_one_line_before_anything_is_installed(
  tpu_slice, tmp_path
):
  root, _, env = tpu_slice
  for i in (0, 1):  # What an image's python3.10 answers to the version check.
    old = root / f"worker_{i}" / "python3.10"
    old.write_text("#!/bin/sh\nexit 1\n")
    old.chmod(0o755)
  result = subprocess.run(
    [
      *STAND_IN_POD,
      "--worker_python=~/python3.10",
      f"--worker_logs={tmp_path / 'logs'}",
      "--",
      CONFIG,
      "--workdir=gs://pods/old",
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert result.returncode == 2, result.stdout + result.stderr
  assert result.stdout.count("--worker_python=~/python3.10 is not Python >= 3.11") == 2
  assert (
    "[pod] installing it on every worker (skipped where this source is installed) failed "
    "(exit 2" in result.stdout
  )
  assert not (root / "worker_0" / "launcher" / ".installed").exists()
  assert "[worker" not in result.stdout and not (tmp_path / "logs").exists()
