"""Every number a run reports, against an independent computation: train metrics per window and
the applied learning rate against numpy (skipped steps, K > 1, accumulation, every executor),
the matmuls' dtype under bfloat16, speeds against a data source of known speed, and goodput
against the records and a clock outside the run."""

import json
import math
import os
import re
import signal
import time

import numpy as np
import optax
import pytest

from launcher import report, train
from tests import numbers_workload
from tests.helpers import (
  finish,
  launcher_command,
  load_config,
  lowered_train_call,
  read_metrics,
  start,
  wait_for,
)

EXECUTORS = ("shard_map", "pmap", "fsdp")


def numbers_config(**overrides):
  return load_config("../tests/numbers_config", **overrides)


def schedule(config, count: int) -> float:
  """optax's warmup_cosine_decay_schedule from 0 to 0, written out."""
  peak, warmup, total = config.learning_rate, config.warmup_steps, config.num_steps
  if count < warmup:
    return peak * count / warmup
  return (
    peak * 0.5 * (1 + math.cos(math.pi * min(count - warmup, total - warmup) / (total - warmup)))
  )


def reference(config):
  """The run in float64 numpy: per-step metrics (None for a skipped step), the final params and
  the number of updates applied."""
  batches = numbers_workload.dataset(config, "train", 0, 1)
  w, b, applied, steps = np.zeros(config.features), 0.0, 0, []
  for _ in range(config.num_steps):
    batch = next(batches)
    x, y = batch["x"].astype(np.float64), batch["y"].astype(np.float64)
    error = x @ w + b - y
    grad_w, grad_b = 2 * x.T @ error / len(y), 2 * error.mean()
    grad_norm = math.sqrt(np.sum(grad_w**2) + grad_b**2)
    if not (np.isfinite(error).all() and math.isfinite(grad_norm)):
      steps.append(None)
      continue
    learning_rate = schedule(config, applied)
    steps.append(
      {
        "loss": np.mean(error**2),
        "abs_error": np.mean(np.abs(error)),
        "grad_norm": grad_norm,
        "learning_rate": learning_rate,
      }
    )
    w, b, applied = w - learning_rate * grad_w, b - learning_rate * grad_b, applied + 1
  return steps, {"w": w, "b": b}, applied


def expected_rows(config, steps) -> list[dict]:
  """Each report's window means over its unskipped steps, and the skipped steps so far."""
  rows, every = [], config.log_every_steps
  for end in range(every, config.num_steps + 1, every):
    kept = [s for s in steps[end - every : end] if s is not None]
    row = {"step": end, "skipped_steps": sum(s is None for s in steps[:end])}
    if kept:
      row.update({name: np.mean([s[name] for s in kept]) for name in kept[0]})
    rows.append(row)
  return rows


@pytest.mark.slow
@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize("steps_per_call, grad_accum_steps", [(1, 1), (2, 2)])
def test_train_metrics_and_learning_rate_equal_numpy(
  executor, steps_per_call, grad_accum_steps, tmp_path
):
  # Batch 2 is skipped in the first window; batches 4-7, the whole second window, too.
  config = numbers_config(
    parallel=executor,
    steps_per_call=steps_per_call,
    grad_accum_steps=grad_accum_steps,
    nan_at_batches=(2, 4, 5, 6, 7),
  )
  state = train.run(config, str(tmp_path))
  steps, params, applied = reference(config)
  rows = [
    {
      name: value
      for name, value in row.items()
      if name in ("step", "skipped_steps", "loss", "abs_error", "grad_norm", "learning_rate")
    }
    for row in read_metrics(str(tmp_path))
  ]
  expected = expected_rows(config, steps)
  assert [sorted(row) for row in rows] == [sorted(row) for row in expected]
  assert "loss" not in rows[1]  # Every step of that window was skipped: no invented mean.
  for row, want in zip(rows, expected):
    assert row == pytest.approx(want, rel=2e-5), row["step"]
  # The learning rate the optimizer applied: the params moved as numpy's schedule says.
  np.testing.assert_allclose(state.params["w"], params["w"], rtol=2e-5)
  assert float(state.params["b"]) == pytest.approx(params["b"], rel=2e-5)
  assert applied == 7 and int(state.skipped_steps) == 5 and int(state.step) == 12
  assert int(optax.tree_utils.tree_get(state.opt_state, "count")) == applied


