"""Elastic runs (launcher.local --min_processes, --host_check): a host lost for good, the job
going on with fewer processes and the same global batch, and growing back when it returns; the
losses against the uninterrupted run's."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading

import pytest

from launcher import config as config_lib
from launcher import report, storage, supervise, train
from launcher.errors import UsageError
from tests.helpers import REPO, finish, load_config, read_metrics, start, wait_for

NUMBERS_ARGS = (
  "--config=tests/numbers_config.py",
  "--config.batch_size=64",
  "--config.num_steps=100",
  "--config.checkpoint_every_steps=10",
  "--config.log_every_steps=1",
  "--config.warmup_steps=10",
)


def process_pid(runner_pid: int, process: int) -> int:
  """The pid of the runner's child that is process `process` of its job (JAX_PROCESS_ID)."""
  for child in _children(runner_pid):
    with open(f"/proc/{child}/environ", "rb") as f:
      if f"JAX_PROCESS_ID={process}".encode() in f.read().split(b"\0"):
        return child
  raise AssertionError(f"the runner has no process {process}")


def _children(pid: int) -> list[int]:
  with open(f"/proc/{pid}/task/{pid}/children") as f:
    return [int(child) for child in f.read().split()]


def host_records(workdir) -> list[dict]:
  """Process 0's host records, oldest first: the whole lines only (a run may be writing one)."""
  path = workdir / "hosts" / "process_0.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().split("\n")[:-1]]


def host_starts(workdir) -> list[dict]:
  """Process 0's start records, oldest first."""
  return [r for r in host_records(workdir) if r["event"] == "start"]


def reported_after_start(workdir, process_count: int, step: int) -> bool:
  """Whether process 0's latest start ran on `process_count` processes and reported `step`."""
  records = host_records(workdir)
  starts = [i for i, r in enumerate(records) if r["event"] == "start"]
  if not starts or records[starts[-1]]["process_count"] != process_count:
    return False
  return any(r["event"] == "report" and r["step"] >= step for r in records[starts[-1] :])


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory) -> dict[int, float]:
  """The loss at every step of the uninterrupted run of NUMBERS_ARGS, in this process (8 devices:
  by invariant 2 the same as any layout's)."""
  workdir = tmp_path_factory.mktemp("reference")
  config = load_config("../tests/numbers_config")
  config.update(
    {arg.split("=")[0][len("--config.") :]: int(arg.split("=")[1]) for arg in NUMBERS_ARGS[1:]}
  )
  train.run(config, str(workdir))
  return {r["step"]: r["loss"] for r in read_metrics(str(workdir)) if "loss" in r}


def test_microbatches_keep_the_per_device_batch():
  # 64 over 8 devices is 8 a device; over 4 it is 16, kept as 2 of 8.
  assert config_lib.microbatches_to_keep(64, 8, 8) == 1
  assert config_lib.microbatches_to_keep(64, 4, 8) == 2
  assert config_lib.microbatches_to_keep(64, 2, 8) == 4
  assert config_lib.microbatches_to_keep(64, 6, 8) is None  # 3 x 2 devices do not divide 64.
  assert config_lib.microbatches_to_keep(48, 6, 6) == 2  # 8 a device: 2 microbatches of 4.
  assert config_lib.microbatches_to_keep(36, 4, 3) == 3  # 9 a device: 3 microbatches of 3.
  assert config_lib.microbatches_to_keep(28, 4, 6) == 7  # 7 a device: only 7 of 1 fit.


