"""Experiment trackers beside TensorBoard: MLflow and Weights & Biases, each a CLU MetricWriter
that process 0 writes with the same scalars and steps as metrics.jsonl.

A run keeps one tracker run across restarts: its id is stored in WORKDIR/trackers.json, and a
resumed or restarted start logs into it again (a step re-done after a kill is logged again at its
step number). The run ends FINISHED, FAILED or KILLED (preempted); each start's own end is an
MLflow tag `start.<n>`, and a start that ended without a word (kill -9) is marked KILLED there by
the next. The trackers' packages are extras (`pip install -e '.[mlflow]'`, `'.[wandb]'`), imported
only when named. A tracker never stops training: one that cannot open its run is one warning (a
stored run the server does not have is replaced by a fresh one); MLflow's requests go out from a
thread of their own, retried for RETRY_S, then dropped with one warning; W&B's client is
asynchronous itself.
"""

import importlib.util
import json
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from absl import logging
from etils import epath

from launcher import storage
from launcher import workdir as workdir_lib
from launcher.errors import UsageError
from launcher.writers import MetricWriter

NAMES = ("tensorboard", "mlflow", "wandb", "none")
_EXTRAS = ("mlflow", "wandb")  # Each the name of its module and of its extra.
RETRY_S = 60.0  # How long one MLflow request is retried before it is dropped.
CLOSE_S = 10.0  # How long the end of a run waits for the requests still queued.


def names(spec: str) -> list[str]:
  """The trackers of `config.trackers` ("tensorboard,mlflow"), checked: one UsageError for a
  name that is not one, and for a tracker whose package is not installed."""
  chosen = [name.strip() for name in spec.split(",") if name.strip()]
  unknown = [name for name in chosen if name not in NAMES]
  if unknown or not chosen:
    raise UsageError(
      f"config.trackers={spec!r}: {', '.join(map(repr, unknown)) or 'empty'} is not "
      f"a tracker; name some of {', '.join(NAMES[:3])} (comma-separated), or none"
    )
  if "none" in chosen and len(chosen) > 1:
    raise UsageError(f"config.trackers={spec!r}: none cannot go with other trackers")
  for name in chosen:
    if name in _EXTRAS:
      try:
        __import__(name)
      except ImportError:
        raise UsageError(
          f"config.trackers names {name}, which is not installed: pip install -e "
          f"'.[{name}]' (or leave it out of config.trackers)"
        ) from None
  if (
    "mlflow" in chosen
    and not os.environ.get("MLFLOW_TRACKING_URI")
    and importlib.util.find_spec("sqlalchemy") is None
  ):
    raise UsageError(
      "config.trackers names mlflow without MLFLOW_TRACKING_URI, so the run would log into a "
      "SQLite store in the workdir (mlflow.db), which needs the full MLflow: pip install mlflow "
      "(the [mlflow] extra is its client alone), or set MLFLOW_TRACKING_URI to a tracking server"
    )
  return [name for name in chosen if name != "none"]


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
  """A config as flat `a.b` keys with string values (a tracker's run parameters)."""
  items = tree.items() if hasattr(tree, "items") else []
  flat = {}
  for key, value in items:
    if hasattr(value, "items"):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = str(value)
  return flat


class RunIds:
  """WORKDIR/trackers.json: each tracker's run id, so that every start of a run logs into one."""

  def __init__(self, workdir: epath.Path):
    self._path = workdir_lib.trackers_file(workdir)
    text = storage.read_text(self._path) or "{}"
    try:
      self._ids = json.loads(text)
      if not isinstance(self._ids, dict):
        raise ValueError(f"a JSON {type(self._ids).__name__}, not an object")
    except ValueError as e:
      aside = self._path.parent / f"{self._path.name}.unreadable"
      storage.write_text(aside, text)
      logging.warning(
        "%s cannot be read (%s); kept it as %s, and each tracker starts a fresh run",
        self._path,
        e,
        aside,
      )
      self._ids = {}

  def get(self, tracker: str) -> str | None:
    return self._ids.get(tracker)

  def set(self, tracker: str, run_id: str) -> None:
    self._ids[tracker] = run_id
    storage.write_text(self._path, json.dumps(self._ids, indent=2))


