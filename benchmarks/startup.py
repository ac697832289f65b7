"""Time to the first step of a fresh `python -m launcher` process, cold (empty compilation cache)
and warm (the cache filled by an earlier start), split by the parts the start-up line names.

    python benchmarks/startup.py           # about 2 minutes on 2 cores, 8 simulated CPU devices
    python benchmarks/startup.py --quick   # 3 starts of each kind

Each start is a new process, as a user's would be; cold and warm starts alternate so that drift
of a shared machine hits both alike. "Since process start" is what a user waits: from the
interpreter's start to the end of the first step. Each number is the median over the starts.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.run import print_ratios_and_write  # pylint: disable=wrong-import-position

CONFIGS = {
  "configs/linear.py": ["--config=configs/linear.py", "--config.num_steps=10"],
  "configs/lm.py:tiny": [
    "--config=configs/lm.py:tiny",
    "--config.num_steps=10",
    "--config.log_every_steps=10",
    "--config.schedule=constant",
  ],
}
SINCE_PROCESS = "since process start"


def time_to_first_step(config_args: list[str], cache_dir: str, workdir: str) -> dict[str, float]:
  """A fresh `python -m launcher` process: seconds from its start to its first step, and each
  part its start-up line names (imports, checks, init, restore, first batch, compile...)."""
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "launcher",
      *config_args,
      "--config.eval_every_steps=0",
      f"--workdir={workdir}",
      f"--config.compilation_cache_dir={cache_dir}",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
    check=True,
    env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
  )
  output = (result.stderr + result.stdout).splitlines()
  line = next(text for text in output if "time to first step" in text)
  since_process, parts = line.split(" s since the process started): ")
  seconds = {SINCE_PROCESS: float(since_process.rsplit("(", 1)[1])}
  for name, value in re.findall(r"(?:^|, )([a-z ]+) (\d+\.\d+) s", parts):
    seconds[name] = float(value)
  return seconds


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument(
    "--output", default=os.path.join(REPO, "benchmarks", "results", "startup.json")
  )
  args = parser.parse_args()
  starts = 3 if args.quick else 5
  rows, ratios = [], {}
  with tempfile.TemporaryDirectory() as tmp:
    for config, config_args in CONFIGS.items():
      warm_cache = os.path.join(tmp, f"{len(rows)}-warm-cache")
      time_to_first_step(config_args, warm_cache, os.path.join(tmp, f"{len(rows)}-fill"))
      runs = {"cold": [], "warm": []}
      for i in range(starts):
        for kind in runs:
          cache = warm_cache if kind == "warm" else os.path.join(tmp, f"{len(rows)}-cold-{i}")
          workdir = os.path.join(tmp, f"{len(rows)}-{kind}-{i}")
          runs[kind].append(time_to_first_step(config_args, cache, workdir))
          print(f"{config} {kind} start {i + 1}/{starts}: {runs[kind][-1][SINCE_PROCESS]:.2f} s")
      for kind, seconds in runs.items():
        medians = {
          name: statistics.median(run.get(name, 0.0) for run in seconds) for name in seconds[0]
        }
        totals = [run[SINCE_PROCESS] for run in seconds]
        rows.append(
          {
            "config": config,
            "start": kind,
            "min": min(totals),
            "max": max(totals),
            "starts": starts,
            **medians,
          }
        )
      ratios[f"{config}: warm / cold"] = rows[-1][SINCE_PROCESS] / rows[-2][SINCE_PROCESS]
  parts = [name for name in rows[0] if name not in ("config", "start", "min", "max", "starts")]
  print("\n| config | start | " + " | ".join(parts) + " | min–max |")
  print("| --- | --- | " + " | ".join("---:" for _ in parts) + " | --- |")
  for row in rows:
    cells = " | ".join(f"{row.get(name, 0.0):.2f}" for name in parts)
    print(f"| {row['config']} | {row['start']} | {cells} | {row['min']:.2f}–{row['max']:.2f} |")
  print_ratios_and_write(args.output, quick=args.quick, rows=rows, ratios=ratios)


if __name__ == "__main__":
  main()
