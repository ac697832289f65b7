"""A decoder-only transformer (flax) predicting the next token of real English text.

The corpus is CPython's own documentation text (`pydoc_data.topics`, ~466 KB, shipped with every
Python), any UTF-8 file given as `config.text_file`, or a corpus of Parquet or ArrayRecord shards
given as `config.data` (launcher/corpus.py), local or gs://. Its last `config.eval_fraction` is
the eval split. An example is a window of `config.seq_len + 1` tokens: bytes, or the tokens of a
Hugging Face `tokenizers` file given as `config.tokenizer` (with config.data).
"""

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from launcher import corpus as corpus_lib
from launcher import data, sharding
from launcher.errors import UsageError


def _named(init, *names):
  """`init` whose params carry logical dimension names (flax metadata; docs/sharding.md)."""
  return nn.with_logical_partitioning(init, names)


class Block(nn.Module):
  """Pre-norm transformer block: causal self-attention, then a 4x GELU MLP, its params named
  Megatron-style: attention heads and the MLP's hidden dimension (`heads`, `mlp`) split over
  `tensor`, the model width (`embed`) over `fsdp`.

  Attention has no biases: a key bias shifts every logit of a query equally, so its gradient is
  exactly zero and it would only carry rounding noise.
  """

  num_heads: int
  dropout_rate: float
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, deterministic: bool):
    width = x.shape[-1]
    dense_init = nn.initializers.lecun_normal()
    causal = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
    y = _layer_norm(self.dtype)(x)
    y = nn.MultiHeadDotProductAttention(
      num_heads=self.num_heads,
      dtype=self.dtype,
      dropout_rate=self.dropout_rate,
      deterministic=deterministic,
      use_bias=False,
      kernel_init=_named(dense_init, "embed", "heads", "kv"),
      out_kernel_init=_named(dense_init, "heads", "kv", "embed"),
    )(y, mask=causal)
    x = x + nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    y = _layer_norm(self.dtype)(x)
    y = nn.Dense(
      4 * width,
      dtype=self.dtype,
      kernel_init=_named(dense_init, "embed", "mlp"),
      bias_init=_named(nn.initializers.zeros, "mlp"),
    )(y)
    y = sharding.constrain(nn.gelu(y), ("batch", "length", "mlp"))
    y = nn.Dense(
      width,
      dtype=self.dtype,
      kernel_init=_named(dense_init, "mlp", "embed"),
      bias_init=_named(nn.initializers.zeros, "embed"),
    )(y)
    return x + nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)


def _layer_norm(dtype) -> nn.LayerNorm:
  return nn.LayerNorm(
    dtype=dtype,
    scale_init=_named(nn.initializers.ones, "embed"),
    bias_init=_named(nn.initializers.zeros, "embed"),
  )


ACTIVATION = ("batch", "length", "embed")  # The residual stream's dimensions.


class ScannedBlock(nn.Module):
  """One Block as the body of `nn.scan`."""

  num_heads: int
  dropout_rate: float
  dtype: jnp.dtype
  deterministic: bool

  @nn.compact
  def __call__(self, x, _):
    x = Block(self.num_heads, self.dropout_rate, self.dtype)(x, self.deterministic)
    return sharding.constrain(x, ACTIVATION), None


