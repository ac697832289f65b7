"""What a run writes while it trains: one console line per report, TensorBoard events and
metrics.jsonl (process 0), and every process's own records in hosts/. `launcher.report` reads them.

Every file goes through `launcher.storage`, so a `gs://` workdir gets all of them. TensorFlow is
never imported: TensorBoard events are encoded by tensorboardX, imported only when a run names
the tensorboard tracker.
"""

import abc
import contextlib
import functools
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import types
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from clu import profiler as clu_profiler
from etils import epath

import launcher
from launcher import storage
from launcher import workdir as workdir_lib

# Dense bf16 peak FLOP/s per device, by a pattern of `jax.devices()[0].device_kind` (vendors'
# datasheets; GPUs by form factor, which sets clocks and power). MFU is reported only for these:
# on CPU, or a kind not listed, it is left out (and said once) rather than guessed.
PEAK_FLOPS_PER_DEVICE = (
  (r"TPU v4", 275e12),
  (r"TPU v5 lite", 197e12),  # v5e
  (r"TPU v5p|TPU v5$", 459e12),
  (r"TPU v6 lite", 918e12),  # v6e (Trillium)
  (r"NVIDIA H100 NVL", 835e12),
  (r"NVIDIA H100 PCIe", 756e12),
  (r"NVIDIA H100 (SXM|80GB HBM3)", 989e12),
  (r"NVIDIA H200 NVL", 835e12),
  (r"NVIDIA H200", 989e12),  # SXM
  (r"NVIDIA GH200", 989e12),
  (r"NVIDIA A100", 312e12),  # SXM and PCIe alike
)


def peak_flops_per_device(device_kind: str) -> float | None:
  """The dense bf16 peak of a device kind, or None where the table does not know it."""
  for pattern, peak in PEAK_FLOPS_PER_DEVICE:
    if re.match(pattern, device_kind):
      return peak
  return None


def seconds_since_process_start() -> float:
  """Wall time since this process started (Linux /proc), imports included. A shell that ran
  other commands before it `exec`s python (`bash -c "pip install ... && python -m launcher"`)
  hands its own start time to the process: when /proc's start lies more than 2 s before the
  launcher package was imported, the time since that import is given instead."""
  since_import = time.time() - launcher.IMPORTED_AT
  try:
    with open("/proc/self/stat") as f:
      start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
      uptime = float(f.read().split()[0])
  except (OSError, ValueError, IndexError):
    return since_import
  since_start = uptime - start_ticks / os.sysconf("SC_CLK_TCK")
  return since_start if since_start - since_import < 2.0 else since_import


class MetricWriter(abc.ABC):
  """clu's MetricWriter interface (clu.metric_writers.MetricWriter: the same methods and
  arguments), declared here because importing clu's writer package imports TensorFlow, which the
  launcher does not install. A CLU writer and these are used the same way."""

  @abc.abstractmethod
  def write_summaries(self, step: int, values: Mapping[str, Any], metadata=None): ...

  @abc.abstractmethod
  def write_scalars(self, step: int, scalars: Mapping[str, Any]): ...

  @abc.abstractmethod
  def write_images(self, step: int, images: Mapping[str, Any]): ...

  @abc.abstractmethod
  def write_videos(self, step: int, videos: Mapping[str, Any]): ...

  @abc.abstractmethod
  def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int): ...

  @abc.abstractmethod
  def write_texts(self, step: int, texts: Mapping[str, str]): ...

  @abc.abstractmethod
  def write_histograms(self, step: int, arrays: Mapping[str, Any], num_buckets=None): ...

  @abc.abstractmethod
  def write_hparams(self, hparams: Mapping[str, Any]): ...

  @abc.abstractmethod
  def flush(self): ...

  @abc.abstractmethod
  def close(self): ...


def seconds_before(moment: float) -> float:
  """Seconds from this process's start to `moment` (a time.time())."""
  return max(seconds_since_process_start() - (time.time() - moment), 0.0)


class _AppenderFactory:
  """tensorboardX's hook for a URL scheme: its event files on gs:// become storage Appenders."""

  def open(self, location: str) -> storage.Appender:
    return storage.Appender(storage.path(location))

  def directory_check(self, location: str) -> None:
    del location  # GCS has no directories.


