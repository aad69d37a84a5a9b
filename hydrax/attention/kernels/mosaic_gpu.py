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
slices of a capacity that is not, so callers pad such caches (`pallas_gpu._mosaic_part`
does, and logs it once).

The tile table `tab` is an input array (compile-time constant or computed at run time: the
caller's choice), so traced owners need no recompilation; a tile with hi = 0 (an unused tile
of a runtime table with a static bound) runs no key block and only writes out = 0, lse = -inf.
A stacked cache [L,N,S,K,D] is passed whole with its layer (a traced scalar): the kernel sees
it as [L*N,S,K,D] (a bitcast) and adds layer*N to the table's nodes, so TMA reads the layer
in place and the tables do not depend on the layer.

Outputs: out [P,K,R,D] in q's dtype (normalised per split), lse [P,K,R] float32, natural log.
The caller merges the P splits through their LSEs (`flash.combine_splits`).

A folded suffix (`Suffix`: the per-sequence level of the same call) runs in the same CTAs:
a tile's 128 rows are whole sequences of seq_rows = T*G rows (J = 64 / seq_rows row groups a
compute warpgroup), and split p also attends the suffixes of row groups [p*ceil(J/P),
(p+1)*ceil(J/P)) in the same online softmax, so the splits' merge gives both levels merged
(no suffix kernel, no level merge). A suffix step fills a slot with two blocks of HALF = 64
keys, one per compute warpgroup (each reads only its half: its group's sequence), and masks
every row outside the group and every key at or past the row's suffix limit (one compare an
element against a row bound: each row's suffix sits in a virtual key space of the split);
its value rows past the group's largest limit are zeroed first (0 * NaN). Rows of one group
share the tile's wgmma M of 64 (G = 4: 16 sequences), so a suffix key costs 64 / seq_rows
times its useful FLOPs and softmax work: on the H200 a suffix step takes as long as a node
step (1.71 against 1.69 us at 16K/256), bound by its softmax's instruction latencies (run
16's warp-state samples). The suffix steps are spread evenly among the node's
(`root_before`, after `lead` node steps) so that their HBM reads overlap its matrix
products. Needs block_kv = 128 and a suffix capacity of whole HALF blocks
(`suffix_unsupported_reason`).

`overlap=True` (`MosaicConfig.node_overlap`, off) software-pipelines the unmasked node steps
within each compute warpgroup (`overlapped_node_steps`, FlashAttention-3's intra-warpgroup
overlap): step k's q k^T is issued with step k-1's p v (p in registers), and step k's softmax
runs while that p v is in flight. Two things keep ptxas from serialising every wgmma of the
kernel: the first step waits for its scores in full (a wait that leaves one group in flight
would leave the scores themselves in flight: C7514), and step k-1's p is used again after the
wait that ends its p v (an optimization barrier, CUTLASS's `warpgroup_fence_operand`), so
the softmax cannot write step k's p into the registers the p v in flight reads (C7513).
Exact (CPU interpret mode; the H200 against float32) and compiled without serialisation, but
no faster on the H200 (run 17: the unfolded root 0.99-1.03x the default's launch, the
fold 1.01-1.05x). Without it the node steps already run at ~630 TFLOP/s (run 16), about
FlashAttention-3's rate, which has both overlaps; here the two compute warpgroups' ping-pong
seems to hide the softmax already.

`transposed=True` (`MosaicConfig.suffix_transposed`, off) runs each suffix step as products
with the keys as wgmma's M and the group's rows as its N (SUFFIX_COLS = 16 rows of q from
the warpgroup's tile, read in place): s^T = k q^T, the softmax over the keys, o^T = v^T p^T,
and the result added to the rows' accumulator through a 0/1 selection product: three
products of N = 16 for two of N = 64, 2.7x fewer tensor-core FLOPs. It is exact (CPU
interpret mode; the H200 in float32 checks), but slower on the H200 (run 14: the 4K/256
launch 79.3 us against 57.1): a step alone costs 1.5 us against the untransposed 0.8 (its
reductions over the keys cross the warps through shared memory, and it runs three dependent
products), and the 32-byte swizzle it imposes on every tile (wgmma takes equal swizzles, and
p^T's rows are 32 bytes) makes the node steps ~12% slower in the kernel, though not in a
step timed alone without loads.

`heads=G` (`MosaicConfig.q_in_place`, off) reads q [B*T,H,D] in place, one copy a query head
of each warpgroup's rows (so the warpgroup's rows go by head: row gi*(64/G) + x is query row
x at head kvh*G + gi), and writes out [P,B*T,H,D] the same way: the launches that pack q
before the kernel and unpack out after it go (3.5 and 4.0 us of a 16K/256 call on the H200,
run 17). Exact in interpret mode and on the H200, but slower there: the unpacking becomes a
convert of the same cost, and the launch takes 1.2-9.4 us more (G copies of q a tile, more
spills), 1.03-1.04x the op's time (run 18, call 4b).

`suffix_warpgroup=True` (`MosaicConfig.suffix_warpgroup`, off) runs a folded suffix on a
fourth warpgroup of its own, written per thread on the CUDA cores
(`mosaic_suffix_warpgroup`), while the compute warpgroups run the node's steps alone as in
the unfolded launch; its results are one more key split (plane P of out and lse). It takes
1, 2, 4 or 8 rows a sequence and a capacity of whole 32-key blocks, within the CTA's shared
memory. Exact in interpret mode (its steps in jnp there) and on the H200, but slower: the
launch 1.04-2.3x the wgmma fold's at B = 64..256 (run 18, call 3). A sequence's suffix work
on the CUDA cores costs more than its wgmma steps, even at 4 of their 64 rows.

Runs on Hopper (sm_90) GPUs with bf16 or fp16; off GPU it runs in Mosaic GPU interpret mode
(slow; for tests). Callers pick it through `pallas_gpu` (the `pallas` backend) for stacked
shared levels; the Triton kernel there serves everything else and every other GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import numpy as np

from hydrax._log import log_once
from hydrax.attention.kernels import mosaic_suffix_warpgroup as suffix_wg

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
BLOCK_Q = 64          # rows per compute warpgroup (the wgmma M)
COMPUTE_WGS = 2
TILE = BLOCK_Q * COMPUTE_WGS
HALF = 64             # keys of a folded suffix block (half a slot: one compute warpgroup's)
# Columns of a transposed suffix step (`MosaicConfig.suffix_transposed`): the wgmma N that
# holds one sequence's rows. 8 would waste less but does not lower (run 13's probe).
SUFFIX_COLS = 16
STAGGER_PHASES = 16   # phases of the folded suffix steps (`MosaicConfig.suffix_stagger`)
HEAD_DIMS = (64, 128)
# Query heads a KV head (G) with which the kernel reads q in place (`tile_attention(heads=)`):
# a head's rows of a warpgroup, 64 // G, must be whole 8-row tiles of shared memory.
HEAD_GROUPS = (1, 2, 4, 8)
DTYPES = (jnp.bfloat16, jnp.float16)
assert (suffix_wg._TILE, suffix_wg._BLOCK_Q) == (TILE, BLOCK_Q)


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
  """Tuning knobs of the Mosaic GPU kernel (defaults: the best of the H200 sweep)."""
  block_kv: int = 128       # keys per block (a multiple of 64)
  # Key/value blocks in flight (shared memory: see `smem_bytes`). With D = 128, 3 stages of
  # 128 keys exceed the H200's 227 KiB a CTA (234,632 bytes with a folded suffix; run 11),
  # and `tile_attention` refuses them.
  stages: int = 2
  splits: Optional[int] = None   # P; None: enough CTAs to fill the GPU
  min_rows_per_node: int = 96    # shared levels with fewer rows per node go to Triton
  # A call of one shared level (on this kernel) and the per-sequence level runs both in one
  # launch: each CTA attends its tile's suffixes among its node's keys (`Suffix`). On the
  # H200 0.80-0.94x the device time of the two kernels at B = 256 (run 10).
  fold_suffix: bool = True
  # Folded suffix steps placed at a different fraction of a node step in each CTA
  # (`tile_attention(stagger=)`), so that CTAs running in step do not all read their
  # suffixes from HBM at the same moment. No faster on the H200 (run 11: 0.97-1.02x the
  # device time at B = 256, within the spread of repeats), so off.
  suffix_stagger: bool = False
  # Node steps before the first folded suffix step (None: `stages`). A suffix block is read
  # by one CTA alone, a node block by every tile of its node (from L2 after the first): with
  # the suffixes first every CTA starts on HBM, and at 4K/256 the first key block arrived
  # after 3.2 us (0.8 us at 16K/256, three node steps first; run 16's warp-state samples).
  # Yet the launch was no faster with node steps first (run 16: 2 or 4 of them, 1.00-1.07x
  # the launch at B = 256): the suffixes' bytes come from HBM either way. So 0.
  suffix_lead: Optional[int] = 0
  # Folded suffix steps as transposed products (`tile_attention(transposed=)`): the keys as
  # the wgmma M and the sequence's rows as its N (SUFFIX_COLS), merged into the rows through
  # a selection wgmma: 2.7x fewer tensor-core FLOPs than the 64-row products. Needs
  # every shared-memory tile at a 32-byte swizzle; sequences of more than SUFFIX_COLS rows
  # take the untransposed steps. Exact, but slower on the H200 (run 14: 1.2-1.4x the
  # launch at B = 256), so off.
  suffix_transposed: bool = False
  # Unmasked node steps software-pipelined within each compute warpgroup (FlashAttention-3's
  # intra-warpgroup overlap): step k's q k^T is issued together with step k-1's p v, and
  # step k's softmax runs while that p v is still on the tensor cores
  # (`tile_attention(overlap=)`). Exact and compiled without wgmma serialisation, but no
  # faster on the H200 (run 17: 0.99-1.05x the launch; the node steps run at about
  # FlashAttention-3's rate without it). So off.
  node_overlap: bool = False
  # q read and out written in place (`tile_attention(heads=)`) when the level's rows are in
  # order and fill whole tiles (and G is one of HEAD_GROUPS): no launch packs q before the
  # kernel or unpacks out after it (3.5 and 4.0 us of a 16K/256 call on the H200 in run 17;
  # the splits' merge stays). Exact on the H200, but the op takes 1.03-1.04x the default's
  # device time there (run 18, call 4b: the launch 1.2-9.4 us longer, and out still needs a
  # launch of 4 us after it), so off.
  q_in_place: bool = False
  # The folded suffix on a fourth warpgroup of its own, per thread on the CUDA cores
  # (`mosaic_suffix_warpgroup`), beside the compute warpgroups' node steps, instead of
  # wgmma steps of 64 rows for a sequence's T*G. Its key blocks of 32 stream through
  # `suffix_stages` slots; `registers` (compute, memory, suffix) split the SM's registers
  # between four warpgroups (2*compute + memory + suffix <= 512). Exact (interpret mode, and
  # the H200 against float32), but slower on the H200 (run 18, call 3: the 4K/256 launch
  # 123-131 us against the wgmma fold's 57; 16K/256 177-186 against 139), so off.
  suffix_warpgroup: bool = False
  suffix_stages: int = 2
  registers: tuple = (216, 24, 56)

  def __post_init__(self):
    lead = self.suffix_lead
    if lead is not None and (isinstance(lead, bool) or not isinstance(lead, int) or lead < 0):
      raise ValueError(f"suffix_lead must be None or an int >= 0, got {lead!r}")
    st = self.suffix_stages
    if isinstance(st, bool) or not isinstance(st, int) or st < 1:
      raise ValueError(f"suffix_stages must be an int >= 1, got {st!r}")
    if self.suffix_warpgroup and self.suffix_transposed:
      raise ValueError("suffix_warpgroup and suffix_transposed: the transposed suffix steps "
                       "are the compute warpgroups'; pick one")
    object.__setattr__(self, "registers", suffix_wg.check_registers(self.registers))


SMEM_BYTES = 232_448   # shared memory a CTA may take on Hopper (227 KiB)
# Pallas' shared-memory allocation (jax 0.11): each scratch buffer at a multiple of 1024 bytes,
# 8 bytes a barrier, and 2048 bytes (`CompilerParams.reduction_scratch_bytes`) for the
# cross-warp reductions of the softmax's row maximum and sum.
SMEM_ALIGN = 1024
BARRIER_BYTES = 8
REDUCTION_SCRATCH_BYTES = 2048


def _allocations(d: int, dtype, block_kv: int, stages: int, *, fold: bool, transposed: bool,
                 q_copies: int, swg=None) -> list:
  """What the kernel allocates (`pl.run_scoped`'s arguments after the body): its buffers (q
  tiles, `stages` key and value blocks, the rows' limits and lse, and the folded suffix's
  limits, the transposed steps' p and v tiles), the copies' barriers, the consumers'
  barriers, the compute warpgroups' barrier, then the suffix warpgroup's buffers and barriers
  (`swg`, a `mosaic_suffix_warpgroup.Layout`)."""
  # (wgmma takes equal swizzles for its two shared-memory operands, and p^T's rows are
  # 2 * SUFFIX_COLS bytes: the transposed steps put every tile at a 32-byte swizzle)
  swizzle_bytes = 2 * SUFFIX_COLS if transposed else 128
  tiled = (plgpu.TilingTransform((8, swizzle_bytes // 2)), plgpu.SwizzleTransform(swizzle_bytes))
  buffers = [
      plgpu.SMEM((COMPUTE_WGS, BLOCK_Q, d), dtype, transforms=tiled),
      plgpu.SMEM((stages, block_kv, d), dtype, transforms=tiled),
      plgpu.SMEM((stages, block_kv, d), dtype, transforms=tiled),
      plgpu.SMEM((COMPUTE_WGS, BLOCK_Q), jnp.int32),
      plgpu.SMEM((COMPUTE_WGS, BLOCK_Q), jnp.float32),
  ]
  if fold:
    buffers.append(plgpu.SMEM((COMPUTE_WGS, BLOCK_Q), jnp.int32))
  if transposed:
    buffers += [plgpu.SMEM((COMPUTE_WGS, HALF, SUFFIX_COLS), dtype, transforms=tiled),
                plgpu.SMEM((COMPUTE_WGS, d, SUFFIX_COLS), dtype, transforms=tiled)]
  # Copies a barrier waits for: q (a copy a head when read in place); the limits (and the
  # suffix limits); a key or value block (in two halves when a suffix is folded).
  block_copies = COMPUTE_WGS if fold else 1
  allocations = [
      buffers,
      (plgpu.Barrier(num_arrivals=q_copies, num_barriers=COMPUTE_WGS),
       plgpu.Barrier(num_arrivals=2 if fold else 1, num_barriers=COMPUTE_WGS),
       plgpu.Barrier(num_arrivals=block_copies, num_barriers=stages),
       plgpu.Barrier(num_arrivals=block_copies, num_barriers=stages)),
      (plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),) * 2,
      plgpu.Barrier(num_arrivals=COMPUTE_WGS),
  ]
  if swg is not None:
    allocations += suffix_wg.scratch(swg, dtype)
  return allocations


def smem_bytes(block_kv: int, stages: int, d: int, dtype=jnp.bfloat16, *, fold: bool = False,
               transposed: bool = False, swg=None) -> int:
  """Shared memory of one CTA as Pallas allocates it: `_allocations`' buffers, each aligned
  to SMEM_ALIGN, its barriers, the reductions' scratch. With a folded suffix (`fold`), its
  steps `transposed`, or the suffix warpgroup's `swg` layout instead. Lowering the kernel for
  CUDA on a CPU counts the same bytes (tests/attention/test_mosaic.py)."""
  leaves = jax.tree.leaves(
      _allocations(d, dtype, block_kv, stages, fold=fold and swg is None,
                   transposed=transposed, q_copies=1, swg=swg),
      is_leaf=lambda x: isinstance(x, plgpu.Barrier))
  total = REDUCTION_SCRATCH_BYTES
  for x in leaves:
    if isinstance(x, plgpu.Barrier):
      total += BARRIER_BYTES * math.prod(x.num_barriers)
    else:
      nbytes = math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
      total += -(-nbytes // SMEM_ALIGN) * SMEM_ALIGN
  return total


def unsupported_reason(dtype, d: int, block_kv: int) -> Optional[str]:
  """Why the kernel cannot take these inputs (None when it can)."""
  if jnp.dtype(dtype) not in [jnp.dtype(x) for x in DTYPES]:
    return f"dtype {jnp.dtype(dtype).name} (Mosaic GPU kernel: bfloat16, float16)"
  if d not in HEAD_DIMS:
    return f"head dim {d} (Mosaic GPU kernel: {HEAD_DIMS})"
  if block_kv % 64 or block_kv <= 0:
    return f"block_kv {block_kv} (a positive multiple of 64)"
  return None


def tile_rows_in_place(heads: int):
  """[BLOCK_Q] int: the packed row (query row x head, `tile_attention` without `heads`) of
  each of a warpgroup's rows when q is read in place with G = heads, counted from the
  warpgroup's first: row gi*n + x (n = BLOCK_Q // G) is query row x at head gi, packed row
  x*G + gi."""
  rows = np.arange(BLOCK_Q)
  n = BLOCK_Q // heads
  return (rows % n) * heads + rows // n


def _row_group(rows, seq_rows: int, heads: int):
  """The row group (sequence within its warpgroup) of warpgroup rows `rows` (int32, in
  [0, BLOCK_Q)): seq_rows consecutive rows each in the packed layout (heads 0); with q read
  in place (heads = G) row gi*n + x holds query row x of head gi (n = BLOCK_Q // G), whose
  sequence is x // T (T = seq_rows // G)."""
  if not heads:
    return lax.div(rows, jnp.int32(seq_rows))
  return lax.div(lax.rem(rows, jnp.int32(BLOCK_Q // heads)), jnp.int32(seq_rows // heads))


def _kernel(tab_ref, lim_ref, layer_ref, q_ref, k_ref, v_ref, suffix_refs, o_ref, lse_ref,
            scoped, *, block_kv: int, stages: int, blocks_per_split: int, scale_log2: float,
            interpret: bool, seq_rows: int, splits: int, stagger: bool, lead: int,
            layer_nodes: tuple, transposed: bool, overlap: bool, heads: int,
            swg: Optional[suffix_wg.Layout], registers: tuple):
  """One CTA: tile `tile`, KV head `kvh`, key split `split`; warpgroup `wg` (2 = memory,
  3 = the suffix's when `swg`).

  tab [Tn, 4] int32 (node, lo, hi, suffix hi); lim [R] int32; layer [1] int32; q [K,R,D];
  k, v [L*N,S,K,D]; o [P,K,R,D]; lse [P,K,R] float32. suffix_refs: () or (slim [R] int32,
  stab [Tn,2,J,2] int32, suffix layer [1] int32, ks, vs [Ls*Ns,Ss,K,D]): see
  `tile_attention`. layer_nodes: (N, Ns) of stacked caches (0: not stacked): the tables'
  nodes move by layer * N. transposed: suffix steps as transposed products
  (`_compute.suffix_step`); the extra buffers pt, ot [2,HALF,SUFFIX_COLS], [2,D,SUFFIX_COLS].
  overlap: unmasked node steps software-pipelined (`_compute.overlapped_node_steps`).
  heads: 0 (q [K,R,D] packed, o [P,K,R,D]), or G with q [B*T,H,D] read and o [P,B*T,H,D]
  written in place (`tile_attention`'s `heads`; every other array in tile rows).
  swg: None, or the suffix runs on a fourth warpgroup (`mosaic_suffix_warpgroup`; o and lse
  then have P + 1 planes, the last the suffix's) and the compute warpgroups run node steps
  only. registers: a thread's registers in a compute, the memory (and the suffix)
  warpgroup.
  """
  (qo_smem2, k_smem, v_smem, lim_smem2, lse_smem2, *extra), bars, free_bars, sched = scoped[:4]
  q_bar, lim_bar, k_bar, v_bar = bars
  fused = bool(suffix_refs)
  fold = fused and swg is None         # suffix steps on the compute warpgroups
  if fused:
    slim_ref, stab_ref, slayer_ref, ks_ref, vs_ref = suffix_refs
    # (the layer's first node in the suffix cache, when it is stacked)
    snode0 = slayer_ref[0] * layer_nodes[1] if layer_nodes[1] else 0
  if fold:
    slim_smem2 = extra[0]
    if transposed:
      pt_smem2, ot_smem2 = extra[1:3]
  k_free, v_free = free_bars
  kvh, tile, split = lax.axis_index("kvh"), lax.axis_index("tile"), lax.axis_index("split")
  wg = lax.axis_index("wg")
  dtype = q_ref.dtype
  d = k_ref.shape[-1]          # (q may be [B*T, H*D]: read in place)
  # Layout hints are for the lowering; the GPU interpreter has no rule for them.
  cast = (lambda x, layout: x) if interpret else plgpu.layout_cast
  node, lo, hi = tab_ref[tile, 0], tab_ref[tile, 1], tab_ref[tile, 2]
  if layer_nodes[0]:
    node = node + layer_ref[0] * layer_nodes[0]
  bk = jnp.int32(block_kv)
  b0 = split * blocks_per_split
  b1 = jnp.minimum(b0 + blocks_per_split, lax.div(hi + bk - 1, bk))
  nsteps = jnp.maximum(b1 - b0, 0)
  nfull = jnp.clip(lax.div(lo, bk) - b0, 0, nsteps)     # leading steps that need no mask
  nroot = nsteps
  if fold:
    # Suffix steps: split `split` takes row groups [j0, j0 + nsj) of each compute warpgroup
    # (J = BLOCK_Q // seq_rows groups, one sequence each), each in nsb blocks of HALF keys
    # (the tile's suffix hi, column 3, bounds them). They are spread evenly among the node's
    # steps (suffix step u after `root_before(u)` node steps), so that their reads from
    # HBM overlap the node's matrix products instead of all CTAs streaming suffixes at the end.
    groups = BLOCK_Q // seq_rows
    per_split = -(-groups // splits)
    j0 = split * per_split
    nsj = jnp.clip(groups - j0, 0, per_split)
    nsb = lax.div(tab_ref[tile, 3] + (HALF - 1), jnp.int32(HALF))
    nsuf = nsj * nsb
    nsteps = nroot + nsuf

    def suffix_block(u):
      """(row group, block) of suffix step u."""
      return j0 + lax.div(u, nsb), lax.rem(u, nsb)

    # The first n0 = min(lead, nroot) node steps come first; suffix step u comes after
    # root_before(u + 1) node steps, root_before(u) = n0 + floor((u + f) * (nroot - n0) /
    # (nsuf + 1)), f in [0, 1): 0, or with `stagger` a fraction of STAGGER_PHASES that
    # differs between neighbouring CTAs (monotone in u, and root_before(nsuf) <= nroot for
    # any f). Chunk u runs node steps [start(u), root_before(u + 1)), then suffix step u,
    # with start(0) = 0 (so the lead and a staggered start run in chunk 0) and start(u) =
    # root_before(u).
    phase = (lax.rem(tile * 5 + kvh * 3 + split * 7, jnp.int32(STAGGER_PHASES)) if stagger
             else jnp.int32(0))
    n0 = jnp.minimum(jnp.int32(lead), nroot)

    def root_before(u):
      return n0 + lax.div((u * STAGGER_PHASES + phase) * (nroot - n0),
                          (nsuf + 1) * STAGGER_PHASES)

    def chunk_start(u):
      return jnp.where(u == 0, 0, root_before(u))

  def block_start(step):
    return (b0 + step) * bk

  def sched_barrier():
    plgpu.barrier_arrive(sched)
    plgpu.barrier_wait(sched)

  if swg is not None:
    @pl.when(wg == COMPUTE_WGS + 1)
    def _suffix():
      plgpu.set_max_registers(registers[2], action="decrease")
      suffix_wg.run(swg, (tab_ref, stab_ref, slim_ref, ks_ref, vs_ref, q_ref, o_ref, lse_ref),
                    *scoped[4:], tile=tile, split=split, kvh=kvh, snode0=snode0)

  @pl.when(wg < COMPUTE_WGS)
  def _compute():
    plgpu.set_max_registers(registers[0], action="increase")
    qo_smem, lim_smem, lse_smem = qo_smem2.at[wg], lim_smem2.at[wg], lse_smem2.at[wg]
    row0 = tile * TILE + wg * BLOCK_Q
    if heads:
      # Head gi's rows [gi*n, (gi + 1)*n) of the warpgroup are query rows [bt0, bt0 + n) of
      # q [B*T,H,D] at head kvh*G + gi: one copy each, read in place (no packing launch).
      # (multiple_of: jax 0.11.2's layout inference asks the copies' offsets to be proven
      # multiples of the shared memory's tiles: H200 run 18, call 4)
      n, bt0 = BLOCK_Q // heads, pl.multiple_of(lax.div(row0, jnp.int32(heads)), BLOCK_Q // heads)
      for gi in range(heads):
        plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(bt0, n),
                                         pl.ds(pl.multiple_of((kvh * heads + gi) * d, d), d)],
                                qo_smem.at[pl.ds(gi * n, n)], q_bar.at[wg])
    else:
      plgpu.copy_gmem_to_smem(q_ref.at[kvh, pl.ds(row0, BLOCK_Q)], qo_smem, q_bar.at[wg])
    plgpu.copy_gmem_to_smem(lim_ref.at[pl.ds(row0, BLOCK_Q)], lim_smem, lim_bar.at[wg])
    if fold:
      plgpu.copy_gmem_to_smem(slim_ref.at[pl.ds(row0, BLOCK_Q)], slim_smem2.at[wg], lim_bar.at[wg])
    plgpu.barrier_wait(q_bar.at[wg])
    plgpu.barrier_wait(lim_bar.at[wg])
    row_layout = plgpu.Layout.WGMMA.reduce(1)
    # (a layout_cast right after the read makes the lowering load straight into the row layout)
    lim = cast(lim_smem[...], row_layout)
    if fold:
      # Each row's suffix keys in the split's "virtual" key space, where row group j's
      # sequence takes nsb * HALF keys from (j - j0) * nsb * HALF: [start, end) a row.
      # Suffix step u covers virtual keys [u * HALF, (u + 1) * HALF), so one compare against
      # each bound masks both the rows outside the step's group and the keys past a limit.
      # (row indices in the row layout, reduced from a 2-D iota as the scores' maxima are)
      rows = cast(lax.broadcasted_iota(jnp.int32, (BLOCK_Q, HALF), 0),
                  plgpu.Layout.WGMMA).max(axis=1)
      slim = cast(slim_smem2.at[wg][...], row_layout)
      suffix_start = (_row_group(rows, seq_rows, heads) - j0) * (nsb * HALF)
      suffix_end = suffix_start + slim
    m_i = cast(jnp.full((BLOCK_Q,), -jnp.inf, jnp.float32), row_layout)
    l_i = cast(jnp.full((BLOCK_Q,), 0.0, jnp.float32), row_layout)
    acc = cast(jnp.full((BLOCK_Q, d), 0.0, jnp.float32), plgpu.Layout.WGMMA)

    @pl.when(nsteps > 0)
    def _():
      plgpu.barrier_wait(k_bar.at[0])

    pl.when(wg == 1)(sched_barrier)

    def zero_suffix_values(v_blk, seq_hi):
      """A suffix block's value rows at or past seq_hi (the largest suffix limit of its
      sequence's rows, counted from the block's start) become 0: p is 0 there, but 0 * NaN
      is NaN. This warpgroup's half of the slot alone (no other warpgroup reads it)."""
      @pl.when(seq_hi < HALF)
      def _():
        keys = cast(lax.broadcasted_iota(jnp.int32, (HALF, d), 0), plgpu.Layout.WGMMA)
        vals = cast(v_blk[...], plgpu.Layout.WGMMA)
        v_blk[...] = jnp.where(keys < seq_hi, vals, jnp.zeros_like(vals))
        plgpu.commit_smem()

    def wait_next_keys(i):
      """Wait for global step i + 1's keys (while step i's last product runs)."""
      nxt = i + 1

      @pl.when(nxt < nsteps)
      def _():
        plgpu.barrier_wait(k_bar.at[lax.rem(nxt, jnp.int32(stages))])

    def online_softmax(s, m_i, l_i, masked: bool):
      """A block's scores -> (p in q's dtype, the new maximum, the running sum rescaled and
      added to, alpha: the factor that moves the old maximum's terms to the new one). With
      `masked`, a row whose keys are all masked so far keeps p = 0 (its maximum -inf is
      taken as 0 for the exponentials)."""
      m_new = jnp.maximum(m_i, s.max(axis=1) * scale_log2)
      m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
      alpha = jnp.exp2(m_i - m_use)
      p = jnp.exp2(s * scale_log2 - lax.broadcast_in_dim(m_use, s.shape, [0]))
      return p.astype(dtype), m_new, l_i * alpha + p.sum(axis=1), alpha

    def step(k, carry, masked: bool, suffix: bool = False):
      """Node step k (key block b0 + k), or suffix step k; carry[3] is the global step."""
      acc, m_i, l_i, i = carry
      slot = lax.rem(i, jnp.int32(stages))
      if suffix:
        # This warpgroup's half of the slot: HALF keys of the sequence of row group j.
        j, c = suffix_block(k)
        # (read here, a step's work ahead of its use: a scalar from global memory)
        seq_hi = stab_ref[tile, wg, j, 1] - c * HALF
        width = HALF
        k_blk = k_smem.at[slot, pl.ds(wg * HALF, HALF)]
        v_blk = v_smem.at[slot, pl.ds(wg * HALF, HALF)]
      else:
        width = block_kv
        k_blk, v_blk = k_smem.at[slot], v_smem.at[slot]

      def qk_product(acc_ref):
        plgpu.wgmma(acc_ref, qo_smem, plgpu.transpose_ref(k_blk, (1, 0)))
        sched_barrier()
        return acc_ref[...]

      if interpret:
        # (the GPU interpreter's wgmma cannot read a transposed ref: q k^T in registers)
        s = lax.dot_general(qo_smem[...], k_blk[...], (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32)
        sched_barrier()
      else:
        s = pl.run_scoped(qk_product, plgpu.ACC((BLOCK_Q, width), jnp.float32))
      plgpu.barrier_arrive(k_free.at[slot])
      if suffix:
        # Row r sees key x of this block when u*HALF + x lies in its [start, end): only rows
        # of group j can, below their suffix limit. A row whose start lies past the block's
        # (a later group's) sees none; for the others start <= u*HALF <= u*HALF + x, and an
        # earlier group's end is at most u*HALF: one compare an element against a row bound.
        keys = cast(lax.broadcasted_iota(jnp.int32, s.shape, 1), plgpu.Layout.WGMMA)
        first = k * HALF
        row_hi = jnp.where(suffix_start <= first, suffix_end - first, 0)
        s = jnp.where(keys < lax.broadcast_in_dim(row_hi, s.shape, [0]), s, -jnp.inf)
      elif masked:
        keys = cast(lax.broadcasted_iota(jnp.int32, (BLOCK_Q, block_kv), 1),
                    plgpu.Layout.WGMMA) + block_start(k)
        s = jnp.where(keys < lax.broadcast_in_dim(lim, s.shape, [0]), s, -jnp.inf)
      p16, m_new, l_i, alpha = online_softmax(s, m_i, l_i, masked)
      acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
      acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
      plgpu.barrier_arrive(sched)
      plgpu.barrier_wait(v_bar.at[slot])
      plgpu.barrier_wait(sched)
      if suffix:
        zero_suffix_values(v_blk, seq_hi)
      elif masked:
        # p is exactly 0 for keys >= hi, but 0 * NaN is NaN in p v: a block that runs past hi
        # (the node's valid keys end inside it) has its value rows >= hi zeroed in shared
        # memory first. Both compute warpgroups do it before their own product; they write
        # the same bits, so neither can read a value that is not finite or not the real one.
        @pl.when(block_start(k) + bk > hi)
        def _():
          for c in range(block_kv // BLOCK_Q):
            part = v_smem.at[slot, pl.ds(c * BLOCK_Q, BLOCK_Q)]
            keys = cast(lax.broadcasted_iota(jnp.int32, (BLOCK_Q, d), 0),
                        plgpu.Layout.WGMMA) + (block_start(k) + c * BLOCK_Q)
            vals = cast(part[...], plgpu.Layout.WGMMA)
            part[...] = jnp.where(keys < hi, vals, jnp.zeros_like(vals))
          plgpu.commit_smem()

      def pv_product(acc_ref):
        plgpu.wgmma(acc_ref, p16, v_blk)
        wait_next_keys(i)

      if interpret:
        # (the GPU interpreter has no run_state and its wgmma takes no register operand:
        # p v in registers)
        acc = acc + jnp.dot(p16, v_blk[...], preferred_element_type=jnp.float32)
        wait_next_keys(i)
      else:
        acc = pl.run_state(pv_product)(plgpu.ACC.init(acc))
      plgpu.barrier_arrive(v_free.at[slot])
      return acc, m_new, l_i, i + 1

    def suffix_step(u, carry):
      """Suffix step u as transposed products, for the SUFFIX_COLS rows [base, base + C)
      of this warpgroup that hold row group j's sequence (C = SUFFIX_COLS; base a multiple
      of 8, the q tile's row tiling, so that the rows slice q's shared memory in place):

        s^T [HALF keys, C] = k q^T     softmax over the keys (axis 0), per column
        o^T [D, C]         = v^T p^T   (p^T through shared memory)
        acc += E (o^T)^T               E [64, C] selects row base + x for column x

      The block's maximum and sum are merged with each row's running ones first: the
      column's running maximum comes out of the rows through E (a reduction over axis 0),
      o^T is scaled in float32 before its rounding to q's dtype, so E is exactly 0 or 1.
      Columns outside the group (other sequences' rows) see no key and add nothing."""
      acc, m_i, l_i, i = carry
      slot = lax.rem(i, jnp.int32(stages))
      j, c = suffix_block(u)
      seq_hi = stab_ref[tile, wg, j, 1] - c * HALF
      k_blk = k_smem.at[slot, pl.ds(wg * HALF, HALF)]
      v_blk = v_smem.at[slot, pl.ds(wg * HALF, HALF)]
      pt_smem, ot_smem = pt_smem2.at[wg], ot_smem2.at[wg]
      cols = SUFFIX_COLS
      first = j * seq_rows
      base = jnp.minimum(lax.div(first, jnp.int32(8)) * 8, BLOCK_Q - cols)
      q_blk = qo_smem.at[pl.ds(base, cols)]

      def qk_product(acc_ref):
        plgpu.wgmma(acc_ref, k_blk, plgpu.transpose_ref(q_blk, (1, 0)))
        sched_barrier()
        return acc_ref[...]

      if interpret:
        st = lax.dot_general(k_blk[...], q_blk[...], (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32)
        sched_barrier()
      else:
        st = pl.run_scoped(qk_product, plgpu.ACC((HALF, cols), jnp.float32))
      plgpu.barrier_arrive(k_free.at[slot])
      wgmma_layout = plgpu.Layout.WGMMA
      # [64, C] index grids: a warpgroup row r (axis 0) against a column x (axis 1); the
      # same shape as s^T, whose axis 0 is the keys.
      r_of = cast(lax.broadcasted_iota(jnp.int32, (BLOCK_Q, cols), 0), wgmma_layout)
      x_of = cast(lax.broadcasted_iota(jnp.int32, (BLOCK_Q, cols), 1), wgmma_layout)
      sel = r_of == x_of + base
      in_group = (x_of + base >= first) & (x_of + base < first + seq_rows)
      # column x's suffix limit (0 outside the group), then keys past it masked
      col_hi = jnp.where(sel & in_group, lax.broadcast_in_dim(slim, sel.shape, [0]),
                         0).max(axis=0) - c * HALF
      keys = r_of                 # (s^T's axis 0 is this block's keys)
      st = jnp.where(keys < lax.broadcast_in_dim(col_hi, st.shape, [1]), st, -jnp.inf)
      m_blk = st.max(axis=0) * scale_log2
      m_blk_use = jnp.where(m_blk == -jnp.inf, 0.0, m_blk)
      pt = jnp.exp2(st * scale_log2 - lax.broadcast_in_dim(m_blk_use, st.shape, [1]))
      l_blk = pt.sum(axis=0)
      pt_smem[...] = pt.astype(dtype)
      plgpu.commit_smem()
      # the column's row's running maximum, and the block's weight against the new one
      m_col = jnp.where(sel, lax.broadcast_in_dim(m_i, sel.shape, [0]), -jnp.inf).max(axis=0)
      m_col_new = jnp.maximum(m_col, m_blk)
      w = jnp.exp2(m_blk - jnp.where(m_col_new == -jnp.inf, 0.0, m_col_new))
      m_row_new = jnp.maximum(m_i, jnp.where(
          sel, lax.broadcast_in_dim(m_col_new, sel.shape, [1]), -jnp.inf).max(axis=1))
      alpha = jnp.exp2(m_i - jnp.where(m_row_new == -jnp.inf, 0.0, m_row_new))
      l_i = l_i * alpha + jnp.where(
          sel, lax.broadcast_in_dim(l_blk * w, sel.shape, [1]), 0.0).sum(axis=1)
      acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
      acc, l_i, m_row_new, w = lax.optimization_barrier((acc, l_i, m_row_new, w))
      plgpu.barrier_arrive(sched)
      plgpu.barrier_wait(v_bar.at[slot])
      plgpu.barrier_wait(sched)

      zero_suffix_values(v_blk, seq_hi)

      def pv_product(acc_ref):
        plgpu.wgmma(acc_ref, plgpu.transpose_ref(v_blk, (1, 0)), pt_smem)
        return acc_ref[...]

      if interpret:
        ot = lax.dot_general(v_blk[...], pt_smem[...], (((0,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
      else:
        ot = pl.run_scoped(pv_product, plgpu.ACC((d, cols), jnp.float32))
      plgpu.barrier_arrive(v_free.at[slot])
      ot_smem[...] = (ot * lax.broadcast_in_dim(w, ot.shape, [1])).astype(dtype)
      plgpu.commit_smem()
      e = sel.astype(dtype)

      def merge_product(acc_ref):
        plgpu.wgmma(acc_ref, e, plgpu.transpose_ref(ot_smem, (1, 0)))
        wait_next_keys(i)

      if interpret:
        acc = acc + lax.dot_general(e, ot_smem[...], (((1,), (1,)), ((), ())),
                                    preferred_element_type=jnp.float32)
        wait_next_keys(i)
      else:
        acc = pl.run_state(merge_product)(plgpu.ACC.init(acc))
      return acc, m_row_new, l_i, i + 1

    def overlapped_node_steps(a, e, carry):
      """Unmasked node steps [a, e), software-pipelined (`MosaicConfig.node_overlap`): the
      first step's q k^T and softmax, then per step k its q k^T issued with step k-1's p v,
      its softmax while that p v runs, the accumulator rescaled once both are done; the last
      step's p v after the loop. The schedule barrier sees two arrivals a step as in `step`
      (after the products' issue, after the softmax) and each slot's barriers one wait and
      one release a step; step e-1's p v waits for the next step's keys (`wait_next_keys`),
      as `step` does."""

      def scores(slot, pending=None):
        """q k^T of the keys in `slot`, issued before `pending()` (step k-1's p v) when
        given; waits for the scores only."""
        k_blk = k_smem.at[slot]
        if interpret:
          if pending is not None:
            pending()
          s = lax.dot_general(qo_smem[...], k_blk[...], (((1,), (1,)), ((), ())),
                              preferred_element_type=jnp.float32)
          sched_barrier()
          return s

        def qk_product(s_ref):
          plgpu.wgmma(s_ref, qo_smem, plgpu.transpose_ref(k_blk, (1, 0)))
          if pending is not None:
            pending()
          sched_barrier()
          # wgmma groups complete in order: with a p v issued after, waiting until one group
          # is left in flight completes the scores. Without one, that wait would leave the
          # scores themselves in flight, and reading their registers then made ptxas
          # serialise every wgmma of the kernel (C7514).
          return plgpu.wgmma_accumulator_load(s_ref, wait_n=0 if pending is None else 1)

        return pl.run_scoped(qk_product, plgpu.ACC((BLOCK_Q, block_kv), jnp.float32))

      def first(carry):
        acc, m_i, l_i, i = carry
        slot = lax.rem(i, jnp.int32(stages))
        s = scores(slot)
        plgpu.barrier_arrive(k_free.at[slot])
        p16, m_new, l_i, alpha = online_softmax(s, m_i, l_i, False)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
        plgpu.barrier_arrive(sched)
        return acc, m_new, l_i, i, p16

      def pipelined(k, carry):
        # global step i: the step whose p (p_prev, in registers) v is still to run
        acc, m_i, l_i, i, p_prev = carry
        prev = lax.rem(i, jnp.int32(stages))
        slot = lax.rem(i + 1, jnp.int32(stages))
        plgpu.barrier_wait(k_bar.at[slot])
        plgpu.barrier_wait(v_bar.at[prev])
        plgpu.barrier_wait(sched)
        if interpret:
          s = scores(slot)
          acc = acc + jnp.dot(p_prev, v_smem.at[prev][...], preferred_element_type=jnp.float32)
          plgpu.barrier_arrive(k_free.at[slot])
          p_new, m_new, l_new, alpha = online_softmax(s, m_i, l_i, False)
        else:
          def body(refs):
            o_ref, m_ref, l_ref, p_ref, a_ref = refs
            s = scores(slot, lambda: plgpu.wgmma(o_ref, p_prev, v_smem.at[prev]))
            plgpu.barrier_arrive(k_free.at[slot])
            p_ref[...], m_ref[...], l_ref[...], a_ref[...] = online_softmax(
                s, m_ref[...], l_ref[...], False)

          acc, m_new, l_new, p_new, alpha = pl.run_state(body)(
              (plgpu.ACC.init(acc), m_i, l_i,
               jnp.zeros((BLOCK_Q, block_kv), dtype), m_i))
          # p_prev is read by the p v until the wait that ends run_state: used here, after
          # that wait, its registers stay its own while the softmax above writes p_new
          # (else the loop's carried p shares one register set, the softmax overwrites the
          # operand of the p v in flight, and ptxas serialises every wgmma: C7513).
          acc, p_prev = lax.optimization_barrier((acc, p_prev))
        plgpu.barrier_arrive(v_free.at[prev])
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        acc, l_new, m_new, p_new = lax.optimization_barrier((acc, l_new, m_new, p_new))
        plgpu.barrier_arrive(sched)
        return acc, m_new, l_new, i + 1, p_new

      def last(carry):
        acc, m_i, l_i, i, p_prev = carry
        slot = lax.rem(i, jnp.int32(stages))
        plgpu.barrier_wait(v_bar.at[slot])
        plgpu.barrier_wait(sched)
        if interpret:
          acc = acc + jnp.dot(p_prev, v_smem.at[slot][...], preferred_element_type=jnp.float32)
          wait_next_keys(i)
        else:
          def pv_product(acc_ref):
            plgpu.wgmma(acc_ref, p_prev, v_smem.at[slot])
            wait_next_keys(i)

          acc = pl.run_state(pv_product)(plgpu.ACC.init(acc))
        plgpu.barrier_arrive(v_free.at[slot])
        return acc, m_i, l_i, i + 1

      def run(carry):
        carry = lax.fori_loop(a + 1, e, pipelined, first(carry))
        return last(carry)

      return lax.cond(e > a, run, lambda carry: carry, carry)

    def node_steps(a, b, carry):
      """Node steps [a, b): those below nfull unmasked, the rest masked."""
      e = jnp.minimum(b, nfull)
      if overlap:
        carry = overlapped_node_steps(a, e, carry)
      else:
        carry = lax.fori_loop(a, e, functools.partial(step, masked=False), carry)
      return lax.fori_loop(jnp.maximum(a, nfull), b, functools.partial(step, masked=True),
                           carry)

    carry = (acc, m_i, l_i, jnp.int32(0))
    if fold:
      def chunk(u, carry):
        carry = node_steps(chunk_start(u), root_before(u + 1), carry)
        if transposed:
          return suffix_step(u, carry)
        return step(u, carry, masked=True, suffix=True)

      carry = lax.fori_loop(0, nsuf, chunk, carry)
      carry = node_steps(root_before(nsuf), nroot, carry)
    else:
      carry = node_steps(jnp.int32(0), nroot, carry)
    acc, m_i, l_i, _ = carry
    pl.when(wg == 0)(sched_barrier)

    has = l_i > 0.0
    l_safe = jnp.where(has, l_i, 1.0)
    acc = acc * lax.broadcast_in_dim(1.0 / l_safe, acc.shape, [0])
    qo_smem[...] = acc.astype(dtype)
    lse_smem[...] = jnp.where(has, (m_i + jnp.log2(l_safe)) * LN2, -jnp.inf)
    plgpu.commit_smem()
    if heads:
      for gi in range(heads):
        plgpu.copy_smem_to_gmem(qo_smem.at[pl.ds(gi * n, n)],
                                o_ref.at[split, pl.ds(bt0, n),
                                         pl.ds(pl.multiple_of((kvh * heads + gi) * d, d), d)])
    else:
      plgpu.copy_smem_to_gmem(qo_smem, o_ref.at[split, kvh, pl.ds(row0, BLOCK_Q)])
    plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[split, kvh, pl.ds(row0, BLOCK_Q)])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == COMPUTE_WGS)
  def _memory():
    plgpu.set_max_registers(registers[1], action="decrease")

    def load_node(k, slot):
      sl = (node, pl.ds(block_start(k), block_kv), kvh)
      plgpu.copy_gmem_to_smem(k_ref.at[sl], k_smem.at[slot], k_bar.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[sl], v_smem.at[slot], v_bar.at[slot])

    if not fold:
      for i in range(stages):
        pl.when(i < nsteps)(functools.partial(load_node, jnp.int32(i), i))

      @pl.loop(0, jnp.maximum(nsteps - stages, 0))
      def _(i):
        slot = lax.rem(i, jnp.int32(stages))
        sl = (node, pl.ds(block_start(i + stages), block_kv), kvh)
        plgpu.barrier_wait(k_free.at[slot])
        plgpu.copy_gmem_to_smem(k_ref.at[sl], k_smem.at[slot], k_bar.at[slot])
        plgpu.barrier_wait(v_free.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[sl], v_smem.at[slot], v_bar.at[slot])
    else:
      # The compute warpgroups' order of steps; every slot takes two copies of HALF keys
      # (its barriers count two arrivals): a node block in halves, or one block of each
      # compute warpgroup's suffix sequence.
      def load(i, sources):
        """Global step i into its slot, once the step `stages` earlier has freed it."""
        slot = lax.rem(i, jnp.int32(stages))
        for x, (smem, bar, free) in enumerate(((k_smem, k_bar, k_free),
                                               (v_smem, v_bar, v_free))):
          pl.when(i >= stages)(lambda: plgpu.barrier_wait(free.at[slot]))
          for h, (ref, row, start) in enumerate(sources):
            plgpu.copy_gmem_to_smem(ref[x].at[row, pl.ds(start, HALF), kvh],
                                    smem.at[slot, pl.ds(h * HALF, HALF)], bar.at[slot])
        return i + 1

      def node_loads(a, b, i):
        return lax.fori_loop(a, b, lambda k, i: load(i, [
            ((k_ref, v_ref), node, block_start(k) + h * HALF) for h in range(COMPUTE_WGS)]), i)

      def suffix_load(u, i):
        j, c = suffix_block(u)
        return load(i, [((ks_ref, vs_ref), stab_ref[tile, h, j, 0] + snode0, c * HALF)
                        for h in range(COMPUTE_WGS)])

      def chunk_loads(u, i):
        return suffix_load(u, node_loads(chunk_start(u), root_before(u + 1), i))

      i = lax.fori_loop(0, nsuf, chunk_loads, jnp.int32(0))
      node_loads(root_before(nsuf), nroot, i)

    if interpret:
      # (the interpreter checks, when it frees a barrier, that a thread that waited on it saw
      # every phase: take the compute warpgroups' last release of each slot)
      for slot in range(stages):
        @pl.when(slot < nsteps)
        def _():
          plgpu.barrier_wait(k_free.at[slot])
          plgpu.barrier_wait(v_free.at[slot])


class Suffix(NamedTuple):
  """The per-sequence level folded into `tile_attention` (one launch for both levels).

  k, v [Ns,Ss,K,D] (Ss a multiple of HALF), or stacked [Ls,Ns,Ss,K,D] read at `layer`
  (int32 scalar, may be traced; the table's nodes counted within the layer); row_limits
  [Tn*TILE] int32, each tile row's key limit in its sequence's suffix (0 for padding rows);
  table [Tn, 2, J, 2] int32: for tile t, compute warpgroup h and row group j (rows
  t*TILE + h*BLOCK_Q + j*seq_rows onward, J = BLOCK_Q // seq_rows), the group's node in k,
  v and the largest limit of its rows;
  seq_rows: rows of one sequence (T*G, a power of two <= BLOCK_Q). A tile's 4th table
  column (`tab[:, 3]`) is the largest suffix limit of its rows."""
  k: jax.Array
  v: jax.Array
  row_limits: jax.Array
  table: jax.Array
  seq_rows: int
  layer: Optional[object] = None


def _stacked(name: str, k, v, layer):
  """(k, v as [L*N,S,K,D], layer as int32 [1], N) of stacked caches [L,N,S,K,D] read at
  `layer` (merging the leading axes of a row-major array is a bitcast, not a copy); for
  [N,S,K,D] (k, v, int32 [1] zero, 0)."""
  if k.ndim == 5:
    if layer is None:
      raise ValueError(f"{name} {list(k.shape)} is stacked [L,N,S,K,D]: pass its layer")
    l, n = k.shape[:2]
    return (k.reshape((l * n,) + k.shape[2:]), v.reshape((l * n,) + v.shape[2:]),
            jnp.asarray(layer, jnp.int32).reshape(1), n)
  if k.ndim != 4:
    raise ValueError(f"{name} {list(k.shape)}: expected [N,S,K,D] or stacked [L,N,S,K,D]")
  if layer is not None:
    raise ValueError(f"{name} {list(k.shape)} is not stacked: layer must be None")
  return k, v, jnp.zeros((1,), jnp.int32), 0


def suffix_unsupported_reason(block_kv: int, seq_rows: int, capacity: int) -> Optional[str]:
  """Why `tile_attention` cannot fold a per-sequence level in (None when it can)."""
  if block_kv != COMPUTE_WGS * HALF:
    return f"block_kv {block_kv} (a folded suffix takes {COMPUTE_WGS * HALF}: a half a warpgroup)"
  if seq_rows > BLOCK_Q or BLOCK_Q % seq_rows:
    return f"{seq_rows} query rows a sequence (a folded suffix takes a divisor of {BLOCK_Q})"
  if capacity % HALF or capacity == 0:
    return f"suffix capacity {capacity} (a folded suffix takes a positive multiple of {HALF})"
  return None


def suffix_warpgroup_reason(block_kv: int, stages: int, suffix_stages: int, seq_rows: int,
                            capacity: int, d: int, dtype=jnp.bfloat16) -> Optional[str]:
  """Why `tile_attention(suffix_warpgroup=True)` cannot take a folded suffix of seq_rows rows a
  sequence and this capacity (None when it can): the rows or capacity
  (`mosaic_suffix_warpgroup.unsupported_reason`), or the CTA's shared memory (`smem_bytes`)."""
  reason = suffix_wg.unsupported_reason(seq_rows, capacity)
  if reason is not None:
    return reason
  lay = suffix_wg.Layout(seq_rows=seq_rows, heads=0, d=d, stages=suffix_stages, splits=1,
                         scale_log2=0.0, interpret=False)
  smem = smem_bytes(block_kv, stages, d, dtype, swg=lay)
  if smem > SMEM_BYTES:
    return (f"{smem} bytes of shared memory a CTA (stages={stages}, suffix_stages="
            f"{suffix_stages}, {seq_rows} rows a sequence, D={d}) exceed {SMEM_BYTES}")
  return None


def tile_attention(q, k, v, tab, row_limits, *, scale: float, block_kv: int, stages: int,
                   splits: int, blocks_per_split: int, interpret: bool = False,
                   suffix: Optional[Suffix] = None, stagger: bool = False,
                   lead: Optional[int] = 0, layer=None, transposed: bool = False,
                   overlap: bool = False, heads: Optional[int] = None,
                   suffix_warpgroup: bool = False, suffix_stages: int = 2,
                   registers: tuple = (216, 24, 56)):
  """Runs the kernel. q [K, Tn*TILE, D] (rows of one node per tile), k, v [N,S,K,D] with
  S a multiple of block_kv, tab [Tn, 4] int32 (node, lo, hi, suffix hi) with lo/hi the min/max
  key limit of the tile's real rows, row_limits [Tn*TILE] int32 (0 for padding rows).
  Stacked caches: k, v [L,N,S,K,D] and `layer` (int32 scalar, may be traced) read layer
  `layer` in place, the table's nodes counted within the layer: the tables of all layers
  of a decode step are the same arrays (XLA does not hoist them out of a `lax.scan` over
  the layers by itself: H200 run 11).
  With `suffix` (a `Suffix`), split p also attends row group j's sequence in the suffix
  cache for the groups p*ceil(J/P) <= j < (p+1)*ceil(J/P), in the same softmax: the
  splits' merge then gives both levels merged; `lead` node steps (None: `stages`) run before
  the first suffix step (`MosaicConfig.suffix_lead`); `stagger` shifts where its suffix steps
  fall among the node's by a fraction of a step that differs between CTAs; `transposed` runs them
  as transposed products (the sequence's rows as wgmma's N: seq_rows <= SUFFIX_COLS);
  `overlap` software-pipelines the unmasked node steps (`MosaicConfig.node_overlap`).
  Returns out [P,K,Tn*TILE,D] in q's dtype and lse [P,K,Tn*TILE] float32 (natural log).

  heads = G (one of HEAD_GROUPS; `MosaicConfig.q_in_place`): q is [B*T,H,D] (H = G*K) as the
  model makes it, read in place, and out is [P,B*T,H,D], written in place: no packing launch
  before the kernel, no unpacking after it (the splits' merge is elementwise). Query rows go
  to tiles in order (B*T*G a multiple of TILE), and within each warpgroup's 64 tile rows by
  head: row gi*n + x (n = 64 // G) of warpgroup h of tile t is query row
  (t*TILE + h*64) // G + x at head kvh*G + gi. row_limits, tab, lse and the suffix's tables
  are in that tile-row order (`tile_rows_in_place` maps it to the packed rows).

  suffix_warpgroup (with `suffix`; `MosaicConfig.suffix_warpgroup`): the suffix runs on a
  fourth warpgroup (`mosaic_suffix_warpgroup`: `suffix_stages` slots of 32 keys, the four
  warpgroups' `registers`), and out, lse get P + 1 planes: planes [0, P) the node's key
  splits alone, plane P every row's suffix alone."""
  if heads is None:
    kh, r, d = q.shape
  else:
    if heads not in HEAD_GROUPS:
      raise ValueError(f"heads={heads!r}: q read in place takes G in {HEAD_GROUPS}")
    if transposed:
      raise ValueError("heads: transposed suffix steps take packed rows (pass heads=None)")
    if q.ndim != 3 or q.shape[1] != heads * k.shape[-2]:
      raise ValueError(f"q {list(q.shape)} read in place must be [B*T,H,D] with "
                       f"H = heads * K = {heads} * {k.shape[-2]}")
    bt, _, d = q.shape
    kh, r = k.shape[-2], bt * heads
  lead = stages if lead is None else lead
  if isinstance(lead, bool) or not isinstance(lead, int) or lead < 0:
    raise ValueError(f"lead must be a non-negative int or None, got {lead!r}")
  k, v, layer, n_stacked = _stacked("k", k, v, layer)
  n, s, _, _ = k.shape
  if r % TILE:
    raise ValueError(f"q rows ({r}) must be a multiple of {TILE} (tiles of one node)")
  if s % block_kv or s == 0:
    raise ValueError(f"k/v capacity S={s} must be a positive multiple of block_kv={block_kv}")
  num_tiles = r // TILE
  seq_rows = 1
  ns_stacked = 0
  if suffix is not None:
    ks, vs, slayer, ns_stacked = _stacked("suffix.k", suffix.k, suffix.v, suffix.layer)
    suffix = suffix._replace(k=ks, v=vs, layer=slayer)
    seq_rows = suffix.seq_rows
    reason = suffix_unsupported_reason(block_kv, seq_rows, suffix.k.shape[1])
    if reason is not None:
      raise ValueError(f"suffix: {reason}")
    groups = BLOCK_Q // seq_rows
    if heads is not None and seq_rows % heads:
      raise ValueError(f"suffix.seq_rows {seq_rows} is not T * heads (heads={heads})")
    if suffix.table.shape != (num_tiles, COMPUTE_WGS, groups, 2):
      raise ValueError(f"suffix.table shape {suffix.table.shape} != "
                       f"{(num_tiles, COMPUTE_WGS, groups, 2)}")
    if suffix.row_limits.shape != (r,):
      raise ValueError(f"suffix.row_limits shape {suffix.row_limits.shape} != {(r,)}")
    for name, x in (("suffix.k", suffix.k), ("suffix.v", suffix.v)):
      if x.dtype != q.dtype or x.shape[2:] != (kh, d) or x.shape != suffix.k.shape:
        raise ValueError(f"{name} {x.dtype.name}{list(x.shape)} does not match q "
                         f"({q.dtype.name}, K={kh}, D={d}) or suffix.k")
  dtype = q.dtype
  swg = None
  if suffix_warpgroup:
    if suffix is None:
      raise ValueError("suffix_warpgroup: there is no suffix to run (pass suffix=)")
    if transposed:
      raise ValueError("suffix_warpgroup: transposed suffix steps are the compute "
                       "warpgroups' (pass transposed=False)")
    reason = suffix_warpgroup_reason(block_kv, stages, suffix_stages, seq_rows,
                                     suffix.k.shape[1], d, dtype)
    if reason is not None:
      raise ValueError(f"suffix_warpgroup: {reason}")
    registers = suffix_wg.check_registers(registers)
    if interpret and max(os.cpu_count() or 1, jax.local_device_count()) < 4:
      log_once(("swg-interpret-threads",),
               "hydrax: the Mosaic GPU interpreter runs the suffix warpgroup's kernel as four "
               "threads that wait on each other, on XLA's CPU thread pool; with fewer than 4 "
               "cores and devices it can deadlock (set XLA_FLAGS="
               "--xla_force_host_platform_device_count=4 or more, as the tests do)")
    swg = suffix_wg.Layout(seq_rows=seq_rows, heads=heads or 0, d=d, stages=suffix_stages,
                           splits=splits, scale_log2=float(scale) * LOG2E,
                           interpret=interpret)
  transposed = bool(transposed and suffix is not None)
  if transposed and seq_rows > SUFFIX_COLS:
    raise ValueError(f"suffix: {seq_rows} query rows a sequence; transposed suffix steps take "
                     f"at most {SUFFIX_COLS} (pass transposed=False)")
  fold = suffix is not None and swg is None
  smem = smem_bytes(block_kv, stages, d, dtype, fold=fold, transposed=transposed, swg=swg)
  if smem > SMEM_BYTES:
    raise ValueError(f"stages={stages} (MosaicConfig.stages): the CTA would take {smem} bytes "
                     f"of shared memory (block_kv={block_kv}, D={d}), over {SMEM_BYTES}")

  def entry(tab_ref, lim_ref, layer_ref, q_ref, k_ref, v_ref, *rest):
    suffix_refs, (o_ref, lse_ref) = rest[:-2], rest[-2:]
    body = functools.partial(_kernel, tab_ref, lim_ref, layer_ref, q_ref, k_ref, v_ref,
                             suffix_refs, o_ref, lse_ref, layer_nodes=(n_stacked, ns_stacked),
                             block_kv=block_kv, stages=stages,
                             blocks_per_split=blocks_per_split,
                             scale_log2=float(scale) * LOG2E, interpret=interpret,
                             seq_rows=seq_rows, splits=splits, stagger=stagger, lead=lead,
                             transposed=transposed, overlap=bool(overlap), heads=heads or 0,
                             swg=swg, registers=registers if swg else (232, 40))
    pl.run_scoped(
        lambda *scoped: body(scoped),
        *_allocations(d, dtype, block_kv, stages, fold=fold, transposed=transposed,
                      q_copies=heads or 1, swg=swg),
        collective_axes="wg",
    )

  kwargs = {}
  if interpret:
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    kwargs["interpret"] = InterpretGPUParams()
  extra = () if suffix is None else (suffix.row_limits, suffix.table, suffix.layer, suffix.k,
                                     suffix.v)
  planes = splits + (swg is not None)
  # With q in place the kernel sees q as [B*T, H*D] and out as [P, B*T, H*D] (bitcasts): a
  # query head's rows are then a 2-D window of each, which jax 0.11.2's Mosaic GPU layout
  # inference takes (an integer index between sliced axes of a copy failed its divisibility
  # check: H200 run 18, call 1).
  q_in = q if heads is None else q.reshape(q.shape[0], -1)
  out, lse = plgpu.kernel(
      entry,
      out_type=(jax.ShapeDtypeStruct((planes, kh, r, d) if heads is None
                                     else (planes,) + q_in.shape, dtype),
                jax.ShapeDtypeStruct((planes, kh, r), jnp.float32)),
      grid=(num_tiles, splits, kh),
      grid_names=("tile", "split", "kvh"),
      num_threads=COMPUTE_WGS + 1 + (swg is not None),
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      **kwargs,
  )(tab, row_limits, layer, q_in, k, v, *extra)
  return (out if heads is None else out.reshape((planes,) + q.shape)), lse
