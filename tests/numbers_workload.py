"""A linear regression whose every reported number a test can recompute with numpy: y = X w + b
on random data, chosen global batches poisoned with NaN (`config.nan_at_batches`), and a slow
source when asked (`config.batch_seconds` per train batch, `config.eval_batch_seconds` per eval
batch: a data source of known speed)."""

import time

import jax.numpy as jnp
import numpy as np

from launcher import data


def examples(config) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(1234)
  x = rng.normal(size=(config.num_records, config.features)).astype(np.float32)
  y = (
    x @ np.arange(1, config.features + 1, dtype=np.float32)
    + 0.5
    + rng.normal(scale=0.1, size=config.num_records)
  ).astype(np.float32)
  return {"x": x, "y": y}


def init(config, rng):
  del rng
  return {"w": jnp.zeros((config.features,), jnp.float32), "b": jnp.zeros((), jnp.float32)}


def loss(config, params, batch, rng):
  del config, rng
  error = batch["x"] @ params["w"] + params["b"] - batch["y"]
  return jnp.mean(error**2), {"abs_error": jnp.mean(jnp.abs(error))}


def dataset(config, split, process_index, process_count, start=0):
  columns = examples(config)
  indices = data.batch_indices(
    config.num_records,
    batch_size=config.batch_size,
    process_index=process_index,
    process_count=process_count,
    seed=config.seed if split == "train" else None,
    repeat=split == "train",
    start=start,
  )
  for t, i in enumerate(data.read(indices), start):
    batch = {name: column[i] for name, column in columns.items()}
    if split == "train" and t in config.nan_at_batches:
      batch["y"] = np.full_like(batch["y"], np.nan)
    time.sleep(config.batch_seconds if split == "train" else config.eval_batch_seconds)
    yield batch
