"""Process control with the real process tree: the watchdog spares a finished run's final save,
a closed console never stalls a job, early preemption notices and SIGHUP save, any signal is
named and restarted, a second Ctrl-C kills at once; the supervisor's rules as unit tests."""

import os
import re
import signal
import subprocess
import time

import pytest

from launcher import supervise
from launcher.errors import EXIT_PEER_LOST, EXIT_PREEMPTED
from tests.helpers import REPO, children, finish, launcher_command, read_metrics, start, wait_for


def _alive(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except FileNotFoundError:
    return False


def _runner_at_first_report(tmp_path, *args, runner_flags=()):
  """`launcher.local` (2 x 4 devices) on tests/hooked_config.py with `args`, once it reported."""
  workdir, log = tmp_path / "run", tmp_path / "run.log"
  command = launcher_command(
    "--config=tests/hooked_config.py", f"--workdir={workdir}", *args, num_processes=2, devices=4
  )
  runner = start([*command[:3], *runner_flags, *command[3:]], str(log), devices=4)
  wait_for(
    lambda: (workdir / "metrics.jsonl").exists() and read_metrics(str(workdir)),
    120,
    "the first report",
    runner,
  )
  return runner, workdir, log


@pytest.mark.slow
def test_a_final_save_slower_than_the_step_timeout_commits_and_exits_0(tmp_path):
  # ~34M params + AdamW: the final checkpoint takes seconds to finish; steps are under a second.
  workdir, log = tmp_path / "run", tmp_path / "run.log"
  process = start(
    launcher_command(
      "--config=tests/hooked_config.py",
      f"--workdir={workdir}",
      "--config.hidden_sizes=(4096,4096,4096)",
      "--config.batch_size=8",
      "--config.num_steps=6",
      "--config.checkpoint_every_steps=0",
      "--step_timeout_seconds=1",
    ),
    str(log),
  )
  assert finish(process, 240) == 0, log.read_text()[-3000:]
  assert sorted(os.listdir(workdir / "checkpoints")) == ["6"]
  assert "stuck" not in log.read_text()


@pytest.mark.slow
def test_a_closed_console_lets_the_job_finish_with_its_whole_log(tmp_path):
  workdir = tmp_path / "run"
  command = " ".join(
    launcher_command(
      "--config=tests/hooked_config.py", f"--workdir={workdir}", num_processes=2, devices=4
    )
  )
  result = subprocess.run(
    ["bash", "-c", f'{command} | head -3; echo "runner ${{PIPESTATUS[0]}}" >&2'],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=240,
    env={**os.environ, "XLA_FLAGS": ""},
    check=False,
  )
  assert len(result.stdout.splitlines()) == 3
  assert result.stderr.strip().endswith("runner 0"), result.stderr[-2000:]
  assert "finished 40 steps" in (workdir / "logs" / "process_0.log").read_text()
  assert "step 40/40" in (workdir / "logs" / "process_0.log").read_text()
  assert "[process 1/2]" in (workdir / "logs" / "process_1.log").read_text()
  assert max(row["step"] for row in read_metrics(str(workdir))) == 40


@pytest.mark.slow
def test_a_preemption_notice_during_start_up_saves_at_the_first_step(tmp_path):
  workdir, log = tmp_path / "run", tmp_path / "run.log"
  process = start(
    launcher_command("--config=tests/hooked_config.py", f"--workdir={workdir}"), str(log)
  )
  time.sleep(0.3)  # Still importing: no jax, no config, no workdir yet.
  process.send_signal(signal.SIGUSR1)
  assert finish(process, 120) == EXIT_PREEMPTED, log.read_text()[-3000:]
  text = log.read_text()
  assert "received SIGUSR1" in text and "Traceback" not in text
  assert "stopped on a preemption notice after saving the checkpoint of step 1" in text
  assert os.listdir(workdir / "checkpoints") == ["1"]


@pytest.mark.slow
def test_sighup_to_the_local_runner_saves_and_exits_75(tmp_path):
  runner, workdir, log = _runner_at_first_report(
    tmp_path, "--config.slow_from_batch=0", "--config.slow_seconds=0.2"
  )
  runner.send_signal(signal.SIGHUP)
  assert finish(runner, 60) == EXIT_PREEMPTED, log.read_text()[-3000:]
  text = log.read_text()
  assert "SIGHUP: asking every process to save and stop" in text
  assert text.count("stopped on a preemption notice after saving the checkpoint of step") == 2
  saved = max(int(name) for name in os.listdir(workdir / "checkpoints") if name.isdigit())
  assert saved >= max(row["step"] for row in read_metrics(str(workdir))) and saved < 20


@pytest.mark.slow
def test_a_child_killed_by_a_real_time_signal_is_named_and_restarted(tmp_path):
  runner, _, log = _runner_at_first_report(
    tmp_path, runner_flags=("--max_restarts=1", "--restart_backoff_seconds=0")
  )
  os.kill(children(runner.pid)[1], signal.SIGRTMIN + 1)
  assert finish(runner, 180) == 0, log.read_text()[-3000:]
  text = log.read_text()
  assert "process 1 was killed by SIGRTMIN+1" in text and "Traceback" not in text
  assert "restart 1/1 after process 1 was killed by SIGRTMIN+1" in text
  assert "the job finished after 1 restart(s)" in text


@pytest.mark.slow
def test_a_second_ctrl_c_kills_at_once(tmp_path):
  # The data loader blocks for ever at batch 3: a save on the first Ctrl-C cannot happen.
  runner, _, log = _runner_at_first_report(
    tmp_path, "--config.fault=block", "--config.fault_at_batch=3"
  )
  processes = children(runner.pid)
  runner.send_signal(signal.SIGINT)
  time.sleep(1)
  assert runner.poll() is None  # Waiting for the processes to save (up to --grace_seconds).
  runner.send_signal(signal.SIGINT)
  assert finish(runner, 5) == 128 + signal.SIGINT
  assert "SIGINT again: killing every process now" in log.read_text()
  assert not any(_alive(process) for process in processes)


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs (a real full disk): root only")
def test_a_process_log_on_a_full_disk_never_stalls_the_job(tmp_path):
  """--process_logs on a full 1 MB tmpfs: the pumps keep draining the pipes (process 0 prints far
  more than a pipe holds), drop and count what the logs cannot take, and the job finishes."""
  logs, log = tmp_path / "logs", tmp_path / "run.log"
  logs.mkdir()
  subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(logs)], check=True)
  try:
    with open(logs / "filler", "wb", buffering=0) as filler:
      try:
        while True:
          filler.write(b"\0" * 4096)
      except OSError:
        pass
      filler.truncate(filler.tell() - 8192)  # Room for the first lines only.
    workdir = tmp_path / "run"
    command = launcher_command(
      "--config=tests/hooked_config.py",
      f"--workdir={workdir}",
      "--config.num_steps=1000",
      "--config.checkpoint_every_steps=0",
      num_processes=2,
      devices=4,
    )
    runner = start([*command[:3], f"--process_logs={logs}", *command[3:]], str(log), devices=4)
    assert finish(runner, 300) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert text.count(f"[local] process 0's log {logs}/process_0.log cannot be written") == 1
    missing = re.search(
      rf"\[local\] process 0's log {logs}/process_0.log is missing ([\d,]+) bytes", text
    )
    assert missing and int(missing[1].replace(",", "")) > 65536, text[-3000:]  # More than a pipe.
    assert "[process 0/2] step 1000/1000" in text
    assert (logs / "process_0.log").stat().st_size + int(missing[1].replace(",", "")) > 65536
    assert max(row["step"] for row in read_metrics(str(workdir))) == 1000
  finally:
    subprocess.run(["umount", "-l", str(logs)], check=False)


