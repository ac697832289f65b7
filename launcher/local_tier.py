"""The local checkpoint tier: each process keeps the train-state shards its devices hold, and a copy
of one peer's, in a directory on its own host (a RAM disk or a local disk), in front of the
persistent checkpoints in the workdir.

    LOCAL_DIR/<run>/<layout>/process_<i>/<step>/           process i's own shards at a step
    LOCAL_DIR/<run>/<layout>/process_<i>/peer_<j>/<step>/  its copy of process j = (i+1) % n's

`<run>` is the workdir's run id and a hash of the workdir's own path (a copied workdir is another
run); `<layout>` the process count and a hash of every array's shape, dtype and the shard each
process holds (another device count, executor or model is another layout). Steps of another run
or layout are never used and never removed. A step directory holds `meta.json` (the run, the
layout, the start that wrote it, the settings that make the batches, where each shard lies in
`shards.bin` and its CRC-32) and `shards.bin`; `complete`, written last, makes it a step a
restore may use. WORKDIR/lineage.jsonl records the step each start resumed from: a local step
written in start g at step s is used only if no later start resumed below s (a past the run
rolled back from, wherever its folders are).

The peer's copy moves between hosts as a collective permute of byte buffers (a jax collective
over the first device of each process). A restore takes the newest step the whole job can read,
the local tier's and the persistent tier's candidates merged newest first.

orbax's emergency and replicator managers are not used: they need a mesh with a replica axis of
whole copies of the state, bind their own TCP ports (p2p) or leave the copy to an external
replicator, and orbax's ordinary checkpointers synchronize every process on each save, where each
process here writes alone.
"""

import functools
import hashlib
import json
import os
import secrets
import shutil
import zlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from launcher import checkpoint as checkpoint_lib
from launcher import state as state_lib
from launcher import storage
from launcher import workdir as workdir_lib
from launcher.errors import UsageError

COMPLETE_MARKER = "complete"
KEEP_STEPS = 2  # Per copy (own and peer's): the newest and the one before, should it be damaged.
EXCHANGE_CHUNK_BYTES = 1 << 30  # The most one collective moves: a process's shards may be larger.

LOCAL = "the local tier"
PEER = "the peer's copy"
PERSISTENT = "the persistent checkpoint"


class Restored(NamedTuple):
  """Where a start's state came from: `source` (LOCAL, PEER, PERSISTENT, or "" for a fresh state)
  and the step."""

  source: str
  step: int

  def describe(self) -> str:
    return f"from {self.source}, step {self.step}" if self.source else "(nothing to restore)"


def run_id(workdir: epath.Path, process_index: int, process_count: int) -> str:
  """The run's id, kept in WORKDIR/run_id from its first start on (process 0 writes it)."""
  path = workdir_lib.run_id_file(workdir)
  if process_index == 0:
    value = (storage.read_text(path) or "").strip()
    if not value:
      value = secrets.token_hex(8)
      storage.write_text(path, value)
  if process_count == 1:
    return value
  multihost_utils.sync_global_devices("launcher: run id written")
  return (storage.read_text(path) or "").strip()


def run_key(workdir: epath.Path, run: str) -> str:
  """The run's name in the local tier: its id and a hash of the workdir's own location, so a
  copied workdir (which carries the same id) is another run."""
  location = os.fspath(workdir)
  if not storage.is_remote(workdir):
    location = os.path.realpath(location)
  return f"{run}-{hashlib.sha1(location.encode()).hexdigest()[:8]}"


def layout_key(into: Any, process_count: int) -> str:
  """The layout's name: the process count and a hash of each array's key, shape, dtype and the
  shards each process holds (`into`: arrays or ShapeDtypeStructs with shardings)."""
  parts = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(into)[0]:
    indices = leaf.sharding.devices_indices_map(tuple(leaf.shape))
    held = sorted({(d.process_index, str(_index(i, leaf.shape))) for d, i in indices.items()})
    parts.append([checkpoint_lib._key(path), list(leaf.shape), str(leaf.dtype), held])  # pylint: disable=protected-access
  digest = hashlib.sha1(json.dumps(parts).encode()).hexdigest()[:8]
  return f"{process_count}p-{digest}"


