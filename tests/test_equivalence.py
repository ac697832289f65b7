"""Data parallelism changes nothing but speed: the launcher on 8 devices against one device.

The reference is independent of the launcher's step: plain `jax.value_and_grad` of the workload's
loss on the whole global batch on one device, then the same optax optimizer.
"""

import itertools

import jax
import numpy as np
import optax
import pytest

from launcher import optimizer as optimizer_lib
from launcher import state as state_lib
from launcher import train
from launcher import workload as workload_lib
from tests.helpers import assert_close, load_config


def assert_moved(expected, initial):
  moved = [
    np.abs(np.asarray(a) - np.asarray(b)).max()
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(initial))
  ]
  assert max(moved) > 1e-4, "the reference did not move: the test would prove nothing"


OPTIMIZERS = ("sgd", "adamw")  # Why adamw needs a looser check: helpers.assert_close.

# A constant schedule: under warmup the first step's learning rate is 0 and nothing would move.
WORKLOADS = {
  "linear": (None, {"schedule": "constant"}),
  "classifier": (None, {"schedule": "constant"}),
  "lm": ("tiny", {"batch_size": 32, "schedule": "constant"}),
}


def reference_params(config, num_steps):
  """`num_steps` single-device steps on the first global batches, by plain jax and optax."""
  workload = workload_lib.load(config.workload)
  tx = optimizer_lib.build(config)
  params = state_lib.create(config, workload.init, tx).params
  opt_state = tx.init(params)
  global_batches = workload.dataset(config, "train", 0, 1)
  for batch in itertools.islice(global_batches, num_steps):
    grads = jax.grad(lambda p, b=batch: workload.loss(config, p, b, None)[0])(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  return params


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("name", WORKLOADS)
def test_one_step_on_8_devices_equals_one_device(name, optimizer, tmp_path):
  arg, overrides = WORKLOADS[name]
  config = load_config(name, arg, num_steps=1, eval_every_steps=0, optimizer=optimizer, **overrides)
  assert jax.local_device_count() == 8
  state = train.run(config, str(tmp_path))
  assert int(state.step) == 1
  assert_moved(reference_params(config, 1), reference_params(config, 0))
  assert_close(config, state.params, reference_params(config, 1))


@pytest.mark.parametrize("optimizer", ["adamw"])
@pytest.mark.parametrize("name", WORKLOADS)
def test_4_steps_per_call_equal_4_single_steps(name, optimizer, tmp_path):
  arg, overrides = WORKLOADS[name]
  config = load_config(
    name,
    arg,
    num_steps=4,
    steps_per_call=4,
    log_every_steps=4,
    eval_every_steps=0,
    optimizer=optimizer,
    **overrides,
  )
  state = train.run(config, str(tmp_path))
  assert int(state.step) == 4
  assert_moved(reference_params(config, 4), reference_params(config, 0))
  assert_close(config, state.params, reference_params(config, 4))
