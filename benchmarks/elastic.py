"""The time from a host's loss to the first step on fewer hosts, under `launcher.local`.

    python benchmarks/elastic.py          # about a minute a round; prints a table, writes JSON

Each round runs tests/numbers_config.py (global batch 64) as 4 processes x 2 simulated devices
with --min_processes=2 and a --host_check that reads a file; at step 15 it writes slot 3's file
(its check fails from then on) and kills slot 3's process with SIGKILL, then waits for the job
to reach its first step on 2 processes. The parts come from the runner's own clock (the kill)
and process 0's host records: until the new start's processes began (the runner notices the
death, stops the others, checks the hosts), their startup (imports, joining the job, restore),
and the compile and first step.
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def records(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "hosts", "process_0.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def wait_for(predicate, timeout: float, what: str, runner: subprocess.Popen):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    value = predicate()
    if value:
      return value
    if runner.poll() is not None:
      raise SystemExit(f"the runner ended (rc {runner.returncode}) before {what}")
    time.sleep(0.02)
  raise SystemExit(f"timed out after {timeout} s waiting for {what}")


def process_pid(runner_pid: int, process: int) -> int:
  with open(f"/proc/{runner_pid}/task/{runner_pid}/children") as f:
    children = [int(child) for child in f.read().split()]
  for child in children:
    with open(f"/proc/{child}/environ", "rb") as f:
      if f"JAX_PROCESS_ID={process}".encode() in f.read().split(b"\0"):
        return child
  raise SystemExit(f"the runner has no process {process}")


def one_round(tmp: str) -> dict:
  workdir, lost = os.path.join(tmp, "run"), os.path.join(tmp, "lost_3")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  with open(os.path.join(tmp, "run.log"), "wb") as log:
    runner = subprocess.Popen(
      [
        sys.executable,
        "-m",
        "launcher.local",
        "--num_processes=4",
        "--devices_per_process=2",
        "--min_processes=2",
        f"--host_check=test ! -e {tmp}/lost_{{slot}}",
        "--",
        "--config=tests/numbers_config.py",
        f"--workdir={workdir}",
        "--config.batch_size=64",
        "--config.num_steps=60",
        "--config.checkpoint_every_steps=10",
        "--config.log_every_steps=1",
        "--config.batch_seconds=0.1",
      ],
      cwd=REPO,
      env=env,
      stdout=log,
      stderr=subprocess.STDOUT,
      start_new_session=True,
    )
  try:
    wait_for(
      lambda: any(r["event"] == "report" and r["step"] >= 15 for r in records(workdir)),
      180,
      "step 15",
      runner,
    )
    open(lost, "w").close()
    killed = time.time()
    os.kill(process_pid(runner.pid, 3), signal.SIGKILL)

    def shrunk_first_step():
      starts = [i for i, r in enumerate(records(workdir)) if r["event"] == "start"]
      if len(starts) < 2:
        return None
      run = records(workdir)[starts[-1] :]
      first = [r for r in run if r["event"] == "first_step"]
      return (run[0], first[0]) if first and run[0]["process_count"] == 2 else None

    start, first_step = wait_for(shrunk_first_step, 180, "the first step on 2 processes", runner)
    runner.send_signal(signal.SIGTERM)  # Saves and stops: the rest is not measured.
    runner.wait(timeout=120)
  finally:
    if runner.poll() is None:
      os.killpg(runner.pid, signal.SIGKILL)
      runner.wait()
  began = start["time"] - start["startup_s"]
  return {
    "resumed_at_step": start["first_step"],
    "until_the_new_processes_began_s": began - killed,
    "startup_s": start["startup_s"],
    "compile_and_first_step_s": first_step["time"] - start["time"],
    "loss_to_first_step_s": first_step["time"] - killed,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument(
    "--output", default=os.path.join(REPO, "benchmarks", "results", "elastic.json")
  )
  args = parser.parse_args()
  rounds = []
  for _ in range(args.rounds):
    with tempfile.TemporaryDirectory() as tmp:
      rounds.append(one_round(tmp))
  names = [name for name in rounds[0] if name.endswith("_s")]
  print("\n| part | median | min | max |\n| --- | ---: | ---: | ---: |")
  for name in names:
    values = [r[name] for r in rounds]
    print(
      f"| {name} | {statistics.median(values):.2f} s | {min(values):.2f} s | {max(values):.2f} s |"
    )
  os.makedirs(os.path.dirname(args.output), exist_ok=True)
  with open(args.output, "w") as f:
    json.dump({"rounds": rounds, "load_average": os.getloadavg()}, f, indent=2)
  print(f"\nwrote {args.output}")


if __name__ == "__main__":
  main()