def read_lineage(workdir: epath.Path) -> list[dict]:
  """Each earlier start of the run: {"start", "resumed_from", "process_count"}, oldest first."""
  return storage.read_jsonl(workdir_lib.lineage_file(workdir))


def record_start(workdir: epath.Path, step: int, process_index: int, process_count: int, tier):
  """Appends this start's resumed step to WORKDIR/lineage.jsonl (process 0; every start, with or
  without a local tier), and tells `tier` (None without one)."""
  if process_index == 0:
    path = workdir_lib.lineage_file(workdir)
    rows = storage.read_jsonl(path)
    entry = {"start": len(rows), "resumed_from": step, "process_count": process_count}
    text = "".join(json.dumps(row) + "\n" for row in [*rows, entry])
    storage.write_text(path, text)
  if tier is not None:
    tier.started_at(step)


def _valid(meta: dict, lineage: list[dict]) -> bool:
  """Whether a step no later start rolled back past (resumed below it)."""
  return all(
    entry["resumed_from"] >= meta["step"] for entry in lineage if entry["start"] > meta["start"]
  )


class LocalTier:
  """This process's local checkpoint directory and its copy of the next process's shards."""

  def __init__(
    self,
    directory: str,
    run: str,
    process_index: int,
    process_count: int,
    layout: str = "",
    lineage: list[dict] | None = None,
  ):
    self.root = epath.Path(directory)
    self._run, self._layout = run, layout or f"{process_count}p"
    self.layout_dir = self.root / run / self._layout
    self.own = self.layout_dir / f"process_{process_index}"
    self._peer_index = (process_index + 1) % process_count
    self.peer = self.own / f"peer_{self._peer_index}"
    self._index, self._count = process_index, process_count
    self._lineage = list(lineage or [])
    self._start = len(self._lineage)
    self._failing = False

  def say_what_else_is_here(self) -> None:
    """One line naming the other runs and this run's other layouts in the directory: they are
    left as they are and never used."""
    others = sorted(p.name for p in _subdirs(self.root) if p.name != self._run)
    layouts = sorted(p.name for p in _subdirs(self.root / self._run) if p.name != self._layout)
    held = [
      f"the steps of {len(others)} other run(s) ({', '.join(others[:3])}"
      f"{' ...' if len(others) > 3 else ''})" * bool(others),
      f"this run's steps under {len(layouts)} other layout(s) ({', '.join(layouts[:3])})"
      * bool(layouts),
    ]
    if others or layouts:
      logging.warning(
        "the local tier in %s also holds %s (another workdir; or another process count, device "
        "count, executor or model): not used, and left as they are; this run's are in %s",
        self.root,
        " and ".join(part for part in held if part),
        self.layout_dir,
      )

  def started_at(self, step: int) -> None:
    """This start resumed at `step`: steps of earlier starts above it are a rolled-back past."""
    self._lineage.append({"start": self._start, "resumed_from": step})

  def save(self, step: int, global_state: state_lib.TrainState, data_record: dict) -> None:
    """Writes this process's shards of `global_state` at `step` into its own directory, and the
    next process's into its peer copy (every process calls it at the same step). A write that
    fails (a full RAM disk) is one warning: the step is skipped, training and the persistent
    tier go on."""
    blob = _blob(
      global_state,
      {
        "step": step,
        "run": self._run,
        "layout": self._layout,
        "start": self._start,
        "process_index": self._index,
        "process_count": self._count,
        "data": data_record,
      },
    )
    was_failing = self._failing
    wrote = self._write_or_warn(self.own / str(step), blob)
    if self._count > 1:  # Every process takes part in the move, whatever its own write did.
      wrote &= self._write_or_warn(self.peer / str(step), _exchange(blob, shift=-1))
    if wrote and was_failing:
      logging.info("the local tier in %s saves again, from step %d on", self.own, step)
    self._failing = not wrote
    for directory, index in ((self.own, self._index), (self.peer, self._peer_index)):
      kept = self._usable(directory, index)[-KEEP_STEPS:]
      for step_dir in _step_dirs(directory):
        if int(step_dir.name) not in kept:
          shutil.rmtree(step_dir, ignore_errors=True)

  def _write_or_warn(self, step_dir: epath.Path, blob: bytes) -> bool:
    try:
      _write(step_dir, blob)
      return True
    except OSError as e:
      shutil.rmtree(step_dir, ignore_errors=True)
      if not self._failing:
        logging.warning(
          "cannot write step %s to config.local_checkpoint_dir=%s (%s%s): this local save is "
          "skipped, training and the persistent checkpoints go on; give the local tier room "
          "(per host about twice its shards of the state) for the next ones",
          step_dir.name,
          self.root,
          e.strerror or e,
          storage._free_space(os.fspath(self.root)),  # pylint: disable=protected-access
        )
      self._failing = True
      return False

  def _usable(self, directory: epath.Path, process_index: int) -> list[int]:
    """The complete steps in `directory` of this run and layout, for `process_index`, that no
    later start rolled back past, oldest first."""
    steps = []
    for step_dir in _step_dirs(directory):
      meta = _meta(step_dir)
      if (
        meta is not None
        and (step_dir / COMPLETE_MARKER).exists()
        and meta.get("run") == self._run
        and meta.get("layout") == self._layout
        and meta.get("process_index") == process_index
        and meta.get("process_count") == self._count
        and "start" in meta
        and _valid(meta, self._lineage)
      ):
        steps.append(int(step_dir.name))
    return steps

  def readable_steps(self) -> list[tuple[int, list[bool], list[bool]]]:
    """Every step the whole job can read, newest first, each with which processes read it from
    their ring neighbour's copy, and which could (should their own copy prove damaged): agreed
    by every process, which all call this."""
    own = self._usable(self.own, self._index)
    peer = self._usable(self.peer, self._peer_index) if self._count > 1 else []
    table = np.full((2, 2 * KEEP_STEPS + 2), -1, np.int32)
    for row, steps in enumerate((own, peer)):
      steps = steps[-table.shape[1] :]
      table[row, : len(steps)] = steps
    # [process, own or peer's copy, step]
    tables = table[None] if self._count == 1 else multihost_utils.process_allgather(table)
    found = []
    for step in sorted({int(s) for s in tables.ravel() if s >= 0}, reverse=True):
      from_peer = [step not in tables[j, 0] for j in range(self._count)]
      peer_held = [step in tables[(j - 1) % self._count, 1] for j in range(self._count)]
      if all(peer_held[j] for j in range(self._count) if from_peer[j]):
        found.append((step, from_peer, [a or b for a, b in zip(from_peer, peer_held, strict=True)]))
    return found

  def read(self, step: int, from_peer: list[bool], into: state_lib.TrainState) -> Any:
    """The state at `step` as job-wide arrays in `into`'s shardings: each process's own shards,
    or, where `from_peer` says, those its ring neighbour keeps for it (moved to it, and written
    back as its own copy). Raises checkpoint.Damaged for a shard whose bits do not match."""
    error = None
    if any(from_peer):  # Every process takes part in the move, even one with nothing to send.
      outgoing = b""
      if from_peer[self._peer_index]:
        try:
          outgoing = _read_blob(self.peer / str(step))
        except Exception as e:  # pylint: disable=broad-except  # Raised after the move.
          error = e
      incoming = _exchange(outgoing, shift=1)
      if from_peer[self._index]:
        if not incoming:
          raise checkpoint_lib.Damaged(
            f"process {(self._index - 1) % self._count} could not read its copy of step {step}"
          )
        _write(self.own / str(step), incoming)
    if error is not None:
      raise error
    return _state_from(_read_blob(self.own / str(step)), into, self.own / str(step))

  def check_data(self, step: int, expected: dict, allow_change: bool) -> None:
    """Refuses a step saved with other settings that make the batches, in the persistent tier's
    line (checkpoint.refuse_data_changes); read after `read`, which puts a copy in `own`."""
    saved = (_meta(self.own / str(step)) or {}).get("data", {})
    checkpoint_lib.refuse_data_changes(
      checkpoint_lib.data_changes(saved, expected),
      f"step {step} of the local tier in {self.own}",
      allow_change,
    )

  def forget(self, step: int) -> None:
    """Removes this process's copies of `step` (damaged somewhere in the job)."""
    for directory in (self.own, self.peer):
      shutil.rmtree(directory / str(step), ignore_errors=True)


