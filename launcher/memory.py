"""What the train state and a compiled step take in device memory, for the first report."""

import collections

import jax


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
