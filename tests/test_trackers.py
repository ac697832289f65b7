"""MLflow (against a real `mlflow server`) and W&B (offline) beside TensorBoard: one tracker run per
training run across a kill -9 and restart, every reported step, the config as parameters, the
run's end status, and a tracker that cannot open its run (no W&B key, no server, a stale run id)
that never stops training."""

import json
import logging
import os
import signal
import sys
import time
import uuid

import pytest
from etils import epath

from launcher import trackers
from launcher.errors import EXIT_USAGE, UsageError
from tests.helpers import finish, launcher_command, read_metrics, start, wait_for

CONFIG = "--config=tests/hooked_config.py"


@pytest.mark.parametrize(
  "spec, message",
  [
    ("tensorboard,comet", r"'comet' is not a tracker; name some of tensorboard, mlflow, wandb"),
    ("", r"empty is not a tracker"),
    ("none,mlflow", r"none cannot go with other trackers"),
  ],
)
def test_bad_tracker_lists_are_one_line(spec, message):
  with pytest.raises(UsageError, match=message):
    trackers.names(spec)


def test_a_tracker_that_is_not_installed_names_its_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError.
  with pytest.raises(
    UsageError,
    match=r"config.trackers names wandb, which is not installed: "
    r"pip install -e '.\[wandb\]'",
  ):
    trackers.names("tensorboard,wandb")
  assert trackers.names("none") == [] and trackers.names(" tensorboard , mlflow") == [
    "tensorboard",
    "mlflow",
  ]


def test_mlflow_without_a_uri_needs_the_full_mlflow_for_its_store_in_the_workdir(monkeypatch):
  pytest.importorskip("mlflow", reason="the [mlflow] extra is not installed")
  monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
  monkeypatch.setitem(sys.modules, "sqlalchemy", None)  # As with the [mlflow] extra alone.
  with pytest.raises(UsageError, match=r"pip install mlflow .* or set MLFLOW_TRACKING_URI"):
    trackers.names("tensorboard,mlflow")
  monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
  assert trackers.names("tensorboard,mlflow") == ["tensorboard", "mlflow"]


def test_the_config_becomes_flat_parameters():
  from tests.helpers import load_config  # pylint: disable=import-outside-toplevel

  params = trackers.flatten(load_config("../tests/hooked_config"))
  assert params["batch_size"] == "64" and params["hidden_sizes"] == "(64,)"
  assert params["trackers"] == "tensorboard"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
  pytest.importorskip("mlflow", reason="the [mlflow] extra is not installed")
  from tests.mlflow_server import MlflowServer  # pylint: disable=import-outside-toplevel

  server = MlflowServer(
    tmp_path_factory.mktemp("mlflow"), tmp_path_factory.getbasetemp() / "mlflow-server.log"
  )
  yield server
  server.stop()


def log_of(path) -> str:
  return open(path, encoding="utf-8", errors="replace").read()


