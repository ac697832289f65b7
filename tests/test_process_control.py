"""Process control with the real process tree: the watchdog spares a finished run's final save,
a closed console never stalls a job, early preemption notices and SIGHUP save, any signal is
named and restarted, a second Ctrl-C kills at once; the supervisor's rules as unit tests."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from launcher import local, supervise
from launcher.errors import (
  EXIT_OUT_OF_MEMORY,
  EXIT_PEER_LOST,
  EXIT_PREEMPTED,
  EXIT_USAGE,
  UsageError,
)
from tests.helpers import (
  REPO,
  children,
  finish,
  launcher_command,
  load_config,
  read_metrics,
  run_at_first_report,
  start,
)


def _alive(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except FileNotFoundError:
    return False


def _runs_through_a_1s_step_timeout(tmp_path, *flags) -> str:
  """A hooked run under --step_timeout_seconds=1 with `flags`: it exits 0, never taken for stuck;
  its workdir."""
  workdir, log = tmp_path / "run", tmp_path / "run.log"
  process = start(
    launcher_command(
      "--config=tests/hooked_config.py",
      f"--workdir={workdir}",
      *flags,
      "--step_timeout_seconds=1",
    ),
    str(log),
  )
  assert finish(process, 240) == 0, log.read_text()[-3000:]
  assert "stuck" not in log.read_text()
  return str(workdir)


@pytest.mark.slow
def test_a_final_save_slower_than_the_step_timeout_commits_and_exits_0(tmp_path):
  # ~34M params + AdamW: the final checkpoint takes seconds to finish; steps are under a second.
  workdir = _runs_through_a_1s_step_timeout(
    tmp_path,
    "--config.hidden_sizes=(4096,4096,4096)",
    "--config.batch_size=8",
    "--config.num_steps=6",
    "--config.checkpoint_every_steps=0",
  )
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["6"]


@pytest.mark.slow
def test_compiling_autos_chosen_steps_per_call_does_not_count_as_a_stuck_step(tmp_path):
  # Each trace of the loss takes 3 s, past the 1 s step timeout: auto's K compiles mid-run.
  workdir = _runs_through_a_1s_step_timeout(
    tmp_path,
    "--config.steps_per_call=auto",
    "--config.trace_seconds=3",
    "--config.log_every_steps=20",
  )
  rows = read_metrics(workdir)
  assert [row["step"] for row in rows] == [20, 40]
  assert rows[0]["steps_per_call"] > 1, rows[0]


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
  runner, workdir, log = run_at_first_report(
    tmp_path, "--config.slow_from_batch=0", "--config.slow_seconds=0.2", num_processes=2, devices=4
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
  runner, _, log = run_at_first_report(
    tmp_path,
    runner_flags=("--max_restarts=1", "--restart_backoff_seconds=0"),
    num_processes=2,
    devices=4,
  )
  os.kill(children(runner.pid)[1], signal.SIGRTMIN + 1)
  assert finish(runner, 180) == 0, log.read_text()[-3000:]
  text = log.read_text()
  assert "process 1 was killed by SIGRTMIN+1" in text and "Traceback" not in text
  assert "restart 1/1 after process 1 was killed by SIGRTMIN+1" in text
  assert "the job finished after 1 restart(s)" in text


@pytest.mark.slow
def test_a_second_ctrl_c_kills_at_once(tmp_path):
  # The data loader blocks for ever at batch 6 (read ahead of step 3): a save on the first Ctrl-C cannot happen.
  runner, _, log = run_at_first_report(
    tmp_path, "--config.fault=block", "--config.fault_at_batch=6", num_processes=2, devices=4
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


@pytest.mark.slow
def test_out_of_memory_at_the_first_step_is_one_line_and_never_restarted(tmp_path):
  # seq_len 16384: attention asks ~130 GiB per device, which XLA on CPU refuses up front.
  workdir, log = tmp_path / "run", tmp_path / "run.log"
  runner = start(
    [
      *launcher_command(num_processes=2)[:3],
      "--num_processes=1",
      "--devices_per_process=8",
      "--max_restarts=1",
      "--",
      "--config=configs/lm.py:tiny",
      "--config.seq_len=16384",
      f"--workdir={workdir}",
    ],
    str(log),
  )
  assert finish(runner, 240) == EXIT_OUT_OF_MEMORY, log.read_text()[-3000:]
  text = log.read_text()
  errors = [line for line in text.splitlines() if "error:" in line]
  assert len(errors) == 1, text
  host = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  asked = re.search(
    r"\[process 0\] error: out of memory: a device asked for ([\d.]+) GiB; "
    r"the host has ([\d.]+) GiB, shared by its 8 CPU devices\. To fit, try: "
    r"--config\.grad_accum_steps=2 \(the per-device batch of 8 in 2 parts: the same updates\), "
    r"--config\.remat=True .*--config\.compute_dtype=bfloat16, --config\.parallel=fsdp .*"
    r"exiting with 78, which supervisors do not restart$",
    errors[0],
  )
  assert asked, errors[0]
  assert float(asked[1]) > float(asked[2]) == round(host / 2**30, 1)
  assert "Traceback" not in text and "restart 1/1" not in text
  assert (
    "out of memory (its line above says what to change), which a restart cannot fix; "
    "not restarting" in text
  )


def test_out_of_memory_is_told_from_a_full_disk_and_names_the_knobs():
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from launcher import memory  # pylint: disable=import-outside-toplevel

  with pytest.raises(jax.errors.JaxRuntimeError) as device:
    jax.jit(lambda: jnp.zeros((2**38,), jnp.float32) + 1)()  # 1 TiB: refused up front.
  with pytest.raises(MemoryError) as host:
    bytearray(2**60)
  assert memory.is_out_of_memory(device.value) and memory.is_out_of_memory(host.value)
  assert not memory.is_out_of_memory(
    RuntimeError("RESOURCE_EXHAUSTED: Error writing local file: No space left on device")
  )
  line = memory.describe_out_of_memory(
    device.value, load_config("lm", "tiny", parallel="fsdp", compute_dtype="bfloat16", remat=True)
  )
  assert line.startswith("out of memory: a device asked for 1024.0 GiB; the host has "), line
  assert "remat" not in line and "compute_dtype" not in line and "parallel" not in line, line
  assert "--config.grad_accum_steps=2 (the per-device batch of 8 in 2 parts" in line, line
  assert memory.describe_out_of_memory(host.value, load_config("linear")).startswith(
    "out of memory: in the host's memory (MemoryError); the host has "
  )


def test_the_local_runner_gives_each_process_its_gpus_from_a_listing(tmp_path):
  fake = tmp_path / "nvidia-smi"
  fake.write_text(
    "#!/bin/sh\n"
    + "".join(f"echo 'GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i}a)'\n" for i in range(4))
  )
  fake.chmod(0o755)
  environ = {"PATH": str(tmp_path)}
  gpus, source = local.find_gpus(environ)
  assert (gpus, source) == (["0", "1", "2", "3"], "nvidia-smi -L")
  job = local.plan("auto", gpus, source, environ, None, 2)
  assert job.platform == "gpu" and job.devices == [["0", "1"], ["2", "3"]]
  assert job.describe() == (
    "2 processes x 2 GPU(s) (CUDA_VISIBLE_DEVICES 0,1 | 2,3: 4 found by nvidia-smi -L)"
  )
  env = local.process_env(1, 2, job.devices[1], 1234)
  assert (env["CUDA_VISIBLE_DEVICES"], env["JAX_PLATFORMS"]) == ("2,3", "cuda")
  assert (env["JAX_PROCESS_ID"], env["JAX_NUM_PROCESSES"]) == ("1", "2")
  assert env["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:1234"
  assert local.plan("auto", gpus, source, environ, None, None).devices == [
    ["0"],
    ["1"],
    ["2"],
    ["3"],
  ]
  # CUDA_VISIBLE_DEVICES, when set, is the listing; the GPUs it names are the ones handed out.
  visible = {"CUDA_VISIBLE_DEVICES": "4,5,6", "PATH": str(tmp_path)}
  assert local.find_gpus(visible) == (["4", "5", "6"], "CUDA_VISIBLE_DEVICES")
  assert local.plan("gpu", ["4", "5", "6"], "CUDA_VISIBLE_DEVICES", visible, None, 2).devices == [
    ["4", "5"]
  ]
  with pytest.raises(UsageError, match=r"2 process\(es\) x --devices_per_process=2 GPUs need 4"):
    local.plan("gpu", ["4", "5", "6"], "CUDA_VISIBLE_DEVICES", visible, 2, 2)
  assert local.find_gpus({"CUDA_VISIBLE_DEVICES": "-1"})[0] == []
  # Simulated CPU devices only when asked, or when there is no GPU.
  for platform, environ_cpu in (("cpu", environ), ("auto", {**environ, "JAX_PLATFORMS": "cpu"})):
    job = local.plan(platform, gpus, source, environ_cpu, None, None)
    assert job.platform == "cpu" and job.devices == [4, 4], platform
    env = local.process_env(0, 2, job.devices[0], 1234)
    assert env["JAX_PLATFORMS"] == "cpu"
    assert env["XLA_FLAGS"].endswith("--xla_force_host_platform_device_count=4")
  assert local.plan("auto", [], "nvidia-smi -L", {}, 3, 2).describe() == (
    "3 processes x 2 devices (CPU, simulated: no GPU found)"
  )


@pytest.mark.slow
def test_the_local_runner_never_falls_back_to_cpu_on_a_gpu_machine_without_cuda_jax(tmp_path):
  # This jax has no CUDA plugin: GPUs named by CUDA_VISIBLE_DEVICES must not train on the CPU.
  result = subprocess.run(
    [sys.executable, "-m", "launcher.local", "--", f"--workdir={tmp_path / 'run'}"],
    env={**os.environ, "CUDA_VISIBLE_DEVICES": "0,1", "JAX_PLATFORMS": ""},
    capture_output=True,
    text=True,
    timeout=60,
    check=False,
    cwd=REPO,
  )
  assert result.returncode == EXIT_USAGE, result.stderr
  assert result.stderr == (
    "[local] error: this machine shows 2 GPU(s) to use, but jax has no CUDA build: pip install "
    "-e '.[cuda]' in this repository, or pip install -U 'jax[cuda12]' (or pass --platform=cpu "
    "to simulate CPU devices)\n"
  )
  assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_the_local_runner_shows_progress_on_stdout_and_errors_on_stderr(tmp_path):
  """`launcher.local ... > log`: the processes' progress lines go to the file, their error lines
  stay on the terminal (stderr)."""
  command = launcher_command(
    "--config=tests/hooked_config.py",
    f"--workdir={tmp_path / 'run'}",
    "--config.batch_size=30",
    num_processes=2,
    devices=4,
  )
  result = subprocess.run(
    command,
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
    env={**os.environ, "XLA_FLAGS": ""},
    check=False,
  )
  assert result.returncode == EXIT_USAGE, result.stdout[-2000:] + result.stderr[-2000:]
  assert "[local] 2 processes x 4 devices" in result.stdout
  errors = [line for line in result.stderr.splitlines() if "error: " in line]
  assert errors and all(line.startswith("[process ") for line in errors), result.stderr
  assert "batch_size" in errors[0]
  assert "error: " not in result.stdout, result.stdout


def test_a_warning_or_an_error_of_a_process_is_trouble_and_progress_is_not():
  assert supervise._is_trouble(b"[process 1/2] error: config.batch_size=30 ...\n")
  assert supervise._is_trouble(b"[process 0] warning: received SIGTERM\n")
  assert supervise._is_trouble(b"Traceback (most recent call last):\n")
  assert not supervise._is_trouble(b"[process 0/2] step 3/40 | loss 2.1\n")
  assert not supervise._is_trouble(b"[process 0/2] an error: in the middle is progress\n")
