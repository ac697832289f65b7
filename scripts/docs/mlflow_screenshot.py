"""Remakes docs/mlflow_run.png: a real `mlflow server` (tests/mlflow_server.py), configs/lm.py:tiny
trained with --config.trackers=tensorboard,mlflow, and headless Chromium's picture of the run's
metrics page.

    python scripts/docs/mlflow_screenshot.py     # ~2 min; needs the [test] extra and chromium
"""

import json
import os
import pathlib
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.mlflow_server import MlflowServer  # pylint: disable=wrong-import-position


def main():
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp)
    server = MlflowServer(root / "mlflow", root / "mlflow.log")
    try:
      env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": server.url,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
      }
      subprocess.run(
        [
          sys.executable,
          "-m",
          "launcher",
          "--config=configs/lm.py:tiny",
          f"--workdir={root / 'lm_tiny'}",
          "--config.trackers=tensorboard,mlflow",
          "--config.log_every_steps=10",
        ],
        cwd=REPO,
        env=env,
        check=True,
        timeout=900,
      )
      run_id = json.loads((root / "lm_tiny" / "trackers.json").read_text())["mlflow"]
      from mlflow.tracking import MlflowClient  # pylint: disable=import-outside-toplevel

      experiment = MlflowClient(server.url).get_run(run_id).info.experiment_id
      url = f"{server.url}/#/experiments/{experiment}/runs/{run_id}/model-metrics"
      # Virtual time lets the page's charts load before the picture is taken.
      subprocess.run(
        [
          "chromium",
          "--headless",
          "--no-sandbox",
          "--disable-gpu",
          "--hide-scrollbars",
          f"--screenshot={REPO / 'docs' / 'mlflow_run.png'}",
          "--window-size=1400,1000",
          "--virtual-time-budget=60000",
          "--run-all-compositor-stages-before-draw",
          url,
        ],
        check=True,
        capture_output=True,
        timeout=300,
      )
    finally:
      server.stop()
  print(f"wrote {REPO / 'docs' / 'mlflow_run.png'}")


if __name__ == "__main__":
  main()
