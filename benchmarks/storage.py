"""What a run's files cost on each kind of storage: local disk vs GCS (a local fake-gcs-server).

    python benchmarks/storage.py          # about a minute; prints a table, writes JSON

Rows alternate local / gs:// so that drift of this shared machine hits both alike. The emulator
runs on this machine, so its numbers are the client-side cost of the GCS protocol (HTTP requests,
tensorstore's object writes, composes), not a real bucket's network latency.
"""

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.gcs_emulator import Emulator  # pylint: disable=wrong-import-position


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument(
    "--output", default=os.path.join(REPO, "benchmarks", "results", "storage.json")
  )
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    emulator = Emulator(pathlib.Path(tmp, "gcs"), pathlib.Path(tmp, "gcs.log"))
    emulator.bucket("bench")
    os.environ.update(emulator.env)  # Before launcher.storage configures the GCS clients.
    try:
      rows = measure(args.repeats, os.path.join(tmp, "local"), "gs://bench/run")
    finally:
      emulator.stop()
  print(
    "\n| measurement | local disk | gs:// (emulator) | gs / local |\n| --- | ---: | ---: | ---: |"
  )
  for row in rows:
    print(
      f"| {row['name']} | {row['local']:.3g} ms | {row['gs']:.3g} ms | "
      f"{row['gs'] / row['local']:.3g}x |"
    )
  os.makedirs(os.path.dirname(args.output), exist_ok=True)
  with open(args.output, "w") as f:
    json.dump({"repeats": args.repeats, "rows": rows}, f, indent=2)
  print(f"\nwrote {args.output}")


def measure(repeats: int, local: str, remote: str) -> list[dict]:
  import jax  # pylint: disable=import-outside-toplevel
  from absl import logging  # pylint: disable=import-outside-toplevel

  from launcher import checkpoint, optimizer, parallel, storage  # pylint: disable=import-outside-toplevel
  from launcher import state as state_lib  # pylint: disable=import-outside-toplevel
  from launcher import workload as workload_lib  # pylint: disable=import-outside-toplevel
  from tests.helpers import load_config  # pylint: disable=import-outside-toplevel

  logging.set_verbosity(logging.WARNING)

  config = load_config("classifier", hidden_sizes=(2048, 2048))  # 52 MB with AdamW moments.
  workload = workload_lib.load(config.workload)
  tx = optimizer.build(config)
  state = state_lib.create(config, workload.init, tx)
  megabytes = sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20
  executor = parallel.executor("pmap", state)
  global_state = jax.device_put(state, executor.state_shardings)
  samples = {
    name: {"local": [], "gs": []}
    for name in (
      "checkpoint save: loop blocked",
      "checkpoint save: until committed",
      "checkpoint restore",
      "append one metrics row (flush)",
    )
  }
  print(f"train state {megabytes:.1f} MB; {repeats} repeats each, local and gs:// alternating")
  for location in (local, remote):  # First saves set up orbax: not timed.
    checkpoints = checkpoint.Checkpoints(storage.path(location), keep=2)
    checkpoints.save(0, global_state, {"step": 0})
    checkpoints.wait()
    checkpoints.close()
  for i in range(1, repeats + 1):
    for kind, location in (("local", local), ("gs", remote)):
      checkpoints = checkpoint.Checkpoints(storage.path(location), keep=2)
      start = time.perf_counter()
      checkpoints.save(i, global_state, {"step": i})
      blocked = time.perf_counter() - start
      checkpoints.wait()
      samples["checkpoint save: loop blocked"][kind].append(blocked)
      samples["checkpoint save: until committed"][kind].append(time.perf_counter() - start)
      start = time.perf_counter()
      checkpoints.restore(i, like=state)
      samples["checkpoint restore"][kind].append(time.perf_counter() - start)
      checkpoints.close()
      appender = storage.Appender(storage.path(location) / "metrics.jsonl")
      row = json.dumps({"step": i, "loss": 1.0, "steps_per_sec": 10.0}) + "\n"
      for _ in range(10):
        appender.write(row)
        start = time.perf_counter()
        appender.flush()
        samples["append one metrics row (flush)"][kind].append(time.perf_counter() - start)
      appender.close()
    print(f"  repeat {i}/{repeats} done", flush=True)
  return [
    {
      "name": name,
      "unit": "ms",
      "state_mb": round(megabytes, 1),
      **{kind: 1000 * statistics.median(values) for kind, values in by_kind.items()},
    }
    for name, by_kind in samples.items()
  ]


if __name__ == "__main__":
  main()
