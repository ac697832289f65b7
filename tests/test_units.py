"""Unit tests of the pieces a step and a run are made of, each against a hand computation:
milliseconds each, no processes (the fast tier: `python -m pytest -q tests -m "not slow"`)."""

import glob
import importlib.util
import os
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from launcher import (
  calls_in_flight,
  checkpoint,
  console,
  parallel,
  step,
  steps_per_call,
  storage,
  train,
  writers,
)
from launcher import config as config_lib
from launcher import state as state_lib
from launcher import workload as workload_lib
from launcher.errors import UsageError
from launcher.state import TrainState
from tests.helpers import REPO, load_config


def _linear_loss(params, batch, rng):
  del rng
  error = params["w"] * batch["x"] - batch["y"]
  return jnp.mean(error**2), {"error": jnp.mean(jnp.abs(error))}


def _state(params, tx, *, step: int = 0, skipped_steps: int = 0) -> TrainState:
  """A fresh state of `params` (a float: {"w": it})."""
  if not isinstance(params, dict):
    params = {"w": jnp.float32(params)}
  return TrainState(
    step=jnp.int32(step),
    params=params,
    opt_state=tx.init(params),
    rng=jax.random.PRNGKey(0),
    skipped_steps=jnp.int32(skipped_steps),
  )


def _one_device_step(state, batch, tx, **kwargs):
  """train_step as one device sees it (a pmap over one device: axis `batch` of size 1)."""
  call = jax.pmap(
    lambda s, b: step.train_step(
      s, b, loss_fn=_linear_loss, tx=tx, schedule=optax.constant_schedule(0.1), **kwargs
    ),
    axis_name=step.AXIS,
    devices=jax.local_devices()[:1],
  )

  def add_axis(tree):
    return jax.tree.map(lambda x: jnp.asarray(x)[None], tree)

  new_state, metrics = call(add_axis(state), add_axis(batch))
  return jax.tree.map(lambda x: x[0], new_state), jax.tree.map(lambda x: x[0], metrics)


BATCH = {
  "x": np.array([1.0, 2.0, 3.0, 4.0], np.float32),
  "y": np.array([2.0, 4.0, 5.0, 9.0], np.float32),
}


def test_train_step_is_one_sgd_step_by_hand():
  tx = optax.sgd(0.1)
  new_state, metrics = _one_device_step(_state(1.0, tx), BATCH, tx)
  error = 1.0 * BATCH["x"] - BATCH["y"]
  gradient = np.mean(2 * error * BATCH["x"])
  assert float(metrics["loss"]) == pytest.approx(np.mean(error**2))
  assert float(metrics["grad_norm"]) == pytest.approx(abs(gradient))
  assert float(new_state.params["w"]) == pytest.approx(1.0 - 0.1 * gradient)
  assert int(new_state.step) == 1


def test_gradient_accumulation_averages_microbatch_gradients():
  tx = optax.sgd(0.1)
  whole, _ = _one_device_step(_state(1.0, tx), BATCH, tx)
  accumulated, metrics = _one_device_step(_state(1.0, tx), BATCH, tx, grad_accum_steps=2)
  assert float(accumulated.params["w"]) == pytest.approx(float(whole.params["w"]), rel=1e-6)
  halves = [np.mean((BATCH["x"][i : i + 2] - BATCH["y"][i : i + 2]) ** 2) for i in (0, 2)]
  assert float(metrics["loss"]) == pytest.approx(np.mean(halves))


def test_a_nonfinite_step_is_skipped_and_counted():
  tx = optax.sgd(0.1)
  bad = {**BATCH, "y": np.array([np.nan, 4.0, 5.0, 9.0], np.float32)}
  new_state, metrics = _one_device_step(_state(1.0, tx), bad, tx, skip_nonfinite=True)
  assert float(new_state.params["w"]) == 1.0 and int(new_state.skipped_steps) == 1
  assert not bool(metrics["mask"])
  # The skipped step counts nowhere: a window of it and a finite step means the finite one.
  metric_set = step.MetricSet(["loss"])
  window = metric_set.pack(metric_set.single({"loss": metrics["loss"], "mask": metrics["mask"]}))
  window += metric_set.pack(metric_set.single({"loss": jnp.float32(2.0)}))
  assert metric_set.compute(window) == {"loss": 2.0}


