"""A tensor axis and logical axis names: the lm on data x fsdp x tensor meshes gives pmap's
losses with each param split as its names and config.axis_rules say, the split is printed at
start-up, restores cross meshes, and a rule or a dimension the mesh cannot apply is one line."""

import functools
import logging

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from launcher import config as config_lib
from launcher import parallel, sharding, train
from launcher import workload as workload_lib
from launcher.errors import UsageError
from tests.helpers import (
  FOUR_STEPS,
  assert_close,
  assert_same_run,
  finish,
  launcher_command,
  load_config,
  losses_by_step,
  lowered_train_call,
  read_metrics,
  run_lm_tiny_job_on_mesh,
  start,
)

# lm tiny (width 64, 4 heads of 16, MLP 256, vocab 256, 2 blocks) counted by hand: 120,064 params;
# all but the MLP's hidden biases (2 x 256) have an `embed` dimension; the embedding (256 x 64)
# and each block's q, k, v, out (4 x 64 x 64) and MLP kernels and hidden bias (2 x 64 x 256 + 256)
# a `heads` or `mlp` or `vocab` one: 16,384 + 2 x 49,408 = 115,200.
TINY_SPLIT = "params split: fsdp 119.6K, tensor 115.2K, replicated 0"
# Everything a step can do at once, as under fsdp (tests/test_fsdp.py); remat, which only
# recomputes, is left out: it doubles the compile time (~20 s), and test_fsdp.py runs it.
VARIANT = {
  "steps_per_call": 2,
  "log_every_steps": 2,
  "grad_accum_steps": 2,
  "compute_dtype": "bfloat16",
  "scan_layers": True,
  "skip_nonfinite_steps": True,
  "eval_every_steps": 0,
}


def test_config_mesh_takes_a_tensor_axis_inside_a_process():
  def shape(mesh, processes=2, local=4):
    return config_lib.mesh_shape(mesh, "fsdp", processes, local)

  assert shape("data:1,fsdp:2,tensor:4") == {"data": 1, "fsdp": 2, "tensor": 4}
  assert shape("data:2,fsdp:2,tensor:-1") == {"data": 2, "fsdp": 2, "tensor": 2}
  assert shape("tensor:4,data:-1") == {"data": 2, "fsdp": 1, "tensor": 4}
  with pytest.raises(UsageError, match=r"tensor:8 would span processes .* divides 4 \(1, 2, 4\)"):
    shape("data:1,fsdp:1,tensor:8")
  with pytest.raises(UsageError, match="does not fit the job's 8 devices"):
    shape("data:1,fsdp:2,tensor:2")


def test_axis_rules_replace_the_defaults_name_by_name():
  rules = config_lib.parse_axis_rules("mlp:none, vocab:fsdp+tensor")
  assert rules == {**config_lib.AXIS_RULES, "mlp": (), "vocab": ("fsdp", "tensor")}
  assert config_lib.parse_axis_rules("") == config_lib.AXIS_RULES
  assert config_lib.AXIS_RULES["batch"] == ("data", "fsdp")
  assert config_lib.AXIS_RULES["embed"] == ("fsdp",)
  assert {config_lib.AXIS_RULES[n] for n in ("heads", "kv", "mlp", "vocab")} == {("tensor",)}
  for bad, message in [
    ("mlp", "is not a rule"),
    ("mlp:model", "is not a rule"),
    ("fsdp:tensor", "is not a rule"),
    ("mlp:tensor,mlp:fsdp", "is not a rule"),
    ("batch:data", "leaves the batch whole over data or fsdp"),
  ]:
    with pytest.raises(UsageError, match=message):
      config_lib.parse_axis_rules(bad)
  config = config_lib.defaults()
  config.workload, config.axis_rules = "linear", "mlp:none"
  with pytest.raises(UsageError, match="add --config.parallel=fsdp"):
    config_lib.check(config)
  config.parallel = "fsdp"
  config_lib.check(config)


