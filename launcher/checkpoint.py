"""Checkpoints of the train state and the data position (orbax, async).

A checkpoint holds two items: `state`, the TrainState as job-wide arrays (each process writes the
shards its devices hold), and `data`, a small JSON record of the data position. The position is
the number of global batches consumed, which equals the step: with `config.seed` and the global
batch size it names the next batch under any process layout. Every process takes part in every
save and restore; a restore reads each array straight into the sharding the reading run asks
for, whatever executor and layout wrote it.
"""

import os
import threading
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp  # pylint: disable=g-bad-import-order,wrong-import-order
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from launcher import state as state_lib
from launcher import storage  # Before orbax touches a path: it picks the GCS client.
from launcher import workdir as workdir_lib
from launcher.errors import UsageError, innermost, one_line


def target(like: Any, shardings: Any) -> Any:
  """What a restore reads into: the shapes and dtypes of `like` (arrays or jax.eval_shape's
  output) in `shardings` (the executor's state_shardings)."""
  return jax.tree.map(
    lambda x, sharding: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding),
    like,
    shardings,
  )


def _handlers() -> dict:
  return {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}


class Checkpoints:
  """The run's CheckpointManager: async saves into WORKDIR/checkpoints, keeping the newest few."""

  def __init__(self, workdir: epath.Path, *, keep: int):
    self.directory = workdir_lib.checkpoints_dir(workdir)
    self._damaged = workdir_lib.damaged_checkpoints_dir(workdir)
    with storage.bounded(f"listing the checkpoints in {self.directory}", self.directory):
      self._manager = ocp.CheckpointManager(
        self.directory,
        item_handlers=_handlers(),
        options=ocp.CheckpointManagerOptions(
          max_to_keep=keep, enable_async_checkpointing=True, create=True
        ),
      )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def restore_newest(self, into: state_lib.TrainState, **expected) -> tuple[int | None, Any]:
    """(step, state) of the newest checkpoint that reads, in the shapes and shardings of `into`,
    or (None, None) when there is none; `expected` as `check_data_position` takes it.

    A checkpoint that does not read on some process (damaged or missing metadata or array files)
    is named in one line and moved aside to WORKDIR/damaged_checkpoints/, kept for a look, and
    the one before it is tried: a run loses at most what it lost since its last intact save."""

    def read(step):
      self.check_data_position(step, **expected)
      return self.restore(step, into)

    def set_aside(step, why):
      aside = self._set_aside(step)
      if aside is not None:
        logging.error(
          "the checkpoint of step %d in %s cannot be read (%s); moved it to %s and "
          "trying the one before",
          step,
          self.directory,
          why,
          aside,
        )

    with storage.bounded(f"restoring a checkpoint from {self.directory}", self.directory):
      return _newest_that_reads(sorted(self._manager.all_steps(), reverse=True), read, set_aside)

  def _set_aside(self, step: int) -> epath.Path | None:
    """Moves a damaged step out of the checkpoints (process 0; every process waits for it);
    returns where to, on process 0."""
    aside = None
    if jax.process_index() == 0:
      aside = self._damaged / str(step)
      while aside.exists():
        aside = aside.parent / f"{aside.name}+"
      storage.move(self.directory / str(step), aside)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"launcher: set aside checkpoint {step}")
    self._manager.reload()
    return aside

  def save(self, step: int, global_state: state_lib.TrainState, data_position: dict) -> None:
    """Starts an async save of the state (job-wide arrays) at `step`: returns once the arrays are
    copied off the devices, and commits in the background (a killed save leaves no checkpoint
    restore picks)."""
    with storage.bounded(f"saving the checkpoint of step {step}", self.directory):
      self._manager.save(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardSave(global_state), data=ocp.args.JsonSave(data_position)
        ),
        force=True,
      )

  def restore(self, step: int, into: state_lib.TrainState) -> state_lib.TrainState:
    """The state saved at `step` as job-wide arrays in the shapes and shardings of `into`
    (checkpoint.target); a mismatch names the entries that differ.

    The data position needs no reading back: it is the restored state's step."""
    check_structure(
      _readable(self._manager.item_metadata(step).state, self.directory / str(step)),
      into,
      self.directory,
    )
    return self._manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(into))
    ).state

  def check_data_position(self, step: int, **expected) -> None:
    """Refuses a resume whose data order would differ from the saved run's: batch t is a function
    of (seed, global batch size, t), so a change to either would silently change the run."""
    saved = self._manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore())).data
    config_key = {"seed": "seed", "global_batch_size": "batch_size"}
    for name, value in expected.items():
      if name in saved and saved[name] != value:
        key = config_key[name]
        raise UsageError(
          f"the checkpoint of step {step} in {self.directory} was trained with "
          f"config.{key}={saved[name]}, this run has config.{key}={value}: the data order "
          f"depends on it, so resuming would silently change the run. Keep "
          f"--config.{key}={saved[name]} to resume, or start a new run with another --workdir"
        )

  def wait(self) -> None:
    """Blocks until every started save is committed."""
    with storage.bounded("finishing the checkpoint saves", self.directory):
      self._manager.wait_until_finished()

  def wait_at_most(self, seconds: float) -> bool:
    """Waits up to `seconds` for the started saves, for a run that is failing: whether they
    finished (their own errors belong to the failure, and are not raised)."""

    def wait_quietly():
      try:
        self._manager.wait_until_finished()
      except Exception:  # pylint: disable=broad-except
        pass

    waiter = threading.Thread(target=wait_quietly, name="last-saves", daemon=True)
    waiter.start()
    waiter.join(seconds)
    return not waiter.is_alive()

  def close(self) -> None:
    with storage.bounded("finishing the checkpoint saves", self.directory):
      self._manager.close()