def test_bfloat16_compute_keeps_float32_params_and_returns_float32_loss():
  tx = optax.sgd(0.1)
  new_state, metrics = _one_device_step(_state(1.0, tx), BATCH, tx, compute_dtype=jnp.bfloat16)
  assert new_state.params["w"].dtype == jnp.float32 and metrics["loss"].dtype == jnp.float32
  exact, _ = _one_device_step(_state(1.0, tx), BATCH, tx)
  assert float(new_state.params["w"]) == pytest.approx(float(exact.params["w"]), rel=1e-2)


def test_eval_step_counts_each_real_example_once_and_padding_never():
  batch = {**BATCH, "mask": np.array([1, 1, 1, 0], np.float32)}
  batch["y"] = batch["y"].copy()
  batch["y"][3] = 1e6  # Padding with a huge error must not count.
  call = jax.pmap(
    lambda p, m, b: step.eval_step(p, m, b, loss_fn=_linear_loss),
    axis_name=step.AXIS,
    devices=jax.local_devices()[:1],
  )

  def add_axis(tree):
    return jax.tree.map(lambda x: jnp.asarray(x)[None], tree)

  metrics = call(
    add_axis({"w": jnp.float32(1.0)}),
    add_axis(step.empty_metrics(["loss", "error"])),
    add_axis(batch),
  )
  computed = jax.tree.map(lambda x: x[0], metrics).compute()
  errors = BATCH["x"][:3] - BATCH["y"][:3]
  assert float(computed["loss"]) == pytest.approx(np.mean(errors**2))
  assert float(computed["error"]) == pytest.approx(np.mean(np.abs(errors)))


def test_in_flight_waits_for_the_oldest_call_beyond_its_limit():
  finished = []

  class Call:
    def __init__(self, i):
      self.i = i

    def block_until_ready(self):
      finished.append(self.i)
      return self

  in_flight = calls_in_flight.InFlight(2)
  for i in range(4):
    in_flight.wait_for_room()
    in_flight.add(Call(i))
  assert finished == [0, 1]  # Calls 2 and 3 may still run; 0 and 1 were waited for, in order.


def test_checkpoint_structure_mismatch_names_every_entry():
  saved = {"params": {"dense": {"kernel": np.zeros((4, 8))}, "old": np.zeros(3)}}
  wanted = {"params": {"dense": {"kernel": np.zeros((4, 16))}, "new": np.zeros(3)}}
  with pytest.raises(UsageError) as raised:
    checkpoint.check_structure(saved, wanted, "/runs/a")
  message = str(raised.value)
  assert "3 entries differ" in message
  assert "params/dense/kernel: checkpoint shape (4, 8), this config's (4, 16)" in message
  assert "params/old: in the checkpoint, not in this config's state" in message
  assert "params/new: in this config's state, not in the checkpoint" in message


@pytest.mark.parametrize(
  "last_step, preempted, due",
  [
    (10, False, (True, False, False)),
    (20, False, (True, True, False)),
    (30, False, (True, False, True)),
    (35, True, (False, True, False)),
    (40, False, (True, True, True)),  # The last step: everything.
    (5, False, (False, False, False)),
  ],
)
def test_what_is_due_after_a_call(last_step, preempted, due):
  config = config_lib.defaults()
  config.update(
    num_steps=40,
    steps_per_call=5,
    log_every_steps=10,
    checkpoint_every_steps=20,
    eval_every_steps=30,
  )
  now = train._due(config, last_step, preempted)  # pylint: disable=protected-access
  assert (now.report, now.save, now.evaluate, now.local_save) == (*due, False)


