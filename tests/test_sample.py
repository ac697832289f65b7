"""`python -m launcher.sample`: a trained lm continues a prompt as a loop over the model's own apply
would, the same text for the same seed, and bad input is one line with exit 2."""

import functools
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from tests.helpers import REPO, load_params, run_launcher
from workloads import lm

# 60 bytes: with 40 new tokens the context of seq_len 64 fills and then slides.
PROMPT = "Return a new sorted list from the items in iterable, and the"
NEW_TOKENS = 40


def sample(*args, timeout=120):
  """`python -m launcher.sample ARGS`, bounded in time."""
  return subprocess.run(
    [sys.executable, "-m", "launcher.sample", *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=timeout,
    check=False,
  )


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
  """The workdir of lm tiny trained 20 steps (its only checkpoint is the last step's)."""
  workdir = str(tmp_path_factory.mktemp("sample") / "run")
  trained = run_launcher(
    "--config=configs/lm.py:tiny",
    f"--workdir={workdir}",
    "--config.num_steps=20",
    "--config.log_every_steps=10",
    "--config.eval_every_steps=0",
    timeout=180,
  )
  assert trained.returncode == 0, trained.stderr[-3000:]
  return workdir


@functools.cache
def model_of(workdir: str):
  """The run's seq_len, and its next-token logits as a function of a window: the Transformer built
  from config.json, applied to the params that docs/checkpoints.md's orbax lines read."""
  with open(os.path.join(workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  model = lm.Transformer(
    seq_len=config.seq_len,
    width=config.width,
    num_layers=config.num_layers,
    num_heads=config.num_heads,
    scan=config.scan_layers,
  )
  params = load_params(workdir)
  return config.seq_len, jax.jit(lambda window: model.apply({"params": params}, window)[0, -1])


def by_hand(workdir: str, prompt: str, new_tokens: int, temperature: float, seed: int) -> str:
  """The reference: the model's own apply on the last seq_len bytes, one token at a time."""
  seq_len, last_logits = model_of(workdir)
  tokens = list(prompt.encode())
  keys = jax.random.split(jax.random.PRNGKey(seed), new_tokens)
  for i in range(new_tokens):
    logits = last_logits(jnp.asarray(tokens[-seq_len:], jnp.int32)[None])
    if temperature == 0:
      tokens.append(int(jnp.argmax(logits)))
    else:
      tokens.append(int(jax.random.categorical(keys[i], logits / temperature)))
  return bytes(tokens).decode("utf-8", errors="replace")


@pytest.mark.slow
def test_greedy_sampling_is_the_models_own_loop(tiny_lm):
  args = [f"--workdir={tiny_lm}", f"--prompt={PROMPT}", f"--max_new_tokens={NEW_TOKENS}"]
  greedy = sample(*args, "--temperature=0", "--seed=5")
  assert greedy.returncode == 0, greedy.stderr[-3000:]
  # The reference takes no seed: the most likely token is the same whatever the seed.
  assert greedy.stdout == by_hand(tiny_lm, PROMPT, NEW_TOKENS, temperature=0, seed=0) + "\n"
  assert greedy.stdout.startswith(PROMPT) and len(greedy.stdout) > len(PROMPT) + 1
  assert "warning" not in greedy.stderr.lower(), greedy.stderr  # The launcher's own lines only.


@pytest.mark.slow
def test_drawn_tokens_follow_the_seed_in_any_process(tiny_lm):
  args = [f"--workdir={tiny_lm}", f"--prompt={PROMPT}", f"--max_new_tokens={NEW_TOKENS}"]
  drawn = sample(*args, "--temperature=1", "--seed=3")
  assert drawn.returncode == 0, drawn.stderr[-3000:]
  assert drawn.stdout == by_hand(tiny_lm, PROMPT, NEW_TOKENS, temperature=1, seed=3) + "\n"
  # 20 steps leave the model far from one answer: 40 draws at another seed differ.
  assert drawn.stdout != by_hand(tiny_lm, PROMPT, NEW_TOKENS, temperature=1, seed=4) + "\n"
  assert drawn.stdout.startswith(PROMPT)
  # Another process, given the run's config file for a workdir without config.json, draws the
  # same text.
  copy = f"{tiny_lm}_without_config"
  shutil.copytree(tiny_lm, copy)
  os.remove(os.path.join(copy, "config.json"))
  named = sample(
    *args, "--temperature=1", "--seed=3", f"--workdir={copy}", "--config=configs/lm.py:tiny"
  )
  assert named.returncode == 0, named.stderr[-3000:]
  assert named.stdout == drawn.stdout


@pytest.mark.slow
def test_bad_input_is_one_line_and_exit_2(tiny_lm, tmp_path):
  other = tmp_path / "linear_run"  # A run of another workload: its config.json says so.
  shutil.copytree(tiny_lm, other)
  config = json.loads((other / "config.json").read_text())
  (other / "config.json").write_text(json.dumps({**config, "workload": "linear"}))
  without_config = tmp_path / "no_config"
  shutil.copytree(os.path.join(tiny_lm, "checkpoints"), without_config / "checkpoints")
  ok = [f"--workdir={tiny_lm}", "--prompt=x"]
  cases = {
    (f"--workdir={tmp_path / 'empty'}", "--prompt=x"): (
      f"error: --workdir={tmp_path / 'empty'} holds no complete checkpoint in "
      f"{tmp_path / 'empty' / 'checkpoints'}: train first"
    ),
    (f"--workdir={other}", "--prompt=x"): (
      "error: config.workload='linear' defines no logits or tokenizer: launcher.sample "
      "continues text with a language model workload such as lm"
    ),
    (f"--workdir={without_config}", "--prompt=x"): (
      f"error: --workdir={without_config} holds no config.json: give the workdir of a launcher "
      "run, or name its config with --config=FILE[:ARG]"
    ),
    (*ok, "--config=configs/lm.py:huge"): (
      "error: --config=configs/lm.py:huge: get_config raised ValueError: unknown lm size 'huge'"
    ),
    (f"--workdir={tiny_lm}",): "error: --prompt is required: the text to continue",
    ("--prompt=x",): "error: --workdir is required",
    (*ok, "--temperature=-1"): "error: flag --temperature=-1: -1.0 is not a non-negative number",
    (*ok, "--max_new_tokens=0"): "error: flag --max_new_tokens=0: 0 is not a positive integer",
    (*ok, "--num_steps=3"): "error: Unknown command line flag 'num_steps'",
  }
  for args, line in cases.items():
    result = sample(*args)
    assert result.returncode == 2, (args, result.stderr[-2000:])
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1, (args, result.stderr)
    assert result.stderr.startswith(line), (args, result.stderr)
