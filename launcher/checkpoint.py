"""Checkpoints of the train state and the data position (orbax, async).

A checkpoint holds three items: `state`, the TrainState as job-wide arrays (each process writes
the shards its devices hold); `data`, a small JSON record of the data position and the settings
that make the batches; and `digests`, two sums of each array's bits that a restore checks, so a
flipped bit is damage, not a silently different run. The position is the number of global
batches consumed, which equals the step: with `config.seed`, the global batch size and the
workload's data settings it names the next batch under any process layout. Every process takes
part in every save and restore; a restore reads each array straight into the sharding the
reading run asks for, whatever executor and layout wrote it.
"""

import errno
import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp  # pylint: disable=g-bad-import-order,wrong-import-order
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from launcher import state as state_lib
from launcher import storage  # Before orbax touches a path: it picks the GCS client.
from launcher import workdir as workdir_lib
from launcher.errors import TransientError, UsageError, causes, innermost, one_line

# Pauses before each further try of a restore that failed in a way that says nothing about the
# files (out of memory, too many open files, a stale NFS handle): then the run ends, nothing moved.
RESTORE_RETRY_PAUSES_S = (2.0, 10.0)


class Damaged(ValueError):
  """A checkpoint's files are wrong (a digest or metadata that does not match): set it aside."""


def target(like: Any, shardings: Any) -> Any:
  """What a restore reads into: the shapes and dtypes of `like` (arrays or jax.eval_shape's
  output) in `shardings` (the executor's state_shardings)."""
  return jax.tree.map(
    lambda x, sharding: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding),
    like,
    shardings,
  )


def _handlers() -> dict:
  return {
    "state": ocp.StandardCheckpointHandler(),
    "data": ocp.JsonCheckpointHandler(),
    "digests": ocp.JsonCheckpointHandler(),
  }


def data_record(config, workload, global_batch_size: int) -> dict:
  """What a checkpoint records of the settings that make the batches, checked on resume: the
  seed, the global batch size and the values of the workload's `DATA_KEYS` (by name)."""
  return {
    "seed": config.seed,
    "global_batch_size": global_batch_size,
    "data_settings": {
      key: json.loads(json.dumps(config.get(key))) for key in getattr(workload, "DATA_KEYS", ())
    },
  }


def digests(tree: Any) -> dict[str, list[int]]:
  """Each array's two 32-bit wrapping sums of its bits, plain and weighted by position, keyed by
  its entry: computed where its shards live, and equal for equal bits in any sharding."""
  paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(tree)[0], strict=True)
  devices = sorted({d for leaf in leaves for d in leaf.sharding.device_set}, key=lambda d: d.id)
  everywhere = jax.sharding.NamedSharding(
    jax.sharding.Mesh(np.array(devices), ("all",)), jax.sharding.PartitionSpec()
  )
  sums = jax.jit(_bit_sums, out_shardings=everywhere)(list(leaves))
  return {_key(path): [int(a), int(b)] for path, (a, b) in zip(paths, sums.addressable_data(0))}


def _bit_sums(leaves: list) -> jax.Array:
  """[len(leaves), 2] uint32: per leaf, the sum of its bits as words, and the sum of each word
  times a multiplier of its position (a moved or swapped block changes it)."""
  rows = []
  for leaf in leaves:
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    if leaf.dtype == np.bool_:
      leaf = leaf.astype(np.uint8)
    unsigned = {1: jnp.uint8, 2: jnp.uint16}.get(leaf.dtype.itemsize, jnp.uint32)
    words = jax.lax.bitcast_convert_type(leaf, unsigned).astype(jnp.uint32)
    position = jnp.zeros(words.shape, jnp.uint32)
    for axis, size in enumerate(words.shape):
      position = position * jnp.uint32(size) + jax.lax.broadcasted_iota(
        jnp.uint32, words.shape, axis
      )
    weights = position * jnp.uint32(0x9E3779B1) + jnp.uint32(0x7F4A7C15)
    rows.append(
      jnp.stack([jnp.sum(words, dtype=jnp.uint32), jnp.sum(words * weights, dtype=jnp.uint32)])
    )
  return jnp.stack(rows)


