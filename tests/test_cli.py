"""`python -m launcher` as a user runs it: in a subprocess on 8 simulated devices."""

import glob
import json
import os
import re
import socket
import subprocess
import sys
import textwrap

import pytest

from launcher.errors import EXIT_USAGE
from tests.helpers import read_metrics, run_launcher

pytestmark = pytest.mark.slow  # Starts processes or trains for seconds.

RUNS = {
  "linear": ["--config=configs/linear.py", "--config.num_steps=40", "--config.eval_every_steps=40"],
  "classifier": [
    "--config=configs/classifier.py",
    "--config.num_steps=150",
    "--config.eval_every_steps=150",
    "--config.steps_per_call=10",
    "--config.log_every_steps=50",
    "--config.warmup_steps=10",
  ],
  "lm": [
    "--config=configs/lm.py:tiny",
    "--config.num_steps=40",
    "--config.log_every_steps=20",
    "--config.eval_every_steps=40",
    "--config.eval_batches=2",
    "--config.steps_per_call=5",
    "--config.warmup_steps=5",
    "--config.trackers=tensorboard,mlflow",
  ],
}


@pytest.mark.parametrize("name", RUNS)
def test_run_trains_and_reports(name, tmp_path):
  workdir = str(tmp_path / "run")
  result = run_launcher(*RUNS[name], f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  rows = read_metrics(workdir)
  train_rows = [row for row in rows if "loss" in row]
  assert train_rows[-1]["loss"] < 0.8 * train_rows[0]["loss"]
  assert all(row["steps_per_sec"] > 0 and row["data_wait_s"] >= 0 for row in train_rows)
  assert "eval_loss" in rows[-1]
  assert glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["workload"] == name
  # The console: the launcher's own lines only, one per report, ending with where the run is,
  # on stdout (so that `> log` keeps them); nothing on stderr, where warnings and errors go.
  assert result.stderr == "", result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  assert lines[0] == "process 0/1 on vm: 8 local / 8 global devices, platform cpu".replace(
    "vm", socket.gethostname()
  )
  assert re.fullmatch(
    r"time to first step [\d.]+ s \([\d.]+ s since the process started\): "
    r"imports [\d.]+ s, join the job [\d.]+ s, .*compile and first step [\d.]+ s",
    lines[3],
  ), lines[3]
  report_lines = [line for line in lines if line.startswith("step ")]
  assert len(report_lines) == len(train_rows)
  assert report_lines[-1].startswith(f"step {rows[-1]['step']}/{rows[-1]['step']} | loss ")
  assert f"eval_loss {rows[-1]['eval_loss']:.4g}" in report_lines[-1]
  assert "eval_s" not in lines[-1]  # A timing, not an eval metric.
  assert lines[-1].startswith(f"finished {rows[-1]['step']} steps in 0:0") and lines[-1].endswith(
    f"Outputs in {workdir}; see them with: python -m launcher.report {workdir}"
  )
  assert len(lines) == 5 + len(report_lines), "\n".join(lines)
  if name == "classifier":
    assert rows[-1]["eval_accuracy"] > 0.8  # chance is 0.1
  if name == "lm":
    assert train_rows[-1]["tokens_per_sec"] > 0
    again = run_launcher(*RUNS[name], f"--workdir={workdir}")
    assert again.returncode == 0 and again.stderr == "", again.stderr[-3000:]
    assert again.stdout.strip().splitlines()[-1] == (
      f"the run in {workdir} already finished: its checkpoint is at step 40 and "
      "config.num_steps is 40. To train on from it, raise --config.num_steps (e.g. "
      f"--config.num_steps=80); to see it: python -m launcher.report {workdir}; a fresh run "
      "needs another --workdir"
    )


def test_default_in_flight_bound_survives_hundreds_of_steps(tmp_path):
  """Unbounded dispatch of all-reduce steps aborts on this machine within seconds."""
  result = run_launcher(
    "--config=configs/linear.py",
    "--config.num_steps=600",
    "--config.log_every_steps=600",
    "--config.eval_every_steps=0",
    f"--workdir={tmp_path}",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert read_metrics(str(tmp_path))[-1]["step"] == 600


@pytest.mark.parametrize(
  "override, message",
  [
    (
      "--config.batch_size=30",
      "config.batch_size=30 does not divide over 8 devices (1 process(es) x 8 local devices): "
      "use a multiple of 8, e.g. 24 or 32",
    ),
    ("--config.workload=nope", "config.workload='nope' is not a workload"),
    ("--config.num_steps=0", "config.num_steps=0 must be a positive integer"),
    ("--config.num_steps=-5", "config.num_steps=-5 must be a positive integer"),
    ("--config.learning_rate=-0.1", "config.learning_rate=-0.1 must be a positive finite number"),
    ("--config.learning_rate=nan", "config.learning_rate=nan must be a positive finite number"),
    ("--config.learning_rate=fast", "could not convert string to float: 'fast'"),
    ("--config.optimizer=lion", "config.optimizer='lion' is not one of sgd, momentum, adam, adamw"),
    (
      "--config.steps_per_call=3",
      "config.num_steps=200 is not a multiple of "
      "config.steps_per_call=3: steps happen 3 per call, so use 198 or 201",
    ),
  ],
)
def test_bad_config_is_one_clear_message(override, message, tmp_path):
  workdir = tmp_path / "run"
  result = run_launcher("--config=configs/linear.py", f"--workdir={workdir}", override, timeout=120)
  assert result.returncode == EXIT_USAGE
  assert message in result.stderr
  assert "Traceback" not in result.stderr
  assert not (workdir / "metrics.jsonl").exists()


def test_a_users_own_workload_from_pythonpath(tmp_path):
  """A workload module outside this repo, found through PYTHONPATH, needs no launcher change."""
  package = tmp_path / "my_pkg"
  package.mkdir()
  (package / "__init__.py").write_text("")
  (package / "my_workload.py").write_text(
    textwrap.dedent("""
      import jax.numpy as jnp
      import numpy as np

      def init(config, rng):
        return {"scale": jnp.float32(0.0)}

      def loss(config, params, batch, rng):
        error = params["scale"] * batch["x"] - 3.0 * batch["x"]
        return jnp.mean(error ** 2), {"scale": params["scale"]}

      def dataset(config, split, process_index, process_count):
        rng = np.random.default_rng(config.seed)
        while True:
          x = rng.normal(size=config.batch_size).astype(np.float32)
          share = config.batch_size // process_count
          yield {"x": x[process_index * share:(process_index + 1) * share]}
          if split == "eval":
            return
      """)
  )
  (tmp_path / "my_config.py").write_text(
    textwrap.dedent("""
      from launcher import config as launcher_config

      def get_config():
        config = launcher_config.defaults()
        config.workload = "my_pkg.my_workload"
        config.batch_size = 16
        config.num_steps = 50
        config.optimizer = "sgd"
        config.learning_rate = 0.1
        config.log_every_steps = 10
        config.eval_every_steps = 50
        return config
      """)
  )
  result = run_launcher(
    f"--config={tmp_path / 'my_config.py'}",
    f"--workdir={tmp_path / 'run'}",
    env={"PYTHONPATH": str(tmp_path)},
  )
  assert result.returncode == 0, result.stderr[-3000:]
  rows = read_metrics(str(tmp_path / "run"))
  assert rows[-1]["scale"] == pytest.approx(3.0, abs=1e-3)
  assert rows[-1]["eval_loss"] == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize(
  "command, line",
  [
    (
      ["-m", "launcher.local", "--num_processes=zero"],
      "[local] error: flag --num_processes=zero: invalid literal for int() with base 10: 'zero'",
    ),
    (
      ["-m", "launcher.local", "--", "--config=configs/linear.py"],
      "[local] error: pass the launcher's arguments after --, including --workdir=DIR",
    ),
    (["-m", "launcher.report"], "error: usage: python -m launcher.report WORKDIR"),
    (
      ["-m", "launcher.report", "{tmp}"],
      "error: {tmp} has no hosts/process_*.jsonl: is it a launcher workdir?",
    ),
    (
      ["-m", "launcher.corpus", "--out={tmp}/corpus", "{tmp}/missing.txt"],
      "error: cannot read {tmp}/missing.txt as UTF-8 text: FileNotFoundError: [Errno 2] No "
      "such file or directory: '{tmp}/missing.txt'",
    ),
    (["scripts/tpu/pod.py", "--workers=2"], "[pod] Unknown command line flag 'workers'"),
  ],
)
def test_every_entry_point_exits_2_on_bad_input_with_one_line(command, line, tmp_path):
  command = [part.replace("{tmp}", str(tmp_path)) for part in command]
  result = subprocess.run(
    [sys.executable, *command], capture_output=True, text=True, timeout=60, check=False
  )
  assert result.returncode == EXIT_USAGE, result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith(line.replace("{tmp}", str(tmp_path)))
  assert "Traceback" not in result.stderr
