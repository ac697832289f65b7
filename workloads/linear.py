"""A linear regression small enough to check by hand: y = w*x + b fit by mean squared error on cycling points x.

With w=2, b=1 on x=[1,2,3], y=[3.5,5.5,7.5] and SGD at 0.1, the first loss is 0.25 and the step
gives w=2.2, b=1.1. The points cycle in order, so every per-device batch of 3 is x=[1,2,3].
"""

import jax.numpy as jnp
import numpy as np

from launcher import data


def init(config, rng):
  del rng
  return {"w": jnp.float32(config.init_w), "b": jnp.float32(config.init_b)}


def loss(config, params, batch, rng):
  del config, rng
  prediction = params["w"] * batch["x"] + params["b"]
  return jnp.mean((prediction - batch["y"]) ** 2), {}


# The config keys the batches depend on (with batch_size): a resume must keep them.
DATA_KEYS = ("x", "true_w", "true_b")


def dataset(config, split, process_index, process_count, start=0):
  x = np.asarray(config.x, np.float32)
  y = (config.true_w * x + config.true_b).astype(np.float32)
  indices = data.batch_indices(
    len(x),
    batch_size=config.batch_size,
    process_index=process_index,
    process_count=process_count,
    repeat=split == "train",
    start=start,
  )
  share = config.batch_size // process_count
  for t, i in enumerate(data.read(indices), start):
    # Three points repeat within a batch, so an example's id is its place in the stream.
    position = t * config.batch_size + process_index * share + np.arange(len(i))
    yield {"x": x[i], "y": y[i], "id": position.astype(np.int32)}
