"""Who a process is in its job, read from real-looking environments of each kind of cluster."""

import pytest

from launcher import cluster
from launcher.errors import UsageError

SLURM_STEP = {
  "SLURM_JOB_ID": "4242",
  "SLURM_STEP_NODELIST": "node[001-002]",
  "SLURM_NTASKS": "2",
  "SLURM_PROCID": "1",
  "SLURM_LOCALID": "0",
}


def test_alone_is_no_job():
  assert cluster.detect(environ={}) is None


def test_flags_win_over_the_environment():
  job = cluster.detect(
    coordinator_address="10.0.0.1:1234",
    num_processes=2,
    process_id=0,
    environ={**SLURM_STEP, "JAX_COORDINATOR_ADDRESS": "x:1"},
  )
  assert job == cluster.Job("flags", "10.0.0.1:1234", 2, 0, None)


def test_flags_must_come_together():
  with pytest.raises(UsageError, match="missing: --coordinator_address, --process_id"):
    cluster.detect(num_processes=2, environ={})


@pytest.mark.parametrize("num_processes, process_id", [(0, 0), (2, 2), (2, -1)])
def test_a_job_shape_given_by_flags_must_make_sense(num_processes, process_id):
  with pytest.raises(
    UsageError,
    match=f"--num_processes={num_processes} --process_id="
    f"{process_id}: a job has at least one process, and --process_id counts "
    "from 0 to --num_processes-1",
  ):
    cluster.detect(
      coordinator_address="10.0.0.1:1234",
      num_processes=num_processes,
      process_id=process_id,
      environ={},
    )
  with pytest.raises(UsageError, match="missing: --coordinator_address, --process_id"):
    cluster.detect(num_processes=0, environ={})  # 0 is a value given, not "no flag".


def test_jax_environment():
  job = cluster.detect(
    environ={
      "JAX_COORDINATOR_ADDRESS": "127.0.0.1:5000",
      "JAX_NUM_PROCESSES": "2",
      "JAX_PROCESS_ID": "1",
    }
  )
  assert job == cluster.Job("env", "127.0.0.1:5000", 2, 1, None)
  with pytest.raises(UsageError, match="JAX_NUM_PROCESSES and JAX_PROCESS_ID"):
    cluster.detect(environ={"JAX_COORDINATOR_ADDRESS": "127.0.0.1:5000"})


def test_slurm_step_with_several_tasks():
  assert cluster.detect(environ=SLURM_STEP, local_device_ids=(0, 1)) == cluster.Job(
    "slurm", f"node001:{4242 % 4096 + 61440}", 2, 1, (0, 1)
  )
  assert cluster.detect(environ={**SLURM_STEP, "SLURM_NTASKS": "1"}) is None


def test_bare_python_in_an_sbatch_script_warns_and_runs_alone(caplog):
  assert cluster.detect(environ={"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2"}) is None
  assert "through `srun`" in caplog.text


def test_open_mpi():
  environ = {"OMPI_MCA_orte_hnp_uri": "123.0;tcp://127.0.0.1:4000", "OMPI_COMM_WORLD_SIZE": "2"}
  assert cluster.detect(environ=environ).source == "openmpi"


