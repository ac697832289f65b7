"""The world's faults, for real: a filesystem that fills up under a run, a flipped bit."""

import glob
import os
import subprocess

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.helpers import finish, launcher_command, load_params, losses_by_step, start

pytestmark = pytest.mark.slow  # Starts processes, mounts filesystems.

CONFIG = "--config=tests/hooked_config.py"
# About 0.3 MB a checkpoint: a 1 MiB filesystem holds three and fills during the fourth.
SMALL_RUN = [
  "--config.hidden_sizes=(256,)",
  "--config.checkpoint_every_steps=5",
  "--config.keep_checkpoints=20",
  "--config.log_every_steps=5",
]


@pytest.fixture
def small_filesystem(tmp_path):
  """A real 1 MiB tmpfs, mounted for the test and unmounted after; skipped where this user
  cannot mount one (not root, or a container without CAP_SYS_ADMIN)."""
  mount_point = tmp_path / "small"
  mount_point.mkdir()
  mounted = subprocess.run(
    ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
    capture_output=True,
    text=True,
    check=False,
  )
  if mounted.returncode != 0:
    pytest.skip(
      f"cannot mount a tmpfs here ({mounted.stderr.strip()}): the full-disk test needs "
      "root or CAP_SYS_ADMIN"
    )
  yield mount_point
  subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_disk_is_one_line_never_restarted_and_the_last_checkpoint_resumes(
  small_filesystem, tmp_path
):
  workdir = str(small_filesystem / "run")
  log = tmp_path / "full.log"
  runner = launcher_command(CONFIG, f"--workdir={workdir}", *SMALL_RUN, num_processes=2, devices=4)
  runner.insert(runner.index("--"), "--max_restarts=3")
  runner.insert(runner.index("--"), f"--process_logs={tmp_path / 'logs'}")
  assert finish(start(runner, log, devices=4), 180) == 74, log.read_text()[-3000:]
  output = log.read_text()
  errors = [line for line in output.splitlines() if "error: " in line]
  assert errors and all("the filesystem is full" in line for line in errors), errors
  assert "Traceback" not in output and "Event loop is closed" not in output
  first = errors[0]
  assert f"cannot write {workdir}/checkpoints/" in first and "MiB free of 1.0 MiB" in first
  assert (
    "is complete and kept. Free space there (or choose a --workdir with room), then run "
    "the same command to resume" in first
  )
  assert "its storage refused to write, which a restart cannot fix; not restarting" in output
  assert "restart 1/3" not in output
  complete = sorted(int(name) for name in os.listdir(f"{workdir}/checkpoints") if name.isdigit())
  assert complete and f"the checkpoint of step {complete[-1]} is complete and kept" in first

  # Room again (the same filesystem, grown): the same command resumes from that checkpoint and
  # ends as a run that never filled its disk.
  subprocess.run(["mount", "-o", "remount,size=16m", str(small_filesystem)], check=True)
  assert finish(start(runner, log, devices=4), 180) == 0, log.read_text()[-3000:]
  assert f"resuming from the checkpoint of step {complete[-1]}" in log.read_text()
  reference = str(tmp_path / "reference")
  assert (
    finish(
      start(
        launcher_command(CONFIG, f"--workdir={reference}", *SMALL_RUN, num_processes=2, devices=4),
        tmp_path / "ref.log",
        devices=4,
      ),
      180,
    )
    == 0
  )
  for a, b in zip(
    jax.tree.leaves(load_params(workdir, 40)), jax.tree.leaves(load_params(reference, 40))
  ):
    np.testing.assert_array_equal(a, b)
  resumed, straight = losses_by_step(workdir), losses_by_step(reference)
  assert [resumed[s] for s in range(complete[-1] + 5, 41, 5)] == [
    straight[s] for s in range(complete[-1] + 5, 41, 5)
  ]


def _state_by_key(step_dir):
  """Every array of a checkpoint's state as plain orbax restores it, keyed as digests name them."""
  state = ocp.PyTreeCheckpointer().restore(os.path.join(step_dir, "state"))
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(x) for path, x in leaves}


def _flip_a_bit_that_restores_silently(step_dir):
  """Flips one bit of an array data file where plain orbax still restores, with one array
  changed (most bits of a zstd stream decode to other values, no error): that array's key."""
  before = _state_by_key(step_dir)
  data_files = glob.glob(os.path.join(step_dir, "state", "ocdbt.process_*", "d", "*"))
  biggest = max(data_files, key=os.path.getsize)
  size = os.path.getsize(biggest)
  for tried in range(1, 40):
    position, bit = size * tried // 40, tried % 8
    with open(biggest, "r+b") as f:
      f.seek(position)
      byte = f.read(1)[0]
      f.seek(position)
      f.write(bytes([byte ^ (1 << bit)]))
    try:
      after = _state_by_key(step_dir)
    except Exception:  # pylint: disable=broad-except  # A flip zstd catches: try another.
      after = before
    changed = [key for key in before if not np.array_equal(before[key], after[key])]
    if changed:
      return changed
    with open(biggest, "r+b") as f:
      f.seek(position)
      f.write(bytes([byte]))
  raise AssertionError(f"no flipped bit of {biggest} restored silently")


@pytest.mark.filterwarnings("ignore:Sharding info not provided")
def test_a_flipped_bit_is_damage_and_the_previous_checkpoint_resumes(straight, tmp_path):
  """One flipped bit in step 30's array data, which plain orbax restores without a word: the
  resume names the array, sets step 30 aside and ends as the uninterrupted run."""
  workdir = str(tmp_path / "run")
  command = launcher_command(CONFIG, f"--workdir={workdir}", "--config.checkpoint_every_steps=10")
  log = tmp_path / "run.log"
  assert finish(start([*command, "--config.num_steps=30"], log), 180) == 0, log.read_text()[-3000:]
  checkpoints = os.path.join(workdir, "checkpoints")
  changed = _flip_a_bit_that_restores_silently(os.path.join(checkpoints, "30"))

  assert finish(start(command, log), 180) == 0, log.read_text()[-3000:]
  output = log.read_text()
  damage = [line for line in output.splitlines() if "cannot be read" in line]
  assert len(damage) == 1, damage
  assert (
    f"the checkpoint of step 30 in {checkpoints} cannot be read (Damaged: the bits of "
    in (damage[0])
  ), damage[0]
  named = damage[0].split("differ from those saved: ", 1)[1].split(");", 1)[0].split(", ")
  # The launcher names a list entry `opt_state/0/...`; the plain-orbax read here, `opt_state/[0]/...`.
  assert set(named) == {key.replace("[", "").replace("]", "") for key in changed}, (
    changed,
    damage[0],
  )
  assert f"moved it to {workdir}/damaged_checkpoints/30 and trying the one before" in damage[0]
  assert "resuming from the checkpoint of step 20" in output and "Traceback" not in output
  for a, b in zip(
    jax.tree.leaves(load_params(workdir, 40)), jax.tree.leaves(load_params(straight("1x8"), 40))
  ):
    np.testing.assert_array_equal(a, b)
