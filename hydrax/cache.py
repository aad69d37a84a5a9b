"""Key/value cache pytrees: shared levels stored once, plus a per-sequence (suffix) cache.

Axis letters: L layers, N nodes of a shared level, B sequences (rows), S capacity (keys per
node or per sequence), K KV heads, D head dim.

A `LevelKV` holds one cache level for all layers: k, v [L,N,S,K,D] and the valid keys per node
[N]. A `KVCache` is what a forward pass reads and writes:

  shared  read-only levels, root first; each node stored once (no copy per sequence);
  owners  the node of each row at each shared level: int32 arrays that are pytree children
          (runtime data), so compiled programs depend on shapes only, not on the sharing tree;
  suffix  the per-row level that the forward pass appends to (owner = row), or None when the
          queries attend only to themselves (a full forward without a cache).

Caches are passed into jitted functions and returned from them (donate them through the decode
loop); they are never stored inside NNX modules.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hydrax.attention import KVLevel
from hydrax.attention.checks import concrete


class LevelKV(NamedTuple):
  """One cache level for every layer.

  k, v:    [L,N,S,K,D] keys (after RoPE) and values of N nodes (or rows), capacity S.
  lengths: [N] int32 valid keys per node.
  """
  k: jax.Array
  v: jax.Array
  lengths: jax.Array

  @property
  def capacity(self) -> int:
    return int(self.k.shape[2])

  @property
  def num_nodes(self) -> int:
    return int(self.k.shape[1])

  def layer(self, index, owner=None) -> KVLevel:
    """The attention-core view of layer `index` (an int or int32 scalar, may be traced): the
    stacked k, v with `layer=index`, so that backends read that layer in place (no copy)."""
    return KVLevel(self.k, self.v, self.lengths, owner, layer=index)


def empty_level(num_layers: int, num_nodes: int, capacity: int, num_kv_heads: int,
                head_dim: int, dtype) -> LevelKV:
  """A zero-filled `LevelKV` of shape [L,N,S,K,D] with all lengths 0."""
  for name, value in (("num_layers", num_layers), ("num_nodes", num_nodes),
                      ("capacity", capacity), ("num_kv_heads", num_kv_heads),
                      ("head_dim", head_dim)):
    if int(value) < 0:
      raise ValueError(f"empty_level: {name} must be >= 0, got {value}")
  shape = (num_layers, num_nodes, capacity, num_kv_heads, head_dim)
  return LevelKV(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                 jnp.zeros((num_nodes,), jnp.int32))


def _check_owner(owner, num_nodes: int, batch: Optional[int], index: int):
  """owner as given (NumPy stays NumPy: eager callers keep the static grouping), checked:
  [B] integers, and in [0, N) when its values are concrete."""
  if not hasattr(owner, "shape") or not hasattr(owner, "dtype"):
    owner = np.asarray(owner)
  if owner.ndim != 1 or not jnp.issubdtype(owner.dtype, jnp.integer):
    raise ValueError(f"owners[{index}] must be a 1-D integer array [B], got shape "
                     f"{tuple(owner.shape)} dtype {owner.dtype}")
  if batch is not None and owner.shape[0] != batch:
    raise ValueError(f"owners[{index}] has B={owner.shape[0]} rows but owners[0] (or the "
                     f"suffix) has B={batch}")
  values = concrete(owner)
  if values is not None and values.size and (values.min() < 0 or values.max() >= num_nodes):
    raise ValueError(f"owners[{index}] has node indices in [{values.min()}, {values.max()}], "
                     f"outside [0, {num_nodes - 1}] (level {index} has N={num_nodes} nodes)")
  return owner


@jax.tree_util.register_pytree_node_class
class KVCache:
  """The cache a forward pass attends to: shared levels (read-only) + a per-row level.

  shared: tuple of LevelKV, root first ([L,N_i,S_i,K,D]).
  owners: one int array [B] per shared level, the node of each row: runtime data (pytree
          children), so a new sharing tree of the same shapes reuses a compiled program.
          NumPy owners used outside `jit` stay NumPy (backends may group statically then).
  suffix: LevelKV [L,B,S,K,D] (owner = row) or None.
  """

  def __init__(self, suffix: Optional[LevelKV], shared: Sequence[LevelKV] = (),
               owners: Sequence = (), *, _checked: bool = False):
    self.suffix = suffix
    self.shared = tuple(shared)
    owners = tuple(owners)
    if _checked:
      self._owners = owners
      return
    if len(owners) != len(self.shared):
      raise ValueError(f"KVCache: {len(self.shared)} shared levels but {len(owners)} owner "
                       "arrays; give one owner array [B] per shared level")
    batch = None
    if suffix is not None and hasattr(suffix.k, "shape"):
      batch = int(suffix.k.shape[1])
    checked = []
    for i, (o, lvl) in enumerate(zip(owners, self.shared)):
      o = _check_owner(o, int(lvl.k.shape[1]) if hasattr(lvl.k, "shape") else 0, batch, i)
      batch = int(o.shape[0]) if batch is None else batch
      checked.append(o)
    self._owners = tuple(checked)

  @property
  def owners(self) -> tuple:
    """One int array [B] per shared level (NumPy or jax, as given; traced under `jit`)."""
    return self._owners

  def layer_levels(self, index) -> list[KVLevel]:
    """The shared levels of layer `index` (an int or int32 scalar) as KVLevels."""
    return [lvl.layer(index, owner) for lvl, owner in zip(self.shared, self._owners)]

  def replace_suffix(self, suffix: Optional[LevelKV]) -> "KVCache":
    return KVCache(suffix, self.shared, self._owners, _checked=True)

  def tree_flatten(self):
    return (self.shared, self.suffix, self._owners), None

  @classmethod
  def tree_unflatten(cls, _, children):
    shared, suffix, owners = children
    return cls(suffix, shared, owners, _checked=True)

  def __repr__(self):
    def shape(lvl):
      return None if lvl is None else tuple(getattr(lvl.k, "shape", ()))
    return (f"KVCache(shared={[shape(lvl) for lvl in self.shared]}, "
            f"suffix={shape(self.suffix)}, kv_bytes={kv_bytes(self)})")


def kv_bytes(cache) -> int:
  """Bytes of key/value storage held by `cache` (a KVCache, LevelKV, or a list of them).

  Counts k and v as allocated (capacity, not only the valid keys); lengths are not counted.
  """
  if cache is None:
    return 0
  if isinstance(cache, KVCache):
    return sum(kv_bytes(lvl) for lvl in cache.shared) + kv_bytes(cache.suffix)
  if isinstance(cache, LevelKV):
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in (cache.k, cache.v))
  if isinstance(cache, (list, tuple)):
    return sum(kv_bytes(c) for c in cache)
  raise ValueError(f"kv_bytes: expected a KVCache, LevelKV or a list of them, got "
                   f"{type(cache).__name__}")


def level_bytes(num_layers: int, num_nodes: int, capacity: int, num_kv_heads: int,
                head_dim: int, dtype) -> int:
  """Bytes that a LevelKV of these sizes would hold (k and v), without allocating it."""
  return 2 * num_layers * num_nodes * capacity * num_kv_heads * head_dim * \
      jnp.dtype(dtype).itemsize
