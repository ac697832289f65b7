"""A real MLflow tracking server for tests (`mlflow server`, from the [mlflow] extra) on
127.0.0.1, its runs in a SQLite file under `root`."""

import os
import pathlib
import signal
import subprocess
import sys

from launcher.local import free_port
from tests.helpers import wait_for_http


class MlflowServer:
  """The server process; `url` is what MLFLOW_TRACKING_URI takes."""

  def __init__(self, root: pathlib.Path, log_path: pathlib.Path):
    root.mkdir(parents=True, exist_ok=True)
    self.port = free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    with open(log_path, "ab") as log:
      self._process = subprocess.Popen(
        [
          sys.executable,
          "-m",
          "mlflow",
          "server",
          "--host",
          "127.0.0.1",
          "--port",
          str(self.port),
          "--workers",
          "1",
          "--backend-store-uri",
          f"sqlite:///{root}/mlflow.db",
          "--artifacts-destination",
          str(root / "artifacts"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
      )
    try:
      wait_for_http(f"{self.url}/health", self._process, 90, f"mlflow server (its log: {log_path})")
    except RuntimeError:
      self.stop()
      raise

  def stop(self) -> None:
    try:
      os.killpg(self._process.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
    self._process.wait()
