"""Meshes side by side for the lm: per mesh, the compiled train step's memory per device, its
collectives per step (all-gather / reduce-scatter / all-reduce / all-to-all / collective-permute:
counts and bytes, read from the compiled HLO text), steps/s, and the widest lm whose compiled
step fits a per-device memory budget.

    python benchmarks/mesh.py          # about 10 minutes on 2 cores; prints tables, writes JSON

Simulated CPU devices share two cores: steps/s shows each layout's overhead, not accelerator
scaling; the bytes are what each device would hold and send on an accelerator.
"""

import argparse
import collections
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

from run import launcher_steps_per_sec, summary, write_results  # noqa: E402  (run.py sets XLA_FLAGS first)

from tests.helpers import load_config, lowered_train_call  # noqa: E402

LAYOUTS = {  # name -> config overrides
  "shard_map (replicated)": {"parallel": "shard_map"},
  "data:1,fsdp:8": {"parallel": "fsdp", "mesh": "data:1,fsdp:8"},
  "data:1,fsdp:2,tensor:4": {"parallel": "fsdp", "mesh": "data:1,fsdp:2,tensor:4"},
  "data:2,fsdp:1,tensor:4": {"parallel": "fsdp", "mesh": "data:2,fsdp:1,tensor:4"},
  "data:2,fsdp:2,tensor:2": {"parallel": "fsdp", "mesh": "data:2,fsdp:2,tensor:2"},
  "data:1,fsdp:1,tensor:8": {"parallel": "fsdp", "mesh": "data:1,fsdp:1,tensor:8"},
}
MODEL = {"width": 256, "num_heads": 8, "batch_size": 64}  # lm tiny 4x wider: 1.6M params.
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1}
# `%name = TYPE op(` where TYPE is `f32[64,256]{1,0}` or a tuple of such.
OP = re.compile(
  r"=\s+(\([^()]*\)|\w+\[[\d,]*\](?:\{[^}]*\})?)\s+(" + "|".join(COLLECTIVES) + r")(?:-start)?\("
)
SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")


def collectives(hlo: str) -> dict[str, dict[str, int]]:
  """{op: {"count", "bytes"}} of the collectives in a compiled HLO module's text (bytes: the
  size of each op's result, per device)."""
  found = collections.defaultdict(lambda: {"count": 0, "bytes": 0})
  for result, op in OP.findall(hlo):
    found[op]["count"] += 1
    for dtype, dims in SHAPE.findall(result):
      size = 1
      for dim in filter(None, dims.split(",")):
        size *= int(dim)
      found[op]["bytes"] += size * DTYPE_BYTES.get(dtype, 4)
  return dict(found)


def step_memory_mb(config) -> float:
  """The compiled train step's memory per device: arguments + outputs + temporaries - donated."""
  analysis = lowered_train_call(config).compile().memory_analysis()
  total = (
    analysis.argument_size_in_bytes
    + analysis.output_size_in_bytes
    + analysis.temp_size_in_bytes
    - analysis.alias_size_in_bytes
  )
  return total / 2**20


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--windows", type=int, default=3)
  parser.add_argument("--budget_mb", type=float, default=300.0)
  parser.add_argument("--output", default=os.path.join(REPO, "benchmarks", "results", "mesh.json"))
  args = parser.parse_args()
  results = {"model": MODEL, "layouts": {}, "fits": {}}

  print("lm, width 256, 8 heads, 2 layers, seq 64, global batch 64 (1.6M params), 8 CPU devices")
  print(
    "| layout | step MB/device | all-gather | reduce-scatter | all-reduce | other | "
    "collective MB/step | steps/s |"
  )
  print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
  for name, overrides in LAYOUTS.items():
    config = load_config("lm", "tiny", schedule="constant", **MODEL, **overrides)
    compiled = lowered_train_call(config).compile()
    found = collectives(compiled.as_text())
    memory_mb = step_memory_mb(config)
    rate = summary(
      launcher_steps_per_sec(
        load_config("lm", "tiny", log_every_steps=20, schedule="constant", **MODEL, **overrides),
        args.windows,
      )
    )
    other = sum(found[op]["count"] for op in found if op in COLLECTIVES[3:])
    total_mb = sum(v["bytes"] for v in found.values()) / 2**20

    def cell(op, found=found):
      return f"{found[op]['count']} ({found[op]['bytes'] / 2**20:.2f} MB)" if op in found else "0"

    results["layouts"][name] = {
      "step_mb_per_device": memory_mb,
      "collectives": found,
      "steps_per_sec": rate,
    }
    print(
      f"| {name} | {memory_mb:.1f} | {cell('all-gather')} | {cell('reduce-scatter')} | "
      f"{cell('all-reduce')} | {other} | {total_mb:.2f} | {rate['median']:.2f} "
      f"({rate['min']:.2f}-{rate['max']:.2f}) |",
      flush=True,
    )

  print(f"\nthe widest lm (2 layers, 8 heads) whose step fits {args.budget_mb:g} MB per device")
  widths = (256, 512, 1024, 1536, 2048)
  print("| layout | " + " | ".join(f"{w} wide" for w in widths) + " | widest |")
  print("| --- |" + " ---: |" * (len(widths) + 1))
  for name, overrides in LAYOUTS.items():
    sizes = {}
    for width in widths:
      config = load_config(
        "lm", "tiny", schedule="constant", **{**MODEL, "width": width}, **overrides
      )
      sizes[width] = step_memory_mb(config)
    widest = max((w for w in widths if sizes[w] <= args.budget_mb), default=None)
    results["fits"][name] = {"step_mb": sizes, "widest": widest}
    print(
      f"| {name} | " + " | ".join(f"{sizes[w]:.0f} MB" for w in widths) + f" | {widest} |",
      flush=True,
    )
  write_results(args.output, **results)


if __name__ == "__main__":
  main()
