"""What the train state and a compiled step take in device memory, for the first report, and
the one line that says what to change when a device (or the host) runs out of memory."""

import collections
import ctypes
import os
import platform
import re

import jax
import ml_collections

from launcher.errors import causes, one_line

# mallopt's parameters (glibc's malloc.h): the size from which a block gets its own mapping, and
# the free memory at the heap's top from which glibc hands it back to the OS.
_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD = -3, -1


def keep_freed_host_memory() -> None:
  """Freed host memory stays in the process for the next call's buffers: by default glibc maps
  each large block afresh and unmaps it on free, so on CPU devices every compiled call
  page-faults its buffers again (0.3 → 0.2 s a step for the lm at 4x width at K=1 here). The
  process's peak is the same; its resident size no longer falls back after it."""
  if platform.libc_ver()[0] != "glibc":
    return
  libc = ctypes.CDLL(None)
  libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
  libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1)


def step_memory(mapped_fn, *args) -> dict[str, int]:
  """Device memory of one call of `mapped_fn(*args)`: the platform's peak where it reports one
  (GPU, TPU), else the compiled program's own estimate per device (arguments + outputs +
  temporaries - donated buffers), for jitted calls only: lowering a pmap compiles it again
  (as long as the first step's compilation), so under pmap on CPU nothing is reported."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return {"peak_bytes_per_device": int(stats["peak_bytes_in_use"])}
  if not isinstance(mapped_fn, jax.stages.Wrapped) or not hasattr(mapped_fn, "trace"):
    return {}
  analysis = mapped_fn.lower(*args).compile().memory_analysis()
  if analysis is None:
    return {}
  return {
    "step_memory_bytes_per_device": int(
      analysis.argument_size_in_bytes
      + analysis.output_size_in_bytes
      + analysis.temp_size_in_bytes
      - analysis.alias_size_in_bytes
    )
  }


def state_bytes_per_device(tree) -> int:
  """Bytes of `tree` on this process's fullest device."""
  per_device = collections.Counter()
  for x in jax.tree.leaves(tree):
    for shard in x.addressable_shards:
      per_device[shard.device] += shard.data.nbytes
  return max(per_device.values(), default=0)


# How XLA says it: CPU "Out of memory allocating N bytes", GPU "... while trying to allocate N
# bytes" or "Failed to allocate request for 32.00MiB (33554432B)", TPU "Ran out of memory in
# memory space hbm. Used 17.5G of 15.5G hbm" or "Attempting to allocate 1.00G. That was not
# possible. There are 785.45M free".
_OUT_OF_MEMORY = re.compile(
  r"out of memory|failed to allocate|attempting to allocate|ran out of memory", re.IGNORECASE
)
_ASKED = (
  (re.compile(r"allocat\w* (\d+) bytes"), lambda m: gib(int(m[1]))),
  (re.compile(r"\((\d+)B\)"), lambda m: gib(int(m[1]))),
  (re.compile(r"Used (\S+) of \S+ hbm"), lambda m: m[1]),
  (re.compile(r"Attempting to allocate (\S+?)\.? "), lambda m: m[1]),
)


def is_out_of_memory(error: BaseException) -> bool:
  """Whether `error` (or an error it came from) is the device or the host running out of
  memory: XLA's RESOURCE_EXHAUSTED for an allocation, or Python's MemoryError. A full disk's
  RESOURCE_EXHAUSTED (tensorstore's) is not."""
  for seen in causes(error):
    if isinstance(seen, MemoryError):
      return True
    text = str(seen)
    if (
      isinstance(seen, RuntimeError)
      and ("RESOURCE_EXHAUSTED" in text or "Resource exhausted" in text)
      and _OUT_OF_MEMORY.search(text)
      and "No space left" not in text
    ):
      return True
  return False


def gib(num_bytes: float) -> str:
  """`654.8 GiB`."""
  return f"{num_bytes / 2**30:.1f} GiB"


def describe_out_of_memory(error: BaseException, config: ml_collections.ConfigDict) -> str:
  """One line: the memory asked for, what the device (or the host) has, and the config's knobs
  that reduce it."""
  host = next((e for e in causes(error) if isinstance(e, MemoryError)), None)
  text = next((str(e) for e in causes(error) if _OUT_OF_MEMORY.search(str(e))), "")
  asked = next((show(m) for pattern, show in _ASKED if (m := pattern.search(text))), None)
  if host is not None:
    what = f"in the host's memory ({one_line(host).rstrip(': ')})"
  else:
    what = f"a device asked for {asked}" if asked else text.splitlines()[0][:200]
  return f"out of memory: {what}; {_capacity()}. To fit, try: {', '.join(_knobs(config))}"


def _capacity() -> str:
  """What this process's devices have, as far as jax or the host says."""
  devices = jax.local_devices()
  stats = devices[0].memory_stats() or {}
  if "bytes_limit" in stats:
    in_use = stats.get("bytes_in_use")
    return f"each {devices[0].device_kind} has {gib(stats['bytes_limit'])}" + (
      f" ({gib(in_use)} in use)" if in_use is not None else ""
    )
  host = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  platform = devices[0].platform
  shared = f", shared by its {len(devices)} {platform.upper()} devices" if len(devices) > 1 else ""
  unknown = "" if platform == "cpu" else f" ({platform} reports no device memory)"
  return f"the host has {gib(host)}{shared}{unknown}"


def _knobs(config: ml_collections.ConfigDict) -> list[str]:
  """The config's settings that lower the memory a step takes, from its current values."""
  devices = jax.device_count()
  per_device = config.get("batch_size", 0) // max(devices, 1)
  accum = config.get("grad_accum_steps", 1) or 1
  knobs = []
  if per_device >= 2 * accum and per_device % (2 * accum) == 0:
    knobs.append(
      f"--config.grad_accum_steps={accum * 2} (the per-device batch of {per_device} in "
      f"{accum * 2} parts: the same updates)"
    )
  if config.get("remat") is False:
    knobs.append("--config.remat=True (recompute activations in the backward pass)")
  if config.get("compute_dtype") == "float32":
    knobs.append("--config.compute_dtype=bfloat16")
  if config.get("parallel") not in (None, "fsdp") and devices > 1:
    knobs.append(f"--config.parallel=fsdp (the train state sharded over the {devices} devices)")
  if "batch_size" in config:
    knobs.append(f"a smaller --config.batch_size (now {config.batch_size}) or more devices")
  knobs.append("a smaller model")
  return knobs
