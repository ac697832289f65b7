"""The local checkpoint tier: 2 processes x 4 devices, persistent checkpoints on gs:// (a real GCS
emulator) every 20 steps, local ones every 5. A kill -9 resumes from the local tier, a replaced
host from its peer's copy, a job whose hosts hold only another run's local steps from the
persistent checkpoint; each continues the uninterrupted run's losses."""

import glob
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess

import jax
import numpy as np
import pytest

from launcher import checkpoint as checkpoint_lib
from launcher import config as config_lib
from launcher import local_tier, report, storage, train
from launcher.errors import UsageError
from tests.helpers import finish, launcher_command, losses_by_step, start, wait_for

pytestmark = pytest.mark.slow  # Starts processes or trains for seconds.

CONFIG = "--config=tests/hooked_config.py"


def job(workdir: str, local_dir, *args, max_restarts: int = 0) -> list[str]:
  """2 processes x 4 devices through launcher.local, with the local tier every 5 steps."""
  command = launcher_command(
    CONFIG,
    f"--workdir={workdir}",
    f"--config.local_checkpoint_dir={local_dir}",
    "--config.local_checkpoint_every_steps=5",
    *args,
    num_processes=2,
    devices=4,
    grace=5,
  )
  command.insert(command.index("--"), f"--max_restarts={max_restarts}")
  return command


def log_of(path) -> str:
  return open(path, encoding="utf-8", errors="replace").read()


def startup_lines(text: str) -> list[str]:
  return [line for line in text.splitlines() if "[process 0/2] time to first step" in line]


def layout_dir(local_dir):
  """The one run's one layout's directory in `local_dir` (LOCAL_DIR/<run>/<layout>)."""
  (found,) = pathlib.Path(local_dir).glob("*/*")
  return found


def complete(local_dir, step: int) -> bool:
  """Whether both processes hold `step` in their own copy and in their peer's."""
  return all(
    os.path.exists(os.path.join(local_dir, found, f"process_{i}", sub, str(step), "complete"))
    for found in glob.glob("*/*", root_dir=local_dir)
    for i in range(2)
    for sub in ("", f"peer_{(i + 1) % 2}")
  ) and bool(glob.glob("*/*", root_dir=local_dir))


def children(pid: int) -> list[int]:
  with open(f"/proc/{pid}/task/{pid}/children") as f:
    return [int(child) for child in f.read().split()]


