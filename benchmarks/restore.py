"""Restore time from each checkpoint tier, side by side, for the lm at a few sizes; and the steps a
kill loses with and without the local tier.

    python benchmarks/restore.py          # a few minutes; prints two tables, writes JSON

Two processes x 4 simulated CPU devices on this machine, as a job. For each size the same state is
saved once to every tier, then restored REPEATS times from each, the tiers taking turns so that
drift of this shared machine hits all alike: the local tier (own copy on /dev/shm), the peer's
copy (process 1's own copy set aside, process 0's copy of it moved by the collective permute),
the persistent checkpoint on local disk and on gs:// (a local fake-gcs-server: the client's cost
of the protocol, not a real bucket's network). A restore's time is the slowest process's, from the
call to the arrays in their shardings; every restored state's digests equal the saved one's.
"""

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# name: (width, layers); the rest of configs/lm.py:tiny
SIZES = {"tiny": (64, 2), "w256x4": (256, 4), "w512x8": (512, 8)}
TIERS = ("local tier (tmpfs)", "peer's copy", "persistent, local disk", "persistent, gs://")
# Persistent interval, local interval (0: no local tier): the steps a kill loses, on average.
INTERVALS = ((100, 0), (100, 10), (1000, 0), (1000, 10), (1000, 50))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--sizes", default=",".join(SIZES))
  parser.add_argument(
    "--output", default=os.path.join(REPO, "benchmarks", "results", "restore.json")
  )
  parser.add_argument("--worker", type=int, default=-1, help=argparse.SUPPRESS)
  parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
  parser.add_argument("--tmp", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker >= 0:
    worker(args)
    return
  from launcher.local import free_port  # pylint: disable=import-outside-toplevel
  from tests.gcs_emulator import Emulator  # pylint: disable=import-outside-toplevel

  with tempfile.TemporaryDirectory() as tmp:
    emulator = Emulator(pathlib.Path(tmp, "gcs"), pathlib.Path(tmp, "gcs.log"))
    emulator.bucket("bench")
    port = free_port()
    env = {
      **os.environ,
      **emulator.env,
      "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
      "JAX_PLATFORMS": "cpu",
    }
    command = [sys.executable, os.path.abspath(__file__), f"--port={port}", f"--tmp={tmp}"]
    command += [f"--repeats={args.repeats}", f"--sizes={args.sizes}", f"--output={args.output}"]
    try:
      workers = [subprocess.Popen([*command, f"--worker={i}"], env=env, cwd=REPO) for i in range(2)]
      codes = [w.wait(timeout=1800) for w in workers]
    finally:
      for w in workers:
        if w.poll() is None:
          w.kill()
      emulator.stop()
      shutil.rmtree(f"/dev/shm/launcher-bench-{os.getpid()}", ignore_errors=True)
  if any(codes):
    sys.exit(f"a worker failed: exit codes {codes}")
  with open(args.output) as f:
    rows = json.load(f)["rows"]
  print("\n| lm size | params | state MB | " + " | ".join(TIERS) + " | gs:// / local |")
  print("| --- | ---: | ---: | " + " | ".join("---:" for _ in TIERS) + " | ---: |")
  for row in rows:
    seconds = [row["restore_s"][tier] for tier in TIERS]
    print(
      f"| {row['size']} | {row['params'] / 1e6:.2f}M | {row['state_mb']:.1f} | "
      + " | ".join(f"{s:.3f} s" for s in seconds)
      + f" | {seconds[3] / seconds[0]:.1f}x |"
    )
  print("\n| lm size | local save: loop blocked | of which the peer's copy moved |")
  print("| --- | ---: | ---: |")
  for row in rows:
    print(f"| {row['size']} | {row['local_save_s']:.3f} s | {row['peer_move_s']:.3f} s |")
  print("\n| persistent every | local every | steps lost per kill (mean, kill at a uniform step) |")
  print("| ---: | ---: | ---: |")
  for persistent, local in INTERVALS:
    print(f"| {persistent} | {local or '-'} | {steps_lost(persistent, local):.1f} |")
  print(f"\nwrote {args.output}")


def steps_lost(persistent: int, local: int) -> float:
  """The mean steps a kill re-does when it comes after any step of a persistent interval with the
  same chance: back to the newest save of either tier (the local tier's whenever it has one)."""
  return statistics.mean(
    min(step % persistent, step % local if local else persistent) for step in range(persistent)
  )


def worker(args) -> None:
  """One process of the job: every size in turn; process 0 writes the rows."""
  import jax  # pylint: disable=import-outside-toplevel
  from absl import logging  # pylint: disable=import-outside-toplevel
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  jax.distributed.initialize(f"127.0.0.1:{args.port}", num_processes=2, process_id=args.worker)
  logging.set_verbosity(logging.WARNING)
  rows = [measure(size, args) for size in args.sizes.split(",")]
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
      json.dump({"rows": rows, "intervals": INTERVALS}, f, indent=2)
  multihost_utils.sync_global_devices("bench: written")


def job_seconds(fn):
  """The slowest process's seconds for `fn` (every process runs it), and its result."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  multihost_utils.sync_global_devices("bench: start")
  start = time.perf_counter()
  value = jax.block_until_ready(fn())
  mine = time.perf_counter() - start
  return float(np.max(multihost_utils.process_allgather(np.float32(mine)))), value


def measure(size: str, args) -> dict:
  """One size's row: the save times, and each tier's median restore time."""
  import jax  # pylint: disable=import-outside-toplevel

  from launcher import checkpoint, local_tier, storage, train  # pylint: disable=import-outside-toplevel
  from launcher import workload as workload_lib  # pylint: disable=import-outside-toplevel
  from tests.helpers import load_config  # pylint: disable=import-outside-toplevel

  me = jax.process_index()
  width, layers = SIZES[size]
  config = load_config("lm", "tiny", width=width, num_layers=layers)
  workload = workload_lib.load(config.workload)
  _, _, _, fresh, into = train._build(config, workload)  # pylint: disable=protected-access
  state = jax.jit(fresh, out_shardings=jax.tree.map(lambda x: x.sharding, into))()
  saved = checkpoint.digests(state)
  local_dir = f"/dev/shm/launcher-bench-{os.getppid()}/{size}"
  tier = local_tier.LocalTier(local_dir, "bench", me, 2)
  save_s, _ = job_seconds(lambda: tier.save(1, state, {"seed": 0}))
  blob = local_tier._read_blob(tier.own / "1")  # pylint: disable=protected-access
  move_s, _ = job_seconds(lambda: local_tier._exchange(blob, shift=-1))  # pylint: disable=protected-access
  persistent = {}
  for name, location in ((TIERS[2], f"{args.tmp}/disk/{size}"), (TIERS[3], f"gs://bench/{size}")):
    writer = checkpoint.Checkpoints(storage.path(location), keep=1)
    writer.save(1, state, {"step": 1})
    writer.close()
    persistent[name] = checkpoint.Checkpoints(storage.path(location), keep=1)  # As a start has.

  def from_peer():
    if me == 1:  # The replaced host: its own copy gone, process 0's copy moves to it.
      shutil.rmtree(tier.own / "1")
    return tier.read(1, [False, True], into)

  reads = {
    TIERS[0]: lambda: tier.read(1, [False, False], into),
    TIERS[1]: from_peer,
    TIERS[2]: lambda: persistent[TIERS[2]].restore(1, into),
    TIERS[3]: lambda: persistent[TIERS[3]].restore(1, into),
  }
  samples = {name: [] for name in TIERS}
  for repeat in range(args.repeats):
    for name, read in reads.items():
      seconds, restored = job_seconds(read)
      assert checkpoint.digests(restored) == saved, (size, name)
      samples[name].append(seconds)
      del restored
    if me == 0:
      print(f"  {size}: repeat {repeat + 1}/{args.repeats} done", flush=True)
  for manager in persistent.values():
    manager.close()
  shutil.rmtree(local_dir, ignore_errors=True)
  return {
    "size": size,
    "params": sum(x.size for x in jax.tree.leaves(state.params)),
    "state_mb": round(sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20, 2),
    "local_save_s": save_s,
    "peer_move_s": move_s,
    "restore_s": {name: statistics.median(values) for name, values in samples.items()},
    "repeats": args.repeats,
  }


if __name__ == "__main__":
  main()