@pytest.mark.slow
def test_a_killed_and_restarted_run_is_one_mlflow_run_with_every_step(mlflow_server, tmp_path):
  from mlflow.tracking import MlflowClient  # pylint: disable=import-outside-toplevel

  env = {"MLFLOW_TRACKING_URI": mlflow_server.url}
  workdir, log = tmp_path / "run", tmp_path / "run.log"
  args = [CONFIG, f"--workdir={workdir}", "--config.trackers=tensorboard,mlflow"]
  client = MlflowClient(mlflow_server.url)

  def sent_through_step_20() -> bool:
    """Whether MLflow has step 20's report (they are sent in order): on a loaded machine the
    queue of a fast loop can lag the server by several reports."""
    run_ids = workdir / "trackers.json"
    return run_ids.exists() and any(
      metric.step >= 20
      for metric in client.get_metric_history(json.loads(run_ids.read_text())["mlflow"], "loss")
    )

  process = start(launcher_command(*args, "--config.slow_from_batch=22"), log, env=env)
  wait_for(
    lambda: (
      (workdir / "checkpoints" / "20").is_dir()
      and len(read_metrics(workdir)) >= 23
      and sent_through_step_20()
    ),
    120,
    "step 23, after the step-20 checkpoint, and step 20 in MLflow",
    process,
  )
  os.killpg(process.pid, signal.SIGKILL)
  process.wait()
  killed_at = max(row["step"] for row in read_metrics(workdir))
  assert finish(start(launcher_command(*args), log, env=env), 180) == 0, log_of(log)[-3000:]

  experiment = client.get_experiment_by_name("hooked_config")  # The config file's name.
  runs = client.search_runs([experiment.experiment_id], filter_string="attributes.run_name = 'run'")
  assert (
    len(runs) == 1
    and runs[0].info.run_id == json.loads((workdir / "trackers.json").read_text())["mlflow"]
  )
  run = runs[0]
  assert run.info.status == "FINISHED"
  history = client.get_metric_history(run.info.run_id, "loss")
  steps = sorted(metric.step for metric in history)
  # Every step once, and the steps the first start had sent past the checkpoint (21..m, m at
  # most where it was killed: its last request may still have been queued) once more.
  again = len(steps) - 40
  assert 0 <= again <= killed_at - 20 and steps == sorted([*range(1, 41), *range(21, 21 + again)])
  losses = {row["step"]: row["loss"] for row in read_metrics(workdir)}
  assert {m.step: m.value for m in sorted(history, key=lambda m: m.timestamp)} == pytest.approx(
    losses
  )
  assert run.data.params["batch_size"] == "64" and run.data.params["num_steps"] == "40"
  assert run.data.tags["job"].startswith("process 0/1 on ") and "startup" in run.data.tags
  # The killed start had no word to say: the restart marked it KILLED before continuing.
  assert run.data.tags["starts"] == "2"
  assert run.data.tags["start.1"].startswith("KILLED outright (no end was recorded), began ")
  assert "found RUNNING by start 2 at " in run.data.tags["start.1"]
  assert run.data.tags["start.2"].startswith("FINISHED, began ")


@pytest.mark.slow
def test_mlflow_ends_failed_on_bad_input_and_its_outage_never_stops_training(
  mlflow_server, tmp_path
):
  from mlflow.tracking import MlflowClient  # pylint: disable=import-outside-toplevel

  env = {"MLFLOW_TRACKING_URI": mlflow_server.url}
  diverged = tmp_path / "diverged"
  process = start(
    launcher_command(
      CONFIG,
      f"--workdir={diverged}",
      "--config.trackers=mlflow",
      "--config.nan_at_batch=5",
      "--config.experiment=failures",
    ),
    tmp_path / "diverged.log",
    env=env,
  )
  assert finish(process, 120) == EXIT_USAGE
  client = MlflowClient(mlflow_server.url)
  run = client.get_run(json.loads((diverged / "trackers.json").read_text())["mlflow"])
  assert run.info.status == "FAILED" and not list(diverged.glob("events.out.tfevents*"))

  # A server that is not there: one warning, and the run trains to the end as usual.
  away = tmp_path / "away"
  process = start(
    launcher_command(
      CONFIG, f"--workdir={away}", "--config.num_steps=10", "--config.trackers=tensorboard,mlflow"
    ),
    tmp_path / "away.log",
    env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"},
  )
  assert finish(process, 180) == 0, log_of(tmp_path / "away.log")[-3000:]
  assert [row["step"] for row in read_metrics(away)] == list(range(1, 11))
  warnings = [line for line in log_of(tmp_path / "away.log").splitlines() if "mlflow:" in line]
  assert len(warnings) == 1 and "cannot open the run at http://127.0.0.1:9" in warnings[0]


def warnings_of(caplog) -> list[str]:
  """The launcher's warnings (absl's; the trackers' clients log their own)."""
  return [
    record.getMessage()
    for record in caplog.records
    if record.name == "absl" and record.levelno >= logging.WARNING
  ]