def _verify(saved: dict[str, list[int]] | None, restored: Any) -> None:
  """Raises Damaged naming the arrays whose bits differ from what the save computed (`saved`:
  None for a checkpoint written before digests, which is not checked)."""
  if saved is None:
    return
  found = digests(restored)
  wrong = sorted(key for key, value in found.items() if saved.get(key, value) != value)
  if wrong:
    raise Damaged(
      f"the bits of {len(wrong)} array(s) differ from those saved: {', '.join(wrong[:5])}"
      + (" ..." if len(wrong) > 5 else "")
    )


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
          max_to_keep=keep,
          enable_async_checkpointing=True,
          create=True,
          cleanup_tmp_directories=True,  # What a save cut short left (a kill, a second Ctrl-C).
        ),
      )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def restore_newest(
    self, into: state_lib.TrainState, expected: dict, *, allow_data_change: bool = False
  ) -> tuple[int | None, Any]:
    """(step, state) of the newest checkpoint that reads, in the shapes and shardings of `into`,
    or (None, None) when there is none; `expected` and `allow_data_change` as
    `check_data_position` takes them.

    A checkpoint whose files prove damaged on some process (unparsable metadata, a truncated or
    corrupt array file, bits that do not match their digests) is named in one line and moved
    aside to WORKDIR/damaged_checkpoints/, kept for a look, and the one before it is tried: a
    run loses at most what it lost since its last intact save. Any other error is tried again
    and then ends the run, with every checkpoint where it was."""

    set_aside_steps = []

    def set_aside(step, why):
      self.set_aside(step, why)
      set_aside_steps.append(step)

    with storage.bounded(f"restoring a checkpoint from {self.directory}", self.directory):
      step, state = _newest_that_reads(
        self.all_steps(),
        lambda step: self.read_checked(step, into, expected, allow_data_change=allow_data_change),
        set_aside,
        lambda step: f"the checkpoint of step {step} in {self.directory}",
      )
    if step is None and set_aside_steps:
      logging.error(
        "no checkpoint in %s can be read (steps %s are in %s): the run starts again from step 0",
        self.directory,
        ", ".join(map(str, set_aside_steps)),
        self._damaged,
      )
    return step, state

  def all_steps(self) -> list[int]:
    """The complete checkpoints' steps, newest first."""
    return sorted(self._manager.all_steps(), reverse=True)

  def read_checked(
    self, step: int, into: state_lib.TrainState, expected: dict, *, allow_data_change: bool
  ) -> Any:
    """`restore` after `check_data_position` (as `restore_newest` reads each candidate)."""
    self.check_data_position(step, expected, allow_change=allow_data_change, into=into)
    return self.restore(step, into)

  def set_aside(self, step: int, why: str) -> None:
    """Moves a damaged step aside (`_set_aside`) and says so in one line, naming `why`."""
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

  def _set_aside(self, step: int) -> epath.Path | None:
    """Moves a damaged step out of the checkpoints (process 0; every process waits for it, then
    drops its clients' cached listings of it); returns where to, on process 0."""
    aside = None
    if jax.process_index() == 0:
      aside = self._damaged / str(step)
      while aside.exists():
        aside = aside.parent / f"{aside.name}+"
      storage.move(self.directory / str(step), aside)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"launcher: set aside checkpoint {step}")
    if storage.is_remote(self.directory):  # Every process's clients list the bucket afresh.
      storage.forget_listings(self.directory / str(step), self.directory)
    self._manager.reload()
    return aside

  def save(self, step: int, global_state: state_lib.TrainState, data_position: dict) -> None:
    """Starts an async save of the state (job-wide arrays) and its digests at `step`: returns
    once the arrays are copied off the devices, and commits in the background (a killed save
    leaves no checkpoint restore picks)."""
    state_digests = digests(global_state)
    with storage.bounded(f"saving the checkpoint of step {step}", self.directory):
      self._manager.save(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardSave(global_state),
          data=ocp.args.JsonSave(data_position),
          digests=ocp.args.JsonSave(state_digests),
        ),
        force=True,
      )

  def restore(self, step: int, into: state_lib.TrainState) -> state_lib.TrainState:
    """The state saved at `step` as job-wide arrays in the shapes and shardings of `into`
    (checkpoint.target), its bits checked against its digests; a mismatch of shapes names the
    entries that differ.

    The data position needs no reading back: it is the restored state's step."""
    step_dir = self.directory / str(step)
    self._check_fits(step, into)
    restored = self._manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(into))
    ).state
    _verify(_saved_digests(step_dir), restored)
    return restored

  def _check_fits(self, step: int, into: state_lib.TrainState) -> None:
    """A UsageError naming every entry whose shape differs between the checkpoint and `into`."""
    step_dir = self.directory / str(step)
    check_structure(_readable(self._manager.item_metadata(step).state, step_dir), into, step_dir)

  def check_data_position(
    self, step: int, expected: dict, *, allow_change: bool = False, into=None
  ) -> None:
    """Refuses a resume whose batches would differ from the saved run's: batch t is a function
    of t and the settings `data_record` gives (`expected`: this run's), so a change to any of
    them would silently change the run. `allow_change`: say so in a warning and go on. A
    checkpoint without a setting (written before it was recorded) is not checked on it. With
    `into`, a change whose state does not fit `into` is refused as that mismatch instead (no
    allow_data_change can resume it)."""
    saved = self._manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore())).data
    changed = data_changes(saved, expected)
    if changed and into is not None:  # A state of other shapes cannot resume: that is the line.
      self._check_fits(step, into)
    refuse_data_changes(changed, f"the checkpoint of step {step} in {self.directory}", allow_change)

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
    restored = checkpointer.restore(
      item,
      args=ocp.args.PyTreeRestore(
        item=wanted, restore_args=restore_args, partial_restore=params_only
      ),
    )
    _verify(_saved_digests(step_dir), restored)
    return restored

  def skip(step_dir, why):
    logging.error(
      "config.restore_from: the checkpoint in %s cannot be read (%s); trying the one before",
      step_dir,
      why,
    )

  with storage.bounded(f"reading config.restore_from={path}", storage.path(path)):
    step_dir, restored = _newest_that_reads(
      _step_dirs(storage.path(path)),
      read,
      skip,
      lambda step_dir: f"config.restore_from: the checkpoint in {step_dir}",
    )
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


