"""What makes the launcher fast must not change results: executors, accumulation, precision, syncs."""

import os
import subprocess
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import array

from launcher import data, steps_per_call, train, writers
from launcher.errors import UsageError
from tests.helpers import REPO, assert_close, load_config, read_metrics, run_launcher
from workloads import classifier, lm

pytestmark = pytest.mark.slow  # Starts processes or trains for seconds.

RUNS = {
  "classifier": (
    None,
    {
      "num_steps": 4,
      "steps_per_call": 2,
      "log_every_steps": 2,
      "eval_every_steps": 4,
      "schedule": "constant",
    },
  ),
  "lm": (
    "tiny",
    {
      "batch_size": 32,
      "num_steps": 4,
      "steps_per_call": 2,
      "log_every_steps": 2,
      "eval_every_steps": 4,
      "eval_batches": 2,
      "schedule": "constant",
    },
  ),
}


@pytest.mark.parametrize("name", RUNS)
def test_shard_map_executor_equals_pmap(name, tmp_path):
  arg, overrides = RUNS[name]
  runs = {}
  for executor in ("pmap", "shard_map"):
    config = load_config(name, arg, parallel=executor, **overrides)
    runs[executor] = (
      train.run(config, str(tmp_path / executor)),
      read_metrics(str(tmp_path / executor)),
    )
  assert_close(config, runs["shard_map"][0].params, runs["pmap"][0].params)
  for pmap_row, shard_map_row in zip(runs["pmap"][1], runs["shard_map"][1]):
    for key in ("loss", "grad_norm", "eval_loss"):
      if key in pmap_row:
        assert shard_map_row[key] == pytest.approx(pmap_row[key], rel=1e-5), key


@pytest.mark.parametrize("name, optimizer", [("classifier", "sgd"), ("lm", "adamw")])
def test_gradient_accumulation_equals_one_step_on_the_whole_batch(name, optimizer, tmp_path):
  """4 microbatches of 2 examples per device against one step on the 8 examples."""
  arg = "tiny" if name == "lm" else None
  states = {}
  for accumulate in (1, 4):
    config = load_config(
      name,
      arg,
      batch_size=64,
      num_steps=1,
      log_every_steps=1,
      eval_every_steps=0,
      schedule="constant",
      optimizer=optimizer,
      grad_accum_steps=accumulate,
    )
    states[accumulate] = train.run(config, str(tmp_path / str(accumulate)))
  assert_close(config, states[4].params, states[1].params)


def test_bfloat16_compute_keeps_float32_params(tmp_path):
  losses = {}
  for dtype in ("float32", "bfloat16"):
    config = load_config(
      "lm",
      "tiny",
      batch_size=32,
      num_steps=2,
      log_every_steps=1,
      eval_every_steps=0,
      schedule="constant",
      compute_dtype=dtype,
    )
    state = train.run(config, str(tmp_path / dtype))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    losses[dtype] = [row["loss"] for row in read_metrics(str(tmp_path / dtype))]
  assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=2e-2)
  assert losses["bfloat16"] != losses["float32"]  # It really computed in bfloat16.


@pytest.fixture
def guarded_transfers(monkeypatch):
  """Makes jax's device-to-host transfer guard bite on CPU too, where jax does not check it
  (CPU arrays are host memory): every fetch of an array's value goes through the guard."""
  fetch = array.ArrayImpl._value.fget  # pylint: disable=protected-access

  def guarded(self):
    if jax.config.jax_transfer_guard_device_to_host == "disallow":
      raise RuntimeError(f"Disallowed device-to-host transfer of {self.aval}")
    return fetch(self)

  monkeypatch.setattr(array.ArrayImpl, "_value", property(guarded))


def test_no_device_to_host_transfer_between_reports(tmp_path, monkeypatch, guarded_transfers):
  del guarded_transfers
  config = load_config("linear", num_steps=20, log_every_steps=10, eval_every_steps=10)
  train.run(config, str(tmp_path / "clean"))  # Reports, eval and checkpoints fetch; steps do not.

  def sync_every_step(self, first_step, last_step):
    del self, first_step, last_step
    float(jnp.float32(1.0) + 1.0)  # What a per-step `float(loss)` does.

  monkeypatch.setattr(writers.ReportWriter, "after_steps", sync_every_step)
  with pytest.raises(RuntimeError, match="Disallowed device-to-host transfer"):
    train.run(config, str(tmp_path / "synced"))


