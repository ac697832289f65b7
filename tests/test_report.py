"""`python -m launcher.report`: a report from a real 2-process run, its numbers and its plots;
the straggler rule and the restart gaps on hand-written host records."""

import json
import random
import subprocess
import sys
import time

import matplotlib.image
import pytest
from etils import epath

from launcher import report, writers
from tests.helpers import REPO, finish, launcher_command, start


@pytest.mark.slow
def test_report_of_a_two_process_run_that_was_resumed(tmp_path):
  """Process 1's input pipeline is slow (tests/slow_host_workload.py): the report names it."""
  workdir = tmp_path / "run"
  args = [
    "--config=tests/hooked_config.py",
    f"--workdir={workdir}",
    "--config.num_steps=20",
    "--config.log_every_steps=5",
    "--config.eval_every_steps=10",
    "--config.checkpoint_every_steps=10",
    "--config.workload=tests.slow_host_workload",
    "--config.slow_from_batch=0",
    "--config.slow_seconds=0.05",
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
  first_log, second_log = (tmp_path / "1.log").read_text(), (tmp_path / "2.log").read_text()
  for process in (0, 1):
    assert (
      f"joining a job given by JAX_* environment variables as process {process} of 2"
    ) in first_log
  assert "finished 20 steps in 0:" in first_log
  assert "finished 30 steps (this start: from step 20, in 0:" in second_log

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
  assert hosts[0]["straggler"] is None
  assert hosts[1]["straggler"].startswith("its input pipeline")
  assert hosts[1]["data_wait_share"] > 0.2 and hosts[0]["data_wait_share"] < 0.1
  # Process 0 waits for it inside its steps: the same steps/s on both.
  assert 0.75 < hosts[0]["steps_per_sec"] / hosts[1]["steps_per_sec"] < 1.33
  markdown = (report / "report.md").read_text()
  assert "2 start(s) (restarts at steps 20)" in markdown and "| 1 **straggler** " in markdown
  assert "Process 1 is a straggler; the cause: its input pipeline" in markdown
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


def _start(process: int, at: float, first_step: int, rates: list[float], waits: list[float]):
  """One start of one host as the writers record it: reports of 10 steps each at `rates`
  (steps/s), each waiting for data `waits` of its step time; the records and the time after."""
  records = [
    {
      "event": "start",
      "time": at + 1.0,
      "process": process,
      "process_count": 2,
      "hostname": f"node{process}",
      "devices": 4,
      "first_step": first_step,
      "startup_s": 1.0,
    },
    {"event": "first_step", "time": at + 3.0, "compile_s": 2.0},
  ]
  now, step = at + 3.0, first_step
  for rate, wait in zip(rates, waits):
    seconds = 10 / rate
    now, step = now + seconds, step + 10
    records.append(
      {
        "event": "report",
        "time": now,
        "step": step,
        "steps": 10,
        "window_s": seconds,
        "steps_s": seconds,
        "data_wait_s": wait * seconds,
        "checkpoint_blocked_s": 0.0,
        "eval_s": 0.0,
        "steps_per_sec": rate,
        "examples_per_sec": 64 * rate,
      }
    )
  return records, now


def _write_run(workdir: epath.Path, hosts: dict[int, list[dict]]) -> None:
  """hosts/process_<i>.jsonl and process 0's metrics.jsonl, as a run writes them."""
  (workdir / "hosts").mkdir(parents=True)
  for process, records in hosts.items():
    lines = "".join(json.dumps(r) + "\n" for r in records)
    (workdir / "hosts" / f"process_{process}.jsonl").write_text(lines)
  rows = [
    {"step": r["step"], "loss": 1.0 / r["step"], "steps_per_sec": r["steps_per_sec"]}
    for r in hosts[0]
    if r["event"] == "report"
  ]
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _noisy(mean: float, spread: float, count: int, seed: int) -> list[float]:
  rng = random.Random(seed)
  return [rng.gauss(mean, spread) for _ in range(count)]


def _two_hosts(tmp_path, rates_1: list[float], waits_1: list[float], rates_0=None, waits_0=None):
  """A 20-report run of 2 hosts, host 0 at 20 steps/s (2% spread) and 2% data wait unless told;
  returns its host_table as the report reads it from the files."""
  rates_0 = rates_0 or _noisy(20.0, 0.4, 20, seed=0)
  waits_0 = waits_0 or _noisy(0.02, 0.002, 20, seed=1)
  workdir = epath.Path(tmp_path)
  _write_run(
    workdir,
    {0: _start(0, 0.0, 0, rates_0, waits_0)[0], 1: _start(1, 0.0, 0, rates_1, waits_1)[0]},
  )
  return report.host_table(report.host_records(workdir))


@pytest.mark.parametrize(
  "rates_1, waits_1",
  [
    # The case: 0.1% slower, a larger data wait, every report within a 2% spread.
    ([rate * 0.999 for rate in _noisy(20.0, 0.4, 20, seed=0)], _noisy(0.03, 0.002, 20, seed=2)),
    # 7 points more data wait, above the floor but inside the spread of its reports' (8 points).
    (_noisy(20.0, 0.4, 20, seed=0), [0.09 + 0.08, 0.09 - 0.08] * 10),
    # 30% slower steps/s with the others' data wait: it waited for a peer inside its steps.
    ([14.0 * 1.001, 14.0 * 0.999] * 10, [0.021, 0.019] * 10),
  ],
)
def test_a_difference_within_the_noise_or_not_its_own_marks_no_host(tmp_path, rates_1, waits_1):
  table = _two_hosts(tmp_path, rates_1, waits_1)
  assert table[1]["steps_per_sec"] <= table[0]["steps_per_sec"]
  assert table[1]["data_wait_share"] >= table[0]["data_wait_share"] - 0.001
  assert [row["straggler"] for row in table] == [None, None]
  assert "No straggler: no host's data-wait share" in (
    epath.Path(report.build(str(tmp_path))).read_text()
  )


@pytest.mark.parametrize("rate", [14.0, 20.0])
def test_a_host_that_waits_for_its_data_is_marked_with_its_cause(tmp_path, rate):
  """It waits for its batches 30% of its step time, the other host 2%, each within 0.1%: at 30%
  lower steps/s, or at the same steps/s as in a synchronous job, where every host waits for it."""
  table = _two_hosts(
    tmp_path,
    [rate * 1.001, rate * 0.999] * 10,
    [0.301, 0.299] * 10,
    rates_0=[20.02, 19.98] * 10,
    waits_0=[0.021, 0.019] * 10,
  )
  assert table[0]["straggler"] is None
  assert table[1]["straggler"] == (
    "its input pipeline: it waits for data 30.0% of its step time, the others 2.0% (their wait "
    "for it is in their steps)"
  )
  markdown = epath.Path(report.build(str(tmp_path))).read_text()
  assert "| 1 **straggler** | node1 | 4 |" in markdown
  assert f"Process 1 is a straggler; the cause: {table[1]['straggler']}." in markdown


def test_too_few_reports_to_measure_the_noise_mark_no_host(tmp_path):
  table = _two_hosts(tmp_path, [10.0], [0.9], rates_0=[20.0], waits_0=[0.0])
  assert [row["straggler"] for row in table] == [None, None]


def test_a_restart_is_a_gap_with_a_marker_in_every_plot(tmp_path):
  """Killed after step 30 (its last report at 6.0 s), restarted from step 20 at 20.0 s: each
  host's throughput is two lines, the restart between them, and the report draws every plot."""
  hosts = {}
  for process in (0, 1):
    first, _ = _start(process, 0.0, 0, [10.0, 10.0, 10.0], [0.0] * 3)
    second, _ = _start(process, 20.0 + process, 20, [10.0, 10.0], [0.0] * 2)
    hosts[process] = first + second
  lines, restarts = report.throughput_lines(hosts)
  assert restarts == [20.0]  # The first process of the restart started 20 s after the first.
  for process in (0, 1):
    before, after = lines[process]
    assert [t for t, _, _ in before] == [4.0, 5.0, 6.0]
    assert [t for t, _, _ in after] == [24.0 + process, 25.0 + process]
    assert before[-1][0] < restarts[0] < after[0][0]
  assert report.restart_steps(hosts) == [20]
  _write_run(epath.Path(tmp_path), hosts)
  path = epath.Path(report.build(str(tmp_path)))
  assert "2 start(s) (restarts at steps 20)" in path.read_text()
  for name in ("loss.png", "throughput.png", "hosts.png", "checkpoints.png"):
    assert (path.parent / name).stat().length > 10_000


def _failed_start(at: float) -> list[dict]:
  """One start as the writers record one that ran out of memory in its first call: its start,
  then 20 s later its end (outcome FAILED, no steps; the window from the writer's creation)."""
  return [
    {
      "event": "start",
      "time": at + 3.0,
      "process": 0,
      "process_count": 1,
      "hostname": "node0",
      "devices": 8,
      "first_step": 0,
      "startup_s": 3.0,
    },
    {
      "event": "end",
      "outcome": "FAILED",
      "time": at + 23.0,
      "step": 0,
      "steps": 0,
      "window_s": 5.0,
      "steps_s": 5.0,
      "data_wait_s": 0.0,
      "checkpoint_blocked_s": 0.0,
      "eval_s": 0.0,
    },
  ]


def test_a_run_that_never_reached_a_step_is_reported_as_such(tmp_path):
  """Two starts, each out of memory before step 1: not finished, no NaN, parts that add up to the
  wall time (each start's time after its startup is its compile), plots that say so."""
  workdir = epath.Path(tmp_path)
  (workdir / "hosts").mkdir()
  records = _failed_start(0.0) + _failed_start(30.0)
  (workdir / "hosts" / "process_0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  path = epath.Path(report.build(str(workdir)))

  def no_nan(constant):
    raise AssertionError(f"summary.json holds {constant}")

  summary = json.loads((path.parent / "summary.json").read_text(), parse_constant=no_nan)
  assert summary["finished"] is False and summary["outcome"] == "failed"
  assert summary["last_step"] is None and summary["starts"] == 2
  assert summary["hosts"][0]["steps_per_sec"] is None
  assert summary["hosts"][0]["data_wait_share"] is None
  assert summary["wall_s"] == 2 * 23.0
  assert summary["goodput_s"] == {
    **dict.fromkeys(report.GOODPUT_PARTS, 0.0),
    "startup": 6.0,
    "compile": 40.0,
  }
  markdown = path.read_text()
  assert "2 start(s) (restarts at steps 0); its last start failed before its first step" in markdown
  assert "| 0 | node0 | 8 | no steps | no steps | 0 |" in markdown
  assert report.ONE_HOST in markdown
  for name in ("loss.png", "throughput.png", "hosts.png", "checkpoints.png"):
    assert (path.parent / name).stat().length > 5_000


def test_one_process_says_there_is_nothing_to_compare(tmp_path):
  workdir = epath.Path(tmp_path)
  records, now = _start(0, 0.0, 0, [20.0] * 3, [0.02] * 3)
  records.append(
    {
      "event": "end",
      "outcome": "FINISHED",
      "time": now + 0.5,
      "step": 30,
      "steps": 0,
      "window_s": 0.5,
      "steps_s": 0.0,
      "data_wait_s": 0.0,
      "checkpoint_blocked_s": 0.0,
      "eval_s": 0.0,
    }
  )
  _write_run(workdir, {0: records})
  path = epath.Path(report.build(str(workdir)))
  markdown = path.read_text()
  assert "1 process(es), 1 start(s) (no restart); it finished at step 30." in markdown
  assert f"| 0 | node0 | 4 | 20.00 | 2.0% | 30 |\n\n{report.ONE_HOST}\n" in markdown
  summary = json.loads((path.parent / "summary.json").read_text())
  assert summary["finished"] is True and summary["last_step"] == 30


def test_the_finished_line_shows_the_loss_first_and_this_starts_time():
  """After a resume the first report held the eval metrics before the loss: the line's order is
  the same as a fresh run's, and its time is named as the last start's."""
  resumed = {"eval_loss": 2.04, "eval_accuracy": 0.4521, "learning_rate": 0.1, "loss": 2.363}
  fresh = {"loss": 2.363, "eval_loss": 2.04, "eval_accuracy": 0.4521}
  metrics = "loss 2.363, eval_loss 2.04, eval_accuracy 0.4521. Outputs in /tmp/run;"
  assert writers.finished_line(300, 0, fresh, 45.2, "/tmp/run").startswith(
    f"finished 300 steps in 0:00:45: {metrics}"
  )
  assert writers.finished_line(300, 200, resumed, 16.0, "/tmp/run").startswith(
    f"finished 300 steps (this start: from step 200, in 0:00:16): {metrics}"
  )
