"""Every file a run reads or writes, on a local disk, a shared filesystem or `gs://` (etils.epath).

Local and shared-filesystem workdirs are plain paths. A `gs://bucket/path` workdir goes through
gcsfs (the same client orbax's paths use); a GCS emulator is reached through the standard
`STORAGE_EMULATOR_HOST` (gcsfs, google-cloud-storage) and `TENSORSTORE_GCS_HTTP_URL` (orbax's
arrays) variables, and needs no credentials.

GCS objects cannot be appended to, so append-only files (metrics.jsonl, per-host records,
TensorBoard events) are an `Appender`: each flush uploads the new bytes as a small object and
composes it onto the end of the file (one server-side GCS compose), so the file is complete up to
its last flush after a kill -9 and a flush costs the new bytes, never the whole file.

Remote storage that stops answering (connection refused or reset, timeouts, 408/429/5xx) is
retried, by the clients and by `call`, until a bound that the trainer sets (`bound_calls`);
past it the run ends with one line and EXIT_STORAGE_UNREACHABLE, which supervisors restart.
"""

import contextlib
import errno
import io
import json
import logging
import os
import re
import secrets
import shutil
import socket
import struct
import sys
import threading
import time
import urllib.parse
import uuid
import weakref
from collections.abc import Callable
from concurrent import futures

import numpy as np
from etils import epath

from launcher.errors import (
  EXIT_STORAGE_UNREACHABLE,
  StorageUnreachable,
  UsageError,
  causes,
  innermost,
  one_line,
)

SCHEMES = ("gs",)  # Besides plain local paths.
STORAGE_TIMEOUT_S = 120.0  # --storage_timeout_seconds: how long remote storage may be silent.
CLIENT_SETUP_TIMEOUT_S = 60.0  # The silence allowed before the storage first answers a process.
SHARED_WORKDIR_TIMEOUT_S = 10.0  # How long a process looks for process 0's token in the workdir.


def _configure_clients(environ=os.environ) -> None:
  """One GCS client everywhere (gcsfs, not TensorFlow's, which ignores emulators), and an
  emulator reached with no credential lookups (no probe of a cloud metadata server).

  Runs at import and again for every path made, so that variables set after the import still
  count: the clients read them when first used, which is after a path was made."""
  environ.setdefault("EPATH_USE_TF", "false")
  emulator = environ.get("STORAGE_EMULATOR_HOST") or environ.get("TENSORSTORE_GCS_HTTP_URL")
  if emulator:
    if "://" not in emulator:
      emulator = f"http://{emulator}"
    environ.setdefault("STORAGE_EMULATOR_HOST", emulator)
    environ.setdefault("TENSORSTORE_GCS_HTTP_URL", emulator)
    environ.setdefault("NO_GCE_CHECK", "true")
    environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")  # tensorstore: no lookup.
    # gcsfs's bucket-type lookup speaks gRPC to the Storage Control API, which emulators lack.
    environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


_configure_clients()
# gcsfs logs every read-ahead cache at INFO, and each request it gives up on as a traceback at
# ERROR; `call` says what failed, in one line.
logging.getLogger("gcsfs").setLevel(logging.CRITICAL)


def _emulated() -> bool:
  return bool(os.environ.get("STORAGE_EMULATOR_HOST"))


def path(location: str | os.PathLike) -> epath.Path:
  """`location` as a path of the one layer: a local path (made absolute) or `gs://bucket/...`."""
  _configure_clients()
  location = os.fspath(location)
  if "://" in location:
    scheme = location.split("://", 1)[0]
    if scheme not in SCHEMES:
      raise UsageError(
        f"{location!r}: the scheme {scheme}:// is not supported; a run's files "
        "live on a local disk, a shared filesystem (a plain path) or in GCS "
        "(gs://bucket/path)"
      )
    bucket = location.split("://", 1)[1].split("/", 1)[0]
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]", bucket):
      raise UsageError(
        f"{location!r}: {bucket!r} is not a GCS bucket name (3 to 63 lowercase "
        "letters, digits, '-', '_' or '.', starting and ending with a letter or "
        "digit): write gs://BUCKET/path"
      )
    _trace_gcs_requests()
    return epath.Path(location)
  return epath.Path(os.path.abspath(location))