def test_names_resolve_as_flax_does_and_fall_back_out_loud():
  rules, mesh = config_lib.AXIS_RULES, {"data": 1, "fsdp": 2, "tensor": 4}
  query = sharding.resolve(("embed", "heads", "kv"), (64, 4, 16), rules, mesh, "q")
  assert query.spec == P("fsdp", "tensor") and not query.fallbacks  # kv: tensor already used.
  wide = sharding.resolve(("heads", "kv"), (4, 16), rules, {**mesh, "tensor": 8}, "w")
  assert wide.spec == P(None, "tensor") and wide.fallbacks == [("heads", 4, ("tensor",))]
  assert "do not divide over tensor:8, so they stay whole over tensor in w" in (
    sharding.fallback_line(wide.fallbacks[0], {**mesh, "tensor": 8}, ["w"])
  )
  assert sharding.resolve((None, "fsdp"), (3, 8), rules, mesh, "x").spec == P(None, "fsdp")
  assert sharding.resolve(("length",), (8,), rules, mesh, "p") == sharding.Resolved(P(), [], False)
  with pytest.raises(UsageError, match=r"names dimension 1 'hidden', which config.axis_rules"):
    sharding.resolve(("embed", "hidden"), (64, 256), rules, mesh, "param ['w']")


def run(workdir, arg="tiny", **overrides):
  config = load_config("lm", arg, **{**FOUR_STEPS, **overrides})
  return config, train.run(config, str(workdir)), read_metrics(str(workdir))


@pytest.fixture(scope="module")
def pmap_run(tmp_path_factory):
  """pmap's run of lm tiny, made once."""
  return run(tmp_path_factory.mktemp("pmap"), parallel="pmap")