def data_changes(saved: dict, expected: dict) -> list[tuple[str, Any, Any]]:
  """(config key, saved value, this run's) for each setting that makes the batches and differs
  (a setting the save did not record is not compared)."""
  return [
    (_CONFIG_KEYS.get(name, name), saved[name], value)
    for name, value in expected.items()
    if name != "data_settings" and name in saved and saved[name] != value
  ] + [
    (key, saved["data_settings"][key], value)
    for key, value in expected.get("data_settings", {}).items()
    if key in saved.get("data_settings", {}) and saved["data_settings"][key] != value
  ]


def refuse_data_changes(changed: list, what: str, allow_change: bool) -> None:
  """A UsageError for a resume from `what` (a checkpoint) with `changed` data settings, or with
  `allow_change` one warning; nothing when none changed."""
  if not changed:
    return
  was = " and ".join(f"config.{key}={_shown(old)}" for key, old, _ in changed)
  now = " and ".join(f"config.{key}={_shown(new)}" for key, _, new in changed)
  if allow_change:
    logging.warning(
      "%s was trained with %s, this run has %s: resuming with other batches from here on, as "
      "config.allow_data_change=True asks",
      what,
      was,
      now,
    )
    return
  keep = " ".join(f"--config.{key}={_shown(old)}" for key, old, _ in changed)
  raise UsageError(
    f"{what} was trained with {was}, this run has {now}: the batches depend on it, so resuming "
    f"would silently change the run. Keep {keep} to resume, start a new run with another "
    "--workdir, or set --config.allow_data_change=True to go on with the new batches"
  )


