"""Ctrl-C on a plain `python -m launcher`: the first saves and exits 75 (the run resumes from that
step), a second stops at once; neither prints a traceback."""

import os
import signal
import time

import pytest

from launcher.errors import EXIT_PREEMPTED
from tests.helpers import (
  finish,
  launcher_command,
  read_metrics,
  run_at_first_report,
  start,
  wait_for,
)
from tests.test_checkpoint import assert_same_run


@pytest.mark.slow
def test_ctrl_c_saves_and_exits_75_and_the_run_resumes_there(tmp_path, straight):
  process, workdir, log = run_at_first_report(
    tmp_path, "--config.slow_from_batch=0", "--config.slow_seconds=0.2"
  )
  process.send_signal(signal.SIGINT)
  assert finish(process, 60) == EXIT_PREEMPTED, log.read_text()[-3000:]
  text = log.read_text()
  assert "received SIGINT: saving a checkpoint and stopping at the next step" in text
  assert "Traceback" not in text and "KeyboardInterrupt" not in text
  assert "exiting with 75: run the same command again to resume" in text
  saved = [int(name) for name in os.listdir(workdir / "checkpoints") if name.isdigit()]
  assert len(saved) == 1 and 1 <= saved[0] < 20  # Before the first periodic save (step 20).
  assert saved[0] >= max(row["step"] for row in read_metrics(str(workdir)))

  resumed = start(
    launcher_command("--config=tests/hooked_config.py", f"--workdir={workdir}"), str(log)
  )
  assert finish(resumed, 120) == 0, log.read_text()[-3000:]
  assert f"resuming from the checkpoint of step {saved[0]} " in log.read_text()
  assert_same_run(str(workdir), straight("1x8"), from_step=saved[0])


@pytest.mark.slow
def test_a_second_ctrl_c_stops_a_plain_run_at_once(tmp_path):
  # The data loader blocks for ever at batch 4, while the first batches are read ahead: the step
  # that the first Ctrl-C waits for, to save, never comes.
  workdir, log = tmp_path / "run", tmp_path / "run.log"
  process = start(
    launcher_command(
      "--config=tests/hooked_config.py",
      f"--workdir={workdir}",
      "--config.fault=block",
      "--config.fault_at_batch=4",
    ),
    str(log),
  )
  wait_for(lambda: "train state:" in log.read_text(), 120, "the train state line", process)
  time.sleep(2)  # Reading ahead, blocked.
  process.send_signal(signal.SIGINT)
  time.sleep(1)
  assert process.poll() is None  # Still waiting for the step that would save.
  process.send_signal(signal.SIGINT)
  assert finish(process, 10) == 128 + signal.SIGINT, log.read_text()[-3000:]
  text = log.read_text()
  assert "SIGINT again: stopping at once, without saving" in text
  assert "Traceback" not in text
