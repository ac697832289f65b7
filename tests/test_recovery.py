"""A job recovers by itself: supervised restarts after a kill -9 or a stuck process, one clear line
when a peer is lost, and no restart where a restart cannot help."""

import os
import signal
import socket
import subprocess
import time

import jax
import numpy as np
import pytest

from launcher.errors import EXIT_PEER_LOST, EXIT_STUCK, EXIT_USAGE
from launcher.local import free_port, process_env
from tests.helpers import (
  finish,
  launcher_command,
  load_params,
  losses_by_step,
  read_metrics,
  start,
  wait_for,
)

pytestmark = pytest.mark.slow  # Starts processes or trains for seconds.

CONFIG = "--config=tests/hooked_config.py"


def supervised(*args, max_restarts: int) -> list[str]:
  """`launcher.local` with 2 processes x 4 devices and --max_restarts, a short grace."""
  command = launcher_command(CONFIG, *args, num_processes=2, devices=4, grace=5)
  command.insert(command.index("--"), f"--max_restarts={max_restarts}")
  return command


def log_of(path) -> str:
  return open(path, encoding="utf-8", errors="replace").read()


def children(pid: int) -> list[int]:
  return [
    int(p)
    for p in subprocess.run(
      ["pgrep", "-P", str(pid)], capture_output=True, text=True
    ).stdout.split()
  ]


def assert_same_run(workdir, reference):
  for a, b in zip(
    jax.tree.leaves(load_params(workdir, 40)), jax.tree.leaves(load_params(reference, 40))
  ):
    np.testing.assert_array_equal(a, b)
  assert losses_by_step(workdir) == losses_by_step(reference)


def test_a_process_killed_outright_is_restarted_and_the_job_finishes_exactly(straight, tmp_path):
  workdir, log = tmp_path / "run", tmp_path / "run.log"
  process = start(
    supervised(
      f"--workdir={workdir}",
      "--config.slow_from_batch=22",
      "--config.slow_seconds=0.3",
      max_restarts=2,
    ),
    log,
    devices=4,
  )
  wait_for(
    lambda: (workdir / "checkpoints" / "20").is_dir(), 120, "the step-20 checkpoint", process
  )
  wait_for(lambda: max(losses_by_step(str(workdir))) >= 22, 60, "step 22", process)
  killed_at = time.monotonic()
  os.kill(children(process.pid)[-1], signal.SIGKILL)  # Process 1, by the kernel: no goodbye.
  wait_for(lambda: "[local] restart 1/2" in log_of(log), 60, "the restart", process)
  detected_s = time.monotonic() - killed_at
  assert finish(process, 240) == 0, log_of(log)[-3000:]
  text = log_of(log)
  assert "[local] restart 1/2 after process 1 was killed by SIGKILL at step 2" in text
  assert "; resuming from checkpoint 20" in text
  assert "[local] the job finished after 1 restart(s)" in text
  assert text.count("resuming from the checkpoint of step 20") == 2
  assert_same_run(str(workdir), straight("2x4"))
  print(f"kill -9 noticed and the restart begun {detected_s:.1f} s after the kill")


def test_a_stuck_process_is_noticed_shows_where_and_the_restart_finishes(straight, tmp_path):
  workdir, log = tmp_path / "run", tmp_path / "run.log"
  process = start(
    supervised(
      f"--workdir={workdir}",
      "--step_timeout_seconds=5",
      "--config.fault=block",
      "--config.fault_at_batch=25",
      "--config.fault_process=1",
      f"--config.fault_marker={tmp_path / 'blocked_once'}",
      max_restarts=1,
    ),
    log,
    devices=4,
  )
  assert finish(process, 300) == 0, log_of(log)[-3000:]
  text = log_of(log)
  stuck = [line for line in text.splitlines() if "stuck: no train call finished" in line]
  assert stuck and "--step_timeout_seconds=5 after step 2" in stuck[0], stuck
  process_1 = log_of(workdir / "logs" / "process_1.log")
  assert "in _block_forever" in process_1 and "hooked_workload.py" in process_1
  assert f"exited with {EXIT_STUCK}" in text and "[local] restart 1/1 after process" in text
  assert "; resuming from checkpoint 20" in text
  assert_same_run(str(workdir), straight("2x4"))