class _Background:
  """Calls made one after another by a thread of their own, each retried with backoff for up to
  RETRY_S, then dropped with one warning (the training goes on); `close` waits up to CLOSE_S."""

  def __init__(self, name: str):
    self._name = name
    self._calls: queue.Queue = queue.Queue()
    self._warned = False
    self._thread = threading.Thread(target=self._run, name=f"tracker-{name}", daemon=True)
    self._thread.start()

  def submit(self, call: Callable[[], None]) -> None:
    self._calls.put(call)

  def close(self) -> None:
    self._calls.put(None)
    self._thread.join(CLOSE_S)
    if self._thread.is_alive():
      logging.warning(
        "%s: gave up waiting for %d queued request(s) at the end of the run",
        self._name,
        self._calls.qsize(),
      )

  def _run(self) -> None:
    while (call := self._calls.get()) is not None:
      deadline, delay = time.monotonic() + RETRY_S, 0.5
      while True:
        try:
          call()
          break
        except Exception as e:  # pylint: disable=broad-except  # Whatever the client raises.
          if time.monotonic() + delay > deadline:
            if not self._warned:
              logging.warning(
                "%s: dropped a request after retrying for %g s (%s: %s); the "
                "training goes on, and so do later requests",
                self._name,
                RETRY_S,
                type(e).__name__,
                str(e).splitlines()[0][:200] if str(e) else "",
              )
              self._warned = True
            break
          time.sleep(delay)
          delay = min(2 * delay, 8.0)


class _TrackerWriter(MetricWriter):
  """What the trackers leave to TensorBoard: histograms, images and media are not sent."""

  def write_histograms(self, step, arrays, num_buckets=None):
    del step, arrays, num_buckets

  def write_images(self, step, images):
    del step, images

  def write_summaries(self, step, values, metadata=None):
    del step, values, metadata

  def write_videos(self, step, videos):
    del step, videos

  def write_audios(self, step, audios, *, sample_rate):
    del step, audios, sample_rate

  def flush(self):
    pass  # Sent in the background; nothing waits for it.

  def end(self, status: str) -> None:
    raise NotImplementedError

  def close(self):
    self.end("FINISHED")


class MlflowWriter(_TrackerWriter):
  """One MLflow run per training run, in the store of `tracking_uri` (mlflow_uri's): experiment
  `experiment`, run name `run_name`. `run_id` is the stored run to continue; one the store does
  not have (deleted, or another store's) is replaced by a fresh run with one warning.
  `self.run_id` is the run it logs into, for trackers.json."""

  def __init__(
    self,
    run_id: str | None,
    *,
    tracking_uri: str,
    experiment: str,
    run_name: str,
    params: dict[str, str],
  ):
    # One try per request, of at most 10 s: the retrying is _Background's, off the loop.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    from mlflow.tracking import MlflowClient  # pylint: disable=import-outside-toplevel

    self._client = MlflowClient(tracking_uri)
    self._began = _now()
    run, gone = self._stored_run(run_id) if run_id else (None, None)
    logged, tags = {}, {}  # The run's parameters so far; tags to add for the previous start.
    if run is None:
      found = self._client.get_experiment_by_name(experiment)
      if found and found.lifecycle_stage == "deleted":
        raise _DeletedExperiment(f"experiment {experiment!r} (id {found.experiment_id}) is deleted")
      experiment_id = (
        found.experiment_id
        if found
        else self._client.create_experiment(
          experiment, artifact_location=_artifacts_beside(tracking_uri)
        )
      )
      run = self._client.create_run(experiment_id, run_name=run_name)
      if gone:
        logging.warning(
          "mlflow: run %s of trackers.json %s at %s; logging to a fresh run %s instead, which "
          "later starts continue",
          run_id,
          gone,
          tracking_uri,
          run.info.run_id,
        )
      self.start = 1
    else:
      self.start = int(run.data.tags.get("starts", "1")) + 1
      logged = run.data.params
      if run.info.status == "RUNNING":  # The previous start ended without a word.
        previous = f"start.{self.start - 1}"
        began = run.data.tags.get(previous, "").removeprefix("RUNNING, ")
        tags[previous] = (
          f"KILLED outright (no end was recorded), {began + ', ' if began else ''}"
          f"found RUNNING by start {self.start} at {self._began}"
        )
        logging.info(
          "mlflow: the previous start of run %s ended without a word (killed outright); "
          "marked %s KILLED, and this start continues the run",
          run.info.run_id,
          previous,
        )
      self._client.update_run(run.info.run_id, status="RUNNING")
    self.run_id = run.info.run_id
    self._background = _Background("mlflow")
    changed = sorted(key for key in params if key in logged and logged[key] != params[key][:6000])
    if changed:  # MLflow's parameters cannot change; the new values go to tags.
      logging.warning(
        "mlflow: config keys changed since the run started: %s (kept as tags restart.<key>)",
        ", ".join(changed),
      )
    self._log(
      params={key: value for key, value in params.items() if key not in logged},
      tags={
        **tags,
        "starts": str(self.start),
        f"start.{self.start}": f"RUNNING, began {self._began}",
        **{f"restart.{key}": params[key] for key in changed},
      },
    )

  def _stored_run(self, run_id: str):
    """The stored run and None, or None and why the server cannot continue it (it does not have
    it, or it is deleted); other errors (a server away) are raised."""
    from mlflow.exceptions import MlflowException  # pylint: disable=import-outside-toplevel

    try:
      run = self._client.get_run(run_id)
    except MlflowException as e:
      if e.error_code == "RESOURCE_DOES_NOT_EXIST":
        return None, "is not on the server"
      if e.error_code == "INVALID_PARAMETER_VALUE":
        return None, "is not a run id this server takes"
      raise
    if run.info.lifecycle_stage == "deleted":
      return None, "is deleted"
    return run, None

  def _log(self, metrics=(), params=None, tags=None) -> None:
    """Queues the values as log_batch requests (within MLflow's 100 params and tags each)."""
    from mlflow.entities import Param, RunTag  # pylint: disable=import-outside-toplevel

    params = [Param(key, value[:6000]) for key, value in (params or {}).items()]
    tags = [RunTag(key, value[:5000]) for key, value in (tags or {}).items()]
    batches = [{"metrics": list(metrics)}] if metrics else []
    batches += [{"params": params[i : i + 100]} for i in range(0, len(params), 100)]
    batches += [{"tags": tags[i : i + 100]} for i in range(0, len(tags), 100)]
    for batch in batches:
      self._background.submit(lambda batch=batch: self._client.log_batch(self.run_id, **batch))

  def write_scalars(self, step, scalars):
    from mlflow.entities import Metric  # pylint: disable=import-outside-toplevel

    now = int(time.time() * 1000)
    self._log(
      metrics=[
        Metric(name, float(np.asarray(value)), now, int(step)) for name, value in scalars.items()
      ]
    )

  def write_texts(self, step, texts):
    del step
    self._log(tags=dict(texts))

  def write_hparams(self, hparams):
    self._log(params={key: str(value) for key, value in hparams.items()})

  def end(self, status: str) -> None:
    """Marks the run, and this start's tag, FINISHED, FAILED or KILLED once the queued requests
    are sent."""
    self._log(tags={f"start.{self.start}": f"{status}, began {self._began}, ended {_now()}"})
    self._background.submit(lambda: self._client.set_terminated(self.run_id, status=status))
    self._background.close()