@functools.cache
def _tensorboardx() -> types.SimpleNamespace:
  """tensorboardX's event encoding, imported when the first TensorBoard writer is made, its gs://
  files going through launcher.storage. Its record_writer imports google-cloud-storage where that
  is installed (a quarter of a second, for a client the launcher never uses), so that import is
  refused while tensorboardX loads, unless something has already loaded it."""
  gcs_client = "google.cloud.storage"
  refused = gcs_client not in sys.modules
  if refused:
    sys.modules[gcs_client] = None  # `import` raises ImportError, which tensorboardX catches.
  try:
    # pylint: disable=import-outside-toplevel
    from tensorboardX import event_file_writer, record_writer, summary
    from tensorboardX.proto import event_pb2, summary_pb2
  finally:
    if refused:
      del sys.modules[gcs_client]
  record_writer.register_writer_factory("gs", _AppenderFactory())
  return types.SimpleNamespace(
    event_file_writer=event_file_writer,
    record_writer=record_writer,
    summary=summary,
    event_pb2=event_pb2,
    summary_pb2=summary_pb2,
  )


class TensorBoardWriter(MetricWriter):
  """CLU's MetricWriter interface over tensorboardX's event encoding, without TensorFlow: one
  event file per start in `logdir` (local or gs://), written synchronously, durable at each `flush`.
  Scalars are stored as plain scalar values (what `EventAccumulator.Scalars` reads)."""

  def __init__(self, logdir: epath.Path):
    self._tbx = _tensorboardx()
    self._tbx.record_writer.directory_check(os.fspath(logdir))
    # The file's name has tensorboardX's whole seconds; two starts within one second would share
    # it (the second overwriting the first) without the nanoseconds after it.
    self._events = self._tbx.event_file_writer.EventsWriter(
      os.path.join(os.fspath(logdir), "events"), filename_suffix=f".{time.time_ns()}"
    )

  def _write(self, step: int, summaries) -> None:
    values = [value for summary in summaries for value in summary.value]
    self._events.write_event(
      self._tbx.event_pb2.Event(
        wall_time=time.time(), step=int(step), summary=self._tbx.summary_pb2.Summary(value=values)
      )
    )

  def write_scalars(self, step, scalars):
    self._write(
      step,
      [self._tbx.summary.scalar(name, float(np.asarray(value))) for name, value in scalars.items()],
    )

  def write_texts(self, step, texts):
    summaries = [self._tbx.summary.text(name, text) for name, text in texts.items()]
    for name, summary in zip(texts, summaries):  # Tagged `name`, as by CLU's writer.
      summary.value[0].tag = name
    self._write(step, summaries)

  def write_histograms(self, step, arrays, num_buckets=None):
    self._write(
      step,
      [
        self._tbx.summary.histogram(
          name, np.asarray(values), bins="tensorflow", max_bins=(num_buckets or {}).get(name)
        )
        for name, values in arrays.items()
      ],
    )

  def write_images(self, step, images):
    self._write(
      step,
      [
        self._tbx.summary.image(f"{name}/{i}", image, dataformats="HWC")
        for name, batch in images.items()
        for i, image in enumerate(np.asarray(batch))
      ],
    )

  def write_hparams(self, hparams):
    self.write_texts(0, {"hparams": json.dumps(hparams, default=str, indent=2)})

  def write_summaries(self, step, values, metadata=None):
    raise NotImplementedError("raw summaries need TensorFlow's writer")

  def write_videos(self, step, videos):
    raise NotImplementedError("videos are not written by the launcher's TensorBoard writer")

  def write_audios(self, step, audios, *, sample_rate):
    raise NotImplementedError("audio is not written by the launcher's TensorBoard writer")

  def flush(self):
    self._events.flush()

  def close(self):
    self._events.close()


PROFILE_STEPS = 5


class _Trace:
  """Process 0's profile of `PROFILE_STEPS` steps from `first_step` (clu.profiler, which drives
  jax.profiler), for TensorBoard's profile plugin; for a gs:// workdir it is written locally and
  copied there on close."""

  def __init__(self, workdir: epath.Path, first_step: int):
    self._destination = workdir if storage.is_remote(workdir) else None
    self._logdir = (
      tempfile.mkdtemp(prefix="launcher-profile-") if self._destination else os.fspath(workdir)
    )
    self._first_step, self._end_step = first_step, first_step + PROFILE_STEPS
    self._tracing = False

  def __call__(self, step: int) -> None:
    """Called for every step, after the call that made it was dispatched."""
    if not self._tracing and self._first_step <= step < self._end_step:
      clu_profiler.start(self._logdir)
      self._tracing = True
    elif self._tracing and step >= self._end_step:
      clu_profiler.stop()
      self._tracing = False

  def close(self) -> None:
    if self._tracing:
      clu_profiler.stop()
    if self._destination:
      storage.copy_tree(self._logdir, self._destination)
      shutil.rmtree(self._logdir, ignore_errors=True)


