"""The train state pytree, and how a fresh one is made."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax


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