class Transformer(nn.Module):
  """Token and position embeddings, `num_layers` blocks, logits tied to the token embedding.
  `scan`: the blocks as one `nn.scan` (params stacked over the layers, a `layers` dimension:
  one block compiled, and under fsdp one layer's params gathered at a time); `remat`: each
  block's activations recomputed in the backward pass instead of kept."""

  seq_len: int
  width: int
  num_layers: int
  num_heads: int
  vocab_size: int = 256
  dropout_rate: float = 0.0
  dtype: jnp.dtype = jnp.float32
  scan: bool = False
  remat: bool = False

  @nn.compact
  def __call__(self, tokens, deterministic: bool = True):
    embed = nn.Embed(
      self.vocab_size,
      self.width,
      dtype=self.dtype,
      embedding_init=_named(nn.initializers.normal(0.02), "vocab", "embed"),
    )
    positions = self.param(
      "positions",
      _named(nn.initializers.normal(0.02), "length", "embed"),
      (self.seq_len, self.width),
    )
    # The lookup from the table gathered over fsdp and still split over tensor on its rows: a
    # gather from a table split on `embed` gives rows split that way, which XLA cannot turn into
    # rows split on `batch` but by a whole copy.
    table = sharding.constrain(embed.embedding.astype(self.dtype), ("vocab", None))
    x = jnp.take(table, tokens, axis=0) + positions[: tokens.shape[1]].astype(self.dtype)
    x = sharding.constrain(x, ACTIVATION)
    if self.scan:
      body = nn.remat(ScannedBlock) if self.remat else ScannedBlock
      blocks = nn.scan(
        body,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        length=self.num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )
      x, _ = blocks(self.num_heads, self.dropout_rate, self.dtype, deterministic, name="blocks")(
        x, None
      )
    else:
      block = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
      for _ in range(self.num_layers):
        x = sharding.constrain(
          block(self.num_heads, self.dropout_rate, self.dtype)(x, deterministic), ACTIVATION
        )
    x = _layer_norm(self.dtype)(x)
    return embed.attend(x).astype(jnp.float32)


def _model(config) -> Transformer:
  """The model computing in `config.compute_dtype` (its params stay float32)."""
  return Transformer(
    seq_len=config.seq_len,
    width=config.width,
    num_layers=config.num_layers,
    num_heads=config.num_heads,
    vocab_size=_tokenizer(config).vocab_size,
    dropout_rate=config.dropout_rate,
    dtype=jnp.dtype(config.compute_dtype),
    scan=config.scan_layers,
    remat=config.remat,
  )


def _boxed_init(config, rng):
  """The model's variables with flax's LogicallyPartitioned boxes (the params' logical names)."""
  return _model(config).init(rng, jnp.zeros((1, config.seq_len), jnp.int32))


def init(config, rng):
  return nn.unbox(_boxed_init(config, rng))["params"]


def partition(config, params):
  """Each param's logical dimension names, from the flax metadata its initializer carries."""
  del params
  boxed = jax.eval_shape(functools.partial(_boxed_init, config), jax.random.PRNGKey(0))
  return nn.get_partition_spec(boxed)["params"]


def logits(config, params, tokens):
  """Next-token logits [batch, length, vocab] of int32 `tokens` [batch, length <= seq_len],
  without dropout: what `python -m launcher.sample` continues a text with."""
  return _model(config).apply({"params": params}, tokens)


def tokenizer(config) -> corpus_lib.Tokenizer:
  """The lm's tokens (bytes, or config.tokenizer's): they encode a prompt and decode a sample."""
  return _tokenizer(config)


def loss(config, params, batch, rng):
  """Mean next-token cross entropy; dropout when training (rng given), none in eval (rng None)."""
  inputs, targets = batch["tokens"][:, :-1], batch["tokens"][:, 1:]
  logits = _model(config).apply(
    {"params": params},
    inputs,
    deterministic=rng is None,
    rngs=None if rng is None else {"dropout": rng},
  )
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  bits = "bits_per_token" if config.get("tokenizer") else "bits_per_byte"
  return losses.mean(), {
    bits: losses.mean() / jnp.log(2.0),
    "accuracy": (logits.argmax(-1) == targets).mean(),
  }


def tokens_per_example(config) -> int:
  return config.seq_len


@functools.cache
def _corpus(text_file: str) -> np.ndarray:
  if text_file:
    if not os.path.isfile(text_file):
      raise UsageError(
        f"config.text_file={text_file!r} is not a file: give a UTF-8 text file to "
        'train on, or "" for CPython\'s documentation text'
      )
    with open(text_file, "rb") as f:
      return np.frombuffer(f.read(), np.uint8)
  from pydoc_data.topics import topics  # pylint: disable=import-outside-toplevel

  text = "\n\n".join(topics[name] for name in sorted(topics))
  return np.frombuffer(text.encode("utf-8"), np.uint8)