# The console line shows the loss, the workload's metrics and the speeds; the finished line the
# loss and eval metrics; the rest of a report's row (NOT_SHOWN) is in metrics.jsonl and TensorBoard.
_SPEED = {"tokens_per_sec": ("tokens/s", ".0f"), "steps_per_sec": ("steps/s", ".2f")}
NOT_SHOWN = {
  "learning_rate",
  "grad_norm",
  "examples_per_sec",
  "data_wait_s",
  "eval_s",
  "checkpoint_blocked_s",
  "model_flops_per_sec",
  "mfu",
  "state_bytes_per_device",
  "step_memory_bytes_per_device",
  "peak_bytes_per_device",
  "time_to_first_step_s",
  "skipped_steps",
  "steps_per_call",
  "process_count",
  "devices_per_process",
  "grad_accum_steps",
}


def hms(seconds: float) -> str:
  seconds = int(round(seconds))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def job_text(job: str, workdir: str, config_json: str) -> str:
  """TensorBoard's `job` text (markdown): the job's layout, the workdir and the resolved config."""
  config_block = "".join(f"    {line}\n" for line in config_json.splitlines())
  return f"{job}\n\nworkdir: {workdir}\n\nconfig:\n\n{config_block}"


def console_line(step: int, num_steps: int, scalars: dict[str, float], eta_s: float | None) -> str:
  """One report as a person reads it: step, loss, the workload's and eval metrics, speed, ETA."""
  parts = [f"step {step}/{num_steps}"]
  shown = [name for name in scalars if name not in NOT_SHOWN and name not in _SPEED]
  shown.sort(key=lambda name: (name != "loss", name.startswith("eval_"), name))
  parts += [f"{name} {scalars[name]:.4g}" for name in shown]
  if scalars.get("skipped_steps"):
    parts.append(f"skipped {int(scalars['skipped_steps'])} non-finite steps")
  parts += [
    f"{scalars[name]:{spec}} {unit}" for name, (unit, spec) in _SPEED.items() if name in scalars
  ]
  if eta_s is not None and step < num_steps:
    parts.append(f"ETA {hms(eta_s)}")
  return " | ".join(parts)


def finished_line(
  num_steps: int, first_step: int, scalars: dict[str, float], seconds: float, workdir: str
) -> str:
  """The run's last line: its loss and eval metrics (loss, then eval_loss, then the rest in the
  workload's order, whichever report came first), and this start's time, named as such when the
  run resumed."""
  shown = [
    name
    for name in scalars
    if name not in NOT_SHOWN and (name == "loss" or name.startswith("eval_"))
  ]
  shown.sort(key=lambda name: (name != "loss", name != "eval_loss"))
  took = (
    f"(this start: from step {first_step}, in {hms(seconds)})"
    if first_step
    else f"in {hms(seconds)}"
  )
  metrics = ", ".join(f"{name} {scalars[name]:.4g}" for name in shown)
  return (
    f"finished {num_steps} steps {took}: {metrics}. Outputs in {workdir}; see them with: "
    f"python -m launcher.report {workdir}"
  )


