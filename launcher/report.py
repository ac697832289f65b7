"""`python -m launcher.report WORKDIR`: plots, a per-host table and a goodput breakdown of a run.

Reads what the run wrote (metrics.jsonl from process 0, hosts/process_<i>.jsonl from every
process) and writes WORKDIR/report/: PNG plots and report.md. Works on a run that is still going
(it reads what is there) and on a resumed run (each start is a segment; restarts are marked).
"""

import io
import json
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position
from etils import epath  # pylint: disable=wrong-import-position

from launcher import console, storage  # pylint: disable=wrong-import-position
from launcher import workdir as workdir_lib  # pylint: disable=wrong-import-position
from launcher.errors import UsageError  # pylint: disable=wrong-import-position

GOODPUT_PARTS = (
  "startup",
  "compile",
  "productive steps",
  "waiting for data",
  "blocked by checkpoint saves",
  "eval",
  "lost to restarts",
  "other (reporting, shutdown)",
)


def host_records(workdir: epath.Path) -> dict[int, list[dict]]:
  hosts = workdir_lib.hosts_dir(workdir)
  paths = hosts.glob("process_*.jsonl") if hosts.exists() else []
  records = {int(p.stem.rsplit("_", 1)[1]): storage.read_jsonl(p) for p in sorted(paths)}
  return {process: host for process, host in records.items() if host}


def segments(records: list[dict]) -> list[list[dict]]:
  """One host's records split at each start of the process."""
  result = []
  for record in records:
    if record["event"] == "start" or not result:
      result.append([])
    result[-1].append(record)
  return result


def _with_next(runs: list[list[dict]]):
  """Each start with the one after it (None after the last)."""
  return zip(runs, [*runs[1:], None])


def _reached_a_step(run: list[dict]) -> bool:
  """Whether a start finished its first call (its first steps)."""
  return any(record["event"] == "first_step" for record in run)


def outcome(records: list[dict]) -> str:
  """How one host's last start ended, from its end record: finished, preempted or failed; a start
  without one is still running or was killed."""
  last = records[-1]
  if last["event"] != "end":
    return "running or killed"
  # An end record without an outcome is from a version that wrote none.
  ended = last.get("outcome", "FINISHED" if _reached_a_step(segments(records)[-1]) else "FAILED")
  return {"FINISHED": "finished", "KILLED": "preempted", "FAILED": "failed"}[ended]


OUTCOME_PHRASES = {
  "finished": "finished",
  "preempted": "stopped on a preemption notice",
  "failed": "failed",
  "running or killed": "is still running or was killed",
}


def _process_start(run: list[dict]) -> float:
  return run[0]["time"] - run[0]["startup_s"]


def _lost_tail(run: list[dict], next_run: list[dict] | None) -> float:
  """Seconds from the last record of a start that died without its end record (killed) to the
  next start: its steps after the last report, its death and the restart's wait."""
  if next_run is None or run[-1]["event"] == "end":
    return 0.0
  return max(_process_start(next_run) - run[-1]["time"], 0.0)


def goodput(records: list[dict]) -> dict[str, float]:
  """Where one host's wall time went, in seconds, over every start of the run.

  A start's wall time is its startup (imports, cluster init: before the run began) plus the time
  from the run's start to its last record; the records split it exactly: compile (the first call,
  its steps included), then windows of steps (each report's, and the end's: data wait,
  checkpoint saves, eval, the steps themselves, and the report's own work), then the end. A window
  whose steps a later start re-did (it resumed from an earlier checkpoint) is lost to restarts in
  that share, waits and all; so is the time from a killed start's last record to the next start.
  """
  parts = dict.fromkeys(GOODPUT_PARTS, 0.0)
  for run, next_run in _with_next(segments(records)):
    parts["startup"] += run[0]["startup_s"]
    parts["lost to restarts"] += _lost_tail(run, next_run)
    if not _reached_a_step(run):  # It ended in its setup or first call: all of it is compile.
      parts["compile"] += run[-1]["time"] - run[0]["time"]
      continue
    resumed_at = next_run[0]["first_step"] if next_run else None
    for record in run[1:]:
      if record["event"] == "first_step":
        parts["compile"] += record["compile_s"]
        continue
      steps = record.get("steps", 0)
      redone = 0.0  # The share of the window's steps that a later start trained again.
      if resumed_at is not None and steps and record["step"] > resumed_at:
        redone = min(record["step"] - resumed_at, steps) / steps
      parts["lost to restarts"] += record["window_s"] * redone
      kept = 1.0 - redone
      waits = record["data_wait_s"] + record["checkpoint_blocked_s"] + record["eval_s"]
      parts["waiting for data"] += record["data_wait_s"] * kept
      parts["blocked by checkpoint saves"] += record["checkpoint_blocked_s"] * kept
      parts["eval"] += record["eval_s"] * kept
      # The window's steps, less the data wait inside them; what is left is the report's own work.
      rest = record["window_s"] - waits
      on_steps = (
        min(record.get("steps_s", rest + record["data_wait_s"]) - record["data_wait_s"], rest)
        if steps
        else 0.0
      )
      parts["productive steps"] += on_steps * kept
      parts["other (reporting, shutdown)"] += (rest - on_steps) * kept
  return parts