def _matmul_operand_dtypes(config) -> list[str]:
  """The operand types of every dot_general in the lowered train call of `config`."""
  text = lowered_train_call(config).as_text()
  return re.findall(r"stablehlo\.dot_general .*?: \((tensor<[^>]*>), (tensor<[^>]*>)\)", text)


@pytest.mark.parametrize("name, arg, matmuls", [("lm", "tiny", 20), ("classifier", None, 4)])
def test_bfloat16_runs_every_matmul_of_the_shipped_workloads_in_bfloat16(name, arg, matmuls):
  operands = _matmul_operand_dtypes(load_config(name, arg, compute_dtype="bfloat16"))
  assert len(operands) >= matmuls  # Forward and backward: the test sees the whole step.
  not_bf16 = [pair for pair in operands if not all(t.endswith("xbf16>") for t in pair)]
  assert not not_bf16, f"{len(not_bf16)} of {len(operands)} matmuls are not bf16: {not_bf16[:3]}"
  float32 = _matmul_operand_dtypes(load_config(name, arg))
  assert len(float32) == len(operands) and all(t.endswith("xf32>") for p in float32 for t in p)


def test_the_linear_workload_has_no_matmul_to_cast():
  assert _matmul_operand_dtypes(load_config("linear", compute_dtype="bfloat16")) == []


def source_steps_per_sec(config, batches: int = 40) -> float:
  """The train source's own speed, by a clock outside the run: batches read per second."""
  source = numbers_workload.dataset(config, "train", 0, 1)
  next(source)
  began = time.perf_counter()
  for _ in range(batches):
    next(source)
  return batches / (time.perf_counter() - began)


@pytest.mark.slow
@pytest.mark.parametrize("executor", EXECUTORS)
def test_speeds_equal_a_data_source_of_known_speed_and_eval_has_its_own_time(executor, tmp_path):
  # The train source sleeps 50 ms a batch, so the steps run at its speed (the model's own time
  # hides behind it); each eval reads 3 batches of 100 ms each, and a save comes every 8 steps.
  config = numbers_config(
    parallel=executor,
    num_steps=24,
    log_every_steps=8,
    eval_every_steps=8,
    eval_batches=3,
    batch_seconds=0.05,
    eval_batch_seconds=0.1,
    steps_per_call=2,
    checkpoint_every_steps=8,
  )
  source_speed = source_steps_per_sec(config)
  train.run(config, str(tmp_path))
  rows = read_metrics(str(tmp_path))
  assert [row["step"] for row in rows] == [8, 16, 24]
  # The bounds are the defects' sizes, not a loaded machine's: an eval (0.3 s) counted as train
  # time slows a window's speed by half or more, a call (2 steps) counted as eval time speeds it
  # by a third; a loaded machine slowed the steps by 10% against the source once.
  for row in rows:
    assert source_speed / 1.2 <= row["steps_per_sec"] <= source_speed / 0.9, row
    assert row["examples_per_sec"] == pytest.approx(row["steps_per_sec"] * 32, rel=1e-6)
    assert row["eval_s"] >= 0.3, row  # 3 eval batches of 100 ms; its bound above is the window's.
  records = [json.loads(line) for line in open(tmp_path / "hosts" / "process_0.jsonl")]
  reports = [r for r in records if r["event"] == "report"]
  # The first window holds the 6 steps after the first call (2 steps), no more.
  assert [r["steps"] for r in reports] == [6, 8, 8]
  for record in reports:
    # Each second of the window is counted once: an eval that took in train time would push the
    # sum past the window, as would steps that took in the eval (a loaded machine slows either).
    assert 0.9 <= record["steps_s"] / (record["steps"] / source_speed) <= 1.2, record
    assert record["eval_s"] >= 0.3
    assert (
      record["steps_s"] + record["eval_s"] + record["checkpoint_blocked_s"] <= (record["window_s"])
    )


def test_a_first_report_right_after_the_first_call_has_no_speed(tmp_path):
  config = numbers_config(num_steps=4, log_every_steps=2, steps_per_call=2, schedule="constant")
  train.run(config, str(tmp_path))
  first, second = read_metrics(str(tmp_path))
  assert "steps_per_sec" not in first and "time_to_first_step_s" in first
  assert second["steps_per_sec"] > 0