def is_remote(p: epath.Path) -> bool:
  return os.fspath(p).startswith("gs://")


def _trace_gcs_requests() -> None:
  """Every gcsfs instance made from now on (orbax's and etils' included) tells `_ANSWERS` of its
  requests (fsspec's defaults for the gs protocol)."""
  import fsspec.config  # pylint: disable=import-outside-toplevel

  for protocol in ("gs", "gcs"):
    options = fsspec.config.conf.setdefault(protocol, {})
    if "session_kwargs" not in options:
      options["session_kwargs"] = {"trace_configs": [_ANSWERS.trace_config()]}


def _filesystem():
  import fsspec  # pylint: disable=import-outside-toplevel

  _trace_gcs_requests()
  return fsspec.filesystem("gs", token="anon") if _emulated() else fsspec.filesystem("gs")


# Words of the errors that say the storage could not be reached now, not that a file is wrong:
# tensorstore's status codes, and what aiohttp and the OS say of a connection.
_UNREACHABLE_SIGNS = (
  "UNAVAILABLE",
  "DEADLINE_EXCEEDED",
  "Cannot connect",
  "Connection refused",
  "Connection reset",
  "Too Many Requests",
  "Service Unavailable",
)


def is_unreachable(error: BaseException) -> bool:
  """Whether `error` (or a cause of it) says the storage could not be reached now (connection
  refused or reset, a timeout, 408, 429, 5xx), which may pass, rather than that a file is wrong.
  jax's own runtime errors (a collective with a lost peer, a barrier of the coordination service
  that orbax waits at inside a bounded call) are never the storage's. Imports nothing: gcsfs's
  errors exist only once gcsfs is loaded, and the error may be that no file can be opened."""
  retry = sys.modules.get("gcsfs.retry")
  seen_all = list(causes(error))
  if any(type(seen).__name__ in ("JaxRuntimeError", "XlaRuntimeError") for seen in seen_all):
    return False
  return any(
    isinstance(seen, (ConnectionError, TimeoutError))
    or (retry is not None and retry.is_retriable(seen))
    or any(sign in str(seen) for sign in _UNREACHABLE_SIGNS)
    for seen in seen_all
  )


class _Answers:
  """What says the remote storage answers, and whether anything waits on it.

  Progress is counted in bytes on the process's TCP connections to the storage endpoint
  (TCP_INFO's bytes_acked and bytes_received, sampled by `_Deadlines`): a silent storage moves
  none (a stopped server's kernel acknowledges at most its receive buffer, once), and traffic to
  other peers (jax's coordination service, gloo, trackers on other ports) is not counted. Whether
  a client waits on the storage comes from the clients themselves: gcsfs requests in flight (aiohttp
  trace hooks on every gcsfs instance, orbax's included) and tensorstore's HTTP requests in flight
  (its metrics); failed requests (an error, 408/429/5xx) keep the storage "waited on" until bytes
  move again, so that a storage that refuses connections between retries is silent too."""

  def __init__(self):
    self.failures = 0
    self._requests: set[int] = set()
    self._responses: weakref.WeakSet = weakref.WeakSet()
    self._lock = threading.Lock()

  def trace_config(self):
    import aiohttp  # pylint: disable=import-outside-toplevel

    config = aiohttp.TraceConfig()

    async def started(session, context, params):
      del session, params
      with self._lock:
        self._requests.add(id(context))

    async def ended(session, context, params):
      del session
      with self._lock:
        self._requests.discard(id(context))
        self._responses.add(params.response)
        self.failures += params.response.status in (408, 429) or params.response.status >= 500

    async def failed(session, context, params):
      del session, params
      with self._lock:
        self._requests.discard(id(context))
        self.failures += 1

    config.on_request_start.append(started)
    config.on_request_end.append(ended)
    config.on_request_exception.append(failed)
    return config

  def waited_on(self) -> bool:
    """Whether a gcsfs or tensorstore request is in flight now (a response's body included)."""
    with self._lock:
      if self._requests or any(not response.closed for response in list(self._responses)):
        return True
    return _tensorstore_metric("/tensorstore/http/active") > 0

  def failed_requests(self) -> int:
    """Failed requests so far, of gcsfs and tensorstore (retries and 408/429/5xx answers)."""
    codes = _tensorstore_metric("/tensorstore/http/response_codes", per_code=True)
    return (
      self.failures
      + _tensorstore_metric("/tensorstore/kvstore/gcs/retries")
      + sum(count for code, count in codes.items() if code in ("408", "429") or code >= "500")
    )


