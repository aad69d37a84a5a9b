"""The XLA backend: one level of attention written with `jnp` (the reference and fallback).

The backend contract (shared by every backend, see `backends.py`):

  level_attention(q, k, v, lengths, owner, limits, *, scale) -> (out, lse)

  q       [B,T,H,D]  queries, H = K*G (query head h uses KV head h // G).
  k, v    [N,S,K,D]  keys and values of the level's N nodes (capacity S).
  lengths [N] int32  valid keys per node.
  owner   [B] int32  node of each sequence, or None: N == B and sequence b owns node b.
  limits  [B,T] int32  keys visible to query (b, t): keys s < limits[b, t] of its node
          (limits <= lengths[owner]; causality is already folded in).
  out     [B,T,H,D] float32; zero where a query sees no key.
  lse     [B,T,H] float32 natural-log sum of exp(scores); -inf where a query sees no key.

  Backends with a configuration also take `config=` (their frozen config value); backends
  with `takes_layer=True` also take `layer=` (k, v are then stacked [L,N,S,K,D] and the level
  is that layer, read in place). This backend takes neither: the caller slices the layer with
  `lax.dynamic_index_in_dim`, which XLA fuses into the products that read it.

Shared levels use Hydragen's inter-sequence batching: the queries of all sequences of a node,
and all query heads of a KV head, are stacked into the rows of one product with that node's
keys. Two layouts:

* Grouped by node (concrete `owner`: NumPy, or a constant closed over by `jit`): each node gets
  rows for its largest group, cap = max sequences per node (a plain reshape when the owners
  are contiguous and equal-sized). Work N*cap*T*G rows per KV head; each node's keys read once.
  Sequences whose node is known (concrete lengths) to be empty get no rows at all.
* Tiles (traced `owner`, or concrete owners so uneven that N*cap exceeds twice the tiles'
  rows): sequences sorted by node and cut into tiles of c = ceil(B / min(N, B)) sequences of
  one node; tile j attends node tile_node[j]. With a traced owner the tile table (argsort,
  counts, tile starts) is computed at run time for the static bound
  Tn = (B + min(N, B) * (c - 1)) // c <= 2 * min(N, B) tiles (the unused ones are all padding
  rows, which see no key). Cost against the grouped layout of balanced groups: <= 2x the rows
  (Tn*c <= B + min(N, B) * (c - 1)), and each tile's node keys are gathered, a copy: Tn*S*K*D
  keys and values written and read again (<= 2x the grouped layout's key reads, plus that
  copy). Nothing grows with N*B as giving every node room for all B sequences did.
  On this project's shared 2-core CPU (B=256, N=8..64, min of 15 runs, heavily loaded),
  balanced groups: grouped 3.3-6.6 ms, tiles from a traced owner 13-27 ms; one node holding
  nearly all sequences: grouped 188 ms (N=8) and 853 ms (N=64), tiles 13-32 and 57-71 ms.
  Hence the rule above: grouped for concrete owners unless uneven, tiles otherwise.
"""

from __future__ import annotations

import einops
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from hydrax.attention.checks import concrete
from hydrax.attention.merge import merge


def _precision(dtype):
  # Float32 inputs get true float32 products (GPUs otherwise default to TF32).
  return lax.Precision.HIGHEST if dtype == jnp.float32 else lax.Precision.DEFAULT


def _attend(scores, mask, v, pv_equation: str, l_pattern: str):
  """Masked softmax of `scores` over its last axis, times v.

  Returns (out float32 laid out as `pv_equation`'s output, lse float32 shaped like scores
  without its last axis, permuted by `l_pattern`, an einops pattern 'scores_dims -> out_dims').
  Rows with no visible key give out = 0 and lse = -inf, and no NaN in values or gradients.
  """
  scores = jnp.where(mask, scores, -jnp.inf)
  m = jnp.max(scores, axis=-1, keepdims=True)
  # The result does not depend on m mathematically, so no gradient needs to flow through it.
  m = lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  p = jnp.exp(scores - m)
  l = jnp.sum(p, axis=-1)
  pv_dtype = v.dtype if v.dtype != jnp.float32 else jnp.float32
  out = jnp.einsum(pv_equation, p.astype(pv_dtype), v,
                   preferred_element_type=jnp.float32, precision=_precision(v.dtype))
  has_keys = l > 0
  l_safe = jnp.where(has_keys, l, 1.0)
  lse = jnp.where(has_keys, m[..., 0] + jnp.log(l_safe), -jnp.inf)
  return out, einops.rearrange(l_safe, l_pattern), einops.rearrange(lse, l_pattern)


