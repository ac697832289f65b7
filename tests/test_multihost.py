"""Real multi-process jobs on 127.0.0.1: same results as one process, and loud, bounded failures."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import pytest

from launcher import train
from launcher import workload as workload_lib
from launcher.errors import EXIT_PEER_LOST, EXIT_PREEMPTED, EXIT_USAGE
from launcher.local import free_port
from tests.helpers import (
  REPO,
  assert_close,
  children,
  finish,
  launcher_command,
  load_config,
  load_params,
  losses_by_step,
  start,
  wait_for,
)

pytestmark = pytest.mark.slow  # Starts processes or trains for seconds.

RUNS = {  # Each workload's config for a few steps, a report every step.
  "linear": ("linear", None, {"num_steps": 4}),
  "classifier": ("classifier", None, {"num_steps": 4, "warmup_steps": 2}),
  "lm": ("lm", "tiny", {"num_steps": 4, "warmup_steps": 2}),
}
COMMON = {"log_every_steps": 1, "eval_every_steps": 0}


def read_ids(ids_dir: str, process_index: int) -> dict[int, list[int]]:
  with open(os.path.join(ids_dir, f"process_{process_index}.jsonl")) as f:
    return {row["batch"]: row["ids"] for row in map(json.loads, f)}


@pytest.mark.parametrize("name", RUNS)
def test_two_processes_of_four_devices_equal_one_of_eight(name, tmp_path):
  config_name, config_arg, overrides = RUNS[name]
  overrides = {**COMMON, **overrides}
  workdir, ids_dir = tmp_path / "2x4", tmp_path / "ids"
  ids_dir.mkdir()
  process = start(
    launcher_command(
      f"--config=tests/recording_config.py:{config_name}{':' + config_arg if config_arg else ''}",
      f"--workdir={workdir}",
      f"--config.ids_dir={ids_dir}",
      *(f"--config.{key}={value}" for key, value in overrides.items()),
      num_processes=2,
      devices=4,
    ),
    str(tmp_path / "2x4.log"),
    devices=4,
  )
  assert finish(process, 180) == 0, open(tmp_path / "2x4.log").read()[-3000:]
  log = open(tmp_path / "2x4.log").read()
  # One console line per report, from process 0 only; every line says which process it is from.
  assert "[process 0/2] step 4/4 | loss " in log and "[process 1/2] step" not in log
  assert "[process 1/2] process 1/2 on" in log and "[Gloo]" not in log
  assert "[process 0/2] finished 4 steps in" in log
  assert "process 1/2 on" in open(workdir / "logs" / "process_1.log").read()

  # The reference: one process with 8 devices, in this test process.
  reference_dir = tmp_path / "1x8"
  config = load_config(config_name, config_arg, **overrides)
  reference = train.run(config, str(reference_dir))
  assert jax.process_count() == 1 and jax.local_device_count() == 8
  assert_close(config, load_params(str(workdir)), reference.params)
  two, one = losses_by_step(str(workdir)), losses_by_step(str(reference_dir))
  assert list(two) == list(one) == [1, 2, 3, 4]
  assert [two[s] for s in two] == pytest.approx([one[s] for s in one], rel=1e-5)

  # Each process read a disjoint half of every global batch, and the halves make the batch.
  first, second = read_ids(str(ids_dir), 0), read_ids(str(ids_dir), 1)
  whole = workload_lib.load(config.workload).dataset(config, "train", 0, 1)
  for t in range(4):
    assert not set(first[t]) & set(second[t])
    assert first[t] + second[t] == next(whole)["id"].tolist()
    assert len(first[t]) == len(second[t]) == config.batch_size // 2


def two_launchers(tmp_path, *extra, num_steps=100_000, heartbeat=10, own=((), ())):
  """Two launcher processes joined by the JAX_* environment, as a scheduler would start them;
  `own[i]`: arguments process i alone is given."""
  port = free_port()
  processes = []
  for i in range(2):
    processes.append(
      start(
        [
          sys.executable,
          "-m",
          "launcher",
          "--config=configs/linear.py",
          f"--workdir={tmp_path / 'run'}",
          f"--config.num_steps={num_steps}",
          "--config.log_every_steps=50",
          "--config.eval_every_steps=0",
          "--config.checkpoint_every_steps=0",
          f"--heartbeat_timeout_seconds={heartbeat}",
          *extra,
          *own[i],
        ],
        str(tmp_path / f"process_{i}.log"),
        devices=4,
        env={
          "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
          "JAX_NUM_PROCESSES": "2",
          "JAX_PROCESS_ID": str(i),
          "JAX_PLATFORMS": "cpu",
          "PYTHONFAULTHANDLER": "1",  # A SIGABRT writes every thread's stack: see kill_one.
        },
      )
    )
  return processes


def kill_one(processes, victim: int, after_step: int | str, tmp_path) -> tuple[int, float, str]:
  """Kills `victim` once process 0 reported `after_step` (or printed that text); the survivor's
  exit code, the seconds it took to exit after the kill, and its log. Every process is ended
  before it returns."""
  after = f"step {after_step}/" if isinstance(after_step, int) else after_step
  try:
    wait_for(
      lambda: after in open(tmp_path / "process_0.log").read(),
      120,
      "the job to train",
      processes[0],
    )
    processes[victim].kill()
    killed_at = time.monotonic()
    try:
      code = processes[1 - victim].wait(timeout=30)
    except subprocess.TimeoutExpired:
      processes[1 - victim].send_signal(signal.SIGABRT)  # Its stacks, into its log.
      time.sleep(3)
      log = open(tmp_path / f"process_{1 - victim}.log").read()
      raise AssertionError(f"the survivor still runs 30 s after the kill:\n{log[-6000:]}") from None
    waited = time.monotonic() - killed_at
  finally:
    for p in processes:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
  return code, waited, open(tmp_path / f"process_{1 - victim}.log").read()


@pytest.mark.parametrize("kill_after_step", ["time to first step", 100, 400, 900])
def test_a_killed_process_ends_its_peer_with_the_line_every_time(kill_after_step, tmp_path):
  """Four trials without a supervisor, each killed at another moment (the first within a second
  of the peer monitors' start, before their first beat): the survivor, in a collective or not,
  prints the lost-peer line naming process 1 and exits 76 within --peer_timeout_seconds (+ 1 s
  polling), long before jax's heartbeat timeout (100 s)."""
  processes = two_launchers(tmp_path, "--peer_timeout_seconds=5", heartbeat=100)
  code, waited, log = kill_one(processes, 1, kill_after_step, tmp_path)
  assert code == EXIT_PEER_LOST and waited < 5 + 4, (code, waited, log[-3000:])
  line = [text for text in log.splitlines() if "lost another process of the job" in text]
  assert len(line) == 1 and line[0].startswith(
    "error: process 0/2 lost another process of the job after step "
  )
  assert (
    f"process 1 on {socket.gethostname()} sent no sign of life for 5 s" in line[0]
    or "Gloo" in line[0]
  ), line[0]  # Or a collective failed first, with the same line.


def test_a_killed_coordinator_ends_its_peer_at_once_with_the_line(tmp_path):
  """Process 0 hosts jax's coordination service: its loss makes jax abort the others from C++
  within a second; the launcher's SIGABRT handler turns that into the lost-peer line and 76."""
  code, waited, log = kill_one(two_launchers(tmp_path), 0, 100, tmp_path)
  assert code == EXIT_PEER_LOST and waited < 5, (code, waited, log[-3000:])
  line = log.strip().splitlines()[-1]
  assert line.startswith("error: process 1/2 lost another process of the job after step "), line
  assert "which hosts the job's coordination service, is gone (Connection refused)" in line, line


@pytest.mark.parametrize("coordinator_up", [False, True])
def test_a_failed_collective_names_a_gone_coordinator_as_the_loss(coordinator_up):
  """When process 0 dies, a collective of process 1 may fail (Gloo's reset connection) before
  jax's abort: the line still names process 0's loss if its address refuses connections, and
  keeps the collective's own cause while it accepts them."""
  with socket.socket() as listening:
    listening.bind(("127.0.0.1", 0))
    if coordinator_up:
      listening.listen()
    port = listening.getsockname()[1]
    gloo = "UNKNOWN: Gloo all-reduce failed: [pair.cc:538] Read error: Connection reset by peer"
    code = (
      "from launcher import watchdog\n"
      f"watchdog.end_with_line_on_abort('127.0.0.1:{port}', 'process 1/2')\n"
      f"watchdog.exit_peer_lost(RuntimeError({gloo!r}), process='process 1/2', last_step=103,"
      " last_checkpoint=None)\n"
    )
    ended = subprocess.run(
      [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
  assert ended.returncode == EXIT_PEER_LOST, ended.stderr
  line = ended.stderr.strip().splitlines()[-1]
  assert line.startswith("error: process 1/2 lost another process of the job after step 103; ")
  if coordinator_up:
    assert line.endswith(f"Cause: {gloo}"), line
  else:
    assert line.endswith(
      f"Cause: process 0 (127.0.0.1:{port}), which hosts the job's coordination service, is "
      "gone (Connection refused)"
    ), line


def test_a_stalled_coordinator_is_waited_for_and_a_stopped_one_ends_its_peer(tmp_path):
  """Process 0 stopped (SIGSTOP) for 2 s, under --peer_timeout_seconds=8: the key-value calls of
  process 1 wait, and the job goes on. Stopped for good: process 1 ends with the lost-peer line
  and 76 within the bound (+ polling), though its calls to the store never return."""
  processes = two_launchers(tmp_path, "--peer_timeout_seconds=8", heartbeat=100)
  try:
    wait_for(
      lambda: "step 100/" in open(tmp_path / "process_0.log").read(),
      120,
      "the job to train",
      processes[0],
    )
    os.kill(processes[0].pid, signal.SIGSTOP)
    time.sleep(2)
    os.kill(processes[0].pid, signal.SIGCONT)
    wait_for(
      lambda: "step 300/" in open(tmp_path / "process_0.log").read(),
      60,
      "the job to go on after the stall",
      processes[1],
    )
    os.kill(processes[0].pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    code = finish(processes[1], 60)
    waited = time.monotonic() - stopped_at
  finally:
    for p in processes:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
  log = open(tmp_path / "process_1.log").read()
  # Silence counts from the last answer, up to one poll (1 s) before the stop.
  assert code == EXIT_PEER_LOST and 8 - 2 <= waited < 8 + 10, (code, waited, log[-3000:])
  line = [text for text in log.splitlines() if "lost another process of the job" in text]
  assert (
    len(line) == 1
    and f"coordination service on process 0 on {socket.gethostname()} did not answer for" in line[0]
  ), line
  print(f"process 1 ended {waited:.1f} s after process 0 stopped: {line[0]}")


def test_an_unreachable_coordinator_is_a_clear_restartable_error_within_the_init_timeout(tmp_path):
  port = free_port()
  started = time.monotonic()
  process = start(
    [
      sys.executable,
      "-m",
      "launcher",
      "--config=configs/linear.py",
      f"--workdir={tmp_path}",
      "--initialization_timeout=5",
    ],
    str(tmp_path / "log"),
    devices=4,
    env={
      "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
      "JAX_NUM_PROCESSES": "2",
      "JAX_PROCESS_ID": "1",
    },
  )
  assert finish(process, 60) == EXIT_PEER_LOST  # Process 0 may be slow: a supervisor retries.
  assert time.monotonic() - started < 5 + 30  # 5 s of waiting plus the imports.
  log = open(tmp_path / "log").read()
  assert (
    f"error: could not reach the coordinator 127.0.0.1:{port} (process 0) within "
    "--initialization_timeout=5 s (Connection refused)"
  ) in log
  assert f"exiting with {EXIT_PEER_LOST} so that a supervisor tries again" in log
  assert "Traceback" not in log


SLURM_TWO_NODES = {
  "SLURM_JOB_ID": "77",
  "SLURM_STEP_NODELIST": "node[01-02]",
  "SLURM_NTASKS": "2",
  "SLURM_PROCID": "0",
  "SLURM_LOCALID": "0",
  "SLURMD_NODENAME": "node01",
  "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
}


@pytest.mark.parametrize(
  "env, args, message",
  [
    (
      SLURM_TWO_NODES,
      ["--coordinator_address=node01:1234", "--num_processes=4", "--process_id=0"],
      "error: --num_processes=4 disagrees with the scheduler, which started 2 processes for this job",
    ),
    (
      {**SLURM_TWO_NODES, "JAX_COORDINATOR_ADDRESS": "localhost:1234"},
      [],
      "error: the coordinator address localhost:1234 is a loopback address, but this job spans 2 "
      "hosts (node01, node02)",
    ),
  ],
)
def test_a_job_shape_the_environment_contradicts_is_refused(env, args, message, tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "launcher",
      "--config=configs/linear.py",
      f"--workdir={tmp_path}",
      *args,
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=60,
    env={**os.environ, **env},
  )
  assert result.returncode == EXIT_USAGE and message in result.stderr
  assert "Traceback" not in result.stderr


def test_a_process_given_another_config_is_one_line_and_exit_2_on_every_process(tmp_path):
  processes = two_launchers(
    tmp_path, own=((), ("--config.learning_rate=0.2", "--config.batch_size=48"))
  )
  codes = [finish(process, 120) for process in processes]
  logs = [open(tmp_path / f"process_{i}.log").read() for i in range(2)]
  assert codes == [EXIT_USAGE, EXIT_USAGE], logs
  line = (
    "error: process 1 runs another config than process 0: config.batch_size=48 on process 1, 24 "
    "on process 0; config.learning_rate=0.2 on process 1, 0.1 on process 0. Every process of a "
    "job must be given the same --config file and --config.* overrides"
  )
  assert all(line in log for log in logs) and "Traceback" not in logs[0] + logs[1]
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_local_runner_ends_every_process_when_one_dies(tmp_path):
  workdir = tmp_path / "run"
  runner = start(
    launcher_command(
      "--config=configs/linear.py",
      f"--workdir={workdir}",
      "--config.num_steps=100000",
      "--config.log_every_steps=50",
      "--config.eval_every_steps=0",
      "--config.checkpoint_every_steps=0",
      num_processes=2,
      devices=4,
      grace=2,
    ),
    str(tmp_path / "runner.log"),
    devices=4,
  )
  wait_for(lambda: (workdir / "metrics.jsonl").exists(), 120, "training", runner)
  processes = children(runner.pid)
  assert len(processes) == 2
  os.kill(processes[1], signal.SIGKILL)
  assert finish(runner, 60) == 128 + signal.SIGKILL
  assert not [c for c in processes if os.path.exists(f"/proc/{c}")]
  log = (tmp_path / "runner.log").read_text()
  assert "[local] process 1 was killed by SIGKILL: stopping the others" in log


def test_local_runner_ctrl_c_stops_the_job_with_a_checkpoint(tmp_path):
  workdir = tmp_path / "run"
  runner = start(
    launcher_command(
      "--config=configs/linear.py",
      f"--workdir={workdir}",
      "--config.num_steps=100000",
      "--config.log_every_steps=50",
      "--config.eval_every_steps=0",
      num_processes=2,
      devices=4,
    ),
    str(tmp_path / "runner.log"),
    devices=4,
  )
  wait_for(lambda: (workdir / "metrics.jsonl").exists(), 120, "training", runner)
  os.kill(runner.pid, signal.SIGINT)
  assert finish(runner, 60) == EXIT_PREEMPTED  # Every process saved: "run me again", not a kill.
  log = (tmp_path / "runner.log").read_text()
  assert "every process saved and stopped: exiting with 75" in log
  assert log.count("stopped on a preemption notice after saving the checkpoint of step") == 2
  assert os.listdir(workdir / "checkpoints")
