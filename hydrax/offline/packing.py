"""Prepacking: the unique suffixes of a batch packed into rows instead of padded to the longest.

  pack(lengths, *, width=None) -> Packing                    first-fit-decreasing bin packing
  pack_tokens(tokens, lengths, starts, packing) -> (tokens, segment_ids, positions)   [R,W]
  unpack(x, packing, lengths, capacity) -> [B,S,...]
  packed_attention(q, k, v, segment_ids, levels, *, scale=None, backend="auto", attend=None)
      -> (out [R,W,H,D], lse [R,W,H])

Axis letters: B sequences, S a suffix's padded length, R packed rows, W tokens per row, H query
heads, K KV heads (G = H / K), D head dim, N nodes of a shared level.

Padded prefill of B suffixes of lengths l_b runs B x max(l) token slots; packed, the suffixes
sit one after another in R rows of W >= max(l) slots (bin packing, first fit by decreasing
length: R is within 11/9 of the optimum plus one), so about sum(l) slots run. Each packed
token keeps its sequence id (`segment_ids`, -1 for padding) and its own RoPE position (its
sequence's suffix start + its index in the suffix: positions restart per segment). Its keys
are its sequence's tree path (every key of its node at each shared level: all of them come
before it) and, causally, the tokens of its own segment: `packed_attention` computes exactly
that, the shared levels through `hydragen_attention` (one query per packed token, owner = its
sequence's node) and the in-row part with a block-diagonal causal mask, merged by LSE.
Padding slots get out = 0 and lse = -inf.

In the engine: `llama.forward(model, tokens [R,W], positions [R,W], cache, segments=...)`
runs packed tokens through the model (the attention layer calls `packed_attention` with its
`attend=` hook for the levels: the sequences' shared nodes and, unless `fresh`, the keys their
caches already hold) and appends each token's keys to its sequence's suffix cache
[L,B,S,K,D] at (segment, cache length + index in the segment) by one scatter per layer.
`engine.generate(..., prefill="auto" | "packed" | "padded")` packs the unique suffixes of a
batch per data shard (`engine.layout`: rows bucketed into the compile `Signature`; prefill
steps take whole rows, so the width must be <= prefill_chunk); "auto" packs when that runs
fewer token slots. `python -m hydrax.generate --prefill` passes it on.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import jax.numpy as jnp
import numpy as np
from jax import lax

from hydrax.attention import KVLevel, hydragen_attention, merge


class Packing(NamedTuple):
  """Where each sequence's suffix sits: row[b], offset[b] (first column); R rows of W slots.
  Zero-length suffixes get row 0, offset 0 and occupy nothing."""
  row: np.ndarray
  offset: np.ndarray
  rows: int
  width: int

  @property
  def slots(self) -> int:
    return self.rows * self.width


def pack(lengths, *, width: Optional[int] = None) -> Packing:
  """First-fit-decreasing packing of suffixes of `lengths` [B] into rows of `width` slots
  (default: the longest suffix; it must be >= it). Deterministic (ties by index)."""
  lengths = np.asarray(lengths, np.int64)
  if lengths.ndim != 1 or (lengths.size and lengths.min() < 0):
    raise ValueError(f"lengths must be a 1-D array of ints >= 0, got {lengths!r}")
  longest = int(lengths.max(initial=0))
  width = max(longest, 1) if width is None else int(width)
  if width < max(longest, 1):
    raise ValueError(f"width={width} is shorter than the longest suffix ({longest} tokens)")
  row = np.zeros(lengths.shape, np.int64)
  offset = np.zeros(lengths.shape, np.int64)
  used: list = []
  for b in np.argsort(-lengths, kind="stable"):
    n = int(lengths[b])
    if n == 0:
      continue
    for r, u in enumerate(used):
      if u + n <= width:
        row[b], offset[b] = r, u
        used[r] += n
        break
    else:
      row[b], offset[b] = len(used), 0
      used.append(n)
  return Packing(row.astype(np.int32), offset.astype(np.int32), max(len(used), 1), width)


def _slots(packing: Packing, lengths):
  """(sequence, index, row, column) of every packed token, NumPy int arrays."""
  lengths = np.asarray(lengths, np.int64)
  seq = np.repeat(np.arange(lengths.size), lengths)
  index = np.arange(seq.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
  return seq, index, packing.row[seq], packing.offset[seq] + index


def pack_tokens(tokens, lengths, starts, packing: Packing):
  """Packed rows of padded suffixes tokens [B,S] (valid lengths [B], RoPE start [B]):
  (tokens [R,W] int32 (0 in padding), segment_ids [R,W] int32 (-1 in padding),
  positions [R,W] int32 (starts[b] + index; 0 in padding)). NumPy in, NumPy out."""
  tokens = np.asarray(tokens)
  starts = np.asarray(starts, np.int64)
  seq, index, row, col = _slots(packing, lengths)
  # Flat indices: one 1-D gather and 1-D scatters run about 3x faster than 2-D fancy indexing
  # (this runs for every batch the offline scheduler sizes).
  shape = (packing.rows, packing.width)
  slot = row * packing.width + col
  out = np.zeros(shape, np.int32)
  seg = np.full(shape, -1, np.int32)
  pos = np.zeros(shape, np.int32)
  out.reshape(-1)[slot] = tokens.reshape(-1)[seq * tokens.shape[-1] + index]
  seg.reshape(-1)[slot] = seq
  pos.reshape(-1)[slot] = starts[seq] + index
  return out, seg, pos


def unpack(x, packing: Packing, lengths, capacity: int):
  """x [R,W,...] packed -> [B,capacity,...] per sequence (zeros past its length)."""
  lengths = np.asarray(lengths, np.int64)
  seq, index, row, col = _slots(packing, lengths)
  out = jnp.zeros((lengths.size, capacity) + tuple(x.shape[2:]), x.dtype)
  return out.at[seq, index].set(x[row, col])


def _in_row(q, k, v, segment_ids, scale):
  """Attention of each packed token over the earlier tokens of its own segment (itself
  included): out [R,W,H,D] float32, lse [R,W,H] float32 (-inf where none: padding). Products
  in the inputs' dtype with float32 accumulation (float32 inputs at full precision: GPUs
  would otherwise round them to TF32), as the XLA backend does."""
  r, w, h, d = q.shape
  kh = k.shape[2]
  g = h // kh
  precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else lax.Precision.DEFAULT
  scores = jnp.einsum("rqkgd,rskd->rkgqs", q.reshape(r, w, kh, g, d), k,
                      preferred_element_type=jnp.float32, precision=precision) * scale
  seg = jnp.asarray(segment_ids)
  col = jnp.arange(w)
  visible = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0) & \
      (col[None, None, :] <= col[None, :, None])                       # [R, Wq, Wk]
  scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
  m = jnp.max(scores, axis=-1, keepdims=True)
  m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(scores - m_safe)
  total = p.sum(-1)
  out = jnp.einsum("rkgqs,rskd->rqkgd", p.astype(v.dtype), v,
                   preferred_element_type=jnp.float32, precision=precision)
  out = out / jnp.maximum(jnp.moveaxis(total, -1, 1), 1e-30)[..., None]
  lse = jnp.where(total > 0, jnp.log(jnp.maximum(total, 1e-30)) + m_safe[..., 0], -jnp.inf)
  return out.reshape(r, w, h, d), jnp.moveaxis(lse, -1, 1).reshape(r, w, h)


def packed_attention(q, k, v, segment_ids, levels: Sequence[KVLevel] = (), *,
                     scale: Optional[float] = None, backend="auto", attend=None):
  """Exact attention of packed suffix tokens over their tree paths and their own segments.

  q [R,W,H,D], k, v [R,W,K,D]: the packed tokens' queries, keys and values (RoPE applied at
  their restarted positions). segment_ids [R,W] int32: the sequence of each slot, -1 for
  padding; a segment's tokens are contiguous and in order within its row. levels: keys every
  token of a sequence sees in full before its segment's own tokens: the shared levels of the
  batch's plan, KVLevel(k [N,S,K,D], v, lengths [N], owner [B]) with owner the node of each
  sequence, or owner None for a level of one node per sequence (node b is sequence b, e.g.
  keys already in the sequences' caches). A NumPy segment_ids lets the backends group the
  levels statically.
  attend: None (the levels through `hydragen_attention(..., causal_last=False, scale=scale,
    backend=backend)`), or a callable attend(q [R*W,1,H,D], levels) -> (out, lse) computing
    the same with one query per packed token (the levels' owners are then per token), at the
    same scale (`llama.forward` passes its `attend=` hook here).
  Returns out [R,W,H,D] in q's dtype and lse [R,W,H] float32 (out 0, lse -inf in padding).
  """
  r, w, h, d = q.shape
  if k.shape[:2] != (r, w) or v.shape != k.shape:
    raise ValueError(f"k and v must be [R,W,K,D] with R,W = {(r, w)} of q, got "
                     f"{tuple(k.shape)} and {tuple(v.shape)}")
  if tuple(np.shape(segment_ids)) != (r, w):
    raise ValueError(f"segment_ids must have shape [R,W] = {(r, w)}, got "
                     f"{tuple(np.shape(segment_ids))}")
  scale = float(d) ** -0.5 if scale is None else scale
  parts = [_in_row(q, k, v, segment_ids, scale)]
  if levels:
    static = isinstance(segment_ids, np.ndarray)
    # Padding slots read sequence 0's path (any valid one); their results are zeroed below.
    seg = np.maximum(segment_ids, 0).reshape(-1) if static else \
        jnp.maximum(jnp.asarray(segment_ids), 0).reshape(-1)
    per_token = []
    for level in levels:
      if level.owner is None:
        owner = seg
      elif static and isinstance(level.owner, np.ndarray):
        owner = np.asarray(level.owner)[seg]
      else:
        owner = jnp.asarray(level.owner)[seg]
      per_token.append(level._replace(owner=owner))
    q_tokens = q.reshape(r * w, 1, h, d)          # one query per packed token
    if attend is None:
      out, lse = hydragen_attention(q_tokens, per_token, causal_last=False, scale=scale,
                                    backend=backend)
    else:
      out, lse = attend(q_tokens, per_token)
    parts.append((out.astype(jnp.float32).reshape(r, w, h, d), lse.reshape(r, w, h)))
  out, lse = merge(parts)
  pad = (jnp.asarray(segment_ids) < 0)
  out = jnp.where(pad[..., None, None], 0.0, out)
  lse = jnp.where(pad[..., None], -jnp.inf, lse)
  return out.astype(q.dtype), lse


def padding_ratio(lengths, packing: Packing) -> float:
  """Token slots of padded prefill (B x longest) over packed slots (R x W)."""
  lengths = np.asarray(lengths)
  return lengths.size * max(int(lengths.max(initial=0)), 1) / packing.slots


