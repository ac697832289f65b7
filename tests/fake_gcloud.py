"""A stand-in for `gcloud compute tpus tpu-vm` on this machine: a "slice" of workers, each a home
directory of its own, running commands as a TPU VM's workers would.

The slice is a directory named by FAKE_TPU_SLICE, made by `make_slice`: `slice.json` (its name,
zone and each worker's environment), `worker_<i>/` (the worker's home) and `pids` (every remote
command started, for the tests to end). Implemented: `describe NAME`, `scp [--worker] SRC
NAME:DEST`, `ssh NAME --worker=W --command=CMD`, with the arguments the real CLI documents;
anything else is refused as gcloud refuses it (exit 2). A remote command runs in a session of its
own, as on a real worker: killing the `gcloud ssh` client leaves it running.

Not a TPU VM: no TPU devices (each worker simulates CPU devices), no metadata server (the job is
given to jax through JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID), no libtpu,
and `sudo` runs the command as this user.
"""

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import threading


def make_slice(
  root: pathlib.Path,
  *,
  name: str,
  zone: str,
  num_workers: int,
  devices: int,
  coordinator_port: int,
  image_python: str,
  env: dict[str, str],
) -> pathlib.Path:
  """Writes a slice of `num_workers` workers under `root` and a `gcloud` for it in root/bin
  (put that on PATH, with FAKE_TPU_SLICE=root). `image_python` is the workers' `python3`."""
  worker_bin = root / "worker-bin"
  worker_bin.mkdir(parents=True)
  (worker_bin / "python3").symlink_to(image_python)
  _executable(worker_bin / "sudo", '#!/bin/sh\nexec "$@"\n')
  workers = []
  for i in range(num_workers):
    home = root / f"worker_{i}"
    home.mkdir()
    workers.append(
      {
        "home": str(home),
        "env": {
          "HOME": str(home),
          "USER": os.environ.get("USER", "root"),
          "LANG": "C.UTF-8",
          "PATH": f"{worker_bin}:/usr/local/bin:/usr/bin:/bin",
          "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
          "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{coordinator_port}",
          "JAX_NUM_PROCESSES": str(num_workers),
          "JAX_PROCESS_ID": str(i),
          **env,
        },
      }
    )
  (root / "slice.json").write_text(json.dumps({"name": name, "zone": zone, "workers": workers}))
  (root / "bin").mkdir()
  _executable(
    root / "bin" / "gcloud", f'#!/bin/sh\nexec {sys.executable} {os.path.abspath(__file__)} "$@"\n'
  )
  return root / "bin"


def _executable(path: pathlib.Path, text: str) -> None:
  path.write_text(text)
  path.chmod(0o755)


class Refused(Exception):
  """An argument the real CLI refuses; gcloud prints `ERROR: (gcloud.<command>) <why>`, exit 2."""


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="gcloud compute tpus tpu-vm", exit_on_error=False)
  commands = parser.add_subparsers(dest="verb", required=True)
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--zone", required=True)  # The stand-in has no gcloud config to fall back on.
  common.add_argument("--project")
  describe = commands.add_parser("describe", parents=[common])
  describe.add_argument("name")
  describe.add_argument("--format")
  scp = commands.add_parser("scp", parents=[common])
  scp.add_argument("paths", nargs="+")
  scp.add_argument("--worker", default="0")
  scp.add_argument("--recurse", action="store_true")
  ssh = commands.add_parser("ssh", parents=[common])
  ssh.add_argument("name")
  ssh.add_argument("--worker", default="0")
  ssh.add_argument("--command")
  return parser