def test_the_shape_is_the_most_healthy_slots_that_keep_the_batch():
  lines = []
  healthy = {0: True, 1: True, 2: True, 3: True}
  elastic = supervise.Elastic(
    slot_count=4,
    min_count=2,
    devices_per_slot=2,
    batch_size=64,
    grad_accum_steps=1,
    failure=lambda slot: None if healthy[slot] else f"slot {slot} is down",
    failed_starts_lost=2,
    resize_interval=0,
    check_interval=0,
    prefix="[test]",
  )
  supervise_say, supervise.say = supervise.say, lines.append
  try:
    assert elastic.next_shape() == supervise.Shape((0, 1, 2, 3), 1) and not lines
    healthy[3] = False
    assert elastic.after_failure(3, trained=True)
    assert elastic.next_shape() == supervise.Shape((0, 1), 2)
    assert lines[-1] == (
      "[test] host 3 is gone: continuing on 2 processes x 2 devices; global batch 64 kept as "
      "2 microbatches"
    )
    # Slot 1's process fails before its first step twice in a row: lost, though it checks fine.
    assert not elastic.after_failure(1, trained=False)
    assert elastic.next_shape() == supervise.Shape((0, 1), 2)
    assert elastic.after_failure(1, trained=False)
    assert elastic.next_shape() == supervise.Shape((0, 2), 2)  # Slot 2 was healthy, unused.
    assert lines[-1].startswith("[test] host 1 is gone: continuing on 2 processes")
    healthy[2] = False
    assert elastic.after_failure(1, trained=True)
    assert elastic.next_shape() is None
    assert lines[-1] == (
      "[test] host 2 is gone: 1 healthy host(s) left, fewer than --min_processes=2; giving up"
    )
    # Slot 3 passes again: grown back to (0, 3) once the resize interval allows.
    healthy[3] = True
    elastic.shape = supervise.Shape((0,), 8)
    wait_for(elastic.should_grow, 10, "slot 3 back")
    assert elastic.next_shape() == supervise.Shape((0, 3), 2)
    assert lines[-1] == (
      "[test] host 3 is back: the job saves, then continues on 2 processes x 2 devices; global "
      "batch 64 kept as 2 microbatches"
    )
  finally:
    supervise.say = supervise_say


def _elastic(failure, **kwargs) -> supervise.Elastic:
  """4 slots x 2 devices, global batch 64, at least 2: the issue's job."""
  return supervise.Elastic(
    **{
      "slot_count": 4,
      "min_count": 2,
      "devices_per_slot": 2,
      "batch_size": 64,
      "grad_accum_steps": 1,
      "failure": failure,
      "failed_starts_lost": 3,
      "resize_interval": 0,
      "check_interval": 0,
      "prefix": "[test]",
      **kwargs,
    }
  )


def _asked_to_grow(elastic: supervise.Elastic) -> bool:
  """`should_grow` once the check it starts beside the job has answered."""
  assert not elastic.should_grow()
  elastic._pending[0].join(30)  # pylint: disable=protected-access
  return elastic.should_grow()


def test_a_flapping_host_is_taken_back_at_most_once_per_resize_interval(monkeypatch, capsys):
  # Slot 3 passes when asked beside the job, then fails the check before the start (it flaps).
  now = [1000.0]
  monkeypatch.setattr(supervise.time, "monotonic", lambda: now[0])
  down = {3}
  elastic = _elastic(lambda slot: "down" if slot in down else None, resize_interval=30)
  assert elastic.next_shape() == supervise.Shape((0, 1), 2)
  now[0] += 31
  down.clear()
  assert _asked_to_grow(elastic)
  down.add(3)
  assert elastic.next_shape() == supervise.Shape((0, 1), 2)
  down.clear()
  for seconds in (1, 10, 29):  # The grow at 1031 counts: no other before 1061.
    now[0] = 1031 + seconds
    assert not _asked_to_grow(elastic)
  now[0] = 1061
  assert _asked_to_grow(elastic)
  assert elastic.next_shape() == supervise.Shape((0, 1, 2, 3), 1)
  gone = (
    "[test] host 3 is gone: continuing on 2 processes x 2 devices; global batch 64 kept as "
    "2 microbatches"
  )
  back = (
    "[test] host 3 is back: the job saves, then continues on 4 processes x 2 devices; global "
    "batch 64 kept as 1 microbatch"
  )
  assert capsys.readouterr().out.splitlines() == [gone, back, gone, back]