@pytest.mark.slow
def test_a_stale_mlflow_run_id_is_one_warning_and_a_fresh_run_that_later_starts_continue(
  mlflow_server, tmp_path, monkeypatch, caplog
):
  from mlflow.tracking import MlflowClient  # pylint: disable=import-outside-toplevel

  monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
  for name, value in [
    ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0"),
    ("MLFLOW_HTTP_REQUEST_TIMEOUT", "10"),
  ]:
    monkeypatch.setenv(name, value)  # What MlflowWriter sets, kept to this test.
  client = MlflowClient(mlflow_server.url)
  experiment_id = client.create_experiment("stale")
  deleted = client.create_run(experiment_id).info.run_id
  client.delete_run(deleted)
  # An id from another server, and a run deleted on this one (`mlflow.delete_run`).
  for stale, why in [
    (uuid.uuid4().hex, "is not on the server"),
    (deleted, "is deleted"),
    ("not-a-run-id!", "is not a run id this server takes"),
  ]:
    workdir = tmp_path / why.replace(" ", "_")
    workdir.mkdir()
    (workdir / "trackers.json").write_text(json.dumps({"mlflow": stale}))
    caplog.clear()
    (writer,) = trackers.open_writers(
      ["mlflow"], epath.Path(workdir), experiment="stale", params={"seed": "0"}
    )
    fresh = json.loads((workdir / "trackers.json").read_text())["mlflow"]
    assert fresh != stale and writer.run_id == fresh
    assert warnings_of(caplog) == [
      f"mlflow: run {stale} of trackers.json {why} at {mlflow_server.url}; logging to a fresh "
      f"run {fresh} instead, which later starts continue"
    ]
    writer.write_scalars(1, {"loss": 0.5})
    writer.end("FINISHED")
    caplog.clear()
    (again,) = trackers.open_writers(
      ["mlflow"], epath.Path(workdir), experiment="stale", params={"seed": "0"}
    )
    again.write_scalars(2, {"loss": 0.25})
    again.end("FINISHED")
    assert again.run_id == fresh and warnings_of(caplog) == []
    run = client.get_run(fresh)
    assert run.info.status == "FINISHED" and run.info.experiment_id == experiment_id
    assert [(m.step, m.value) for m in client.get_metric_history(fresh, "loss")] == [
      (1, 0.5),
      (2, 0.25),
    ]
    assert run.data.params == {"seed": "0"} and run.data.tags["starts"] == "2"
    assert run.data.tags["start.1"].startswith("FINISHED, began ")

  # trackers.json itself unreadable (a hand edit cut short): one warning, the file kept aside,
  # a fresh run whose id is stored.
  unreadable = tmp_path / "unreadable"
  unreadable.mkdir()
  (unreadable / "trackers.json").write_text('{"mlflow": "abc')
  caplog.clear()
  (writer,) = trackers.open_writers(
    ["mlflow"], epath.Path(unreadable), experiment="stale", params={"seed": "0"}
  )
  writer.end("FINISHED")
  assert json.loads((unreadable / "trackers.json").read_text()) == {"mlflow": writer.run_id}
  assert (unreadable / "trackers.json.unreadable").read_text() == '{"mlflow": "abc'
  (line,) = warnings_of(caplog)
  assert line.startswith(f"{unreadable}/trackers.json cannot be read (") and line.endswith(
    f"kept it as {unreadable}/trackers.json.unreadable, and each tracker starts a fresh run"
  )

  # Its experiment deleted too (which deletes its runs): no run can be made; one line says why.
  client.delete_experiment(experiment_id)
  caplog.clear()
  assert trackers.open_writers(["mlflow"], epath.Path(workdir), experiment="stale", params={}) == []
  assert warnings_of(caplog) == [
    f"mlflow: cannot open the run at {mlflow_server.url} (_DeletedExperiment: experiment "
    f"'stale' (id {experiment_id}) is deleted); restore it (`mlflow experiments restore`) or "
    "name another with --config.experiment; this start is not logged to MLflow, the training "
    "goes on"
  ]
  assert json.loads((workdir / "trackers.json").read_text())["mlflow"] == fresh


@pytest.fixture
def no_wandb_credentials(tmp_path, monkeypatch):
  """An environment where W&B finds no API key: an empty HOME, no WANDB_API_KEY, no NETRC,
  WANDB_MODE unset (online), its files under tmp_path."""
  pytest.importorskip("wandb", reason="the [wandb] extra is not installed")
  (tmp_path / "home").mkdir()
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.setenv("WANDB_DIR", str(tmp_path))
  for name in ("WANDB_API_KEY", "WANDB_MODE", "NETRC", "WANDB_BASE_URL", "WANDB_CONFIG_DIR"):
    monkeypatch.delenv(name, raising=False)


