"""The CPU sbatch template on a real slurmctld + slurmd on this machine (scripts/slurm/local_cluster.sh)."""

import os
import shutil
import subprocess
import sys

import pytest

from launcher import train
from tests.helpers import REPO, load_config, losses_by_step, wait_for

pytestmark = pytest.mark.slow  # Starts processes or trains for seconds.

CLUSTER = os.path.join(REPO, "scripts", "slurm", "local_cluster.sh")


@pytest.fixture(scope="module")
def slurm():
  """Brings the local SLURM up for these tests and down after them; skips where it cannot exist."""
  if os.geteuid() != 0:
    pytest.skip("a local SLURM needs root (packages, /etc/slurm/slurm.conf); .ci/run runs as root")
  up = subprocess.run([CLUSTER, "up"], capture_output=True, text=True, timeout=300, check=False)
  if up.returncode != 0 and not shutil.which("slurmctld"):
    pytest.skip(f"SLURM packages could not be installed here: {up.stderr.strip()[-500:]}")
  assert up.returncode == 0, up.stdout + up.stderr
  yield
  subprocess.run([CLUSTER, "down"], capture_output=True, timeout=60, check=False)


def sbatch(tmp_path, *launcher_args, wait=True, export=""):
  """Submits scripts/slurm/cpu.sbatch with 2 tasks; returns (job id, its output file)."""
  output = tmp_path / "slurm.out"
  result = subprocess.run(
    [
      "sbatch",
      "--parsable",
      f"--output={output}",
      f"--export=ALL,LAUNCHER_PYTHON={sys.executable},DEVICES_PER_TASK=4{export}",
      "scripts/slurm/cpu.sbatch",
      *launcher_args,
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert result.returncode == 0, result.stdout + result.stderr
  job = result.stdout.strip().split(";")[0]
  if wait:  # Polled here: `sbatch --wait` notices the end up to ~20 s late.
    try:
      wait_for(lambda: not queued(job), 300, f"job {job} to end", interval=0.5)
    finally:
      subprocess.run(["scancel", job], timeout=30, check=False)
    shown = subprocess.run(
      ["scontrol", "show", "job", job], capture_output=True, text=True, timeout=30
    ).stdout
    assert " ExitCode=0:0" in shown, shown + (output.read_text()[-3000:] if output.exists() else "")
  return job, output


def queued(job: str) -> bool:
  """Whether SLURM still lists `job` as pending, running or completing."""
  listed = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True, timeout=30)
  return bool(listed.stdout.strip())


def test_two_tasks_join_one_job_and_match_one_process(slurm, tmp_path):
  del slurm
  workdir = tmp_path / "run"
  _, output = sbatch(
    tmp_path,
    "--config=configs/linear.py",
    f"--workdir={workdir}",
    "--config.num_steps=40",
    "--config.log_every_steps=1",
    "--config.eval_every_steps=0",
  )
  log = output.read_text()
  for task in (0, 1):
    assert f"{task}: " in log and f"joining a slurm job as process {task} of 2" in log
    assert f"process {task}/2 on" in log and "4 local / 8 global devices" in log

  reference = tmp_path / "reference"
  train.run(
    load_config("linear", num_steps=40, log_every_steps=1, eval_every_steps=0), str(reference)
  )
  slurm_losses, reference_losses = losses_by_step(str(workdir)), losses_by_step(str(reference))
  assert list(slurm_losses) == list(range(1, 41))
  assert list(slurm_losses.values()) == pytest.approx(list(reference_losses.values()), rel=1e-5)


def usr1_then_requeued(job: str, output, ready, what: str) -> str:
  """Once `ready()`, sends SIGUSR1 to every task of `job` and waits until its requeued run ended;
  returns the job's output. The job is cancelled whatever happens."""
  try:
    wait_for(ready, 120, what)
    subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=30)
    # The requeued job starts again once its old credential expired: 10 s on the local cluster
    # (AuthInfo=cred_expire=10; SLURM's default is 120 s).
    try:
      wait_for(
        lambda: "requeue 1" in output.read_text() and not queued(job),
        180,
        "the requeued job to end",
        interval=0.5,
      )
    except AssertionError as e:
      raise AssertionError(f"{e}; the job's output:\n{output.read_text()[-4000:]}") from None
  finally:
    subprocess.run(["scancel", job], timeout=30, check=False)
  return output.read_text()


