"""The process's peak memory per byte of train state, fresh and on a resume, for fsdp and shard_map.

    python benchmarks/memory.py        # about 4 minutes on 2 cores; prints a table, writes JSON

Each run is its own `python` process on 8 simulated CPU devices (so device memory is this
process's memory): an lm of width 768 and 8 layers (~57M params, 0.68 GB of params and AdamW
moments, blocks scanned and rematerialized), batch 8 x seq 32, 2 steps from scratch, then 2 more resumed from its checkpoint. The
peak above the same runs of lm tiny is divided by the state's bytes: 1.0 is the state held once
over the devices. Two peaks per run: before the first checkpoint save starts (init or restore,
compilation, the steps) and overall (ru_maxrss; it includes the async save's copy of the state
in host memory, which on an accelerator lands in host RAM, not device memory).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIG = {"width": 768, "num_layers": 8, "num_heads": 12}
COMMON = {
  "seq_len": 32,
  "batch_size": 8,
  "log_every_steps": 2,
  "eval_every_steps": 0,
  "checkpoint_every_steps": 0,
  "schedule": "constant",
  "scan_layers": True,
  "remat": True,
}


def _rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(executor: str, big: bool, num_steps: int, workdir: str) -> None:
  """One run of train.run in this process; prints its peaks as one JSON line."""
  sys.path.insert(0, REPO)
  import jax  # pylint: disable=import-outside-toplevel

  from launcher import checkpoint, train  # pylint: disable=import-outside-toplevel
  from tests.helpers import load_config  # pylint: disable=import-outside-toplevel

  peak = {"now": 0, "before_save": None}

  def sample():
    while True:
      peak["now"] = max(peak["now"], _rss_bytes())
      time.sleep(0.005)

  threading.Thread(target=sample, daemon=True).start()
  save = checkpoint.Checkpoints.save

  def save_noting_the_peak(self, *args, **kwargs):
    if peak["before_save"] is None:
      peak["before_save"] = max(peak["now"], _rss_bytes())
    return save(self, *args, **kwargs)

  checkpoint.Checkpoints.save = save_noting_the_peak
  config = load_config(
    "lm",
    "tiny",
    parallel=executor,
    num_steps=num_steps,
    compilation_cache_dir="none",
    **COMMON,
    **(BIG if big else {}),
  )
  state = train.run(config, workdir)
  print(
    json.dumps(
      {
        "before_save": peak["before_save"],
        "overall": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "state_bytes": sum(x.nbytes for x in jax.tree.leaves(state)),
      }
    )
  )


def measure(executor: str, big: bool, workdir: str, num_steps: int) -> dict:
  result = subprocess.run(
    [sys.executable, __file__, "--child", executor, str(int(big)), str(num_steps), workdir],
    cwd=REPO,
    env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
    capture_output=True,
    text=True,
    timeout=900,
    check=True,
  )
  return json.loads(result.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--output", default=os.path.join(REPO, "benchmarks", "results", "memory.json")
  )
  parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    executor, big, num_steps, workdir = args.child
    child(executor, bool(int(big)), int(num_steps), workdir)
    return
  results = {}
  print(
    "| executor | start | state GB | peak before the first save / state | peak overall / state |"
  )
  print("| --- | --- | ---: | ---: | ---: |")
  for executor in os.environ.get("EXECUTORS", "fsdp shard_map").split():
    with tempfile.TemporaryDirectory() as tiny_dir, tempfile.TemporaryDirectory() as big_dir:
      for start, num_steps in (("fresh", 2), ("resume", 4)):
        tiny, big = (
          measure(executor, False, tiny_dir, num_steps),
          measure(executor, True, big_dir, num_steps),
        )
        row = {
          key: (big[key] - tiny[key]) / big["state_bytes"] for key in ("before_save", "overall")
        }
        results[f"{executor} {start}"] = {
          **row,
          "state_bytes": big["state_bytes"],
          "tiny": tiny,
          "big": big,
        }
        print(
          f"| {executor} | {start} | {big['state_bytes'] / 1e9:.2f} | "
          f"{row['before_save']:.2f} | {row['overall']:.2f} |",
          flush=True,
        )
  os.makedirs(os.path.dirname(args.output), exist_ok=True)
  with open(args.output, "w") as f:
    json.dump({"date": time.strftime("%Y-%m-%d"), "results": results}, f, indent=2)
  print(f"\nwrote {args.output}")


if __name__ == "__main__":
  main()