def _shape(start: dict) -> tuple[int, int, int]:
  return start["process_count"], start["devices"], start.get("grad_accum_steps", 1)


def starts(records: list[dict]) -> list[dict]:
  """One host's starts: the step each began at, its shape (processes x devices per process,
  microbatches per step) and, for a start whose shape differs from the one before (an elastic
  resize), what the resize cost: the seconds from the previous start's last record to this
  start's first step, plus the previous start's windows that this one trained again."""
  rows = []
  runs = segments(records)
  for before, run in zip([None, *runs[:-1]], runs):
    start = run[0]
    processes, devices, microbatches = _shape(start)
    row = {
      "first_step": start["first_step"],
      "process_count": processes,
      "devices_per_process": devices,
      "grad_accum_steps": microbatches,
      "resize_s": None,
    }
    if before is not None and _shape(before[0]) != _shape(start):
      began = next((r["time"] for r in run if r["event"] == "first_step"), run[-1]["time"])
      redone = sum(
        r["window_s"] * min(r["step"] - start["first_step"], r["steps"]) / r["steps"]
        for r in before
        if r["event"] in ("report", "end") and r.get("steps") and r["step"] > start["first_step"]
      )
      row["resize_s"] = max(began - before[-1]["time"], 0.0) + redone
    rows.append(row)
  return rows


def restores(records: list[dict]) -> list[dict]:
  """One host's starts that reached a step: where each restored from (`restored_from` of its
  `first_step` record: the local tier, the peer's copy, the persistent checkpoint) and in how
  many seconds."""
  rows = []
  for run in segments(records):
    first = next((r for r in run if r["event"] == "first_step"), None)
    if first is not None:
      rows.append(
        {
          "first_step": run[0]["first_step"],
          "restored_from": first.get("restored_from") or "",
          "restore_s": first.get("restore_s"),
        }
      )
  return rows


def wall_time(records: list[dict]) -> float:
  """One host's seconds over every start: each start's own, and the gap after a killed one."""
  return sum(
    run[0]["startup_s"] + run[-1]["time"] - run[0]["time"] + _lost_tail(run, next_run)
    for run, next_run in _with_next(segments(records))
  )


# A data-wait share above the others' by less than this is not marked however steady the hosts
# are: it costs the run too little to chase.
STRAGGLER_FLOOR = 0.05
STRAGGLER_RULE = (
  "No straggler: no host's data-wait share is above the others' by more than its per-report "
  f"spread plus theirs and by more than {STRAGGLER_FLOOR:.0%} of the step time."
)

ONE_HOST = "One process: no other host to compare its data wait with, so no straggler."


def _steps_time(record: dict) -> float:
  """A window's seconds less its saves and eval: its steps, their data wait and the report."""
  return record["window_s"] - record["checkpoint_blocked_s"] - record["eval_s"]