def test_usr1_reaches_every_task_saves_requeues_and_resumes(slurm, tmp_path):
  del slurm
  workdir = tmp_path / "run"
  job, output = sbatch(
    tmp_path,
    "--config=configs/linear.py",
    f"--workdir={workdir}",
    "--config.num_steps=400",
    "--config.log_every_steps=10",
    "--config.eval_every_steps=0",
    wait=False,
  )
  log = usr1_then_requeued(
    job,
    output,
    lambda: (
      (workdir / "metrics.jsonl").exists()
      and (workdir / "metrics.jsonl").read_text().count("\n") >= 2
    ),
    "the job to train",
  )
  assert "0: " in log and log.count("received SIGUSR1") == 2, log[-3000:]
  saved = int(
    log.split("stopped on a preemption notice after saving the checkpoint of step ")[1].split(";")[
      0
    ]
  )
  assert (
    log.count(f"stopped on a preemption notice after saving the checkpoint of step {saved}") == 2
  )
  assert "requeue 1" in log
  assert log.count(f"resuming from the checkpoint of step {saved}") == 2
  assert max(losses_by_step(str(workdir))) == 400


def test_a_failed_job_step_is_restarted_inside_the_allocation(slurm, tmp_path):
  del slurm
  workdir = tmp_path / "run"
  _, output = sbatch(
    tmp_path,
    "--config=tests/hooked_config.py",
    f"--workdir={workdir}",
    "--config.num_steps=20",
    "--config.checkpoint_every_steps=10",
    "--config.fault=raise",
    "--config.fault_at_batch=14",
    "--config.fault_process=0",
    f"--config.fault_marker={tmp_path / 'failed'}",
    export=",MAX_RESTARTS=2",
  )
  log = output.read_text()
  assert "RuntimeError: hooked workload: a fault at batch 14" in log, log[-3000:]
  assert "restart 1/2 after the job step exited with" in log
  assert "finished after 1 restart(s)" in log
  assert log.count("resuming from the checkpoint of step 10") == 2
  assert max(losses_by_step(str(workdir))) == 20


def test_usr1_right_after_the_job_joins_is_saved_and_requeued(slurm, tmp_path):
  """A notice during start-up (before the first step) is kept, not fatal: both tasks save at the
  step jax's preemption sync point agrees on (tens of steps in on this fast model, which runs
  ~300 steps/s: 40 steps were sometimes all done first), exit 75, and the requeued job resumes
  there and finishes."""
  del slurm
  workdir = tmp_path / "run"
  job, output = sbatch(
    tmp_path,
    "--config=configs/linear.py",
    f"--workdir={workdir}",
    "--config.num_steps=1000",
    "--config.log_every_steps=50",
    "--config.eval_every_steps=0",
    wait=False,
  )
  log = usr1_then_requeued(
    job,
    output,
    lambda: output.exists() and output.read_text().count("joining a slurm job") >= 2,
    "both tasks to start joining",
  )
  assert log.count("received SIGUSR1") >= 2 and "Traceback" not in log, log[-3000:]
  saved = int(
    log.split("stopped on a preemption notice after saving the checkpoint of step ")[1].split(";")[
      0
    ]
  )
  assert saved < 1000 and "requeue 1" in log
  assert (
    log.count(f"stopped on a preemption notice after saving the checkpoint of step {saved};") == 2
  )
  assert log.count(f"resuming from the checkpoint of step {saved} ") == 2
  assert max(losses_by_step(str(workdir))) == 1000
