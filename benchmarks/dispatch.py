"""The launcher against a training loop written by hand, small models to the lm at 4x width.

    python benchmarks/dispatch.py          # about 17 minutes on 2 cores, 8 simulated CPU devices
    python benchmarks/dispatch.py --quick

The hand loop is what a user writes first: one pmapped SGD step, each step's host batch read from
the workload's train set (the source the launcher reads) and handed to it, at most two calls in
flight (more abort CPU collectives here); its gradients averaged per array, or as one flat
vector (one all-reduce: what the launcher does on CPU, where XLA does not combine the
all-reduces of a step), with the loss and the workload's metrics (the lm's accuracy and bits per
byte) averaged in the same all-reduce, as the launcher reports them. The launcher runs
`train.run` with one report per window, the same SGD. Part 1, a 2-layer MLP (benchmarks/mlp.py,
global batch 256, about 0.7 ms a step, so what is measured is the cost of each call around
the step): every executor at K=1 and K=10 steps per call. Part 2, each model at K=1, K=10 and
K=auto against the hand loop with one all-reduce, and for a workload with metrics the hand loop
computing the loss alone (what its metrics cost). First, in two fresh processes, what keeping
freed host memory is worth to the hand loop on the lm at 4x width; after that this process keeps
it, as train.run does, so that every ratio is the launcher's own overhead. Loops take turns (part
1's two hand loops A B A B; part 2's loops in turn, --turns times, 3 windows each after WARMUP
dropped ones) so that drift of this shared machine hits all alike. Each speed is the median of
its windows; part 2's ratios pair the loops within a turn (the median over turns of the two
turns' medians' ratio, printed with the turns' range). Part 2 also runs the hand loop a second
time in each turn, a loop that is the reference itself: how far its ratio reads from 1.00 is the
resolution of the others. `--k1-only` runs part 2 with the hand loop, its copy and K=1 alone, to
afford many turns of one model.
"""

import argparse
import collections
import concurrent.futures
import copy
import functools
import multiprocessing
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

from benchmarks.run import print_ratios_and_write  # pylint: disable=wrong-import-position
from launcher import config as config_lib  # pylint: disable=wrong-import-position
from launcher import memory, train  # pylint: disable=wrong-import-position
from launcher import workload as workload_lib  # pylint: disable=wrong-import-position
from tests.helpers import load_config, read_metrics  # pylint: disable=wrong-import-position

LEARNING_RATE = 0.1
# Windows dropped from each of part 2's loops: under steps_per_call=auto the first times K=1 and
# chooses, the second may compile the chosen K (a once-a-run cost, like the first compile).
WARMUP = 2
# The models of part 2: (config, steps a window); the MLP's window is also part 1's.
SGD = {
  "optimizer": "sgd",
  "learning_rate": LEARNING_RATE,
  "schedule": "constant",
  "grad_clip_norm": 0.0,
}


def models(quick: bool) -> dict:
  mlp = config_lib.defaults()
  mlp.update(workload="benchmarks.mlp", batch_size=256, **SGD)
  lm_tiny = load_config("lm", "tiny", **SGD)
  lm_wide = load_config("lm", "tiny", width=256, num_heads=4, **SGD)
  return {
    "MLP (benchmarks/mlp.py)": (mlp, 200 if quick else 500),
    "lm tiny": (lm_tiny, 50),
    "lm tiny 4x wider": (lm_wide, 20),
  }


def hand_loop_steps_per_sec(
  config,
  window: int,
  windows: int,
  one_all_reduce: bool = False,
  warmup: int = 1,
  metrics: bool = True,
) -> list[float]:
  """The reference: a minimal pmap SGD loop written by hand over `config.workload`'s init and loss
  (rng None), each step's host batch read from its train set as the launcher reads it (the
  same data source and its cost on the host). `one_all_reduce`: its gradients averaged as
  one flat vector, which leaves only the launcher's own overhead in the comparison. `metrics`:
  the loss and the workload's metrics averaged with the gradients, as a loop that logs what the
  launcher reports does; without it, the loss alone (XLA then drops the metrics' computation)."""
  workload = workload_lib.load(config.workload)
  devices = jax.local_device_count()

  def loss(params, batch):
    value, values = workload.loss(config, params, batch, None)
    return value, {"loss": value, **(values if metrics else {})}

  @functools.partial(jax.pmap, axis_name="batch", donate_argnums=(0,))
  def train_step(params, batch):
    (_, reported), grads = jax.value_and_grad(loss, has_aux=True)(params, batch)
    if one_all_reduce:
      flat, unflatten = flatten_util.ravel_pytree((grads, reported))
      grads, reported = unflatten(jax.lax.pmean(flat, "batch"))
    else:
      grads, reported = jax.lax.pmean((grads, reported), "batch")
    params = jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, grads)
    return params, reported

  params = jax_utils.replicate(workload.init(config, jax.random.PRNGKey(0)))

  def split(batch):
    return {k: v.reshape((devices, -1) + v.shape[1:]) for k, v in batch.items()}

  host_batches = workload_lib.open_dataset(workload, config, "train", 0, 1)
  in_flight = collections.deque()
  rates = []
  for w in range(windows + warmup):
    start = time.perf_counter()
    for _ in range(window):
      params, reported = train_step(params, split(next(host_batches)))
      in_flight.append(reported)
      if len(in_flight) > 2:
        jax.block_until_ready(in_flight.popleft())
    jax.block_until_ready(params)
    if w >= warmup:  # The first window compiles.
      rates.append(window / (time.perf_counter() - start))
  return rates


