"""The README and the docs site: the site builds without a broken link, every block presented as
runnable runs as written, and the reference tables are the code's."""

import contextlib
import io
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from launcher import config as config_lib
from launcher import corpus
from tests.helpers import REPO, load_params, read_metrics, run_launcher, runnable_block

PAGES = ["README.md"] + sorted(
  os.path.join("docs", name)
  for name in os.listdir(os.path.join(REPO, "docs"))
  if name.endswith(".md")
)
# Every block marked `<!-- runnable: NAME -->`, and the test that runs it.
RUNNABLE = {
  ("README.md", "readme-workload"): "test_the_readmes_workload_trains_as_written",
  ("README.md", "readme-config"): "test_the_readmes_workload_trains_as_written",
  ("docs/workloads.md", "example-workload"): "test_the_example_workload_trains_as_written",
  ("docs/workloads.md", "example-config"): "test_the_example_workload_trains_as_written",
  ("docs/checkpoints.md", "load-params"): "test_the_readmes_workload_trains_as_written",
  ("docs/data.md", "corpus-commands"): "test_the_corpus_commands_run_as_written",
  ("docs/using-a-model.md", "lm-logits"): "test_the_tokenizer_and_sampling_run_as_written",
  ("docs/using-a-model.md", "make-tokenizer"): "test_the_tokenizer_and_sampling_run_as_written",
  ("docs/using-a-model.md", "tokenizer-commands"): "test_the_tokenizer_and_sampling_run_as_written",
}


def read(page: str) -> str:
  with open(os.path.join(REPO, page)) as f:
    return f.read()


def table_rows(page: str, heading: str) -> list[list[str]]:
  """The rows of the first table after `heading` in `page`, as cells."""
  section = read(page).split(heading, 1)[1]
  lines = [line for line in section.splitlines() if line.startswith("| ")]
  first = section.index(lines[0])
  block = section[first:].split("\n\n")[0].splitlines()
  return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in block[2:]]


def test_the_readme_is_a_short_front_door_whose_links_resolve():
  readme = read("README.md")
  assert len(readme.splitlines()) <= 150
  targets = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
  assert {"docs/getting-started.md", "docs/configuration.md"} <= set(targets)
  for target in targets:
    assert os.path.exists(os.path.join(REPO, target)), target
  # The test command of .ci/run is the README's, verbatim.
  assert "python -m pytest -q tests\n" in read(".ci/run")
  assert "`python -m pytest -q tests`" in readme


def test_every_runnable_block_is_run_by_a_test():
  marked = {
    (page, name)
    for page in PAGES
    for name in re.findall(r"<!-- runnable: ([\w-]+) -->", read(page))
  }
  assert marked == set(RUNNABLE)
  assert {name for name in RUNNABLE.values()} <= set(globals())


def test_the_config_reference_is_every_launcher_key_once_with_its_default_and_meaning():
  rows = table_rows("docs/configuration.md", "## Config reference")
  assert [row[0] for row in rows] == [f"`{key}`" for key in config_lib.KEYS]
  for key, default_cell, meaning in rows:
    default, text = config_lib.KEYS[key.strip("`")]
    assert meaning == text
    assert default_cell in ('""', f"`{default}`", f"`{default!r}`")


def test_the_flag_table_is_every_launcher_flag_once():
  rows = table_rows("docs/configuration.md", "Flags (`python -m launcher --help` lists them):")
  flags = [row[0].strip("`") for row in rows]
  from tests.test_mistakes import LAUNCHER_FLAGS  # pylint: disable=import-outside-toplevel

  assert sorted(flags) == sorted(f"--{name}" for name in LAUNCHER_FLAGS | {"verbosity"})


