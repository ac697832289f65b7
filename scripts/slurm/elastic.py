"""The elastic part of the SLURM templates (common.sh with MIN_NODES=M): which nodes of the
allocation are usable, judged by `scontrol show node` (a node DOWN, DRAIN, FAIL or
NOT_RESPONDING is lost), and the shape the next job step runs on.

    python scripts/slurm/elastic.py shape --min_nodes=M --devices_per_node=D \
        --last_count=C -- LAUNCHER_ARGS
        prints shell assignments for common.sh: NODES (a nodelist), COUNT, GRAD_ACCUM, LOST and
        LINE (the line to say; empty when the shape did not change); exit 76 after its line when
        fewer than M usable nodes can keep the global batch; exit 2 after its line for a
        MIN_NODES outside 1..the allocation's nodes, or a config.mesh that cannot shrink to it
    python scripts/slurm/elastic.py back --lost=n2,n3
        exit 0 when a lost node is usable again, else 1
    python scripts/slurm/elastic.py usable --nodes=n1,n2
        exit 0 when every one of these nodes is usable, else 1 (a failed step lost one)

A node whose only lost flag is NOT_RESPONDING is tried with a job step of `true` there (`srun
--overlap`), usable when it starts: slurmctld sets that flag whenever one message to the node
times out and clears it only at the node's next message, and a step killed on a failed task
(srun --kill-on-bad-exit) times out on every node whose task outlives SIGTERM (its slurmstepd
answers after KillWait, default 30 s, past MessageTimeout, default 10 s).

The allocation's nodes are SLURM_JOB_NODELIST's, in its order; the job step runs on the first
COUNT usable ones. A node SLURM removed from the job (a DOWN node under --no-kill: `scontrol
show job`'s NodeList no longer has it) is lost for the rest of the allocation.
"""

import argparse
import concurrent.futures
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from launcher import config as config_lib  # pylint: disable=wrong-import-position
from launcher.errors import (  # pylint: disable=wrong-import-position
  EXIT_PEER_LOST,
  EXIT_USAGE,
  UsageError,
)

# Node state flags that take a node out of an elastic job (`scontrol show node -o`: State=IDLE,
# State=IDLE+DRAIN, State=DOWN+DRAIN, State=IDLE+NOT_RESPONDING, State=MIXED+FAIL, ...).
LOST_STATES = frozenset({"DOWN", "DRAIN", "FAIL", "NOT_RESPONDING"})
SCONTROL_TIMEOUT_S = 30


def node_states(show_node: str) -> dict[str, set[str]]:
  """{node: its state flags} from `scontrol show node -o` (one line a node). A trailing `*` (the
  short form of not responding) counts as NOT_RESPONDING."""
  states = {}
  for line in show_node.splitlines():
    name, state = re.search(r"NodeName=(\S+)", line), re.search(r"\bState=(\S+)", line)
    if name and state:
      flags = set(state[1].rstrip("*~#!%$@^-").split("+"))
      if state[1].endswith("*"):
        flags.add("NOT_RESPONDING")
      states[name[1]] = flags
  return states


def job_nodelist(show_job: str) -> str:
  """The nodes a job holds now (a SLURM host list), from `scontrol show job -o`: SLURM removes a
  failed node from a job that runs with --no-kill."""
  nodes = re.search(r"\bNodeList=(\S+)", show_job)
  return "" if not nodes or nodes[1] == "(null)" else nodes[1]


def usable_nodes(
  nodes: list[str],
  show_node: str,
  held: list[str] | None = None,
  starts: Callable[[str], bool] | None = None,
) -> list[str]:
  """The nodes among `nodes` (in their order) that `scontrol show node -o` shows usable: listed,
  in no lost state, and (given `held`, the nodes the job holds now) still the job's. Given
  `starts`, a node whose only lost flag is NOT_RESPONDING is usable when `starts(node)`; those
  nodes are tried side by side (a step kill flags every survivor at once)."""
  states = node_states(show_node)
  listed = [node for node in nodes if node in states and (held is None or node in held)]
  only_not_responding = [
    node for node in listed if states[node] & LOST_STATES == {"NOT_RESPONDING"}
  ]
  started = set()
  if starts is not None and only_not_responding:
    with concurrent.futures.ThreadPoolExecutor(len(only_not_responding)) as pool:
      started = {
        node
        for node, ok in zip(only_not_responding, pool.map(starts, only_not_responding), strict=True)
        if ok
      }
  return [node for node in listed if not states[node] & LOST_STATES or node in started]


def fit(
  usable: list[str],
  *,
  full_count: int,
  min_count: int,
  devices: int,
  batch: int,
  accum: int,
  parallel: str = "",
  mesh: str = "",
) -> tuple[list[str], int] | None:
  """The most usable nodes (at least `min_count`) whose devices split the global batch into
  per-device microbatches no larger than the full allocation's and fit config.mesh (under
  parallel=fsdp), and their microbatch count."""
  microbatch = batch // (full_count * devices) // accum
  for count in range(len(usable), min_count - 1, -1):
    microbatches = config_lib.microbatches_to_keep(batch, count * devices, microbatch)
    if microbatches and config_lib.mesh_fits(mesh, parallel, count, devices):
      return usable[:count], microbatches
  return None


def _scontrol(*args: str) -> str:
  return subprocess.run(
    ["scontrol", *args], capture_output=True, text=True, timeout=SCONTROL_TIMEOUT_S, check=True
  ).stdout