def test_restores_from_the_local_tier_the_peer_copy_and_the_persistent_one(gcs, straight, tmp_path):
  reference = losses_by_step(straight("2x4"))
  mirror = gcs.bucket("tier") / "run"  # What the bucket holds, object by object.
  workdir, local, kept = "gs://tier/run", tmp_path / "local", tmp_path / "local_at_37"
  log = tmp_path / "run.log"

  # A kill -9 of process 1 after step 37; the supervised restart resumes at 35 from the local tier.
  process = start(
    job(workdir, local, "--config.slow_from_batch=35", "--config.slow_seconds=0.6", max_restarts=1),
    log,
    devices=4,
    env=gcs.env,
  )
  wait_for(
    lambda: "step 37/40" in log_of(log) and complete(local, 35),
    120,
    "step 37",
    process,
    interval=0.1,
  )
  shutil.copytree(local, kept)  # The hosts' RAM disks as the kill leaves them, for the cases below.
  os.kill(children(process.pid)[-1], signal.SIGKILL)  # Process 1, by the kernel: no goodbye.
  assert finish(process, 240) == 0, log_of(log)[-3000:]
  text = log_of(log)
  assert "[local] restart 1/1 after process 1 was killed by SIGKILL" in text, text[-3000:]
  assert "resuming from checkpoint 20 or a newer local step" in text, text[-3000:]
  assert "step 40/40" not in text.split("[local] restart 1/1")[0]  # Killed before the end.
  assert " s from the local tier, step 35," in startup_lines(text)[-1], startup_lines(text)
  assert losses_by_step(mirror) == reference
  assert sorted(os.listdir(layout_dir(kept) / "process_0")) == ["30", "35", "peer_1"]

  def resume(local_dir, name: str) -> str:
    """A start of the killed run at step 37 (its persistent step 40 taken away) on `local_dir`."""
    shutil.rmtree(mirror / "checkpoints" / "40")
    run_log = tmp_path / f"{name}.log"
    assert finish(start(job(workdir, local_dir), run_log, devices=4, env=gcs.env), 180) == 0, (
      log_of(run_log)[-3000:]
    )
    assert losses_by_step(mirror) == reference
    return startup_lines(log_of(run_log))[-1]

  # Process 1's host replaced: its directory is empty; process 0's copy of it moves to it.
  replaced = shutil.copytree(kept, tmp_path / "replaced")
  shutil.rmtree(layout_dir(replaced) / "process_1")
  assert " s from the peer's copy, step 35," in resume(replaced, "replaced")
  with open(layout_dir(replaced) / "process_1" / "40" / "meta.json") as f:
    assert json.load(f)["process_index"] == 1  # It keeps its own copies again.

  # A flipped bit in process 1's own copy of step 35: process 0's copy of it is read instead.
  flipped = shutil.copytree(kept, tmp_path / "flipped")
  shards = layout_dir(flipped) / "process_1" / "35" / "shards.bin"
  damaged = bytearray(shards.read_bytes())
  damaged[len(damaged) // 2] ^= 0x01
  shards.write_bytes(bytes(damaged))
  assert " s from the peer's copy, step 35," in resume(flipped, "flipped")
  assert "trying the copies of it that the ring neighbours keep" in log_of(tmp_path / "flipped.log")

  # Both hosts replaced, their directories holding another run's steps (a shared /dev/shm):
  # those are never restored, however new; the persistent checkpoint of step 20 is.
  foreign = shutil.copytree(kept, tmp_path / "foreign")
  other_run = foreign / "0123456789abcdef-01234567"
  layout_dir(foreign).parent.rename(other_run)
  line = resume(foreign, "foreign")
  assert " s from the persistent checkpoint, step 20," in line, line
  text = log_of(tmp_path / "foreign.log")
  assert "also holds the steps of 1 other run(s) (0123456789abcdef-01234567)" in text, text[-3000:]
  assert sorted(os.listdir(next(other_run.glob("*")) / "process_0")) == ["30", "35", "peer_1"]


def test_a_preemption_notice_saves_to_the_local_tier_too(tmp_path):
  """One process: SIGTERM after step 6 saves the step it stops at to both tiers, exit 75."""
  workdir, local, log = tmp_path / "run", tmp_path / "local", tmp_path / "run.log"
  process = start(
    launcher_command(
      CONFIG,
      f"--workdir={workdir}",
      f"--config.local_checkpoint_dir={local}",
      "--config.local_checkpoint_every_steps=5",
      "--config.slow_from_batch=8",
    ),
    log,
  )
  wait_for(lambda: "step 6/40" in log_of(log), 120, "step 6", process, interval=0.1)
  os.kill(process.pid, signal.SIGTERM)
  assert finish(process, 60) == 75, log_of(log)[-3000:]
  stopped = max(losses_by_step(str(workdir)))
  assert 6 <= stopped < 20
  assert sorted(os.listdir(workdir / "checkpoints")) == [str(stopped)]
  periodic = {step for step in (5, 10, 15) if step <= stopped}
  own = layout_dir(local) / "process_0"
  assert sorted(map(int, os.listdir(own))) == sorted(periodic | {stopped})[-2:]
  with open(own / str(stopped) / "meta.json") as f:
    assert json.load(f)["step"] == stopped


@pytest.mark.parametrize(
  "last_step, preempted, local_save",
  [(5, False, True), (35, False, True), (37, True, True), (37, False, False)],
)
def test_a_local_save_is_due_every_so_many_steps_and_on_a_preemption_notice(
  last_step, preempted, local_save
):
  config = config_lib.defaults()
  config.update(
    num_steps=40,
    local_checkpoint_dir="/dev/shm/launcher",
    local_checkpoint_every_steps=5,
    checkpoint_every_steps=20,
  )
  assert train._due(config, last_step, preempted).local_save == local_save  # pylint: disable=protected-access


MESH = jax.sharding.Mesh(np.array(jax.devices()), ("d",))
SHARDED = jax.sharding.NamedSharding(MESH, jax.sharding.PartitionSpec("d"))
REPLICATED = jax.sharding.NamedSharding(MESH, jax.sharding.PartitionSpec())
RECORD = {"seed": 0, "global_batch_size": 8, "data_settings": {}}


def state_at(step: int, sharding=SHARDED) -> dict:
  """A small train state of one process of 8 devices: `w` in `sharding`, its value from `step`."""
  return {
    "w": jax.device_put(np.arange(64, dtype=np.float32).reshape(16, 4) + step, sharding),
    "step": jax.device_put(np.int32(step), REPLICATED),
  }


def target(sharding=SHARDED) -> dict:
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state_at(0, sharding)
  )


