"""jax's persistent compilation cache, on by default: a second start of a run skips compilation."""

import os
import tempfile

import jax
from absl import logging

from launcher.errors import UsageError


def enable(directory: str) -> None:
  """Persists every compiled program (small ones too) in `directory`, so a second start of the
  same run skips compilation. "" picks ~/.cache/launcher/jax (or $XDG_CACHE_HOME); "none" is off."""
  if directory == "none":
    return
  given = directory
  if not directory:
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    directory = os.path.join(cache_home, "launcher", "jax")
  if "://" not in directory:
    try:
      os.makedirs(directory, exist_ok=True)
      with tempfile.NamedTemporaryFile(dir=directory):
        pass
    except OSError as e:
      if given:
        raise UsageError(
          f"config.compilation_cache_dir={given!r} cannot be used ({e}): give a "
          "directory this user can write, or none to compile every start"
        ) from None
      logging.warning(
        "the compilation cache %s cannot be used (%s): compiling every start; "
        "set --config.compilation_cache_dir to a writable directory",
        directory,
        e,
      )
      return
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