def _tensorstore_metric(name: str, per_code: bool = False):
  """A counter or gauge of tensorstore (0 when tensorstore is not in use in this process)."""
  tensorstore = sys.modules.get("tensorstore")
  metrics = tensorstore.experimental_collect_matching_metrics(name) if tensorstore else []
  values = [value for metric in metrics if metric["name"] == name for value in metric["values"]]
  if per_code:
    return {value["code"]: value.get("value", 0) for value in values}
  return sum(value.get("value", 0) for value in values)


_ANSWERS = _Answers()


def _storage_ports() -> set[int]:
  """The TCP ports of the storage endpoint: an emulator's, else HTTPS's, and a proxy's."""
  ports = set()
  for variable in (
    "STORAGE_EMULATOR_HOST",
    "TENSORSTORE_GCS_HTTP_URL",
    "HTTPS_PROXY",
    "https_proxy",
  ):
    url = os.environ.get(variable)
    if url:
      parsed = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
      ports.add(parsed.port or (443 if parsed.scheme == "https" else 80))
  return ports or {443}


def _bytes_moved(ports: set[int]) -> dict[str, tuple[int, int]]:
  """(bytes acknowledged by the peer, bytes received) of each TCP connection of this process to
  one of `ports`, by socket."""
  moved = {}
  for fd in os.listdir("/proc/self/fd"):
    try:
      name = os.readlink(f"/proc/self/fd/{fd}")
      if not name.startswith("socket:"):
        continue
      with socket.socket(fileno=os.dup(int(fd))) as connection:
        if connection.type != socket.SOCK_STREAM or connection.getpeername()[1] not in ports:
          continue
        info = connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
    except (OSError, ValueError, IndexError, TypeError):
      continue  # Closed meanwhile, not connected, or not an internet socket.
    if len(info) >= 136:
      moved[name] = struct.unpack_from("QQ", info, 120)
  return moved


