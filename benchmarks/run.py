"""Every speed comparison of the launcher, side by side in one run, as a table and a JSON file.

    python benchmarks/run.py            # about 15 minutes on 2 cores, 8 simulated CPU devices
    python benchmarks/run.py --quick    # fewer and shorter windows, for a smoke test

Each number is the median over >= 5 timed windows after a warm-up window, with the min-max
beside it. Ratios compare two rows measured in this same run. Simulated CPU devices share two
cores: they show overheads and relative costs, not accelerator speed.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # pylint: disable=wrong-import-position
from absl import logging  # pylint: disable=wrong-import-position

from launcher import calls_in_flight, data, optimizer, parallel, step, train  # pylint: disable=wrong-import-position
from launcher import state as state_lib  # pylint: disable=wrong-import-position
from launcher import workload as workload_lib  # pylint: disable=wrong-import-position
from tests.helpers import load_config, read_metrics  # pylint: disable=wrong-import-position


def print_ratios_and_write(
  path: str, *, ratios: dict[str, float], ranges: dict | None = None, **results
) -> None:
  """Prints a benchmark's ratios as a table, with the range of each one's `ranges` (min, max) where
  it has one, and writes all its results (`write_results`)."""
  ranges = ranges or {}
  print("\n| ratio | value | range |\n| --- | ---: | --- |")
  for name, value in ratios.items():
    low, high = ranges.get(name, (None, None))
    spread = f"{low:.2f}-{high:.2f}" if low is not None else ""
    print(f"| {name} | {value:.2f} | {spread} |")
  write_results(path, ratios=ratios, ranges=ranges, **results)


def write_results(path: str, **results) -> None:
  """Writes a benchmark's results as JSON with the machine and the date they were measured on."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(
      {
        "machine": {
          "cpus": os.cpu_count(),
          "python": platform.python_version(),
          "jax": jax.__version__,
          "devices": jax.device_count(),
        },
        "date": time.strftime("%Y-%m-%d"),
        **results,
      },
      f,
      indent=2,
    )
  print(f"\nwrote {path}")


def summary(values: list[float]) -> dict:
  return {
    "median": statistics.median(values),
    "min": min(values),
    "max": max(values),
    "windows": len(values),
  }


def launcher_steps_per_sec(config, windows: int) -> list[float]:
  """train.run with a report per window; the first window (compile, warm-up) is dropped."""
  window = config.log_every_steps
  config.num_steps = window * (windows + 2)  # Warm-up first, and the last holds the final save.
  config.eval_every_steps = 0
  config.checkpoint_every_steps = 0
  with tempfile.TemporaryDirectory() as workdir:
    train.run(config, workdir)
    rows = read_metrics(workdir)
  return [row["steps_per_sec"] for row in rows[1 : windows + 1]]


