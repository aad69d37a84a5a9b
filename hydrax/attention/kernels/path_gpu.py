"""Per-sequence path attention: every level of a decode call in one Pallas (Triton) launch.

Axis letters: B sequences, T queries per sequence, H = K*G query heads, K KV heads, D head dim,
N nodes of a level, S a level's key capacity, L layers of a stacked cache, Lv levels, R = T*G
query rows of one sequence and KV head (Rp: padded to a power of two >= 16), P key splits.

The grouped kernel of `pallas_gpu` stacks the queries of all sequences of a shared node into
one product (Hydragen) and runs the levels as separate launches, with XLA work around each
(row packing, tile bounds, split merges, the level merge): at small shapes (short prefixes,
few sequences) those fixed costs are most of the call, and attention with the prefix copied
per sequence is faster (H200: 45 us against torch SDPA's 24 us at 1K/16;
experiments/results/fused_h200/run4). This kernel is the small-shape path: program (b, kh, p)
walks sequence b's path through the tree (its node at each level: `owner[b]`, or b on a
per-sequence level) and attends, for KV head kh, the p-th key split of every level with one
online softmax across the levels, so the parts merge in registers and nothing is sorted or
tiled. The prefix is read once per sequence, as with the prefix copied, but without the copy
(re-reads of a short prefix by neighbouring programs hit L2). One launch: queries, limits,
owners and the stacked caches are read as they are (rows past R and keys past a limit are
masked), and with one key split the kernel writes out and lse in their final layout, so a
decode call (T = 1) with enough sequences runs nothing else; key splits (when B*K programs
are fewer than two an SM) add one XLA fusion that merges them.

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
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from hydrax.attention import xla
from hydrax.attention.kernels import flash

MAX_ROWS = 64        # R = T*G per program: decode (T = 1) and short query chunks
MIN_TILE_ROWS = 16   # the smallest row count of a Triton matrix product
# A program walks each level once per sequence of its group (a loop each, unrolled), so the
# compile time grows with the group: 16 sequences of 3 levels took XLA over 3 minutes on the
# H200 (run 9); groups chosen automatically stop at 4.
MAX_AUTO_GROUP = 4
DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


class PathPlan(NamedTuple):
  """Static facts of one call (part of the compile key)."""
  rows: int              # R = T*G
  rows_padded: int       # M = group * seq_rows: a program's query rows
  block_n: int           # keys per block
  splits: int            # P
  blocks_per_split: tuple  # per level: key blocks of a split
  num_warps: int
  num_stages: int
  group: int = 1         # C, consecutive sequences a program takes
  seq_rows: int = 16     # Rs, rows of one sequence in the tile (R padded to a power of two)


class LevelSpec(NamedTuple):
  """Static facts of one level for the kernel: its refs and how a program finds its node."""
  has_owner: bool        # node = owner[b] (else b: a per-sequence level)
  stacked: bool          # k, v [L*N,S,K,D]: node + layer * N
  nodes: int             # N


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
              min_blocks_per_split: int = 4, group: Optional[int] = None) -> PathPlan:
  """Sequences a program takes, block size, key splits and launch settings.

  Group C: a Triton product takes at least 16 query rows, and a decode sequence has R = G
  of them (4 for Llama's 32/8 heads), so one sequence a program leaves 3/4 of every product
  idle and reads each shared block once per sequence (from L2: 75 MB at 1K/16 for 12.6 MB
  of distinct keys). C = 16 // Rs consecutive sequences (at most MAX_AUTO_GROUP) fill the
  rows and read a node they share once. On the H200 that did not make the kernel faster
  (run 9: 18.0 us at 1K/16 against 17.3 us with one sequence a program; the kernel is bound
  by its loops' latency, not by L2), so the pallas backend passes C = 1
  (`Config.path_group`); `group` None picks C as above.

  Splits: while programs (ceil(B / C) * K) are fewer than `programs_per_sm` on every SM,
  enough splits for that many, each >= `min_blocks_per_split` key blocks of the longest
  level. A program walks its keys one block after another, so one program an SM leaves HBM
  idle (H200, B 16, K 8: one sequence a program without splits took 60.7 us at a 1K prefix
  and 138.5 us at 4K, with three splits 35.6 and 76.6 us; experiments/results/fused_h200
  runs 6 and 7); a split costs an XLA merge of the partial results, a few microseconds at
  these sizes. `splits` forces P."""
  b, t, h, _ = q_shape
  rows = t * (h // kv_heads)
  natural = flash.pow2_at_least(rows, low=1)
  if group is None:
    group = max(1, min(MAX_AUTO_GROUP, MIN_TILE_ROWS // natural))
  if group < 1 or group & (group - 1):
    raise ValueError(f"group must be a power of two >= 1 (Triton tiles), got {group}")
  group = min(int(group), flash.pow2_at_least(b, low=1))   # M stays a power of two
  seq_rows = max(natural, -(-MIN_TILE_ROWS // group))
  seq_rows = flash.pow2_at_least(seq_rows, low=1)
  blocks = [max(1, -(-s // block_n)) for s in capacities]
  if splits is None:
    programs = max(1, -(-b // group) * kv_heads)
    want = -(-programs_per_sm * num_sms // programs)
    splits = max(1, min(want, max(blocks) // min_blocks_per_split))
  splits = max(1, min(int(splits), max(blocks)))
  return PathPlan(rows, group * seq_rows, block_n, splits,
                  tuple(-(-nb // splits) for nb in blocks), num_warps, num_stages, group,
                  seq_rows)


def _kernel(*refs, plan: PathPlan, specs: tuple, queries: int, scale_log2: float,
            exact: bool, batch: int, kv_heads: int):
  """Program (g, kh, p): sequences g*C .. g*C+C-1, KV head kh, key split p. Refs: q
  [B*K*R, D] (row (b, kh, r) at (b*K + kh)*R + r); per level its owner [B] int32
  (has_owner), its layer [1] int32 (stacked), its lengths [N] (T = 1) or limits [B*R] per
  row int32, k, v [N',S,K,D]; then out and lse: [B*K*R, D] in q's dtype and [B*K*R] f32
  when P = 1 (for T = 1 these are out [B,1,H,D] and lse [B,1,H] as they are), else
  [P*B*K*R, D] and [P*B*K*R] f32 partials.

  The tile's M = C*Rs rows are row row % Rs of sequence g*C + row // Rs, both clamped
  (past R to R-1, past B to B-1): a padding row repeats a real row of the program, with its
  query, node and limit, so it computes the same values and stores them to the same place
  (no masks, and no two stores of one address with different values: Pallas' interpret
  mode writes such duplicates in no defined order). Per level, the program walks the key
  blocks of each distinct node among its sequences once (a sequence whose node an earlier
  one of the group has is skipped), the rows of other nodes masked out of those blocks."""
  q_ref, refs = refs[0], list(refs[1:])
  o_ref, lse_ref = refs[-2:]
  c, rs, r, bn = plan.group, plan.seq_rows, plan.rows, plan.block_n
  groups = -(-batch // c)
  pid = pl.program_id(0)
  grp = lax.rem(pid, groups)                # groups fastest: neighbours read one prefix
  rest = lax.div(pid, groups)
  kh = lax.rem(rest, kv_heads)
  split = lax.div(rest, kv_heads)
  row = jnp.arange(plan.rows_padded, dtype=jnp.int32)
  first_b = grp * c
  b_row = jnp.minimum(first_b + lax.div(row, rs), batch - 1)
  r_row = jnp.minimum(lax.rem(row, rs), r - 1)
  flat = (b_row * kv_heads + kh) * r + r_row             # row of q, out and lse
  precision = lax.Precision.HIGHEST if exact else lax.Precision.DEFAULT
  # Rows gathered by index (a [M, 1] and a [1, D] index array: interpret mode takes arrays
  # or slices, not both).
  cols = jnp.arange(q_ref.shape[1], dtype=jnp.int32)[None, :]
  q = plt.load(q_ref.at[flat[:, None], cols])
  carry = flash.initial_carry(plan.rows_padded, q.shape[-1])
  seqs = [jnp.minimum(first_b + j, batch - 1) for j in range(c)]
  live = [first_b + j < batch for j in range(c)]

  pos = 0
  for lvl, spec in enumerate(specs):
    # Each sequence's node (local, and in the cache: moved by the layer when stacked).
    found = [flash.level_node(refs, pos, s, s, mapped=spec.has_owner, stacked=spec.stacked,
                              nodes=spec.nodes) for s in seqs]
    nodes = [f[0] for f in found]
    row_node = plt.load(refs[pos].at[b_row]) if spec.has_owner else b_row
    pos = found[0][2]
    lim_ref, k_ref, v_ref = refs[pos:pos + 3]
    pos += 3
    if queries == 1:                               # lengths [N]: see `_level_args`
      lim = plt.load(lim_ref.at[row_node])
    else:
      lim = plt.load(lim_ref.at[b_row * r + r_row])
    bps = plan.blocks_per_split[lvl]
    first = split * bps

    for j in range(c):
      mine = row_node == nodes[j]
      active = live[j]
      if spec.has_owner:                           # an earlier sequence walked this node
        for i in range(j):
          active = active & (nodes[i] != nodes[j])
      lim_j = jnp.where(mine, lim, 0)
      hi = jnp.where(active, jnp.max(lim_j), 0)
      node = found[j][1]

      def step(blk, carry, k_ref=k_ref, v_ref=v_ref, node=node, lim_j=lim_j, hi=hi):
        s0 = blk * bn
        keys = s0 + jnp.arange(bn, dtype=jnp.int32)
        kv_ok = (keys < hi)[:, None]               # hi <= length <= S: no load past S
        ksl = pl.ds(s0, bn)
        kb = plt.load(k_ref.at[node, ksl, kh, :], mask=kv_ok, other=0)
        vb = plt.load(v_ref.at[node, ksl, kh, :], mask=kv_ok, other=0)
        return flash.softmax_step(carry, q, kb, vb, scale_log2=scale_log2,
                                  precision=precision,
                                  visible=keys[None, :] < lim_j[:, None])

      end = jnp.minimum(first + bps, lax.div(hi + bn - 1, bn))
      carry = lax.fori_loop(first, jnp.maximum(end, first), step, carry)

  out, lse = flash.finish(carry)
  if plan.splits > 1:
    flat = flat + split * (batch * kv_heads * r)
  plt.store(o_ref.at[flat[:, None], cols], out.astype(o_ref.dtype))
  plt.store(lse_ref.at[flat], lse)


@functools.partial(jax.jit, static_argnames=("plan", "specs", "scale", "interpret"))
def _forward(q, level_args, *, plan: PathPlan, specs: tuple, scale: float, interpret: bool):
  """q [B,T,H,D]; level_args per level: (owner [B] or None, layer [1] or None, limits [B,T],
  k, v [N',S,K,D]). Returns out [B,T,H,D] (q's dtype when P = 1, else f32) and lse [B,T,H]
  f32. For T = 1 nothing but the kernel runs when P = 1 (the reshapes are free)."""
  b, t, h, d = q.shape
  kh = level_args[0][3].shape[-2]
  g = h // kh
  r = plan.rows
  qp = q.reshape(b, t, kh, g, d)
  if t > 1:
    qp = qp.transpose(0, 2, 1, 3, 4)
  args = [qp.reshape(b * kh * r, d)]
  for owner, layer, lim, k, v in level_args:
    if t > 1:     # limits per row (t, g): a small XLA op, only for multi-query calls
      lim = jnp.repeat(lim, g, axis=1).reshape(b * r)
    args += [x for x in (owner, layer) if x is not None] + [lim, k, v]
  rows = plan.splits * b * kh * r
  out_shape = [jax.ShapeDtypeStruct((rows, d), q.dtype if plan.splits == 1 else jnp.float32),
               jax.ShapeDtypeStruct((rows,), jnp.float32)]
  o, lse = pl.pallas_call(
      functools.partial(_kernel, plan=plan, specs=specs, queries=t,
                        scale_log2=scale * flash.LOG2E, exact=q.dtype == jnp.float32,
                        batch=b, kv_heads=kh),
      grid=(-(-b // plan.group) * kh * plan.splits,),
      out_shape=out_shape,
      compiler_params=None if interpret else plt.CompilerParams(
          num_warps=plan.num_warps, num_stages=plan.num_stages),
      interpret=interpret,
      name="hydrax_path_attention",
  )(*args)
  if plan.splits > 1:
    o, lse = flash.combine_splits(o.reshape(plan.splits, b * kh * r, d),
                                  lse.reshape(plan.splits, b * kh * r))
  o = o.reshape(b, kh, t, g, d)
  lse = lse.reshape(b, kh, t, g)
  if t > 1:
    o, lse = o.transpose(0, 2, 1, 3, 4), lse.transpose(0, 2, 1, 3)
  return o.reshape(b, t, h, d), lse.reshape(b, t, h)


def _level_args(levels, limits, b: int, t: int):
  """Per level the kernel's inputs (owner [B] or None, layer [1] or None, limits, k, v) with
  a stacked [L,N,S,K,D] cache seen as [L*N,S,K,D] (a reshape, no copy), and its LevelSpec.

  For T = 1 the level's lengths [N] stand in for its limits: `hydragen_attention`'s limit of
  a single query is its node's length (bottom-right causal: min(length, keys from this level
  on) = length), so the kernel reads lengths[node] and the limits' arithmetic is dead code
  that XLA drops: the call is the kernel launch alone."""
  args, specs = [], []
  for lv, lim in zip(levels, limits):
    if t == 1:
      lim = jnp.asarray(lv.lengths, jnp.int32)
    k, v = lv.k, lv.v
    n = k.shape[-4]
    owner = None if lv.owner is None else jnp.asarray(lv.owner, jnp.int32).reshape(b)
    layer = None
    if lv.layer is not None:
      layer = jnp.asarray(lv.layer, jnp.int32).reshape(1)
      k = k.reshape((-1,) + k.shape[2:])
      v = v.reshape((-1,) + v.shape[2:])
    args.append((owner, layer, lim, k, v))
    specs.append(LevelSpec(owner is not None, layer is not None, n))
  return args, tuple(specs)


def path_attention(q, levels, limits, *, scale: float, plan: PathPlan, interpret: bool):
  """Every level of a call through the path kernel: levels are KVLevels (stacked caches read
  at their layer, in place), limits per level [B,T] int32. Returns out [B,T,H,D] (q's dtype
  or f32) and lse [B,T,H] f32. Differentiable: the backward pass recomputes the levels with
  XLA."""
  levels = list(levels)
  b = q.shape[0]

  def impl(q, levels, limits):
    args, specs = _level_args(levels, limits, b, q.shape[1])
    return _forward(q, args, plan=plan, specs=specs, scale=float(scale), interpret=interpret)

  f = jax.custom_vjp(impl)

  def fwd(q, levels, limits):
    return impl(q, levels, limits), (q, levels, limits)

  def bwd(res, cts):
    q, levels, limits = res
    cts = (cts[0].astype(jnp.float32), cts[1])
    _, vjp = jax.vjp(lambda q, kv: xla.levels_attention(
        q, kv, [lv.lengths for lv in levels], [lv.owner for lv in levels], limits,
        [lv.layer for lv in levels], scale=scale), q, [(lv.k, lv.v) for lv in levels])
    dq, dkv = vjp(cts)
    # None: a zero cotangent (lengths, owners, layers and limits are integers).
    dlevels = [lv._replace(k=dk, v=dv, lengths=None, owner=None, layer=None)
               for lv, (dk, dv) in zip(levels, dkv)]
    return dq, dlevels, [None] * len(limits)

  f.defvjp(fwd, bwd)
  return f(q, levels, [jnp.asarray(x, jnp.int32) for x in limits])
