"""Every mistake in a config key, a flag, a config file or a workload is one clear line, before any
compute, with nothing of the run written. Generated over every key and flag, not case by case."""

import concurrent.futures
import re
import subprocess
import sys
import textwrap

import ml_collections
import pytest

from launcher import config as config_lib
from launcher import train
from launcher.errors import EXIT_USAGE, UsageError, WorkloadError
from tests.helpers import REPO, load_config, run_launcher

# A value of the wrong type for each type of default, and one out of range for each ranged key.
WRONG_TYPE = {int: "12", float: "fast", str: 3, bool: "yes"}
OUT_OF_RANGE = {
  "batch_size": 0,
  "num_steps": -5,
  "steps_per_call": 0,
  "max_calls_in_flight": 0,
  "grad_accum_steps": 0,
  "log_every_steps": 0,
  "keep_checkpoints": 0,
  "eval_every_steps": -1,
  "eval_batches": -1,
  "warmup_steps": -1,
  "profile_first_step": -1,
  "checkpoint_every_steps": -10,
  "local_checkpoint_dir": "/dev/shm/launcher",  # Without local_checkpoint_every_steps.
  "local_checkpoint_every_steps": -5,
  "learning_rate": 0.0,
  "momentum": 1.5,
  "weight_decay": -0.1,
  "grad_clip_norm": -1.0,
  "seed": -1,
  "optimizer": "lion",
  "schedule": "linear",
  "parallel": "tensor",
  "compute_dtype": "int8",
  "workload": "",
  "mesh": "data:2,model:4",
  "axis_rules": "mlp:model",
  "data_workers": -1,
  "trackers": "tensorboard,comet",
}
ANY_VALUE_OK = {
  "compilation_cache_dir",
  "restore_from",
  "restore_params_only",
  "skip_nonfinite_steps",
  "experiment",
  "allow_data_change",
}


def test_every_launcher_key_is_ranged_or_free():
  assert set(OUT_OF_RANGE) | ANY_VALUE_OK == set(config_lib.KEYS)


@pytest.mark.parametrize("key", sorted(config_lib.KEYS))
def test_every_key_of_the_wrong_type_is_named(key):
  config = ml_collections.ConfigDict(
    {**config_lib.defaults().to_dict(), "workload": "linear"}, type_safe=False
  )
  config[key] = WRONG_TYPE[type(config_lib.KEYS[key][0])]
  with pytest.raises(UsageError, match=rf"^config\.{key}=.* must be an? "):
    config_lib.check(config)


@pytest.mark.parametrize("key", sorted(OUT_OF_RANGE))
def test_every_ranged_key_out_of_range_is_named(key):
  config = config_lib.defaults()
  config.workload = "linear"
  config[key] = OUT_OF_RANGE[key]
  with pytest.raises(UsageError, match=rf"^config\.{key}[=\s]") as raised:
    config_lib.check(config)
  assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
  "key",
  [
    "num_steps",
    "log_every_steps",
    "eval_every_steps",
    "checkpoint_every_steps",
    "local_checkpoint_every_steps",
    "warmup_steps",
    "profile_first_step",
  ],
)
def test_a_step_count_past_the_int32_step_counter_is_named(key):
  config = config_lib.defaults()
  config.update(
    workload="linear", num_steps=config_lib.MAX_STEPS, local_checkpoint_dir="/dev/shm/x"
  )
  config.local_checkpoint_every_steps = 100
  config[key] = 2**64
  with pytest.raises(UsageError, match=rf"^config\.{key}={2**64} is more steps than a run counts"):
    config_lib.check(config)
  config[key] = config_lib.MAX_STEPS
  config_lib.check(config)


def test_steps_per_call_beyond_num_steps_says_at_most_num_steps():
  config = config_lib.defaults()
  config.update(workload="linear", num_steps=7, steps_per_call=10**20)
  with pytest.raises(UsageError, match=r"^config\.steps_per_call=.* use at most 7 \(or auto\)$"):
    config_lib.check(config)


