"""Kill a run any way you like; the next start continues it as if nothing happened.

Runs use tests/hooked_config.py: the classifier, 40 steps, a report every step and a checkpoint
every 20. Interrupted runs are slowed down after a chosen batch so the kill lands where it should.
"""

import glob
import json
import os
import resource
import shutil
import signal
import subprocess
import threading
import tracemalloc  # noqa: F401  # pylint: disable=unused-import

import jax
import numpy as np
import pytest

from launcher import checkpoint, storage, train
from launcher import workload as workload_lib
from launcher.errors import NonFiniteError, TransientError, UsageError
from tests.helpers import (
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
LAYOUTS = {"1x8": (1, 8), "2x4": (2, 4)}


def run_to_end(workdir, layout, *overrides, timeout=180):
  num_processes, devices = LAYOUTS[layout]
  process = start(
    launcher_command(
      CONFIG, f"--workdir={workdir}", *overrides, num_processes=num_processes, devices=devices
    ),
    f"{workdir}.log",
    devices=devices,
  )
  return finish(process, timeout)


def complete_checkpoints(workdir):
  return sorted(
    int(os.path.basename(d))
    for d in glob.glob(os.path.join(workdir, "checkpoints", "*"))
    if os.path.basename(d).isdigit()
  )


def assert_same_run(workdir, reference, from_step):
  """Bitwise equal final params and equal per-step losses after `from_step`."""
  for a, b in zip(
    jax.tree.leaves(load_params(workdir, 40)), jax.tree.leaves(load_params(reference, 40))
  ):
    np.testing.assert_array_equal(a, b)
  resumed, uninterrupted = losses_by_step(workdir), losses_by_step(reference)
  assert [resumed[s] for s in range(from_step + 1, 41)] == [
    uninterrupted[s] for s in range(from_step + 1, 41)
  ]


def process_tree(pid):
  """`pid` and every process below it, read from /proc."""
  children = subprocess.run(
    ["pgrep", "-P", str(pid)], capture_output=True, text=True
  ).stdout.split()
  return [pid] + [p for child in children for p in process_tree(int(child))]


def alive(pids):
  return [
    p
    for p in pids
    if os.path.exists(f"/proc/{p}") and "zombie" not in open(f"/proc/{p}/status").read()
  ]


# One process killed and resumed: tests/test_storage.py's gs:// run (the same path, remote).
@pytest.mark.parametrize("layout", ["2x4"])
def test_sigkill_after_a_checkpoint_then_restart_continues_exactly(layout, straight, tmp_path):
  workdir = str(tmp_path / "run")
  num_processes, devices = LAYOUTS[layout]
  process = start(
    launcher_command(
      CONFIG,
      f"--workdir={workdir}",
      "--config.slow_from_batch=22",
      num_processes=num_processes,
      devices=devices,
    ),
    f"{workdir}.log",
    devices=devices,
  )
  wait_for(lambda: 20 in complete_checkpoints(workdir), 120, "the step-20 checkpoint", process)
  everyone = process_tree(process.pid)
  assert len(everyone) >= 1 + (num_processes if num_processes > 1 else 0)
  process.kill()  # SIGKILL to the launcher, or to the local runner of a 2-process job.
  process.wait()
  # The runner's children die with it: no orphan keeps training.
  wait_for(lambda: not alive(everyone), 10, "every process of the job to end")
  assert complete_checkpoints(workdir) == [20]

  assert run_to_end(workdir, layout) == 0, open(f"{workdir}.log").read()[-3000:]
  assert "resuming from the checkpoint of step 20" in open(f"{workdir}.log").read()
  assert_same_run(workdir, straight(layout), from_step=20)


# SIGUSR1 to two processes: tests/test_storage.py's shared gs:// workdir (the same path, remote).
@pytest.mark.parametrize("layout, signum", [("1x8", signal.SIGTERM)])
def test_preemption_notice_saves_at_one_step_and_loses_none(layout, signum, straight, tmp_path):
  workdir = str(tmp_path / "run")
  num_processes, devices = LAYOUTS[layout]
  process = start(
    launcher_command(
      CONFIG,
      f"--workdir={workdir}",
      "--config.slow_from_batch=8",
      num_processes=num_processes,
      devices=devices,
    ),
    f"{workdir}.log",
    devices=devices,
  )
  wait_for(
    lambda: (
      os.path.exists(os.path.join(workdir, "metrics.jsonl")) and len(read_metrics(workdir)) >= 6
    ),
    120,
    "step 6",
    process,
  )
  # The notice reaches one process only (the last); the job must agree to stop as a whole.
  target = (
    process.pid
    if num_processes == 1
    else int(
      subprocess.run(
        ["pgrep", "-P", str(process.pid)], capture_output=True, text=True
      ).stdout.split()[-1]
    )
  )
  os.kill(target, signum)
  assert finish(process, 60) == 75, open(f"{workdir}.log").read()[-3000:]
  saved = complete_checkpoints(workdir)
  last_reported = max(losses_by_step(workdir))
  assert saved == [last_reported] and 6 <= last_reported < 20
  log = open(f"{workdir}.log").read()
  assert (
    f"stopped on a preemption notice after saving the checkpoint of step {last_reported}" in log
  )
  if num_processes > 1:
    assert log.count("stopped on a preemption notice") == num_processes

  assert run_to_end(workdir, layout) == 0, open(f"{workdir}.log").read()[-3000:]
  assert_same_run(workdir, straight(layout), from_step=last_reported)


def test_killed_in_the_middle_of_a_save_restores_the_previous_one(tmp_path):
  """A big state makes each save long enough to kill it while its files are being written."""
  workdir = str(tmp_path / "run")
  args = [
    CONFIG,
    f"--workdir={workdir}",
    "--config.hidden_sizes=(2048,2048)",
    "--config.num_steps=15",
    "--config.checkpoint_every_steps=5",
    "--config.log_every_steps=5",
  ]
  process = start(launcher_command(*args), f"{workdir}.log")
  partial = wait_for(
    lambda: glob.glob(os.path.join(workdir, "checkpoints", "10.*tmp*")),
    120,
    "the step-10 save to start",
    process,
  )
  process.kill()
  process.wait()
  assert os.path.exists(partial[0]) and complete_checkpoints(workdir) == [5]

  assert finish(start(launcher_command(*args), f"{workdir}.log"), 180) == 0
  assert "resuming from the checkpoint of step 5" in open(f"{workdir}.log").read()
  assert complete_checkpoints(workdir)[-1] == 15


def test_divergence_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
  config = load_config(
    "../tests/hooked_config", nan_at_batch=25, checkpoint_every_steps=10, log_every_steps=10
  )
  with pytest.raises(
    NonFiniteError,
    match=r"training diverged: \{'loss': nan, 'grad_norm': nan\} "
    r"in the steps up to step 30; the checkpoint of step 20 is kept",
  ):
    train.run(config, str(tmp_path))
  assert complete_checkpoints(str(tmp_path)) == [10, 20]
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(load_params(str(tmp_path))))