def test_the_console_line_of_a_report():
  scalars = {
    "loss": 2.3634,
    "accuracy": 0.4512,
    "eval_loss": 2.0397,
    "grad_norm": 0.5,
    "learning_rate": 3e-3,
    "steps_per_sec": 15.42,
    "tokens_per_sec": 63150.0,
    "data_wait_s": 0.2,
    "skipped_steps": 0.0,
  }
  assert writers.console_line(250, 300, scalars, eta_s=3725.4) == (
    "step 250/300 | loss 2.363 | accuracy 0.4512 | eval_loss 2.04 | 63150 tokens/s | "
    "15.42 steps/s | ETA 1:02:05"
  )
  assert writers.console_line(300, 300, {"loss": 1.0, "skipped_steps": 2.0}, None) == (
    "step 300/300 | loss 1 | skipped 2 non-finite steps"
  )


def test_seconds_before_a_moment_count_from_the_process_start():
  now = time.time()
  assert 0 < writers.seconds_before(now) < writers.seconds_since_process_start() + 1e-3
  assert writers.seconds_before(now - 0.5) == pytest.approx(
    writers.seconds_before(now) - 0.5, abs=0.05
  )


def test_bucketed_gradient_all_reduces_give_the_per_array_average():
  """The gradients averaged in flat buckets (used on CPU: all in one, or the small ones in one and
  the larger alone) equal one pmean per gradient array, on 8 devices that each see different
  examples."""
  tx = optax.sgd(0.1)
  params = {"w": jnp.float32(1.0), "v": jnp.arange(3, dtype=jnp.float32)}

  def loss(params, batch, rng):
    del rng
    error = params["w"] * batch["x"] + jnp.sum(params["v"]) - batch["y"]
    return jnp.mean(error**2), {}

  state = _state(params, tx)
  x = np.linspace(-1, 1, 32, dtype=np.float32).reshape(8, 4)
  batch = {"x": x, "y": 3 * x + 1}
  results = []
  for bucket_bytes in (0, 8, 1 << 20):  # w is 4 bytes, v 12.
    call = jax.pmap(
      lambda s, b, bucket_bytes=bucket_bytes: step.train_step(
        s,
        b,
        loss_fn=loss,
        tx=tx,
        schedule=optax.constant_schedule(0.1),
        gradient_bucket_bytes=bucket_bytes,
      ),
      axis_name=step.AXIS,
    )
    new_state, _ = call(jax.tree.map(lambda a: jnp.stack([a] * 8), state), batch)
    results.append(jax.tree.map(np.asarray, new_state.params))
  for result in results[1:]:
    jax.tree.map(np.testing.assert_array_equal, results[0], result)
  assert not np.allclose(results[0]["v"], np.arange(3))  # The step moved the params.


def test_a_state_packs_its_small_leaves_one_vector_per_item_size_and_back_bit_for_bit():
  params = {
    "kernel": jnp.ones((64, 32), jnp.float32),  # 8 KiB: above the limit, travels as it is.
    "bias": jnp.array([np.nan, -0.0, 1e-38, 3.0], jnp.float32),
    "scale": jnp.array([1.5, -2.0], jnp.bfloat16),
    "codes": jnp.array([-128, 0, 127], jnp.int8),
    "on": jnp.array([True, False]),  # bool does not bitcast: as it is.
    "nibbles": jnp.array([1, -2, 3], jnp.int4),  # 4 bits in a byte: as it is.
  }
  tx = optax.adam(1e-3)
  state = _state(params, tx, step=7, skipped_steps=2)
  packing = state_lib.Packing(state, small_leaf_bytes=4096)
  packed = jax.jit(packing.pack)(state)
  # Large: the kernel, the bool, the int4 and their moments.
  large_shapes = sorted(x.shape for x in packed.large)
  assert large_shapes == [(2,)] * 3 + [(3,)] * 3 + [(64, 32)] * 3
  # 32-bit: step, adam's count, skipped, rng (2), the bias and its two moments (3 x 4);
  # 16-bit: the scale and its moments; 8-bit: the codes and their moments.
  assert {x.dtype: x.shape for x in packed.small} == {
    jnp.dtype(jnp.uint32): (1 + 1 + 1 + 2 + 12,),
    jnp.dtype(jnp.uint16): (6,),
    jnp.dtype(jnp.uint8): (9,),
  }
  # On the host (numpy, nothing compiled) the same bits.
  large, small = packing.split(state)
  on_host = packing.pack_small([np.asarray(x) for x in small])
  assert [x.tobytes() for x in on_host] == [np.asarray(x).tobytes() for x in packed.small]
  host_state = packing.join(large, packing.unpack_small(on_host))
  for unpacked in (jax.jit(packing.unpack)(packed), packing.unpack(packed), host_state):
    assert jax.tree.structure(unpacked) == jax.tree.structure(state)
    for before, after in zip(jax.tree.leaves(state), jax.tree.leaves(unpacked), strict=True):
      assert after.dtype == before.dtype and after.shape == before.shape
      assert np.asarray(after).tobytes() == np.asarray(before).tobytes()