def _newest_that_reads(
  candidates: list,
  read: Callable[[Any], Any],
  on_damaged: Callable[[Any, str], None],
  describe: Callable[[Any], str],
) -> tuple[Any, Any]:
  """(candidate, read(candidate)) for the first candidate (newest first) that reads on every
  process, or (None, None). A UsageError (a mismatch, the same on every process) propagates.
  An error that proves the files bad (`_is_damage`) on any process is damage:
  `on_damaged(candidate, why)` runs on every process and the next candidate is tried. Any other
  error (out of memory, too many open files, a stale handle) is tried again after each of
  RESTORE_RETRY_PAUSES_S, then raises TransientError everywhere; `describe(candidate)` names it
  in those lines."""
  for candidate in candidates:
    for pause in (*RESTORE_RETRY_PAUSES_S, None):
      value, why, outcome = None, None, _READ
      try:
        value = read(candidate)
      except UsageError:
        raise
      except Exception as e:  # pylint: disable=broad-except  # Sorted below, by what it proves.
        if storage.is_unreachable(e):
          raise  # Storage that is away now says nothing about the files.
        why, outcome = _why(e), _DAMAGED if _is_damage(e) else _TRANSIENT
      outcome = _worst_on_any_process(outcome)
      if outcome == _READ:
        return candidate, value
      if outcome == _DAMAGED:
        on_damaged(candidate, why or "another process could not read it")
        break
      del value
      why = why or "on another process"
      if pause is None:
        raise TransientError(
          f"{describe(candidate)} could not be read now ({why}) in "
          f"{len(RESTORE_RETRY_PAUSES_S) + 1} tries; nothing in it says it is damaged, so it "
          "is kept where it is. Free what ran out (memory, open files) or let the storage "
          "recover, then run the same command again"
        )
      logging.warning(
        "%s could not be read (%s), which does not say its files are bad; trying again in %.0f s",
        describe(candidate),
        why,
        pause,
      )
      time.sleep(pause)
  return None, None


_READ, _DAMAGED, _TRANSIENT = 0, 1, 2  # A read's outcome; the larger wins across processes.

# Words of the errors that prove a checkpoint's files bad: tensorstore's status for a short
# file, a failed decompression or checksum, a missing file.
_DAMAGE_SIGNS = ("OUT_OF_RANGE", "DATA_LOSS", "NOT_FOUND", "Data corruption", "checksum")


def _is_damage(error: BaseException) -> bool:
  """Whether `error` proves the files bad (unparsable metadata, a short or corrupt or missing
  file, bits that differ from their digests), rather than the reader's trouble (memory, file
  handles, a stale NFS handle, an I/O error), which may pass."""
  for seen in causes(error):
    if isinstance(seen, OSError) and seen.errno not in (None, errno.ENOENT):
      return False
    if isinstance(seen, (Damaged, json.JSONDecodeError, UnicodeDecodeError, FileNotFoundError)):
      return True
    if any(sign in str(seen) for sign in _DAMAGE_SIGNS):
      return True
  return False


def _readable(metadata: Any, step_dir: epath.Path) -> Any:
  """A checkpoint's tree metadata; orbax gives None for a metadata file it cannot parse."""
  if metadata is None:
    raise Damaged(f"its metadata ({step_dir}/state/_METADATA) cannot be parsed")
  return metadata


def _saved_digests(step_dir: epath.Path) -> dict[str, list[int]] | None:
  """The digests a save wrote beside the state, or None for a checkpoint from before them."""
  item = step_dir / "digests"
  if not item.exists():
    return None
  return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(item)


# The config key a data record's entry comes from, where the names differ.
_CONFIG_KEYS = {"global_batch_size": "batch_size"}


def _shown(value: Any) -> str:
  """A config value as a --config flag takes it."""
  return repr(value) if isinstance(value, str) else str(value)


def _why(error: BaseException) -> str:
  """An error's innermost cause in one line (tensorstore's message, not its spec dump)."""
  return one_line(innermost(error)).split(" See full TensorStore details")[0]


def _worst_on_any_process(outcome: int) -> int:
  """The largest of every process's `outcome` (every process must ask)."""
  if jax.process_count() == 1:
    return outcome
  return int(np.max(multihost_utils.process_allgather(np.int32(outcome))))


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
