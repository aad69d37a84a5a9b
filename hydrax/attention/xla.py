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

Shared levels use Hydragen's inter-sequence batching: the queries of all sequences of a node,
and all query heads of a KV head, are stacked into the rows of one product with that node's
keys, which are read once. The grouping is static when `owner` is concrete (a NumPy array, or
a constant closed over by `jit`): each node gets C = max sequences per node rows, and when the
owners are contiguous and equal-sized it is a plain reshape. When `owner` is traced, C = B
(every node could own every sequence): exact but N times the work, logged once. Sequences
whose node is known (concrete lengths) to be empty get no rows at all: deep levels of a plan
give every sequence without a node there one shared empty node.
"""

from __future__ import annotations

import einops
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from hydrax._log import log_once
from hydrax.attention.checks import concrete


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


def _grouping(owner, owner_np, num_nodes: int, batch: int):
  """Static-shape layout of sequences by node.

  Returns (seq_idx [N, C] with `batch` as the padding index, slot [B], is_reshape) where
  sequence b sits at seq_idx[owner[b], slot[b]]. NumPy when `owner_np` (see _static_owner)
  is given; sequences it assigns to the virtual node N get no row.
  """
  if owner_np is not None:
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
  log_once(("xla-traced-owner", num_nodes, batch),
           "hydrax xla backend: a shared level's owner array is traced, so each of its %d "
           "nodes is given room for all %d sequences (exact, but %dx the work). Pass owner as "
           "a NumPy array (closed over under jit) for the grouped path.",
           num_nodes, batch, num_nodes)
  owner = owner.astype(jnp.int32)
  counts = jnp.zeros((num_nodes,), jnp.int32).at[owner].add(1)
  order = jnp.argsort(owner, stable=True)
  starts = jnp.cumsum(counts) - counts
  ranks = jnp.arange(batch, dtype=jnp.int32) - starts[owner[order]]
  slot = jnp.zeros((batch,), jnp.int32).at[order].set(ranks)
  seq_idx = jnp.full((num_nodes, batch), batch, jnp.int32).at[owner, slot].set(
      jnp.arange(batch, dtype=jnp.int32))
  return seq_idx, slot, False


def _shared(q, k, v, lengths, owner, limits, scale):
  """Level of N nodes shared by groups of sequences: one stacked product per node."""
  b, t, h, d = q.shape
  n, s, kh, _ = k.shape
  owner_np = _static_owner(owner, lengths, n, b)
  seq_idx, slot, is_reshape = _grouping(owner, owner_np, n, b)
  if is_reshape:
    qn = einops.rearrange(q, "(n c) t (k g) d -> n c t k g d", n=n, k=kh)
    lim = einops.rearrange(limits, "(n c) t -> n c t", n=n)
  else:
    q_pad = jnp.concatenate([q, jnp.zeros((1,) + q.shape[1:], q.dtype)])
    lim_pad = jnp.concatenate([limits, jnp.zeros((1, t), limits.dtype)])
    qn = einops.rearrange(q_pad[seq_idx], "n c t (k g) d -> n c t k g d", k=kh)
    lim = lim_pad[seq_idx]
  scores = jnp.einsum("nctkgd,nskd->nkgcts", qn, k, preferred_element_type=jnp.float32,
                      precision=_precision(q.dtype)) * scale
  mask = jnp.arange(s) < lim[:, None, None, :, :, None]
  out, l, lse = _attend(scores, mask, v, "nkgcts,nskd->nctkgd", "n k g c t -> n c t k g")
  out = out / l[..., None]
  if is_reshape:
    return (einops.rearrange(out, "n c t k g d -> (n c) t (k g) d"),
            einops.rearrange(lse, "n c t k g -> (n c) t (k g)"))
  own = owner if owner_np is None else owner_np
  if owner_np is not None and (owner_np == n).any():
    # Sequences of empty nodes read a virtual node N: out 0, lse -inf.
    out = jnp.concatenate([out, jnp.zeros((1,) + out.shape[1:], out.dtype)])
    lse = jnp.concatenate([lse, jnp.full((1,) + lse.shape[1:], -jnp.inf, lse.dtype)])
  out_b, lse_b = out[own, slot], lse[own, slot]
  return (einops.rearrange(out_b, "b t k g d -> b t (k g) d"),
          einops.rearrange(lse_b, "b t k g -> b t (k g)"))


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