@pytest.mark.parametrize("name", ["pmap", "shard_map"])
def test_a_replicated_executor_runs_the_packed_state_and_gives_it_back_whole(name):
  """The run's state is few arrays (state.Packing); the compiled call updates it as one SGD step
  by hand, and to_global gives back a TrainState, as a checkpoint saves it."""
  tx = optax.sgd(0.1)
  params = {"w": jnp.float32(1.0), "v": jnp.zeros((2048,), jnp.float32)}  # v: 8 KiB.

  def loss(params, batch, rng):
    del rng
    error = params["w"] * batch["x"] + jnp.mean(params["v"]) - batch["y"]
    return jnp.mean(error**2), {}

  state = _state(params, tx, skipped_steps=2)
  executor = parallel.executor(name, state)
  run_state = executor.from_global(jax.device_put(state, executor.state_shardings))
  assert len(jax.tree.leaves(run_state)) == 2  # v alone; step, w, rng and skipped in one vector.
  metric_set = step.MetricSet(step.TRAIN_METRICS)
  call = executor.map_train(
    steps_per_call=1,
    metric_set=metric_set,
    loss_fn=loss,
    tx=tx,
    schedule=optax.constant_schedule(0.1),
  )
  x = np.tile(BATCH["x"], 4)
  batch = executor.batch_to_devices({"x": x, "y": np.tile(BATCH["y"], 4)})
  run_state, metrics = call(run_state, executor.to_devices(metric_set.zeros), batch)
  new_state = executor.to_global(run_state)
  error = 1.0 * x - np.tile(BATCH["y"], 4)
  assert float(new_state.params["w"]) == pytest.approx(1.0 - 0.1 * np.mean(2 * error * x))
  assert int(new_state.step) == 1 and int(new_state.skipped_steps) == 2
  assert executor.skipped_steps(run_state) == 2
  np.testing.assert_array_equal(new_state.rng, jax.random.PRNGKey(0))
  assert new_state.params["v"].shape == (2048,)
  computed = metric_set.compute(executor.to_host(metrics))
  assert computed["loss"] == pytest.approx(np.mean(error**2))


def test_the_console_quiets_the_read_coroutines_a_failed_orbax_restore_leaves_and_nothing_else():
  """A damaged checkpoint fails orbax's restore; its other reads, abandoned, are collected later
  and Python prints each one's error ("Exception ignored in: <coroutine ...>"), at a moment that
  depends on the garbage collector: the launcher has already named the damage in one line."""

  def coroutine_from(filename):
    namespace = {}
    exec(compile("async def read():\n  pass\n", filename, "exec"), namespace)  # noqa: S102
    return namespace["read"]()

  printed = []
  hook = console._without_orbax_leftovers(printed.append, unpack=True)  # pylint: disable=protected-access
  for filename in ("/site-packages/orbax/checkpoint/serialization.py", "/work/model.py"):
    coroutine = coroutine_from(filename)
    hook(types.SimpleNamespace(exc_value=Exception("Error reading"), object=coroutine))
    coroutine.close()
  assert [args.object.cr_code.co_filename for args in printed] == ["/work/model.py"]


