"""Experiment trackers beside TensorBoard: MLflow and Weights & Biases, each a CLU MetricWriter
that process 0 writes with the same scalars and steps as metrics.jsonl.

A run keeps one tracker run across restarts: its id is stored in WORKDIR/trackers.json, and a
resumed or restarted start logs into it again (a step re-done after a kill is logged again at its
step number). The run ends FINISHED, FAILED or KILLED (preempted). The trackers' packages are
extras (`pip install -e '.[mlflow]'`, `'.[wandb]'`), imported only when named. A tracker that is
slow or away never stops training: MLflow's requests go out from a thread of their own, retried
for RETRY_S, then dropped with one warning; W&B's client is asynchronous itself.
"""

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
    self._ids = json.loads(storage.read_text(self._path) or "{}")

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
  """One MLflow run per training run, on the server of MLFLOW_TRACKING_URI (mlflow's default
  when unset): experiment `experiment`, run name `run_name`, its id kept in `run_ids`."""

  def __init__(self, run_ids: RunIds, *, experiment: str, run_name: str, params: dict[str, str]):
    # One try per request, of at most 10 s: the retrying is _Background's, off the loop.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    from mlflow.tracking import MlflowClient  # pylint: disable=import-outside-toplevel

    self._client = MlflowClient()
    self._background = _Background("mlflow")
    run_id = run_ids.get("mlflow")
    if run_id is None:
      found = self._client.get_experiment_by_name(experiment)
      experiment_id = found.experiment_id if found else self._client.create_experiment(experiment)
      run_id = self._client.create_run(experiment_id, run_name=run_name).info.run_id
      run_ids.set("mlflow", run_id)
      logged = {}
    else:
      self._client.update_run(run_id, status="RUNNING")
      logged = self._client.get_run(run_id).data.params
    self.run_id = run_id
    changed = sorted(key for key in params if key in logged and logged[key] != params[key][:6000])
    if changed:  # MLflow's parameters cannot change; the new values go to tags.
      logging.warning(
        "mlflow: config keys changed since the run started: %s (kept as tags restart.<key>)",
        ", ".join(changed),
      )
    self._log(
      params={key: value for key, value in params.items() if key not in logged},
      tags={f"restart.{key}": params[key] for key in changed},
    )

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
    """Marks the run FINISHED, FAILED or KILLED once the queued requests are sent."""
    self._background.submit(lambda: self._client.set_terminated(self.run_id, status=status))
    self._background.close()


class WandbWriter(_TrackerWriter):
  """One W&B run per training run (WANDB_PROJECT, WANDB_ENTITY, WANDB_MODE as W&B reads them;
  the project `experiment` unless WANDB_PROJECT is set), resumed by its id in `run_ids`. Steps are
  logged as `train_step`, W&B's x-axis for them, so a step re-done after a restart is kept."""

  def __init__(
    self, run_ids: RunIds, *, experiment: str, run_name: str, params: dict[str, str], directory: str
  ):
    import wandb  # pylint: disable=import-outside-toplevel

    run_id = run_ids.get("wandb") or secrets.token_hex(6)
    os.makedirs(directory, exist_ok=True)
    self._run = wandb.init(
      project=os.environ.get("WANDB_PROJECT", experiment),
      id=run_id,
      name=run_name,
      resume="allow",
      dir=directory,
      config=params,
      settings=wandb.Settings(console="off", silent=True, x_transaction_log_flush_interval=1.0),
    )
    run_ids.set("wandb", run_id)
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
  own); a run's name is its workdir's."""
  run_ids = RunIds(workdir)
  run_name = os.fspath(workdir).rstrip("/").rsplit("/", 1)[-1]
  writers = []
  if "mlflow" in tracker_names:
    try:
      writers.append(MlflowWriter(run_ids, experiment=experiment, run_name=run_name, params=params))
    except Exception as e:  # pylint: disable=broad-except  # A tracker never stops training.
      logging.warning(
        "mlflow: cannot open the run at %s (%s: %s); this start is not logged to "
        "MLflow, the training goes on",
        _mlflow_uri(),
        type(e).__name__,
        str(e).splitlines()[0][:200] if str(e) else "",
      )
  if "wandb" in tracker_names:
    directory = os.environ.get("WANDB_DIR") or (
      os.fspath(workdir) if not storage.is_remote(workdir) else os.getcwd()
    )
    writers.append(
      WandbWriter(
        run_ids, experiment=experiment, run_name=run_name, params=params, directory=directory
      )
    )
  return writers


def _mlflow_uri() -> str:
  import mlflow  # pylint: disable=import-outside-toplevel

  return mlflow.get_tracking_uri()