class Start:
  """One start of a one-process run in this process: its tier and persistent checkpoints, the
  restore a start does, then the lineage record it appends."""

  def __init__(self, workdir, local_dir, sharding=SHARDED, expected=RECORD, allow=False):
    config = config_lib.defaults()
    config.local_checkpoint_dir = str(local_dir)
    self.workdir = storage.path(str(workdir))
    self.into = target(sharding)
    self.tier = local_tier.open_tier(config, self.workdir, self.into, 0, 1)
    self.checkpoints = checkpoint_lib.Checkpoints(self.workdir, keep=5)
    try:
      self.restored, self.state = local_tier.restore_newest(
        self.tier, self.checkpoints, self.into, expected, allow_data_change=allow
      )
    except BaseException:
      self.checkpoints.close()
      raise
    local_tier.record_start(self.workdir, self.restored.step, 0, 1, self.tier)

  def save(self, *steps, persistent=False, sharding=SHARDED):
    for step in steps:
      if persistent:
        self.checkpoints.save(step, state_at(step, sharding), {"step": step, **RECORD})
        self.checkpoints.wait()
      else:
        self.tier.save(step, state_at(step, sharding), RECORD)
    return self

  def close(self):
    self.checkpoints.close()


def restored_by(workdir, local_dir, **kwargs) -> tuple:
  start = Start(workdir, local_dir, **kwargs)
  start.close()
  if start.state is not None:
    np.testing.assert_array_equal(
      np.asarray(start.state["w"]), np.asarray(state_at(start.restored.step)["w"])
    )
  return start.restored


def test_a_damaged_or_unfinished_local_step_falls_back(tmp_path, monkeypatch, caplog):
  """A flipped bit in step 15's shards and step 20 without its `complete` marker leave step 10,
  read into the sharding asked for."""
  monkeypatch.setattr(local_tier, "KEEP_STEPS", 3)
  start = Start(tmp_path / "run", tmp_path / "local").save(5, 10, 15, 20)
  start.close()
  tier = start.tier
  assert sorted(os.listdir(tier.own)) == ["10", "15", "20"]  # The newest KEEP_STEPS.
  shards = tier.own / "15" / "shards.bin"
  damaged = bytearray(shards.read_bytes())
  damaged[100] ^= 0x10
  shards.write_bytes(bytes(damaged))
  (tier.own / "20" / "complete").unlink()

  again = Start(tmp_path / "run", tmp_path / "local")
  again.close()
  assert again.restored == local_tier.Restored(local_tier.LOCAL, 10)
  np.testing.assert_array_equal(np.asarray(again.state["w"]), np.asarray(state_at(10)["w"]))
  assert again.state["w"].sharding == SHARDED and int(again.state["step"]) == 10
  assert sorted(os.listdir(tier.own)) == ["10", "20"]  # 15 damaged, removed; 20 never complete.
  assert "step 15 of the local tier" in caplog.text, caplog.text
  assert "the bits of w in" in caplog.text and "differ from those saved" in caplog.text


def test_a_copied_workdir_is_another_run_both_ways(tmp_path):
  """A copy of a workdir (same run_id file) never restores the original's local steps, nor the
  original the copy's."""
  local = tmp_path / "local"
  Start(tmp_path / "w", local).save(20, persistent=True).save(25, 30).close()
  shutil.copytree(tmp_path / "w", tmp_path / "fork")
  assert (tmp_path / "w" / "run_id").read_text() == (tmp_path / "fork" / "run_id").read_text()
  fork = Start(tmp_path / "fork", local)
  assert fork.restored == local_tier.Restored(local_tier.PERSISTENT, 20)
  fork.save(35, 40).close()
  assert restored_by(tmp_path / "w", local) == local_tier.Restored(local_tier.LOCAL, 30)
  assert restored_by(tmp_path / "fork", local) == local_tier.Restored(local_tier.LOCAL, 40)


def test_a_step_of_a_past_the_run_rolled_back_from_is_never_restored(tmp_path, monkeypatch, caplog):
  """Start 0 saves local 15, 25 and 30 under one layout; start 1, under another (a process
  count that is gone), resumes at the persistent 20; start 2, under the first layout again,
  restores 15, not 25 or 30, whose folders are still there."""
  monkeypatch.setattr(local_tier, "KEEP_STEPS", 3)
  workdir, local = tmp_path / "w", tmp_path / "local"
  Start(workdir, local).save(15).save(20, persistent=True).save(25, 30).close()
  other = Start(workdir, local, sharding=REPLICATED)  # Another layout: those steps are skipped.
  assert other.restored == local_tier.Restored(local_tier.PERSISTENT, 20)
  assert "also holds this run's steps under 1 other layout(s)" in caplog.text, caplog.text
  other.close()
  shutil.rmtree(workdir / "checkpoints" / "20")  # So that only the local tier could give 20+.
  back = Start(workdir, local)
  back.close()
  assert back.restored == local_tier.Restored(local_tier.LOCAL, 15)
  assert sorted(os.listdir(back.tier.own)) == ["15", "25", "30"]  # Kept until a save prunes.
  lineage = [json.loads(line) for line in (workdir / "lineage.jsonl").read_text().splitlines()]
  assert [row["resumed_from"] for row in lineage] == [0, 20, 15]
  back.save(20)
  assert sorted(os.listdir(back.tier.own)) == ["15", "20"]  # The rolled-back 25 and 30 go.