def test_params_may_be_any_float_dtype_and_not_integers_or_empty():
  module = types.ModuleType("my_workload")
  workload_lib.check_params(module, {"w": jnp.ones(3, jnp.bfloat16), "b": jnp.ones(2, jnp.float16)})
  with pytest.raises(UsageError, match=r"not float arrays \(\['n'\] is int32\)"):
    workload_lib.check_params(module, {"w": jnp.ones(3), "n": jnp.ones(2, jnp.int32)})
  with pytest.raises(UsageError, match=r"zero size \(\['e'\] \(0, 4\)\).*drop them"):
    workload_lib.check_params(module, {"w": jnp.ones(3), "e": jnp.zeros((0, 4))})


def test_metric_set_vectors_add_as_collections_merge():
  metric_set = step.MetricSet(["loss", "accuracy"])
  first = metric_set.single({"loss": jnp.float32(2.0), "accuracy": jnp.float32(0.5)})
  second = metric_set.single({"loss": jnp.float32(4.0), "accuracy": jnp.float32(1.0)})
  summed = metric_set.pack(first) + metric_set.pack(second) + metric_set.zeros
  assert metric_set.unpack(summed).compute() == pytest.approx({"loss": 3.0, "accuracy": 0.75})
  assert summed.shape == (5,)  # One vector: a total and a count per metric, and CLU's counter.


def test_profile_first_step_traces_on_process_0(tmp_path):
  config = load_config(
    "linear", num_steps=20, log_every_steps=10, eval_every_steps=0, profile_first_step=5
  )
  train.run(config, str(tmp_path))
  traces = list(tmp_path.glob("plugins/profile/*/*.xplane.pb"))
  assert len(traces) == 1 and traces[0].stat().st_size > 1000


def test_config_mesh_is_data_by_fsdp_with_one_axis_free():
  def shape(mesh, processes=2, local=4):
    return config_lib.mesh_shape(mesh, "fsdp", processes, local)

  assert shape("") == {"data": 2, "fsdp": 4, "tensor": 1}  # fsdp within each process by default.
  assert shape("data:1,fsdp:8") == {"data": 1, "fsdp": 8, "tensor": 1}
  assert shape("fsdp:-1") == {"data": 1, "fsdp": 8, "tensor": 1}
  assert shape("data:4,fsdp:-1") == {"data": 4, "fsdp": 2, "tensor": 1}
  assert shape(" fsdp:2 , data:4") == {"data": 4, "fsdp": 2, "tensor": 1}
  assert config_lib.mesh_shape("", "pmap", 2, 4) is None
  for mesh, message in [
    ("data:3,fsdp:4", "does not fit the job's 8 devices"),
    ("data:3,fsdp:-1", "does not fit the job's 8 devices"),
    ("data:-1,fsdp:-1", "only one axis may have it"),
    ("tensor:8", "tensor:8 would span processes"),
    ("data:2,data:4", "is not a mesh"),
    ("fsdp:0", "is not a mesh"),
    ("fsdp", "is not a mesh"),
  ]:
    with pytest.raises(UsageError, match=message):
      shape(mesh)


def test_config_mesh_under_a_replicated_executor_is_refused():
  config = config_lib.defaults()
  config.workload, config.mesh = "linear", "data:2,fsdp:4"
  with pytest.raises(UsageError, match="only parallel=fsdp does"):
    config_lib.check(config)
  config.parallel = "fsdp"
  config_lib.check(config)