def test_the_shape_fits_the_mesh_and_a_fixed_mesh_is_refused_up_front():
  from launcher import local  # pylint: disable=import-outside-toplevel

  # Batch 48 on 4 x 2 (6 a device): 3 slots keep it (8 a device as 2 microbatches of 4), but
  # fsdp:4 does not divide their 6 devices: 2 slots it is (12 a device as 2 of 6).
  elastic = _elastic(
    lambda slot: "down" if slot == 3 else None,
    batch_size=48,
    parallel="fsdp",
    mesh="data:-1,fsdp:4",
  )
  assert elastic.next_shape() == supervise.Shape((0, 1), 2)
  assert _elastic(lambda slot: None, batch_size=48).fit([0, 1, 2]) == supervise.Shape((0, 1, 2), 2)
  batch = local.JobBatch(64, 1, "fsdp", "data:4,fsdp:2")
  with pytest.raises(UsageError) as refused:
    local.check_mesh_can_shrink(batch, count=4, min_count=2, devices=2)
  assert str(refused.value) == (
    "config.mesh='data:4,fsdp:2' fits only the job's 4 processes x 2 devices, so it cannot "
    "shrink to --min_processes=2: give one axis as -1 (the devices left, e.g. data:-1), or leave "
    "--min_processes out"
  )
  local.check_mesh_can_shrink(batch._replace(mesh="data:-1,fsdp:2"), 4, 2, 2)
  local.check_mesh_can_shrink(batch, count=4, min_count=4, devices=2)  # No shrinking asked.
  local.check_mesh_can_shrink(batch._replace(parallel="shard_map"), 4, 2, 2)


@pytest.mark.slow  # Starts processes.
def test_a_host_check_says_why_it_fails_and_one_failing_everywhere_is_bad_input(monkeypatch):
  assert supervise.host_check_failure("test {slot} != 3", 0) is None
  assert supervise.host_check_failure("test {slot} != 3", 3) == "`test 3 != 3` exited with 1"
  assert supervise.host_check_failure("/nonexistent/check {slot}", 1) == (
    "`/nonexistent/check 1` exited with 127 (command not found)"
  )
  monkeypatch.setattr(supervise, "HOST_CHECK_TIMEOUT_S", 0.5)
  assert supervise.host_check_failure("sleep 30 # {slot}", 2) == (
    "`sleep 30 # 2` did not answer within 0.5 s"
  )
  elastic = _elastic(lambda slot: supervise.host_check_failure("exit 3 # {slot}", slot))
  with pytest.raises(UsageError) as refused:
    elastic.next_shape()
  assert str(refused.value) == (
    "--host_check fails for every slot at the start (`exit 3 # 0` exited with 3): fix the "
    "command ({slot} is replaced by the slot's index; exit 0 means healthy), or leave "
    "--host_check out"
  )


def test_every_host_gone_after_the_start_says_so(capsys):
  down = set()
  elastic = _elastic(lambda slot: f"`check {slot}` exited with 1" if slot in down else None)
  assert elastic.next_shape() == supervise.Shape((0, 1, 2, 3), 1)
  down.update(range(4))
  assert elastic.after_failure(0, trained=True)
  assert elastic.next_shape() is None
  assert capsys.readouterr().out.splitlines() == [
    "[test] hosts 0, 1, 2, 3 are gone: no healthy host left (`check 0` exited with 1); giving up"
  ]


@pytest.mark.slow  # Starts processes.
def test_a_resize_whose_save_does_not_finish_says_what_it_resumes_from(tmp_path, capsys):
  """The grow's notice reaches processes that do not save (they ignore SIGTERM) within the
  grace: killed, and the line says so and where the next start resumes from."""
  down = {3}
  elastic = _elastic(lambda slot: "down" if slot in down else None)
  unsaving = [sys.executable, "-c", "import signal, time; signal.signal(15, 1); time.sleep(60)"]
  starts = []

  def start_job():
    starts.append(elastic.shape)
    command = unsaving if len(starts) == 1 else ["true"]
    down.clear()
    return supervise.ProcessGroup(
      [command] * len(elastic.shape.slots), log_dir=str(tmp_path), grace=1.0, prefix="[test]"
    )

  handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
  try:
    code = supervise.supervise(
      start_job,
      workdir=str(tmp_path / "run"),
      max_restarts=0,
      backoff_seconds=0,
      prefix="[test]",
      elastic=elastic,
    )
  finally:
    for signum, handler in handlers.items():
      signal.signal(signum, handler)
  assert code == 0 and starts == [supervise.Shape((0, 1), 2), supervise.Shape((0, 1, 2, 3), 1)]
  assert (
    "[test] process 0 was killed by SIGKILL before its first step before it saved for the resize "
    "(a longer --grace_seconds lets the save finish); resuming from the start (no checkpoint "
    "yet) without counting it"
  ) in capsys.readouterr().out.splitlines()