def test_another_layout_keeps_its_local_steps(tmp_path, caplog):
  """Steps saved under another sharding (another executor or device count) are skipped with one
  line and kept; the start trains from scratch, and the first layout restores them later."""
  workdir, local = tmp_path / "w", tmp_path / "local"
  first = Start(workdir, local).save(5, 10)
  first.close()
  other = Start(workdir, local, sharding=REPLICATED)
  other.close()
  assert other.restored == local_tier.Restored("", 0) and other.state is None
  assert (
    "under 1 other layout(s)" in caplog.text and "not used, and left as they are" in caplog.text
  )
  assert sorted(os.listdir(first.tier.own)) == ["10", "5"]
  assert other.tier.layout_dir != first.tier.layout_dir
  # Start 1 resumed at 0 and so rolled back past them: a rolled-back past is not restored.
  assert restored_by(workdir, local) == local_tier.Restored("", 0)


def test_other_data_settings_of_a_local_step_are_the_persistent_tiers_line(tmp_path):
  """A seed change with only local steps: exit-2's line of the persistent tier, steps kept;
  with allow_data_change a warning and the step."""
  workdir, local = tmp_path / "w", tmp_path / "local"
  Start(workdir, local).save(5, 10).close()
  other_seed = {**RECORD, "seed": 1}
  with pytest.raises(UsageError) as e:
    Start(workdir, local, expected=other_seed)
  assert str(e.value).startswith(
    f"step 10 of the local tier in {local}/"
  ) and "was trained with config.seed=0, this run has config.seed=1: the batches depend on" in str(
    e.value
  ), str(e.value)
  own = next(local.glob("*/*/process_0"))
  assert sorted(os.listdir(own)) == ["10", "5"]
  allowed = restored_by(workdir, local, expected=other_seed, allow=True)
  assert allowed == local_tier.Restored(local_tier.LOCAL, 10)


def test_a_damaged_newest_persistent_checkpoint_leaves_a_newer_local_step(tmp_path, caplog):
  """Persistent 16, 24, 32 (32's metadata cut), local 25, 30: restores local 30, sets 32 aside,
  keeps 25 and 30."""
  workdir, local = tmp_path / "w", tmp_path / "local"
  start = Start(workdir, local).save(16, 24, 32, persistent=True).save(25, 30)
  start.close()
  metadata = workdir / "checkpoints" / "32" / "state" / "_METADATA"
  os.truncate(metadata, 10)
  assert restored_by(workdir, local) == local_tier.Restored(local_tier.LOCAL, 30)
  assert sorted(os.listdir(start.tier.own)) == ["25", "30"]
  assert sorted(os.listdir(workdir / "checkpoints")) == ["16", "24"]
  assert "the checkpoint of step 32" in caplog.text and "cannot be read" in caplog.text


def test_two_runs_on_one_local_dir_keep_each_others_steps(tmp_path, monkeypatch):
  """Two runs at once on one local directory: each prunes only its own steps."""
  monkeypatch.setattr(local_tier, "KEEP_STEPS", 1)
  local = tmp_path / "local"
  one, two = Start(tmp_path / "one", local), Start(tmp_path / "two", local)
  for step in (5, 10, 15):
    one.save(step)
    two.save(step + 1)
  one.close()
  two.close()
  assert sorted(os.listdir(one.tier.own)) == ["15"] and sorted(os.listdir(two.tier.own)) == ["16"]
  assert restored_by(tmp_path / "one", local) == local_tier.Restored(local_tier.LOCAL, 15)
  assert restored_by(tmp_path / "two", local) == local_tier.Restored(local_tier.LOCAL, 16)