def test_a_torn_line_is_skipped_counted_and_the_next_start_writes_on_a_new_line(tmp_path, caplog):
  metrics = tmp_path / "metrics.jsonl"
  metrics.write_text('{"step": 1, "loss": 2.5}\n{"step": 2, "lo')  # A kill in the middle of a row.
  assert storage.read_jsonl(storage.path(str(metrics))) == [{"step": 1, "loss": 2.5}]
  assert "skipped" not in caplog.text  # A last line without its newline is being written.
  appender = storage.Appender(storage.path(str(metrics)))
  appender.write('{"step": 3, "loss": 2.25}\n')
  appender.close()
  assert metrics.read_text().splitlines()[1:] == ['{"step": 2, "lo', '{"step": 3, "loss": 2.25}']
  with caplog.at_level("WARNING"):
    rows = storage.read_jsonl(storage.path(str(metrics)))
  assert rows == [{"step": 1, "loss": 2.5}, {"step": 3, "loss": 2.25}]
  assert f"skipped 1 unreadable line(s) of {metrics} (torn by a kill" in caplog.text
  whole = storage.Appender(storage.path(str(metrics)))  # A file that ends whole gets no blank line.
  whole.write('{"step": 4}\n')
  whole.close()
  assert metrics.read_text().endswith('2.25}\n{"step": 4}\n')


@pytest.mark.parametrize(
  "make_error, what",
  [
    (
      lambda w: OSError(28, "No space left on device", f"{w}/metrics.jsonl"),
      "the filesystem is full",
    ),
    (lambda w: OSError(122, "Disk quota exceeded"), "this user's disk quota is used up"),
    (lambda w: OSError(30, "Read-only file system"), "the filesystem is read-only"),
    (lambda w: PermissionError(13, "Permission denied"), "permission denied"),
    (
      lambda w: ValueError(
        f'RESOURCE_EXHAUSTED: Error writing local file "{w}/checkpoints/5/_sharding": '
        "Failed to write 10 bytes: No space left on device [OS error: 28]"
      ),
      "the filesystem is full",
    ),
  ],
)
def test_a_write_the_storage_refuses_is_one_line_naming_what_and_the_fix(
  make_error, what, tmp_path
):
  error = make_error(tmp_path)
  try:
    try:
      raise error
    except Exception as inner:
      raise RuntimeError("the save failed") from inner
  except RuntimeError as outer:
    line = storage.refusal(outer, str(tmp_path), last_checkpoint=5)
  assert line.startswith("cannot write ") and f": {what} (" in line and "\n" not in line
  assert "MiB free of" in line and "the checkpoint of step 5 is complete and kept" in line
  assert line.endswith("then run the same command to resume")
  assert storage.refusal(ValueError("shapes differ"), str(tmp_path), None) is None
  assert "no checkpoint was complete yet" in storage.refusal(error, str(tmp_path), None)