class _Deadlines:
  """The remote storage calls in progress, and how long the storage has been silent for them.

  Once the trainer sets a bound (`bound_calls`), a thread ends the process with one line and
  EXIT_STORAGE_UNREACHABLE when a call waits on a storage that has moved no bytes for the bound
  (a client retrying for minutes, a request that never returns); a call that moves bytes, however
  long it takes, is never cut, and a call that waits on something else (a barrier with the other
  processes inside orbax) is not the storage's silence. Until the storage first answers in this
  process, the bound is at least CLIENT_SETUP_TIMEOUT_S (credentials, the first connection).
  Without a bound (the supervisor, the report) only the clients' own retries apply."""

  def __init__(self):
    self.seconds: float | None = None
    self.last_error: BaseException | None = None
    self.gave_up: str | None = None  # The line, once the storage was given up on.
    self._calls: dict[object, tuple[str, epath.Path]] = {}
    self._condition = threading.Condition()
    self._thread = None
    self._silent_since = time.monotonic()
    self._answered = False

  def start(self, seconds: float) -> None:
    self.seconds = seconds
    if self._thread is None:
      self._thread = threading.Thread(target=self._watch, name="storage-deadlines", daemon=True)
      self._thread.start()

  @contextlib.contextmanager
  def watch(self, what: str, where: epath.Path):
    if self.gave_up:
      raise StorageUnreachable(self.gave_up)
    key = object()
    with self._condition:
      if not self._calls:
        self._silent_since = time.monotonic()
      self._calls[key] = (what, where)
      self._condition.notify()
    try:
      yield
    finally:
      with self._condition:
        del self._calls[key]

  def limit(self) -> float:
    """The silence allowed now: the bound, or the set-up bound until the storage first answered."""
    seconds = self.seconds or 0.0
    return seconds if self._answered else max(seconds, CLIENT_SETUP_TIMEOUT_S)

  def silence(self) -> float:
    """Seconds the storage has been silent while a call waited on it."""
    return time.monotonic() - self._silent_since

  def give_up(self, what: str, where: epath.Path, error: BaseException | None) -> str:
    self.gave_up = self.gave_up or (
      f"the storage of {_bucket(where)} did not answer within --storage_timeout_seconds="
      f"{self.seconds or 0:g} while {what}"
      + (f" (last error: {one_line(innermost(error), 200)})" if error else "")
      + f". The run stopped with exit code {EXIT_STORAGE_UNREACHABLE}, which supervisors restart "
      "(launcher.local --max_restarts, the cluster scripts' MAX_RESTARTS): it resumes from its "
      "last complete checkpoint once the storage answers"
    )
    return self.gave_up

  def _watch(self) -> None:
    ports, moved, failures = _storage_ports(), {}, _ANSWERS.failed_requests()
    while True:
      with self._condition:
        while not self._calls:
          self._condition.wait()
      time.sleep(min(1.0, max(0.05, (self.seconds or 1.0) / 10)))
      now_moved, now_failures = _bytes_moved(ports), _ANSWERS.failed_requests()
      progressed = any(
        acked > moved.get(name, (0, 0))[0] or received > moved.get(name, (0, 0))[1]
        for name, (acked, received) in now_moved.items()
      )
      moved = now_moved
      with self._condition:
        if progressed:
          self._answered, failures = True, now_failures
        waiting = (
          not self._answered or now_failures != failures or _ANSWERS.waited_on()
        ) and not progressed
        if not (waiting and self._calls):
          self._silent_since = time.monotonic()
        elif self.silence() >= self.limit():
          what, where = next(iter(self._calls.values()))
          break
    sys.stderr.write(f"error: {self.give_up(what, where, self.last_error)}\n")
    sys.stderr.flush()
    os._exit(EXIT_STORAGE_UNREACHABLE)  # pylint: disable=protected-access


_DEADLINES = _Deadlines()


def bound_calls(seconds: float) -> None:
  """From now on a remote storage call that waits on a storage silent for `seconds` (no bytes
  moved, retries included) ends the process with one line and EXIT_STORAGE_UNREACHABLE."""
  _DEADLINES.start(seconds)


def gave_up() -> bool:
  """Whether this process has given up on its remote storage (nothing more can be written)."""
  return _DEADLINES.gave_up is not None


def call(what: str, where: epath.Path, fn: Callable, *args, retry: bool = True, **kwargs):
  """`fn(*args, **kwargs)`, an operation on the storage of `where`. On remote storage an error
  that says it cannot be reached now is retried with backoff (1, 2, 4 .. 16 s) while the storage
  has been silent for less than the bound; past it (or at once with `retry=False`, for an
  operation that must not run twice), StorageUnreachable with the one line. `what` says what the
  run was doing, for that line."""
  delay = 1.0
  with bounded(what, where):
    while True:
      try:
        return fn(*args, **kwargs)
      except Exception as e:  # pylint: disable=broad-except  # Sorted just below.
        if (
          not is_remote(where)
          or not is_unreachable(e)
          or not retry
          or not _DEADLINES.seconds
          or _DEADLINES.silence() + delay > _DEADLINES.limit()
        ):
          raise  # `bounded` makes an unreachable storage's error StorageUnreachable.
        _DEADLINES.last_error = e
      time.sleep(delay)
      delay = min(2 * delay, 16.0)


