"""What a person sees on the console: the launcher's own lines without library noise (unless
--verbosity asks for it), the process on every line of a multi-process job, one-line errors, and
`--help`."""

import logging as std_logging
import os
import sys
import threading

from absl import flags, logging

from launcher.errors import EXIT_USAGE, UsageError

_LAUNCHER_DIR = os.path.dirname(os.path.abspath(__file__))


# orbax's warnings that say nothing is wrong: a step directory read on its own (restore_from,
# launcher.sample), and the preemption sync point that the launcher's own line reports.
_ORBAX_NOTICES = ("Metadata file does not exist", "Reached preemption sync point")


class _LibraryNoise(std_logging.Filter):
  """Drops other libraries' INFO and DEBUG lines; their warnings and errors stay, except orbax's
  errors from its background threads and asyncio's word on their tasks' unread exceptions (orbax
  raises them again in the thread that saves or waits, where the launcher names them in one
  line), and orbax's notices in _ORBAX_NOTICES."""

  def filter(self, record):
    path = os.path.abspath(record.pathname)
    if record.levelno >= std_logging.ERROR and f"{os.sep}orbax{os.sep}" in path:
      return False
    if record.name == "asyncio" and "exception was never retrieved" in str(record.msg):
      return False
    if f"{os.sep}orbax{os.sep}" in path and any(
      words in str(record.msg) for words in _ORBAX_NOTICES
    ):
      return False
    return (
      record.levelno >= std_logging.WARNING
      or path.startswith(_LAUNCHER_DIR)
      or not any(part in path for part in ("site-packages", "dist-packages"))
    )


class _Plain(std_logging.Formatter):
  """`[process i/n] message`, or just the message in a single-process run."""

  def __init__(self, prefix: str = ""):
    super().__init__()
    self.prefix = prefix

  def format(self, record):
    level = "" if record.levelno < std_logging.WARNING else f"{record.levelname.lower()}: "
    return f"{self.prefix}{level}{super().format(record)}"


class _Console(std_logging.Handler):
  """Progress lines (INFO) on stdout, so that `> log` keeps them (on stderr for a tool whose
  stdout is its product); warnings and errors on stderr. Each line is flushed as it is written
  (a pipe to launcher.local keeps their order)."""

  def __init__(self, progress_on_stdout: bool):
    super().__init__()
    self._progress_on_stdout = progress_on_stdout

  def emit(self, record):
    progress = record.levelno < std_logging.WARNING and self._progress_on_stdout
    stream = sys.stdout if progress else sys.stderr
    try:
      stream.write(self.format(record) + "\n")
      stream.flush()
    except Exception:  # pylint: disable=broad-except  # A closed console never stops a run.
      self.handleError(record)


_formatter = _Plain()


def quiet_libraries(progress_on_stdout: bool = True) -> None:
  """Unless --verbosity is 1 or more (absl's own format, every library's lines, all on stderr):
  plain lines, progress on stdout (stderr for a tool that prints its product there) and warnings
  and errors on stderr, and other libraries' INFO lines and C++ notices left out."""
  if logging.get_verbosity() >= logging.DEBUG:
    return
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # XLA's C++ INFO and WARNING lines.
  # MLflow logs through its own handler (not the root logger's), at the level this names, read
  # when mlflow is first imported: its "Creating initial MLflow database tables" lines.
  os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
  root = std_logging.getLogger()
  root.removeHandler(logging.get_absl_handler())
  handler = _Console(progress_on_stdout)
  handler.setFormatter(_formatter)
  handler.addFilter(_LibraryNoise())
  root.addHandler(handler)
  sys.excepthook = _without_orbax_leftovers(sys.excepthook)
  threading.excepthook = _without_orbax_leftovers(threading.excepthook, unpack=True)
  sys.unraisablehook = _without_orbax_leftovers(sys.unraisablehook, unpack=True)


def _without_orbax_leftovers(hook, unpack=False):
  """`hook` (sys.excepthook, or threading's or the unraisable hook, which take one argument),
  quiet about what orbax leaves behind a failure that the launcher names in its own line:
  "Event loop is closed" (tensorstore's callbacks into orbax's asyncio loop after a failed save
  closed it), and the read coroutines of a failed restore, abandoned and then collected."""

  def quiet(*args):
    value = args[0].exc_value if unpack else args[1]
    if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
      return
    code = getattr(getattr(args[0], "object", None), "cr_code", None) if unpack else None
    if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
      return
    hook(*args)

  return quiet


def name_process(process_index: int, process_count: int) -> None:
  """Every later line of a multi-process job starts with its process."""
  if process_count > 1:
    _formatter.prefix = f"[process {process_index}/{process_count}] "


def flag_value(args: list[str], name: str) -> str | None:
  """The value of `--name=VALUE` or `--name VALUE` among `args`; the last one given wins, as in
  absl's parsing."""
  value = None
  for i, arg in enumerate(args):
    if arg.startswith(name + "="):
      value = arg.split("=", 1)[1]
    elif arg == name and i + 1 < len(args):
      value = args[i + 1]
  return value


def usage_error(message: str, prefix: str = "error:") -> None:
  """Bad input: one message, and the exit code that tells a supervisor not to restart."""
  print(f"{prefix} {message}", file=sys.stderr, flush=True)
  sys.exit(EXIT_USAGE)


def run_tool(main, prefix: str = "error:") -> None:
  """absl's app.run for the command-line tools beside the launcher (launcher.local, .report,
  .corpus, scripts/tpu/pod.py): a mistake in a flag, or a UsageError from `main`, is one line
  `PREFIX message` and exit 2, as the launcher's own bad input is."""
  from absl import app  # pylint: disable=import-outside-toplevel

  def parse(argv):
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      usage_error(f"{e}: --help lists the flags", prefix)

  def guarded(argv):
    try:
      return main(argv)
    except UsageError as e:
      usage_error(str(e), prefix)

  app.run(guarded, flags_parser=parse)


def print_help(main_module) -> None:
  """The launcher's own flags and where to find the config keys, on stdout."""
  print(
    "usage: python -m launcher --config=CONFIG_FILE[:VARIANT] --workdir=DIR "
    "[--config.KEY=VALUE ...] [flags]\n\n"
    "Trains the config's workload on every device of every process; a workdir that holds "
    "checkpoints resumes.\n\n"
    "Config keys: python -m launcher --config=configs/lm.py --show_config prints every key of "
    "a config with its value and meaning (overrides applied).\n"
    "Configs shipped: configs/linear.py, configs/classifier.py, configs/lm.py:tiny|small|"
    "medium.\n\nflags:"
  )
  print(flags.FLAGS.module_help(main_module))
  print("\n--verbosity=1 shows every library's log lines; --helpfull lists every library's flags.")