def test_skipped_nonfinite_steps_are_counted_and_change_nothing(tmp_path):
  config = load_config(
    "../tests/hooked_config",
    nan_at_batch=25,
    skip_nonfinite_steps=True,
    checkpoint_every_steps=0,
    num_steps=30,
    log_every_steps=10,
  )
  state = train.run(config, str(tmp_path))
  rows = read_metrics(str(tmp_path))
  assert [row["skipped_steps"] for row in rows] == [0, 0, 1]
  assert all(np.isfinite(row["loss"]) for row in rows)
  assert int(state.step) == 30 and int(state.skipped_steps) == 1
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
  assert rows[-1]["checkpoint_blocked_s"] >= 0


def test_restore_from_another_run_and_mismatches_named(tmp_path):
  first = str(tmp_path / "first")
  train.run(load_config("../tests/hooked_config", num_steps=20, log_every_steps=20), first)
  saved = load_params(first)

  second = str(tmp_path / "second")
  state = train.run(
    load_config("../tests/hooked_config", num_steps=1, restore_from=first, learning_rate=1e-30),
    second,
  )
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(saved)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  assert int(state.step) == 1  # Params only: a fresh optimizer from step 0.

  with pytest.raises(
    UsageError,
    match=r"(?s)does not match this config \(3 entries differ\).*"
    r"params/Dense_0/kernel: checkpoint shape \(64, 64\), this config's \(64, 32\)",
  ):
    train.run(
      load_config("../tests/hooked_config", hidden_sizes=(32,), restore_from=first),
      str(tmp_path / "third"),
    )
  before = os.listdir(os.path.join(first, "checkpoints"))
  saved_config = open(os.path.join(first, "config.json")).read()
  with pytest.raises(UsageError, match="Use the config it was saved with, or a new --workdir"):
    train.run(load_config("../tests/hooked_config", hidden_sizes=(32,)), first)
  assert os.listdir(os.path.join(first, "checkpoints")) == before
  assert open(os.path.join(first, "config.json")).read() == saved_config