def open_tier(config, workdir: epath.Path, into: Any, process_index: int, process_count: int):
  """The run's local tier when `config.local_checkpoint_dir` names one, else None. A directory
  some process cannot write is one line on every process (a UsageError), before any compute."""
  if not config.local_checkpoint_dir:
    return None
  run = run_key(workdir, run_id(workdir, process_index, process_count))
  tier = LocalTier(
    config.local_checkpoint_dir,
    run,
    process_index,
    process_count,
    layout_key(into, process_count),
    read_lineage(workdir),
  )
  problem = _cannot_write(tier.own)
  if checkpoint_lib._worst_on_any_process(int(problem is not None)):  # pylint: disable=protected-access
    raise UsageError(
      f"config.local_checkpoint_dir={config.local_checkpoint_dir!r} cannot be used on "
      + (f"process {process_index} ({problem})" if problem else "another process (see its log)")
      + ": give a directory on each host that the run may write to, such as /dev/shm/launcher"
    )
  tier.say_what_else_is_here()
  return tier


def _cannot_write(directory: epath.Path) -> str | None:
  """Why a test file cannot be written in `directory` (made if absent), or None."""
  probe = directory / f".probe-{secrets.token_hex(4)}"
  try:
    directory.mkdir(parents=True, exist_ok=True)
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    return e.strerror or str(e)
  return None