# Every flag of the launcher with a bad value, and the config file mistakes: all run at once (each
# is a process that stops before importing jax, or right after).
BAD_COMMANDS = {
  "config file missing": (["--config=configs/nope.py"], "there is no file 'configs/nope.py'"),
  "config file syntax": (["--config={tmp}/syntax.py"], "line 1: invalid syntax"),
  "config variant unknown": (
    ["--config=configs/lm.py:huge"],
    "get_config raised ValueError: unknown lm size 'huge'",
  ),
  "config file import": (["--config={tmp}/imports.py"], "No module named 'no_such_module'"),
  "config file without get_config": (["--config={tmp}/empty.py"], "defines no get_config()"),
  "config key unknown": (
    ["--config=configs/linear.py", "--config.learning_rte=1"],
    "the config has no key 'learning_rte' (did you mean learning_rate?)",
  ),
  "config value unparsable": (
    ["--config=configs/linear.py", "--config.num_steps=many"],
    "--config.num_steps=many",
  ),
  "config missing": ([], "--config is required"),
  "workdir missing": (["--config=configs/linear.py", "--workdir="], "--workdir is required"),
  "workdir is a file": (["--config=configs/linear.py", "--workdir={tmp}/a_file"], "a_file"),
  "workdir under a file": (["--config=configs/linear.py", "--workdir={tmp}/a_file/run"], "a_file"),
  "unknown flag": (
    ["--config=configs/linear.py", "--learning_rate=1"],
    "Unknown command line flag 'learning_rate'",
  ),
  "unknown flag that is a config key": (
    ["--config=configs/lm.py:tiny", "--num_steps=100"],
    "Unknown command line flag 'num_steps': did you mean --config.num_steps=100?",
  ),
  "stray argument": (["--config=configs/linear.py", "train"], "unexpected arguments: train"),
  "coordinator_address": (
    [
      "--config=configs/linear.py",
      "--coordinator_address=node1",
      "--num_processes=2",
      "--process_id=0",
    ],
    "--coordinator_address='node1' is not host:port",
  ),
  "num_processes": (
    ["--config=configs/linear.py", "--num_processes=0"],
    "--num_processes=0: 0 is not a positive integer",
  ),
  "process_id": (
    [
      "--config=configs/linear.py",
      "--coordinator_address=127.0.0.1:1",
      "--num_processes=2",
      "--process_id=2",
    ],
    "--process_id counts from 0",
  ),
  "local_device_ids": (
    ["--config=configs/linear.py", "--local_device_ids=a,b"],
    "--local_device_ids",
  ),
  "local_device_ids twice": (
    ["--config=configs/linear.py", "--local_device_ids=0,0"],
    "--local_device_ids names a device twice",
  ),
  "local_device_ids alone": (
    ["--config=configs/linear.py", "--local_device_ids=0,99"],
    "--local_device_ids=0,99 is for a process of a multi-process job",
  ),
  "config returns None": (
    ["--config={tmp}/none.py"],
    "none.py: get_config() returned a NoneType; it must return an ml_collections.ConfigDict",
  ),
  "config returns a dict": (["--config={tmp}/dict.py"], "dict.py: get_config() returned a dict"),
  "lm text shorter than a window": (
    ["--config=configs/lm.py:tiny", "--config.text_file={tmp}/short.txt"],
    "config.text_file=",
  ),
  "compilation cache unusable": (
    ["--config=configs/linear.py", "--config.compilation_cache_dir={tmp}/a_file/cache"],
    "config.compilation_cache_dir=",
  ),
  "one_process_per": (["--config=configs/linear.py", "--one_process_per=gpu"], "--one_process_per"),
  "initialization_timeout": (
    ["--config=configs/linear.py", "--initialization_timeout=0"],
    "--initialization_timeout=0",
  ),
  "heartbeat_timeout_seconds": (
    ["--config=configs/linear.py", "--heartbeat_timeout_seconds=-1"],
    "--heartbeat_timeout_seconds=-1",
  ),
  "peer_timeout_seconds": (
    ["--config=configs/linear.py", "--peer_timeout_seconds=1"],
    "--peer_timeout_seconds=1",
  ),
  "step_timeout_seconds": (
    ["--config=configs/linear.py", "--step_timeout_seconds=-1"],
    "--step_timeout_seconds=-1",
  ),
  "storage_timeout_seconds": (
    ["--config=configs/linear.py", "--storage_timeout_seconds=0"],
    "--storage_timeout_seconds=0",
  ),
  "lm corpus without files": (
    ["--config=configs/lm.py:tiny", "--config.data={tmp}/a_file"],
    "no Parquet (*.parquet) or ArrayRecord (*.array_record*) files",
  ),
  "show_config": (["--config=configs/linear.py", "--show_config=maybe"], "--show_config"),
  "workdir bucket": (["--config=configs/linear.py", "--workdir=gs://Bad_Bucket/run"], "Bad_Bucket"),
}
LAUNCHER_FLAGS = {
  "config",
  "workdir",
  "show_config",
  "coordinator_address",
  "num_processes",
  "process_id",
  "local_device_ids",
  "one_process_per",
  "initialization_timeout",
  "heartbeat_timeout_seconds",
  "peer_timeout_seconds",
  "step_timeout_seconds",
  "storage_timeout_seconds",
}


