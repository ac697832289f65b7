"""Executors side by side: steps/s of pmap, shard_map and fsdp, of fsdp's meshes, the train state
per device at 1, 2, 4 and 8 devices, and the widest lm whose compiled step fits a per-device
memory budget. (The process's peak memory per state byte: benchmarks/memory.py.)

    python benchmarks/fsdp.py          # about 8 minutes on 2 cores; prints tables, writes JSON

Simulated CPU devices share two cores: steps/s shows each executor's overhead, not accelerator
scaling; the byte counts are what each device would hold on an accelerator.
"""

import argparse
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

from run import launcher_steps_per_sec, summary, write_results  # pylint: disable=wrong-import-position

from tests.helpers import load_config, read_metrics  # pylint: disable=wrong-import-position

EXECUTORS = ("pmap", "shard_map", "fsdp")
WIDE = {"width": 256, "num_heads": 4}  # lm tiny's shape, 4x wider: 1.6M params.


def first_row(devices: int, overrides: dict) -> dict:
  """The first metrics row of a 2-step `python -m launcher` run of lm tiny on `devices` devices."""
  with tempfile.TemporaryDirectory() as workdir:
    subprocess.run(
      [
        sys.executable,
        "-m",
        "launcher",
        "--config=configs/lm.py:tiny",
        f"--workdir={workdir}",
        "--config.num_steps=2",
        "--config.log_every_steps=2",
        "--config.eval_every_steps=0",
        "--config.schedule=constant",
        "--config.batch_size=64",
        *(f"--config.{key}={value}" for key, value in overrides.items()),
      ],
      cwd=REPO,
      env={**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"},
      capture_output=True,
      text=True,
      timeout=600,
      check=True,
    )
    return read_metrics(workdir)[0]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--windows", type=int, default=5)
  parser.add_argument("--budget_mb", type=float, default=300.0)
  parser.add_argument("--output", default=os.path.join(REPO, "benchmarks", "results", "fsdp.json"))
  args = parser.parse_args()
  results = {"steps_per_sec": {}, "mesh_steps_per_sec": {}, "state_mb": {}, "fits": {}}

  print("| model | " + " | ".join(f"{e} steps/s" for e in EXECUTORS) + " |")
  print("| --- |" + " ---: |" * len(EXECUTORS))
  for model, overrides in (("lm tiny (0.12M params)", {}), ("lm tiny 4x wider (1.6M)", WIDE)):
    rates = {
      e: summary(
        launcher_steps_per_sec(
          load_config(
            "lm", "tiny", log_every_steps=30, schedule="constant", parallel=e, **overrides
          ),
          args.windows,
        )
      )
      for e in EXECUTORS
    }
    results["steps_per_sec"][model] = rates
    print(
      f"| {model} | "
      + " | ".join(
        f"{rates[e]['median']:.2f} ({rates[e]['min']:.2f}-{rates[e]['max']:.2f})" for e in EXECUTORS
      )
      + " |",
      flush=True,
    )

  print("\n| fsdp mesh (lm tiny 4x wider) | steps/s | state MB/device |")
  print("| --- | ---: | ---: |")
  for mesh in ("data:1,fsdp:8", "data:2,fsdp:4", "data:4,fsdp:2", "data:8,fsdp:1"):
    rate = summary(
      launcher_steps_per_sec(
        load_config(
          "lm", "tiny", log_every_steps=30, schedule="constant", parallel="fsdp", mesh=mesh, **WIDE
        ),
        args.windows,
      )
    )
    state_mb = first_row(8, {**WIDE, "parallel": "fsdp", "mesh": mesh})["state_bytes_per_device"]
    results["mesh_steps_per_sec"][mesh] = {**rate, "state_mb": state_mb / 2**20}
    print(
      f"| {mesh} | {rate['median']:.2f} ({rate['min']:.2f}-{rate['max']:.2f}) | "
      f"{state_mb / 2**20:.2f} |",
      flush=True,
    )

  print("\n| devices | pmap state MB/device | fsdp state MB/device | fsdp / pmap |")
  print("| ---: | ---: | ---: | ---: |")
  for devices in (1, 2, 4, 8):
    sizes = {
      e: first_row(devices, {**WIDE, "parallel": e})["state_bytes_per_device"] / 2**20
      for e in ("pmap", "fsdp")
    }
    results["state_mb"][devices] = sizes
    print(
      f"| {devices} | {sizes['pmap']:.2f} | {sizes['fsdp']:.2f} | "
      f"{sizes['fsdp'] / sizes['pmap']:.3f} |",
      flush=True,
    )

  print(
    f"\nlm (2 layers, seq 64, global batch 64) on 8 devices: compiled step memory per device "
    f"against a {args.budget_mb:g} MB budget (shard_map holds the state replicated, as pmap "
    "does; pmap's own estimate would cost a second compilation)"
  )
  print("| width | params | replicated step MB/device | fsdp step MB/device |")
  print("| ---: | ---: | ---: | ---: |")
  widest = {}
  for width in (256, 512, 768, 1024, 1536):
    rows = {
      e: first_row(8, {"width": width, "num_heads": 4, "parallel": e})
      for e in ("shard_map", "fsdp")
    }
    mb = {e: rows[e]["step_memory_bytes_per_device"] / 2**20 for e in rows}
    params = round(rows["fsdp"]["state_bytes_per_device"] * 8 / 12)  # f32 params + 2 moments.
    results["fits"][width] = mb
    for e in mb:
      if mb[e] <= args.budget_mb:
        widest[e] = width
    print(
      f"| {width} | {params / 1e6:.1f}M | {mb['shard_map']:.1f} | {mb['fsdp']:.1f} |", flush=True
    )
  results["widest_within_budget"] = widest
  print(
    f"\nwidest within {args.budget_mb:g} MB: replicated {widest.get('shard_map')}, "
    f"fsdp {widest.get('fsdp')}"
  )
  write_results(args.output, **results)


if __name__ == "__main__":
  main()
