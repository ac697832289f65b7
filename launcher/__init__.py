"""A distributed training launcher for JAX: one command from a laptop to a TPU pod slice."""