def test_help_lists_every_launcher_flag_and_the_catalogue_covers_them():
  result = subprocess.run(
    [sys.executable, "-m", "launcher", "--help"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=60,
    check=False,
  )
  assert result.returncode == 0 and "--show_config" in result.stdout
  listed = set(re.findall(r"^  --(?:\[no\])?(\w+)", result.stdout, re.MULTILINE))
  assert listed == LAUNCHER_FLAGS
  assert LAUNCHER_FLAGS <= {name.split(" ")[0] for name in BAD_COMMANDS} | {"config", "workdir"}


@pytest.mark.slow
def test_every_bad_flag_or_config_file_is_one_line_and_writes_nothing(tmp_path):
  (tmp_path / "syntax.py").write_text("def get_config(:\n")
  (tmp_path / "imports.py").write_text("import no_such_module\n\ndef get_config():\n  pass\n")
  (tmp_path / "empty.py").write_text("x = 1\n")
  (tmp_path / "short.txt").write_text("too short to train on\n")
  (tmp_path / "none.py").write_text("def get_config():\n  return None\n")
  (tmp_path / "dict.py").write_text("def get_config():\n  return {'workload': 'linear'}\n")
  (tmp_path / "a_file").write_text("not a directory\n")

  def attempt(name):
    args, expected = BAD_COMMANDS[name]
    args = [arg.format(tmp=tmp_path) for arg in args]
    if not any(arg.startswith("--workdir") for arg in args):
      args.append(f"--workdir={tmp_path / name.replace(' ', '_')}")
    return name, expected, run_launcher(*args, timeout=120)

  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    results = list(pool.map(attempt, BAD_COMMANDS))
  for name, expected, result in results:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == EXIT_USAGE, (name, result.stderr[-2000:])
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == lines[-1:] and "Traceback" not in result.stderr, (name, result.stderr[-2000:])
    assert expected in errors[0], (name, errors[0])
    workdir = tmp_path / name.replace(" ", "_")
    # A workload's own check runs once the workdir is known to be shared; a fresh workdir that
    # this start made is taken back with its token.
    assert not workdir.exists(), (name, [str(p) for p in workdir.rglob("*")])


GOOD_WORKLOAD = {
  "imports": "import jax.numpy as jnp\nimport numpy as np\n",
  "init": """
        def init(config, rng):
          return {"w": jnp.zeros((3,), jnp.float32)}
        """,
  "loss": """
        def loss(config, params, batch, rng):
          error = batch["x"] @ params["w"] - batch["y"]
          return jnp.mean(error ** 2), {"error": jnp.mean(jnp.abs(error))}
        """,
  "dataset": """
        def dataset(config, split, process_index, process_count, start=0):
          rows = config.batch_size // process_count
          for t in range(start, 10**9 if split == "train" else start + 2):
            x = np.random.default_rng(t).normal(size=(config.batch_size, 3)).astype(np.float32)
            x = x[process_index * rows:(process_index + 1) * rows]
            yield {"x": x, "y": x.sum(axis=1)}
        """,
}

# Each mistake: the part of the good workload it replaces, and what the error line must say.
WORKLOAD_MISTAKES = {
  "no dataset": ({"dataset": ""}, "does not define dataset"),
  "loss without rng": (
    {
      "loss": """
        def loss(config, params, batch):
          return jnp.mean(batch["x"] @ params["w"]), {}
        """
    },
    "cannot be called as loss(config, params, batch, rng)",
  ),
  "init without config": (
    {
      "init": """
        def init(rng):
          return {"w": jnp.zeros((3,))}
        """
    },
    "cannot be called as init(config, rng)",
  ),
  "batch of the global size": (
    {
      "dataset": """
        def dataset(config, split, process_index, process_count, start=0):
          while True:
            yield {"x": np.zeros((2 * config.batch_size, 3), np.float32),
                   "y": np.zeros((2 * config.batch_size,), np.float32)}
        """
    },
    "yielded 32 rows in 'x', but this process's share of config.batch_size is 16",
  ),
  "batch not a dict": (
    {
      "dataset": """
        def dataset(config, split, process_index, process_count, start=0):
          while True:
            yield np.zeros((config.batch_size, 3), np.float32)
        """
    },
    "yielded a ndarray: a batch is a non-empty dict of numpy arrays",
  ),
  "dataset not an iterator": (
    {
      "dataset": """
        def dataset(config, split, process_index, process_count, start=0):
          return 3
        """
    },
    "returned a int: it must return an iterator",
  ),
  "loss not a scalar": (
    {
      "loss": """
        def loss(config, params, batch, rng):
          return (batch["x"] @ params["w"] - batch["y"]) ** 2, {}
        """
    },
    "the loss has shape (16,)",
  ),
  "metric not a scalar": (
    {
      "loss": """
        def loss(config, params, batch, rng):
          error = batch["x"] @ params["w"] - batch["y"]
          return jnp.mean(error ** 2), {"error": error}
        """
    },
    "metric 'error' has shape (16,)",
  ),
  "loss returns only the loss": (
    {
      "loss": """
        def loss(config, params, batch, rng):
          return jnp.mean(batch["x"] @ params["w"])
        """
    },
    "must return (loss, metrics)",
  ),
  "params not arrays": (
    {
      "init": """
        def init(config, rng):
          return {"w": jnp.zeros((3,)), "name": "linear"}
        """
    },
    "['name'] is a str",
  ),
  "integer params": (
    {
      "init": """
        def init(config, rng):
          return {"w": jnp.zeros((3,), jnp.int32)}
        """
    },
    "['w'] is int32",
  ),
  "train dataset empty": (
    {
      "dataset": """
        def dataset(config, split, process_index, process_count, start=0):
          return iter([])
        """
    },
    "train dataset yielded no batch",
  ),
  "train dataset ends": (
    {"dataset": GOOD_WORKLOAD["dataset"].replace("10**9", "start + 3")},
    "train dataset ended before step 4",
  ),
  "eval dataset empty": (
    {"dataset": GOOD_WORKLOAD["dataset"].replace("start + 2", "start")},
    "eval dataset is empty",
  ),
  "train batch keys change": (
    {
      "dataset": GOOD_WORKLOAD["dataset"].replace(
        'yield {"x": x, "y": x.sum(axis=1)}',
        'yield {"x": x, "y": x.sum(axis=1)} if t < 5 else {"x": x, "target": x.sum(axis=1)}',
      )
    },
    "yielded batch 5 with keys ['target', 'x'], but the first train batch had ['x', 'y']",
  ),
  "train batch dtype changes": (
    {
      "dataset": GOOD_WORKLOAD["dataset"].replace(
        'yield {"x": x,', 'x = x.astype(np.float64) if t == 6 else x\n            yield {"x": x,'
      )
    },
    "yielded batch 6 whose 'x' has rows of shape (3,) and dtype "
    "float64, but the first train batch's had (3,) and float32",
  ),
  "eval batch too big": (
    {
      "dataset": GOOD_WORKLOAD["dataset"].replace(
        'yield {"x": x,',
        'x = np.concatenate([x, x]) if split == "eval" else x\n            yield {"x": x,',
      )
    },
    "share of config.batch_size is at most 16 rows",
  ),
  "DATA_KEYS not names": ({"extra": "DATA_KEYS = 'x'\n"}, "make it a tuple of the names"),
  "DATA_KEYS naming no config key": (
    {"extra": "DATA_KEYS = ('x', 'sequence_length')\n"},
    "DATA_KEYS names sequence_length, which the config does not have",
  ),
}


def _write_workload(directory, name: str, parts: dict[str, str]) -> None:
  source = {**GOOD_WORKLOAD, **parts}
  (directory / f"{name}.py").write_text(
    source["imports"]
    + "".join(textwrap.dedent(source[part]) for part in ("init", "loss", "dataset"))
    + source.get("extra", "")
  )


def _config(workload: str, num_steps: int = 8):
  return load_config(
    "linear",
    workload=workload,
    batch_size=16,
    num_steps=num_steps,
    log_every_steps=4,
    eval_every_steps=4,
    optimizer="sgd",
    learning_rate=0.01,
  )


@pytest.mark.parametrize("mistake", WORKLOAD_MISTAKES)
def test_every_workload_contract_violation_is_one_line(mistake, tmp_path, monkeypatch):
  parts, expected = WORKLOAD_MISTAKES[mistake]
  name = "workload_" + mistake.replace(" ", "_")
  _write_workload(tmp_path, name, parts)
  monkeypatch.syspath_prepend(str(tmp_path))
  workdir = tmp_path / "run"
  with pytest.raises(UsageError) as raised:
    train.run(_config(name), str(workdir))
  message = str(raised.value)
  assert expected in message and "\n" not in message, message
  assert name in message, message
  if mistake not in ("train dataset ends", "train batch keys change", "train batch dtype changes"):
    # Those can only be noticed when they happen.
    assert not workdir.exists(), [str(p) for p in workdir.rglob("*")]


def test_the_good_workload_trains(tmp_path, monkeypatch):
  """The catalogue's reference: without a mistake the same workload runs and learns. A mistake
  found when that run is continued leaves every file of the run where it was."""
  _write_workload(tmp_path, "workload_good", {})
  _write_workload(tmp_path, "workload_eval_empty", WORKLOAD_MISTAKES["eval dataset empty"][0])
  monkeypatch.syspath_prepend(str(tmp_path))
  workdir = tmp_path / "run"
  state = train.run(_config("workload_good").copy_and_resolve_references(), str(workdir))
  assert int(state.step) == 8
  files = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))
  assert {".workdir_token", "config.json", "checkpoints/8"} <= set(files)
  with pytest.raises(UsageError, match="eval dataset is empty"):
    train.run(_config("workload_eval_empty", num_steps=16), str(workdir))
  assert sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*")) == files


