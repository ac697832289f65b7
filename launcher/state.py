"""The train state pytree, and the optimizer and learning-rate schedule from the config."""

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


def schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """The learning rate as a function of the step: `constant` or linear warmup then cosine decay."""
  if config.schedule == "constant":
    return optax.constant_schedule(config.learning_rate)
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=config.learning_rate,
    warmup_steps=config.warmup_steps,
    decay_steps=config.num_steps,
  )


def optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The optax optimizer named by `config.optimizer`, with clipping when `config.grad_clip_norm`."""
  learning_rate = schedule(config)
  tx = {
    "sgd": lambda: optax.sgd(learning_rate),
    "momentum": lambda: optax.sgd(learning_rate, momentum=config.momentum),
    "adam": lambda: optax.adam(learning_rate),
    "adamw": lambda: optax.adamw(learning_rate, weight_decay=config.weight_decay),
  }[config.optimizer]()
  if config.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  return tx


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