def restore_newest(
  tier: LocalTier | None,
  checkpoints: checkpoint_lib.Checkpoints,
  into: state_lib.TrainState,
  expected: dict,
  *,
  allow_data_change: bool = False,
) -> tuple[Restored, Any]:
  """(where from, state) of the newest step the whole job can read: the local tier's steps (own
  copies, else a ring neighbour's) and the persistent checkpoints, newest first (a local one
  before a persistent one of the same step); the source is "" and the state None when there is
  none. A step that proves damaged is set aside (persistent) or removed (local) and the next
  one tried; a step saved with other data settings is refused as the persistent tier refuses it.
  Every process calls it."""
  if tier is None:
    step, state = checkpoints.restore_newest(into, expected, allow_data_change=allow_data_change)
    return (Restored(PERSISTENT, step), state) if step is not None else (Restored("", 0), None)
  # (step, rank, which processes read from their neighbour's copy): a local step first, then
  # the same step from every copy a neighbour holds (when a process's own proves damaged), then
  # a persistent checkpoint of that step.
  readable = tier.readable_steps()
  candidates = sorted(
    [(step, 2, few) for step, few, _ in readable]
    + [(step, 1, most) for step, few, most in readable if most != few]
    + [(step, 0, None) for step in checkpoints.all_steps()],
    key=lambda c: (c[0], c[1]),
    reverse=True,
  )

  def read(candidate):
    step, is_local, from_peer = candidate
    if not is_local:  # Only the persistent tier's reads wait on the workdir's storage.
      with storage.bounded(describe(candidate), checkpoints.directory):
        return checkpoints.read_checked(step, into, expected, allow_data_change=allow_data_change)
    state = tier.read(step, from_peer, into)
    tier.check_data(step, expected, allow_data_change)
    return state

  def on_damaged(candidate, why):
    step, is_local, _ = candidate
    if not is_local:
      checkpoints.set_aside(step, why)
      return
    if is_local == 2 and any(c[:2] == (step, 1) for c in candidates):
      logging.error(
        "step %d of the local tier in %s cannot be read (%s); trying the copies of it that "
        "the ring neighbours keep",
        step,
        tier.own,
        why,
      )
      return
    logging.error(
      "step %d of the local tier in %s cannot be read (%s); removed it and trying the next",
      step,
      tier.own,
      why,
    )
    tier.forget(step)

  def describe(candidate):
    step, is_local, _ = candidate
    if is_local:
      return f"step {step} of the local tier in {tier.own}"
    return f"the checkpoint of step {step} in {checkpoints.directory}"

  found, state = checkpoint_lib._newest_that_reads(candidates, read, on_damaged, describe)  # pylint: disable=protected-access
  if found is None:
    return Restored("", 0), None
  step, is_local, from_peer = found
  source = (PEER if any(from_peer) else LOCAL) if is_local else PERSISTENT
  return Restored(source, step), state