def shard_shapes(mesh: str) -> dict[str, tuple]:
  """lm tiny's shard shapes per device on `mesh`, by hand from its names: embed / fsdp, heads and
  mlp and vocab / tensor; a param its names leave whole (the MLP bias when tensor is 1) takes
  the default rule (its largest axis / fsdp)."""
  size = dict(part.split(":") for part in mesh.split(","))
  f, t = int(size["fsdp"]), int(size["tensor"])
  block = "['Block_0']"
  return {
    f"{block}['MultiHeadDotProductAttention_0']['query']['kernel']": (64 // f, 4 // t, 16),
    f"{block}['MultiHeadDotProductAttention_0']['out']['kernel']": (4 // t, 16, 64 // f),
    f"{block}['Dense_0']['kernel']": (64 // f, 256 // t),
    f"{block}['Dense_0']['bias']": (256 // t,) if t > 1 else (256 // f,),
    f"{block}['Dense_1']['kernel']": (256 // t, 64 // f),
    f"{block}['LayerNorm_0']['scale']": (64 // f,),
    "['Embed_0']['embedding']": (256 // t, 64 // f),
    "['positions']": (64, 64 // f),
  }


def check_shards(state, mesh):
  """Every param and its AdamW moments on each device as `shard_shapes` says."""
  params = dict(
    (jax.tree_util.keystr(path), x) for path, x in jax.tree_util.tree_leaves_with_path(state.params)
  )
  moments = state.opt_state[1][0]  # clip_by_global_norm, then adamw's ScaleByAdamState.
  for where, expected in shard_shapes(mesh).items():
    assert {s.data.shape for s in params[where].addressable_shards} == {expected}, where
    for moment in (moments.mu, moments.nu):
      leaf = dict(
        (jax.tree_util.keystr(path), x) for path, x in jax.tree_util.tree_leaves_with_path(moment)
      )[where]
      assert leaf.sharding == params[where].sharding, where


# data:1,fsdp:2,tensor:4 runs on 2 processes x 4 devices below, and opens and ends the restores.
# On data:2,fsdp:1,tensor:4 each device holds 64 / 2 = 32 rows (a tensor group the same ones),
# so 16 microbatches of 2 rows: accumulation changes the sums' order, not the losses.
MESHES = [("data:2,fsdp:1,tensor:4", 16), ("data:2,fsdp:2,tensor:2", 1)]


@pytest.mark.slow
@pytest.mark.parametrize("mesh, grad_accum_steps", MESHES)
def test_lm_on_a_tensor_mesh_gives_pmaps_losses_split_as_named(
  mesh, grad_accum_steps, pmap_run, tmp_path, caplog
):
  config, pmap_state, pmap_rows = pmap_run
  with caplog.at_level(logging.INFO):
    _, state, rows = run(tmp_path, parallel="fsdp", mesh=mesh, grad_accum_steps=grad_accum_steps)
  tensor = int(mesh.rsplit(":", 1)[1])
  assert (
    f"global batch 64 = 1 process(es) x 8 devices / tensor:{tensor} x {64 * tensor // 8} per "
    "device (a tensor group holds the same rows)" in caplog.text
  )
  for key in ("loss", "grad_norm", "eval_loss"):
    assert [r[key] for r in rows if key in r] == pytest.approx(
      [r[key] for r in pmap_rows if key in r], rel=1e-4
    ), key
  assert_close(config, state.params, pmap_state.params)
  check_shards(state, mesh)
  assert int(state.step) == 4


@pytest.mark.slow
def test_a_skipped_step_on_a_tensor_mesh_is_skipped_as_under_pmap(tmp_path, caplog):
  # The hooked classifier (unannotated: the default rule, and a warning that tensor only copies)
  # with an all-NaN batch 2: one real skipped step under each executor.
  runs = {}
  for name, overrides in (
    ("pmap", {"parallel": "pmap"}),
    ("tensor", {"parallel": "fsdp", "mesh": "data:2,fsdp:2,tensor:2"}),
  ):
    config = load_config(
      "../tests/hooked_config", **FOUR_STEPS, nan_at_batch=2, skip_nonfinite_steps=True, **overrides
    )
    with caplog.at_level(logging.WARNING):
      state = train.run(config, str(tmp_path / name))
    runs[name] = state, read_metrics(str(tmp_path / name))
  assert int(runs["pmap"][0].skipped_steps) == int(runs["tensor"][0].skipped_steps) == 1
  assert [r["loss"] for r in runs["tensor"][1] if "loss" in r] == pytest.approx(
    [r["loss"] for r in runs["pmap"][1] if "loss" in r], rel=1e-4
  )
  assert_close(config, runs["tensor"][0].params, runs["pmap"][0].params)
  assert "the workload names no param dimensions (no partition())" in caplog.text
  assert "tensor:2 holds copies that repeat the same work" in caplog.text


@pytest.mark.slow
def test_a_run_continues_across_meshes_with_every_step_feature(tmp_path):
  # tensor:4 -> fsdp:8 -> pmap -> tensor:4, one call of K=2 steps each, with 2 microbatches,
  # bfloat16, scanned blocks and skip_nonfinite_steps, against one uninterrupted pmap run.
  common = {**FOUR_STEPS, **VARIANT, "num_steps": 8, "checkpoint_every_steps": 2}
  _, straight, _ = run(tmp_path / "straight", parallel="pmap", **common)
  stages = [
    {"parallel": "fsdp", "mesh": "data:1,fsdp:2,tensor:4"},
    {"parallel": "fsdp", "mesh": "data:1,fsdp:8"},
    {"parallel": "pmap"},
    {"parallel": "fsdp", "mesh": "data:1,fsdp:2,tensor:4"},
  ]
  for index, executor in enumerate(stages):
    config, state, _ = run(tmp_path / "run", **{**common, "num_steps": 2 * (index + 1)}, **executor)
  resumed, uninterrupted = (
    losses_by_step(str(tmp_path / "run")),
    losses_by_step(str(tmp_path / "straight")),
  )
  assert list(resumed) == [2, 4, 6, 8]
  # bfloat16 keeps 8 bits of mantissa: the executors' reduction orders differ (test_fsdp.py).
  assert [resumed[s] for s in resumed] == pytest.approx(
    [uninterrupted[s] for s in resumed], rel=2e-3
  )
  assert_close(config, state.params, straight.params)
  assert int(state.step) == 8 and int(state.skipped_steps) == 0
  query = state.params["blocks"]["Block_0"]["MultiHeadDotProductAttention_0"]["query"]["kernel"]
  assert query.shape == (2, 64, 4, 16)  # Scanned: a `layers` dimension first, left whole.
  assert {s.data.shape for s in query.addressable_shards} == {(2, 32, 1, 16)}
  mu = state.opt_state[1][0].mu["blocks"]["Block_0"]["MultiHeadDotProductAttention_0"]["query"]
  assert mu["kernel"].sharding == query.sharding


def test_the_start_up_line_counts_the_split_and_idle_rules_are_one_line(caplog):
  config = load_config("lm", "tiny", parallel="fsdp", mesh="data:1,fsdp:2,tensor:4")
  workload = workload_lib.load("lm")
  executor = train._build(config, workload)[0]  # pylint: disable=protected-access
  assert executor.describe() == (
    f"fsdp on a data:1 x fsdp:2 x tensor:4 mesh, each fsdp group within 1 process(es); {TINY_SPLIT}"
  )
  config.axis_rules = "mlp:tensor,experts:tensor,heads:fsdp+tensor"
  with caplog.at_level(logging.WARNING):
    lowered_train_call(config)  # Traces the step: the activations' names are known after it.
  lines = [r.getMessage() for r in caplog.records if "axis_rules maps" in r.getMessage()]
  assert len(lines) == 1 and lines[0].startswith("sharding: config.axis_rules maps experts, ")
  # heads over fsdp x tensor: the q, k, v kernels [embed, heads, kv] give embed fsdp first, so
  # heads takes tensor (4 / 4); the out kernel [heads, kv, embed] would split 4 heads 8 ways: one
  # line for both blocks, heads on fsdp alone, and kv takes tensor.
  with caplog.at_level(logging.WARNING):
    caplog.clear()
    executor = train._build(config, workload)[0]  # pylint: disable=protected-access
  lines = [r.getMessage() for r in caplog.records if "do not divide" in r.getMessage()]
  assert lines == [
    "sharding: 'heads' dimensions of size 4 do not divide over tensor:4, so they stay whole "
    "over tensor in ['Block_0']['MultiHeadDotProductAttention_0']['out']['kernel'], "
    "['Block_1']['MultiHeadDotProductAttention_0']['out']['kernel']: pick a mesh whose tensor "
    "size divides 4, or map 'heads' elsewhere in config.axis_rules"
  ]
  attention = executor.state_shardings.params["Block_0"]["MultiHeadDotProductAttention_0"]
  assert attention["out"]["kernel"].spec == P("fsdp", "tensor")
  assert attention["key"]["kernel"].spec == P("fsdp", "tensor")


def test_a_param_name_no_rule_maps_is_refused_before_any_compute():
  config = load_config("lm", "tiny", parallel="fsdp", mesh="data:1,fsdp:2,tensor:4")
  workload = workload_lib.load("lm")
  state_like = train._build(config, workload)[4]  # pylint: disable=protected-access

  def partition(params):
    return jax.tree.map(lambda x: ("hidden",) * np.ndim(x), params)

  with pytest.raises(UsageError, match=r"param \['Block_0'\].* names dimension 0 'hidden'"):
    parallel.executor("fsdp", state_like, mesh="data:1,fsdp:2,tensor:4", partition=partition)


def lm_state_like(mesh: str):
  """lm tiny's config on `mesh`, its workload and its train state's shapes (nothing computed)."""
  config = load_config("lm", "tiny", parallel="fsdp", mesh=mesh)
  workload = workload_lib.load("lm")
  return config, workload, train._build(config, workload)[4]  # pylint: disable=protected-access


def test_a_partition_tree_unlike_the_params_is_one_line_before_any_compute():
  config, workload, state_like = lm_state_like("data:1,fsdp:2,tensor:4")
  names = workload.partition(config, state_like.params)
  without_bias = {**names, "Block_0": {**names["Block_0"], "Dense_0": {"kernel": ("embed", "mlp")}}}
  returns = r"the workload's partition\(config, params\) "
  for returned, says in [
    (without_bias, returns + r"has no entry for param \['Block_0'\]\['Dense_0'\]\['bias'\]: "),
    ({**names, "w3": ("mlp",)}, returns + r"has entries for \['w3'\], which are not params: "),
    (None, returns + "returned None: "),
    ({**names, "positions": "embed"}, r"param \['positions'\]: names 'embed' is one string"),
  ]:
    with pytest.raises(UsageError, match="^" + says):
      parallel.executor(
        "fsdp", state_like, mesh="data:1,fsdp:2,tensor:4", partition=lambda _, r=returned: r
      )


def test_a_tensor_axis_no_param_is_split_over_is_one_warning(caplog):
  config, workload, state_like = lm_state_like("data:1,fsdp:1,tensor:8")

  def none_named(params):
    return jax.tree.map(lambda _: None, params)

  def embed_only(params):
    return jax.tree.map(lambda x: ("embed",) + (None,) * (np.ndim(x) - 1), params)

  lm_names = functools.partial(workload.partition, config)
  for partition, rules, warned in [
    (none_named, "", "names no param dimension that config.axis_rules maps to tensor"),
    (embed_only, "", "names no param dimension that config.axis_rules maps to tensor"),
    (None, "", "names no param dimensions (no partition())"),
    (lm_names, "", None),
    (none_named, "batch:data+fsdp+tensor", None),  # The batch is split over tensor: no copies.
  ]:
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      parallel.executor(
        "fsdp", state_like, mesh="data:1,fsdp:1,tensor:8", partition=partition, axis_rules=rules
      )
    lines = [r.getMessage() for r in caplog.records if "repeat the same work" in r.getMessage()]
    assert lines == (
      []
      if warned is None
      else [
        f"sharding: the workload {warned}, so each param is split over fsdp alone and tensor:8 "
        "holds copies that repeat the same work: name them (docs/sharding.md) or leave tensor out "
        "of config.mesh"
      ]
    )


def test_a_mesh_axis_that_does_not_divide_is_told_to_rename_the_dimension():
  mesh = {"data": 1, "fsdp": 2, "tensor": 4}
  named = sharding.resolve(P("tensor", "fsdp"), (32, 1), config_lib.AXIS_RULES, mesh, "w2")
  assert named.spec == P("tensor") and named.fallbacks == [("fsdp", 1, ("fsdp",))]
  assert sharding.fallback_line(named.fallbacks[0], mesh, ["['w2']"]) == (
    "sharding: 'fsdp' dimensions of size 1 do not divide over fsdp:2, so they stay whole over "
    "fsdp in ['w2']: pick a mesh whose fsdp size divides 1, or in partition() name that "
    "dimension None (whole) or by a logical name"
  )
  logical = sharding.resolve(("heads",), (4,), config_lib.AXIS_RULES, {**mesh, "tensor": 8}, "o")
  assert sharding.fallback_line(logical.fallbacks[0], {**mesh, "tensor": 8}, ["o"]).endswith(
    "pick a mesh whose tensor size divides 4, or map 'heads' elsewhere in config.axis_rules"
  )


def test_the_batch_divides_over_the_devices_that_split_it_not_the_tensor_copies():
  # 2 processes x 4 devices on data:1,fsdp:2,tensor:4: 2 devices split a batch, each row on 4.
  def copies(mesh, rules=""):
    config = load_config("lm", "tiny", parallel="fsdp", mesh=mesh, axis_rules=rules)
    return config_lib.batch_copies(config, 2, 4)

  assert copies("data:1,fsdp:2,tensor:4") == 4 and copies("data:2,fsdp:2,tensor:2") == 2
  assert copies("data:1,fsdp:2,tensor:4", "batch:data+fsdp+tensor") == 1
  assert copies("data:2,fsdp:4") == 1 and copies("") == 1
  assert config_lib.batch_copies(load_config("lm", "tiny", parallel="pmap"), 2, 4) == 1
  layout = config_lib.layout(64, 1, 2, 4, grad_accum_steps=16, batch_copies=4)
  assert (layout.host_batch_size, layout.per_device_batch_size) == (
    32,
    32,
  )  # 64 rows over data x fsdp = 2.
  assert layout.describe() == (
    "global batch 64 = 2 process(es) x 4 devices / tensor:4 x 32 per device (a tensor group "
    "holds the same rows)"
  )
  assert config_lib.layout(4, 0, 1, 8, batch_copies=8).per_device_batch_size == 4
  assert config_lib.layout(64, 0, 1, 8).describe() == (
    "global batch 64 = 1 process(es) x 8 devices x 8 per device"
  )
  with pytest.raises(
    UsageError,
    match=r"^config.batch_size=3 does not divide over 2 devices \("
    r"1 process\(es\) x 8 local devices / tensor:4: a tensor group holds the same rows\): "
    r"use a multiple of 2, e.g. 2 or 4$",
  ):
    config_lib.layout(3, 0, 1, 8, batch_copies=4)
  with pytest.raises(
    UsageError, match=r"grad_accum_steps=64 does not divide the per-device batch of 32"
  ):
    config_lib.layout(64, 0, 1, 8, grad_accum_steps=64, batch_copies=4)


@pytest.mark.slow
def test_two_processes_on_a_data_fsdp_tensor_mesh_give_pmaps_results(pmap_run, tmp_path):
  # fsdp spans the two processes, each tensor group stays inside one.
  workdir, log = tmp_path / "2x4", tmp_path / "2x4.log"
  job_log = run_lm_tiny_job_on_mesh(workdir, log, "data:1,fsdp:2,tensor:4")
  assert (
    f"fsdp on a data:1 x fsdp:2 x tensor:4 mesh, each fsdp group within 2 process(es); "
    f"{TINY_SPLIT}" in job_log
  )
  # 64 rows over data x fsdp = 2 devices: 32 on each, a tensor group holding the same ones.
  assert "global batch 64 = 2 process(es) x 4 devices / tensor:4 x 32 per device" in job_log
  rows = assert_same_run(pmap_run, workdir)
  # By hand from shard_shapes: 16,384 / 8 (embedding) + 4,096 / 2 (positions) + 256 / 2 (final
  # norm) + per block 4 x 4,096 / 8 + 2 x 16,384 / 8 + 256 / 4 + 64 / 2 + 4 x 64 / 2 = 6,368
  # params, 12 bytes each with AdamW's two moments, plus the step, rng and counters.
  params_per_device = 2048 + 2048 + 64 + 2 * 6368
  assert rows[0]["state_bytes_per_device"] == pytest.approx(12 * params_per_device, rel=0.01)


@pytest.mark.slow
def test_a_tensor_group_across_processes_is_one_line_and_exit_2(tmp_path):
  log = tmp_path / "2x4.log"
  process = start(
    launcher_command(
      "--config=configs/lm.py:tiny",
      f"--workdir={tmp_path / 'run'}",
      "--config.parallel=fsdp",
      "--config.mesh=data:1,fsdp:1,tensor:8",
      num_processes=2,
      devices=4,
    ),
    str(log),
    devices=4,
  )
  assert finish(process, 120) == 2
  text = open(log).read()
  line = (
    "error: config.mesh='data:1,fsdp:1,tensor:8': tensor:8 would span processes (each has 4 "
    "devices), and a tensor group's collectives run in every layer: use a tensor size that "
    "divides 4 (1, 2, 4)"
  )
  assert f"[process 0] {line}" in text and f"[process 1] {line}" in text
  assert "Traceback" not in text and not (tmp_path / "run" / "checkpoints").exists()