@contextlib.contextmanager
def bounded(what: str, where: epath.Path):
  """The block (a library's calls that retry by themselves, like orbax's) within the bound on
  remote storage; an error in it that says the storage cannot be reached is StorageUnreachable."""
  if not is_remote(where):
    yield
    return
  with _DEADLINES.watch(what, where):
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except  # Sorted just below.
      if not is_unreachable(e):
        raise
      raise StorageUnreachable(_DEADLINES.give_up(what, where, e)) from None


def _bucket(where: epath.Path) -> str:
  return "/".join(os.fspath(where).split("/")[:3])


@contextlib.contextmanager
def clear_errors(p: epath.Path, doing: str):
  """Storage failures inside the block become one UsageError that says what to change."""
  try:
    yield
  except UsageError:
    raise
  except (NotADirectoryError, FileExistsError) as e:
    raise UsageError(
      f"cannot {doing} {p}: a file stands where a directory must be ({e}); choose another --workdir"
    ) from None
  except FileNotFoundError as e:
    if is_remote(p):
      bucket = os.fspath(p).split("/")[2]
      raise UsageError(
        f"cannot {doing} {p}: the bucket gs://{bucket} does not exist (or this "
        f"account cannot see it): create it (gcloud storage buckets create "
        f"gs://{bucket}) or fix the name"
      ) from None
    raise UsageError(f"cannot {doing} {p}: {e}") from None
  except PermissionError as e:
    raise UsageError(
      f"cannot {doing} {p}: permission denied ({e}); choose a --workdir this user can write"
    ) from None
  except OSError as e:
    if "Forbidden" in str(e) or "403" in str(e):
      raise UsageError(
        f"cannot {doing} {p}: this account may not write there "
        f"({str(e).splitlines()[0]}); grant it storage.objects.create on the "
        "bucket, or choose another --workdir"
      ) from None
    raise UsageError(f"cannot {doing} {p}: {e}") from None


# What a write failure says, by errno or by the words tensorstore and gcsfs put in its message,
# and what a person does about it.
_REFUSALS = (
  (
    (errno.ENOSPC,),
    ("No space left on device",),
    "the filesystem is full",
    "free space there (or choose a --workdir with room)",
  ),
  (
    (errno.EDQUOT,),
    ("Disk quota exceeded",),
    "this user's disk quota is used up",
    "free space within the quota (or choose a --workdir with room)",
  ),
  (
    (errno.EROFS,),
    ("Read-only file system",),
    "the filesystem is read-only",
    "remount it writable (or choose another --workdir)",
  ),
  (
    (errno.EACCES, errno.EPERM),
    ("Permission denied", "403 Forbidden", "Forbidden"),
    "permission denied",
    "give this user write access (or choose another --workdir)",
  ),
)


# A 403 that names a read permission is a read the storage refused, not a write.
_READ_PERMISSIONS = ("storage.objects.get", "storage.objects.list", "storage.buckets.get")


def refusal(error: BaseException, workdir: str, last_checkpoint: int | None) -> str | None:
  """One line for a write into the workdir that its storage refused, which a restart cannot fix
  (full, quota, read-only, no permission), or None for any other error: a read error (a corpus
  this user may not read, a 403 on storage.objects.get) is never a refused write."""
  for seen in causes(error):
    for errnos, words, what, fix in _REFUSALS:
      if getattr(seen, "errno", None) in errnos or any(word in str(seen) for word in words):
        quoted = re.search(r'"(/[^"]+|gs://[^"]+)"', str(seen))
        where = getattr(seen, "filename", None) or (quoted[1] if quoted else None)
        if (where and not _within(os.fspath(where), workdir)) or any(
          permission in str(seen) for permission in _READ_PERMISSIONS
        ):
          return None
        kept = (
          "no checkpoint was complete yet"
          if last_checkpoint is None
          else f"the checkpoint of step {last_checkpoint} is complete and kept"
        )
        return (
          f"cannot write {where or workdir}: {what} "
          f"({one_line(seen, 200)}){_free_space(workdir)}. The run stopped; {kept}. "
          f"{fix[0].upper()}{fix[1:]}, then run the same command to resume"
        )
  return None


