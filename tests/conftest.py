"""Eight simulated CPU devices for every test: XLA_FLAGS must be set before jax is imported."""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position


def pytest_configure(config):
  del config
  assert jax.local_device_count() == 8, "XLA_FLAGS was read after jax started"


@pytest.fixture(scope="session")
def straight(tmp_path_factory):
  """`straight(layout)`: the workdir of the uninterrupted 40-step run of tests/hooked_config.py
  as "1x8" (one process of 8 devices) or "2x4" (two of 4), made once per session."""
  from tests.helpers import finish, launcher_command, start  # pylint: disable=import-outside-toplevel

  runs = {}

  def run(layout: str) -> str:
    if layout not in runs:
      num_processes, devices = map(int, layout.split("x"))
      workdir = str(tmp_path_factory.mktemp("straight") / layout)
      process = start(
        launcher_command(
          "--config=tests/hooked_config.py",
          f"--workdir={workdir}",
          num_processes=num_processes,
          devices=devices,
        ),
        f"{workdir}.log",
        devices=devices,
      )
      assert finish(process, 180) == 0, open(f"{workdir}.log").read()[-3000:]
      runs[layout] = workdir
    return runs[layout]

  return run


# Each test module's area, as a marker: `python -m pytest -q tests -m slurm` runs one area alone.
AREAS = {
  "test_checkpoint": "checkpoints",
  "test_ctrl_c": "process_control",
  "test_corpus": "data",
  "test_data": "data",
  "test_elastic": "elastic",
  "test_faults": "faults",
  "test_fsdp": "sharding",
  "test_local_tier": "checkpoints",
  "test_multihost": "multihost",
  "test_process_control": "process_control",
  "test_recovery": "multihost",
  "test_slurm": "slurm",
  "test_storage": "gcs",
  "test_tensor": "sharding",
  "test_tpu_script": "tpu",
  "test_trackers": "trackers",
}


def pytest_collection_modifyitems(items):
  for item in items:
    area = AREAS.get(item.module.__name__.rsplit(".", 1)[-1])
    if area:
      item.add_marker(area)
    if "gcs" in getattr(item, "fixturenames", ()) and area != "gcs":
      item.add_marker("gcs")


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """A real GCS emulator (fake-gcs-server) for a test module's gs:// runs."""
  from tests.gcs_emulator import Emulator  # pylint: disable=import-outside-toplevel

  emulator = Emulator(
    tmp_path_factory.mktemp("gcs") / "root", tmp_path_factory.getbasetemp() / "fake-gcs-server.log"
  )
  yield emulator
  emulator.stop()