def _per_sequence(q, k, v, limits, scale):
  """Level whose node b belongs to sequence b alone (N == B): ordinary batched attention."""
  b, t, h, d = q.shape
  kh = k.shape[2]
  qg = einops.rearrange(q, "b t (k g) d -> b t k g d", k=kh)
  scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32,
                      precision=_precision(q.dtype)) * scale
  mask = jnp.arange(k.shape[1])[None, None, None, None, :] < limits[:, None, None, :, None]
  out, l, lse = _attend(scores, mask, v, "bkgts,bskd->btkgd",
                        "b k g t -> b t k g")
  out = out / l[..., None]
  return (einops.rearrange(out, "b t k g d -> b t (k g) d"),
          einops.rearrange(lse, "b t k g -> b t (k g)"))


def _static_owner(owner, lengths, num_nodes: int, batch: int):
  """The owner array as NumPy when known now, with sequences whose node is known to be empty
  moved to a virtual node `num_nodes` (they see no key here, so they need no rows)."""
  owner_np = np.zeros((batch,), np.int64) if num_nodes == 1 else concrete(owner)
  if owner_np is None:
    return None
  owner_np = owner_np.astype(np.int64)
  lengths_np = concrete(lengths)
  if lengths_np is not None:
    owner_np = np.where(lengths_np[owner_np] > 0, owner_np, num_nodes)
  return owner_np


def _static_grouping(owner_np, num_nodes: int, batch: int):
  """Static layout of sequences by node: each node gets room for the largest group.

  Returns (seq_idx [N, C] with `batch` as the padding index, slot [B], is_reshape) where
  sequence b sits at seq_idx[owner[b], slot[b]]; sequences that `owner_np` (see _static_owner)
  assigns to the virtual node N get no row.
  """
  counts = np.bincount(owner_np, minlength=num_nodes + 1)[:num_nodes]
  cap = max(int(counts.max(initial=0)), 1)
  order = np.argsort(owner_np, kind="stable")
  starts = np.concatenate([np.cumsum(counts) - counts, [0]])
  slot = np.empty((batch,), np.int64)
  slot[order] = np.arange(batch) - starts[owner_np[order]]
  slot = np.where(owner_np < num_nodes, slot, 0)
  seq_idx = np.full((num_nodes, cap), batch, np.int64)
  real = owner_np < num_nodes
  seq_idx[owner_np[real], slot[real]] = np.arange(batch)[real]
  is_reshape = bool(real.all() and np.array_equal(seq_idx.ravel(), np.arange(batch)))
  return seq_idx, slot, is_reshape


