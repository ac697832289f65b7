"""The train state pytree, how a fresh one is made, and how it packs into few arrays for the
compiled calls."""

import itertools
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax import lax


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes: one explicit pytree, no hidden state."""

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  skipped_steps: jax.Array  # Updates skipped for a non-finite loss or gradient.


def initializer(
  config: ml_collections.ConfigDict,
  init_fn,
  tx: optax.GradientTransformation,
  check_params=lambda params: None,
):
  """`fresh() -> TrainState`: params from `init_fn(config, rng)`, rng from `config.seed`.
  `jax.eval_shape(fresh)` gives the state's shapes without computing it; `jax.jit(fresh,
  out_shardings=...)()` creates each array straight in its sharding. `check_params(params)` sees
  the traced params before anything else does (and may raise)."""
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))

  def fresh() -> TrainState:
    params = init_fn(config, init_rng)
    check_params(params)
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      rng=train_rng,
      skipped_steps=jnp.zeros((), jnp.int32),
    )

  return fresh


def create(
  config: ml_collections.ConfigDict, init_fn, tx: optax.GradientTransformation, shardings=None
) -> TrainState:
  """A fresh state, in `shardings` (a tree like the state's; None: on the default device)."""
  return jax.jit(initializer(config, init_fn, tx), out_shardings=shardings)()


# Leaves of at most this many bytes travel packed (`Packing`): the scalars, biases and norm
# scales, and their optimizer state, whose copy into one vector costs less than their dispatch.
SMALL_LEAF_BYTES = 4096


class Packed(NamedTuple):
  """A train state as few arrays: its large leaves as they are, and its small ones bitcast to
  unsigned integers and concatenated, one vector per item size. Each array that a compiled call
  takes and returns costs dispatch time on every device (on 8 simulated CPU devices the step
  count, rng, skipped steps and optimizer count alone cost a 2-layer MLP ~6% of its step)."""

  large: tuple
  small: tuple


class Packing:
  """How a state like `state_like` (its shapes) packs into `Packed` and back, bit for bit.
  `pack` and `unpack` are pure (traced inside the compiled calls). `pack_small` and
  `unpack_small` see only the small leaves, traced or as numpy arrays on the host (where no
  program is compiled for them, whose compile time grows with their count); `split` and `join`
  move the large leaves untouched."""

  def __init__(self, state_like, small_leaf_bytes: int = SMALL_LEAF_BYTES):
    leaves, self._treedef = jax.tree.flatten(state_like)
    self._like = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
    self._groups = {}  # item size -> indices of the small leaves packed in that vector
    for index, x in enumerate(self._like):
      if _packable(x.dtype) and x.size * x.dtype.itemsize <= small_leaf_bytes:
        self._groups.setdefault(x.dtype.itemsize, []).append(index)
    self._small = list(itertools.chain.from_iterable(self._groups.values()))
    self._large = sorted(set(range(len(leaves))) - set(self._small))

  def split(self, state) -> tuple[tuple, list]:
    """(large leaves, small leaves) of `state`."""
    leaves = self._treedef.flatten_up_to(state)
    return tuple(leaves[i] for i in self._large), [leaves[i] for i in self._small]

  def join(self, large, small) -> Any:
    """The state of `split`'s two parts."""
    leaves = [None] * len(self._like)
    for index, x in itertools.chain(
      zip(self._large, large, strict=True), zip(self._small, small, strict=True)
    ):
      leaves[index] = x
    return self._treedef.unflatten(leaves)

  def pack_small(self, small: list) -> tuple:
    """`split`'s small leaves -> one unsigned vector per item size."""
    xp = np if all(isinstance(x, np.ndarray) for x in small) else jnp
    small = iter(small)
    return tuple(
      xp.concatenate([_bitcast(next(small), _unsigned(size)).ravel() for _ in group])
      for size, group in self._groups.items()
    )

  def unpack_small(self, vectors: tuple) -> list:
    """`pack_small`'s vectors -> the small leaves, in `split`'s order."""
    small = []
    for group, vector in zip(self._groups.values(), vectors, strict=True):
      offsets = itertools.accumulate((self._like[i].size for i in group), initial=0)
      for index, start in zip(group, offsets, strict=False):
        like = self._like[index]
        small.append(_bitcast(vector[start : start + like.size].reshape(like.shape), like.dtype))
    return small

  def pack(self, state) -> Packed:
    large, small = self.split(state)
    return Packed(large, self.pack_small(small))

  def unpack(self, packed: Packed) -> Any:
    return self.join(packed.large, self.unpack_small(packed.small))


def _packable(dtype) -> bool:
  """Whether `dtype` bitcasts to an unsigned integer of its size: a float or integer of 8, 16 or
  32 bits that fill its bytes (not bool, keys, complex, 64 bits, or 4 bits in a byte)."""
  if jnp.issubdtype(dtype, jnp.floating):
    bits = jnp.finfo(dtype).bits
  elif jnp.issubdtype(dtype, jnp.integer):
    bits = jnp.iinfo(dtype).bits
  else:
    return False
  return np.dtype(dtype).itemsize in (1, 2, 4) and bits == 8 * np.dtype(dtype).itemsize


def _unsigned(itemsize: int):
  return {1: np.uint8, 2: np.uint16, 4: np.uint32}[itemsize]


def _bitcast(x, dtype):
  """`x`'s bits as `dtype`, of the same item size: on the host (numpy) or traced."""
  if isinstance(x, np.ndarray):
    return x.view(dtype)
  return lax.bitcast_convert_type(x, dtype)