def _running(argument: str) -> list[int]:
  """The pids of processes with `argument` on their command line."""
  pids = []
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        if argument.encode() in f.read().split(b"\0"):
          pids.append(int(pid))
    except OSError:
      continue
  return pids


@pytest.mark.slow  # Starts processes.
def test_the_runner_does_not_wait_for_a_hanging_check_of_a_lost_host(tmp_path):
  """A lost slot's check that hangs while the job finishes: the runner exits at once (not after
  HOST_CHECK_TIMEOUT_S), and the check dies with it."""
  marker = str(tmp_path / "hanging-check")
  hanging = f"exec {sys.executable} -c 'import time; time.sleep(300)' {marker} # {{slot}}"
  script = (
    "import time\n"
    "from launcher import supervise\n"
    f"check = {hanging!r}\n"
    "elastic = supervise.Elastic(slot_count=2, min_count=1, devices_per_slot=1, batch_size=2,\n"
    "  grad_accum_steps=1, failure=lambda slot: supervise.host_check_failure(check, slot),\n"
    "  failed_starts_lost=1, resize_interval=0, check_interval=0, prefix='')\n"
    "elastic.lost = {1}\n"
    "elastic.should_grow()\n"
    "time.sleep(2)\n"
  )
  runner = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
  try:
    wait_for(lambda: _running(marker), 20, "the hanging check to start", runner)
    assert runner.wait(timeout=40) == 0
  finally:
    if runner.poll() is None:
      runner.kill()
      runner.wait()
  wait_for(lambda: not _running(marker), 10, "the check to die with the runner")


@pytest.mark.slow
def test_a_lost_host_shrinks_the_job_and_its_return_grows_it_with_the_same_losses(
  tmp_path, reference_losses
):
  """4 processes x 2 devices, global batch 64; slot 3 made unhealthy and killed at step ~25:
  the job goes on as 2 x 2 with 2 microbatches; slot 3 healthy again at ~50: back to 4 x 2
  after a save. Every reported loss equals the uninterrupted run's (1 x 8, which invariant 2
  makes the 4 x 2 run's)."""
  workdir, log, lost = tmp_path / "run", tmp_path / "run.log", tmp_path / "lost_3"
  runner = start(
    [
      sys.executable,
      "-m",
      "launcher.local",
      "--num_processes=4",
      "--devices_per_process=2",
      "--grace_seconds=20",
      "--min_processes=2",
      f"--host_check=test ! -e {tmp_path}/lost_{{slot}}",
      "--host_check_interval_seconds=0.5",
      "--resize_interval_seconds=2",
      "--",
      *NUMBERS_ARGS,
      "--config.batch_seconds=0.1",
      f"--workdir={workdir}",
    ],
    str(log),
    devices=2,
  )
  try:
    wait_for(lambda: reported_after_start(workdir, 4, 25), 120, "step 25 on 4 processes", runner)
    lost.touch()
    os.kill(process_pid(runner.pid, 3), signal.SIGKILL)
    wait_for(lambda: reported_after_start(workdir, 2, 50), 120, "step 50 on 2 processes", runner)
    lost.unlink()
    assert finish(runner, 120) == 0, log.read_text()[-3000:]
  finally:
    if runner.poll() is None:
      os.killpg(runner.pid, signal.SIGKILL)
      runner.wait()
  output = log.read_text()
  assert (
    "[local] host 3 is gone: continuing on 2 processes x 2 devices; global batch 64 kept as "
    "2 microbatches" in output
  ), output[-3000:]
  assert (
    "[local] host 3 is back: the job saves, then continues on 4 processes x 2 devices; global "
    "batch 64 kept as 1 microbatch" in output
  )
  starts = host_starts(workdir)
  assert [(s["process_count"], s["devices"]) for s in starts] == [(4, 2), (2, 2), (4, 2)]
  shrunk_at, grown_at = starts[1]["first_step"], starts[2]["first_step"]
  assert shrunk_at in (20, 30) and grown_at > 50
  rows = read_metrics(str(workdir))
  shapes = [
    (r["process_count"], r["devices_per_process"], r["grad_accum_steps"])
    for r in rows
    if "process_count" in r
  ]
  assert shapes == [(4, 2, 1), (2, 2, 2), (4, 2, 1)]
  losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
  assert sorted(losses) == sorted(reference_losses) == list(range(1, 101))
  assert losses == pytest.approx(reference_losses, rel=1e-5)
  shapes = report.starts(report.host_records(storage.path(str(workdir)))[0])
  assert [(r["process_count"], r["grad_accum_steps"]) for r in shapes] == [(4, 1), (2, 2), (4, 1)]
  assert shapes[0]["resize_s"] is None and all(r["resize_s"] > 0 for r in shapes[1:])