def hand_loop_steps_per_sec(
  config, windows: int, *, on_device: bool = True, sync_every_step: bool = False
) -> list[float]:
  """A minimal pmap loop: the launcher's per-device step, the same bound on calls in flight,
  no metrics reporting, no prefetch thread, nothing else. Data: one batch kept on the devices, or
  the workload's real host pipeline (dataset -> per-device split -> device_put, 2 ahead)."""
  workload = workload_lib.load(config.workload)
  k, window = config.steps_per_call, config.log_every_steps
  tx = optimizer.build(config)

  def loss_fn(params, batch, rng):
    return workload.loss(config, params, batch, rng)

  state = state_lib.create(config, workload.init, tx)
  executor = parallel.executor(config.parallel, state)
  replicated_state = executor.from_global(jax.device_put(state, executor.state_shardings))
  host_batches = workload.dataset(config, "train", 0, 1)
  example = next(host_batches)
  metric_names = workload_lib.check_loss_output(
    workload, jax.eval_shape(loss_fn, state.params, example, None)
  )
  metric_set = step.MetricSet([*step.TRAIN_METRICS, *metric_names])
  empty = executor.to_devices(metric_set.zeros)
  call = executor.map_train(
    steps_per_call=k,
    metric_set=metric_set,
    loss_fn=loss_fn,
    tx=tx,
    schedule=optimizer.schedule(config),
  )
  if on_device:
    host_batch = executor.batch_to_devices(next(data.group(iter([example] * k), k)), stacked=k > 1)
    fixed = jax.device_put(host_batch, executor.batch_sharding(stacked=k > 1))  # shard_map's
    batches = iter(lambda: fixed, None)
  else:
    batches = data.prefetch(
      data.group(host_batches, k), lambda batch: executor.batch_to_devices(batch, stacked=k > 1)
    )
  in_flight = calls_in_flight.InFlight(config.max_calls_in_flight)
  rates = []
  for w in range(windows + 1):
    start = time.perf_counter()
    for _ in range(window // k):
      batch = next(batches)
      in_flight.wait_for_room()
      replicated_state, metrics = call(replicated_state, empty, batch)
      in_flight.add(metrics)
      if sync_every_step:
        metric_set.compute(executor.to_host(metrics))["loss"]
    jax.block_until_ready(replicated_state)
    if w:
      rates.append(window / (time.perf_counter() - start))
  return rates


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument(
    "--output", default=os.path.join(REPO, "benchmarks", "results", "latest.json")
  )
  args = parser.parse_args()
  logging.set_verbosity(logging.WARNING)
  windows = 3 if args.quick else 5
  rows = []

  def row(group, name, values, unit="steps/s", note=""):
    result = {"group": group, "name": name, "unit": unit, "note": note, **summary(values)}
    rows.append(result)
    print(
      f"  {name:<52} {result['median']:>10.2f} {unit:<8} "
      f"[{result['min']:.2f}-{result['max']:.2f}] {note}",
      flush=True,
    )
    return result["median"]

  def lm(**overrides):
    return load_config(
      "lm",
      "tiny",
      **{"log_every_steps": 20 if args.quick else 60, "schedule": "constant", **overrides},
    )

  def linear(**overrides):
    return load_config("linear", **{"log_every_steps": 200 if args.quick else 400, **overrides})

  def alternating(first, second):
    """Runs two measurements A B A B, so that drift of this shared machine hits both alike."""
    a, b = [], []
    for _ in range(2):
      a += first()
      b += second()
    return a, b

  print(
    "launcher overhead: train.run vs a hand-written pmap loop, the same step (lm tiny, "
    "~60 ms per step here)"
  )
  ratios = {}
  for k in (1, 10):
    hand, ours = alternating(
      lambda k=k: hand_loop_steps_per_sec(lm(steps_per_call=k), windows),
      lambda k=k: launcher_steps_per_sec(lm(steps_per_call=k), windows),
    )
    hand = row("overhead", f"hand pmap loop, on-device data, K={k}", hand)
    ours = row("overhead", f"launcher train.run, K={k}", ours)
    ratios[f"launcher/hand K={k}"] = ours / hand

  print("steps per call K (lax.scan inside one compiled call)")
  for name, make in (("linear (dispatch-bound)", linear), ("lm tiny (compute-bound)", lm)):
    base = None
    for k in (1, 2, 5, 10, 20):
      rate = row(
        "steps_per_call",
        f"{name}, K={k}",
        launcher_steps_per_sec(make(steps_per_call=k), windows),
        note=f"max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MB",
      )
      base = base or rate
      ratios[f"{name} K={k}/K=1"] = rate / base

  print("executors: pmap vs jit(shard_map), the same per-device step")
  for name, make in (("linear (dispatch-bound)", linear), ("lm tiny (compute-bound)", lm)):
    pmap, shard_map = alternating(
      lambda make=make: launcher_steps_per_sec(make(parallel="pmap"), windows),
      lambda make=make: launcher_steps_per_sec(make(parallel="shard_map"), windows),
    )
    pmap = row("executor", f"{name}, pmap", pmap)
    shard_map = row("executor", f"{name}, shard_map", shard_map)
    ratios[f"{name} pmap/shard_map step time"] = shard_map / pmap

  print("host syncs and input pipeline (hand loop, lm tiny)")
  on_device, real = alternating(
    lambda: hand_loop_steps_per_sec(lm(), windows),
    lambda: hand_loop_steps_per_sec(lm(), windows, on_device=False),
  )
  on_device = row("pipeline", "on-device data", on_device)
  real = row("pipeline", "real host pipeline (dataset -> split -> prefetch)", real)
  synced = row(
    "pipeline",
    "on-device data + float(loss) every step",
    hand_loop_steps_per_sec(lm(), windows, sync_every_step=True),
  )
  ratios["per-step float(loss) / none"] = synced / on_device
  ratios["real pipeline / on-device data"] = real / on_device

  print_ratios_and_write(args.output, quick=args.quick, rows=rows, ratios=ratios)


if __name__ == "__main__":
  main()
