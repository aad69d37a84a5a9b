"""Per-sequence path attention: every level of a decode call in one Pallas (Triton) launch.

Axis letters: B sequences, T queries per sequence, H = K*G query heads, K KV heads, D head dim,
N nodes of a level, S a level's key capacity, L layers of a stacked cache, Lv levels, R = T*G
query rows of one sequence and KV head (Rp: padded to a power of two >= 16), P key splits.

The grouped kernel of `pallas_gpu` stacks the queries of all sequences of a shared node into
one product (Hydragen) and runs the levels as separate launches, with XLA work around each
(row packing, tile bounds, split merges, the level merge): at small shapes (short prefixes,
few sequences) those fixed costs are most of the call, and attention with the prefix copied
per sequence is faster (H200: 45 us against torch SDPA's 24 us at 1K/16;
experiments/results/fused_h200/). This kernel is the small-shape path: program (b, kh, p)
walks sequence b's path through the tree (its node at each level: `owner[b]`, or b on a
per-sequence level) and attends, for KV head kh, the p-th key split of every level with one
online softmax across the levels, so the parts merge in registers and nothing is sorted or
tiled. The prefix is read once per sequence, as with the prefix copied, but without the copy
(re-reads of a short prefix by neighbouring programs hit L2). One launch, plus one XLA fusion
to merge the key splits when P > 1.

Which path runs is the pallas backend's cost rule (`pallas_gpu.all_levels`): this one when
the bytes that sharing would save stay under `Config.path_crossover_bytes`.

Keys past a row's limit never reach the output: loads are masked below the largest limit of
the program's rows (<= the node's length <= S) and scores at or past each row's own limit are
-inf before the exponent. A row that sees no key gets out = 0 and lse = -inf.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from hydrax.attention import xla
from hydrax.attention.merge import merge

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
MAX_ROWS = 64        # R = T*G per program: decode (T = 1) and short query chunks
DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


class PathPlan(NamedTuple):
  """Static facts of one call (part of the compile key)."""
  rows: int              # R = T*G
  rows_padded: int       # Rp
  block_n: int           # keys per block
  splits: int            # P
  blocks_per_split: tuple  # per level: key blocks of a split
  num_warps: int
  num_stages: int


def _pow2_at_least(x: int, low: int = 16) -> int:
  return max(low, 1 << max(0, int(x) - 1).bit_length())


def unsupported_reason(q_shape, dtype, kv_heads: int) -> Optional[str]:
  """Why this kernel cannot take the call, or None."""
  _, t, h, d = q_shape
  if dtype not in DTYPES:
    return f"dtype {dtype} (the kernel takes bfloat16, float16, float32)"
  if t * (h // kv_heads) > MAX_ROWS:
    return f"T*G = {t * (h // kv_heads)} query rows per sequence (at most {MAX_ROWS})"
  if d < 16 or d & (d - 1):
    return f"head dim D = {d} (a power of two >= 16)"
  return None


def make_plan(q_shape, kv_heads: int, capacities: Sequence[int], *, num_sms: int,
              block_n: int = 64, num_warps: int = 4, num_stages: int = 2,
              splits: Optional[int] = None, programs_per_sm: int = 2,
              min_blocks_per_split: int = 2) -> PathPlan:
  """Block size, key splits and launch settings. Splits: enough programs (B*K*P) for
  `programs_per_sm` on every SM, each split >= `min_blocks_per_split` key blocks of the
  longest level (None); `splits` forces P."""
  b, t, h, _ = q_shape
  rows = t * (h // kv_heads)
  blocks = [max(1, -(-s // block_n)) for s in capacities]
  if splits is None:
    want = -(-num_sms * programs_per_sm // max(1, b * kv_heads))
    splits = max(1, min(want, max(blocks) // min_blocks_per_split))
  splits = max(1, min(int(splits), max(blocks)))
  return PathPlan(rows, _pow2_at_least(rows), block_n, splits,
                  tuple(-(-nb // splits) for nb in blocks), num_warps, num_stages)


def _kernel(*refs, plan: PathPlan, levels: int, scale_log2: float, exact: bool):
  """Program (b, kh, p): refs are nodes [Lv,B] int32 (node of each sequence, the layer's
  offset added), row limits [Lv,B,Rp] int32, q [B,K,Rp,D], then k, v [N',S,K,D] per level,
  then out [P,B,K,Rp,D] f32 and lse [P,B,K,Rp] f32."""
  node_ref, lim_ref, q_ref = refs[:3]
  kv_refs = refs[3:3 + 2 * levels]
  o_ref, lse_ref = refs[3 + 2 * levels:]
  nb = q_ref.shape[0]
  pid = pl.program_id(0)
  b = lax.rem(pid, nb)                      # sequences fastest: neighbours read one prefix
  rest = lax.div(pid, nb)
  kh = lax.rem(rest, q_ref.shape[1])
  split = lax.div(rest, q_ref.shape[1])
  rp, bn = plan.rows_padded, plan.block_n
  precision = lax.Precision.HIGHEST if exact else lax.Precision.DEFAULT
  q = q_ref[b, kh, :, :]
  d = q.shape[-1]
  carry = (jnp.full((rp,), -jnp.inf, jnp.float32), jnp.zeros((rp,), jnp.float32),
           jnp.zeros((rp, d), jnp.float32))

  for lvl in range(levels):
    k_ref, v_ref = kv_refs[2 * lvl], kv_refs[2 * lvl + 1]
    node = node_ref[lvl, b]
    lim = lim_ref[lvl, b, :]                       # [Rp]; padded rows have limit 0
    hi = jnp.max(lim)

    def step(blk, carry, k_ref=k_ref, v_ref=v_ref, node=node, lim=lim, hi=hi):
      m, l, acc = carry
      s0 = blk * bn
      keys = s0 + jnp.arange(bn, dtype=jnp.int32)
      kv_ok = (keys < hi)[:, None]                 # hi <= length <= S: no load past S
      ksl = pl.ds(s0, bn)
      kb = plt.load(k_ref.at[node, ksl, kh, :], mask=kv_ok, other=0)
      vb = plt.load(v_ref.at[node, ksl, kh, :], mask=kv_ok, other=0)
      s = lax.dot_general(q, kb, (((1,), (1,)), ((), ())), precision=precision,
                          preferred_element_type=jnp.float32) * scale_log2
      s = jnp.where(keys[None, :] < lim[:, None], s, -jnp.inf)
      m_new = jnp.maximum(m, jnp.max(s, axis=1))
      m_use = jnp.where(m_new > -jnp.inf, m_new, 0.0)
      alpha = jnp.exp2(m - m_use)
      p = jnp.exp2(s - m_use[:, None])
      pv = lax.dot_general(p.astype(vb.dtype), vb, (((1,), (0,)), ((), ())),
                           precision=precision, preferred_element_type=jnp.float32)
      return m_new, l * alpha + jnp.sum(p, axis=1), acc * alpha[:, None] + pv

    bps = plan.blocks_per_split[lvl]
    first = split * bps
    end = jnp.minimum(first + bps, lax.div(hi + bn - 1, bn))
    carry = lax.fori_loop(first, jnp.maximum(end, first), step, carry)

  m, l, acc = carry
  has = l > 0
  l_safe = jnp.where(has, l, 1.0)
  o_ref[split, b, kh, :, :] = acc / l_safe[:, None]
  lse_ref[split, b, kh, :] = jnp.where(has, (m + jnp.log2(l_safe)) * LN2, -jnp.inf)


def _merge_splits(out, lse):
  """out [P,...,D], lse [P,...] -> the LSE merge over P."""
  if out.shape[0] == 1:
    return out[0], lse[0]
  return merge([(out[i], lse[i]) for i in range(out.shape[0])])


@functools.partial(jax.jit, static_argnames=("plan", "scale", "interpret"))
def _forward(q, kvs, nodes, limits, *, plan: PathPlan, scale: float, interpret: bool):
  """q [B,T,H,D]; kvs per level (k, v) [N',S,K,D]; nodes [Lv,B] int32; limits per level
  [B,T] int32. Returns out [B,T,H,D] f32 and lse [B,T,H] f32."""
  b, t, h, d = q.shape
  kh = kvs[0][0].shape[-2]
  g = h // kh
  r, rp = plan.rows, plan.rows_padded
  # Rows of (b, kh): (t, g). For T = 1 the reshape is free; the pad is one small fusion.
  qp = q.reshape(b, t, kh, g, d).transpose(0, 2, 1, 3, 4).reshape(b, kh, r, d)
  qp = jnp.pad(qp, ((0, 0), (0, 0), (0, rp - r), (0, 0)))
  lims = jnp.stack([jnp.repeat(lim.astype(jnp.int32), g, axis=1) for lim in limits])
  lims = jnp.pad(lims, ((0, 0), (0, 0), (0, rp - r)))
  args = [nodes, lims, qp]
  for k, v in kvs:
    args += [k, v]
  out_shape = [jax.ShapeDtypeStruct((plan.splits, b, kh, rp, d), jnp.float32),
               jax.ShapeDtypeStruct((plan.splits, b, kh, rp), jnp.float32)]
  o, lse = pl.pallas_call(
      functools.partial(_kernel, plan=plan, levels=len(kvs), scale_log2=scale * LOG2E,
                        exact=q.dtype == jnp.float32),
      grid=(b * kh * plan.splits,),
      out_shape=out_shape,
      compiler_params=None if interpret else plt.CompilerParams(
          num_warps=plan.num_warps, num_stages=plan.num_stages),
      interpret=interpret,
      name="hydrax_path_attention",
  )(*args)
  o, lse = _merge_splits(o, lse)
  o = o[:, :, :r].reshape(b, kh, t, g, d).transpose(0, 2, 1, 3, 4).reshape(b, t, h, d)
  lse = lse[:, :, :r].reshape(b, kh, t, g).transpose(0, 2, 1, 3).reshape(b, t, h)
  return o, lse


def _flat_nodes(levels, b: int):
  """(k, v) per level as [N',S,K,D] (a stacked [L,N,S,K,D] cache seen as L*N nodes: a
  reshape, no copy) and nodes [Lv,B] int32 (owner, or b on a per-sequence level, plus
  layer * N on a stacked one)."""
  kvs, nodes = [], []
  for lv in levels:
    k, v = lv.k, lv.v
    n = k.shape[-4]
    node = (jnp.arange(b, dtype=jnp.int32) if lv.owner is None
            else jnp.asarray(lv.owner, jnp.int32).reshape(b))
    if lv.layer is not None:
      node = node + jnp.asarray(lv.layer, jnp.int32) * n
      k = k.reshape((-1,) + k.shape[2:])
      v = v.reshape((-1,) + v.shape[2:])
    kvs.append((k, v))
    nodes.append(node)
  return kvs, jnp.stack(nodes)


def _xla_reference(q, levels, limits, scale):
  """(out, lse) of the levels through the XLA backend: the backward pass recomputes this."""
  parts = []
  for lv, lim in zip(levels, limits):
    lv = lv.layer_view()
    parts.append(xla.level_attention(q, lv.k, lv.v, lv.lengths, lv.owner, lim, scale=scale))
  return merge(parts)


def path_attention(q, levels, limits, *, scale: float, plan: PathPlan, interpret: bool):
  """Every level of a call through the path kernel: levels are KVLevels (stacked caches read
  at their layer, in place), limits per level [B,T] int32. Returns out [B,T,H,D] f32 and lse
  [B,T,H] f32. Differentiable: the backward pass recomputes the levels with XLA."""
  levels = list(levels)
  b = q.shape[0]

  def impl(q, levels, limits):
    kvs, nodes = _flat_nodes(levels, b)
    return _forward(q, kvs, nodes, limits, plan=plan, scale=float(scale), interpret=interpret)

  f = jax.custom_vjp(impl)

  def fwd(q, levels, limits):
    return impl(q, levels, limits), (q, levels, limits)

  def bwd(res, cts):
    q, levels, limits = res
    _, vjp = jax.vjp(lambda q, kv: _xla_reference(
        q, [lv._replace(k=k, v=v) for lv, (k, v) in zip(levels, kv)], limits, scale),
        q, [(lv.k, lv.v) for lv in levels])
    dq, dkv = vjp(cts)
    # None: a zero cotangent (lengths, owners, layers and limits are integers).
    dlevels = [lv._replace(k=dk, v=dv, lengths=None, owner=None, layer=None)
               for lv, (dk, dv) in zip(levels, dkv)]
    return dq, dlevels, [None] * len(limits)

  f.defvjp(fwd, bwd)
  return f(q, levels, [jnp.asarray(x, jnp.int32) for x in limits])