@pytest.mark.parametrize(
  "hostlist, hosts",
  [
    ("node001", ["node001"]),
    ("node[001-004,007]", ["node001", "node002", "node003", "node004", "node007"]),
    ("gpu-a[1-2],cpu[09-11]", ["gpu-a1", "gpu-a2", "cpu09", "cpu10", "cpu11"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("a1,b2,c[3]", ["a1", "b2", "c3"]),
  ],
)
def test_slurm_hostlists(hostlist, hosts):
  assert cluster.expand_hostlist(hostlist) == hosts


def test_slurm_task_counts():
  assert cluster.expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
  assert cluster.expand_tasks_per_node("8") == [8]
  with pytest.raises(UsageError, match="cannot read SLURM task counts"):
    cluster.expand_tasks_per_node("2(3)")


# `sbatch --nodes=4 --ntasks=7`: 2,2,2,1 tasks on node[001-003,007]; this task is rank 5.
SLURM_4_NODES = {
  "SLURM_JOB_ID": "80001",
  "SLURM_STEP_NODELIST": "node[001-003,007]",
  "SLURM_NTASKS": "7",
  "SLURM_STEP_NUM_TASKS": "7",
  "SLURM_PROCID": "5",
  "SLURM_LOCALID": "1",
  "SLURMD_NODENAME": "node003",
  "SLURM_STEP_TASKS_PER_NODE": "2(x3),1",
}


def test_slurm_coordinator_is_the_first_node_on_jax_port():
  job = cluster.detect(environ=SLURM_4_NODES)
  assert job == cluster.Job("slurm", f"node001:{80001 % 4096 + 61440}", 7, 5, None)
  job = cluster.detect(environ={**SLURM_4_NODES, "JAX_COORDINATOR_PORT": "7777"})
  assert job.coordinator_address == "node001:7777"


def test_slurm_one_task_per_gpu():
  """--gpus-per-task=1 with --gpu-bind=none: each task sees every GPU and takes its local rank's."""
  environ = {**SLURM_4_NODES, "SLURM_STEP_GPUS": "4,5"}
  assert cluster.detect(environ=environ).local_device_ids == (5,)
  environ = {**SLURM_4_NODES, "CUDA_VISIBLE_DEVICES": "4,5"}
  assert cluster.detect(environ=environ).local_device_ids == (1,)
  # SLURM bound one GPU to the task: it is the only one jax sees.
  environ = {**SLURM_4_NODES, "CUDA_VISIBLE_DEVICES": "3"}
  assert cluster.detect(environ=environ).local_device_ids == (0,)


def test_slurm_one_task_per_node_sees_every_gpu():
  environ = {
    "SLURM_JOB_ID": "9",
    "SLURM_STEP_NODELIST": "gpu[1-2]",
    "SLURM_NTASKS": "2",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "0",
    "SLURMD_NODENAME": "gpu2",
    "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
    "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7",
  }
  assert cluster.detect(environ=environ).local_device_ids == tuple(range(8))
  environ["SLURM_STEP_GPUS"], environ["CUDA_VISIBLE_DEVICES"] = "0,1,2,3", ""
  assert cluster.detect(environ=environ).local_device_ids == (0, 1, 2, 3)
  assert cluster.detect(environ=environ, one_process_per="device").local_device_ids == (0,)
  assert cluster.detect(environ=environ, local_device_ids=(2,)).local_device_ids == (2,)


def test_num_processes_that_disagrees_with_slurm():
  with pytest.raises(
    UsageError,
    match=r"--num_processes=4 disagrees with the scheduler, which "
    r"started 7 processes for this job: drop --num_processes or make it 7",
  ):
    cluster.detect(
      coordinator_address="node001:1234", num_processes=4, process_id=0, environ=SLURM_4_NODES
    )
  with pytest.raises(UsageError, match="JAX_NUM_PROCESSES=2 disagrees"):
    cluster.detect(environ={**SLURM_4_NODES, "JAX_NUM_PROCESSES": "2"})


@pytest.mark.parametrize("address", ["127.0.0.1:1234", "localhost:1234", "[::1]:1234"])
def test_loopback_coordinator_refused_when_the_job_spans_hosts(address):
  with pytest.raises(UsageError, match=r"loopback address, but this job spans 4 hosts \(node001"):
    cluster.detect(environ={**SLURM_4_NODES, "JAX_COORDINATOR_ADDRESS": address})
  one_host = {
    **SLURM_4_NODES,
    "SLURM_STEP_NODELIST": "localhost",
    "JAX_COORDINATOR_ADDRESS": address,
  }
  assert cluster.detect(environ=one_host).coordinator_address == address
