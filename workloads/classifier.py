"""An MLP (flax) classifying scikit-learn's handwritten digits (8x8 images, 10 classes).

The 1,797 images ship inside scikit-learn, so nothing is downloaded. A fixed permutation puts
`config.test_examples` of them in the test split ("eval") and the rest in "train".
"""

import functools

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import optax

from launcher import data
from launcher.errors import UsageError


class MLP(nn.Module):
  hidden_sizes: tuple[int, ...]
  num_classes: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for size in self.hidden_sizes:
      x = nn.relu(nn.Dense(size, dtype=self.dtype)(x))
    return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


def _model(config) -> MLP:
  """The model computing in `config.compute_dtype` (its params stay float32)."""
  return MLP(
    hidden_sizes=tuple(config.hidden_sizes), num_classes=10, dtype=jnp.dtype(config.compute_dtype)
  )


def init(config, rng):
  return _model(config).init(rng, jnp.zeros((1, 64), jnp.float32))["params"]


def loss(config, params, batch, rng):
  del rng
  logits = _model(config).apply({"params": params}, batch["image"])
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
  return losses.mean(), {"accuracy": (logits.argmax(-1) == batch["label"]).mean()}


@functools.cache
def _splits(test_examples: int) -> dict[str, dict[str, np.ndarray]]:
  try:
    from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise UsageError(
      "the classifier workload trains on scikit-learn's digits, which is not installed: "
      "pip install -e '.[classifier]'"
    ) from None
  digits = load_digits()
  order = np.random.default_rng(0).permutation(len(digits.target))
  images = (digits.data / 16.0).astype(np.float32)
  labels = digits.target.astype(np.int32)
  test, train = order[:test_examples], order[test_examples:]
  return {
    "train": {"image": images[train], "label": labels[train], "id": train.astype(np.int32)},
    "eval": {"image": images[test], "label": labels[test], "id": test.astype(np.int32)},
  }


# The config keys the batches depend on (with seed and batch_size): a resume must keep them.
DATA_KEYS = ("test_examples",)


def dataset(config, split, process_index, process_count, start=0):
  examples = _splits(config.test_examples)[split]
  indices = data.batch_indices(
    len(examples["label"]),
    batch_size=config.batch_size,
    process_index=process_index,
    process_count=process_count,
    seed=config.seed if split == "train" else None,
    repeat=split == "train",
    start=start,
  )
  return data.read(indices.map(lambda i: {name: column[i] for name, column in examples.items()}))


def flops_per_example(config) -> float:
  """6 FLOPs per weight per example (forward multiply-add, and twice that backward)."""
  sizes = [64, *config.hidden_sizes, 10]
  return 6.0 * sum(a * b for a, b in zip(sizes, sizes[1:]))
