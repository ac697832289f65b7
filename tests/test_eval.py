"""Eval counts every held-out example exactly once, padding and all, on every device count."""

import jax
import numpy as np
import optax
import pytest

from launcher import train
from tests.helpers import load_config, read_metrics
from workloads import classifier


def test_eval_metrics_equal_a_plain_pass_over_the_test_split(tmp_path):
  # 300 test examples in global batches of 128: the last batch has 44 real rows and 84 padded.
  config = load_config(
    "classifier", num_steps=20, log_every_steps=20, eval_every_steps=20, warmup_steps=5
  )
  state = train.run(config, str(tmp_path))
  examples = classifier._splits(config.test_examples)["eval"]  # pylint: disable=protected-access
  assert len(examples["label"]) == 300
  logits = classifier._model(config).apply({"params": state.params}, examples["image"])  # pylint: disable=protected-access
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, examples["label"])
  accuracy = np.mean(np.asarray(logits).argmax(-1) == examples["label"])
  row = read_metrics(str(tmp_path))[-1]
  assert row["eval_loss"] == pytest.approx(float(losses.mean()), rel=1e-5)
  assert row["eval_accuracy"] == pytest.approx(accuracy, abs=1e-6)
  assert 0.5 < accuracy < 1.0  # Trained, and not trivially so: a wrong count would show.
  assert jax.local_device_count() == 8