@pytest.mark.slow
def test_wandb_with_no_server_is_one_warning_within_its_init_timeout(
  no_wandb_credentials, tmp_path, monkeypatch, caplog
):
  import wandb  # pylint: disable=import-outside-toplevel

  from launcher.local import free_port  # pylint: disable=import-outside-toplevel

  # A key, and a server that refuses connections: W&B gives up after WANDB_INIT_TIMEOUT.
  monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
  monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{free_port()}")
  monkeypatch.setenv("WANDB_INIT_TIMEOUT", "3")
  try:
    assert trackers.open_writers(["wandb"], epath.Path(tmp_path), experiment="x", params={}) == []
  finally:
    wandb.teardown()
  (warning,) = warnings_of(caplog)
  assert warning.startswith("wandb: cannot open the run (CommError: ")
  assert warning.endswith(
    "check that W&B's server (WANDB_BASE_URL) answers within WANDB_INIT_TIMEOUT, or set "
    "WANDB_MODE=offline; a run deleted on W&B cannot be resumed: remove its id from "
    "trackers.json for a fresh one; this start is not logged to W&B, the training goes on"
  )
  assert not (tmp_path / "trackers.json").exists()


@pytest.mark.slow
def test_wandb_without_credentials_is_one_warning_and_the_run_and_mlflow_go_on(
  no_wandb_credentials, mlflow_server, tmp_path
):
  from mlflow.tracking import MlflowClient  # pylint: disable=import-outside-toplevel

  workdir, log = tmp_path / "nokey", tmp_path / "nokey.log"
  process = start(
    launcher_command(
      CONFIG,
      f"--workdir={workdir}",
      "--config.num_steps=6",
      "--config.trackers=tensorboard,mlflow,wandb",
    ),
    log,
    env={"MLFLOW_TRACKING_URI": mlflow_server.url},
  )
  assert finish(process, 180) == 0, log_of(log)[-3000:]
  assert "Traceback" not in log_of(log)
  assert [row["step"] for row in read_metrics(workdir)] == list(range(1, 7))
  warnings = [line for line in log_of(log).splitlines() if "wandb: cannot" in line]
  assert len(warnings) == 1 and warnings[0].endswith(
    "wandb: cannot open the run (UsageError: No API key configured. Use `wandb login` to log "
    "in.); set WANDB_API_KEY or run `wandb login` (or WANDB_MODE=offline to log to disk "
    "without an account); this start is not logged to W&B, the training goes on"
  )
  run_ids = json.loads((workdir / "trackers.json").read_text())
  assert list(run_ids) == ["mlflow"]  # No W&B run id: the next start tries W&B afresh.
  client = MlflowClient(mlflow_server.url)
  assert client.get_run(run_ids["mlflow"]).info.status == "FINISHED"
  assert sorted(m.step for m in client.get_metric_history(run_ids["mlflow"], "loss")) == list(
    range(1, 7)
  )
  assert list(workdir.glob("events.out.tfevents*"))


def wandb_history(run_dir) -> list[list[dict]]:
  """The history rows of each of W&B's offline run files under `run_dir`, oldest first (its
  transaction log: LevelDB's log format of 32 KiB blocks after a 7-byte `:W&B` header, each record
  a protobuf Record)."""
  from wandb.proto import wandb_internal_pb2  # pylint: disable=import-outside-toplevel

  starts = []
  for path in sorted(run_dir.glob("wandb/offline-run-*/*.wandb")):
    rows = []
    starts.append(rows)
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, pending = 7, b""
    while position + 7 <= len(data):
      left = 32768 - position % 32768
      length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
      if left < 7 or (length == 0 and kind == 0):
        position += left
        continue
      chunk = data[position + 7 : position + 7 + length]
      position += 7 + length
      pending = chunk if kind in (1, 2) else pending + chunk
      if kind in (1, 4):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        if record.WhichOneof("record_type") == "history":
          rows.append(
            {item.nested_key[0]: json.loads(item.value_json) for item in record.history.item}
          )
  return starts


