"""Eight simulated CPU devices for every test: XLA_FLAGS must be set before jax is imported."""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # pylint: disable=wrong-import-position


def pytest_configure(config):
  del config
  assert jax.local_device_count() == 8, "XLA_FLAGS was read after jax started"

