"""What several tests share: configs, processes, saved params, float comparisons."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, arg: str | None = None, **overrides):
  """configs/NAME.py's get_config(ARG) with keys overridden, as `--config.KEY=VALUE` would."""
  spec = importlib.util.spec_from_file_location(
    f"config_{name}", os.path.join(REPO, "configs", f"{name}.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  config.update(overrides)
  return config


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def run_launcher(*args, env=None, timeout=300, devices=8):
  """`python -m launcher ARGS` in a subprocess, bounded in time; returns the CompletedProcess."""
  full_env = {
    **os.environ,
    "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    **(env or {}),
  }
  return subprocess.run(
    [sys.executable, "-m", "launcher", *args],
    cwd=REPO,
    env=full_env,
    capture_output=True,
    text=True,
    timeout=timeout,
    check=False,
  )


def losses_by_step(workdir: str) -> dict[int, float]:
  """The train loss of each reported step; a step reported twice (re-done after a kill) keeps
  its last report."""
  return {row["step"]: row["loss"] for row in read_metrics(workdir) if "loss" in row}


def launcher_command(*args, num_processes=1, devices=8, grace=20) -> list[str]:
  """`python -m launcher ARGS`, or N processes of it through `python -m launcher.local`."""
  if num_processes == 1:
    return [sys.executable, "-m", "launcher", *args]
  return [
    sys.executable,
    "-m",
    "launcher.local",
    f"--num_processes={num_processes}",
    f"--devices_per_process={devices}",
    f"--grace_seconds={grace}",
    "--",
    *args,
  ]


def start(command: list[str], log_path: str, devices: int = 8, env=None) -> subprocess.Popen:
  """Starts a command in its own process group, output to `log_path`; the caller ends it."""
  full_env = {
    **os.environ,
    "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    **(env or {}),
  }
  with open(log_path, "ab") as log:
    return subprocess.Popen(
      command, cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def finish(process: subprocess.Popen, timeout: float) -> int:
  """Waits for a started process; past `timeout` kills its whole group and fails the test."""
  try:
    return process.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    raise AssertionError(f"{process.args} did not finish within {timeout} s") from None


def children(pid: int) -> list[int]:
  """The process ids of `pid`'s children."""
  with open(f"/proc/{pid}/task/{pid}/children") as f:
    return [int(child) for child in f.read().split()]


def wait_for(
  predicate,
  timeout: float,
  what: str,
  process: subprocess.Popen | None = None,
  interval: float = 0.01,
):
  """Polls `predicate` every `interval` seconds; fails the test after `timeout` or if `process`
  ended first."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    value = predicate()
    if value:
      return value
    if process is not None and process.poll() is not None:
      raise AssertionError(f"the run ended (rc {process.returncode}) before {what}")
    time.sleep(interval)
  raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def runnable_block(page: str, name: str) -> str:
  """The code block after `<!-- runnable: name -->` in `page` (README.md or docs/*.md)."""
  with open(os.path.join(REPO, page)) as f:
    text = f.read()
  return (
    text.split(f"<!-- runnable: {name} -->")[1].split("```", 1)[1].split("\n", 1)[1].split("```")[0]
  )


def load_params(workdir: str, step: int | None = None):
  """A run's saved params, read by executing docs/checkpoints.md's plain-orbax lines verbatim."""
  snippet = runnable_block("docs/checkpoints.md", "load-params")
  if step is None:
    step = max(
      int(name) for name in os.listdir(os.path.join(workdir, "checkpoints")) if name.isdigit()
    )
  namespace = {}
  exec(
    snippet.replace("/tmp/run/checkpoints/300", os.path.join(workdir, "checkpoints", str(step))),  # pylint: disable=exec-used
    namespace,
  )
  return namespace["params"]


# SGD maps gradients linearly, so float reduction order alone separates the two sides. Adam's
# first steps are about lr * sign(g): where a gradient entry is ~1e-8, rounding noise in it can
# move that entry's update anywhere within +-lr. So under adamw nearly every entry must agree
# tightly and none may be off by more than the learning rate.
def assert_close(config, actual, expected):
  """Params equal up to float reduction order (see above) under `config.optimizer`."""
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected)):
    a, b, where = np.asarray(a), np.asarray(b), jax.tree_util.keystr(path)
    if config.optimizer == "sgd":
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6, err_msg=where)
    else:
      off = ~np.isclose(a, b, rtol=2e-5, atol=2e-6)
      # In bfloat16 the executors' different reduction orders round differently, and Adam turns
      # any difference in a tiny gradient into up to +-lr a step: only that bound holds.
      if config.compute_dtype == "float32":
        assert off.mean() <= 1e-3, f"{where}: {off.sum()} of {off.size} entries differ"
        np.testing.assert_allclose(a, b, rtol=0, atol=config.learning_rate, err_msg=where)
      else:
        np.testing.assert_allclose(
          a, b, rtol=0, atol=config.learning_rate * config.num_steps, err_msg=where
        )


# Four steps, a report each and one eval: the runs that the executors and layouts are compared by.
FOUR_STEPS = {
  "num_steps": 4,
  "log_every_steps": 1,
  "eval_every_steps": 4,
  "eval_batches": 2,
  "schedule": "constant",
  "checkpoint_every_steps": 0,
}


def run_lm_tiny_job_on_mesh(workdir, log, mesh: str) -> str:
  """configs/lm.py:tiny for FOUR_STEPS under parallel=fsdp on `mesh`, as 2 processes of 4
  devices; the job's log (it must exit 0)."""
  process = start(
    launcher_command(
      "--config=configs/lm.py:tiny",
      f"--workdir={workdir}",
      "--config.parallel=fsdp",
      f"--config.mesh={mesh}",
      *(f"--config.{key}={value}" for key, value in FOUR_STEPS.items()),
      num_processes=2,
      devices=4,
    ),
    str(log),
    devices=4,
  )
  assert finish(process, 240) == 0, open(log).read()[-3000:]
  return open(log).read()


def assert_same_run(reference, workdir) -> list[dict]:
  """The run in `workdir` reported the loss, grad_norm and eval_loss of `reference` (its config,
  final state and metrics rows) and ended on its params; its rows."""
  config, state, reference_rows = reference
  rows = read_metrics(str(workdir))
  for key in ("loss", "grad_norm", "eval_loss"):
    np.testing.assert_allclose(
      [r[key] for r in rows if key in r],
      [r[key] for r in reference_rows if key in r],
      rtol=1e-4,
      err_msg=key,
    )
  assert_close(config, load_params(str(workdir)), state.params)
  return rows


def lowered_train_call(config):
  """The train call of `config` (one step per call) lowered for its first batch, as train.run
  builds it, with nothing computed: `.as_text()` is its StableHLO, `.compile()` its program."""
  from launcher import config as config_lib  # pylint: disable=import-outside-toplevel
  from launcher import optimizer, step, train  # pylint: disable=import-outside-toplevel
  from launcher import workload as workload_lib  # pylint: disable=import-outside-toplevel

  workload = workload_lib.load(config.workload)
  executor, loss_fn, tx, _, state = train._build(config, workload)  # pylint: disable=protected-access
  batch = next(workload_lib.open_dataset(workload, config, "train", 0, 1))
  metric_names = workload_lib.check_loss_output(
    workload, jax.eval_shape(loss_fn, state.params, batch, None)
  )
  metric_set = step.MetricSet([*step.TRAIN_METRICS, *metric_names])
  call = executor.map_train(
    steps_per_call=1,
    metric_set=metric_set,
    loss_fn=loss_fn,
    tx=tx,
    schedule=optimizer.schedule(config),
    grad_accum_steps=1,
    compute_dtype=config_lib.compute_dtype(config),
    skip_nonfinite=False,
  )
  return call.lower(
    executor.run_shapes(state),
    executor.to_devices(metric_set.zeros),
    executor.batch_to_devices(batch),
  )


def wait_for_http(url: str, process: subprocess.Popen, timeout: float, what: str) -> None:
  """Polls `url` until it answers; a RuntimeError when it does not within `timeout` or when
  `process` (the server the tests started; the caller stops it) ended first."""
  import urllib.request  # pylint: disable=import-outside-toplevel

  deadline = time.monotonic() + timeout
  while True:
    try:
      urllib.request.urlopen(url, timeout=1).read()
      return
    except OSError:
      if time.monotonic() > deadline or process.poll() is not None:
        raise RuntimeError(f"{what} did not start") from None
      time.sleep(0.1)


def run_at_first_report(tmp_path, *args, num_processes=1, devices=8, runner_flags=()):
  """tests/hooked_config.py with `args` (through `launcher.local` with its `runner_flags` when
  `num_processes` > 1), started and waited for until its first report: (process, workdir, log)."""
  workdir, log = tmp_path / "run", tmp_path / "run.log"
  command = launcher_command(
    "--config=tests/hooked_config.py",
    f"--workdir={workdir}",
    *args,
    num_processes=num_processes,
    devices=devices,
  )
  process = start([*command[:3], *runner_flags, *command[3:]], str(log), devices=devices)
  wait_for(
    lambda: (workdir / "metrics.jsonl").exists() and read_metrics(str(workdir)),
    120,
    "the first report",
    process,
  )
  return process, workdir, log