@functools.cache
def _tokenizer_of(path: str) -> corpus_lib.Tokenizer:
  return corpus_lib.Tokenizer(path)


def _tokenizer(config) -> corpus_lib.Tokenizer:
  if config.get("tokenizer") and not config.get("data"):
    raise UsageError(
      f"config.tokenizer={config.tokenizer!r} is for a corpus given as "
      "config.data; config.text_file and the built-in text are read as bytes"
    )
  return _tokenizer_of(config.get("tokenizer", ""))


# The config keys the batches depend on (with seed and batch_size): a resume must keep them.
DATA_KEYS = ("text_file", "data", "tokenizer", "eval_fraction", "seq_len")


def dataset(config, split, process_index, process_count, start=0):
  if config.get("data"):
    return _corpus_dataset(config, split, process_index, process_count, start)
  corpus = _corpus(config.text_file)
  eval_start = int(len(corpus) * (1 - config.eval_fraction))
  text = corpus[:eval_start] if split == "train" else corpus[eval_start:]
  window = config.seq_len + 1
  num_windows = (len(text) - 1) // config.seq_len
  if num_windows < 1:
    source = f"config.text_file={config.text_file!r}" if config.text_file else "the corpus"
    raise UsageError(
      f"{source} leaves {len(text)} bytes for the {split} split (eval_fraction="
      f"{config.eval_fraction}), fewer than one window of seq_len + 1 = {window}: "
      "give a longer text file, or a smaller --config.seq_len or eval_fraction"
    )
  offsets = np.arange(window)
  indices = data.batch_indices(
    num_windows,
    batch_size=config.batch_size,
    process_index=process_index,
    process_count=process_count,
    seed=config.seed if split == "train" else None,
    repeat=split == "train",
    start=start,
  )
  return data.read(
    indices.map(
      lambda i: {
        "tokens": text[i[:, None] * config.seq_len + offsets].astype(np.int32),
        "id": i.astype(np.int32),
      }
    )
  )


def _corpus_dataset(config, split, process_index, process_count, start):
  """Windows of a Parquet or ArrayRecord corpus (launcher/corpus.py), read through
  launcher.data.from_source: config.data_workers processes tokenize them."""
  if config.text_file:
    raise UsageError(
      f"config.data={config.data!r} and config.text_file={config.text_file!r} "
      "both name a corpus: keep one"
    )
  windows = corpus_lib.windows(
    config.data,
    split,
    seq_len=config.seq_len,
    eval_fraction=config.eval_fraction,
    tokenizer=_tokenizer(config),
  )
  needed = config.batch_size if split == "train" else 1
  if len(windows) < needed:
    raise UsageError(
      f"config.data={config.data!r}: its {split} split ({windows.total_bytes:,} "
      f"bytes) holds {len(windows)} window(s) of seq_len + 1 = {config.seq_len + 1} "
      f"tokens, fewer than {'one global batch of ' if needed > 1 else ''}{needed}: "
      "give a larger corpus, or a smaller --config.seq_len, batch_size or "
      "eval_fraction"
    )
  return data.from_source(windows, config, split, process_index, process_count, start)


def flops_per_example(config) -> float:
  """Training FLOPs of one sequence: 6 per parameter per token (forward + backward, the tied
  output projection included), plus causal attention's 6 * layers * seq_len * width per token
  (half of the 12 * L * T * width of full attention)."""
  num_params = _num_params(config)
  per_token = 6 * num_params + 6 * config.num_layers * config.seq_len * config.width
  return float(config.seq_len * per_token)


def _num_params(config) -> int:
  shapes = jax.eval_shape(lambda: init(config, jax.random.PRNGKey(0)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