def _within(location: str, workdir: str) -> bool:
  """Whether `location` is `workdir` or below it (gs:// or a local path)."""
  if "://" not in workdir:
    location, workdir = os.path.abspath(location), os.path.abspath(workdir)
  return location == workdir or location.startswith(workdir.rstrip("/") + "/")


def _free_space(workdir: str) -> str:
  if "://" in workdir:
    return ""
  try:
    usage = shutil.disk_usage(workdir)
  except OSError:
    return ""
  return f"; {usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:.1f} MiB"


def makedirs(p: epath.Path) -> None:
  with clear_errors(p, "create"):
    if not is_remote(p):  # GCS has no directories; an object's name holds its whole path.
      p.mkdir(parents=True, exist_ok=True)


def write_text(p: epath.Path, text: str) -> None:
  """Writes a whole file at once (atomic on GCS; a rename on local disks)."""
  write_bytes(p, text.encode())


def write_bytes(p: epath.Path, data: bytes) -> None:
  if is_remote(p):
    call(f"writing {p}", p, p.write_bytes, data)
    return
  p.parent.mkdir(parents=True, exist_ok=True)
  partial = p.parent / f".{p.name}.{uuid.uuid4().hex}.tmp"
  partial.write_bytes(data)
  os.replace(partial, p)


def read_jsonl(p: epath.Path) -> list[dict]:
  """The rows of a JSON-lines file (none when it does not exist yet). A line that does not parse
  (torn by a kill mid-write) is skipped, and how many were is one warning; the last line, with
  no newline yet, is being written and is skipped quietly."""
  lines = (read_text(p) or "").split("\n")
  rows, torn = [], 0
  for number, line in enumerate(lines, start=1):
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      torn += number < len(lines) and bool(line.strip())
  if torn:
    logging.warning(
      "skipped %d unreadable line(s) of %s (torn by a kill while being written)", torn, p
    )
  return rows


def read_text(p: epath.Path) -> str | None:
  """The file's text, or None when it does not exist."""
  try:
    if is_remote(p):  # No cached listing: always fresh.
      return call(f"reading {p}", p, _filesystem().cat_file, os.fspath(p)).decode()
    return p.read_text()
  except FileNotFoundError:
    return None


