"""Any workload of workloads/, recording the example ids each process reads, batch by batch.

`config.inner_workload` names the workload; every train batch's `id` column goes to
`config.ids_dir/process_<i>.jsonl` as {"batch": t, "ids": [...]}, so a test can check the shares.
"""

import importlib
import json
import os


def _inner(config):
  return importlib.import_module(f"workloads.{config.inner_workload}")


def init(config, rng):
  return _inner(config).init(config, rng)


def loss(config, params, batch, rng):
  return _inner(config).loss(config, params, batch, rng)


def dataset(config, split, process_index, process_count, start=0):
  batches = _inner(config).dataset(config, split, process_index, process_count, start=start)
  if split != "train":
    yield from batches
    return
  path = os.path.join(config.ids_dir, f"process_{process_index}.jsonl")
  with open(path, "a") as f:
    for index, batch in enumerate(batches, start):
      f.write(json.dumps({"batch": index, "ids": batch["id"].tolist()}) + "\n")
      f.flush()
      yield batch