@pytest.mark.slow
def test_wandb_offline_keeps_one_run_id_and_every_step_across_a_restart(tmp_path):
  pytest.importorskip("wandb", reason="the [wandb] extra is not installed")
  env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
  workdir, log = tmp_path / "run", tmp_path / "run.log"
  args = [
    CONFIG,
    f"--workdir={workdir}",
    "--config.trackers=wandb",
    "--config.num_steps=20",
    "--config.checkpoint_every_steps=10",
  ]
  process = start(
    launcher_command(*args, "--config.slow_from_batch=12", "--config.slow_seconds=1.0"),
    log,
    env=env,
  )
  wait_for(
    lambda: (workdir / "checkpoints" / "10").is_dir() and len(read_metrics(workdir)) >= 13,
    120,
    "step 13, after the step-10 checkpoint",
    process,
  )
  os.kill(process.pid, signal.SIGKILL)  # The launcher alone, as the OOM killer would.
  process.wait()
  time.sleep(3)
  killed_at = max(row["step"] for row in read_metrics(workdir))
  assert finish(start(launcher_command(*args), log, env=env), 180) == 0, log_of(log)[-3000:]
  run_id = json.loads((workdir / "trackers.json").read_text())["wandb"]
  assert {p.name.rsplit("-", 1)[1] for p in tmp_path.glob("wandb/offline-run-*")} == {run_id}
  killed, restarted = wandb_history(tmp_path)
  # W&B's service dies with the launcher: the killed start keeps what its log had flushed (each
  # second: here at least the steps up to the checkpoint, logged 2 s before the kill), the
  # restart every step from the checkpoint on.
  assert [row["train_step"] for row in killed] == list(range(1, len(killed) + 1))
  assert 10 <= len(killed) <= killed_at
  assert [row["train_step"] for row in restarted] == list(range(11, 21))
  losses = {row["step"]: row["loss"] for row in read_metrics(workdir)}
  assert {row["train_step"]: row["loss"] for row in killed + restarted} == pytest.approx(
    {step: losses[step] for step in [*range(1, len(killed) + 1), *range(11, 21)]}
  )
  assert not list(workdir.glob("events.out.tfevents*"))  # trackers=wandb: no TensorBoard.


def test_tensorboard_gets_the_job_once_per_start(tmp_path):
  """TensorBoard's `job` text, read back from the event files: the layout, the workdir and the
  resolved config, written at each start's first step."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=import-outside-toplevel

  from launcher import train  # pylint: disable=import-outside-toplevel
  from tests.test_numbers import numbers_config  # pylint: disable=import-outside-toplevel

  for num_steps in (4, 8):  # A start, then a resume from its final checkpoint.
    train.run(numbers_config(num_steps=num_steps, warmup_steps=2), str(tmp_path))
  events = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
  events.Reload()
  texts = [
    (event.step, event.tensor_proto.string_val[0].decode()) for event in events.Tensors("job")
  ]
  assert [step for step, _ in texts] == [0, 4]
  for step, text in texts:
    layout, workdir, config = text.split("\n\n", 2)
    assert layout.startswith("process 0/1 on ") and layout.endswith("; 1 process(es), 8 devices")
    assert workdir == f"workdir: {tmp_path}"
    config = json.loads(config.removeprefix("config:\n\n").replace("\n    ", "\n"))
    assert config["num_steps"] == (4 if step == 0 else 8) and config["batch_size"] == 32


@pytest.mark.slow  # In-process, but MLflow's first SQLite store takes ~15 s to set up here.
def test_mlflow_without_a_uri_logs_into_the_workdir(tmp_path, monkeypatch):
  """With MLFLOW_TRACKING_URI unset the run goes to WORKDIR/mlflow.db, which MLflow's own client
  reads back; nothing lands in the directory the launcher was started from."""
  pytest.importorskip("mlflow", reason="the [mlflow] extra is not installed")
  from mlflow.tracking import MlflowClient  # pylint: disable=import-outside-toplevel

  from launcher import train  # pylint: disable=import-outside-toplevel
  from tests.test_numbers import numbers_config  # pylint: disable=import-outside-toplevel

  monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
  for name, value in [
    ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0"),
    ("MLFLOW_HTTP_REQUEST_TIMEOUT", "10"),
  ]:
    monkeypatch.setenv(name, value)  # What MlflowWriter sets, kept to this test.
  started_in, workdir = tmp_path / "cwd", tmp_path / "run"
  started_in.mkdir()
  monkeypatch.chdir(started_in)
  train.run(numbers_config(trackers="mlflow", experiment="local"), str(workdir))
  assert trackers.mlflow_uri(workdir) == f"sqlite:///{workdir}/mlflow.db"
  client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
  (run,) = client.search_runs([client.get_experiment_by_name("local").experiment_id])
  assert run.info.run_name == "run" and run.info.status == "FINISHED"
  assert run.info.artifact_uri.startswith(f"file://{workdir}/mlartifacts/")
  losses = {row["step"]: row["loss"] for row in read_metrics(workdir)}
  history = client.get_metric_history(run.info.run_id, "loss")
  assert {metric.step: metric.value for metric in history} == pytest.approx(losses)
  assert list(started_in.iterdir()) == []
  assert trackers.mlflow_uri(epath.Path("gs://bucket/run")) is None