@pytest.mark.slow
def test_console_and_tensorboard_equal_numpy(tmp_path):
  """The launcher's console lines and TensorBoard scalars, from a real process, against numpy."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=import-outside-toplevel

  workdir = tmp_path / "run"
  log = tmp_path / "run.log"
  process = start(
    launcher_command(
      "--config=tests/numbers_config.py", f"--workdir={workdir}", "--config.nan_at_batches=(2,)"
    ),
    str(log),
  )
  assert finish(process, 120) == 0, log.read_text()[-3000:]
  config = numbers_config(nan_at_batches=(2,))
  expected = expected_rows(config, reference(config)[0])
  lines = [line for line in log.read_text().splitlines() if line.startswith("step ")]
  assert len(lines) == len(expected)
  for line, want in zip(lines, expected):
    assert line.startswith(
      f"step {want['step']}/12 | loss {want['loss']:.4g} | abs_error {want['abs_error']:.4g}"
    ), line
    assert ("skipped 1 non-finite steps" in line) == (want["skipped_steps"] > 0)
  events = event_accumulator.EventAccumulator(str(workdir))
  events.Reload()
  for name in ("loss", "abs_error", "grad_norm", "learning_rate", "skipped_steps"):
    scalars = {event.step: event.value for event in events.Scalars(name)}
    assert scalars == pytest.approx({row["step"]: row[name] for row in expected}, rel=2e-5), name


@pytest.mark.slow
def test_goodput_through_a_kill_a_preemption_and_a_restart(tmp_path):
  """Three starts of one run: killed (-9) after its checkpoint of step 8, preempted (SIGTERM)
  later, then finished. The parts tile process 0's wall time; that time fits the test's own
  clock; the steps re-done after the kill are lost, every other step is productive."""
  workdir, log = tmp_path / "run", tmp_path / "run.log"
  args = [
    "--config=tests/numbers_config.py",
    f"--workdir={workdir}",
    "--config.num_steps=40",
    "--config.log_every_steps=2",
    "--config.checkpoint_every_steps=8",
    "--config.batch_seconds=0.05",
    "--config.warmup_steps=2",
  ]

  def rows():
    return read_metrics(str(workdir)) if (workdir / "metrics.jsonl").exists() else []

  def checkpoints():
    return (
      {int(p) for p in os.listdir(workdir / "checkpoints") if p.isdigit()}
      if (workdir / "checkpoints").exists()
      else set()
    )

  began = time.monotonic()
  first = start(launcher_command(*args), str(log))
  wait_for(
    lambda: 8 in checkpoints() and any(r["step"] >= 12 for r in rows()),
    120,
    "step 12 after the checkpoint of step 8",
    first,
  )
  os.kill(first.pid, signal.SIGKILL)
  first.wait()
  killed_at = max(r["step"] for r in rows())
  second = start(launcher_command(*args), str(log))
  wait_for(
    lambda: any(r["step"] >= killed_at + 6 for r in rows()), 120, "the resumed steps", second
  )
  second.send_signal(signal.SIGTERM)
  assert finish(second, 60) == 75, log.read_text()[-3000:]
  third = start(launcher_command(*args), str(log))
  assert finish(third, 120) == 0, log.read_text()[-3000:]
  ended = time.monotonic()

  records = [json.loads(line) for line in open(workdir / "hosts" / "process_0.jsonl")]
  runs = report.segments(records)
  assert runs[0][0]["first_step"] == 0 and len(runs) == 3
  resumed_at, preempted_at = runs[1][0]["first_step"], runs[2][0]["first_step"]
  assert resumed_at == 8 and preempted_at > killed_at
  parts, wall = report.goodput(records), report.wall_time(records)
  assert sum(parts.values()) == pytest.approx(wall, abs=0.01)  # Records stamped a few us apart.
  # The test's clock, less the pause between the preempted start and the next (not the run's).
  between = runs[2][0]["time"] - runs[2][0]["startup_s"] - runs[1][-1]["time"]
  assert 0.8 * (ended - began - between) < wall <= ended - began - between + 0.1
  # Each start's first call (one step) is compile; every other step waits 50 ms for its batch.
  trained = (killed_at - 1) + (preempted_at - resumed_at - 1) + (40 - preempted_at - 1)
  redone = killed_at - resumed_at
  assert parts["lost to restarts"] >= redone * 0.05
  productive = parts["productive steps"] + parts["waiting for data"]
  assert (trained - redone) * 0.05 * 0.9 <= productive <= (trained - redone) * 0.05 * 1.5 + 1.0
  assert records[-1]["event"] == "end" and records[-1]["step"] == 40