class Appender:
  """An append-only file: `write` buffers, `flush` makes it durable.

  Locally an ordinary append. On GCS each flush hands the buffered bytes to a thread of the file's
  own, which uploads them as a small object next to the file, composes it onto the file's end and
  deletes it, while the caller goes on (at most one flush in flight; the next waits for it): the
  file is whole up to its last finished flush after any kill, and a flush costs the new bytes
  plus three requests. Such objects left by a kill are deleted when the file is opened again. A
  file that ends in a partial line (a write torn by a kill) gets its next line on a line of its own.
  A second writer of the same file (a requeued job while the old one still runs) loses nothing
  and removes nothing: each flush lands whole after the other's, and one warning says so.
  """

  def __init__(self, p: epath.Path):
    self.path = p
    self._remote = is_remote(p)
    self._buffer = io.BytesIO()
    if self._remote:
      self._fs = _filesystem()
      self._other_writer_seen = False
      self._name = os.fspath(p)
      self._uploads = futures.ThreadPoolExecutor(1, thread_name_prefix=f"append-{p.name}")
      self._upload: futures.Future | None = None
      try:
        size = call(f"opening {p}", p, self._fs.size, self._name)
      except FileNotFoundError:
        size = None
      self._size = size  # None until the file exists.
      self._remove_leftover_parts()
      last = (
        call(f"opening {p}", p, self._fs.cat_file, self._name, start=size - 1, end=size)
        if size
        else b"\n"
      )
    else:
      p.parent.mkdir(parents=True, exist_ok=True)
      self._file = open(p, "ab+")  # pylint: disable=consider-using-with
      size = self._file.seek(0, os.SEEK_END)
      last = os.pread(self._file.fileno(), 1, size - 1) if size else b"\n"
    if last != b"\n":
      self._buffer.write(b"\n")

  def write(self, data: bytes | str) -> None:
    self._buffer.write(data.encode() if isinstance(data, str) else data)

  def flush(self) -> None:
    data = self._buffer.getvalue()
    if not data:
      return
    self._buffer = io.BytesIO()
    if not self._remote:
      self._file.write(data)
      self._file.flush()
      return
    self._wait_for_upload()
    self._upload = self._uploads.submit(self._append_remote, data)

  def close(self) -> None:
    self.flush()
    if self._remote:
      self._wait_for_upload()
      self._uploads.shutdown()
    else:
      self._file.close()

  def _wait_for_upload(self) -> None:
    """Waits for the flush in flight (bounded by `call`), raising what it raised."""
    if self._upload is not None:
      upload, self._upload = self._upload, None
      upload.result()

  def _append_remote(self, data: bytes) -> None:
    what = f"appending to {self._name}"
    if self._size is None:
      try:
        call(what, self.path, self._fs.pipe_file, self._name, data, mode="create")
        self._size = len(data)
        return
      except FileExistsError:  # Another writer made it meanwhile: append to theirs.
        self._size = call(what, self.path, self._fs.size, self._name)
    part = f"{self._part_prefix()}{uuid.uuid4().hex}"
    composed = None
    for _ in range(3):  # Another writer opening the file deletes parts as leftovers.
      call(what, self.path, self._fs.pipe_file, part, data)
      composed = call(what, self.path, self._compose_if_part_exists, part, retry=False)
      if composed is not None:
        break
    if composed is None:
      raise FileNotFoundError(f"{part} was deleted three times before it could be appended")
    size, expected = int(composed["size"]), self._size + len(data)
    if size == expected + len(data) and self._read(what, self._size, size) == data + data:
      # gcsfs retried a compose whose first try had gone through (the answer was lost): the
      # part is on the end twice. Rare; the file is rewritten without the repeat.
      whole = call(what, self.path, self._fs.cat_file, self._name, start=0, end=expected)
      call(what, self.path, self._fs.pipe_file, self._name, whole)
      size = expected
    elif size != expected and not self._other_writer_seen:
      self._other_writer_seen = True
      logging.warning(
        "%s grew by %d bytes that this process did not write: another writer appends to it "
        "(a requeued job while the old one still runs?); both writers' rows are kept",
        self._name,
        size - expected,
      )
    self._size = size
    try:
      call(what, self.path, self._fs.rm_file, part)
    except FileNotFoundError:
      pass  # Another writer, opening the file, deleted it as a leftover: it is composed already.

  def _read(self, what: str, start: int, end: int) -> bytes:
    return call(what, self.path, self._fs.cat_file, self._name, start=start, end=end)

  def _compose_if_part_exists(self, part: str) -> dict | None:
    """`_compose`, or None when `part` is gone (another writer deleted it as a leftover)."""
    try:
      return self._compose(part)
    except Exception:  # pylint: disable=broad-except  # GCS says 404; an emulator, 500.
      self._fs.invalidate_cache(part)
      if not self._fs.exists(part):
        return None
      raise

  def _compose(self, part: str) -> dict:
    """GCS's compose of the file and `part` onto the file; the file's new metadata."""
    bucket, key, _ = self._fs.split_path(self._name)
    return self._fs.call(
      "POST",
      "b/{}/o/{}/compose",
      bucket,
      key,
      json_out=True,
      headers={"Content-Type": "application/json"},
      json={
        "sourceObjects": [{"name": key}, {"name": self._fs.split_path(part)[1]}],
        "kind": "storage#composeRequest",
        "destination": {"name": key, "bucket": bucket},
      },
    )

  def _part_prefix(self) -> str:
    return f"{os.path.dirname(self._name)}/.{os.path.basename(self._name)}.part-"

  def _remove_leftover_parts(self) -> None:
    """Deletes the uploads a killed writer left behind (composed onto the file or not: either way
    they are not part of it)."""
    for part in call(f"opening {self.path}", self.path, self._fs.glob, f"{self._part_prefix()}*"):
      call(f"opening {self.path}", self.path, self._fs.rm_file, part)