def tile_size(num_nodes: int, batch: int) -> int:
  """c, sequences per tile of the tiled layout: ceil(B / min(N, B)), the mean group size."""
  return -(-batch // max(1, min(num_nodes, batch)))


def num_tiles(num_nodes: int, batch: int, c: int) -> int:
  """Static upper bound on the tiles of c sequences of one node: sum_n ceil(count_n / c) <=
  (B + min(N, B) * (c - 1)) // c (at most min(N, B) nodes have sequences)."""
  return (batch + min(num_nodes, batch) * (c - 1)) // c


def _tiled_grouping(xp, owner, num_nodes: int, batch: int, c: int):
  """Sequences sorted by node and cut into tiles of at most c sequences of one node.

  xp: np (concrete owner: an exact, static table) or jnp (traced owner: a runtime table of
  `num_tiles` tiles, the unused ones empty). Returns (seq_idx [Tn, c] with `batch` as the
  padding index, tile_node [Tn], tile [B], slot [B]): sequence b sits at
  seq_idx[tile[b], slot[b]] and tile j attends node tile_node[j]'s keys.
  """
  owner = owner.astype(xp.int32)
  counts = xp.zeros((num_nodes,), xp.int32)
  if xp is np:
    np.add.at(counts, owner, 1)
    order = np.argsort(owner, kind="stable").astype(np.int32)
  else:
    counts = counts.at[owner].add(1)
    order = jnp.argsort(owner, stable=True).astype(jnp.int32)
  ntiles = (counts + c - 1) // c
  tile_end = xp.cumsum(ntiles)
  total = int(tile_end[-1]) if xp is np else num_tiles(num_nodes, batch, c)
  node_sorted = owner[order]
  rank = xp.arange(batch, dtype=xp.int32) - (xp.cumsum(counts) - counts)[node_sorted]
  tile_sorted = (tile_end - ntiles)[node_sorted] + rank // c
  slot_sorted = rank % c
  tile_node = xp.minimum(xp.searchsorted(tile_end, xp.arange(total), side="right"),
                         num_nodes - 1).astype(xp.int32)
  if xp is np:
    tile, slot = np.empty_like(order), np.empty_like(order)
    tile[order], slot[order] = tile_sorted, slot_sorted
    seq_idx = np.full((total, c), batch, np.int32)
    seq_idx[tile_sorted, slot_sorted] = order
  else:
    tile = jnp.zeros_like(order).at[order].set(tile_sorted)
    slot = jnp.zeros_like(order).at[order].set(slot_sorted)
    seq_idx = jnp.full((total, c), batch, jnp.int32).at[tile_sorted, slot_sorted].set(order)
  return seq_idx, tile_node, tile, slot


def _stacked(qn, lim, k, v, scale):
  """Rows of each group against its keys: qn [G',C,T,K,G,D], lim [G',C,T], k, v [G',S,K,D]
  -> out [G',C,T,K,G,D] float32 (normalised), lse [G',C,T,K,G] float32."""
  s = k.shape[1]
  scores = jnp.einsum("nctkgd,nskd->nkgcts", qn, k, preferred_element_type=jnp.float32,
                      precision=_precision(qn.dtype)) * scale
  mask = jnp.arange(s) < lim[:, None, None, :, :, None]
  out, l, lse = _attend(scores, mask, v, "nkgcts,nskd->nctkgd", "n k g c t -> n c t k g")
  return out / l[..., None], lse


def _pad_rows(q, limits):
  """q and limits with one extra all-zero sequence (index B: padding rows see no key)."""
  return (jnp.concatenate([q, jnp.zeros((1,) + q.shape[1:], q.dtype)]),
          jnp.concatenate([limits, jnp.zeros((1, limits.shape[1]), limits.dtype)]))


def _unstack(out, lse, index):
  """Per-sequence results [B,T,H,D], [B,T,H] of grouped ones at `index` (a tuple of [B])."""
  return (einops.rearrange(out[index], "b t k g d -> b t (k g) d"),
          einops.rearrange(lse[index], "b t k g -> b t (k g)"))


def _tiled(q, k, v, owner, limits, scale):
  """Level whose owners are traced, or concrete but too uneven for `_shared`: tiles of c
  sequences of one node (see the module docstring for the cost)."""
  b, t, h, d = q.shape
  n, s, kh, _ = k.shape
  c = tile_size(n, b)
  owner_np = concrete(owner)
  xp = np if owner_np is not None else jnp
  seq_idx, tile_node, tile, slot = _tiled_grouping(
      xp, owner_np if owner_np is not None else jnp.asarray(owner), n, b, c)
  q_pad, lim_pad = _pad_rows(q, limits)
  qn = einops.rearrange(q_pad[seq_idx], "n c t (k g) d -> n c t k g d", k=kh)
  # The gather of each tile's node keys is a copy (XLA does not fuse it into the product).
  out, lse = _stacked(qn, lim_pad[seq_idx], jnp.take(k, tile_node, axis=0),
                      jnp.take(v, tile_node, axis=0), scale)
  return _unstack(out, lse, (tile, slot))


def _grouped(q, k, v, owner_np, limits, scale):
  """Level grouped by static owners (`_static_owner`): each node gets rows for its largest
  group; contiguous equal-sized groups are a reshape."""
  b, t, h, d = q.shape
  n, s, kh, _ = k.shape
  seq_idx, slot, is_reshape = _static_grouping(owner_np, n, b)
  if is_reshape:
    qn = einops.rearrange(q, "(n c) t (k g) d -> n c t k g d", n=n, k=kh)
    lim = einops.rearrange(limits, "(n c) t -> n c t", n=n)
  else:
    q_pad, lim_pad = _pad_rows(q, limits)
    qn = einops.rearrange(q_pad[seq_idx], "n c t (k g) d -> n c t k g d", k=kh)
    lim = lim_pad[seq_idx]
  out, lse = _stacked(qn, lim, k, v, scale)
  if is_reshape:
    return (einops.rearrange(out, "n c t k g d -> (n c) t (k g) d"),
            einops.rearrange(lse, "n c t k g -> (n c) t (k g)"))
  if (owner_np == n).any():
    # Sequences of empty nodes read a virtual node N: out 0, lse -inf.
    out = jnp.concatenate([out, jnp.zeros((1,) + out.shape[1:], out.dtype)])
    lse = jnp.concatenate([lse, jnp.full((1,) + lse.shape[1:], -jnp.inf, lse.dtype)])
  return _unstack(out, lse, (owner_np, slot))


def _shared(q, k, v, lengths, owner, limits, scale):
  """Level of N nodes shared by groups of sequences: one stacked product per node (static
  owners) or per tile of c sequences of one node (`_tiled`)."""
  b = q.shape[0]
  n = k.shape[0]
  owner_np = _static_owner(owner, lengths, n, b)
  if owner_np is None:
    return _tiled(q, k, v, owner, limits, scale)
  counts = np.bincount(owner_np, minlength=n + 1)[:n]
  c = tile_size(n, b)
  if n * max(int(counts.max(initial=0)), 1) > 2 * int(((counts + c - 1) // c).sum()) * c:
    # Uneven groups: room for the largest group at every node costs more than twice the rows
    # of the tiles (and their key copies).
    return _tiled(q, k, v, concrete(owner), limits, scale)
  return _grouped(q, k, v, owner_np, limits, scale)


def level_attention(q, k, v, lengths, owner, limits, *, scale):
  """One level of attention in plain XLA; see the module docstring for the contract."""
  b, t, h, _ = q.shape
  if k.shape[1] == 0 or b == 0 or t == 0:
    return (jnp.zeros(q.shape, jnp.float32), jnp.full((b, t, h), -jnp.inf, jnp.float32))
  # Keys no query of a node may see (past its rows' largest limit, so also past its length)
  # can hold anything (stale or uninitialised cache): a masked weight 0 times NaN is NaN, in
  # the output and in gradients, so they are zeroed. node_hi [N] <= lengths.
  n = k.shape[0]
  row_hi = jnp.max(limits, axis=1).astype(jnp.int32)
  node_hi = row_hi if owner is None else jnp.zeros((n,), jnp.int32).at[owner].max(row_hi)
  seen = (jnp.arange(k.shape[1])[None, :] < node_hi[:, None])[:, :, None, None]
  k = jnp.where(seen, k, jnp.zeros((), k.dtype))
  v = jnp.where(seen, v, jnp.zeros((), v.dtype))
  if owner is None:
    return _per_sequence(q, k, v, limits, scale)
  return _shared(q, k, v, lengths, owner, limits, scale)


def levels_attention(q, kvs, lengths, owners, limits, layers, *, scale):
  """Every level through `level_attention`, merged: the XLA reference that the kernels'
  backward passes recompute. kvs: (k, v) per level, [N,S,K,D], or stacked [L,N,S,K,D] read
  at the level's layer (an int32 scalar; None for unstacked). Returns out [B,T,H,D] f32 and
  lse [B,T,H]."""
  parts = []
  for (k, v), n, owner, lim, layer in zip(kvs, lengths, owners, limits, layers):
    if layer is not None:
      k = lax.dynamic_index_in_dim(k, layer, 0, keepdims=False)
      v = lax.dynamic_index_in_dim(v, layer, 0, keepdims=False)
    parts.append(level_attention(q, k, v, n, owner, lim, scale=scale))
  return merge(parts)

