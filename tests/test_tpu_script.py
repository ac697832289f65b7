"""scripts/tpu/pod.py: the commands it runs on a pod slice, and that one failed worker stops all."""

import os
import stat
import subprocess
import sys

from tests.helpers import REPO

POD = [sys.executable, os.path.join(REPO, "scripts", "tpu", "pod.py"), "--tpu=my-v4-32",
       "--zone=us-central2-b"]
LAUNCHER_ARGS = ["--", "--config=configs/lm.py", "--workdir=gs://bucket/run",
                 "--config.learning_rate=3e-4"]


def test_dry_run_prints_every_command():
  result = subprocess.run([*POD, "--num_workers=4", "--dry_run", *LAUNCHER_ARGS],
                          capture_output=True, text=True, timeout=60, check=True)
  lines = result.stdout.splitlines()
  ssh = "gcloud compute tpus tpu-vm ssh my-v4-32"
  assert lines[lines.index("# setup") + 1].startswith(f"git -C {REPO} archive --format=tar.gz")
  setup = lines[lines.index("# setup"):lines.index("# workers")]
  assert any("scp --worker=all /tmp/launcher-src.tar.gz my-v4-32:/tmp/launcher-src.tar.gz" in l
             for l in setup)
  assert any(l.startswith(f"{ssh} --worker=all") and "pip install -q -e '\"'\"'.[tpu]" in l
             for l in setup)
  cleanup = setup[-1]
  assert "rm -f /tmp/libtpu_lockfile" in cleanup and "fuser -k -9 /dev/accel*" in cleanup
  workers = lines[lines.index("# workers") + 1:lines.index("# stop")]
  assert workers == [
      f"{ssh} --worker={i} '--command=cd ~/launcher && python3 -m launcher --config=configs/lm.py "
      "--workdir=gs://bucket/run --config.learning_rate=3e-4' --zone=us-central2-b"
      for i in range(4)]
  assert lines[-1].startswith(f"{ssh} --worker=all") and "pkill -9 -f" in lines[-1]


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
      capture_output=True, text=True, timeout=60, check=False,
      env={**os.environ, "PATH": f"{gcloud.parent}:{os.environ['PATH']}",
           "GCLOUD_CALLS": str(calls)})
  assert result.returncode == 3, result.stdout + result.stderr
  assert "[local] worker 1 exited with 3: stopping the others" in result.stdout
  assert "[worker 1] worker 1 fails" in result.stdout
  assert (tmp_path / "logs" / "worker_0.log").read_text() == "worker 0 trains\n"
  last_call = calls.read_text().splitlines()[-1]
  assert "--worker=all" in last_call and "pkill -9 -f" in last_call


def test_a_local_workdir_is_refused_for_a_slice_of_several_workers():
  local = ["--", "--config=configs/lm.py", "--workdir=/tmp/run"]
  result = subprocess.run([*POD, "--num_workers=4", "--dry_run", *local], capture_output=True,
                          text=True, timeout=60, check=False)
  assert result.returncode != 0
  assert ("--workdir=/tmp/run is a local path, but the workers of a 4-worker slice share no disk"
          in result.stderr) and "--workdir=gs://BUCKET/PATH" in result.stderr
  assert "# workers" not in result.stdout
  one_worker = subprocess.run([*POD, "--num_workers=1", "--dry_run", *local], capture_output=True,
                              text=True, timeout=60, check=True)
  assert "--workdir=/tmp/run" in one_worker.stdout