# `scontrol show node -o` of the local 2-node SLURM (scripts/slurm/local_cluster.sh, Slurm
# 22.05.8): idle; after `scontrol update state=drain`; after `state=down`; with its slurmd killed.
SCONTROL_IDLE = (
  "NodeName=n1 Arch=x86_64 CoresPerSocket=1  CPUAlloc=0 CPUEfctv=2 CPUTot=2 CPULoad=7.64 "
  "AvailableFeatures=(null) ActiveFeatures=(null) Gres=(null) NodeAddr=127.0.0.1 "
  "NodeHostName=localhost Port=17001 Version=22.05.8 OS=Linux 6.18.44-fc-v1045 #1 SMP "
  "PREEMPT_DYNAMIC @0  RealMemory=1 AllocMem=0 FreeMem=17429 Sockets=2 Boards=1 State=IDLE "
  "ThreadsPerCore=1 TmpDisk=0 Weight=1 Owner=N/A MCS_label=N/A Partitions=local  "
  "BootTime=2026-12-02T12:32:48 SlurmdStartTime=2026-12-02T15:57:33 "
  "LastBusyTime=2026-12-02T15:57:33 CfgTRES=cpu=2,mem=1M,billing=2 AllocTRES= CapWatts=n/a "
  "CurrentWatts=0 AveWatts=0 ExtSensorsJoules=n/s ExtSensorsWatts=0 ExtSensorsTemp=n/s\n"
)
SCONTROL_N2 = (
  "NodeName=n2 Arch=x86_64 CoresPerSocket=1  CPUAlloc=0 CPUEfctv=2 CPUTot=2 CPULoad=7.64 "
  "AvailableFeatures=(null) ActiveFeatures=(null) Gres=(null) NodeAddr=127.0.0.1 "
  "NodeHostName=localhost Port=17002 Version=22.05.8 OS=Linux 6.18.44-fc-v1045 #1 SMP "
  "PREEMPT_DYNAMIC @0  RealMemory=1 AllocMem=0 FreeMem=17429 Sockets=2 Boards=1 State={state} "
  "ThreadsPerCore=1 TmpDisk=0 Weight=1 Owner=N/A MCS_label=N/A Partitions=local  "
  "BootTime=2026-12-02T12:32:48 SlurmdStartTime=2026-12-02T15:57:33 "
  "LastBusyTime=2026-12-02T15:57:33 CfgTRES=cpu=2,mem=1M,billing=2 AllocTRES= CapWatts=n/a "
  "CurrentWatts=0 AveWatts=0 ExtSensorsJoules=n/s ExtSensorsWatts=0 ExtSensorsTemp=n/s"
  "{reason}\n"
)
REASON = " Reason=elastic-test [root@2026-12-02T15:58:03]"