def _workers(value: str, count: int, *, many: bool) -> list[int]:
  """--worker: `all`, an index, and with --command also `1,3` or `0-2` (as gcloud documents)."""
  if value == "all":
    indices = list(range(count))
  else:
    try:
      indices = []
      for part in value.split(","):
        first, _, last = part.partition("-")
        indices.extend(range(int(first), int(last or first) + 1))
    except ValueError:
      raise Refused(f"Invalid value for [--worker]: {value!r}") from None
  if not many and len(indices) != 1:
    raise Refused("Invalid value for [--worker]: several workers need --command")
  bad = [i for i in indices if not 0 <= i < count]
  if bad:
    raise Refused(
      f"Invalid value for [--worker]: worker {bad[0]} does not exist; the TPU has "
      f"{count} workers (0-{count - 1})"
    )
  return indices


def _remote_path(path: str, worker: dict) -> pathlib.Path:
  """A worker's path as scp reads it: relative to the home directory unless absolute."""
  return pathlib.Path(worker["home"], path.removeprefix("~/"))


def _run(slice_dir: pathlib.Path, worker: dict, command: str) -> subprocess.Popen:
  process = subprocess.Popen(
    ["bash", "-c", command],
    cwd=worker["home"],
    env=worker["env"],
    stdin=subprocess.DEVNULL,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    start_new_session=True,
  )
  with open(slice_dir / "pids", "a") as pids:
    pids.write(f"{process.pid}\n")
  return process


def _relay(process: subprocess.Popen) -> None:
  for line in process.stdout:
    sys.stdout.buffer.write(line)
    sys.stdout.flush()


def main(argv: list[str]) -> int:
  if argv[:3] != ["compute", "tpus", "tpu-vm"]:
    raise Refused(f"the stand-in implements `gcloud compute tpus tpu-vm` only, not {argv[:3]}")
  try:
    args, unknown = _parser().parse_known_args(argv[3:])
  except argparse.ArgumentError as e:
    raise Refused(str(e)) from None
  if unknown:
    raise Refused(f"unrecognized arguments: {' '.join(unknown)}")
  slice_dir = pathlib.Path(os.environ["FAKE_TPU_SLICE"])
  tpu = json.loads((slice_dir / "slice.json").read_text())
  name = args.name if args.verb != "scp" else None
  if args.verb == "scp":
    *sources, destination = args.paths
    if not sources:
      raise Refused("scp needs a source and a destination")
    remote = [p for p in args.paths if ":" in p]
    if len(remote) != 1 or remote[0] != destination:
      raise Refused("the stand-in copies local files to one TPU: SRC... TPU_NAME:DEST")
    name, _, path = destination.partition(":")
  if name != tpu["name"] or args.zone != tpu["zone"]:
    raise Refused(f"NOT_FOUND: projects/-/locations/{args.zone}/nodes/{name} was not found")
  workers = tpu["workers"]

  if args.verb == "describe":
    if args.format != "value(networkEndpoints.len())":
      raise Refused("the stand-in describes only --format=value(networkEndpoints.len())")
    print(len(workers))
    return 0
  if args.verb == "scp":
    for i in _workers(args.worker, len(workers), many=True):
      target = _remote_path(path, workers[i])
      for source in sources:
        if os.path.isdir(source) and not args.recurse:
          raise Refused(f"{source} is a directory: pass --recurse")
        copy = shutil.copytree if os.path.isdir(source) else shutil.copy
        copy(source, target / os.path.basename(source) if target.is_dir() else target)
    return 0
  if args.command is None:
    raise Refused("the stand-in has no interactive sessions: pass --command")
  processes = [
    _run(slice_dir, workers[i], args.command)
    for i in _workers(args.worker, len(workers), many=True)
  ]
  relays = [threading.Thread(target=_relay, args=(p,)) for p in processes]
  for relay in relays:
    relay.start()
  codes = [p.wait() for p in processes]
  for relay in relays:
    relay.join()
  # As ssh: the remote command's exit code, or 255 for one killed by a signal.
  return next((code if code > 0 else 255 for code in codes if code != 0), 0)


if __name__ == "__main__":
  try:
    sys.exit(main(sys.argv[1:]))
  except Refused as e:
    print(f"ERROR: (gcloud.compute.tpus.tpu-vm) {e}", file=sys.stderr)
    sys.exit(2)