def straggler(host: dict, others: list[dict]) -> str | None:
  """Why `host` (a host_table row) holds the others back, or None. Every host waits for the
  slowest at each all-reduce, so steps/s is the same on all; a straggler's own input pipeline
  shows as its data wait, its peers' wait for it as their step time. So: its data-wait share is
  above the others' mean by more than the spread of its per-report shares plus that of theirs,
  and by more than STRAGGLER_FLOOR. Without 2 timed reports on it and on another host, no mark."""
  others = [row for row in others if len(row["shares"]) > 1]
  if len(host["shares"]) < 2 or not others:
    return None
  share = host["data_wait_share"]
  others_share = statistics.mean(row["data_wait_share"] for row in others)
  noise = statistics.stdev(host["shares"]) + statistics.stdev(
    [value for row in others for value in row["shares"]]
  )
  if share - others_share <= max(noise, STRAGGLER_FLOOR):
    return None
  return (
    f"its input pipeline: it waits for data {100 * share:.1f}% of its step time, the others "
    f"{100 * others_share:.1f}% (their wait for it is in their steps)"
  )


def host_table(records: dict[int, list[dict]]) -> list[dict]:
  """One row per host: its steps/s and data-wait share over its reports (saves and evals apart;
  None without a timed report), the per-report shares, and `straggler`: why it holds the others
  back, or None."""
  rows = []
  for process, host in sorted(records.items()):
    start = host[0]
    timed = [r for r in host if r["event"] == "report" and r["steps"] and _steps_time(r) > 0]
    seconds = sum(_steps_time(r) for r in timed)
    rows.append(
      {
        "process": process,
        "hostname": start["hostname"],
        "devices": start["devices"],
        "steps_per_sec": sum(r["steps"] for r in timed) / seconds if seconds else None,
        "data_wait_share": sum(r["data_wait_s"] for r in timed) / seconds if seconds else None,
        "shares": [r["data_wait_s"] / _steps_time(r) for r in timed],
        "last_step": last_step(host),
      }
    )
  for row in rows:
    row["straggler"] = straggler(row, [other for other in rows if other is not row])
  return rows


def last_step(records: list[dict]) -> int:
  """The last step one host trained (its first start's first step if none)."""
  return max(
    (r["step"] for r in records if r["event"] in ("report", "end")),
    default=records[0]["first_step"],
  )


def restart_steps(records: dict[int, list[dict]]) -> list[int]:
  """The steps at which a start after a host's first one began."""
  return sorted({run[0]["first_step"] for host in records.values() for run in segments(host)[1:]})


def throughput_lines(records: dict[int, list[dict]]) -> tuple[dict[int, list[list[tuple]]], list]:
  """What throughput.png draws: per host, one line per start of (seconds since the first process
  started, steps/s, examples/s) points, and the seconds at which each restart's first process
  started. A line never joins two starts: the time between them is a gap."""
  t0 = min(_process_start(segments(host)[0]) for host in records.values())
  lines = {
    process: [
      [
        (r["time"] - t0, r["steps_per_sec"], r["examples_per_sec"])
        for r in run
        if r["event"] == "report" and "steps_per_sec" in r
      ]
      for run in segments(host)
    ]
    for process, host in sorted(records.items())
  }
  restarts = {}
  for host in records.values():
    for run in segments(host)[1:]:
      at = _process_start(run) - t0
      restarts[run[0]["first_step"]] = min(restarts.get(run[0]["first_step"], at), at)
  return lines, sorted(restarts.values())


def _mark_restarts(axis, positions: list[float]) -> None:
  """A dashed line at each restart, labelled inside the top of the frame."""
  for position in positions:
    axis.axvline(position, color="grey", linestyle="--", linewidth=1)
    axis.annotate(
      "restart",
      (position, 1),
      xycoords=("data", "axes fraction"),
      xytext=(2, -3),
      textcoords="offset points",
      rotation=90,
      ha="left",
      va="top",
      fontsize=8,
      color="grey",
    )


def _plot_starts(axis, process: int, lines: list[list[tuple]], color: str) -> None:
  """One host's lines, one per start, in one color and under one legend label."""
  for index, points in enumerate(lines):
    axis.plot(
      [p[0] for p in points],
      [p[1] for p in points],
      ".-",
      color=color,
      label=f"process {process}" if index == 0 else None,
    )