def _slurm_elastic():
  sys.path.insert(0, os.path.join(REPO, "scripts", "slurm"))
  import elastic  # pylint: disable=import-outside-toplevel

  return elastic


@pytest.mark.parametrize(
  "state, reason, usable",
  [
    ("IDLE", "", ["n1", "n2"]),
    ("MIXED", "", ["n1", "n2"]),
    ("IDLE+DRAIN", REASON, ["n1"]),
    ("MIXED+DRAIN", REASON, ["n1"]),
    ("DOWN+DRAIN", REASON, ["n1"]),
    ("IDLE+NOT_RESPONDING", "", ["n1"]),
    ("IDLE*", "", ["n1"]),
    ("MIXED+FAIL", REASON, ["n1"]),
  ],
)
def test_slurm_nodes_are_judged_by_their_scontrol_state(state, reason, usable):
  shown = SCONTROL_IDLE + SCONTROL_N2.format(state=state, reason=reason)
  assert _slurm_elastic().usable_nodes(["n1", "n2"], shown) == usable


@pytest.mark.parametrize(
  "state, reason, starts, usable, tried",
  [
    # The survivor of a killed step whose task outlived SIGTERM past MessageTimeout.
    ("MIXED+NOT_RESPONDING", "", True, ["n1", "n2"], ["n2"]),
    ("IDLE*", "", True, ["n1", "n2"], ["n2"]),
    ("IDLE+NOT_RESPONDING", "", False, ["n1"], ["n2"]),
    ("MIXED+DRAIN", REASON, True, ["n1"], []),
    ("DOWN+NOT_RESPONDING", REASON, True, ["n1"], []),
  ],
)
def test_a_slurm_node_only_not_responding_is_usable_when_a_job_step_starts_there(
  state, reason, starts, usable, tried
):
  shown = SCONTROL_IDLE + SCONTROL_N2.format(state=state, reason=reason)
  asked = []

  def step_starts(node: str) -> bool:
    asked.append(node)
    return starts

  assert _slurm_elastic().usable_nodes(["n1", "n2"], shown, starts=step_starts) == usable
  assert asked == tried


def test_every_node_only_not_responding_is_tried_side_by_side():
  """A step kill flags every survivor at once: the probes run together (each waits at a barrier
  that only all of them together pass), and the nodes keep their order."""
  names = [f"n{i}" for i in range(2, 7)]
  shown = SCONTROL_IDLE + "\n".join(
    SCONTROL_N2.replace("NodeName=n2", f"NodeName={name}").format(
      state="MIXED+NOT_RESPONDING", reason=""
    )
    for name in names
  )
  together = threading.Barrier(len(names), timeout=30)

  def step_starts(node: str) -> bool:
    together.wait()
    return node != "n4"

  usable = _slurm_elastic().usable_nodes(["n1", *names], shown, starts=step_starts)
  assert usable == ["n1", "n2", "n3", "n5", "n6"]


def test_slurm_nodes_the_job_lost_and_the_shape_on_the_rest():
  elastic = _slurm_elastic()
  # A node the job no longer holds (SLURM removed it: DOWN under --no-kill) is lost too.
  assert elastic.usable_nodes(
    ["n1", "n2"], SCONTROL_IDLE + SCONTROL_N2.format(state="IDLE", reason=""), held=["n1"]
  ) == ["n1"]
  assert elastic.job_nodelist("JobId=3 JobName=x NodeList=n[1-2] BatchHost=n1") == "n[1-2]"
  # 4 nodes x 2 devices, global batch 64: 3 usable nodes run as 2 with 2 microbatches.
  assert elastic.fit(
    ["n1", "n2", "n4"], full_count=4, min_count=2, devices=2, batch=64, accum=1
  ) == (["n1", "n2"], 2)
  assert elastic.fit(["n1"], full_count=4, min_count=2, devices=2, batch=64, accum=1) is None