class WandbWriter(_TrackerWriter):
  """One W&B run per training run (WANDB_PROJECT, WANDB_ENTITY, WANDB_MODE as W&B reads them;
  the project `experiment` unless WANDB_PROJECT is set), resumed by `run_id` (a fresh id when
  None; `self.run_id` is the one for trackers.json). Steps are logged as `train_step`, W&B's
  x-axis for them, so a step re-done after a restart is kept."""

  def __init__(
    self,
    run_id: str | None,
    *,
    experiment: str,
    run_name: str,
    params: dict[str, str],
    directory: str,
  ):
    import wandb  # pylint: disable=import-outside-toplevel

    self.run_id = run_id or secrets.token_hex(6)
    os.makedirs(directory, exist_ok=True)
    self._run = wandb.init(
      project=os.environ.get("WANDB_PROJECT", experiment),
      id=self.run_id,
      name=run_name,
      resume="allow",
      dir=directory,
      config=params,
      settings=wandb.Settings(console="off", silent=True, x_transaction_log_flush_interval=1.0),
    )
    self._run.define_metric("train_step")
    self._run.define_metric("*", step_metric="train_step")

  def write_scalars(self, step, scalars):
    self._run.log(
      {
        "train_step": int(step),
        **{name: float(np.asarray(value)) for name, value in scalars.items()},
      }
    )

  def write_texts(self, step, texts):
    del step
    self._run.summary.update(dict(texts))

  def write_hparams(self, hparams):
    self._run.config.update(hparams, allow_val_change=True)

  def end(self, status: str) -> None:
    self._run.finish(exit_code={"FINISHED": 0, "KILLED": 75}.get(status, 1))


