"""The optimizer and learning-rate schedule that the config names (optax)."""

import ml_collections
import optax


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


def build(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
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