def restore_from(path: str, into: state_lib.TrainState, params_only: bool) -> Any:
  """The params (`params_only`) or the whole state of another run's checkpoint (its workdir, its
  checkpoints dir, or one step's dir) as job-wide arrays in the shapes and shardings of `into`:
  its newest checkpoint that reads (a damaged one is named, left where it is, and skipped)."""
  checkpointer = ocp.PyTreeCheckpointer()
  wanted = {"params": into.params} if params_only else into

  def read(step_dir):
    item = step_dir / "state"
    metadata = _readable(checkpointer.metadata(item).item_metadata, step_dir)
    check_structure({"params": metadata["params"]} if params_only else metadata, wanted, item)
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), wanted)
    return checkpointer.restore(
      item,
      args=ocp.args.PyTreeRestore(
        item=wanted, restore_args=restore_args, partial_restore=params_only
      ),
    )

  def skip(step_dir, why):
    logging.error(
      "config.restore_from: the checkpoint in %s cannot be read (%s); trying the one before",
      step_dir,
      why,
    )

  with storage.bounded(f"reading config.restore_from={path}", storage.path(path)):
    step_dir, restored = _newest_that_reads(_step_dirs(storage.path(path)), read, skip)
  if step_dir is None:
    raise UsageError(
      f"config.restore_from={path!r}: no checkpoint there can be read (each is "
      "named above); give another run's workdir or step directory"
    )
  logging.info("started from %s (%s)", step_dir, "params only" if params_only else "everything")
  return restored["params"] if params_only else restored


def _step_dirs(path: epath.Path) -> list[epath.Path]:
  """The complete step directories under a run's workdir or checkpoints dir, newest first, or
  `path` itself when it is one."""
  if (path / "state").is_dir():
    return [path]
  if workdir_lib.checkpoints_dir(path).is_dir():
    path = workdir_lib.checkpoints_dir(path)
  steps = workdir_lib.complete_checkpoint_steps(path)
  if not steps:
    raise UsageError(
      f"config.restore_from={os.fspath(path)!r} holds no complete checkpoint: give "
      "a run's workdir, its checkpoints directory or one step's directory"
    )
  return [path / str(step) for step in reversed(steps)]


def _newest_that_reads(
  candidates: list, read: Callable[[Any], Any], on_damaged: Callable[[Any, str], None]
) -> tuple[Any, Any]:
  """(candidate, read(candidate)) for the first candidate (newest first) that reads on every
  process, or (None, None). A UsageError (a mismatch, the same on every process) propagates; any
  other error on any process is damage: `on_damaged(candidate, why)` runs on every process and
  the next candidate is tried."""
  for candidate in candidates:
    value, why = None, None
    try:
      value = read(candidate)
    except UsageError:
      raise
    except Exception as e:  # pylint: disable=broad-except  # Whatever an unreadable file raises.
      if storage.is_unreachable(e):
        raise  # Storage that is away now says nothing about the files.
      why = _why(e)
    if not _any_process(why is not None):
      return candidate, value
    on_damaged(candidate, why or "another process could not read it")
  return None, None


def _readable(metadata: Any, step_dir: epath.Path) -> Any:
  """A checkpoint's tree metadata; orbax gives None for a metadata file it cannot parse."""
  if metadata is None:
    raise ValueError(f"its metadata ({step_dir}/state/_METADATA) cannot be parsed")
  return metadata


def _why(error: BaseException) -> str:
  """An error's innermost cause in one line (tensorstore's message, not its spec dump)."""
  return one_line(innermost(error)).split(" See full TensorStore details")[0]


def _any_process(flag: bool) -> bool:
  """Whether `flag` is true on any process of the job (every process must ask)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def check_structure(metadata: Any, like: Any, where: str) -> None:
  """Raises a UsageError naming every entry whose presence or shape differs from the config's."""
  saved = _shapes(metadata)
  wanted = _shapes(like)
  problems = []
  for key in sorted(saved.keys() | wanted.keys()):
    if key not in wanted:
      problems.append(f"{key}: in the checkpoint, not in this config's state")
    elif key not in saved:
      problems.append(f"{key}: in this config's state, not in the checkpoint")
    elif saved[key] != wanted[key]:
      problems.append(f"{key}: checkpoint shape {saved[key]}, this config's {wanted[key]}")
  if problems:
    shown = problems[:10] + ([f"... and {len(problems) - 10} more"] if len(problems) > 10 else [])
    raise UsageError(
      f"the checkpoint in {where} does not match this config ({len(problems)} "
      "entries differ):\n  "
      + "\n  ".join(shown)
      + "\nUse the config it was saved with, or a new --workdir."
    )


def _shapes(tree: Any) -> dict[str, tuple]:
  leaves = jax.tree_util.tree_flatten_with_path(
    tree, is_leaf=lambda x: hasattr(x, "shape") and not isinstance(x, dict)
  )[0]
  return {_key(path): tuple(getattr(leaf, "shape", ())) for path, leaf in leaves}


def _key(path) -> str:
  parts = []
  for entry in path:
    name = getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry)))
    parts.append(str(name))
  return "/".join(parts)
