"""config.parallel=fsdp: the state sharded over every device gives pmap's results, holds 1/N of
the bytes per device, and its checkpoints continue under any executor and device count."""

import sys
import types

import jax
import pytest
from jax.sharding import PartitionSpec as P

from launcher import memory, parallel, train
from tests.helpers import (
  FOUR_STEPS,
  assert_close,
  assert_same_run,
  finish,
  launcher_command,
  load_config,
  load_params,
  losses_by_step,
  lowered_train_call,
  read_metrics,
  run_lm_tiny_job_on_mesh,
  start,
)

pytestmark = pytest.mark.slow  # Starts processes or trains for seconds.

RUNS = {  # Each workload for a few steps, a report every step.
  "linear": ("linear", None, {}),
  "classifier": ("classifier", None, {}),
  "lm": ("lm", "tiny", {}),
  "lm, K=2, 2 microbatches, bfloat16": (
    "lm",
    "tiny",
    {"steps_per_call": 2, "grad_accum_steps": 2, "compute_dtype": "bfloat16"},
  ),
  "classifier, skip_nonfinite": ("classifier", None, {"skip_nonfinite_steps": True}),
  "lm, blocks scanned and rematerialized": ("lm", "tiny", {"scan_layers": True, "remat": True}),
}


def run(name, arg, workdir, **overrides):
  config = load_config(name, arg, **{**FOUR_STEPS, **overrides})
  if config.steps_per_call == 2:
    config.log_every_steps = 2
  return config, train.run(config, str(workdir)), read_metrics(str(workdir))


@pytest.mark.parametrize("case", RUNS)
def test_fsdp_gives_pmaps_results(case, tmp_path):
  name, arg, overrides = RUNS[case]
  config, pmap_state, pmap_rows = run(name, arg, tmp_path / "pmap", parallel="pmap", **overrides)
  _, fsdp_state, fsdp_rows = run(name, arg, tmp_path / "fsdp", parallel="fsdp", **overrides)
  assert_close(config, fsdp_state.params, pmap_state.params)
  # bfloat16 keeps 8 bits of mantissa: the executors' reduction orders differ by a few 1e-4.
  rel = 1e-4 if config.compute_dtype == "float32" else 2e-3
  for key in ("loss", "grad_norm", "eval_loss"):
    assert [r[key] for r in fsdp_rows if key in r] == pytest.approx(
      [r[key] for r in pmap_rows if key in r], rel=rel
    ), key
  assert int(fsdp_state.step) == 4


def test_lm_state_per_device_is_an_eighth_under_fsdp(tmp_path):
  _, _, pmap_rows = run("lm", "tiny", tmp_path / "pmap", parallel="pmap")
  _, _, fsdp_rows = run("lm", "tiny", tmp_path / "fsdp", parallel="fsdp")
  replicated, sharded = (
    pmap_rows[0]["state_bytes_per_device"],
    fsdp_rows[0]["state_bytes_per_device"],
  )
  assert sharded <= 0.2 * replicated
  assert sharded == pytest.approx(replicated / 8, rel=0.01)  # By hand: every lm array divides.
  assert "state_bytes_per_device" not in pmap_rows[1]


def test_default_rule_splits_the_largest_divisible_axis():
  assert parallel.default_spec((64, 256), 8) == P(None, "fsdp")
  assert parallel.default_spec((256, 64), 8) == P("fsdp")
  assert parallel.default_spec((12, 16), 8) == P(None, "fsdp")
  assert parallel.default_spec((3, 5), 8) == P()
  assert parallel.default_spec((), 8) == P()
  assert parallel.default_spec((4,), 8) == P()


def test_a_workloads_partition_overrides_the_rule(tmp_path, monkeypatch):
  from workloads import classifier  # pylint: disable=import-outside-toplevel

  module = types.ModuleType("partitioned_classifier")
  module.__dict__.update({name: getattr(classifier, name) for name in ("init", "loss", "dataset")})
  module.partition = lambda config, params: jax.tree.map(lambda _: P(), params)
  monkeypatch.setitem(sys.modules, "partitioned_classifier", module)
  config = load_config(
    "classifier", **{**FOUR_STEPS, "workload": "partitioned_classifier", "parallel": "fsdp"}
  )
  from launcher import optimizer  # pylint: disable=import-outside-toplevel
  from launcher import state as state_lib  # pylint: disable=import-outside-toplevel

  state = state_lib.create(config, module.init, optimizer.build(config))
  executor = parallel.executor(
    "fsdp", state, partition=lambda params: module.partition(config, params)
  )
  placed = executor.to_devices(state)
  assert all(x.sharding.spec == P() for x in jax.tree.leaves(placed.params))
  # AdamW's moments follow their params; the optimizer's step count is a scalar.
  assert all(x.sharding.spec == P() for x in jax.tree.leaves(placed.opt_state))
  rows = run(
    "classifier", None, tmp_path / "run", workload="partitioned_classifier", parallel="fsdp"
  )[2]
  _, _, plain = run("classifier", None, tmp_path / "plain", parallel="fsdp")
  assert rows[0]["state_bytes_per_device"] > plain[0]["state_bytes_per_device"]