@pytest.mark.parametrize(
  "function, code",
  [
    (
      "dataset",
      """
        def dataset(config, split, process_index, process_count, start=0):
          raise FileNotFoundError("/data/shard-0 is gone")
        """,
    ),
    (
      "loss",
      """
        def loss(config, params, batch, rng):
          return jnp.mean(batch["missing"] @ params["w"]), {}
        """,
    ),
    (
      "init",
      """
        def init(config, rng):
          return {"w": jnp.zeros((3,)) + config.no_such_key}
        """,
    ),
  ],
)
def test_an_error_in_the_workloads_own_code_names_the_function(
  function, code, tmp_path, monkeypatch
):
  name = f"workload_raises_in_{function}"
  _write_workload(tmp_path, name, {function: code})
  monkeypatch.syspath_prepend(str(tmp_path))
  with pytest.raises(WorkloadError, match=rf"^workload {name}'s {function}\(") as raised:
    train.run(_config(name), str(tmp_path / "run"))
  assert raised.value.__cause__ is not None  # The user's traceback is kept.


@pytest.mark.slow
def test_a_workload_error_on_the_command_line_is_its_traceback_headed_by_the_call(tmp_path):
  _write_workload(
    tmp_path,
    "workload_broken",
    {
      "dataset": """
      def dataset(config, split, process_index, process_count, start=0):
        raise FileNotFoundError("/data/shard-0 is gone")
      """
    },
  )
  (tmp_path / "broken_config.py").write_text(
    textwrap.dedent("""
      from launcher import config as launcher_config

      def get_config():
        config = launcher_config.defaults()
        config.workload = "workload_broken"
        config.batch_size = 16
        return config
      """)
  )
  result = run_launcher(
    f"--config={tmp_path / 'broken_config.py'}",
    f"--workdir={tmp_path / 'run'}",
    env={"PYTHONPATH": str(tmp_path)},
    timeout=120,
  )
  assert result.returncode == 1
  error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert error_lines == [
    "error: workload workload_broken's dataset(config, 'train', 0, 1) "
    "raised FileNotFoundError: /data/shard-0 is gone; its traceback:"
  ]
  assert "Traceback (most recent call last)" in result.stderr
  assert 'workload_broken.py", line' in result.stderr
