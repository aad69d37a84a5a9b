"""Stacked shared-level attention on Hopper, lowered through Mosaic GPU (TMA, wgmma, warp roles).

Axis letters: K KV heads, R rows per KV head (queries of the level's sequences times the G query
heads of a KV head, sorted by node; see `grouping.py`), D head dim (64 or 128), N nodes,
S keys (a node's capacity, S >= block_kv), P key splits, Tn tiles of TILE = 128 rows.

One CTA takes one tile (128 rows of one node), one KV head and one key split. It runs three
warpgroups: two compute warpgroups of 64 rows each and one memory warpgroup that streams the
node's key and value blocks into shared memory with the copy engine (TMA), `stages` blocks
ahead, on barriers. Each compute warpgroup runs the flash-attention loop with wgmma for q k^T
and p v, the online softmax in float32 and base 2 between them; a barrier shared by the two
compute warpgroups alternates their softmax and their tensor-core work (ping-pong).

Masking happens inside: a tile reads its node's keys up to the largest key limit of its rows
(`hi`); blocks below the smallest (`lo`) run unmasked, the others compare each key with the
row's own limit. Rows that see no key give out = 0 and lse = -inf, never NaN. Padding rows of
a tile carry limit 0; in a tile whose smallest real limit lets blocks run unmasked they see
those blocks (finite, unspecified values), so callers drop them. S must be a multiple of
block_kv: jax 0.11.2's Mosaic GPU layout inference failed (an internal assertion) on key-block
slices of a capacity that is not, so callers pad such caches (`pallas_gpu._forward_mosaic`
does, and logs it once).

The tile table `tab` is an input array (compile-time constant or computed at run time: the
caller's choice), so traced owners need no recompilation; a tile with hi = 0 (an unused tile
of a runtime table with a static bound) runs no key block and only writes out = 0, lse = -inf.
A stacked cache [L,N,S,K,D] is passed as [L*N,S,K,D] (a bitcast) with the layer's offset
layer*N in the table's nodes: TMA then reads the layer in place.

Outputs: out [P,K,R,D] in q's dtype (normalised per split), lse [P,K,R] float32, natural log.
The caller merges the P splits through their LSEs (`flash.combine_splits`).

Runs on Hopper (sm_90) GPUs with bf16 or fp16; off GPU it runs in Mosaic GPU interpret mode
(slow; for tests). Callers pick it through `pallas_gpu` (the `pallas` backend) for stacked
shared levels; the Triton kernel there serves everything else and every other GPU.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
BLOCK_Q = 64          # rows per compute warpgroup (the wgmma M)
COMPUTE_WGS = 2
TILE = BLOCK_Q * COMPUTE_WGS
HEAD_DIMS = (64, 128)
DTYPES = (jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
  """Tuning knobs of the Mosaic GPU kernel (defaults: the best of the H200 sweep)."""
  block_kv: int = 128       # keys per block (a multiple of 64)
  stages: int = 2           # key/value blocks in flight (shared memory: see `smem_bytes`)
  splits: Optional[int] = None   # P; None: enough CTAs to fill the GPU
  min_rows_per_node: int = 96    # shared levels with fewer rows per node go to Triton


def smem_bytes(block_kv: int, stages: int, d: int, itemsize: int = 2) -> int:
  """Shared memory of one CTA: q/out tiles, `stages` key and value blocks, limits and lse."""
  return (COMPUTE_WGS * BLOCK_Q * d + 2 * stages * block_kv * d) * itemsize + COMPUTE_WGS * BLOCK_Q * 8


def unsupported_reason(dtype, d: int, block_kv: int) -> Optional[str]:
  """Why the kernel cannot take these inputs (None when it can)."""
  if jnp.dtype(dtype) not in [jnp.dtype(x) for x in DTYPES]:
    return f"dtype {jnp.dtype(dtype).name} (Mosaic GPU kernel: bfloat16, float16)"
  if d not in HEAD_DIMS:
    return f"head dim {d} (Mosaic GPU kernel: {HEAD_DIMS})"
  if block_kv % 64 or block_kv <= 0:
    return f"block_kv {block_kv} (a positive multiple of 64)"
  return None


def _kernel(tab_ref, lim_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, scoped, *, block_kv: int,
            stages: int, blocks_per_split: int, scale_log2: float, interpret: bool):
  """One CTA: tile `tile`, KV head `kvh`, key split `split`; warpgroup `wg` (2 = memory).

  tab [Tn, 4] int32 (node, lo, hi, unused); lim [R] int32; q [K,R,D]; k, v [N,S,K,D];
  o [P,K,R,D]; lse [P,K,R] float32.
  """
  (qo_smem2, k_smem, v_smem, lim_smem2, lse_smem2), bars, free_bars, sched = scoped
  q_bar, lim_bar, k_bar, v_bar = bars
  k_free, v_free = free_bars
  kvh, tile, split = lax.axis_index("kvh"), lax.axis_index("tile"), lax.axis_index("split")
  wg = lax.axis_index("wg")
  dtype = q_ref.dtype
  d = q_ref.shape[-1]
  # Layout hints are for the lowering; the GPU interpreter has no rule for them.
  cast = (lambda x, layout: x) if interpret else plgpu.layout_cast
  node, lo, hi = tab_ref[tile, 0], tab_ref[tile, 1], tab_ref[tile, 2]
  bk = jnp.int32(block_kv)
  b0 = split * blocks_per_split
  b1 = jnp.minimum(b0 + blocks_per_split, lax.div(hi + bk - 1, bk))
  nsteps = jnp.maximum(b1 - b0, 0)
  nfull = jnp.clip(lax.div(lo, bk) - b0, 0, nsteps)     # leading steps that need no mask

  def block_start(step):
    return (b0 + step) * bk

  def sched_barrier():
    plgpu.barrier_arrive(sched)
    plgpu.barrier_wait(sched)

  @pl.when(wg < COMPUTE_WGS)
  def _compute():
    plgpu.set_max_registers(232, action="increase")
    qo_smem, lim_smem, lse_smem = qo_smem2.at[wg], lim_smem2.at[wg], lse_smem2.at[wg]
    row0 = tile * TILE + wg * BLOCK_Q
    plgpu.copy_gmem_to_smem(q_ref.at[kvh, pl.ds(row0, BLOCK_Q)], qo_smem, q_bar.at[wg])
    plgpu.copy_gmem_to_smem(lim_ref.at[pl.ds(row0, BLOCK_Q)], lim_smem, lim_bar.at[wg])
    plgpu.barrier_wait(q_bar.at[wg])
    plgpu.barrier_wait(lim_bar.at[wg])
    row_layout = plgpu.Layout.WGMMA.reduce(1)
    # (a layout_cast right after the read makes the lowering load straight into the row layout)
    lim = cast(lim_smem[...], row_layout)
    m_i = cast(jnp.full((BLOCK_Q,), -jnp.inf, jnp.float32), row_layout)
    l_i = cast(jnp.full((BLOCK_Q,), 0.0, jnp.float32), row_layout)
    acc = cast(jnp.full((BLOCK_Q, d), 0.0, jnp.float32), plgpu.Layout.WGMMA)

    @pl.when(nsteps > 0)
    def _():
      plgpu.barrier_wait(k_bar.at[0])

    pl.when(wg == 1)(sched_barrier)

    def step(i, carry, masked: bool):
      acc, m_i, l_i = carry
      slot = lax.rem(i, jnp.int32(stages))

      def qk_product(acc_ref):
        plgpu.wgmma(acc_ref, qo_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
        sched_barrier()
        return acc_ref[...]

      if interpret:
        # (the GPU interpreter's wgmma cannot read a transposed ref: q k^T in registers)
        s = lax.dot_general(qo_smem[...], k_smem[slot], (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32)
        sched_barrier()
      else:
        s = pl.run_scoped(qk_product, plgpu.ACC((BLOCK_Q, block_kv), jnp.float32))
      plgpu.barrier_arrive(k_free.at[slot])
      if masked:
        keys = cast(lax.broadcasted_iota(jnp.int32, (BLOCK_Q, block_kv), 1),
                    plgpu.Layout.WGMMA) + block_start(i)
        s = jnp.where(keys < lax.broadcast_in_dim(lim, s.shape, [0]), s, -jnp.inf)
      m_new = jnp.maximum(m_i, s.max(axis=1) * scale_log2)
      m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
      alpha = jnp.exp2(m_i - m_use)
      p = jnp.exp2(s * scale_log2 - lax.broadcast_in_dim(m_use, s.shape, [0]))
      acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
      l_i = l_i * alpha + p.sum(axis=1)
      p16 = p.astype(dtype)
      acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
      plgpu.barrier_arrive(sched)
      plgpu.barrier_wait(v_bar.at[slot])
      plgpu.barrier_wait(sched)
      if masked:
        # p is exactly 0 for keys >= hi, but 0 * NaN is NaN in p v: a block that runs past hi
        # (the node's valid keys end inside it) has its value rows >= hi zeroed in shared
        # memory first. Both compute warpgroups do it before their own product; they write
        # the same bits, so neither can read a value that is not finite or not the real one.
        @pl.when(block_start(i) + bk > hi)
        def _():
          for c in range(block_kv // BLOCK_Q):
            part = v_smem.at[slot, pl.ds(c * BLOCK_Q, BLOCK_Q)]
            keys = cast(lax.broadcasted_iota(jnp.int32, (BLOCK_Q, d), 0),
                        plgpu.Layout.WGMMA) + (block_start(i) + c * BLOCK_Q)
            vals = cast(part[...], plgpu.Layout.WGMMA)
            part[...] = jnp.where(keys < hi, vals, jnp.zeros_like(vals))
          plgpu.commit_smem()

      def wait_next_keys():
        nxt = i + 1

        @pl.when(nxt < nsteps)
        def _():
          plgpu.barrier_wait(k_bar.at[lax.rem(nxt, jnp.int32(stages))])

      def pv_product(acc_ref):
        plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
        wait_next_keys()

      if interpret:
        # (the GPU interpreter has no run_state and its wgmma takes no register operand:
        # p v in registers)
        acc = acc + jnp.dot(p16, v_smem[slot], preferred_element_type=jnp.float32)
        wait_next_keys()
      else:
        acc = pl.run_state(pv_product)(plgpu.ACC.init(acc))
      plgpu.barrier_arrive(v_free.at[slot])
      return acc, m_new, l_i

    carry = lax.fori_loop(0, nfull, functools.partial(step, masked=False), (acc, m_i, l_i))
    acc, m_i, l_i = lax.fori_loop(nfull, nsteps, functools.partial(step, masked=True), carry)
    pl.when(wg == 0)(sched_barrier)

    has = l_i > 0.0
    l_safe = jnp.where(has, l_i, 1.0)
    acc = acc * lax.broadcast_in_dim(1.0 / l_safe, acc.shape, [0])
    qo_smem[...] = acc.astype(dtype)
    lse_smem[...] = jnp.where(has, (m_i + jnp.log2(l_safe)) * LN2, -jnp.inf)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(qo_smem, o_ref.at[split, kvh, pl.ds(row0, BLOCK_Q)])
    plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[split, kvh, pl.ds(row0, BLOCK_Q)])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == COMPUTE_WGS)
  def _memory():
    plgpu.set_max_registers(40, action="decrease")

    def load(i, slot):
      sl = (node, pl.ds(block_start(i), block_kv), kvh)
      plgpu.copy_gmem_to_smem(k_ref.at[sl], k_smem.at[slot], k_bar.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[sl], v_smem.at[slot], v_bar.at[slot])

    for i in range(stages):
      pl.when(i < nsteps)(functools.partial(load, jnp.int32(i), i))

    @pl.loop(0, jnp.maximum(nsteps - stages, 0))
    def _(i):
      slot = lax.rem(i, jnp.int32(stages))
      sl = (node, pl.ds(block_start(i + stages), block_kv), kvh)
      plgpu.barrier_wait(k_free.at[slot])
      plgpu.copy_gmem_to_smem(k_ref.at[sl], k_smem.at[slot], k_bar.at[slot])
      plgpu.barrier_wait(v_free.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[sl], v_smem.at[slot], v_bar.at[slot])

    if interpret:
      # (the interpreter checks, when it frees a barrier, that a thread that waited on it saw
      # every phase: take the compute warpgroups' last release of each slot)
      for slot in range(stages):
        @pl.when(slot < nsteps)
        def _():
          plgpu.barrier_wait(k_free.at[slot])
          plgpu.barrier_wait(v_free.at[slot])


def tile_attention(q, k, v, tab, row_limits, *, scale: float, block_kv: int, stages: int,
                   splits: int, blocks_per_split: int, interpret: bool = False):
  """Runs the kernel. q [K, Tn*TILE, D] (rows of one node per tile), k, v [N,S,K,D] with
  S a multiple of block_kv, tab [Tn, 4] int32 (node, lo, hi, 0) with lo/hi the min/max key limit of the
  tile's real rows, row_limits [Tn*TILE] int32 (0 for padding rows).
  Returns out [P,K,Tn*TILE,D] in q's dtype and lse [P,K,Tn*TILE] float32 (natural log)."""
  kh, r, d = q.shape
  n, s, _, _ = k.shape
  if r % TILE:
    raise ValueError(f"q rows ({r}) must be a multiple of {TILE} (tiles of one node)")
  if s % block_kv or s == 0:
    raise ValueError(f"k/v capacity S={s} must be a positive multiple of block_kv={block_kv}")
  num_tiles = r // TILE
  dtype = q.dtype
  tiling = plgpu.TilingTransform((8, 64))
  swizzle = plgpu.SwizzleTransform(128)

  def entry(tab_ref, lim_ref, q_ref, k_ref, v_ref, o_ref, lse_ref):
    buffers = [
        plgpu.SMEM((COMPUTE_WGS, BLOCK_Q, d), dtype, transforms=(tiling, swizzle)),
        plgpu.SMEM((stages, block_kv, d), dtype, transforms=(tiling, swizzle)),
        plgpu.SMEM((stages, block_kv, d), dtype, transforms=(tiling, swizzle)),
        plgpu.SMEM((COMPUTE_WGS, BLOCK_Q), jnp.int32),
        plgpu.SMEM((COMPUTE_WGS, BLOCK_Q), jnp.float32),
    ]
    body = functools.partial(_kernel, tab_ref, lim_ref, q_ref, k_ref, v_ref, o_ref, lse_ref,
                             block_kv=block_kv, stages=stages,
                             blocks_per_split=blocks_per_split,
                             scale_log2=float(scale) * LOG2E, interpret=interpret)
    pl.run_scoped(
        lambda *scoped: body(scoped),
        buffers,
        (plgpu.Barrier(num_barriers=COMPUTE_WGS), plgpu.Barrier(num_barriers=COMPUTE_WGS),
         plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages)),
        (plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),) * 2,
        plgpu.Barrier(num_arrivals=COMPUTE_WGS),
        collective_axes="wg",
    )

  kwargs = {}
  if interpret:
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    kwargs["interpret"] = InterpretGPUParams()
  out, lse = plgpu.kernel(
      entry,
      out_type=(jax.ShapeDtypeStruct((splits, kh, r, d), dtype),
                jax.ShapeDtypeStruct((splits, kh, r), jnp.float32)),
      grid=(num_tiles, splits, kh),
      grid_names=("tile", "split", "kvh"),
      num_threads=COMPUTE_WGS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      **kwargs,
  )(tab, row_limits, q, k, v)
  return out, lse
