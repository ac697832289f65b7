"""What several tests share: loading a config file, running the launcher in a subprocess."""

import importlib.util
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, arg: str | None = None, **overrides):
  """configs/NAME.py's get_config(ARG) with keys overridden, as `--config.KEY=VALUE` would."""
  spec = importlib.util.spec_from_file_location(f"config_{name}",
                                                os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  config.update(overrides)
  return config


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def run_launcher(*args, env=None, timeout=300, devices=8):
  """`python -m launcher ARGS` in a subprocess, bounded in time; returns the CompletedProcess."""
  full_env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
              **(env or {})}
  return subprocess.run([sys.executable, "-m", "launcher", *args], cwd=REPO, env=full_env,
                        capture_output=True, text=True, timeout=timeout, check=False)