def _say_no_steps(axis) -> None:
  """Marks an axis that has nothing to draw because no step was trained."""
  axis.text(
    0.5, 0.5, "no steps yet", transform=axis.transAxes, ha="center", va="center", color="grey"
  )
  axis.set(xticks=[], yticks=[])


def plots(
  out: epath.Path, metrics: list[dict], records: dict[int, list[dict]], table: list[dict]
) -> list[str]:
  """Writes the PNGs into `out`; returns their file names. `table` is host_table(records)."""
  files = []
  restarts = restart_steps(records)
  colors = {process: f"C{index % 10}" for index, process in enumerate(sorted(records))}

  def save(figure, name):
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=100)
    storage.write_bytes(out / name, png.getvalue())
    plt.close(figure)
    files.append(name)

  # A step re-done after a kill appears again in metrics.jsonl: its last row is the one that counts.
  train = sorted({r["step"]: r for r in metrics if "loss" in r}.values(), key=lambda r: r["step"])
  evals = sorted(
    {r["step"]: r for r in metrics if "eval_loss" in r}.values(), key=lambda r: r["step"]
  )
  figure, axis = plt.subplots(figsize=(7, 4))
  axis.set(xlabel="step", ylabel="loss", title="Loss")
  if train or evals:
    axis.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if evals:
      axis.plot(
        [r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss"
      )
    _mark_restarts(axis, restarts)
    axis.legend()
  else:
    _say_no_steps(axis)
  save(figure, "loss.png")

  lines, restart_seconds = throughput_lines(records)
  figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
  for process, starts in lines.items():
    _plot_starts(
      top, process, [[(t, rate) for t, rate, _ in run] for run in starts], colors[process]
    )
    _plot_starts(
      bottom,
      process,
      [[(t, examples) for t, _, examples in run] for run in starts],
      colors[process],
    )
  top.set(ylabel="steps/s", title="Throughput")
  bottom.set(xlabel="seconds since the first process started", ylabel="examples/s")
  if any(points for starts in lines.values() for points in starts):
    for axis in (top, bottom):
      _mark_restarts(axis, restart_seconds)
    top.legend(fontsize=8)
  else:
    for axis in (top, bottom):
      _say_no_steps(axis)
  save(figure, "throughput.png")

  figure, (left, right) = plt.subplots(1, 2, figsize=(8, 3.5))
  names = [f"{r['process']}{' (straggler)' if r['straggler'] else ''}" for r in table]
  positions = range(len(table))
  left.bar(
    positions,
    [r["steps_per_sec"] or 0.0 for r in table],
    color=["tab:red" if r["straggler"] else "tab:blue" for r in table],
  )
  left.set(xlabel="process", ylabel="steps/s", title="Speed per host")
  right.bar(
    positions,
    [100 * (r["data_wait_share"] or 0.0) for r in table],
    color=["tab:red" if r["straggler"] else "tab:orange" for r in table],
  )
  right.set(xlabel="process", ylabel="% of step time", title="Waiting for data per host")
  for axis in (left, right):
    if all(r["steps_per_sec"] is None for r in table):
      _say_no_steps(axis)
    axis.set_xticks(positions, names)
  save(figure, "hosts.png")

  figure, axis = plt.subplots(figsize=(7, 3.5))
  for process, host in sorted(records.items()):
    _plot_starts(
      axis,
      process,
      [
        [(r["step"], r["checkpoint_blocked_s"]) for r in run if r["event"] == "report"]
        for run in segments(host)
      ],
      colors[process],
    )
  axis.set(xlabel="step", ylabel="seconds", title="Time blocked by checkpoint saves per report")
  if any(r["event"] == "report" for host in records.values() for r in host):
    _mark_restarts(axis, restarts)
    axis.legend(fontsize=8)
  else:
    _say_no_steps(axis)
  save(figure, "checkpoints.png")
  return files


def build(location: str) -> str:
  """Writes WORKDIR/report/ (a local path or gs://) and returns the path of its report.md."""
  workdir = storage.path(location)
  out = workdir_lib.report_dir(workdir)
  with storage.clear_errors(workdir, "read"):
    metrics = storage.read_jsonl(workdir_lib.metrics_file(workdir))
    records = host_records(workdir)
  if not records:
    raise UsageError(f"{workdir} has no hosts/process_*.jsonl: is it a launcher workdir?")
  storage.makedirs(out)
  table = host_table(records)
  images = plots(out, metrics, records, table)
  main = records[min(records)]
  parts, wall = goodput(main), wall_time(main)
  runs = segments(main)
  ended = outcome(main)
  trained = any(_reached_a_step(run) for run in runs)
  restarts = ", ".join(str(run[0]["first_step"]) for run in runs[1:])
  where = f"at step {last_step(main)}" if trained else "before its first step: no steps yet"
  lines = [
    f"# Run report: {workdir}",
    "",
    f"{len(records)} process(es), {len(runs)} start(s) "
    f"({f'restarts at steps {restarts}' if restarts else 'no restart'}); "
    f"{'its last start' if len(runs) > 1 else 'it'} {OUTCOME_PHRASES[ended]} {where}.",
    "",
    "## Goodput (process 0's wall time)",
    "",
    "| part | seconds | share |",
    "| --- | ---: | ---: |",
  ]
  for name in GOODPUT_PARTS:
    lines.append(f"| {name} | {parts[name]:.2f} | {100 * parts[name] / (wall or 1.0):.1f}% |")
  shapes = starts(main)
  lines += [f"| **wall time** | {wall:.2f} | 100% |", ""]
  if len({_shape(run[0]) for run in runs}) > 1:
    lines += [
      "## Starts (the job's shape changed: an elastic resize)",
      "",
      "| first step | processes x devices | microbatches | resize cost (s) |",
      "| ---: | --- | ---: | ---: |",
    ]
    for row in shapes:
      cost = "" if row["resize_s"] is None else f"{row['resize_s']:.2f}"
      lines.append(
        f"| {row['first_step']} | {row['process_count']} x {row['devices_per_process']} | "
        f"{row['grad_accum_steps']} | {cost} |"
      )
    lines += [
      "",
      "A resize's cost is the time from the previous start's last record to this start's "
      "first step, plus the steps it trained again; goodput counts it in startup, compile and "
      "lost to restarts.",
      "",
    ]
  restored = restores(main)
  if any(row["restored_from"] for row in restored):
    lines += [
      "## Restores (process 0)",
      "",
      "| first step | restored | seconds |",
      "| ---: | --- | ---: |",
    ]
    for row in restored:
      seconds = "" if row["restore_s"] is None else f"{row['restore_s']:.2f}"
      lines.append(f"| {row['first_step']} | {row['restored_from'] or 'fresh'} | {seconds} |")
    lines.append("")
  lines += [
    "## Per host",
    "",
    "| process | hostname | devices | steps/s | data-wait share of step time | last step |",
    "| --- | --- | ---: | ---: | ---: | ---: |",
  ]
  for row in table:
    mark = " **straggler**" if row["straggler"] else ""
    speed, wait = ("no steps", "no steps")
    if row["steps_per_sec"] is not None:
      speed, wait = f"{row['steps_per_sec']:.2f}", f"{100 * row['data_wait_share']:.1f}%"
    lines.append(
      f"| {row['process']}{mark} | {row['hostname']} | {row['devices']} | {speed} | {wait} | "
      f"{row['last_step']} |"
    )
  marks = [
    f"Process {row['process']} is a straggler; the cause: {row['straggler']}."
    for row in table
    if row["straggler"]
  ]
  lines += ["", *(marks or [STRAGGLER_RULE if len(table) > 1 else ONE_HOST])]
  lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in images]
  path = out / "report.md"
  storage.write_text(path, "\n".join(lines) + "\n")
  storage.write_text(
    out / "summary.json",
    json.dumps(
      {
        "goodput_s": parts,
        "wall_s": wall,
        "hosts": table,
        "starts": len(runs),
        "shapes": shapes,
        "outcome": ended,
        "finished": ended == "finished" and trained,
        "last_step": last_step(main) if trained else None,
      },
      indent=2,
      allow_nan=False,
    ),
  )
  return str(path)


def main(argv: list[str]) -> None:
  if len(argv) != 2:
    raise UsageError("usage: python -m launcher.report WORKDIR")
  print(f"wrote {build(argv[1])}")


if __name__ == "__main__":
  console.run_tool(main)
