"""Logical axis names -> mesh axes: a workload names what each dimension of a param or an
activation is ("embed", "heads", "mlp", ...), `config.axis_rules` (launcher.config.AXIS_RULES
beneath) says which mesh axes split each name, and the fsdp executor turns the names into
PartitionSpecs here. The rules are data, as in MaxText's `logical_axis_rules` and flax's
`logical_to_mesh_axes`: an axis already used by an earlier dimension of the same array is not
used again, and a dimension that does not divide its axes keeps the longest leading part of them
that does (a warning names the fallback)."""

import contextlib
import contextvars
import dataclasses
from collections.abc import Sequence

import jax
from absl import logging
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from launcher.config import MESH_AXES
from launcher.errors import UsageError


@dataclasses.dataclass
class Resolved:
  """One array's PartitionSpec of mesh axes; `fallbacks`: (name, size, axes) of each dimension
  that stays whole over `axes` its rule names, since its size does not divide them; `asked`:
  some name maps to a mesh axis (False: the names ask for the array whole)."""

  spec: PartitionSpec
  fallbacks: list[tuple[str, int, tuple[str, ...]]]
  asked: bool


def resolve(
  names: Sequence, shape: Sequence[int], rules: dict[str, tuple[str, ...]], mesh_shape: dict, where
) -> Resolved:
  """The mesh axes of each dimension of an array of `shape` named `names` (per dimension a
  logical name, a mesh axis, a tuple of them, or None: whole; `where` names the array in
  messages). An axis of size 1 is left out; a name no rule maps is a UsageError."""
  if isinstance(names, str):
    raise UsageError(
      f"{where}: names {names!r} is one string: give a tuple of one name per dimension, e.g. "
      f"({names!r},)"
    )
  names = tuple(names)
  if len(names) > len(shape):
    raise UsageError(
      f"{where}: names {tuple(names)} has {len(names)} dimensions for an array of shape "
      f"{tuple(shape)}: name each dimension once (None for one left whole)"
    )
  used, entries, fallbacks, asked = set(), [], [], False
  for dim, entry in enumerate(names):
    axes = ()
    for name in () if entry is None else entry if isinstance(entry, tuple) else (entry,):
      if name not in MESH_AXES and name not in rules:
        raise UsageError(
          f"{where} names dimension {dim} {name!r}, which config.axis_rules does not map "
          f"(it maps {', '.join(sorted(rules))}): add --config.axis_rules={name}:tensor (or "
          ":fsdp, :none), or rename the dimension"
        )
      axes += (name,) if name in MESH_AXES else rules[name]
    asked = asked or bool(axes)
    axes = tuple(axis for axis in axes if axis not in used and mesh_shape[axis] > 1)
    kept = axes
    while kept and shape[dim] % _product(kept, mesh_shape):
      kept = kept[:-1]
    if kept != axes:
      fallbacks.append((entry, shape[dim], axes[len(kept) :]))
    used.update(kept)
    entries.append(None if not kept else kept[0] if len(kept) == 1 else kept)
  while entries and entries[-1] is None:
    entries.pop()
  return Resolved(PartitionSpec(*entries), fallbacks, asked)


def fallback_line(fallback, mesh_shape: dict, arrays: list[str]) -> str:
  """One line for a dimension that stays whole over axes its rule names, in `arrays`."""
  name, size, axes = fallback
  over = " x ".join(f"{axis}:{mesh_shape[axis]}" for axis in axes)
  # A mesh axis named directly has no rule to change: the name itself is what to change.
  logical = [n for n in as_tuple(name) if n not in MESH_AXES]
  elsewhere = (
    f"map {' and '.join(map(repr, logical))} elsewhere in config.axis_rules"
    if logical
    else "in partition() name that dimension None (whole) or by a logical name"
  )
  return (
    f"sharding: {name!r} dimensions of size {size} do not divide over {over}, so they stay "
    f"whole over {'+'.join(axes)} in {first_few(arrays)}: pick a mesh whose {'+'.join(axes)} size divides "
    f"{size}, or {elsewhere}"
  )


def first_few(items: list[str]) -> str:
  """The first 3 of `items`, and how many more, for a one-line message."""
  return ", ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")


def _product(axes, mesh_shape) -> int:
  size = 1
  for axis in axes:
    size *= mesh_shape[axis]
  return size


@dataclasses.dataclass
class _Trace:
  """What `constrain` needs while the fsdp executor traces a train call, and what it saw."""

  mesh: jax.sharding.Mesh
  rules: dict[str, tuple[str, ...]]
  names_seen: set = dataclasses.field(default_factory=set)
  warned: set = dataclasses.field(default_factory=set)


_TRACE = contextvars.ContextVar("sharding_trace", default=None)


@contextlib.contextmanager
def tracing(mesh: jax.sharding.Mesh, rules: dict[str, tuple[str, ...]]):
  """Within: `constrain` places activations on `mesh` by `rules`; yields the _Trace (its
  `names_seen` after the block: the logical names the workload's activations used)."""
  trace = _Trace(mesh, rules)
  token = _TRACE.set(trace)
  try:
    yield trace
  finally:
    _TRACE.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """`x` (an activation in a workload's loss) laid out by its logical dimension `names` (the
  first dimensions; the rest whole), e.g. constrain(h, ("batch", "length", "mlp")). Under the
  fsdp executor's train step this is `lax.with_sharding_constraint` on the rules' mesh axes;
  under pmap, shard_map and in eval it changes nothing."""
  trace = _TRACE.get()
  if trace is None:
    return x
  trace.names_seen.update(name for name in names if name is not None)
  where = f"the activation {tuple(names)}"
  resolved = resolve(names, x.shape, trace.rules, dict(trace.mesh.shape), where)
  for fallback in resolved.fallbacks:
    line = fallback_line(fallback, dict(trace.mesh.shape), [where])
    if line not in trace.warned:
      trace.warned.add(line)
      logging.warning("%s", line)
  return lax.with_sharding_constraint(x, NamedSharding(trace.mesh, resolved.spec))


def count(number: int) -> str:
  """1234567 -> "1.2M" (the start-up line's counts)."""
  for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
    if number >= size:
      return f"{number / size:.1f}{unit}"
  return str(number)


def split_summary(specs: list[PartitionSpec], sizes: list[int], mesh_shape: dict) -> str:
  """ "params split: fsdp 1.2M, tensor 0.9M, replicated 3.1K": the param elements each mesh axis
  of size > 1 splits (a param split over two axes counts in both), and those no axis splits."""
  per_axis = {axis: 0 for axis in MESH_AXES if mesh_shape.get(axis, 1) > 1}
  replicated = 0
  for spec, size in zip(specs, sizes, strict=True):
    axes = {axis for entry in spec if entry for axis in as_tuple(entry)}
    axes &= set(per_axis)
    for axis in axes:
      per_axis[axis] += size
    if not axes:
      replicated += size
  parts = [f"{axis} {count(n)}" for axis, n in per_axis.items() if n]
  return "params split: " + ", ".join([*parts, f"replicated {count(replicated)}"])


def as_tuple(entry) -> tuple[str, ...]:
  return entry if isinstance(entry, tuple) else (entry,)
