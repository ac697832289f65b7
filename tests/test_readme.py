"""The README's snippets, executed as written, and its reference tables, checked against the code."""

import os
import re
import subprocess
import sys

import pytest

from launcher import config as config_lib
from tests.helpers import REPO, read_metrics, run_launcher

with open(os.path.join(REPO, "README.md")) as _f:
  README = _f.read()


def snippet(marker: str) -> str:
  """The ```python block right after `<!-- marker -->` in the README."""
  return README.split(f"<!-- {marker} -->")[1].split("```python")[1].split("```")[0]


def table_rows(heading: str) -> list[list[str]]:
  """The rows of the first table after `heading`, as cells."""
  section = README.split(heading, 1)[1]
  lines = [line for line in section.splitlines() if line.startswith("| ")]
  first = section.index(lines[0])
  block = section[first:].split("\n\n")[0].splitlines()
  return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in block[2:]]


def test_the_config_reference_is_every_launcher_key_once_with_its_default_and_meaning():
  rows = table_rows("### Config reference")
  assert [row[0] for row in rows] == [f"`{key}`" for key in config_lib.KEYS]
  for key, default_cell, meaning in rows:
    default, text = config_lib.KEYS[key.strip("`")]
    assert meaning == text
    assert default_cell in ('""', f"`{default}`", f"`{default!r}`")


def test_the_flag_table_is_every_launcher_flag_once():
  rows = table_rows("Flags (`python -m launcher --help` lists them):")
  flags = [row[0].strip("`") for row in rows]
  from tests.test_mistakes import LAUNCHER_FLAGS  # pylint: disable=import-outside-toplevel

  assert sorted(flags) == sorted(f"--{name}" for name in LAUNCHER_FLAGS | {"verbosity"})


@pytest.mark.slow
def test_the_example_workload_trains_as_written(tmp_path):
  (tmp_path / "my_workload.py").write_text(snippet("example-workload"))
  (tmp_path / "my_config.py").write_text(snippet("example-config"))
  command = re.search(
    r"PYTHONPATH=\. python -m launcher --config=my_config\.py "
    r"--workdir=/tmp/my_run",
    README,
  )
  assert command, "the README runs the example with this command"
  workdir = tmp_path / "my_run"
  result = run_launcher(
    f"--config={tmp_path / 'my_config.py'}",
    f"--workdir={workdir}",
    env={"PYTHONPATH": str(tmp_path)},
    timeout=180,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  rows = read_metrics(str(workdir))
  assert [row["step"] for row in rows] == [100, 200, 300, 400]
  assert rows[-1]["loss"] < 0.1 * rows[0]["loss"] or rows[-1]["loss"] < 0.01
  assert rows[-1]["eval_abs_error"] < 0.1  # sin(3x) on [-1, 1] spans [-1, 1].
  assert "finished 400 steps" in result.stderr


@pytest.mark.slow
def test_the_corpus_commands_run_as_written(tmp_path):
  """docs/corpus.md's two commands: text files to a Parquet corpus, and the lm trained on it with
  two worker processes (bounded here to 20 steps)."""
  from pydoc_data.topics import topics  # pylint: disable=import-outside-toplevel

  (tmp_path / "my_texts").mkdir()
  for i, name in enumerate(sorted(topics)[:40]):
    (tmp_path / "my_texts" / f"{i:02d}.txt").write_text(topics[name])
  with open(os.path.join(REPO, "docs", "corpus.md")) as f:
    block = f.read().split("<!-- corpus-commands -->")[1].split("```bash")[1].split("```")[0]
  make, train = [
    line.replace("/tmp/", f"{tmp_path}/").replace("python ", f"{sys.executable} ", 1)
    for line in block.strip().splitlines()
  ]
  env = {**os.environ, "PYTHONPATH": REPO, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  made = subprocess.run(
    make,
    shell=True,
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert made.returncode == 0, made.stderr[-2000:]
  assert len(list((tmp_path / "my_corpus").glob("*.parquet"))) == 4
  trained = subprocess.run(
    f"{train} --config.num_steps=20 --config.log_every_steps=10 --config.eval_every_steps=20",
    shell=True,
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert trained.returncode == 0, trained.stderr[-3000:]
  rows = read_metrics(str(tmp_path / "my_lm"))
  assert [row["step"] for row in rows] == [10, 20]
  assert rows[-1]["loss"] < rows[0]["loss"] < 5.6 and rows[-1]["eval_loss"] < 5.6  # ln 256 = 5.55.