def check_workdir(
  token_path: epath.Path,
  process_index: int,
  process_count: int,
  timeout: float = SHARED_WORKDIR_TIMEOUT_S,
) -> None:
  """Process 0 writes a fresh token at `token_path`, in the workdir, and every process must read
  it back.

  Checkpoints need every host to see one directory: a workdir on a disk of its own per host
  would hang the first checkpoint. Any failure is one UsageError on every process, naming the
  processes that do not see the token, before any training.
  """
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  workdir = token_path.parent
  nonce = secrets.token_hex(8)
  write_error = ""
  if process_index == 0:
    try:
      makedirs(workdir)
      with clear_errors(workdir, "write into"):
        write_text(token_path, nonce)
    except UsageError as e:
      write_error = str(e)
  if process_count == 1:
    if write_error:
      raise UsageError(write_error)
    return

  nonce, write_error, workdir_of_0 = (
    _broadcast_text(multihost_utils, text) for text in (nonce, write_error, os.fspath(workdir))
  )
  if write_error:
    raise UsageError(
      write_error if process_index == 0 else f"process 0 could not use the workdir: {write_error}"
    )
  seen = process_index == 0 or _wait_for_token(token_path, nonce, timeout)
  hostnames = multihost_utils.process_allgather(
    np.frombuffer(socket.gethostname().encode()[:64].ljust(64, b"\0"), np.uint8)
  )
  hosts = [bytes(name).rstrip(b"\0").decode() for name in hostnames]
  everyone_saw = multihost_utils.process_allgather(np.int32(seen))
  missing = [f"{i} ({hosts[i]})" for i in np.flatnonzero(everyone_saw == 0)]
  if missing:
    raise UsageError(
      f"process(es) {', '.join(missing)} do not see the workdir {workdir_of_0} that process 0 "
      f"({hosts[0]}) writes: its token {token_path.name} did not appear there within {timeout:g} s. "
      "Every process must see one directory: use a filesystem shared by every host, or a "
      "gs://bucket/path workdir"
    )


def _broadcast_text(multihost_utils, text: str, size: int = 2048) -> str:
  """Process 0's `text` on every process."""
  encoded = np.frombuffer(text.encode()[:size].ljust(size, b"\0"), np.uint8)
  return bytes(multihost_utils.broadcast_one_to_all(encoded)).rstrip(b"\0").decode()


def _wait_for_token(token_path: epath.Path, nonce: str, timeout: float) -> bool:
  deadline = time.monotonic() + timeout
  while True:
    try:
      if not is_remote(token_path):
        os.listdir(token_path.parent)  # Revalidates an NFS client's cached directory.
      if read_text(token_path) == nonce:
        return True
    except OSError:
      pass
    if time.monotonic() >= deadline:
      return False
    time.sleep(0.2)


def move(source: epath.Path, destination: epath.Path) -> None:
  """Moves a file or directory (a rename on local disks; a copy and delete of each object on
  GCS, after which every gcsfs client of this process lists both places afresh)."""
  if is_remote(source):
    call(
      f"moving {source}",
      source,
      _filesystem().mv,
      os.fspath(source),
      os.fspath(destination),
      recursive=True,
    )
    forget_listings(source, destination)
    return
  destination.parent.mkdir(parents=True, exist_ok=True)
  os.replace(source, destination)


def forget_listings(*paths: epath.Path) -> None:
  """Drops the cached listings of `paths` (and their parents) from every gcsfs instance of this
  process: orbax's and etils' have their own, and would go on listing what was moved or deleted."""
  import gcsfs  # pylint: disable=import-outside-toplevel

  for instance in list(gcsfs.GCSFileSystem._cache.values()):  # pylint: disable=protected-access
    for p in paths:
      instance.invalidate_cache(os.fspath(p).removeprefix("gs://"))


def copy_tree(source: str, destination: epath.Path) -> None:
  """Copies a local directory's files under `destination` (e.g. a profile into a gs:// workdir)."""
  for root, _, files in os.walk(source):
    for name in files:
      local = os.path.join(root, name)
      with open(local, "rb") as f:
        write_bytes(destination / os.path.relpath(local, source), f.read())
