"""`python -m launcher.report`: a report from a real 2-process run, its numbers and its plots."""

import json
import subprocess
import sys
import time

import matplotlib.image
import pytest

from launcher import report
from tests.helpers import REPO, finish, launcher_command, start


@pytest.mark.slow
def test_report_of_a_two_process_run_that_was_resumed(tmp_path):
  workdir = tmp_path / "run"
  args = [
    "--config=tests/hooked_config.py",
    f"--workdir={workdir}",
    "--config.num_steps=20",
    "--config.log_every_steps=5",
    "--config.eval_every_steps=10",
    "--config.checkpoint_every_steps=10",
  ]
  started = time.monotonic()
  first = start(
    launcher_command(*args, num_processes=2, devices=4), str(tmp_path / "1.log"), devices=4
  )
  assert finish(first, 180) == 0, (tmp_path / "1.log").read_text()[-3000:]
  measured = time.monotonic() - started
  # A second start of the same run, longer: it resumes at step 20 and trains to 30.
  second = start(
    launcher_command(*args[:2], "--config.num_steps=30", *args[3:], num_processes=2, devices=4),
    str(tmp_path / "2.log"),
    devices=4,
  )
  assert finish(second, 180) == 0, (tmp_path / "2.log").read_text()[-3000:]

  result = subprocess.run(
    [sys.executable, "-m", "launcher.report", str(workdir)],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  report = workdir / "report"
  summary = json.loads((report / "summary.json").read_text())
  parts, wall = summary["goodput_s"], summary["wall_s"]
  assert abs(sum(parts.values()) - wall) <= 0.05 * wall
  assert summary["starts"] == 2 and summary["finished"]
  # Against a clock outside the run: the first start's share of the wall time fits in what the
  # test measured around it.
  first_start_records = [
    json.loads(line) for line in (workdir / "hosts" / "process_0.jsonl").read_text().splitlines()
  ]
  ends = [r for r in first_start_records if r["event"] == "end"]
  starts = [r for r in first_start_records if r["event"] == "start"]
  first_wall = starts[0]["startup_s"] + ends[0]["time"] - starts[0]["time"]
  assert 0.6 * measured < first_wall <= measured
  assert parts["compile"] > 0 and parts["productive steps"] > 0 and parts["eval"] > 0
  assert parts["blocked by checkpoint saves"] > 0
  assert parts["lost to restarts"] == 0  # The second start resumed where the first one ended.

  hosts = summary["hosts"]
  assert [h["process"] for h in hosts] == [0, 1]
  assert all(h["devices"] == 4 and h["last_step"] == 30 for h in hosts)
  assert sum(h["slowest"] for h in hosts) == 1
  markdown = (report / "report.md").read_text()
  assert "2 start(s) (restarts at steps 20)" in markdown and "| 1 " in markdown
  for name in ("loss.png", "throughput.png", "hosts.png", "checkpoints.png"):
    assert f"![{name}]({name})" in markdown
    path = report / name
    assert path.stat().st_size > 10_000
    pixels = matplotlib.image.imread(str(path))
    assert pixels.std() > 0.05  # Not blank: lines, bars and text differ from the background.


def test_lost_steps_after_a_kill_are_counted():
  """Windows of steps trained after the last checkpoint and re-done by the next start are lost to
  restarts, waits and all, and so is the time from a killed start's last record to the next."""
  records = [
    {"event": "start", "time": 0.0, "startup_s": 1.0, "first_step": 0},
    {"event": "first_step", "time": 2.0, "compile_s": 2.0},
    {
      "event": "report",
      "time": 12.0,
      "step": 10,
      "steps": 10,
      "window_s": 10.0,
      "data_wait_s": 1.0,
      "checkpoint_blocked_s": 0.5,
      "eval_s": 0.5,
    },
    {
      "event": "report",
      "time": 22.0,
      "step": 20,
      "steps": 10,
      "window_s": 10.0,
      "data_wait_s": 1.0,
      "checkpoint_blocked_s": 0.0,
      "eval_s": 0.0,
    },
    # Killed at 25.0 (no end record); the checkpoint of step 10 was the last complete one. The
    # next process starts at 29.0.
    {"event": "start", "time": 30.0, "startup_s": 1.0, "first_step": 10},
    {"event": "first_step", "time": 31.0, "compile_s": 1.0},
    {
      "event": "report",
      "time": 41.0,
      "step": 20,
      "steps": 10,
      "window_s": 10.0,
      "data_wait_s": 0.0,
      "checkpoint_blocked_s": 0.0,
      "eval_s": 0.0,
    },
    {
      "event": "end",
      "time": 42.0,
      "step": 20,
      "steps": 0,
      "window_s": 1.0,
      "data_wait_s": 0.0,
      "checkpoint_blocked_s": 0.5,
      "eval_s": 0.0,
    },
  ]
  parts = report.goodput(records)
  assert parts == {
    "startup": 2.0,
    "compile": 3.0,
    "productive steps": 18.0,
    "waiting for data": 1.0,
    "blocked by checkpoint saves": 1.0,
    "eval": 0.5,
    "lost to restarts": 10.0 + 7.0,
    "other (reporting, shutdown)": 0.5,
  }
  assert report.wall_time(records) == 1.0 + 22.0 + 7.0 + 1.0 + 12.0
  assert sum(parts.values()) == report.wall_time(records)
  assert list(parts) == list(report.GOODPUT_PARTS)


def test_steps_after_the_last_report_kept_by_a_save_are_productive():
  """A preemption notice at step 15 saves it: the end record's 5 steps since the report at 10
  are productive; after a crash at 15 that the next start re-does from 10, they are lost."""
  first = [
    {"event": "start", "time": 0.0, "startup_s": 1.0, "first_step": 0},
    {"event": "first_step", "time": 2.0, "compile_s": 2.0},
    {
      "event": "report",
      "time": 12.0,
      "step": 10,
      "steps": 10,
      "window_s": 10.0,
      "data_wait_s": 0.0,
      "checkpoint_blocked_s": 0.0,
      "eval_s": 0.0,
    },
    {
      "event": "end",
      "time": 18.0,
      "step": 15,
      "steps": 5,
      "window_s": 6.0,
      "data_wait_s": 0.0,
      "checkpoint_blocked_s": 1.0,
      "eval_s": 0.0,
    },
  ]
  resumed = [
    {"event": "start", "time": 30.0, "startup_s": 1.0, "first_step": 15},
    {"event": "first_step", "time": 31.0, "compile_s": 1.0},
  ]
  parts = report.goodput(first + resumed)
  assert parts["productive steps"] == 15.0 and parts["lost to restarts"] == 0.0
  assert parts["other (reporting, shutdown)"] == 0.0
  parts = report.goodput(first + [{**resumed[0], "first_step": 10}, resumed[1]])
  assert parts["productive steps"] == 10.0 and parts["lost to restarts"] == 6.0