def test_every_signal_number_has_a_name():
  assert supervise.describe_exit(-9) == "was killed by SIGKILL"
  assert supervise.describe_exit(-(signal.SIGRTMIN + 1)) == "was killed by SIGRTMIN+1"
  assert supervise.describe_exit(-99) == "was killed by signal 99"
  assert supervise.describe_exit(76) == "exited with 76"


class _Group:
  """A job that exits with the next of `codes` each time it is started."""

  def __init__(self, codes):
    self.code = codes.pop(0)
    self.first_failure = (0, self.code) if self.code else None

  def wait(self):
    return self.code


def test_preemption_restarts_back_off_and_are_bounded_per_hour(monkeypatch, capsys):
  sleeps = []
  monkeypatch.setattr(supervise.time, "sleep", sleeps.append)
  codes = [EXIT_PREEMPTED] * 4
  code = supervise.supervise(
    lambda: _Group(codes),
    workdir=None,
    max_restarts=1,
    backoff_seconds=1.0,
    max_preemptions_per_hour=3,
    prefix="[local]",
  )
  assert code == EXIT_PREEMPTED and sleeps == [1.0, 2.0, 4.0] and not codes
  assert "for the 4th time within an hour; giving up (at most 3 an hour)" in capsys.readouterr().out
  codes = [EXIT_PREEMPTED, EXIT_PEER_LOST, 0]
  assert (
    supervise.supervise(
      lambda: _Group(codes), workdir=None, max_restarts=1, backoff_seconds=0.5, prefix="[local]"
    )
    == 0
  )
  assert not codes