@pytest.mark.parametrize(
  "min_nodes, config, line",
  [
    (0, [], "MIN_NODES=0 is outside the allocation's 1 to 4 node(s): pass a MIN_NODES from 1 to 4"),
    (5, [], "MIN_NODES=5 is outside the allocation's 1 to 4 node(s): pass a MIN_NODES from 1 to 4"),
    (
      2,
      ["--config.parallel=fsdp", "--config.mesh=data:4,fsdp:2"],
      "config.mesh='data:4,fsdp:2' fits only the job's 4 processes x 2 devices, so it cannot "
      "shrink to MIN_NODES=2: give one axis as -1 (the devices left, e.g. data:-1), or leave "
      "MIN_NODES out",
    ),
  ],
)
def test_slurm_min_nodes_or_a_mesh_that_cannot_apply_is_one_line_and_exit_2(
  tmp_path, min_nodes, config, line
):
  # `scontrol show hostnames` of a comma-separated list, as SLURM's own expands it.
  scontrol = tmp_path / "bin" / "scontrol"
  scontrol.parent.mkdir()
  scontrol.write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && echo "$3" | tr , "\\n"\n')
  scontrol.chmod(0o755)
  shown = subprocess.run(
    [
      sys.executable,
      "scripts/slurm/elastic.py",
      "shape",
      f"--min_nodes={min_nodes}",
      "--devices_per_node=2",
      "--",
      *NUMBERS_ARGS,
      *config,
      f"--workdir={tmp_path / 'run'}",
    ],
    cwd=REPO,
    env={
      **os.environ,
      "PATH": f"{scontrol.parent}:{os.environ['PATH']}",
      "SLURM_JOB_NODELIST": "n1,n2,n3,n4",
      "SLURM_JOB_ID": "5",
    },
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert shown.returncode == 2, shown.stdout + shown.stderr
  assert shown.stderr.strip().splitlines() == [f"job 5: {line}"] and not shown.stdout


CLUSTER = os.path.join(REPO, "scripts", "slurm", "local_cluster.sh")


@pytest.fixture(scope="module")
def two_node_slurm():
  """A local SLURM of 2 nodes (2 slurmd on this machine), up for these tests and down after."""
  if os.geteuid() != 0:
    pytest.skip("a local SLURM needs root (packages, /etc/slurm/slurm.conf); .ci/run runs as root")
  env = {**os.environ, "LAUNCHER_SLURM_NODES": "2"}
  up = subprocess.run(
    [CLUSTER, "up"], env=env, capture_output=True, text=True, timeout=300, check=False
  )
  if up.returncode != 0 and not shutil.which("slurmctld"):
    pytest.skip(f"SLURM packages could not be installed here: {up.stderr.strip()[-500:]}")
  assert up.returncode == 0, up.stdout + up.stderr
  yield
  subprocess.run([CLUSTER, "down"], capture_output=True, timeout=60, check=False)


def _scontrol(*args: str) -> str:
  return subprocess.run(
    ["scontrol", *args], capture_output=True, text=True, timeout=30, check=True
  ).stdout


def _tasks_on(node: str, workdir) -> list[int]:
  """The launcher processes of `workdir`'s job that SLURM started on `node`."""
  pids = []
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        command = f.read()
      with open(f"/proc/{pid}/environ", "rb") as f:
        environ = f.read().split(b"\0")
    except OSError:
      continue
    if f"--workdir={workdir}".encode() in command and f"SLURMD_NODENAME={node}".encode() in environ:
      pids.append(int(pid))
  return pids


@pytest.mark.slow
def test_a_drained_slurm_node_shrinks_the_job_step_and_its_return_grows_it(
  two_node_slurm, tmp_path, reference_losses
):
  """sbatch --no-kill on 2 nodes x 1 task x 2 devices, MIN_NODES=1: node2 drained and its task
  killed at step ~30: the next step runs on node1 with 2 microbatches; node2 resumed at ~60: the
  step saves (USR1) and the next runs on both. Every loss equals the uninterrupted run's."""
  workdir, output = tmp_path / "run", tmp_path / "slurm.out"
  submitted = subprocess.run(
    [
      "sbatch",
      "--parsable",
      "--no-kill",
      "--nodes=2",
      "--ntasks-per-node=1",
      f"--output={output}",
      f"--export=ALL,LAUNCHER_PYTHON={sys.executable},DEVICES_PER_TASK=2,MIN_NODES=1,"
      "ELASTIC_CHECK_SECONDS=1,RESIZE_INTERVAL_SECONDS=2",
      "scripts/slurm/cpu.sbatch",
      *NUMBERS_ARGS,
      "--config.batch_seconds=0.1",
      f"--workdir={workdir}",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=60,
    check=False,
  )
  assert submitted.returncode == 0, submitted.stdout + submitted.stderr
  job = submitted.stdout.strip().split(";")[0]

  def running() -> bool:
    return bool(_scontrol("show", "job", job).count("JobState=RUNNING"))

  try:
    wait_for(lambda: reported_after_start(workdir, 2, 30), 180, "step 30 on 2 nodes")
    _scontrol("update", "nodename=node2", "state=drain", "reason=elastic-test")
    for pid in _tasks_on("node2", workdir):
      os.kill(pid, signal.SIGKILL)
    wait_for(lambda: reported_after_start(workdir, 1, 60), 180, "step 60 on 1 node")
    _scontrol("update", "nodename=node2", "state=resume")
    wait_for(lambda: not running(), 180, f"job {job} to end", interval=0.5)
  finally:
    subprocess.run(["scancel", job], timeout=30, check=False)
    subprocess.run(
      ["scontrol", "update", "nodename=node2", "state=resume"], timeout=30, check=False
    )
  text = output.read_text()
  assert " ExitCode=0:0" in _scontrol("show", "job", job), text[-3000:]
  assert (
    f"job {job}: node(s) node2 lost: continuing on 1 node(s) x 2 devices; global batch 64 kept "
    "as 2 microbatches" in text
  ), text[-3000:]
  assert f"job {job}: node(s) of node2 usable again: the job step saves" in text
  assert (
    f"job {job}: every node usable: continuing on 2 node(s) x 2 devices; global batch 64 kept "
    "as 1 microbatch" in text
  )
  assert f"job {job}: finished after 0 restart(s)" in text
  rows = read_metrics(str(workdir))
  shapes = [(r["process_count"], r["grad_accum_steps"]) for r in rows if "process_count" in r]
  assert shapes == [(2, 1), (1, 2), (2, 1)]
  losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
  assert losses == pytest.approx(reference_losses, rel=1e-5)


@pytest.mark.parametrize(
  "flags, config, line",
  [
    (
      ["--min_processes=3"],
      [],
      "--min_processes=3 is more than the job's 2 processes: pass at most 2",
    ),
    (
      ["--min_processes=1"],
      ["--config.parallel=fsdp", "--config.mesh=data:2,fsdp:2"],
      "config.mesh='data:2,fsdp:2' fits only the job's 2 processes x 2 devices, so it cannot "
      "shrink to --min_processes=1: give one axis as -1 (the devices left, e.g. data:-1), or "
      "leave --min_processes out",
    ),
    (
      ["--min_processes=1", "--host_check=/nonexistent/check {slot}"],
      [],
      "--host_check fails for every slot at the start (`/nonexistent/check 0` exited with 127 "
      "(command not found)): fix the command ({slot} is replaced by the slot's index; exit 0 "
      "means healthy), or leave --host_check out",
    ),
  ],
)
def test_elastic_bad_input_is_one_line_and_exit_2_before_any_start(tmp_path, flags, config, line):
  shown = subprocess.run(
    [
      sys.executable,
      "-m",
      "launcher.local",
      "--num_processes=2",
      "--devices_per_process=2",
      *flags,
      "--",
      *NUMBERS_ARGS,
      *config,
      f"--workdir={tmp_path / 'run'}",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert shown.returncode == 2, shown.stdout + shown.stderr
  assert shown.stderr.strip().splitlines() == [f"[local] error: {line}"]
  assert not (tmp_path / "run").exists()