def test_a_job_that_fails_every_time_stops_after_its_restarts(tmp_path):
  workdir, log = tmp_path / "run", tmp_path / "run.log"
  process = start(
    supervised(
      f"--workdir={workdir}",
      "--config.fault=raise",
      "--config.fault_at_batch=3",
      "--config.fault_process=0",
      "--config.checkpoint_every_steps=0",
      max_restarts=1,
    ),
    log,
    devices=4,
  )
  assert finish(process, 300) == 1, log_of(log)[-3000:]
  text = log_of(log)
  assert text.count("[local] 2 processes x 4 devices") == 2
  assert "[local] restart 1/1 after process 0 exited with 1" in text
  assert "resuming from the start (no checkpoint yet)" in text
  last = text.strip().splitlines()[-1]
  assert last.startswith(
    "[local] giving up after 1 restart(s); the first failure: process 0 exited with 1 at step"
  ), last
  assert "RuntimeError: hooked workload: a fault at batch 3" in text


def test_bad_input_is_never_restarted(tmp_path):
  log = tmp_path / "run.log"
  process = start(
    supervised(f"--workdir={tmp_path / 'run'}", "--config.batch_size=30", max_restarts=3),
    log,
    devices=4,
  )
  assert finish(process, 120) == EXIT_USAGE, log_of(log)[-3000:]
  text = log_of(log)
  assert text.count("[local] 2 processes x 4 devices") == 1
  assert "config.batch_size=30 does not divide over 8 devices" in text
  assert "bad input, which a restart cannot fix; not restarting" in text


@pytest.mark.parametrize("process, batch", [(1, 5), (0, 0)])
def test_bad_input_one_process_saw_ends_the_job_with_2_naming_it(process, batch, tmp_path):
  """UsageError on one process only (its own data): process 1 mid-run while process 0 waits in a
  collective; process 0 (which hosts jax's key-value store) at its first batch. The other is told
  through the store and exits 2 with the line; the runner names the process that saw it."""
  log = tmp_path / "run.log"
  runner = start(
    supervised(
      f"--workdir={tmp_path / 'run'}",
      "--config.fault=usage",
      f"--config.fault_at_batch={batch}",
      f"--config.fault_process={process}",
      max_restarts=2,
    ),
    log,
    devices=4,
  )
  assert finish(runner, 180) == EXIT_USAGE, log_of(log)[-3000:]
  text = log_of(log)
  line = f"hooked workload: config.fault_at_batch={batch} cannot be read here"
  assert f"[process {process}] error: {line}" in text
  assert (
    f"error: process {1 - process}/2 stops: process {process} on {socket.gethostname()} saw bad "
    f"input: {line} (exit 2: a restart cannot fix it)"
  ) in text
  assert text.strip().splitlines()[-1].startswith(f"[local] process {process} exited with 2 ")
  assert text.strip().endswith("bad input, which a restart cannot fix; not restarting")
  assert text.count("[local] 2 processes x 4 devices") == 1
  assert "lost another process" not in text and "Traceback" not in text


def test_a_lost_peer_is_one_line_naming_the_step_and_the_checkpoint(tmp_path):
  """Two processes started by hand (no runner to stop the survivor): kill -9 one, read the other."""
  port = free_port()
  workdir = tmp_path / "run"
  args = [
    CONFIG,
    f"--workdir={workdir}",
    "--config.slow_from_batch=12",
    "--config.slow_seconds=0.3",
    "--config.checkpoint_every_steps=10",
    "--heartbeat_timeout_seconds=10",
  ]
  processes = [
    start(
      launcher_command(*args),
      tmp_path / f"process_{i}.log",
      devices=4,
      env=process_env(i, 2, 4, port),
    )
    for i in range(2)
  ]
  try:
    wait_for(
      lambda: (workdir / "metrics.jsonl").exists() and len(read_metrics(workdir)) >= 14,
      120,
      "step 14",
      processes[0],
    )
    killed_at = time.monotonic()
    processes[1].kill()
    assert finish(processes[0], 60) == EXIT_PEER_LOST, log_of(tmp_path / "process_0.log")[-3000:]
    noticed_s = time.monotonic() - killed_at
  finally:
    for process in processes:
      if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
  errors = [
    line
    for line in log_of(tmp_path / "process_0.log").splitlines()
    if line.startswith("error: process 0/2 lost another process")
  ]
  assert len(errors) == 1, log_of(tmp_path / "process_0.log")[-3000:]
  assert "of the job after step 1" in errors[0] and "the last checkpoint is step 10" in errors[0]
  print(f"the survivor's line came {noticed_s:.1f} s after the kill: {errors[0]}")
