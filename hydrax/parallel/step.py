"""Sharded attention and the tensor-parallel model step, written per shard for `jax.shard_map`.

Everything here that ends in `_shard` runs inside `jax.shard_map` over a ("data", "model") mesh
and sees per-shard arrays: B_l = B/data rows, H_l = H/M query heads, K_l = K/M KV heads,
F_l = F/M MLP columns (M the model axis size). The collectives are explicit:

  attention      none: a shard's query heads read only its own KV heads, its rows only its
                 own nodes (see `rules.place_nodes`);
  o projection   psum over model of [B_l,T,E] (the rows of o are split over model);
  MLP down       psum over model of [B_l,T,E];
  logits         vocab-sharded: `apply` all-gathers the logits [B_l,T,V] over model.
(Generation itself runs in `hydrax.engine`, whose loop leaves the model axis to XLA.)

The model is `hydrax.models.llama.forward` itself (one copy of the layers, under `lax.scan`):
`forward_shard` calls it with `reduce=MODEL` (the two psums) and, when the data shards' node
layouts differ, an `attend=` hook that picks each shard's owners.

Per-shard owners: the XLA attention backend groups a shared level's queries by node statically
(NumPy owners), but each data shard owns a different local node layout. `OwnerTable` holds the
distinct per-shard layouts; with more than one, the attention of each layer is a `lax.switch`
on the shard's data index whose branches close over their own NumPy owners (only attention is
inside the switch; no collective is).

Axis letters: B rows, T new tokens, E hidden, H/K query/KV heads, D head dim, N nodes, S keys,
L layers, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from hydrax import attention as attn_lib
from hydrax.attention import KVLevel
from hydrax.attention.checks import concrete
from hydrax.cache import KVCache, LevelKV
from hydrax.models import llama as llama_lib
from hydrax.parallel import rules
from hydrax.parallel.mesh import DATA, MODEL, axis_sizes, check_mesh


class OwnerTable(NamedTuple):
  """Static owners of attention levels, per data shard, deduplicated.

  variants: distinct layouts; each a tuple over levels of a NumPy int [B_l] owner (local node
            indices) or None (a per-row level).
  index:    [data] int, the variant of each data shard.
  """
  variants: tuple
  index: np.ndarray

  @classmethod
  def build(cls, per_shard: Sequence[Sequence[Optional[np.ndarray]]]) -> "OwnerTable":
    keys, variants, index = {}, [], []
    for owners in per_shard:
      owners = tuple(None if o is None else np.asarray(o, np.int32) for o in owners)
      key = tuple(None if o is None else (o.shape, o.tobytes()) for o in owners)
      if key not in keys:
        keys[key] = len(variants)
        variants.append(owners)
      index.append(keys[key])
    return cls(tuple(variants), np.asarray(index, np.int32))

  @classmethod
  def uniform(cls, owners: Sequence[Optional[np.ndarray]], data: int) -> "OwnerTable":
    """The same owners on every data shard."""
    return cls.build([owners] * data)

  def extend(self, owner: Optional[np.ndarray] = None) -> "OwnerTable":
    """The table with one more level (the same `owner` on every shard) appended."""
    return OwnerTable(tuple(v + (owner,) for v in self.variants), self.index)

  def key(self) -> tuple:
    """A hashable value equal for tables with the same layouts (owners' bytes)."""
    return (tuple(tuple(None if o is None else (o.shape, o.tobytes()) for o in v)
                  for v in self.variants), self.index.tobytes())


@dataclasses.dataclass(frozen=True, eq=False)
class TableAttention:
  """The `attend=` hook of `llama.forward` under shard_map: `attend_shard` with this table's
  per-shard owners for the shared levels (and None for the per-row level after them).
  Hashable and equal by the table's contents."""
  table: OwnerTable

  def __call__(self, q, levels, *, backend):
    return attend_shard(q, levels, self.table.extend(None), causal_last=True, backend=backend)

  def __hash__(self):
    return hash(self.table.key())

  def __eq__(self, other):
    return isinstance(other, TableAttention) and self.table.key() == other.table.key()


def attend_shard(q, levels: Sequence[KVLevel], table: OwnerTable, *, causal_last: bool = True,
                 scale: Optional[float] = None, backend: str = "auto"):
  """`hydragen_attention` of one shard. No communication.

  q [B_l,T,H_l,D]; levels: KVLevel(k, v, lengths, owner, layer) per level, k, v [N_l,S,K_l,D]
  (the shard's local nodes, padded) or [B_l,S,K_l,D] (per-row levels), or stacked
  [L,...] with `layer` set; their owners are replaced by `table`'s (a shared level is cut to
  the nodes its owner uses when that is fewer than N_l; a stacked level is then sliced to its
  layer first). Returns out [B_l,T,H_l,D] (q's dtype), lse [B_l,T,H_l] float32.
  """
  levels = list(levels)
  if any(len(v) != len(levels) for v in table.variants):
    raise ValueError(f"owner table has {len(table.variants[0])} levels, attention got "
                     f"{len(levels)}")

  def run(variant, q, levels):
    parts = []
    for level, owner in zip(levels, variant):
      if owner is not None:
        n = int(owner.max()) + 1 if owner.size else 1
        if n < level.k.shape[-4]:          # padding nodes this shard does not use
          view = level.layer_view()
          level = KVLevel(view.k[:n], view.v[:n], view.lengths[:n])
      parts.append(level._replace(owner=owner))
    return attn_lib.hydragen_attention(q, parts, causal_last=causal_last, scale=scale,
                                       backend=backend)

  if len(table.variants) == 1:
    return run(table.variants[0], q, levels)
  branch = jnp.asarray(table.index, jnp.int32)[lax.axis_index(DATA)]
  return lax.switch(branch, [functools.partial(run, v) for v in table.variants], q, levels)


def hydragen_attention(q, levels: Sequence[KVLevel], *, mesh, causal_last: bool = True,
                       scale: Optional[float] = None, backend: str = "auto"):
  """`hydrax.attention.hydragen_attention` over a ("data", "model") mesh.

  q [B,T,H,D] and levels (k, v [N,S,K,D], lengths [N], owner [B] NumPy or None) are global.
  Sequences go over data (B divisible by its size), query and KV heads over model (K divisible
  by its size). A shared level's nodes are gathered to the data shards whose sequences own them
  (`rules.place_nodes`; a node spanning shards is copied to each) and owners re-indexed per
  shard. Returns out [B,T,H,D], lse [B,T,H], sharded as q (`rules.QUERY_SPEC`, `LSE_SPEC`).
  """
  mesh = check_mesh(mesh)
  data, m = axis_sizes(mesh)
  if getattr(q, "ndim", None) != 4:
    raise ValueError(f"q must have shape [B,T,H,D], got {getattr(q, 'shape', type(q))}")
  if isinstance(levels, KVLevel) or not isinstance(levels, (list, tuple)) or not levels:
    raise ValueError("levels must be a non-empty list of KVLevel")
  b, _, h, _ = q.shape
  if b % data:
    raise ValueError(f"q has B={b} sequences, which the mesh's data axis of size {data} does "
                     "not divide")
  if h % m:
    raise ValueError(f"q has H={h} query heads, which the mesh's model axis of size {m} does "
                     "not divide")
  args, specs, per_level = [], [], []
  for i, level in enumerate(levels):
    if not isinstance(level, KVLevel):
      raise ValueError(f"levels[{i}] must be a KVLevel, got {type(level).__name__}")
    if level.k.ndim != 4 or level.k.shape[2] % m:
      raise ValueError(f"levels[{i}].k has shape {tuple(level.k.shape)}: its K (KV heads) must "
                       f"be divisible by the mesh's model axis of size {m}")
    lengths = jnp.asarray(level.lengths, jnp.int32)
    if level.owner is None:
      if level.k.shape[0] != b:
        raise ValueError(f"levels[{i}].owner is None but the level has N={level.k.shape[0]} "
                         f"nodes for B={b} sequences")
      args.append(KVLevel(level.k, level.v, lengths, None))
      per_level.append([None] * data)
    else:
      owner = concrete(level.owner)
      if owner is None:
        raise ValueError(f"levels[{i}].owner is traced; the sharded attention places nodes on "
                         "data shards from the owners' values, so pass owner as a NumPy array")
      if owner.shape != (b,) or (owner.size and (owner.min() < 0 or
                                                 owner.max() >= level.k.shape[0])):
        raise ValueError(f"levels[{i}].owner must be [B]={b} node indices in "
                         f"[0, {level.k.shape[0] - 1}], got shape {owner.shape}")
      place = rules.place_nodes(owner, data)
      flat = np.maximum(place.nodes, 0).reshape(-1)
      real = jnp.asarray((place.nodes >= 0).reshape(-1))
      args.append(KVLevel(level.k[flat], level.v[flat], jnp.where(real, lengths[flat], 0),
                          None))
      per_level.append(list(place.owner))
    specs.append(KVLevel(rules.LEVEL_KV_SPEC, rules.LEVEL_KV_SPEC, rules.ROWS_SPEC, None))
  table = OwnerTable.build([tuple(p[s] for p in per_level) for s in range(data)])
  body = functools.partial(attend_shard, table=table, causal_last=causal_last, scale=scale,
                           backend=backend)
  fn = jax.shard_map(body, mesh=mesh, in_specs=(rules.QUERY_SPEC, specs),
                     out_specs=(rules.QUERY_SPEC, rules.LSE_SPEC), check_vma=False)
  return jax.jit(fn)(q, args)


# ----------------------------------------------------------------------------- model step


def forward_shard(model, tokens, positions, *, shared: Sequence[LevelKV] = (),
                  table: Optional[OwnerTable] = None, suffix: Optional[LevelKV] = None,
                  valid=None, skip_attention: bool = False, backend="auto", unroll=1):
  """The tensor-parallel decoder over T new tokens of this shard's rows (inside shard_map).

  `hydrax.models.llama.forward` with reduce=MODEL (a psum after the o projection and after
  the MLP down projection) and, when the data shards' owners differ, a `TableAttention` hook.
  model: a `Llama` whose arrays are this shard's slices (`rules.param_specs`); its config is
    the global one. tokens, positions: [B_l,T] int32.
  shared: read-only LevelKV [L,N_l,S,K_l,D] of this shard's local nodes, with their owners in
    `table` (one entry per shared level). suffix: LevelKV [L,B_l,S,K_l,D] written at slots
    lengths..lengths+T-1 and attended last (causal); None: the tokens attend to themselves.
  valid: [B_l] real new tokens per row (default T); suffix lengths grow by it.
  Returns (hidden [B_l,T,E] after the final norm, identical on the model shards; the suffix
  LevelKV or None).
  """
  shared = tuple(shared)
  if table is None:
    if shared and not skip_attention:
      raise ValueError("forward_shard: shared levels need an OwnerTable")
    table = OwnerTable(((),), np.zeros((1,), np.int32))
  if skip_attention:
    # No attention reads the caches: they pass through untouched.
    hidden, _ = llama_lib.forward(model, tokens, positions, None, skip_attention=True,
                                  backend=backend, reduce=MODEL, unroll=unroll)
    return hidden, suffix
  if len(table.variants[0]) != len(shared):
    raise ValueError(f"forward_shard: the owner table has {len(table.variants[0])} levels "
                     f"for {len(shared)} shared levels")
  cache = None
  if shared or suffix is not None:
    # Any shard's owners make a valid cache ([B_l] local node indices); with several layouts
    # the hook below replaces them by this shard's own.
    cache = KVCache(suffix, shared, table.variants[0])
  attend = TableAttention(table) if len(table.variants) > 1 else None
  hidden, cache = llama_lib.forward(model, tokens, positions, cache, valid=valid,
                                    backend=backend, reduce=MODEL, attend=attend,
                                    unroll=unroll)
  return hidden, None if cache is None else cache.suffix


def full_logits_shard(model, hidden, vocab_sharded: bool):
  """Logits [..., V] on every model shard: `llama.logits` of the shard's arrays (this shard's
  vocabulary slice when the head is vocab-sharded), all-gathered over model in that case."""
  local = llama_lib.logits(model, hidden)
  return lax.all_gather(local, MODEL, axis=local.ndim - 1, tiled=True) if vocab_sharded \
      else local


def apply(model, params, tokens, positions=None, *, mesh, backend: str = "auto"):
  """Sharded full forward pass (no cache): logits [B,T,V] float32, rows over data.

  model: a hydrax `Llama`, its nnx.GraphDef (with params) or its LlamaConfig (with params);
  params: its nnx.State (None: the module's own). B must be divisible by the data axis size.
  """
  from hydrax.engine import resolve_model    # at call time: the engine imports parallel
  mesh = check_mesh(mesh)
  graphdef, params, config = resolve_model(model, params)
  data, _ = axis_sizes(mesh)
  tokens = np.asarray(tokens).astype(np.int32)
  if tokens.ndim != 2:
    raise ValueError(f"tokens must have shape [B,T], got {tuple(tokens.shape)}")
  if tokens.shape[0] % data:
    raise ValueError(f"tokens have B={tokens.shape[0]} rows, which the mesh's data axis of "
                     f"size {data} does not divide")
  positions = (np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
               if positions is None else np.asarray(positions).astype(np.int32))
  if positions.shape != tokens.shape:
    raise ValueError(f"positions must have the shape of tokens {tokens.shape}, got "
                     f"{positions.shape}")
  specs = rules.param_specs(params, config, mesh)
  params = rules.shard_tree(params, specs, mesh)
  shard_vocab = rules.vocab_sharded(config, mesh)
  rows = NamedSharding(mesh, rules.ROWS_SPEC)

  def body(params, tokens, positions):
    net = nnx.merge(graphdef, params)
    hidden, _ = forward_shard(net, tokens, positions, backend=backend)
    return full_logits_shard(net, hidden, shard_vocab)

  fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(specs, rules.ROWS_SPEC, rules.ROWS_SPEC),
                             out_specs=P(DATA, None, None), check_vma=False))
  return fn(params, rules.put(tokens, rows), rules.put(positions, rows))
