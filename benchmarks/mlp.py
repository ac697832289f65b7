"""A dispatch-bound workload for benchmarks/dispatch.py: a 2-layer MLP on fixed random batches
(about 1 ms a step on 8 simulated CPU devices), so that per-call overhead is what is measured."""

import jax
import jax.numpy as jnp
import numpy as np

INPUTS, HIDDEN, CLASSES, POOL = 64, 256, 10, 16


def init(config, rng):
  first, second = jax.random.split(rng)
  return {
    "w1": jax.random.normal(first, (INPUTS, HIDDEN)) / np.sqrt(INPUTS),
    "b1": jnp.zeros(HIDDEN),
    "w2": jax.random.normal(second, (HIDDEN, CLASSES)) / np.sqrt(HIDDEN),
    "b2": jnp.zeros(CLASSES),
  }


def logits(params, x):
  return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def loss(config, params, batch, rng):
  del config, rng
  log_probs = jax.nn.log_softmax(logits(params, batch["x"]))
  return -jnp.mean(jnp.take_along_axis(log_probs, batch["y"][:, None], axis=1)), {}


def host_batches(batch_size: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
  """POOL batches of random inputs with labels from a fixed random linear map."""
  rng = np.random.default_rng(seed)
  teacher = rng.normal(size=(INPUTS, CLASSES))
  batches = []
  for _ in range(POOL):
    x = rng.normal(size=(batch_size, INPUTS)).astype(np.float32)
    batches.append({"x": x, "y": np.argmax(x @ teacher, axis=1).astype(np.int32)})
  return batches


def dataset(config, split, process_index, process_count, start=0):
  pool = host_batches(config.batch_size, config.seed)
  rows = config.batch_size // process_count
  for t in range(start, 10**12 if split == "train" else start + 1):
    batch = pool[t % POOL]
    yield {name: x[process_index * rows : (process_index + 1) * rows] for name, x in batch.items()}