@pytest.mark.slow  # Starts mkdocs and the reference generator: ~3 s.
def test_the_site_builds_strictly_and_the_config_reference_is_generated(tmp_path):
  built = subprocess.run(
    [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert built.returncode == 0, built.stderr
  for page in PAGES[1:]:
    name = os.path.splitext(os.path.basename(page))[0]
    assert (tmp_path / "site" / ("" if name == "index" else name) / "index.html").exists(), page
  generated = subprocess.run(
    [sys.executable, "scripts/docs/config_reference.py", "--check"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=60,
    check=False,
  )
  assert generated.returncode == 0, generated.stderr


@pytest.mark.slow
def test_the_readmes_workload_trains_as_written(tmp_path):
  (tmp_path / "my_line.py").write_text(runnable_block("README.md", "readme-workload"))
  (tmp_path / "my_line_config.py").write_text(runnable_block("README.md", "readme-config"))
  assert (
    "PYTHONPATH=. python -m launcher --config=my_line_config.py --workdir=/tmp/my_line"
    in read("README.md")
  )
  workdir = tmp_path / "my_line"
  result = run_launcher(
    f"--config={tmp_path / 'my_line_config.py'}",
    f"--workdir={workdir}",
    env={"PYTHONPATH": str(tmp_path)},
    timeout=180,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert [row["step"] for row in read_metrics(str(workdir))] == [100, 200]
  # The line y = 2x - 1, read back with docs/checkpoints.md's plain-orbax lines.
  params = load_params(str(workdir))
  np.testing.assert_allclose([params["w"], params["b"]], [2.0, -1.0], atol=1e-3)


@pytest.mark.slow
def test_the_example_workload_trains_as_written(tmp_path):
  (tmp_path / "my_workload.py").write_text(runnable_block("docs/workloads.md", "example-workload"))
  (tmp_path / "my_config.py").write_text(runnable_block("docs/workloads.md", "example-config"))
  assert "PYTHONPATH=. python -m launcher --config=my_config.py --workdir=/tmp/my_run" in read(
    "docs/workloads.md"
  )
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
  assert "finished 400 steps" in result.stdout


@pytest.mark.slow
def test_the_corpus_commands_run_as_written(tmp_path):
  """docs/data.md's two commands: text files to a Parquet corpus, and the lm trained on it with
  two worker processes (bounded here to 20 steps)."""
  from pydoc_data.topics import topics  # pylint: disable=import-outside-toplevel

  (tmp_path / "my_texts").mkdir()
  for i, name in enumerate(sorted(topics)[:40]):
    (tmp_path / "my_texts" / f"{i:02d}.txt").write_text(topics[name])
  make, train = [
    line.replace("/tmp/", f"{tmp_path}/").replace("python ", f"{sys.executable} ", 1)
    for line in runnable_block("docs/data.md", "corpus-commands").strip().splitlines()
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


@pytest.mark.slow
def test_the_tokenizer_and_sampling_run_as_written(tmp_path):
  """docs/using-a-model.md: a BPE tokenizer made from text files, the lm trained with it on a
  corpus of them (bounded here to 20 steps) and sampled, and the page's lines that read the
  next-token logits of that run."""
  from pydoc_data.topics import topics  # pylint: disable=import-outside-toplevel

  page = "docs/using-a-model.md"
  (tmp_path / "my_texts").mkdir()
  for i, name in enumerate(sorted(topics)[:40]):
    (tmp_path / "my_texts" / f"{i:02d}.txt").write_text(topics[name])
  made = subprocess.run(
    [sys.executable, "-c", runnable_block(page, "make-tokenizer").replace("/tmp/", f"{tmp_path}/")],
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=60,
    check=False,
  )
  assert made.returncode == 0, made.stderr[-2000:]
  tokenizer = corpus.Tokenizer(str(tmp_path / "tokenizer.json"))
  text = "Return a new  sorted list\n\tof the items: 3.14 élan"
  assert tokenizer.vocab_size == 2048
  assert tokenizer.decode(tokenizer.encode(text.encode())) == text

  make, train, sample = [
    line.replace("/tmp/", f"{tmp_path}/").replace("python ", f"{sys.executable} ", 1)
    for line in runnable_block(page, "tokenizer-commands").strip().splitlines()
  ]
  env = {**os.environ, "PYTHONPATH": REPO, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  for command, timeout in (
    (make, 120),
    (f"{train} --config.num_steps=20 --config.log_every_steps=10 --config.eval_every_steps=0", 300),
  ):
    done = subprocess.run(
      command,
      shell=True,
      cwd=tmp_path if command is make else REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=timeout,
      check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
  workdir = tmp_path / "my_bpe_lm"
  assert "bits_per_token" in read_metrics(str(workdir))[-1]
  sampled = subprocess.run(
    sample, shell=True, cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False
  )
  assert sampled.returncode == 0, sampled.stderr[-3000:]
  assert sampled.stdout.startswith("The list ") and len(sampled.stdout) > len("The list ") + 1

  namespace = {"params": load_params(str(workdir))}
  with contextlib.redirect_stdout(io.StringIO()) as printed:
    exec(runnable_block(page, "lm-logits").replace("/tmp/run", str(workdir)), namespace)  # pylint: disable=exec-used
  assert namespace["logits"].shape == (1, len(namespace["tokens"]), 2048)
  assert printed.getvalue() == tokenizer.decode([int(namespace["logits"][0, -1].argmax())]) + "\n"
