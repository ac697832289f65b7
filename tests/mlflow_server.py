"""A real MLflow tracking server for tests (`mlflow server`, from the [mlflow] extra) on
127.0.0.1, its runs in a SQLite file under `root`."""

import pathlib
import subprocess
import sys
import time
import urllib.request

from launcher.local import free_port


class MlflowServer:
  """The server process; `url` is what MLFLOW_TRACKING_URI takes."""

  def __init__(self, root: pathlib.Path, log_path: pathlib.Path):
    root.mkdir(parents=True, exist_ok=True)
    self.port = free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    with open(log_path, "ab") as log:
      self._process = subprocess.Popen(
          [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
           str(self.port), "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
           "--artifacts-destination", str(root / "artifacts")],
          stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 90
    while True:
      try:
        urllib.request.urlopen(f"{self.url}/health", timeout=1).read()
        return
      except OSError:
        if time.monotonic() > deadline or self._process.poll() is not None:
          self.stop()
          raise RuntimeError(f"mlflow server did not start; see {log_path}") from None
        time.sleep(0.2)

  def stop(self) -> None:
    import os, signal  # pylint: disable=import-outside-toplevel,multiple-imports
    try:
      os.killpg(self._process.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
    self._process.wait()