def step_starts(node: str) -> bool:
  """Whether a job step of `true` starts and ends on `node` within SCONTROL_TIMEOUT_S; says so
  when it does (the node shows NOT_RESPONDING)."""
  try:
    started = subprocess.run(
      ["srun", "--overlap", "--nodes=1", "--ntasks=1", f"--nodelist={node}", "true"],
      capture_output=True,
      timeout=SCONTROL_TIMEOUT_S,
      check=False,
    )
  except subprocess.TimeoutExpired:
    return False
  if started.returncode != 0:
    return False
  print(
    f"job {os.environ.get('SLURM_JOB_ID', '')}: {node} shows NOT_RESPONDING, but a job step "
    "starts there: still usable",
    file=sys.stderr,
  )
  return True


def hostnames(nodelist: str) -> list[str]:
  """Every node of a SLURM host list (`n[1-3]`), in its order."""
  return _scontrol("show", "hostnames", nodelist).split() if nodelist else []


def allocation() -> list[str]:
  """The nodes the job was given (SLURM_JOB_NODELIST, in its order)."""
  return hostnames(os.environ["SLURM_JOB_NODELIST"])


def usable_now(nodes: list[str]) -> list[str]:
  """The nodes among `nodes` that are usable now and still the job's."""
  # A job that shows no NodeList: the node states alone decide.
  held = hostnames(job_nodelist(_scontrol("show", "job", "-o", os.environ["SLURM_JOB_ID"])))
  return usable_nodes(nodes, _scontrol("show", "node", "-o"), held or None, starts=step_starts)


def shape(args, launcher_args: list[str]) -> int:
  from launcher.local import (  # pylint: disable=import-outside-toplevel
    check_mesh_can_shrink,
    job_batch,
  )

  nodes = allocation()
  job = f"job {os.environ.get('SLURM_JOB_ID', '')}"
  if not 1 <= args.min_nodes <= len(nodes):
    print(
      f"{job}: MIN_NODES={args.min_nodes} is outside the allocation's 1 to {len(nodes)} "
      f"node(s): pass a MIN_NODES from 1 to {len(nodes)}",
      file=sys.stderr,
    )
    return EXIT_USAGE
  job_config = job_batch(launcher_args)
  batch = job_config.batch_size
  try:
    check_mesh_can_shrink(
      job_config, len(nodes), args.min_nodes, args.devices_per_node, min_flag="MIN_NODES"
    )
  except UsageError as e:
    print(f"{job}: {e}", file=sys.stderr)
    return EXIT_USAGE
  usable = usable_now(nodes)
  lost = [node for node in nodes if node not in usable]
  chosen = fit(
    usable,
    full_count=len(nodes),
    min_count=args.min_nodes,
    devices=args.devices_per_node,
    batch=batch,
    accum=job_config.grad_accum_steps,
    parallel=job_config.parallel,
    mesh=job_config.mesh,
  )
  gone = f"node(s) {','.join(lost)} lost" if lost else "every node usable"
  if chosen is None:
    why = (
      "no usable node left"
      if not usable
      else f"{len(usable)} usable node(s) left, fewer than MIN_NODES={args.min_nodes}"
      if len(usable) < args.min_nodes
      else f"{len(usable)} usable node(s) left, and no count of them from "
      f"MIN_NODES={args.min_nodes} up splits global batch {batch} over "
      f"{args.devices_per_node} devices each without growing the per-device batch"
    )
    print(f"{job}: {gone}: {why}; giving up", file=sys.stderr)
    return EXIT_PEER_LOST
  used, microbatches = chosen
  line = ""
  if args.last_count and len(used) != args.last_count:
    line = (
      f"{gone}: continuing on {len(used)} node(s) x {args.devices_per_node} devices; global "
      f"batch {batch} kept as {microbatches} microbatch{'es' if microbatches > 1 else ''}"
    )
  for name, value in (
    ("NODES", ",".join(used)),
    ("COUNT", len(used)),
    ("GRAD_ACCUM", microbatches),
    ("LOST", ",".join(lost)),
    ("LINE", line),
  ):
    print(f"{name}={shlex.quote(str(value))}")
  return 0


def back(args) -> int:
  lost = [node for node in args.lost.split(",") if node]
  if not lost:
    return 1
  return 0 if usable_now(lost) else 1


def usable(args) -> int:
  nodes = [node for node in args.nodes.split(",") if node]
  return 0 if usable_now(nodes) == nodes else 1


def main(argv: list[str]) -> int:
  split = argv.index("--") if "--" in argv else len(argv)
  own, launcher_args = argv[:split], argv[split + 1 :]
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  commands = parser.add_subparsers(dest="command", required=True)
  shape_parser = commands.add_parser("shape")
  shape_parser.add_argument("--min_nodes", type=int, required=True)
  shape_parser.add_argument("--devices_per_node", type=int, required=True)
  shape_parser.add_argument("--last_count", type=int, default=0)
  back_parser = commands.add_parser("back")
  back_parser.add_argument("--lost", required=True)
  usable_parser = commands.add_parser("usable")
  usable_parser.add_argument("--nodes", required=True)
  args = parser.parse_args(own)
  if args.command == "shape":
    return shape(args, launcher_args)
  return back(args) if args.command == "back" else usable(args)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