def open_writers(
  tracker_names: list[str], workdir: epath.Path, *, experiment: str, params: dict[str, str]
) -> list[MetricWriter]:
  """Process 0's MLflow and W&B writers among `tracker_names` (TensorBoard is the ReportWriter's
  own); a run's name is its workdir's. A tracker that cannot open its run is one warning and left
  out: the training goes on without it."""
  run_ids = RunIds(workdir)
  run_name = os.fspath(workdir).rstrip("/").rsplit("/", 1)[-1]
  opened = {}
  if "mlflow" in tracker_names:
    uri = mlflow_uri(workdir)

    def open_mlflow() -> MlflowWriter:
      if uri is None:
        raise _NoStore(
          "MLFLOW_TRACKING_URI is unset, and a gs:// workdir cannot hold MLflow's SQLite store"
        )
      return MlflowWriter(
        run_ids.get("mlflow"),
        tracking_uri=uri,
        experiment=experiment,
        run_name=run_name,
        params=params,
      )

    opened["mlflow"] = _opened(
      "mlflow", open_mlflow, where=f" at {uri}" if uri else "", remedy=_mlflow_remedy
    )
  if "wandb" in tracker_names:
    directory = os.environ.get("WANDB_DIR") or (
      os.fspath(workdir) if not storage.is_remote(workdir) else os.getcwd()
    )
    opened["wandb"] = _opened(
      "wandb",
      lambda: WandbWriter(
        run_ids.get("wandb"),
        experiment=experiment,
        run_name=run_name,
        params=params,
        directory=directory,
      ),
      where="",
      remedy=_wandb_remedy,
    )
  opened = {name: writer for name, writer in opened.items() if writer is not None}
  for name, writer in opened.items():  # Outside _opened: a workdir that fails is no tracker's.
    run_ids.set(name, writer.run_id)
  return list(opened.values())


def _opened(
  tracker: str,
  open_writer: Callable[[], _TrackerWriter],
  *,
  where: str,
  remedy: Callable[[Exception], str],
) -> _TrackerWriter | None:
  """`open_writer()`, or None and one warning line that names the tracker, why it cannot open
  its run and what to do."""
  try:
    return open_writer()
  except Exception as e:  # pylint: disable=broad-except  # A tracker never stops training.
    logging.warning(
      "%s: cannot open the run%s (%s: %s); %s; this start is not logged to %s, the training "
      "goes on",
      tracker,
      where,
      type(e).__name__,
      str(e).splitlines()[0][:200] if str(e) else "",
      remedy(e),
      {"mlflow": "MLflow", "wandb": "W&B"}[tracker],
    )
    return None


class _DeletedExperiment(Exception):
  """The run's MLflow experiment is deleted: no run can be made in it."""


class _NoStore(Exception):
  """No MLflow store is named, and the workdir cannot hold one."""


def _mlflow_remedy(error: Exception) -> str:
  """What to do when MLflow's run could not be opened with `error`."""
  if isinstance(error, _DeletedExperiment):
    return "restore it (`mlflow experiments restore`) or name another with --config.experiment"
  if isinstance(error, _NoStore):
    return "set MLFLOW_TRACKING_URI to a tracking server (http://...) that every start can reach"
  return "check that the server of MLFLOW_TRACKING_URI answers"


def _wandb_remedy(error: Exception) -> str:
  """What to do when wandb.init raised `error`."""
  import wandb  # pylint: disable=import-outside-toplevel

  if isinstance(error, (wandb.errors.UsageError, wandb.errors.AuthenticationError)):
    return (
      "set WANDB_API_KEY or run `wandb login` (or WANDB_MODE=offline to log to disk without "
      "an account)"
    )
  return (
    "check that W&B's server (WANDB_BASE_URL) answers within WANDB_INIT_TIMEOUT, or set "
    "WANDB_MODE=offline; a run deleted on W&B cannot be resumed: remove its id from "
    "trackers.json for a fresh one"
  )


def _now() -> str:
  """The time now, as the trackers' tags show it (UTC, to the second)."""
  return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())


def _artifacts_beside(tracking_uri: str) -> str | None:
  """For a SQLite store (the workdir's mlflow.db), artifacts in `mlartifacts/` beside it rather
  than MLflow's default ./mlruns in the current directory; None (the server's choice) otherwise."""
  if not tracking_uri.startswith("sqlite:///"):
    return None
  store = tracking_uri.removeprefix("sqlite:///")
  return "file://" + os.path.join(os.path.dirname(os.path.abspath(store)), "mlartifacts")


def mlflow_uri(workdir: epath.Path) -> str | None:
  """The MLflow store a run logs into: MLFLOW_TRACKING_URI, else a SQLite file in a local
  workdir, sqlite:///WORKDIR/mlflow.db (`mlflow ui --backend-store-uri` with it shows the run);
  None for a gs:// workdir without MLFLOW_TRACKING_URI (GCS cannot hold a SQLite file)."""
  uri = os.environ.get("MLFLOW_TRACKING_URI")
  if uri or storage.is_remote(workdir):
    return uri or None
  return f"sqlite:///{os.path.abspath(os.fspath(workdir_lib.mlflow_store(workdir)))}"