def test_every_config_checkpoints_within_its_run():
  """Each config file, at every size, saves a periodic checkpoint before its last step (besides
  the final one), so stopping it part way keeps work."""
  sized = {}
  for path in sorted(glob.glob(os.path.join(REPO, "configs", "*.py"))):
    name = os.path.basename(path)[:-3]
    spec = importlib.util.spec_from_file_location(f"sizes_of_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for size in getattr(module, "SIZES", [None]):  # lm.py's sizes; the others have one.
      sized[f"{name}:{size}" if size else name] = load_config(name, size)
  assert {"linear", "classifier", "lm:tiny", "lm:small", "lm:medium"} <= set(sized)
  for name, config in sized.items():
    every = config.checkpoint_every_steps
    assert every == 0 or every < config.num_steps, (name, every, config.num_steps)


@pytest.mark.parametrize(
  "host_ms, device_ms, intervals, k, why",
  [
    (0.5, 1.0, (500, 0, 0), 50, "the host takes 1.0% of a call"),  # 0.5 / (0.5 + 50)
    (1.0, 25.0, (100, 0, 0), 4, "1.0%"),  # K=2 leaves the host 1.96%, K=4 0.99%.
    (1.0, 500.0, (100, 0, 0), 1, "0.2%"),
    (10.0, 300.0, (100, 0, 0), 2, "K=4 would run past 1 s a call"),  # 4 x 310 ms
    (18.0, 180.0, (20, 0, 0), 5, "K=10 would run past 1 s a call"),  # 5 x 198 = 990 ms
    (18.0, 190.0, (20, 0, 0), 4, "K=5 would run past 1 s a call"),  # 5 x 208 = 1040 ms
    (0.5, 1.0, (10, 100, 0), 10, "intervals [10, 100]"),
    (0.5, 1.0, (7, 0, 0), 1, "intervals [7]"),
  ],
)
def test_steps_per_call_auto_chooses_k_from_the_timings(host_ms, device_ms, intervals, k, why):
  timing = steps_per_call.Timing(data_s=1e-4, host_s=host_ms / 1e3, device_s=device_ms / 1e3)
  choice = steps_per_call.choose(timing, intervals, host_share=0.01, max_call_s=1.0)
  assert choice.k == k
  assert f"host {host_ms:.2f} ms a call" in choice.why and why in choice.why


def test_steps_per_call_auto_starts_each_call_of_k_at_a_multiple_of_k(monkeypatch):
  monkeypatch.setattr(steps_per_call, "HOST_SHARE", 0.0)  # The largest K that fits: 10.
  config = config_lib.defaults()
  config.update(steps_per_call="auto", num_steps=23, log_every_steps=10)
  config.update(eval_every_steps=0, checkpoint_every_steps=20)
  plan = steps_per_call.Plan(config, first_step=3)

  def call():
    plan.call_starts()
    plan.data_ready()
    return plan.call_done(jnp.zeros(()))

  assert [call() for _ in range(steps_per_call.MEASURED_CALLS)] == [None] * 5
  assert plan.k_at(3) == 1
  choice = call()
  assert choice.k == 10 and plan.k == 10
  assert [plan.k_at(step) for step in (9, 10, 19, 20, 22)] == [1, 10, 1, 1, 1]
  assert call() is None


def test_steps_per_call_auto_is_a_config_value_and_other_strings_are_not():
  config = config_lib.defaults()
  config.update(workload="linear", steps_per_call="auto", num_steps=7)
  config_lib.check(config)
  config.steps_per_call = "fast"
  with pytest.raises(
    UsageError, match=r'steps_per_call=.fast. is a str: it must be an int or "auto"'
  ):
    config_lib.check(config)


@pytest.mark.parametrize("bucket_bytes", [0, 64, 1 << 20])
def test_gradients_and_the_step_metrics_are_averaged_together_and_the_norm_is_the_gradients(
  bucket_bytes,
):
  """Per device gradients (a leaf over 64 bytes goes alone, the small ones share buckets) and
  two scalar metrics riding along: each the device mean, by numpy; the norm of the mean
  gradients only."""
  devices = jax.local_device_count()
  rng = np.random.default_rng(0)
  grads = {
    "big": rng.normal(size=(devices, 40)).astype(np.float32),
    "small": rng.normal(size=(devices, 3)).astype(np.float32),
    "tiny": rng.normal(size=(devices, 2, 2)).astype(np.float32),
  }
  riders = {
    "loss": rng.normal(size=devices).astype(np.float32),
    "acc": np.arange(devices, dtype=np.float32),
  }

  def mean(grads, riders):
    return step.mean_over_devices(grads, bucket_bytes, riders=riders)

  means, norm, rider_means = jax.pmap(mean, axis_name=step.AXIS)(grads, riders)
  expected = {name: value.mean(axis=0) for name, value in grads.items()}
  for name, value in expected.items():
    np.testing.assert_allclose(means[name][3], value, rtol=1e-6, atol=1e-7)
  flat = np.concatenate([value.ravel() for value in expected.values()])
  np.testing.assert_allclose(norm[0], np.linalg.norm(flat), rtol=1e-6)
  for name, value in riders.items():
    np.testing.assert_allclose(rider_means[name], np.full(devices, value.mean()), rtol=1e-6)
  all_reduces = jax.jit(jax.pmap(mean, axis_name=step.AXIS)).lower(grads, riders).as_text()
  assert all_reduces.count("all_reduce") == {0: 5, 64: 2, 1 << 20: 1}[bucket_bytes]  # 0: per leaf
