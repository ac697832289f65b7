"""Checkpoints of the train state and the data position (orbax, async).

A checkpoint holds two items: `state`, the TrainState as job-wide arrays (each process writes the
shards its devices hold), and `data`, a small JSON record of the data position. The position is
the number of global batches consumed, which equals the step: with `config.seed` and the global
batch size it names the next batch under any process layout. Every process takes part in every
save and restore; a restore reads each array straight into the sharding the reading run asks
for, whatever executor and layout wrote it.
"""

import os
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath

from launcher import state as state_lib
from launcher import storage  # Before orbax touches a path: it picks the GCS client.
import orbax.checkpoint as ocp  # pylint: disable=g-bad-import-order,wrong-import-order
from launcher.errors import UsageError


def directory(workdir: epath.Path) -> epath.Path:
  return workdir / "checkpoints"


def target(like: Any, shardings: Any) -> Any:
  """What a restore reads into: the shapes and dtypes of `like` (arrays or jax.eval_shape's
  output) in `shardings` (the executor's state_shardings)."""
  return jax.tree.map(lambda x, sharding: jax.ShapeDtypeStruct(np.shape(x), x.dtype,
                                                               sharding=sharding), like, shardings)


def _handlers() -> dict:
  return {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}


class Checkpoints:
  """The run's CheckpointManager: async saves into WORKDIR/checkpoints, keeping the newest few."""

  def __init__(self, workdir: epath.Path, *, keep: int):
    self.directory = directory(workdir)
    self._manager = ocp.CheckpointManager(
        self.directory, item_handlers=_handlers(),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                             create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, global_state: state_lib.TrainState, data_position: dict) -> None:
    """Starts an async save of the state (job-wide arrays) at `step`: returns once the arrays are
    copied off the devices, and commits in the background (a killed save leaves no checkpoint
    restore picks)."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(global_state),
        data=ocp.args.JsonSave(data_position)), force=True)

  def restore(self, step: int, into: state_lib.TrainState) -> state_lib.TrainState:
    """The state saved at `step` as job-wide arrays in the shapes and shardings of `into`
    (checkpoint.target); a mismatch names the entries that differ.

    The data position needs no reading back: it is the restored state's step."""
    check_structure(self._manager.item_metadata(step).state, into, self.directory)
    return self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(into))).state

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
            f"--config.{key}={saved[name]} to resume, or start a new run with another --workdir")

  def wait(self) -> None:
    """Blocks until every started save is committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def restore_from(path: str, into: state_lib.TrainState, params_only: bool) -> Any:
  """The params (`params_only`) or the whole state of another run's checkpoint (its workdir, its
  checkpoints dir, or one step's dir) as job-wide arrays in the shapes and shardings of `into`."""
  item = _step_dir(storage.path(path)) / "state"
  checkpointer = ocp.PyTreeCheckpointer()
  metadata = checkpointer.metadata(item).item_metadata
  wanted = {"params": into.params} if params_only else into
  check_structure({"params": metadata["params"]} if params_only else metadata, wanted, item)
  restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), wanted)
  restored = checkpointer.restore(item, args=ocp.args.PyTreeRestore(
      item=wanted, restore_args=restore_args, partial_restore=params_only))
  logging.info("started from %s (%s)", item, "params only" if params_only else "everything")
  return restored["params"] if params_only else restored


def _step_dir(path: epath.Path) -> epath.Path:
  """The newest complete step directory under a run's workdir or checkpoints dir, or `path`
  itself when it is one."""
  if (path / "state").is_dir():
    return path
  if (path / "checkpoints").is_dir():
    path = path / "checkpoints"
  steps = sorted(int(p.name) for p in path.iterdir()
                 if p.name.isdigit() and ocp.step.is_checkpoint_finalized(p)) if path.is_dir() else []
  if not steps:
    raise UsageError(f"config.restore_from={os.fspath(path)!r} holds no complete checkpoint: give "
                     "a run's workdir, its checkpoints directory or one step's directory")
  return path / str(steps[-1])


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
    raise UsageError(f"the checkpoint in {where} does not match this config ({len(problems)} "
                     "entries differ):\n  " + "\n  ".join(shown) +
                     "\nUse the config it was saved with, or a new --workdir.")


def _shapes(tree: Any) -> dict[str, tuple]:
  leaves = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: hasattr(x, "shape") and not isinstance(x, dict))[0]
  return {_key(path): tuple(getattr(leaf, "shape", ())) for path, leaf in leaves}


def _key(path) -> str:
  parts = []
  for entry in path:
    name = getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry)))
    parts.append(str(name))
  return "/".join(parts)