class ReportWriter:
  """Host-side bookkeeping of a run's reports: timing since the last report, writers, hooks.

  Every process also appends its own records to WORKDIR/hosts/process_<i>.jsonl (a start, the
  first step, each report, the end), from which `python -m launcher.report` computes where the
  wall time went.
  """

  def __init__(
    self,
    workdir: epath.Path,
    *,
    process_index: int,
    process_count: int,
    first_step: int,
    num_steps: int,
    examples_per_step: int,
    tokens_per_example: int | None,
    flops_per_example: float | None,
    peak_flops: float | None,
    profile_first_step: int,
    started: float,
    grad_accum_steps: int = 1,
    job: str = "",
    config_json: str = "",
    tensorboard: bool = True,
    trackers: list[MetricWriter] = (),
  ):
    """`started`: the time.time() at which the run started; `job`: the job's layout in one line
    and `config_json` the resolved config, which process 0's writers get once per start (text
    `job`); `tensorboard`: whether process 0 writes TensorBoard events; `trackers`: process 0's
    other writers (launcher.trackers); `grad_accum_steps`: the start's microbatches per step, in
    its start record with its processes and devices (an elastic run's shape changes)."""
    self._process = f"host {process_index}/{process_count} ({socket.gethostname()})"
    self._is_main = process_index == 0
    self._num_steps = num_steps
    self._examples_per_step = examples_per_step
    self._tokens_per_example = tokens_per_example
    self._flops_per_example, self._peak_flops = flops_per_example, peak_flops
    self._started = started
    self._first_step_scalars = {}
    self._restored_from = ""
    self._records = storage.Appender(workdir_lib.host_records(workdir, process_index))
    startup_s = seconds_before(started)
    self._record(
      "start",
      at=started,
      process=process_index,
      process_count=process_count,
      hostname=socket.gethostname(),
      devices=jax.local_device_count(),
      grad_accum_steps=grad_accum_steps,
      first_step=first_step,
      startup_s=startup_s,
    )
    tensorboard_writer = TensorBoardWriter(workdir) if self._is_main and tensorboard else None
    self._writers = [*([tensorboard_writer] if tensorboard_writer else []), *trackers]
    if tensorboard_writer:  # TensorBoard has no run parameters: the config goes into the text.
      tensorboard_writer.write_texts(
        first_step, {"job": job_text(job, os.fspath(workdir), config_json)}
      )
      tensorboard_writer.flush()
    for writer in trackers:  # Their run parameters hold the config already.
      writer.write_texts(first_step, {"job": job, "workdir": os.fspath(workdir)})
    self._jsonl = storage.Appender(workdir_lib.metrics_file(workdir)) if self._is_main else None
    self._profile = None
    if self._is_main and profile_first_step > 0:
      self._profile = _Trace(workdir, profile_first_step)
    # The current throughput window: from the end of the last one (or of the first call) to the
    # next report, holding the steps after `_last_step` up to `_step`, the last one trained.
    self._last_step, self._last_time, self._step = first_step, time.time(), first_step
    self._steps_s = None  # The window's time spent on its steps, once they finished.
    self._train_steps_per_sec = None
    self._data_wait_s = self._checkpoint_blocked_s = self._eval_s = 0.0
    self.last_scalars = {}

  def restored_from(self, description: str) -> None:
    """Where this start's state came from ("from the local tier, step 35"): in the start-up line
    after the restore's seconds, and in the host record of the first step."""
    self._restored_from = description

  def first_report_also(self, **scalars) -> None:
    """Adds `scalars` to the first report's row (facts of the run, such as the state's size)."""
    self._first_step_scalars.update(scalars)

  def _record(self, event: str, at: float | None = None, **fields) -> None:
    """Appends one record to this host's file; `time` is when it happened (default: now)."""
    record = {"event": event, "time": time.time() if at is None else at, **fields}
    self._records.write(json.dumps(record) + "\n")
    self._records.flush()

  @contextlib.contextmanager
  def waiting_for_data(self):
    """Counts the time spent inside the block as time this host waited for its data."""
    start = time.monotonic()
    yield
    self._data_wait_s += time.monotonic() - start

  def first_step_done(self, start_parts: dict[str, float], step: int) -> None:
    """Logs, once, how long the start took and where it went: `start_parts` (seconds by name, from
    the process's start) and the rest, the first call's compilation, which ended at `step`.
    Throughput windows start after it: its steps belong to the compile time, not to a window."""
    self._last_time, self._last_step, self._step = time.time(), step, step
    since_run = self._last_time - self._started
    since_process = seconds_since_process_start()
    parts = {**start_parts, "compile and first step": since_process - sum(start_parts.values())}
    log = logging.info if self._is_main else logging.debug
    line = (
      f"time to first step {since_run:.2f} s ({since_process:.2f} s since the process "
      f"started): "
      + ", ".join(
        f"{name} {seconds:.2f} s"
        + (f" {self._restored_from}" if name == "restore" and self._restored_from else "")
        for name, seconds in parts.items()
      )
    )
    log("%s", line)
    for writer in self._writers:
      writer.write_texts(step, {"startup": line})
    self._first_step_scalars["time_to_first_step_s"] = since_run
    self._record(
      "first_step",
      compile_s=since_run,
      restored_from=self._restored_from,
      **{f"{name.replace(' ', '_')}_s": seconds for name, seconds in parts.items()},
    )
    self._data_wait_s = 0.0

  @contextlib.contextmanager
  def blocked_by_checkpoint(self):
    """Counts the time spent inside the block as time the loop was blocked by checkpointing."""
    start = time.monotonic()
    yield
    seconds = time.monotonic() - start
    self._checkpoint_blocked_s += seconds
    logging.debug("%s: blocked %.3f s by checkpointing", self._process, seconds)

  @contextlib.contextmanager
  def evaluating(self, scalars: dict[str, float]):
    """Counts the time spent inside the block as eval time, and puts it in `scalars["eval_s"]`."""
    start = time.monotonic()
    yield
    seconds = time.monotonic() - start
    self._eval_s += seconds
    scalars["eval_s"] = seconds

  def after_steps(self, first_step: int, last_step: int) -> None:
    """Steps `first_step`..`last_step` were dispatched; runs the profiler hook once for each."""
    self._step = last_step
    if self._profile:
      for step in range(first_step, last_step + 1):
        self._profile(step)

  def _time_on_steps(self, now: float) -> float:
    """The window's seconds up to `now`, less the saves and evals in it."""
    return now - self._last_time - self._eval_s - self._checkpoint_blocked_s

  def steps_finished(self) -> None:
    """The window's steps are done (the report's own work, saves and eval follow): they took
    the time since the window began, less the saves and evals between them."""
    self._steps_s = self._time_on_steps(time.time())

  def throughput(self, step: int) -> dict[str, float]:
    """This host's speed over the window that ends now, at `step`; every process records it in
    its hosts/ file. Speeds count the time from the window's start to `steps_finished`, without
    the saves and evals in between (each is its own field); waiting for data counts, as it slows
    the steps. A window without steps (a report right after the first call) has no speed."""
    now = time.time()
    seconds, steps = now - self._last_time, step - self._last_step
    training_s = self._steps_s if self._steps_s is not None else self._time_on_steps(now)
    scalars = {"data_wait_s": self._data_wait_s, "checkpoint_blocked_s": self._checkpoint_blocked_s}
    speeds = {}
    if steps > 0 and training_s > 0:
      speeds["steps_per_sec"] = steps / training_s
      speeds["examples_per_sec"] = speeds["steps_per_sec"] * self._examples_per_step
      if self._tokens_per_example:
        speeds["tokens_per_sec"] = speeds["examples_per_sec"] * self._tokens_per_example
      if self._flops_per_example:
        speeds["model_flops_per_sec"] = speeds["examples_per_sec"] * self._flops_per_example
        if self._peak_flops:
          speeds["mfu"] = speeds["model_flops_per_sec"] / self._peak_flops
      self._train_steps_per_sec = speeds["steps_per_sec"]
      logging.debug(
        "%s step %d: %.2f steps/s, waited %.3f s for data (%.1f%% of the window)",
        self._process,
        step,
        speeds["steps_per_sec"],
        self._data_wait_s,
        100 * self._data_wait_s / seconds,
      )
    scalars.update(speeds)
    scalars.update(self._first_step_scalars)
    self._first_step_scalars = {}
    self._record(
      "report",
      step=step,
      steps=steps,
      window_s=seconds,
      steps_s=training_s,
      **self._waits(),
      **{name: speeds[name] for name in ("steps_per_sec", "examples_per_sec") if name in speeds},
    )
    self._last_step, self._last_time, self._steps_s = step, now, None
    self._data_wait_s = self._checkpoint_blocked_s = self._eval_s = 0.0
    return scalars

  def _waits(self) -> dict[str, float]:
    return {
      "data_wait_s": self._data_wait_s,
      "checkpoint_blocked_s": self._checkpoint_blocked_s,
      "eval_s": self._eval_s,
    }

  def write(self, step: int, scalars: dict[str, float]) -> None:
    """One report: its console line, TensorBoard and a metrics.jsonl row (process 0)."""
    scalars = {name: float(np.asarray(value)) for name, value in scalars.items()}
    self.last_scalars.update(scalars)
    if not self._is_main:
      return
    eta_s = (
      (self._num_steps - step) / self._train_steps_per_sec if self._train_steps_per_sec else None
    )
    logging.info("%s", console_line(step, self._num_steps, scalars, eta_s))
    for writer in self._writers:
      writer.write_scalars(step, scalars)
      writer.flush()
    self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self._jsonl.flush()

  def close(self, outcome: str = "FINISHED") -> None:
    """Records the end (the steps trained since the last report, and the waits) and closes
    every writer; a tracker's run ends with `outcome` (FINISHED, FAILED or KILLED)."""
    now = time.time()
    self._record(
      "end",
      outcome=outcome,
      step=self._step,
      steps=self._step - self._last_step,
      window_s=now - self._last_time,
      steps_s=self._time_on_steps(now),
      **self._waits(),
    )
    self._records.close()
    for writer in self._writers:
      if hasattr(writer, "end"):
        writer.end(outcome)
      else:
        writer.close()
    if self._is_main:
      self._jsonl.close()
    if self._profile:
      self._profile.close()