def hand_loop_in_fresh_process(keep_freed: bool, model: str, quick: bool, windows: int):
  """The hand loop's steps/s of `model` in a new process, with glibc's malloc as it comes or
  keeping freed memory (launcher.memory.keep_freed_host_memory, which train.run applies)."""
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
    return pool.submit(_hand_loop_child, keep_freed, model, quick, windows).result()


def _hand_loop_child(keep_freed: bool, model: str, quick: bool, windows: int) -> list[float]:
  if keep_freed:
    memory.keep_freed_host_memory()
  config, window = models(quick)[model]
  return hand_loop_steps_per_sec(config, window, windows, one_all_reduce=True)


def reports_metrics(config) -> bool:
  """Whether `config.workload`'s loss returns metrics besides the loss (as train.run reads them:
  workload.check_loss_output of its output's shapes)."""
  workload = workload_lib.load(config.workload)
  params = jax.eval_shape(functools.partial(workload.init, config), jax.random.PRNGKey(0))
  batch = next(workload_lib.open_dataset(workload, config, "train", 0, 1))
  output = jax.eval_shape(functools.partial(workload.loss, config), params, batch, None)
  return bool(workload_lib.check_loss_output(workload, output))


def launcher_steps_per_sec(
  config, window: int, windows: int, warmup: int = 1, **overrides
) -> tuple[list[float], int]:
  """`train.run` of `config`, one report per window; the first `warmup` windows (compiles, and
  under steps_per_call=auto its timing, choice and the chosen K's compile) are dropped; and the K
  it ran at."""
  config = copy.deepcopy(config)
  config.update(
    log_every_steps=window,
    num_steps=window * (windows + warmup + 1),
    eval_every_steps=0,
    checkpoint_every_steps=0,
    **overrides,
  )
  with tempfile.TemporaryDirectory() as workdir:
    train.run(config, workdir)
    rows = read_metrics(workdir)
  k = int(next(row["steps_per_call"] for row in rows if "steps_per_call" in row))
  return [row["steps_per_sec"] for row in rows[warmup : warmup + windows]], k


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument(
    "--models",
    default="",
    help="part 2 only, for these models (comma-separated names as in the table, e.g. "
    "'lm tiny 4x wider')",
  )
  parser.add_argument("--turns", type=int, default=3, help="turns of each loop in part 2")
  parser.add_argument(
    "--k1-only", action="store_true", help="part 2 with the hand loop, its copy and K=1 alone"
  )
  parser.add_argument(
    "--output", default=os.path.join(REPO, "benchmarks", "results", "dispatch.json")
  )
  args = parser.parse_args()
  only = [name.strip() for name in args.models.split(",") if name.strip()]
  unknown = [name for name in only if name not in models(args.quick)]
  if unknown:
    parser.error(f"--models: no model {unknown}; the models are {list(models(args.quick))}")
  if args.turns < 1:
    parser.error(f"--turns={args.turns}: at least 1")
  logging.set_verbosity(logging.WARNING)
  windows = 3 if args.quick else 5
  freed_memory = {
    keep: hand_loop_in_fresh_process(keep, "lm tiny 4x wider", args.quick, windows)
    for keep in ((False, True) if not only else ())
  }
  memory.keep_freed_host_memory()  # As train.run does: the ratios below are the launcher's own.
  rows, ratios, turn_ratios = [], {}, {}

  def row(model, name, turns, k=None):
    """A table row of a loop's windows, given per turn (a run alone is one turn)."""
    values = [value for values in turns for value in values]
    result = {
      "model": model,
      "name": name,
      "steps_per_sec": statistics.median(values),
      "min": min(values),
      "max": max(values),
      "ms_per_step": 1e3 / statistics.median(values),
      "windows": len(values),
      **({"steps_per_call": k} if k else {}),
      **({"turn_medians": [statistics.median(t) for t in turns]} if len(turns) > 1 else {}),
    }
    rows.append(result)
    print(
      f"| {model:<24} | {name:<36} | {result['steps_per_sec']:8.1f} | {result['min']:7.1f}-"
      f"{result['max']:<7.1f} | {result['ms_per_step']:7.3f} |",
      flush=True,
    )
    return result["steps_per_sec"]

  def alternating(measures: dict, times=2) -> dict:
    """Measurements in turn (A B C A B C ...): for each name, its windows of each turn; each
    turn's medians go to stderr as it ends."""
    results = {name: [] for name in measures}
    for turn in range(times):
      for name, measure in measures.items():
        results[name].append(measure())
      medians = ", ".join(f"{name} {statistics.median(r[-1]):.1f}" for name, r in results.items())
      print(f"turn {turn + 1}/{times} (steps/s): {medians}", file=sys.stderr, flush=True)
    return results

  def paired(name, turns, reference_turns):
    """Ratio `name`: the median over turns of a loop's speed over the reference's in the same
    turn (drift between turns cancels); each turn's ratio is kept in `turn_ratios`."""
    turn_ratios[name] = [
      statistics.median(values) / statistics.median(reference)
      for values, reference in zip(turns, reference_turns, strict=True)
    ]
    ratios[name] = statistics.median(turn_ratios[name])

  turn = 2 if args.quick else 3  # Windows a turn in part 2.
  print(
    f"{jax.device_count()} devices; SGD; {windows} windows a row in parts 0 and 1, {turn} a turn "
    f"in part 2\n"
  )
  print(f"| {'model':<24} | {'loop':<36} | steps/s  | min-max         | ms/step |")
  print(f"| {'-' * 24} | {'-' * 36} | -------: | --------------: | ------: |")
  if not only:  # Parts 0 and 1.
    as_it_comes = row(
      "lm tiny 4x wider", "hand loop, glibc malloc as it comes", [freed_memory[False]]
    )
    kept = row("lm tiny 4x wider", "hand loop, freed memory kept", [freed_memory[True]])
    ratios["lm tiny 4x wider: hand loop, freed memory kept / glibc malloc as it comes"] = (
      kept / as_it_comes
    )
    mlp_name, (mlp, window) = next(iter(models(args.quick).items()))
    hand, combined = alternating(
      {
        "per-array all-reduce": lambda: hand_loop_steps_per_sec(mlp, window, windows),
        "one all-reduce": lambda: hand_loop_steps_per_sec(
          mlp, window, windows, one_all_reduce=True
        ),
      }
    ).values()
    hand = row(mlp_name, "hand loop, per-array all-reduce", hand)
    combined = row(mlp_name, "hand loop, one all-reduce", combined)
    for executor in config_lib.EXECUTORS:
      for k in (1, 10):
        rate = row(
          mlp_name,
          f"launcher {executor}, K={k}",
          [launcher_steps_per_sec(mlp, window, windows, parallel=executor, steps_per_call=k)[0]],
        )
        ratios[f"MLP: launcher {executor} K={k} / hand loop, one all-reduce"] = rate / combined
  for model, (config, window) in models(args.quick).items():
    if only and model not in only:
      continue
    chosen = []

    def auto(config=config, window=window, chosen=chosen):
      values, ran = launcher_steps_per_sec(config, window, turn, WARMUP, steps_per_call="auto")
      chosen.append(ran)
      return values

    def hand(metrics=True, config=config, window=window):
      return hand_loop_steps_per_sec(config, window, turn, True, WARMUP, metrics=metrics)

    def launcher(k, config=config, window=window):
      return launcher_steps_per_sec(config, window, turn, WARMUP, steps_per_call=k)[0]

    loops = {"hand loop, one all-reduce": hand, "launcher K=1": lambda: launcher(1)}
    if not args.k1_only:
      loops.update({"launcher K=10": lambda: launcher(10), "launcher K=auto": auto})
      if reports_metrics(config):  # What computing them costs the hand loop.
        loops["hand loop, one all-reduce, loss only"] = lambda: hand(metrics=False)
    loops["hand loop, one all-reduce, again"] = hand
    turns = alternating(loops, times=args.turns)
    reference = turns["hand loop, one all-reduce"]
    rates = {}
    for name, loop_turns in turns.items():
      k = {"launcher K=1": 1, "launcher K=10": 10}.get(name)
      label = f"{name} (chose {'/'.join(map(str, chosen))})" if name == "launcher K=auto" else name
      rates[name] = row(model, label, loop_turns, k)
    for name in ("launcher K=1", "launcher K=10", "launcher K=auto"):
      if name in turns:
        paired(f"{model}: {name} / hand loop, one all-reduce", turns[name], reference)
    paired(
      f"{model}: hand loop again / hand loop (the resolution)",
      turns["hand loop, one all-reduce, again"],
      reference,
    )
    if "hand loop, one all-reduce, loss only" in turns:
      paired(
        f"{model}: hand loop with the workload's metrics / loss only",
        reference,
        turns["hand loop, one all-reduce, loss only"],
      )
    if "launcher K=auto" in turns:
      best = "launcher K=1" if rates["launcher K=1"] > rates["launcher K=10"] else "launcher K=10"
      paired(f"{model}: launcher K=auto / best fixed K", turns["launcher K=auto"], turns[best])
  print_ratios_and_write(
    args.output,
    quick=args.quick,
    rows=rows,
    ratios=ratios,
    turn_ratios=turn_ratios,
    ranges={name: (min(values), max(values)) for name, values in turn_ratios.items()},
  )


if __name__ == "__main__":
  main()