def test_throughput_flops_and_time_to_first_step_are_reported(tmp_path):
  config = load_config(
    "lm",
    "tiny",
    batch_size=32,
    num_steps=4,
    log_every_steps=2,
    eval_every_steps=0,
    schedule="constant",
  )
  train.run(config, str(tmp_path))
  first, second = read_metrics(str(tmp_path))
  assert first["time_to_first_step_s"] > 0 and "time_to_first_step_s" not in second
  assert first["model_flops_per_sec"] == pytest.approx(
    first["examples_per_sec"] * lm.flops_per_example(config), rel=1e-6
  )
  assert first["tokens_per_sec"] == pytest.approx(first["examples_per_sec"] * 64, rel=1e-6)
  assert "mfu" not in first  # CPU: no peak to divide by, so no invented MFU.
  # 6N per token plus causal attention, by hand for the tiny model.
  assert lm.flops_per_example(config) == 64 * (6 * 120_064 + 6 * 2 * 64 * 64)


@pytest.mark.parametrize(
  "device_kind, peak",
  [
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v6 lite", 918e12),
    ("TPU v5", 459e12),
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA H200 NVL", 835e12),
    ("NVIDIA GH200 480GB", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA B200", None),
    ("NVIDIA H100", None),
    ("cpu", None),
  ],
)
def test_peak_flops_table(device_kind, peak):
  assert writers.peak_flops_per_device(device_kind) == peak


def test_compilation_cache_persists_compiled_programs(tmp_path):
  cache = tmp_path / "cache"
  result = run_launcher(
    "--config=configs/linear.py",
    f"--workdir={tmp_path / 'run'}",
    "--config.num_steps=10",
    "--config.eval_every_steps=0",
    f"--config.compilation_cache_dir={cache}",
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert len(os.listdir(cache)) >= 2  # At least the train call and the state init.
  assert "time to first step" in result.stdout


def test_steps_per_call_auto_trains_the_same_losses_as_one_step_per_call(tmp_path, monkeypatch):
  """auto switches from K=1 to its K mid-run, and again after a resume from step 16, where a
  fixed K of 5 is refused (45 - 16 is no multiple of 5); the reports' losses are the K=1 run's
  (a resume's first report averages from the resumed step on: it is left out)."""
  monkeypatch.setattr(steps_per_call, "HOST_SHARE", 0.0)  # The largest K that fits: 5.
  settings = {"log_every_steps": 5, "eval_every_steps": 0, "checkpoint_every_steps": 10}
  train.run(load_config("linear", num_steps=45, **settings), str(tmp_path / "one"))
  train.run(load_config("linear", num_steps=16, steps_per_call="auto", **settings), str(tmp_path))
  with pytest.raises(UsageError, match="resumes at step 16"):
    train.run(load_config("linear", num_steps=45, steps_per_call=5, **settings), str(tmp_path))
  train.run(load_config("linear", num_steps=45, steps_per_call="auto", **settings), str(tmp_path))
  reference = {row["step"]: row for row in read_metrics(str(tmp_path / "one"))}
  rows = read_metrics(str(tmp_path))
  assert reference[5]["steps_per_call"] == 1
  assert [row["step"] for row in rows] == [5, 10, 15, 16, 20, 25, 30, 35, 40, 45]
  assert [row.get("steps_per_call") for row in rows if "steps_per_call" in row] == [5, 5]
  for row in rows:
    if row["step"] not in (16, 20):
      assert row["loss"] == pytest.approx(reference[row["step"]]["loss"], rel=1e-6), row["step"]


# Packages a local run without them leaves unimported (each 0.1-0.4 s, or a dependency that is
# not installed): trackers, grain, the gs:// clients, TensorBoard's writer, the report's plots,
# corpora and the classifier's data.
NOT_IMPORTED_BY_A_LOCAL_RUN = (
  "mlflow",
  "wandb",
  "grain",
  "gcsfs",
  "fsspec",
  "google.cloud.storage",
  "aiohttp",
  "tensorboardX",
  "matplotlib",
  "pyarrow",
  "tokenizers",
  "sklearn",
)


# `python -m launcher`, writing the names of every module it holds at its exit to $MODULES_FILE.
_LAUNCHER_RECORDING_MODULES = """
import atexit, os, runpy, sys
atexit.register(lambda: open(os.environ["MODULES_FILE"], "w").write("\\n".join(sys.modules)))
sys.argv[0] = "launcher"
runpy.run_module("launcher", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("trackers", ["none", "tensorboard"])
def test_a_local_run_imports_only_what_it_uses(trackers, tmp_path):
  """The modules a linear run that reports, evaluates and saves holds at its exit: none of the
  packages it does not use, and the named tracker's (so that the check can fail)."""
  modules_file = tmp_path / "modules.txt"
  result = subprocess.run(
    [
      sys.executable,
      "-c",
      _LAUNCHER_RECORDING_MODULES,
      "--config=configs/linear.py",
      f"--workdir={tmp_path / 'run'}",
      "--config.num_steps=10",
      "--config.eval_every_steps=10",
      "--config.checkpoint_every_steps=10",
      f"--config.trackers={trackers}",
    ],
    cwd=REPO,
    env={**os.environ, "MODULES_FILE": str(modules_file)},
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  modules = set(modules_file.read_text().split())
  assert {"jax", "orbax.checkpoint", "launcher.train"} <= modules
  imported = {
    package
    for package in NOT_IMPORTED_BY_A_LOCAL_RUN
    if any(module == package or module.startswith(f"{package}.") for module in modules)
  }
  assert imported == ({"tensorboardX"} if trackers == "tensorboard" else set())
  assert os.listdir(tmp_path / "run" / "checkpoints") == ["10"]
  assert any(name.startswith("events.") for name in os.listdir(tmp_path / "run")) == (
    trackers != "none"
  )


@pytest.mark.parametrize(
  "num_records, batch_size, process_count, repeat, start",
  [
    (10, 4, 1, True, 0),
    (10, 4, 2, True, 3),
    (7, 24, 4, True, 1),
    (64, 8, 2, False, 0),
    (7, 4, 2, False, 1),
    (3, 24, 1, False, 0),
  ],
)
def test_unshuffled_batch_indices_are_grains(num_records, batch_size, process_count, repeat, start):
  """data.InOrder (batch_indices without a seed, which leaves grain unimported) gives grain's
  elements: range, repeat, batch, this process's slice from `start`."""
  for process_index in range(process_count):
    grains = grain.MapDataset.range(num_records)
    grains = grains.repeat(None) if repeat else grains
    grains = grains.batch(batch_size // process_count, drop_remainder=False)
    grains = grains[process_index::process_count][start:]
    ours = data.batch_indices(
      num_records,
      batch_size=batch_size,
      process_index=process_index,
      process_count=process_count,
      repeat=repeat,
      start=start,
    ).map(lambda i: i * 10)
    assert repeat or len(ours) == len(grains)
    for t in [*range(min(len(grains), 9)), *([12345] if repeat else [])]:
      np.testing.assert_array_equal(ours[t], np.asarray(grains[t]) * 10)


def test_the_classifier_without_scikit_learn_names_its_extra(monkeypatch):
  """scikit-learn is the `classifier` extra, not a dependency of every install."""
  monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # As when it is not installed.
  config = load_config("classifier", test_examples=123)  # A size no other test has cached.
  with pytest.raises(
    UsageError, match=r"^the classifier workload .* pip install -e '\.\[classifier\]'$"
  ):
    next(classifier.dataset(config, "train", 0, 1))


@pytest.mark.parametrize("keep", [False, True])
def test_freed_host_memory_stays_in_the_process_for_the_next_call(keep):
  """A freed 256 MiB block: glibc as it comes gives it back to the OS (the next call's buffers
  page-fault afresh); after keep_freed_host_memory it stays resident, ready for reuse."""
  script = (
    "import numpy as np\n"
    "from launcher import memory\n"
    f"if {keep}: memory.keep_freed_host_memory()\n"
    "import os\n"
    "def resident():\n"
    "  return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')\n"
    "block = np.ones(256 << 18, np.float32)\n"
    "held = resident()\n"
    "del block\n"
    "print((held - resident()) >> 20)\n"
  )
  ran = subprocess.run(
    [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60, check=True
  )
  returned_mib = int(ran.stdout)
  assert (returned_mib < 8) if keep else (returned_mib >= 250), returned_mib