def _subdirs(directory: epath.Path) -> list[epath.Path]:
  try:
    return [p for p in directory.iterdir() if p.is_dir()]
  except OSError:
    return []


def _step_dirs(directory: epath.Path) -> list[epath.Path]:
  """The step directories under `directory`, oldest first."""
  if not directory.is_dir():
    return []
  return sorted((p for p in directory.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


def _meta(step_dir: epath.Path) -> dict | None:
  try:
    return json.loads((step_dir / "meta.json").read_text())
  except (OSError, ValueError):
    return None


def _index(index: tuple, shape: tuple) -> list[list[int]]:
  """A shard's index (slices) as [start, stop] per dimension."""
  return [list(s.indices(size)[:2]) for s, size in zip(index, shape, strict=True)]


def _blob(global_state: Any, meta: dict) -> bytes:
  """One process's shards of `global_state` (each distinct index once) and `meta`, as bytes:
  8 bytes of the metadata's length, the metadata as JSON, then the shards' bytes."""
  arrays, chunks, offset = [], [], 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(global_state)[0]:
    seen = set()
    for shard in leaf.addressable_shards:
      index = _index(shard.index, leaf.shape)
      if str(index) in seen:
        continue
      seen.add(str(index))
      data = np.ascontiguousarray(np.asarray(shard.data)).tobytes()
      arrays.append(
        {
          "key": checkpoint_lib._key(path),  # pylint: disable=protected-access
          "index": index,
          "dtype": str(leaf.dtype),
          "shape": list(shard.data.shape),
          "offset": offset,
          "nbytes": len(data),
          "crc32": zlib.crc32(data),
        }
      )
      chunks.append(data)
      offset += len(data)
  header = json.dumps({**meta, "arrays": arrays}).encode()
  return len(header).to_bytes(8, "little") + header + b"".join(chunks)


def _split(blob: bytes) -> tuple[dict, memoryview]:
  length = int.from_bytes(blob[:8], "little")
  return json.loads(blob[8 : 8 + length]), memoryview(blob)[8 + length :]


def _write(step_dir: epath.Path, blob: bytes) -> None:
  """A step's files, `complete` last (a kill before it leaves a step no restore uses)."""
  shutil.rmtree(step_dir, ignore_errors=True)
  step_dir.mkdir(parents=True)
  meta, shards = _split(blob)
  (step_dir / "shards.bin").write_bytes(shards)
  (step_dir / "meta.json").write_text(json.dumps(meta))
  (step_dir / COMPLETE_MARKER).write_text("")


def _read_blob(step_dir: epath.Path) -> bytes:
  header = (step_dir / "meta.json").read_bytes()
  if not (step_dir / COMPLETE_MARKER).exists():
    raise checkpoint_lib.Damaged(f"{step_dir} is not complete")
  return len(header).to_bytes(8, "little") + header + (step_dir / "shards.bin").read_bytes()


def _state_from(blob: bytes, into: Any, where: epath.Path) -> Any:
  """The job-wide arrays of `into` (ShapeDtypeStructs with shardings) filled from this process's
  shards in `blob`, each checked against its CRC-32."""
  meta, shards = _split(blob)
  by_key: dict[str, dict[str, np.ndarray]] = {}
  for entry in meta["arrays"]:
    data = shards[entry["offset"] : entry["offset"] + entry["nbytes"]]
    if len(data) != entry["nbytes"] or zlib.crc32(data) != entry["crc32"]:
      raise checkpoint_lib.Damaged(
        f"the bits of {entry['key']} in {where}/shards.bin differ from those saved"
      )
    array = np.frombuffer(data, dtype=jnp.dtype(entry["dtype"])).reshape(entry["shape"])
    by_key.setdefault(entry["key"], {})[str(entry["index"])] = array

  def fill(path, like):
    key = checkpoint_lib._key(path)  # pylint: disable=protected-access
    held = by_key.get(key, {})

    def shard(index):
      found = held.get(str(_index(index, like.shape)))
      if found is None:
        raise checkpoint_lib.Damaged(f"{where} holds no shard {index} of {key}")
      return found

    return jax.make_array_from_callback(like.shape, like.sharding, shard)

  return jax.tree_util.tree_map_with_path(fill, into)


def _exchange(blob: bytes, shift: int) -> bytes:
  """Each process's `blob` moved around the ring by a collective permute over the first device of
  each process, EXCHANGE_CHUNK_BYTES at a time (every process calls it): `shift`=-1, process i
  gets process i+1's; 1, i-1's."""
  count, index = jax.process_count(), jax.process_index()
  mine = np.frombuffer(len(blob).to_bytes(8, "little"), np.uint8)  # 64-bit: shards pass 2 GiB.
  lengths = [
    int.from_bytes(row.tobytes(), "little")
    for row in np.asarray(multihost_utils.process_allgather(mine)).reshape(count, 8)
  ]
  longest, source = max(lengths), (index - shift) % count
  pieces = []
  for start in range(0, max(longest, 1), EXCHANGE_CHUNK_BYTES):
    end = start + EXCHANGE_CHUNK_BYTES
    moved = _move(blob[start:end], min(end, longest) - start, shift)
    pieces.append(moved[: max(0, min(end, lengths[source]) - start)])
  return b"".join(pieces)


def _move(piece: bytes, longest: int, shift: int) -> bytes:
  """One piece of each process's bytes (the longest `longest`) moved around the ring, padded."""
  count, index = jax.process_count(), jax.process_index()
  longest = max(longest, 1)
  granule = 1 << max(12, longest.bit_length() - 4)  # Steady widths: one compilation per run.
  width = -(-longest // granule) * granule
  local = np.zeros((1, width), np.uint8)
  local[0, : len(piece)] = np.frombuffer(piece, np.uint8)
  sharding = _ring_sharding()
  buffers = jax.make_array_from_single_device_arrays(
    (count, width), sharding, [jax.device_put(local, sharding.mesh.devices[index])]
  )
  return np.asarray(_roll(shift, sharding)(buffers).addressable_data(0))[0].tobytes()


@functools.cache
def _ring_sharding() -> jax.sharding.NamedSharding:
  """Rows split over the first device of each process, in process order."""
  firsts = [
    min((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id)
    for p in range(jax.process_count())
  ]
  mesh = jax.sharding.Mesh(np.array(firsts), ("processes",))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("processes"))


@functools.cache
def _roll(shift: int, sharding: jax.sharding.NamedSharding):
  return jax.jit(lambda x: jnp.roll(x, shift, axis=0), out_shardings=sharding)