@pytest.mark.parametrize(
  "override, message",
  [
    (
      {"seed": 1},
      r"was trained with config.seed=0, this run has config.seed=1: the batches depend on "
      r"it, so resuming would silently change the run. Keep --config.seed=0 to resume, start "
      r"a new run with another --workdir, or set --config.allow_data_change=True to go on",
    ),
    (
      {"batch_size": 128},
      r"was trained with config.batch_size=64, this run has "
      r"config.batch_size=128",
    ),
  ],
)
def test_a_resume_that_would_change_the_data_order_is_refused(override, message, tmp_path):
  train.run(load_config("../tests/hooked_config", num_steps=20, log_every_steps=20), str(tmp_path))
  before = sorted(os.listdir(tmp_path / "checkpoints"))
  saved_config = (tmp_path / "config.json").read_text()
  with pytest.raises(UsageError, match=message):
    train.run(load_config("../tests/hooked_config", num_steps=40, **override), str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == before
  assert (tmp_path / "config.json").read_text() == saved_config
  assert len(read_metrics(str(tmp_path))) == 1


def test_damaged_checkpoints_are_set_aside_and_the_newest_intact_one_resumes(straight, tmp_path):
  """Real damage on disk, 2 processes: step 30's array data truncated, step 20's metadata
  truncated; the next start names both, keeps them aside and resumes exactly from step 10."""
  workdir = str(tmp_path / "run")
  assert (
    run_to_end(
      workdir,
      "2x4",
      "--config.num_steps=30",
      "--config.checkpoint_every_steps=10",
    )
    == 0
  ), open(f"{workdir}.log").read()[-3000:]
  assert complete_checkpoints(workdir) == [10, 20, 30]
  data_files = glob.glob(
    os.path.join(workdir, "checkpoints", "30", "state", "ocdbt.process_*", "d", "*")
  )
  biggest = max(data_files, key=os.path.getsize)
  os.truncate(biggest, os.path.getsize(biggest) // 2)
  metadata = os.path.join(workdir, "checkpoints", "20", "state", "_METADATA")
  os.truncate(metadata, os.path.getsize(metadata) // 2)

  assert run_to_end(workdir, "2x4", "--config.checkpoint_every_steps=10") == 0, open(
    f"{workdir}.log"
  ).read()[-3000:]
  log = open(f"{workdir}.log").read()
  checkpoints = os.path.join(workdir, "checkpoints")
  aside = os.path.join(workdir, "damaged_checkpoints")
  assert (
    f"error: the checkpoint of step 30 in {checkpoints} cannot be read (ValueError: "
    "OUT_OF_RANGE: Error reading"
  ) in log
  assert f"moved it to {aside}/30 and trying the one before" in log
  assert (
    f"error: the checkpoint of step 20 in {checkpoints} cannot be read (JSONDecodeError: " in log
  ) and f"moved it to {aside}/20" in log
  assert "resuming from the checkpoint of step 10" in log and "Traceback" not in log
  assert sorted(os.listdir(aside)) == ["20", "30"]  # Kept, byte for byte.
  assert (
    os.path.getsize(os.path.join(aside, "20", "state", "_METADATA"))
    == os.path.getsize(metadata.replace(checkpoints, aside))
    > 0
  )
  assert_same_run(workdir, straight("2x4"), from_step=10)

  # Another run's newest checkpoint damaged: restore_from names it and takes the one before.
  metadata_40 = os.path.join(checkpoints, "40", "state", "_METADATA")
  os.truncate(metadata_40, 10)
  other = str(tmp_path / "other")
  assert run_to_end(other, "1x8", f"--config.restore_from={workdir}", "--config.num_steps=1") == 0
  log = open(f"{other}.log").read()
  assert (
    f"config.restore_from: the checkpoint in {checkpoints}/40 cannot be read (Damaged: "
    f"its metadata ({checkpoints}/40/state/_METADATA) cannot be parsed); trying the one "
    "before"
  ) in log
  assert f"started from {checkpoints}/30 (params only)" in log and "Traceback" not in log


def test_a_save_cut_short_leaves_nothing_after_the_next_start(tmp_path):
  """A save cut short (a kill, a second Ctrl-C) leaves orbax's temporary directory; the next start
  removes it and resumes from the last complete checkpoint."""
  config = load_config("../tests/hooked_config", num_steps=20, checkpoint_every_steps=10)
  train.run(config, str(tmp_path))
  leftover = tmp_path / "checkpoints" / "25.orbax-checkpoint-tmp"
  (leftover / "state").mkdir(parents=True)
  (leftover / "state" / "_METADATA").write_text("{")
  state = train.run(load_config("../tests/hooked_config", num_steps=30), str(tmp_path))
  assert int(state.step) == 30
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10", "20", "30"]


def test_when_every_checkpoint_is_damaged_the_run_says_it_starts_again(tmp_path, caplog):
  """Both checkpoints damaged: each is set aside, and one line says the run starts from step 0
  (it does, and finishes)."""
  config = load_config("../tests/hooked_config", num_steps=20, checkpoint_every_steps=10)
  train.run(config, str(tmp_path))
  for step in (10, 20):
    (tmp_path / "checkpoints" / str(step) / "state" / "_METADATA").write_text("{damaged")
  caplog.clear()
  state = train.run(config, str(tmp_path))
  assert int(state.step) == 20
  assert sorted(os.listdir(tmp_path / "damaged_checkpoints")) == ["10", "20"]
  assert (
    f"no checkpoint in {tmp_path}/checkpoints can be read (steps 20, 10 are in "
    f"{tmp_path}/damaged_checkpoints): the run starts again from step 0"
  ) in caplog.text


def test_a_resume_that_changes_a_data_setting_names_it_and_goes_on_only_when_allowed(tmp_path):
  """The classifier's DATA_KEYS (test_examples) are recorded and checked like the seed; an
  allowed change goes on with a warning; a checkpoint from before the record still resumes."""
  small = {"hidden_sizes": (64,), "batch_size": 64, "eval_every_steps": 0, "schedule": "constant"}
  train.run(load_config("classifier", num_steps=10, checkpoint_every_steps=10, **small), tmp_path)
  before = sorted(os.listdir(tmp_path / "checkpoints"))
  with pytest.raises(UsageError) as refused:
    train.run(load_config("classifier", num_steps=20, test_examples=200, **small), tmp_path)
  assert str(refused.value).startswith(
    f"the checkpoint of step 10 in {tmp_path}/checkpoints was trained with "
    "config.test_examples=300, this run has config.test_examples=200: the batches depend on it"
  ), refused.value
  assert "\n" not in str(refused.value)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == before
  # A change of shapes too (as the lm's seq_len makes): allow_data_change cannot help, so the
  # line is the mismatch, which does not offer it.
  with pytest.raises(UsageError) as refused:
    train.run(
      load_config(
        "classifier",
        num_steps=20,
        test_examples=200,
        **{**small, "hidden_sizes": (32,)},
      ),
      tmp_path,
    )
  assert "does not match this config" in str(refused.value)
  assert "allow_data_change" not in str(refused.value)
  state = train.run(
    load_config("classifier", num_steps=20, test_examples=200, allow_data_change=True, **small),
    tmp_path,
  )
  assert int(state.step) == 20

  # The record as the launcher wrote it before data_settings and digests: it resumes.
  record = tmp_path / "checkpoints" / "20" / "data" / "metadata"
  assert json.loads(record.read_text()) == {
    "step": 20,
    "seed": 0,
    "global_batch_size": 64,
    "data_settings": {"test_examples": 200},
  }
  record.write_text(json.dumps({"step": 20, "seed": 0, "global_batch_size": 64}))
  shutil.rmtree(tmp_path / "checkpoints" / "20" / "digests")
  state = train.run(load_config("classifier", num_steps=30, test_examples=300, **small), tmp_path)
  assert int(state.step) == 30 and not (tmp_path / "damaged_checkpoints").exists()


# Orbax's coroutines, cut short by EMFILE, are reported as never awaited: not this test's matter
# (and pytest's report of them imports tracemalloc, which must not need a file handle then).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_restore_that_runs_out_of_file_handles_retries_and_never_sets_a_checkpoint_aside(
  tmp_path, monkeypatch
):
  """A real EMFILE (RLIMIT_NOFILE below the open files) while restoring: tried again once the
  limit is back; while it lasts, one TransientError line and every checkpoint where it was."""
  config = load_config("../tests/hooked_config", num_steps=20, log_every_steps=20)
  train.run(config, str(tmp_path))
  state_target = train._build(config, workload_lib.load(config.workload))[4]  # pylint: disable=protected-access
  record = checkpoint.data_record(config, workload_lib.load(config.workload), 64)
  checkpoints = checkpoint.Checkpoints(storage.path(str(tmp_path)), keep=3)
  before = sorted(os.listdir(tmp_path / "checkpoints"))
  monkeypatch.setattr(checkpoint, "RESTORE_RETRY_PAUSES_S", (1.0,))
  soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

  def starve_file_handles():
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) - 2, hard))

  try:
    starve_file_handles()
    with pytest.raises(TransientError) as failed:
      checkpoints.restore_newest(state_target, record)
  finally:
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
  assert str(failed.value).startswith(
    f"the checkpoint of step 20 in {tmp_path}/checkpoints could not be read now (OSError: "
    "[Errno 24] Too many open files) in 2 tries; nothing in it says it is damaged, so it is "
    "kept where it is"
  ), failed.value
  assert sorted(os.listdir(tmp_path / "checkpoints")) == before
  assert not (tmp_path / "damaged_checkpoints").exists()

  # The limit back within the pause: the second try reads it.
  lifted = threading.Timer(0.3, lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)))
  try:
    starve_file_handles()
    lifted.start()
    step, state = checkpoints.restore_newest(state_target, record)
  finally:
    lifted.join()
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
  assert step == 20 and int(state.step) == 20
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(load_params(str(tmp_path), 20))):
    np.testing.assert_array_equal(np.asarray(a), b)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == before
  checkpoints.close()