CONFIG = "--config=tests/hooked_config.py"


@pytest.mark.parametrize(
  "first, then", [("pmap 1x8", "fsdp 1x8"), ("fsdp 1x8", "fsdp 1x4"), ("fsdp 2x4", "pmap 1x8")]
)
def test_a_run_saved_under_one_executor_continues_under_another(first, then, straight, tmp_path):
  workdir = tmp_path / "run"
  for stage, (executor, layout) in enumerate(part.split() for part in (first, then)):
    num_processes, devices = map(int, layout.split("x"))
    steps = 20 if stage == 0 else 40
    log = tmp_path / f"stage{stage}.log"
    process = start(
      launcher_command(
        CONFIG,
        f"--workdir={workdir}",
        f"--config.parallel={executor}",
        f"--config.num_steps={steps}",
        num_processes=num_processes,
        devices=devices,
      ),
      log,
      devices=devices,
    )
    assert finish(process, 240) == 0, open(log).read()[-3000:]
  assert "resuming from the checkpoint of step 20" in open(tmp_path / "stage1.log").read()
  config = load_config("../tests/hooked_config")
  assert_close(config, load_params(str(workdir), 40), load_params(straight("1x8"), 40))
  resumed, uninterrupted = losses_by_step(str(workdir)), losses_by_step(straight("1x8"))
  assert list(resumed) == list(range(1, 41))
  assert [resumed[s] for s in resumed] == pytest.approx(
    [uninterrupted[s] for s in resumed], rel=1e-4
  )


@pytest.mark.parametrize("mesh, spans, share", [("data:2,fsdp:4", 1, 4), ("data:1,fsdp:8", 2, 8)])
def test_two_processes_on_a_data_fsdp_mesh_give_pmaps_results(mesh, spans, share, tmp_path):
  workdir, log = tmp_path / "2x4", tmp_path / "2x4.log"
  data, fsdp = mesh.split(",")
  assert f"fsdp on a {data} x {fsdp} mesh, each fsdp group within {spans} process(es)" in (
    run_lm_tiny_job_on_mesh(workdir, log, mesh)
  )
  pmap_run = run("lm", "tiny", tmp_path / "pmap", parallel="pmap")
  rows = assert_same_run(pmap_run, workdir)
  pmap_rows = pmap_run[2]
  # Every lm array divides by 4 and 8: a device holds exactly 1/fsdp of the state.
  assert rows[0]["state_bytes_per_device"] == pytest.approx(
    pmap_rows[0]["state_bytes_per_device"] / share, rel=0.01
  )


def _param_bytes(config) -> int:
  from launcher import workload as workload_lib  # pylint: disable=import-outside-toplevel

  workload = workload_lib.load(config.workload)
  shapes = jax.eval_shape(lambda: workload.init(config, jax.random.PRNGKey(0)))
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))


def test_no_device_holds_every_param_or_gradient_in_a_fsdp_step():
  # An lm of 8 layers, 24 MB of params. Replicated, a device holds them and their whole
  # gradients besides the state; under fsdp a step's working memory is a fraction of the params.
  sizes = {"width": 256, "num_layers": 8, "num_heads": 4, "seq_len": 32, "batch_size": 16}
  temp = {}
  for executor in ("shard_map", "fsdp"):
    config = load_config("lm", "tiny", parallel=executor, scan_layers=True, remat=True, **sizes)
    temp[executor] = lowered_train_call(config).compile().memory_analysis().temp_size_in_bytes
  params = _param_bytes(config)
  assert temp["shard_map"] >= params  # Its whole gradients.
  assert temp["fsdp"] < 0.5 * params, (temp, params)


def test_fsdp_creates_and_restores_each_array_in_its_shards(tmp_path):
  from launcher import checkpoint as checkpoint_lib  # pylint: disable=import-outside-toplevel
  from launcher import workload as workload_lib  # pylint: disable=import-outside-toplevel

  config = load_config("lm", "tiny", parallel="fsdp", **FOUR_STEPS)
  workload = workload_lib.load(config.workload)
  _, _, _, fresh, target = train._build(config, workload)  # pylint: disable=protected-access
  whole = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(target))
  shardings = jax.tree.map(lambda x: x.sharding, target)
  init = jax.jit(fresh, out_shardings=shardings).lower().compile().memory_analysis()
  # The initializer's program per device: its eighth of the state, and no whole copy on the way.
  assert init.output_size_in_bytes == pytest.approx(whole / 8, rel=0.01)
  assert init.temp_size_in_bytes < 0.25 * whole
  train.run(config, str(tmp_path))
  checkpoints = checkpoint_lib.Checkpoints(tmp_path, keep=1)
  restored = checkpoints.restore(4, into=target)
  checkpoints.close()
  assert jax.tree.map(lambda x: x.sharding, restored) == shardings
  assert memory.state_bytes_per_device(restored) == pytest.approx(whole / 8, rel=0.01)
