"""Run directories on every kind of storage: gs:// on a real local GCS emulator, hosts that do not
share the workdir, and bad storage input."""

import errno
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import pytest
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.util import tensor_util

from launcher import storage, train
from launcher.errors import EXIT_STORAGE_UNREACHABLE, EXIT_USAGE, UsageError
from launcher.local import free_port, process_env
from tests.helpers import (
  REPO,
  assert_close,
  finish,
  launcher_command,
  load_config,
  load_params,
  losses_by_step,
  read_metrics,
  start,
  wait_for,
)

pytestmark = pytest.mark.slow  # Starts processes or trains for seconds.

CONFIG = "--config=tests/hooked_config.py"


def scalars(events_file, tag: str) -> dict[int, float]:
  """The values of `tag` by step in one TensorBoard event file, as TensorBoard reads them."""
  return {
    event.step: float(tensor_util.make_ndarray(value.tensor))
    for event in EventFileLoader(str(events_file)).Load()
    for value in event.summary.value
    if value.tag == tag
  }


def log_of(path) -> str:
  return open(path, encoding="utf-8", errors="replace").read()


def test_a_gs_run_survives_kill_9_and_continues_exactly(gcs, straight, tmp_path):
  mirror = gcs.bucket("runs") / "killed"  # What the bucket holds, object by object.
  args = [CONFIG, "--workdir=gs://runs/killed"]
  log = tmp_path / "run.log"
  process = start(launcher_command(*args, "--config.slow_from_batch=22"), log, env=gcs.env)
  wait_for(
    lambda: (mirror / "checkpoints" / "20" / "commit_success.txt").exists(),
    120,
    "the step-20 checkpoint in the bucket",
    process,
  )
  process.kill()
  process.wait()
  steps_before = [row["step"] for row in read_metrics(mirror)]
  assert steps_before == list(range(1, len(steps_before) + 1)) and len(steps_before) >= 20

  assert finish(start(launcher_command(*args), log, env=gcs.env), 180) == 0, log_of(log)[-3000:]
  assert "resuming from the checkpoint of step 20" in log_of(log)
  for a, b in zip(
    jax.tree.leaves(load_params(str(mirror), 40)), jax.tree.leaves(load_params(straight("1x8"), 40))
  ):
    assert (a == b).all()
  resumed, uninterrupted = losses_by_step(str(mirror)), losses_by_step(straight("1x8"))
  assert [resumed[s] for s in range(21, 41)] == [uninterrupted[s] for s in range(21, 41)]

  # Every file of the run is in the bucket; nothing landed on the local disk.
  assert not (pathlib.Path(REPO, "gs:")).exists() and not (tmp_path / "gs:").exists()
  assert json.loads((mirror / "config.json").read_text())["num_steps"] == 40
  starts = [json.loads(line) for line in (mirror / "hosts" / "process_0.jsonl").open()]
  assert [r["first_step"] for r in starts if r["event"] == "start"] == [0, 20]
  # Each start's TensorBoard file is whole: every report of that start, as plain scalars.
  first, second = [scalars(path, "loss") for path in sorted(mirror.glob("events.out.tfevents.*"))]
  assert list(first) == steps_before and list(second) == list(range(21, 41))
  assert [first[s] for s in range(1, 21)] == pytest.approx([resumed[s] for s in range(1, 21)])
  assert [second[s] for s in second] == pytest.approx([resumed[s] for s in second])

  report = subprocess.run(
    [sys.executable, "-m", "launcher.report", "gs://runs/killed"],
    cwd=REPO,
    env={**os.environ, **gcs.env},
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert report.returncode == 0, report.stderr[-3000:]
  assert "wrote gs://runs/killed/report/report.md" in report.stdout
  assert "2 start(s) (restarts at steps 20)" in (mirror / "report" / "report.md").read_text()
  assert (mirror / "report" / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_two_processes_share_a_gs_workdir_and_save_on_preemption(gcs, straight, tmp_path):
  mirror = gcs.bucket("runs") / "preempted"
  args = [CONFIG, "--workdir=gs://runs/preempted"]
  log = tmp_path / "run.log"
  runner = launcher_command(*args, "--config.slow_from_batch=8", num_processes=2, devices=4)
  runner.insert(runner.index("--"), f"--process_logs={tmp_path / 'logs'}")
  process = start(runner, log, devices=4, env=gcs.env)
  wait_for(
    lambda: (mirror / "metrics.jsonl").exists() and len(read_metrics(mirror)) >= 6,
    120,
    "step 6",
    process,
  )
  last_child = int(
    subprocess.run(
      ["pgrep", "-P", str(process.pid)], capture_output=True, text=True
    ).stdout.split()[-1]
  )
  os.kill(last_child, 10)  # SIGUSR1, as SLURM's --signal sends it, to one process only.
  assert finish(process, 90) == 75, log_of(log)[-3000:]
  saved = sorted(
    int(p.name) for p in (mirror / "checkpoints").iterdir() if (p / "commit_success.txt").exists()
  )
  assert saved == [max(losses_by_step(str(mirror)))] and 6 <= saved[0] < 20
  assert log_of(log).count("stopped on a preemption notice") == 2
  assert (tmp_path / "logs" / "process_1.log").exists()  # Logs stay on this machine.

  restart = launcher_command(*args, num_processes=2, devices=4)
  assert finish(start(restart, log, devices=4, env=gcs.env), 180) == 0, log_of(log)[-3000:]
  config = load_config("../tests/hooked_config")
  assert_close(config, load_params(str(mirror), 40), load_params(straight("1x8"), 40))
  two, one = losses_by_step(str(mirror)), losses_by_step(straight("1x8"))
  assert list(two) == list(range(1, 41))
  assert [two[s] for s in two] == pytest.approx([one[s] for s in one], rel=1e-4)
  hosts = {p.name for p in (mirror / "hosts").iterdir()}
  assert hosts == {"process_0.jsonl", "process_1.jsonl"}


def test_a_bucket_outage_is_waited_out_within_the_bound_then_ends_in_one_line(
  gcs, straight, tmp_path
):
  """The emulator stopped for 5 s mid-run: the run goes on, every step is reported once, the
  numbers are the uninterrupted run's. Stopped for longer than --storage_timeout_seconds: one
  line and exit 69 within the bound, the step-20 checkpoint complete in the bucket."""
  uninterrupted = losses_by_step(straight("1x8"))
  log = tmp_path / "run.log"
  mirror = gcs.bucket("runs") / "outage"
  args = [CONFIG, "--workdir=gs://runs/outage", "--storage_timeout_seconds=60"]
  process = start(
    launcher_command(*args, "--config.slow_from_batch=8", "--config.slow_seconds=0.25"),
    log,
    env=gcs.env,
  )
  wait_for(
    lambda: (mirror / "metrics.jsonl").exists() and len(read_metrics(mirror)) >= 12,
    120,
    "step 12",
    process,
  )
  gcs.stop()
  time.sleep(5)
  gcs.start()
  assert finish(process, 120) == 0, log_of(log)[-3000:]
  assert [row["step"] for row in read_metrics(mirror)] == list(range(1, 41))
  assert losses_by_step(str(mirror)) == uninterrupted
  for a, b in zip(
    jax.tree.leaves(load_params(str(mirror), 40)), jax.tree.leaves(load_params(straight("1x8"), 40))
  ):
    assert (a == b).all()

  log = tmp_path / "gone.log"
  mirror = gcs.bucket("runs") / "gone"
  args = [CONFIG, "--workdir=gs://runs/gone", "--storage_timeout_seconds=6"]
  process = start(
    launcher_command(*args, "--config.slow_from_batch=8", "--config.slow_seconds=0.25"),
    log,
    env=gcs.env,
  )
  wait_for(
    lambda: (mirror / "checkpoints" / "20" / "commit_success.txt").exists(),
    120,
    "the step-20 checkpoint",
    process,
  )
  gcs.stop()
  stopped = time.monotonic()
  try:
    assert finish(process, 60) == EXIT_STORAGE_UNREACHABLE, log_of(log)[-3000:]
  finally:
    gcs.start()
  assert time.monotonic() - stopped < 6 + 5
  errors = [line for line in log_of(log).splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "Traceback" not in log_of(log), log_of(log)[-3000:]
  assert errors[0].startswith(
    "error: the storage of gs://runs did not answer within --storage_timeout_seconds=6 while "
  ), errors
  assert errors[0].endswith("it resumes from its last complete checkpoint once the storage answers")
  # What it leaves is what a kill leaves, which the same command resumes from (the kill test
  # above): the step-20 checkpoint, complete.
  assert (mirror / "checkpoints" / "20" / "commit_success.txt").exists()


def test_appends_on_gcs_keep_every_line(gcs, tmp_path):
  """gcsfs's own open("a") keeps 1 of 30 appended lines; the Appender keeps all, across writers,
  and deletes the uploads a killed writer left."""
  gcs.bucket("appends")
  script = (
    "import sys\nfrom launcher import storage\n"
    "for start, count in ((0, 30), (30, 5)):\n"
    "  if start:  # An upload that a kill left behind, which the next writer deletes.\n"
    "    storage.write_text(storage.path('gs://appends/a/.log.jsonl.part-0'), 'torn\\n')\n"
    "  log = storage.Appender(storage.path('gs://appends/a/log.jsonl'))\n"
    "  for i in range(start, start + count):\n"
    "    log.write(f'{i}\\n')\n"
    "    log.flush()\n"
    "  log.close()\n"
  )
  subprocess.run(
    [sys.executable, "-c", script], cwd=REPO, env={**os.environ, **gcs.env}, timeout=60, check=True
  )
  lines = (gcs.root / "appends" / "a" / "log.jsonl").read_text().splitlines()
  assert lines == [str(i) for i in range(35)]
  assert [p.name for p in (gcs.root / "appends" / "a").iterdir()] == ["log.jsonl"]
  # An object that ends in a partial line gets the next line on a line of its own.
  torn = (
    "from launcher import storage\n"
    "storage.write_text(storage.path('gs://appends/a/torn.jsonl'), '{\"step\": 1}\\n{\"st')\n"
    "log = storage.Appender(storage.path('gs://appends/a/torn.jsonl'))\n"
    "log.write('{\"step\": 2}\\n')\n"
    "log.close()\n"
    "print(storage.read_jsonl(storage.path('gs://appends/a/torn.jsonl')))\n"
  )
  result = subprocess.run(
    [sys.executable, "-c", torn],
    cwd=REPO,
    env={**os.environ, **gcs.env},
    timeout=60,
    check=True,
    capture_output=True,
    text=True,
  )
  assert (
    gcs.root / "appends" / "a" / "torn.jsonl"
  ).read_text() == '{"step": 1}\n{"st\n{"step": 2}\n'
  assert result.stdout.strip() == "[{'step': 1}, {'step': 2}]"
  assert "skipped 1 unreadable line(s) of gs://appends/a/torn.jsonl" in result.stderr
  # A compose that runs twice (gcsfs retries one whose answer was lost) leaves each line once.
  twice = (
    "from launcher import storage\n"
    "log = storage.Appender(storage.path('gs://appends/a/twice.jsonl'))\n"
    "compose = log._compose\n"
    "log._compose = lambda part: (compose(part), compose(part))[1]\n"
    "for i in range(3):\n"
    "  log.write(f'{i}\\n')\n"
    "  log.flush()\n"
    "log.close()\n"
  )
  subprocess.run(
    [sys.executable, "-c", twice], cwd=REPO, env={**os.environ, **gcs.env}, timeout=60, check=True
  )
  assert (gcs.root / "appends" / "a" / "twice.jsonl").read_text() == "0\n1\n2\n"


def test_a_missing_bucket_is_one_line_before_any_compute(gcs, tmp_path):
  result = subprocess.run(
    launcher_command(CONFIG, "--workdir=gs://no-such-bucket/run"),
    cwd=REPO,
    env={**os.environ, **gcs.env},
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert result.returncode == EXIT_USAGE
  assert result.stderr.strip().splitlines()[-1] == (
    "error: cannot write into gs://no-such-bucket/run: the bucket gs://no-such-bucket does not "
    "exist (or this account cannot see it): create it (gcloud storage buckets create "
    "gs://no-such-bucket) or fix the name"
  )
  assert "Traceback" not in result.stderr and "params" not in result.stderr
  assert not (gcs.root / "no-such-bucket").exists() and not (pathlib.Path(REPO, "gs:")).exists()


@pytest.mark.parametrize(
  "workdir, message",
  [
    (
      "s3://bucket/run",
      r"the scheme s3:// is not supported; a run's files live on a local disk, "
      r"a shared filesystem \(a plain path\) or in GCS \(gs://bucket/path\)",
    ),
    ("gs://Bad_Bucket!/run", r"'Bad_Bucket!' is not a GCS bucket name"),
    ("gs:///run", r"'' is not a GCS bucket name"),
    ("{file}", r"a file stands where a directory must be .*choose another --workdir"),
    ("{file}/run", r"a file stands where a directory must be .*choose another --workdir"),
    ("/proc/run", r"cannot create /proc/run"),
  ],
)
def test_bad_workdirs_are_one_clear_error_and_write_nothing(workdir, message, tmp_path):
  (tmp_path / "file").write_text("keep me")
  workdir = workdir.format(file=tmp_path / "file")
  with pytest.raises(UsageError, match=message):
    train.run(load_config("../tests/hooked_config", num_steps=1), workdir)
  assert (tmp_path / "file").read_text() == "keep me"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
  assert not (pathlib.Path(REPO, "gs:")).exists() and not (pathlib.Path(REPO, "s3:")).exists()


def test_processes_that_do_not_share_the_workdir_stop_at_once_naming_them(tmp_path):
  """Each process gets its own directory, as hosts with their own disks would."""
  port = free_port()
  processes = [
    start(
      launcher_command(CONFIG, f"--workdir={tmp_path / f'host_{i}'}"),
      tmp_path / f"process_{i}.log",
      devices=4,
      env=process_env(i, 2, 4, port),
    )
    for i in range(2)
  ]
  began = time.monotonic()
  codes = [finish(process, 120) for process in processes]
  assert time.monotonic() - began < 60
  assert codes == [EXIT_USAGE, EXIT_USAGE]
  for i in range(2):
    lines = log_of(tmp_path / f"process_{i}.log").strip().splitlines()
    assert lines[-1].startswith(
      f"error: process(es) 1 ({os.uname().nodename}) do not see the "
      f"workdir {tmp_path / 'host_0'} that process 0"
    ), lines[-5:]
    assert lines[-1].endswith(
      "use a filesystem shared by every host, or a gs://bucket/path workdir"
    )
  # Nothing was trained or saved: process 0 wrote its token, process 1 nothing at all.
  assert [p.name for p in (tmp_path / "host_0").iterdir()] == [".workdir_token"]
  assert not (tmp_path / "host_1").exists()


def test_paths_of_the_one_layer():
  assert os.fspath(storage.path("gs://bucket/a/b")) == "gs://bucket/a/b"
  assert os.fspath(storage.path("relative/dir")) == os.path.abspath("relative/dir")
  assert storage.is_remote(storage.path("gs://bucket/x"))
  assert not storage.is_remote(storage.path("/tmp/x"))


def test_a_save_and_restore_longer_than_the_bound_complete_while_bytes_move(gcs, tmp_path):
  """--storage_timeout_seconds bounds silence, not work: a 196 MB state whose save and restore
  each take longer than the 1 s bound on a healthy bucket saves, commits and resumes."""
  mirror = gcs.bucket("runs") / "big"
  args = [
    CONFIG,
    "--workdir=gs://runs/big",
    "--storage_timeout_seconds=1",
    "--config.hidden_sizes=(4096,4096)",
    "--config.num_steps=2",
    "--config.checkpoint_every_steps=2",
  ]
  log = tmp_path / "big.log"
  assert finish(start(launcher_command(*args), log, env=gcs.env), 240) == 0, log_of(log)[-3000:]
  step = mirror / "checkpoints" / "2"
  objects = [p for p in step.rglob("*") if p.is_file()]
  assert (step / "commit_success.txt").exists()
  assert sum(p.stat().st_size for p in objects) > 150e6
  saving = (step / "commit_success.txt").stat().st_mtime - min(p.stat().st_mtime for p in objects)
  # The run continued from it: restored, two more steps, saved again.
  more = launcher_command(*args, "--config.num_steps=4")
  assert finish(start(more, log, env=gcs.env), 240) == 0, log_of(log)[-3000:]
  restoring = float(re.findall(r"restore ([\d.]+) s", log_of(log))[-1])
  print(f"save {saving:.2f} s, restore {restoring:.2f} s, bound 1 s")
  # Work, not silence: each past the bound. (A larger state is no stronger test: the emulator is
  # silent for over a second while it writes an object of a few hundred MB to its disk.)
  assert saving > 1 and restoring > 1
  assert "resuming from the checkpoint of step 2" in log_of(log) and "error:" not in log_of(log)
  assert (mirror / "checkpoints" / "4" / "commit_success.txt").exists()


def test_a_silent_storage_is_cut_at_the_bound_and_a_barrier_is_not_its_silence(gcs, tmp_path):
  """A SIGSTOPped emulator (connections accepted, nothing answered) ends a read in one line and
  exit 69 near the 2 s bound; 4 s spent inside a bounded block that waits on no request (a
  barrier with the other processes, in orbax) is not the storage's silence."""
  gcs.bucket("silent")
  script = (
    "import sys, time\nfrom launcher import storage\n"
    "storage.bound_calls(2)\n"
    "p = storage.path('gs://silent/x')\n"
    "storage.write_text(p, 'x')\n"
    "with storage.bounded('waiting for the other processes', p):\n"
    "  time.sleep(4)\n"
    "print('waited', flush=True)\n"
    "sys.stdin.readline()\n"
    "storage.read_text(p)\n"
  )
  process = subprocess.Popen(
    [sys.executable, "-c", script],
    cwd=REPO,
    env={**os.environ, **gcs.env},
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    assert process.stdout.readline() == "waited\n", process.stderr.read()
    os.kill(gcs._process.pid, signal.SIGSTOP)  # pylint: disable=protected-access
    stopped = time.monotonic()
    process.stdin.write("\n")
    process.stdin.flush()
    assert process.wait(60) == EXIT_STORAGE_UNREACHABLE
    silent = time.monotonic() - stopped
  finally:
    os.kill(gcs._process.pid, signal.SIGCONT)  # pylint: disable=protected-access
    process.kill()
  errors = [line for line in process.stderr.read().splitlines() if line.startswith("error:")]
  assert errors == [
    "error: the storage of gs://silent did not answer within --storage_timeout_seconds=2 while "
    "reading gs://silent/x. The run stopped with exit code 69, which supervisors restart "
    "(launcher.local --max_restarts, the cluster scripts' MAX_RESTARTS): it resumes from its "
    "last complete checkpoint once the storage answers"
  ]
  assert silent >= 2
  print(f"cut after {silent:.1f} s of silence")


def test_a_damaged_checkpoint_set_aside_on_gs_is_saved_again(gcs, tmp_path):
  """The newest checkpoint damaged in the bucket: the resume (2 processes: each lists the bucket
  through its own clients) sets it aside, trains from the one before, saves that same step again
  (every process's orbax lists the bucket afresh) and finishes."""
  mirror = gcs.bucket("runs") / "damaged"
  args = [CONFIG, "--workdir=gs://runs/damaged", "--config.checkpoint_every_steps=10"]
  log = tmp_path / "run.log"

  def two_processes(*more):
    runner = launcher_command(*args, *more, num_processes=2, devices=4)
    runner.insert(runner.index("--"), f"--process_logs={tmp_path / 'logs'}")
    return start(runner, log, devices=4, env=gcs.env)

  assert finish(two_processes("--config.num_steps=20"), 180) == 0, log_of(log)[-3000:]
  (mirror / "checkpoints" / "20" / "state" / "_METADATA").write_text("{damaged")
  assert finish(two_processes(), 180) == 0, log_of(log)[-3000:]
  assert "the checkpoint of step 20 in gs://runs/damaged/checkpoints cannot be read" in log_of(log)
  assert "resuming from the checkpoint of step 10" in log_of(log)
  for saved in (20, 30, 40):
    assert (mirror / "checkpoints" / str(saved) / "commit_success.txt").exists()
  assert (mirror / "damaged_checkpoints" / "20" / "state" / "_METADATA").read_text() == "{damaged"
  assert "Traceback" not in log_of(log)


def test_a_silent_bucket_ends_a_supervised_job_with_69(gcs, tmp_path):
  """The bucket stops answering mid-run under launcher.local: the processes end with the storage's
  line and 69, and the runner, whose own look at the workdir (for its line) gets no answer
  either, still ends with 69 instead of waiting on the bucket."""
  mirror = gcs.bucket("runs") / "silent-job"
  log = tmp_path / "run.log"
  runner = launcher_command(
    CONFIG,
    "--workdir=gs://runs/silent-job",
    "--storage_timeout_seconds=3",
    "--config.slow_from_batch=4",
    "--config.slow_seconds=0.3",
    num_processes=2,
    devices=4,
  )
  runner.insert(runner.index("--"), f"--process_logs={tmp_path / 'logs'}")
  process = start(runner, log, devices=4, env=gcs.env)
  wait_for(
    lambda: (mirror / "metrics.jsonl").exists() and len(read_metrics(mirror)) >= 5,
    120,
    "step 5",
    process,
  )
  os.kill(gcs._process.pid, signal.SIGSTOP)  # pylint: disable=protected-access
  try:
    assert finish(process, 90) == EXIT_STORAGE_UNREACHABLE, log_of(log)[-3000:]
  finally:
    os.kill(gcs._process.pid, signal.SIGCONT)  # pylint: disable=protected-access
  assert "did not answer within --storage_timeout_seconds=3" in log_of(log)
  assert "Traceback" not in log_of(log)


def test_two_writers_of_one_gcs_file_keep_every_row(gcs, tmp_path):
  """Two Appenders on one file (a requeued job while the old one still runs), flushes
  interleaved, the second opening while the first's flush may be in flight: every row of both
  survives, each once, and one warning names the other writer."""
  gcs.bucket("appends")
  script = (
    "from launcher import storage\n"
    "p = storage.path('gs://appends/two/log.jsonl')\n"
    "a = storage.Appender(p)\n"
    "a.write('a0\\n'); a.flush()\n"
    "b = storage.Appender(p)  # Deletes leftover parts: a's part in flight, maybe.\n"
    "for i in range(1, 6):\n"
    "  a.write(f'a{i}\\n'); a.flush(); a._wait_for_upload()\n"
    "  b.write(f'b{i}\\n'); b.flush(); b._wait_for_upload()\n"
    "a.close(); b.close()\n"
  )
  result = subprocess.run(
    [sys.executable, "-c", script],
    cwd=REPO,
    env={**os.environ, **gcs.env},
    timeout=120,
    check=True,
    capture_output=True,
    text=True,
  )
  rows = (gcs.root / "appends" / "two" / "log.jsonl").read_text().splitlines()
  assert sorted(rows) == sorted([f"a{i}" for i in range(6)] + [f"b{i}" for i in range(1, 6)])
  assert result.stderr.count("another writer appends to it") == 2, result.stderr[-2000:]
  assert [p.name for p in (gcs.root / "appends" / "two").iterdir()] == ["log.jsonl"]


def test_a_writer_whose_composed_part_another_writer_deleted_goes_on(gcs):
  """A second writer opens the file right after the first composed its part and before the first
  deletes it (it deletes such parts as a killed writer's leftovers): the first writer goes on, and
  every row of both is in the file once."""
  gcs.bucket("appends")
  script = (
    "from launcher import storage\n"
    "p = storage.path('gs://appends/race/log.jsonl')\n"
    "class First(storage.Appender):\n"
    "  def _compose_if_part_exists(self, part):\n"
    "    composed = super()._compose_if_part_exists(part)\n"
    "    second.append(storage.Appender(p))  # Opens now: deletes the composed part.\n"
    "    return composed\n"
    "second = []\n"
    "a = First(p)\n"
    "a.write('a0\\n'); a.flush(); a._wait_for_upload()\n"
    "a.write('a1\\n'); a.flush(); a._wait_for_upload()\n"
    "a.write('a2\\n'); a.close()\n"
    "second[0].write('b1\\n'); second[0].close()\n"
  )
  subprocess.run(
    [sys.executable, "-c", script],
    cwd=REPO,
    env={**os.environ, **gcs.env},
    timeout=120,
    check=True,
    capture_output=True,
    text=True,
  )
  rows = (gcs.root / "appends" / "race" / "log.jsonl").read_text().splitlines()
  assert sorted(rows) == ["a0", "a1", "a2", "b1"]
  assert [p.name for p in (gcs.root / "appends" / "race").iterdir()] == ["log.jsonl"]


def test_read_errors_are_never_a_refused_write_and_a_lost_peer_is_not_the_storage(tmp_path):
  """`refusal` (exit 74, "cannot write") is for writes into the workdir only; jax's runtime
  errors (gloo's reset connection of a lost peer, a coordination barrier's deadline) are never
  "storage did not answer" (69) though their words match a connection error's."""
  workdir = str(tmp_path / "run")
  corpus = PermissionError(errno.EACCES, "Permission denied", "/data/corpus/part-0.parquet")
  assert storage.refusal(corpus, workdir, 20) is None
  forbidden = OSError(
    "403 Forbidden: runner@p.iam.gserviceaccount.com does not have storage.objects.get access "
    'to "gs://corpora/web/part-0.parquet"'
  )
  assert storage.refusal(forbidden, "gs://runs/a", 20) is None
  written = PermissionError(errno.EACCES, "Permission denied", f"{workdir}/metrics.jsonl")
  assert storage.refusal(written, workdir, 20).startswith(
    f"cannot write {workdir}/metrics.jsonl: permission denied"
  )
  full = OSError(errno.ENOSPC, "No space left on device", f"{workdir}/checkpoints/20/x")
  assert "the filesystem is full" in storage.refusal(full, workdir, None)
  for message in (
    "Gloo AllGather failed: [../gloo/transport/tcp/pair.cc:534] Read error: Connection reset by peer",
    "DEADLINE_EXCEEDED: Barrier timed out. Id: orbax_save_20. # of tasks that reached the barrier: 1",
  ):
    assert not storage.is_unreachable(jax.errors.JaxRuntimeError(message))
  assert storage.is_unreachable(ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"))
