"""A run's directory: the path of every file a run writes, and the rule for a complete checkpoint.

    WORKDIR/
      config.json                 the resolved config of the latest start
      metrics.jsonl               one row per report and eval (process 0)
      hosts/process_<i>.jsonl     each process's own records: starts, reports, ends
      checkpoints/<step>/         orbax checkpoints: `state` and `data` items
      damaged_checkpoints/<step>  checkpoints that did not read, set aside on restore
      events.out.tfevents.*       TensorBoard (process 0), one file per start
      plugins/profile/            the profile of `config.profile_first_step` (process 0)
      trackers.json               the MLflow / W&B run ids that every start logs into
      mlflow.db                   MLflow's store when MLFLOW_TRACKING_URI is unset (local workdir)
      wandb/                      W&B's local files (process 0; local workdir, WANDB_DIR unset)
      logs/process_<i>.log        each process's output under `python -m launcher.local`
      report/                     what `python -m launcher.report` draws
      .workdir_token              the start-up check that every process sees this directory
      run_id                      the run's id (written once), which a local checkpoint tier's
                                  steps carry: another run's are never restored
      lineage.jsonl               the step each start resumed from: a local checkpoint tier's
                                  step above a later start's is a rolled-back past, never restored

Only etils and the storage layer are imported: the supervisor reads a workdir without jax or orbax.
"""

from etils import epath

from launcher import storage

TOKEN_NAME = ".workdir_token"
COMMIT_MARKER = "commit_success.txt"


def config_file(workdir: epath.Path) -> epath.Path:
  return workdir / "config.json"


def metrics_file(workdir: epath.Path) -> epath.Path:
  return workdir / "metrics.jsonl"


def hosts_dir(workdir: epath.Path) -> epath.Path:
  return workdir / "hosts"


def host_records(workdir: epath.Path, process_index: int) -> epath.Path:
  return hosts_dir(workdir) / f"process_{process_index}.jsonl"


def checkpoints_dir(workdir: epath.Path) -> epath.Path:
  return workdir / "checkpoints"


def damaged_checkpoints_dir(workdir: epath.Path) -> epath.Path:
  return workdir / "damaged_checkpoints"


def trackers_file(workdir: epath.Path) -> epath.Path:
  return workdir / "trackers.json"


def mlflow_store(workdir: epath.Path) -> epath.Path:
  return workdir / "mlflow.db"


def report_dir(workdir: epath.Path) -> epath.Path:
  return workdir / "report"


def token_file(workdir: epath.Path) -> epath.Path:
  return workdir / TOKEN_NAME


def run_id_file(workdir: epath.Path) -> epath.Path:
  return workdir / "run_id"


def lineage_file(workdir: epath.Path) -> epath.Path:
  return workdir / "lineage.jsonl"


def freshness(workdir: epath.Path) -> str | None:
  """How fresh a workdir is: "absent" or "empty" when no run has written into it, None when it
  holds anything (or is not a directory)."""

  def listed() -> str | None:
    try:
      return None if any(workdir.iterdir()) else "empty"
    except FileNotFoundError:
      return "absent"
    except NotADirectoryError:
      return None

  return storage.call(f"listing {workdir}", workdir, listed)


def remove_first_writes(workdir: epath.Path, freshness_before: str) -> None:
  """Takes back what a start wrote into a fresh workdir (`freshness_before` the start) before it
  stopped on bad input: the token, the run id, the lineage, an empty checkpoints directory, and the workdir
  itself when it was absent and is empty now. Nothing else is touched."""
  for written in (token_file(workdir), run_id_file(workdir), lineage_file(workdir)):
    storage.call(f"removing {written}", workdir, written.unlink, missing_ok=True)
  if storage.is_remote(workdir):  # GCS has no directories.
    return
  for directory in [checkpoints_dir(workdir), *([workdir] if freshness_before == "absent" else [])]:
    try:
      directory.rmdir()
    except OSError:  # Absent, or not empty: it stays.
      pass


def is_complete_checkpoint(step_dir: epath.Path) -> bool:
  """orbax's rule for a finalized step: a directory named by its step (an unfinished local save
  is a `<step>.orbax-checkpoint-tmp-*` directory, renamed when done) that, on GCS, where there is
  no rename, holds its commit marker."""
  return step_dir.name.isdigit() and (
    not storage.is_remote(step_dir) or (step_dir / COMMIT_MARKER).exists()
  )


def complete_checkpoint_steps(checkpoints: epath.Path) -> list[int]:
  """The steps of the complete checkpoints in a checkpoints directory, oldest first."""
  if not checkpoints.is_dir():
    return []
  return sorted(int(p.name) for p in checkpoints.iterdir() if is_complete_checkpoint(p))