def test_a_full_local_tier_skips_the_save_and_training_goes_on(tmp_path, caplog):
  """A real 3 MiB tmpfs as the local directory and a 1 MiB state: two steps fit, the third
  save is one warning naming config.local_checkpoint_dir and its free space, no error."""
  local = tmp_path / "tmpfs"
  local.mkdir()
  subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(local)], check=True)
  try:
    big = {"w": jax.device_put(np.ones((512, 512), np.float32), SHARDED)}
    config = config_lib.defaults()
    config.local_checkpoint_dir = str(local)
    into = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), big)
    tier = local_tier.open_tier(config, storage.path(str(tmp_path / "w")), into, 0, 1)
    for step in (5, 10, 15):
      tier.save(step, big, RECORD)
    assert sorted(os.listdir(tier.own)) == ["10", "5"]  # 15 did not fit; nothing half-written.
    assert f"cannot write step 15 to config.local_checkpoint_dir={local} (No space left" in (
      caplog.text
    ), caplog.text
    assert "MiB free of 3.0 MiB" in caplog.text
    assert local_tier.restore_newest(
      tier, checkpoint_lib.Checkpoints(storage.path(str(tmp_path / "w")), keep=1), into, RECORD
    )[0] == local_tier.Restored(local_tier.LOCAL, 10)
  finally:
    subprocess.run(["umount", str(local)], check=True)


def test_a_read_only_local_dir_is_one_line_before_any_compute(tmp_path):
  local = tmp_path / "ro"
  local.mkdir()
  subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(local)], check=True)
  try:
    config = config_lib.defaults()
    config.local_checkpoint_dir = str(local)
    with pytest.raises(
      UsageError, match=r"^config\.local_checkpoint_dir=.* cannot be used on"
    ) as e:
      local_tier.open_tier(config, storage.path(str(tmp_path / "w")), target(), 0, 1)
    assert "Read-only file system" in str(e.value) and "\n" not in str(e.value)
  finally:
    subprocess.run(["umount", str(local)], check=True)


def test_the_peer_exchange_moves_a_blob_longer_than_a_chunk(monkeypatch):
  """Lengths go as 64 bits and the bytes in chunks: a 10,000-byte blob in 4,096-byte chunks."""
  monkeypatch.setattr(local_tier, "EXCHANGE_CHUNK_BYTES", 4096)
  blob = np.random.default_rng(0).integers(0, 256, 10_000, np.uint8).tobytes()
  assert local_tier._exchange(blob, shift=-1) == blob  # pylint: disable=protected-access
  assert local_tier._exchange(b"", shift=1) == b""  # pylint: disable=protected-access


@pytest.mark.parametrize(
  "overrides, says",
  [
    ({"local_checkpoint_dir": "/dev/shm/launcher"}, "go together: set both"),
    ({"local_checkpoint_every_steps": 5}, "go together: set both"),
    (
      {"local_checkpoint_dir": "/dev/shm/x", "local_checkpoint_every_steps": -3},
      "config.local_checkpoint_every_steps=-3 must be 0 or more",
    ),
    (
      {
        "local_checkpoint_dir": "/dev/shm/x",
        "local_checkpoint_every_steps": 5,
        "steps_per_call": 2,
      },
      "config.local_checkpoint_every_steps=5 is not a multiple of config.steps_per_call=2",
    ),
  ],
)
def test_a_local_tier_config_that_cannot_work_is_one_line(overrides, says):
  config = config_lib.defaults()
  config.update(workload="classifier", num_steps=40, log_every_steps=2, eval_every_steps=0)
  config.update(checkpoint_every_steps=20, **overrides)
  with pytest.raises(UsageError, match=re.escape(says)) as e:
    config_lib.check(config)
  assert "go together" in says or "go together" not in str(e.value), str(e.value)


def test_a_local_directory_that_cannot_be_made_is_one_line(tmp_path):
  (tmp_path / "a_file").write_text("")
  config = config_lib.defaults()
  config.update(local_checkpoint_dir=str(tmp_path / "a_file" / "local"))
  with pytest.raises(UsageError, match=r"^config\.local_checkpoint_dir=.* cannot be used on") as e:
    local_tier.open_tier(config, storage.path(str(tmp_path / "run")), target(), 0, 1)
  assert "\n" not in str(e.value) and "/dev/shm/launcher" in str(e.value)


def test_the_report_names_where_each_start_restored_from():
  records = [
    {"event": "start", "first_step": 0},
    {"event": "first_step", "restored_from": "", "restore_s": 0.0},
    {"event": "start", "first_step": 35},
    {"event": "first_step", "restored_from": "from the local tier, step 35", "restore_s": 0.4},
    {"event": "start", "first_step": 20},  # Killed before its first step: not a restore shown.
  ]
  assert report.restores(records) == [
    {"first_step": 0, "restored_from": "", "restore_s": 0.0},
    {"first_step": 35, "restored_from": "from the local tier, step 35", "restore_s": 0.4},
  ]
