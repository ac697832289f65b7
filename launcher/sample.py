"""`python -m launcher.sample --workdir=RUN --prompt=TEXT`: a trained language model continues a text.

Reads the run's config (WORKDIR/config.json, or `--config=FILE[:ARG]` for a workdir without one)
and the params of its newest checkpoint that reads, then generates `--max_new_tokens` tokens one
at a time on one device: the most likely token at `--temperature=0`, else a draw from the
model's distribution divided by the temperature (`--seed` picks the draws). The model sees the
last `config.seq_len` tokens. The prompt and its continuation go to stdout.

The workload defines, beside the contract's functions:

    logits(config, params, tokens) -> [batch, length, vocab]    # tokens: int32 [batch, length]
    tokenizer(config) -> an object with encode(bytes) -> int array and decode(tokens) -> str

(workloads/lm.py does.)
"""

import importlib.util
import json
import os

from launcher import console, storage
from launcher import workdir as workdir_lib
from launcher.errors import UsageError

GENERATING_FUNCTIONS = ("logits", "tokenizer")


def run_config(workdir: str, config_file: str | None):
  """The run's resolved config: `config_file`'s get_config() when given, else WORKDIR/config.json
  (which the launcher writes at every start)."""
  import ml_collections  # pylint: disable=import-outside-toplevel

  if config_file:
    return _config_of_file(config_file)
  saved = workdir_lib.config_file(storage.path(workdir))
  if not saved.exists():
    raise UsageError(
      f"--workdir={workdir} holds no config.json: give the workdir of a launcher run, or name "
      "its config with --config=FILE[:ARG] (e.g. configs/lm.py:tiny)"
    )
  return ml_collections.ConfigDict(json.loads(saved.read_text()))


def _config_of_file(config_file: str):
  from launcher import config as config_lib  # pylint: disable=import-outside-toplevel

  config_lib.check_file(config_file)
  path, _, arg = config_file.partition(":")
  spec = importlib.util.spec_from_file_location("sampled_config", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
  except Exception as e:  # pylint: disable=broad-except  # The file's own error, in one line.
    raise UsageError(f"--config={config_file}: get_config raised {type(e).__name__}: {e}") from None


def generating_workload(config):
  """The config's workload module, checked to define GENERATING_FUNCTIONS."""
  from launcher import workload as workload_lib  # pylint: disable=import-outside-toplevel

  workload = workload_lib.load(config.workload)
  missing = [name for name in GENERATING_FUNCTIONS if not callable(getattr(workload, name, None))]
  if missing:
    raise UsageError(
      f"config.workload={config.workload!r} defines no {' or '.join(missing)}: launcher.sample "
      "continues text with a language model workload such as lm (give its workdir)"
    )
  return workload


def newest_params(config, workload, workdir: str):
  """The params of the run's newest checkpoint that reads (digests checked), on this process's
  first device."""
  import jax  # pylint: disable=import-outside-toplevel

  from launcher import checkpoint as checkpoint_lib  # pylint: disable=import-outside-toplevel
  from launcher import state as state_lib  # pylint: disable=import-outside-toplevel

  shapes = jax.eval_shape(lambda: workload.init(config, jax.random.PRNGKey(0)))
  one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  params = checkpoint_lib.target(shapes, jax.tree.map(lambda _: one_device, shapes))
  into = state_lib.TrainState(
    step=None, params=params, opt_state=None, rng=None, skipped_steps=None
  )
  return checkpoint_lib.restore_from(workdir, into, params_only=True)


def generate(
  config,
  workload,
  params,
  prompt: str,
  max_new_tokens: int,
  temperature: float,
  seed: int,
) -> str:
  """`prompt` and the `max_new_tokens` tokens the model adds to it, as text."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  tokenizer = workload.tokenizer(config)
  tokens = tokenizer.encode(prompt.encode("utf-8"))
  if len(tokens) == 0:
    raise UsageError("--prompt gives no tokens: give a text to continue, e.g. --prompt='The '")
  seq_len = config.seq_len
  kept = np.asarray(tokens[-seq_len:], np.int32)
  window = np.zeros(seq_len, np.int32)
  window[: len(kept)] = kept

  @jax.jit
  def next_token(params, window, filled, key):
    """The token after window[:filled], and the window with it (the oldest token dropped when
    the window is full): one shape for every step, so one compilation."""
    logits = workload.logits(config, params, window[None])[0, filled - 1].astype(jnp.float32)
    if temperature == 0:
      token = jnp.argmax(logits)
    else:
      token = jax.random.categorical(key, logits / temperature)
    token = token.astype(jnp.int32)
    full = filled == seq_len
    window = jnp.where(full, jnp.roll(window, -1), window)
    window = window.at[jnp.minimum(filled, seq_len - 1)].set(token)
    return window, jnp.minimum(filled + 1, seq_len), token

  window, filled = jnp.asarray(window), jnp.int32(len(kept))
  new_tokens = []
  for key in jax.random.split(jax.random.PRNGKey(seed), max_new_tokens):
    window, filled, token = next_token(params, window, filled, key)
    new_tokens.append(token)
  return prompt + tokenizer.decode(np.asarray(jnp.stack(new_tokens)))


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise UsageError(f"unexpected arguments: {' '.join(argv[1:])}: flags start with --")
  if not _WORKDIR.value:
    raise UsageError("--workdir is required: the run to sample from, e.g. --workdir=/tmp/run")
  if not _PROMPT.value:
    raise UsageError("--prompt is required: the text to continue, e.g. --prompt='The '")
  checkpoints = workdir_lib.checkpoints_dir(storage.path(_WORKDIR.value))
  if not workdir_lib.complete_checkpoint_steps(checkpoints):
    raise UsageError(
      f"--workdir={_WORKDIR.value} holds no complete checkpoint in {os.fspath(checkpoints)}: "
      "train first (a run saves one at its end), or give the workdir of a run that saved one"
    )
  config = run_config(_WORKDIR.value, _CONFIG.value)
  workload = generating_workload(config)
  console.quiet_libraries(progress_on_stdout=False)  # stdout is the text alone.
  params = newest_params(config, workload, _WORKDIR.value)
  print(
    generate(
      config,
      workload,
      params,
      _PROMPT.value,
      _MAX_NEW_TOKENS.value,
      _TEMPERATURE.value,
      _SEED.value,
    ),
    flush=True,
  )


if __name__ == "__main__":
  from absl import flags  # pylint: disable=ungrouped-imports

  _WORKDIR = flags.DEFINE_string("workdir", "", "The run to sample from: a launcher run's workdir.")
  _CONFIG = flags.DEFINE_string(
    "config",
    None,
    "The run's config file (FILE[:ARG], e.g. configs/lm.py:tiny), for a workdir without "
    "config.json; by default the run's own WORKDIR/config.json.",
  )
  _PROMPT = flags.DEFINE_string("prompt", "", "The text to continue.")
  _MAX_NEW_TOKENS = flags.DEFINE_integer(
    "max_new_tokens", 200, "How many tokens to add.", lower_bound=1
  )
  _TEMPERATURE = flags.DEFINE_float(
    "temperature",
    1.0,
    "0: always the most likely token (the same text every time); above 0: draws, flatter as it "
    "grows.",
    lower_bound=0.0,
  )
  _SEED = flags.DEFINE_integer("seed", 0, "Picks the draws (with --temperature above 0).")
  console.run_tool(main)
