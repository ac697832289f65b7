"""The seed's numbers, by hand: w=2, b=1 on x=[1,2,3], y=[3.5,5.5,7.5], SGD at 0.1."""

import jax
import numpy as np
import pytest

from launcher import train
from launcher import workload as workload_lib
from tests.helpers import load_config, read_metrics


def test_seed_loss_and_gradients_by_hand():
  config = load_config("linear")
  linear = workload_lib.load("linear")
  batch = next(linear.dataset(config, "train", 0, 1))
  np.testing.assert_array_equal(batch["x"][:3], [1.0, 2.0, 3.0])
  np.testing.assert_array_equal(batch["y"][:3], [3.5, 5.5, 7.5])
  params = linear.init(config, None)
  (loss, _), grads = jax.value_and_grad(linear.loss, argnums=1, has_aux=True)(
    config, params, batch, None
  )
  assert float(loss) == pytest.approx(0.25)
  assert float(grads["w"]) == pytest.approx(-2.0)
  assert float(grads["b"]) == pytest.approx(-1.0)


def test_seed_steps_through_the_launcher_on_8_devices(tmp_path):
  config = load_config("linear", num_steps=2, log_every_steps=1, eval_every_steps=1)
  state = train.run(config, str(tmp_path))
  rows = read_metrics(str(tmp_path))
  assert [row["step"] for row in rows] == [1, 2]
  # Step 1 reports the loss before the first update; its gradient norm is |(-2, -1)|.
  assert rows[0]["loss"] == pytest.approx(0.25, rel=1e-6)
  assert rows[0]["grad_norm"] == pytest.approx(np.sqrt(5.0), rel=1e-6)
  # After one step w=2.2, b=1.1: residuals (-0.2, 0, 0.2), so the loss is 0.08 / 3.
  assert rows[1]["loss"] == pytest.approx(0.08 / 3, rel=1e-5)
  assert rows[0]["eval_loss"] == pytest.approx(0.08 / 3, rel=1e-5)
  # Second step: gradients w = 2*mean(r*x) = 2*(0.4/3), b = 0, so w = 2.2 - 0.1 * 0.8/3.
  assert float(state.params["w"]) == pytest.approx(2.2 - 0.08 / 3, rel=1e-6)
  assert float(state.params["b"]) == pytest.approx(1.1, rel=1e-6)
  assert int(state.step) == 2
