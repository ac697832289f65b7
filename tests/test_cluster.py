"""Who a process is in its job, read from real-looking environments of each kind of cluster."""

import pytest

from launcher import cluster
from launcher.errors import UsageError

SLURM_STEP = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "node[001-002]", "SLURM_NTASKS": "2",
              "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}


def test_alone_is_no_job():
  assert cluster.detect(environ={}) is None


def test_flags_win_over_the_environment():
  job = cluster.detect(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=2,
                       environ={**SLURM_STEP, "JAX_COORDINATOR_ADDRESS": "x:1"})
  assert job == cluster.Job("flags", "10.0.0.1:1234", 4, 2, None)


def test_flags_must_come_together():
  with pytest.raises(UsageError, match="missing: --coordinator_address, --process_id"):
    cluster.detect(num_processes=2, environ={})


def test_jax_environment():
  job = cluster.detect(environ={"JAX_COORDINATOR_ADDRESS": "127.0.0.1:5000",
                                "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"})
  assert job == cluster.Job("env", "127.0.0.1:5000", 2, 1, None)
  with pytest.raises(UsageError, match="JAX_NUM_PROCESSES and JAX_PROCESS_ID"):
    cluster.detect(environ={"JAX_COORDINATOR_ADDRESS": "127.0.0.1:5000"})


def test_slurm_step_with_several_tasks():
  assert cluster.detect(environ=SLURM_STEP, local_device_ids=(0, 1)) == cluster.Job(
      "slurm", local_device_ids=(0, 1))
  assert cluster.detect(environ={**SLURM_STEP, "SLURM_NTASKS": "1"}) is None


def test_bare_python_in_an_sbatch_script_warns_and_runs_alone(caplog):
  assert cluster.detect(environ={"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2"}) is None
  assert "through `srun`" in caplog.text


def test_open_mpi():
  environ = {"OMPI_MCA_orte_hnp_uri": "123.0;tcp://127.0.0.1:4000", "OMPI_COMM_WORLD_SIZE": "2"}
  assert cluster.detect(environ=environ).source == "openmpi"
