"""configs/NAME.py (argument `NAME` or `NAME:ARG`) run through tests/recording_workload.py."""

import importlib.util
import os

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def get_config(name_and_arg: str):
  name, _, arg = name_and_arg.partition(":")
  spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  config.inner_workload = config.workload
  config.workload = "tests.recording_workload"
  config.ids_dir = ""
  return config
