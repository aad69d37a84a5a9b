"""What a call of `hydragen_attention` computes from its levels' lengths and owners alone.

A decode step calls attention once per layer with the same sharing structure: the same owners,
lengths and query shape, only q, k, v and the layer differ. Everything derived from the
structure (each level's per-query key limits [B,T]; a kernel backend's tile tables, row
orders, tile bounds and slots) is the same in every layer. `hydrax.attention.prepare` computes
it once, before the layer loop, as a `Prepared` value that each layer's call takes
(`hydragen_attention(..., prepared=)`): FlashInfer's plan / run split, with the plan as data.
Under `jit`, XLA's CPU pipeline hoists such loop-invariant tables out of a `lax.scan` over
layers on its own; its GPU pipeline does not (H200, jax 0.11.2:
experiments/results/fused_h200/README.md, run 11), so the split is explicit.

`Prepared` is a pytree: its arrays (traced or concrete) are leaves; static parts (shapes, the
backend, NumPy tables of concrete owners, plans) are its auxiliary data, hashed by value, so a
`Prepared` can cross a `jit` boundary. `split_arrays` / `join_arrays` are that split for any
pytree (kernels use them to pass tables through `jit` and `compute_on`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np


class _Static:
  """A non-array leaf (a NumPy array or a hashable Python value) hashed and compared by
  value, so that it can be auxiliary data of a pytree or a static argument of `jit`."""

  __slots__ = ("value", "_key")

  def __init__(self, value):
    self.value = value
    if isinstance(value, np.ndarray):
      self._key = ("ndarray", value.shape, value.dtype.str, value.tobytes())
    else:
      self._key = ("value", value)

  def __hash__(self):
    return hash(self._key)

  def __eq__(self, other):
    return isinstance(other, _Static) and self._key == other._key

  def __repr__(self):
    return f"_Static({self.value!r})"


def _is_array(x) -> bool:
  return isinstance(x, jax.Array)


def split_arrays(tree) -> tuple[list, tuple]:
  """(the jax arrays of `tree` (traced or concrete), static): static holds the tree's
  structure and every other leaf by value (hashable; see `join_arrays`)."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  arrays = [x for x in leaves if _is_array(x)]
  static = tuple(None if _is_array(x) else _Static(x) for x in leaves)
  return arrays, (treedef, static)


def join_arrays(static: tuple, arrays) -> Any:
  """The tree that `split_arrays` split into (arrays, static)."""
  treedef, slots = static
  it = iter(arrays)
  return jax.tree_util.tree_unflatten(
      treedef, [next(it) if s is None else s.value for s in slots])


class Signature(NamedTuple):
  """What a `Prepared` was made for; a call that takes it must match it field by field."""
  backend: Any
  q: tuple             # (shape, dtype name)
  levels: tuple        # per level: (k shape, k dtype name, has owner, stacked)
  causal_last: bool
  scale: float

  def mismatch(self, other: "Signature") -> str | None:
    """The first field in which `other` differs, as "field: made for X, this call has Y"."""
    for name in self._fields:
      a, b = getattr(self, name), getattr(other, name)
      if name == "levels" and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
          for what, u, w in zip(("k shape", "k dtype", "has owner", "stacked"), x, y):
            if u != w:
              return f"levels[{i}] {what}: made for {u!r}, this call has {w!r}"
      elif name == "backend" and a != b:
        return f"backend: made for {_backend_name(a)}, this call has {_backend_name(b)}"
      elif a != b:
        return f"{name}: made for {a!r}, this call has {b!r}"
    return None


def _backend_name(backend) -> str:
  return f"{backend.name!r} with config {backend.config!r}"


@jax.tree_util.register_pytree_node_class
class Prepared:
  """The layer-invariant part of a `hydragen_attention` call (see the module docstring).

  limits: per level [B,T] int32, the keys of its node each query sees.
  tables: the backend's tables (`Backend.prepare_levels`), or None (a backend without that
    hook, or one whose call runs level by level).
  signature: the `Signature` of the calls it serves.
  """

  def __init__(self, limits, tables, signature: Signature):
    self.limits = tuple(limits)
    self.tables = tables
    self.signature = signature

  def tree_flatten(self):
    arrays, static = split_arrays((self.limits, self.tables))
    return arrays, (static, self.signature)

  @classmethod
  def tree_unflatten(cls, aux, arrays):
    static, signature = aux
    limits, tables = join_arrays(static, arrays)
    return cls(limits, tables, signature)

  def __repr__(self):
    return (f"Prepared({len(self.limits)} levels, tables={type(self.tables).__name__}, "
            f"backend={self.signature.backend.name!r})")
