"""A small model under the launcher's defaults against a minimal hand-written pmap loop.

    python benchmarks/dispatch.py          # about 3 minutes on 2 cores, 8 simulated CPU devices
    python benchmarks/dispatch.py --quick

The model (benchmarks/mlp.py: a 2-layer MLP, global batch 256, SGD) takes about a millisecond a
step, so what is measured is the cost of each call around the step. The hand loop below is what a
user writes first: one pmapped SGD step, the host batch handed to it each step, at most two calls
in flight (more abort CPU collectives here). The launcher runs `train.run` with one report per
window; every executor at K=1 and K=10 steps per call. Hand loop and launcher alternate (A B A B)
so that drift of this shared machine hits both alike; each number is the median of the windows.
"""

import argparse
import collections
import functools
import json
import os
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
from flax import jax_utils  # pylint: disable=wrong-import-position
from jax import flatten_util  # pylint: disable=wrong-import-position

from benchmarks import mlp  # pylint: disable=wrong-import-position
from benchmarks.run import print_ratios_and_write  # pylint: disable=wrong-import-position
from launcher import config as config_lib  # pylint: disable=wrong-import-position
from launcher import train  # pylint: disable=wrong-import-position

BATCH_SIZE, LEARNING_RATE = 256, 0.1


def hand_loop_steps_per_sec(window: int, windows: int, one_all_reduce: bool = False) -> list[float]:
  """The reference: a minimal pmap training loop written by hand. `one_all_reduce`: its gradients
  averaged as one flat vector (what the launcher does on CPU, where XLA does not combine the
  all-reduces of a step), which leaves only the launcher's own overhead in the comparison."""
  devices = jax.local_device_count()

  def loss(params, batch):
    return mlp.loss(None, params, batch, None)[0]

  @functools.partial(jax.pmap, axis_name="batch", donate_argnums=(0,))
  def train_step(params, batch):
    value, grads = jax.value_and_grad(loss)(params, batch)
    if one_all_reduce:
      flat, unflatten = flatten_util.ravel_pytree(grads)
      grads = unflatten(jax.lax.pmean(flat, "batch"))
    else:
      grads = jax.lax.pmean(grads, "batch")
    params = jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, grads)
    return params, jax.lax.pmean(value, "batch")

  params = jax_utils.replicate(mlp.init(None, jax.random.PRNGKey(0)))

  def split(batch):
    return {k: v.reshape((devices, -1) + v.shape[1:]) for k, v in batch.items()}

  pool = [split(batch) for batch in mlp.host_batches(BATCH_SIZE)]
  in_flight = collections.deque()
  rates = []
  for w in range(windows + 1):
    start = time.perf_counter()
    for t in range(window):
      params, loss_value = train_step(params, pool[t % len(pool)])
      in_flight.append(loss_value)
      if len(in_flight) > 2:
        in_flight.popleft().block_until_ready()
    jax.block_until_ready(params)
    if w:  # The first window compiles and warms up.
      rates.append(window / (time.perf_counter() - start))
  return rates


def launcher_steps_per_sec(window: int, windows: int, **overrides) -> list[float]:
  """`train.run` of benchmarks/mlp.py, one report per window; the first window is dropped."""
  config = config_lib.defaults()
  config.update(
    workload="benchmarks.mlp",
    batch_size=BATCH_SIZE,
    optimizer="sgd",
    learning_rate=LEARNING_RATE,
    log_every_steps=window,
    num_steps=window * (windows + 2),
    eval_every_steps=0,
    checkpoint_every_steps=0,
    **overrides,
  )
  with tempfile.TemporaryDirectory() as workdir:
    train.run(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f]
  return [row["steps_per_sec"] for row in rows[1 : windows + 1]]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument(
    "--output", default=os.path.join(REPO, "benchmarks", "results", "dispatch.json")
  )
  args = parser.parse_args()
  logging.set_verbosity(logging.WARNING)
  window, windows = (200, 3) if args.quick else (500, 5)
  rows, ratios = [], {}

  def row(name, values):
    result = {
      "name": name,
      "steps_per_sec": statistics.median(values),
      "min": min(values),
      "max": max(values),
      "ms_per_step": 1e3 / statistics.median(values),
      "windows": len(values),
    }
    rows.append(result)
    print(
      f"| {name:<36} | {result['steps_per_sec']:8.1f} | {result['min']:7.1f}-"
      f"{result['max']:<7.1f} | {result['ms_per_step']:6.3f} |",
      flush=True,
    )
    return result["steps_per_sec"]

  print(
    f"2-layer MLP, global batch {BATCH_SIZE}, SGD, {jax.device_count()} devices; "
    f"{windows} windows of {window} steps\n"
  )
  print(f"| {'loop':<36} | steps/s  | min-max         | ms/step |")
  print(f"| {'-' * 36} | -------: | --------------: | ------: |")
  hand, default = [], []
  for _ in range(2):
    hand += hand_loop_steps_per_sec(window, windows)
    default += launcher_steps_per_sec(window, windows)
  hand = row("hand-written pmap loop", hand)
  default = row("launcher defaults (K=1)", default)
  ratios["launcher defaults / hand loop, K=1"] = default / hand
  for executor in config_lib.EXECUTORS:
    for k in (1, 10):
      rate = row(
        f"launcher {executor}, K={k}",
        launcher_steps_per_sec(window, windows, parallel=executor, steps_per_call=k),
      )
      ratios[f"launcher {executor} K={k} / hand loop"] = rate / hand
  combined = row(
    "hand loop, one gradient all-reduce",
    hand_loop_steps_per_sec(window, windows, one_all_reduce=True),
  )
  ratios["launcher defaults / hand loop with one all-reduce, K=1"] = default / combined
  print_ratios_and_write(args.output, quick=args.quick, rows=rows, ratios=ratios)


if __name__ == "__main__":
  main()
