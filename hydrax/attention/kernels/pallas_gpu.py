"""The `pallas` backend: grouped flash attention in Pallas, lowered through Triton on GPUs.

Axis letters: B sequences, T queries per sequence, S keys (a node's capacity), H = K*G query
heads, K KV heads, D head dim (Dp: padded to a power of two >= 16), N nodes, R = B*T*G rows
per KV head, M rows per tile (block_m), P key splits.

One kernel serves every level (the contract is in `hydrax.attention.xla`). For KV head k the
R rows of queries are the T*G rows (t, g) of every sequence, sequences sorted by node
(`grouping.py`): a shared level stacks the queries of all sequences of a node and all G query
heads of a KV head into the M dimension of one product with that node's keys (Hydragen's
inter-sequence batching); the per-sequence level is the case N = B. Each program takes one tile
of <= M rows of one node, one KV head and one key split, and runs a flash-attention loop in
float32 (online softmax in base 2) over key blocks of Sb keys, up to the largest key limit of
its rows: blocks below the smallest limit need no mask, the rest are masked per row; loads past
S are masked (no padding of S, no rejected lengths). Rows with no visible key give out = 0 and
lse = -inf, never NaN. With few programs (small batch, long prefix) the keys are split in P
parts whose results are merged through their LSEs.

Sharing structure is data: with concrete (NumPy) owners the tile table is a compile-time
constant (exactly the tiles needed); with traced owners it is computed at run time (argsort,
counts, tile starts; `grouping.py`) for a static upper bound of tiles, and the programs of
the unused tiles (no rows) exit at once. A new tree of the same shapes reuses the compiled
program. Stacked caches (`layer=`: k, v [L,N,S,K,D], the layer an int32 scalar that may be
traced) are read in place: the kernels see the stack as L*N nodes (a bitcast) and the tile
table's nodes carry the offset layer*N, so no copy of a layer is made.

Configuration is an explicit value: `Config` (frozen, hashable) travels on the registered
`Backend` (`backends.get("pallas", **changes)`, or `configure(**changes)`, which returns the
same) and is a static argument of every jit here; nothing global changes.

Lowering (`Config.lowering`): Triton (`jax.experimental.pallas.triton.CompilerParams`) on CUDA
and ROCm, Hopper and older GPUs alike; on Hopper, "auto" sends stacked shared levels (on
average >= 96 rows per node and KV head from the static shapes, T*G*B / min(N, B); bf16/fp16,
D 64/128; concrete or traced owners) to the Mosaic GPU kernel in `mosaic_gpu.py` (TMA + wgmma
+ warp specialisation: 547-579 TFLOP/s on the stacked product on the H200, where this Triton
kernel reached 390-500). Elsewhere (CPU) the kernels run in interpret mode (slow; for tests).
Gradients go through the XLA backend (recomputed in the backward pass). Measurements:
experiments/results/attention_microbench/NOTES.md.

Small shapes (`all_levels`, `Config.path`): when sharing would save fewer key/value bytes
than `Config.path_crossover_bytes` (short prefixes, few sequences), the grouped levels' fixed
costs (a launch per level, packing, tile bounds, merges: ~45 us at 1K/16 on the H200) lose to
reading the prefix once per sequence, and the whole call runs as one launch of the path
kernel (`path_gpu.py`). Otherwise `all_levels` returns None and the levels run one by one.

Merging the levels (`grouped_levels`, `Config.finish`): a call's levels run on their own
kernels (Mosaic GPU for the stacked root, Triton for the rest), but their rows are packed in
one order, that of the one level whose owners spread over several nodes (a one-node level
and the per-sequence level can take any order), so every level's partial results, key splits
included, merge in one XLA pass and are unpacked once.
Calls with two such levels run level by level. At decode (T = 1) a one-node level and the
per-sequence level need no tables at all (`Regular`): a program finds its rows, node and key
limit (its node's length) from its id, the order, the layer and the lengths, so nothing runs
before their launch but the packing of q. On the H200 at B = 256 the launches around the
two kernels went from 12 small fusions (~29 us serialised of a 182 us call at 16K/256) to 6
(~16 us of 167 us; experiments/results/fused_h200, run 8's profiles); with
`Config.merge_in_kernel` the per-sequence level, run last, merges the others' results in its
kernel and writes the final out and lse, so the merge's two fusions go, but that kernel grows
by as much (opt-in; run 9's profile: 165.6 against 165.5 us at 16K/256). `Config.level_stream`
puts the per-sequence level on its own GPU stream so that XLA may overlap it with the shared
levels (no gain measured beyond the run-to-run spread: the Mosaic root holds 128 of 132 SMs).

Folding (`MosaicConfig.fold_suffix`, on by default): the per-sequence level of a call whose
root runs on the Mosaic GPU kernel (system prompt + suffixes, one problem sampled many times,
and deeper trees whose middle levels run on Triton) runs inside the root's one launch: each
CTA attends its rows' suffixes in the same online softmax as its node's keys
(`mosaic_gpu.Suffix`, `_fold_levels`), so the suffix kernel, its packing and the levels'
merge go (one merge of key splits is left). A Mosaic CTA fills an SM's registers and shared
memory, so no other kernel can run beside it: the root's matrix products and the suffixes'
HBM reads overlap only inside one kernel. H200, B = 256, decode: the launch 57.0 us at 4K
against 31.3 + 37.4 us for the two kernels, 139.0 against 111.4 + 37.9 at 16K; device time
0.78-0.94x the unfolded levels' (experiments/results/fused_h200 runs 10-11).

`hydragen_attention_fused` runs all levels in one launch and merges in the packed row layout:
faster for small batches (fewer launches), slower for large ones (measured; see NOTES.md).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from hydrax._log import log_once
from hydrax.attention import backends, checks, prepared, xla
from hydrax.attention.merge import merge as merge_parts
from hydrax.attention.checks import concrete
from hydrax.attention.kernels import flash, fused_worklist, grouping, mosaic_gpu, path_gpu

_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
# Cost rule of the small-shape path (`all_levels`): the bytes sharing saves under which the
# path kernel runs. Measured on the H200 (experiments/results/fused_h200/run6, decode T=1,
# 32/8 heads, D=128, bf16, suffix 128; the path kernel's first version against the grouped
# levels): the path won at 63 and 65 MB saved (1K/16: 35.6 vs 50.8 us; 512/32: 42.0 vs
# 55.3 us), the grouped levels from 252 MB (4K/16: 58.4 vs 76.6 us) up; 128 MiB lies between
# (the script's suggestion, their geometric mean: 127.9 MB).
PATH_CROSSOVER_BYTES = 128 << 20


@dataclasses.dataclass(frozen=True)
class Config:
  """Tuning knobs; None picks by shape (see `_plan`). Block sizes are powers of two >= 16."""
  block_m: Optional[int] = None      # M, rows per tile
  max_block_m: int = 256             # cap on the automatic M
  block_n: Optional[int] = None      # Sb, keys per block (overrides the tables below)
  num_warps: Optional[int] = None
  num_stages: Optional[int] = None
  # Wide tiles (M*Dp >= 64*128: stacked shared levels, prefill; matrix bound): (block_n,
  # num_stages), with M/32 warps (4 to 8: one warpgroup per 128 rows). Narrow tiles (decode
  # rows of one sequence; memory bound): (block_n, num_warps, num_stages).
  # Defaults: the best of the sweeps on the H200 (experiments/results/attention_microbench).
  wide: tuple = (64, 3)
  narrow: tuple = (64, 4, 2)
  splits: Optional[int] = None       # P, key splits; None: enough programs to fill the GPU
  target_programs: Optional[int] = None  # concurrent programs; None: 1 (wide) or 2 per SM
  # Where each tile's min/max key limit comes from: "xla" (a small reduction before the
  # launch, loaded as two scalars) or "kernel" (reduced from the tile's row limits in-kernel).
  tile_bounds: str = "xla"
  interpret: Optional[bool] = None   # None: interpret unless the default backend is a GPU
  poison: bool = False               # debug: outputs start as NaN (checks every row is written)
  # Lowering of a level: "auto" (Mosaic GPU for stacked shared levels on Hopper, Triton for the
  # rest), "triton" (always), "mosaic" (Mosaic GPU wherever its kernel takes the input, also in
  # interpret mode off GPU: tests; there, several interpreted levels under one outer jit have
  # deadlocked jax's Mosaic GPU interpreter on a 2-core machine). Inputs it cannot take go to
  # Triton (logged once).
  lowering: str = "auto"
  mosaic: mosaic_gpu.MosaicConfig = mosaic_gpu.MosaicConfig()   # (a dict: MosaicConfig(**it))
  # Stacked caches (`layer=`): read layer `layer` of k, v [L,N,S,K,D] in place (True) or slice
  # it out first (False: one copy of the layer; for measuring what the in-place read saves).
  layer_in_place: bool = True
  # The small-shape path (`path_gpu`: each sequence's whole tree path in one launch, no
  # sharing): "auto" takes it when sharing would save fewer key/value bytes than
  # path_crossover_bytes (see `all_levels`), "always" whenever the kernel takes the call,
  # "off" never (the levels run one by one through the grouped kernel).
  path: str = "auto"
  path_crossover_bytes: int = PATH_CROSSOVER_BYTES
  # The path kernel splits keys until it runs this many programs an SM (`path_gpu.make_plan`;
  # `splits` overrides it).
  path_programs_per_sm: int = 2
  # Consecutive sequences one path program takes (`path_gpu.make_plan`; a power of two):
  # sequences of a group that share a node read its keys once; None fills the 16-row
  # minimum of a Triton product (4 sequences at G = 4). 1 (one sequence a program) is the
  # default: groups of 4 read 3x fewer bytes from L2 at 1K/16 but ran no faster on the H200
  # (18.0 / 18.8 us against 17.3 / 17.9 us at 1K/16 and 512/32: the kernel is bound by the
  # latency of its short dependent loops, not by L2; experiments/results/fused_h200 run 9).
  path_group: Optional[int] = 1
  # How the grouped levels' results are merged: "once" (levels that can share a row order
  # are packed in it and one XLA pass merges every key split of every level and unpacks:
  # `grouped_levels`), "per_level" (each level merged and unpacked on its own, then the
  # levels merged: more launches; kept to measure what "once" saves).
  finish: str = "once"
  # With finish "once": 0, or the GPU stream (>= 1) that per-sequence levels run on
  # (`jax.experimental.compute_on("gpu_stream:n")`), so that XLA may run them beside the
  # shared levels (memory-bound beside matrix-bound work) instead of after them. Never
  # faster on the H200 (run 9), and on jax 0.11.2 a three-level tree with G = 8 failed in
  # XLA's stream assignment ("No ExecutionStreamId found for call-start"; run 11).
  level_stream: int = 0
  # With finish "once": decode levels (T = 1) of one node or one node per sequence find their
  # tiles, nodes and key limits in-kernel (`Regular`) instead of from tables built by XLA
  # before the launch (off: the tables, as for every other level; for measuring).
  regular_tiles: bool = True
  # With regular tiles: the per-sequence level (run last) merges the other levels' results
  # into its own in the kernel and writes the final out and lse (no XLA merge after it), when
  # it runs one key split and the others' rows need no gather. Off by default: on the H200 the
  # kernel grew by the 7 us the XLA merge took (run 9).
  merge_in_kernel: bool = False
  # The grouped levels' tables (layouts, tile tables and bounds, row orders, slots) built by
  # `prepare_levels` once for all the calls that share them (the layers of a decode step:
  # `hydrax.attention.prepare`) instead of in every call (off: `prepare_levels` returns None;
  # for measuring what it saves).
  prepare_tables: bool = True

  def __post_init__(self):
    # JSON-friendly forms (benchmark flags) become the hashable ones.
    if isinstance(self.mosaic, dict):
      object.__setattr__(self, "mosaic", mosaic_gpu.MosaicConfig(**self.mosaic))
    for name in ("wide", "narrow"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    if self.lowering not in ("auto", "triton", "mosaic"):
      raise ValueError(f"lowering must be 'auto', 'triton' or 'mosaic', got {self.lowering!r}")
    if self.tile_bounds not in ("xla", "kernel"):
      raise ValueError(f"tile_bounds must be 'xla' or 'kernel', got {self.tile_bounds!r}")
    if self.path not in ("auto", "always", "off"):
      raise ValueError(f"path must be 'auto', 'always' or 'off', got {self.path!r}")
    if self.path_crossover_bytes < 0:
      raise ValueError(f"path_crossover_bytes must be >= 0, got {self.path_crossover_bytes}")
    if self.finish not in ("once", "per_level"):
      raise ValueError(f"finish must be 'once' or 'per_level', got {self.finish!r}")
    if self.level_stream < 0:
      raise ValueError(f"level_stream must be >= 0, got {self.level_stream}")
    if self.path_programs_per_sm < 1:
      raise ValueError(f"path_programs_per_sm must be >= 1, got {self.path_programs_per_sm}")
    if self.path_group is not None and (self.path_group < 1
                                        or self.path_group & (self.path_group - 1)):
      raise ValueError(f"path_group must be None or a power of two >= 1, got {self.path_group}")


def configure(**changes) -> backends.Backend:
  """The `pallas` backend with these configuration fields replaced (a hashable value to pass
  as `backend=`): `hydragen_attention(q, levels, backend=configure(block_n=128))` is
  `backends.get("pallas", block_n=128)`. Changes nothing global."""
  return backends.get("pallas", **changes)


def _interpret(cfg: Config) -> bool:
  if cfg.interpret is not None:
    return cfg.interpret
  platform = jax.default_backend()
  if platform in ("gpu", "cuda", "rocm"):
    return False
  log_once(("pallas-interpret", platform),
           "hydrax pallas backend: no GPU (default backend %r), running the kernels in Pallas "
           "interpret mode (slow; meant for tests)", platform)
  return True


def _num_sms() -> int:
  try:
    return int(getattr(jax.devices()[0], "core_count", 0)) or 132
  except Exception:  # pragma: no cover - no device at all
    return 132


@dataclasses.dataclass(frozen=True)
class _Plan:
  block_m: int
  block_n: int
  num_warps: int
  num_stages: int
  splits: int
  blocks_per_split: int


def _rows_per_node(q_shape, n: int, kh: int, owner) -> float:
  """Query rows per node and KV head (T*G per sequence; a shared level stacks B/N sequences)."""
  b, t, h, _ = q_shape
  return t * (h // kh) * (1 if owner is None else b / max(1, min(n, b)))


def _is_hopper() -> bool:
  dev = jax.devices()[0]
  cc = str(getattr(dev, "compute_capability", ""))
  if cc:
    return cc.split(".")[0] == "9"
  kind = str(getattr(dev, "device_kind", ""))
  return any(x in kind for x in ("H100", "H200", "H800", "GH200"))


def _smem_budget() -> int:
  """Shared memory a program may plan for: Hopper allows 227 KiB a block, Ampere 163 KiB;
  Triton needs some for itself, so keep a margin."""
  return 200 * 1024 if _is_hopper() else 150 * 1024


def _smem_bytes(bm: int, bn: int, dp: int, stages: int, itemsize: int) -> int:
  """Estimated shared memory of a tile program: the q tile plus `stages` k and v blocks."""
  return (bm * dp + stages * 2 * bn * dp) * itemsize


def _max_block_m(cfg: Config, dp: int, itemsize: int) -> int:
  """The largest M whose q tile and one stage of 16-key blocks fit the shared-memory budget."""
  bm = cfg.max_block_m
  while bm > 16 and _smem_bytes(bm, 16, dp, 1, itemsize) > _smem_budget() // 2:
    bm //= 2
  return bm


def _plan(cfg: Config, rows_per_node: float, num_tiles: int, kv_heads: int, s: int, dp: int,
          interpret: bool, itemsize: int = 2) -> _Plan:
  """Block sizes, warps, stages and split count for one call (all static). Stages, then the
  key block, shrink until the program fits the shared-memory budget (float32 tiles are twice
  the bytes of bf16 ones)."""
  bm = cfg.block_m or min(_max_block_m(cfg, dp, itemsize),
                          flash.pow2_at_least(math.ceil(rows_per_node)))
  wide = bm * dp >= 64 * 128
  if wide:
    (tbn, tstages), twarps = cfg.wide, min(8, max(4, bm // 32))
  else:
    tbn, twarps, tstages = cfg.narrow
  bn = cfg.block_n or min(tbn, flash.pow2_at_least(s))
  warps = cfg.num_warps or twarps
  stages = cfg.num_stages or tstages
  if not interpret:
    budget = _smem_budget()
    while (_smem_bytes(bm, bn, dp, stages, itemsize) > budget and not cfg.num_stages
           and stages > 1):
      stages -= 1
    while _smem_bytes(bm, bn, dp, stages, itemsize) > budget and not cfg.block_n and bn > 16:
      bn //= 2
  nblk = -(-s // bn)
  programs = max(1, num_tiles * kv_heads)
  if cfg.splits:
    splits = cfg.splits
  elif interpret:
    splits = 1
  else:
    # Concurrent programs per SM, by tile area (shared memory and registers): 1 at M*Dp =
    # 128*128 and above, 2 at 64*128, up to 4 for narrow tiles.
    slots = cfg.target_programs or _num_sms() * min(4, max(1, (128 * 128) // (bm * dp)))
    splits = _choose_splits(programs, nblk, slots)
  splits = max(1, min(splits, nblk))
  bps = -(-nblk // splits)
  splits = -(-nblk // bps)
  for name, val in (("block_m", bm), ("block_n", bn)):
    if val < 16 or val & (val - 1):
      raise ValueError(f"pallas backend: {name} must be a power of two >= 16, got {val}")
  return _Plan(bm, bn, warps, stages, splits, bps)


def _busy_tiles(layout: grouping.Layout, rows: int) -> int:
  """Tiles that hold rows, for planning key splits: all of a static layout's; for a runtime
  table (traced owners) the fewest that can hold `rows` rows, not its static bound, whose
  unused tiles exit at once. Planning for the bound halved the splits of balanced trees and
  left half the programs idle (H200, B=256, 16 nodes: traced owners ran 2.65x static)."""
  if isinstance(layout.count, np.ndarray):
    return layout.num_tiles
  return min(layout.num_tiles, -(-rows // layout.block_m))


def _choose_splits(programs: int, nblk: int, slots: int, min_blocks: int = 4) -> int:
  """Key splits P for `programs` (tiles x KV heads) on `slots` concurrent programs.

  Makespan model: each program's work shrinks as 1/P and runs in whole waves of `slots`, so
  t(P) = ceil(programs * P / slots) / P. Takes the smallest P within 10% of the best t (every
  split adds partial outputs to merge), with >= min_blocks key blocks per split.
  """
  cands = range(1, max(1, nblk // min_blocks) + 1)
  t = {p: math.ceil(programs * p / slots) / p for p in cands}
  best = min(t.values())
  return min(p for p in cands if t[p] <= 1.1 * best)


class _Spec(NamedTuple):
  """Static parameters of one level's programs."""
  block_m: int
  block_n: int
  blocks_per_split: int
  splits: int
  num_tiles: int
  kv_heads: int
  scale_log2: float
  exact: bool              # float32 inputs: IEEE products (no TF32)
  bounds_in_kernel: bool   # tile key-limit bounds reduced in-kernel (else loaded)
  skip_empty: bool         # the tile table is a runtime one (traced owners): tiles may be empty
  # None, or the level's tiles found in-kernel (`Regular`): no tile table, row limits or tile
  # bounds are computed before the launch.
  regular: Optional["Regular"] = None
  # Key splits of each earlier level's partial results that this (regular, per-sequence,
  # one split) level merges into its own before it writes the final out and lse: the
  # levels' merge inside the kernel (`Config.merge_in_kernel`). Empty: none.
  priors: tuple = ()

  @property
  def num_inputs(self) -> int:
    if self.regular is None:
      return _INS
    return 4 + self.regular.has_order + self.regular.stacked + 2 * len(self.priors)


class Regular(NamedTuple):
  """A decode level (T = 1) whose tiles follow from the program id: its rows are `nodes`
  runs of `rows_per_node` rows (one node: all R rows; one node per sequence: T*G rows each),
  `tiles_per_node` tiles a run. The run at row position p is node order[p] (has_order: the
  rows follow another level's order), else p (per-sequence) or 0 (one node); plus layer * N
  for a stacked cache read in place. Every row of a single query sees all of its node's
  keys, so each row's key limit, and the tile's bounds, are the node's length."""
  rows_per_node: int
  tiles_per_node: int
  per_sequence: bool
  has_order: bool
  stacked: bool
  nodes: int               # N, for the layer offset


_INS = 9     # per level: node, start, count, lo, hi (tiles), row limits, q, k, v
             # (regular levels: [order], [layer], lengths, q, k, v)


def _tile_program(refs, i, j, kh, spec: _Spec):
  """Attention of tile i (<= M rows of one node), key split j, KV head kh.

  refs: node, start, count, lo, hi [num_tiles] int32 (lo/hi: min/max key limit of the tile's
  rows, unused when spec.bounds_in_kernel); rowlim [R] int32; q [K,R,Dp]; k, v [N',S,K,Dp]
  (N' = L*N for a stacked cache read in place: the table's nodes then carry the layer offset);
  o [P,K,R,Dp] f32 (normalised), lse [P,K,R] f32 (natural log; -inf where no key is seen).
  """
  if spec.skip_empty:
    # A runtime tile table has a static number of tiles, an upper bound: the unused ones have
    # no rows, and their programs exit here.
    pl.when(refs[2][i] > 0)(lambda: _tile_body(refs, i, j, kh, spec))
  else:
    _tile_body(refs, i, j, kh, spec)


def _regular_tile(refs, i, spec: _Spec):
  """(local node, node in the cache, start, count, limit) of tile i of a `Regular` level,
  from its refs ([order], [layer], lengths)."""
  reg, block_m = spec.regular, spec.block_m
  run = lax.div(i, reg.tiles_per_node)
  j = lax.rem(i, reg.tiles_per_node)
  local, node, pos = flash.level_node(refs, 0, run, run if reg.per_sequence else jnp.int32(0),
                                      mapped=reg.has_order, stacked=reg.stacked,
                                      nodes=reg.nodes)
  length = refs[pos][local]
  start = run * reg.rows_per_node + j * block_m
  count = jnp.minimum(block_m, reg.rows_per_node - j * block_m)
  return local, node, start, count, length


def _tile_body(refs, i, j, kh, spec: _Spec):
  priors = refs[len(refs) - 2 - 2 * len(spec.priors):len(refs) - 2]
  refs = refs[:len(refs) - 2 - 2 * len(spec.priors)] + refs[len(refs) - 2:]
  *ins, q_ref, k_ref, v_ref, o_ref, lse_ref = refs
  block_m, block_n = spec.block_m, spec.block_n
  s_cap = k_ref.shape[1]
  rows = jnp.arange(block_m, dtype=jnp.int32)
  if spec.regular is not None:
    _, node, start, count, lo = _regular_tile(ins, i, spec)
    hi = lo
    row_ok = rows < count
    lim = jnp.where(row_ok, lo, 0)
  else:
    node_ref, start_ref, count_ref, lo_ref, hi_ref, rowlim_ref = ins
    node, start, count = node_ref[i], start_ref[i], count_ref[i]
    row_ok = rows < count
    lim = plt.load(rowlim_ref.at[pl.ds(start, block_m)], mask=row_ok, other=0)
    if spec.bounds_in_kernel:
      lo = jnp.min(jnp.where(row_ok, lim, jnp.iinfo(jnp.int32).max))  # blocks below: no mask
      hi = jnp.max(jnp.where(row_ok, lim, 0))                           # from here: none
    else:
      lo, hi = lo_ref[i], hi_ref[i]
  rsl = pl.ds(start, block_m)
  q = plt.load(q_ref.at[kh, rsl, :], mask=row_ok[:, None], other=0)
  dp = q.shape[-1]
  precision = lax.Precision.HIGHEST if spec.exact else lax.Precision.DEFAULT

  def step(blk, carry, masked):
    s0 = blk * block_n
    ksl = pl.ds(s0, block_n)
    visible = None
    if masked:
      keys = s0 + jnp.arange(block_n, dtype=jnp.int32)
      kv_ok = (keys < hi)[:, None]          # hi <= length <= S: also guards loads past S
      kb = plt.load(k_ref.at[node, ksl, kh, :], mask=kv_ok, other=0)
      vb = plt.load(v_ref.at[node, ksl, kh, :], mask=kv_ok, other=0)
      visible = keys[None, :] < lim[:, None]
    else:
      kb = plt.load(k_ref.at[node, ksl, kh, :])
      vb = plt.load(v_ref.at[node, ksl, kh, :])
    return flash.softmax_step(carry, q, kb, vb, scale_log2=spec.scale_log2,
                              precision=precision, visible=visible)

  b_first = j * spec.blocks_per_split
  b_end = jnp.minimum(b_first + spec.blocks_per_split, lax.div(hi + block_n - 1, block_n))
  b_full = jnp.clip(lax.div(jnp.minimum(lo, s_cap), block_n), b_first,
                    jnp.maximum(b_end, b_first))
  carry = flash.initial_carry(block_m, dp)
  carry = lax.fori_loop(b_first, b_full, functools.partial(step, masked=False), carry)
  carry = lax.fori_loop(b_full, b_end, functools.partial(step, masked=True), carry)
  out, lse = flash.finish(carry)
  if spec.priors:
    _merge_and_store(priors, spec, ins, i, kh, rsl, row_ok, out, lse, o_ref, lse_ref)
    return
  plt.store(o_ref.at[j, kh, rsl, :], out.astype(o_ref.dtype), mask=row_ok[:, None])
  plt.store(lse_ref.at[j, kh, rsl], lse, mask=row_ok)


def _merge_and_store(priors, spec: _Spec, ins, i, kh, rsl, row_ok, out, lse, o_ref, lse_ref):
  """The levels' merge in the kernel (`_Spec.priors`): this tile's rows of every earlier
  level's key splits (priors: (out [P,K,R,D], lse [P,K,R]) pairs, packed in this level's row
  order) merged with its own result, written as the final out [B,K,G,D] (q's dtype) and lse
  [B,K,G] at the tile's sequence (one tile a sequence: T = 1, G <= M)."""
  outs, lses = [out], [lse]
  for o_prior, lse_prior in zip(priors[0::2], priors[1::2]):
    for s in range(o_prior.shape[0]):
      split = jnp.int32(s)
      outs.append(plt.load(o_prior.at[split, kh, rsl, :], mask=row_ok[:, None],
                           other=0).astype(jnp.float32))
      lses.append(plt.load(lse_prior.at[split, kh, rsl], mask=row_ok, other=-jnp.inf))
  out, lse = flash.merge_list(outs, lses)
  seq = _regular_tile(ins, i, spec)[0]          # a per-sequence level's node: its sequence
  rows = pl.ds(0, spec.block_m)
  plt.store(o_ref.at[seq, kh, rows, :], out.astype(o_ref.dtype), mask=row_ok[:, None])
  plt.store(lse_ref.at[seq, kh, rows], lse, mask=row_ok)


def _kernel(*refs, specs):
  """All levels' programs in one 1-D grid, level after level; program -> (level, tile, split,
  KV head), tiles fastest (programs that share a node's key block run close in time).
  Refs: each level's inputs (`_Spec.num_inputs`), then any poisoned inputs aliased to the
  outputs, then the outputs (o, lse) per level."""
  n = len(specs)
  outs = refs[len(refs) - 2 * n:]
  pid = pl.program_id(0)
  base = first = 0
  for lvl, spec in enumerate(specs):
    count = spec.num_tiles * spec.splits * spec.kv_heads
    level_refs = refs[first:first + spec.num_inputs] + outs[2 * lvl:2 * lvl + 2]
    first += spec.num_inputs

    def run(level_refs=level_refs, spec=spec, base=base):
      idx = pid - base
      i = lax.rem(idx, spec.num_tiles)
      rest = lax.div(idx, spec.num_tiles)
      _tile_program(level_refs, i, lax.rem(rest, spec.splits), lax.div(rest, spec.splits),
                    spec)

    if n == 1:
      run()
    else:
      pl.when(jnp.logical_and(pid >= base, pid < base + count))(run)
    base += count


class LevelInput(NamedTuple):
  """One level for `grouped_attention`: qp [K,R,Dp] packed rows (q dtype), k, v [N,S,K,Dp],
  row_limits [R] int32 (keys of its node visible to each row), the row layout and the plan;
  regular: None, or (`Regular`, order [B] or None, layer [1] or None, lengths [N]) for a level
  whose tiles the kernel finds itself (row_limits and the layout's tables then unused)."""
  qp: jax.Array
  k: jax.Array
  v: jax.Array
  row_limits: jax.Array
  layout: grouping.Layout
  plan: "_Plan"
  regular: Optional[tuple] = None
  # With `regular` (per-sequence, one key split, T = 1): earlier levels' (out [P,K,R,Dp],
  # lse [P,K,R]) in this level's row order, merged in the kernel (`_merge_and_store`); the
  # level's results are then the final out [B,K,G,Dp] (qp's dtype) and lse [B,K,G].
  priors: tuple = ()
  # The tiles' (lo, hi) key bounds when computed beforehand (`_TritonTables.bounds`); None:
  # computed here (tile_bounds "xla") or in the kernel ("kernel").
  bounds: Optional[tuple] = None


def _tile_bounds(layout: grouping.Layout, row_limits):
  """(lo, hi) [num_tiles] int32: min and max of row_limits [R] over each tile's rows (0, 0 for
  a tile with no rows)."""
  m = layout.block_m
  idx = jnp.asarray(layout.start)[:, None] + jnp.arange(m, dtype=jnp.int32)[None, :]
  valid = jnp.arange(m, dtype=jnp.int32)[None, :] < jnp.asarray(layout.count)[:, None]
  lim = jnp.take(row_limits, jnp.minimum(idx, row_limits.shape[0] - 1), axis=0)
  lo = jnp.min(jnp.where(valid, lim, jnp.iinfo(jnp.int32).max), axis=1)
  hi = jnp.max(jnp.where(valid, lim, 0), axis=1)
  return jnp.where(hi > 0, lo, 0).astype(jnp.int32), hi.astype(jnp.int32)


def grouped_attention(levels, *, scale: float, interpret: bool, poison: bool = False,
                      tile_bounds: str = "xla", combine: bool = True):
  """Runs the kernel for one or more levels in one launch (levels run concurrently).

  levels: LevelInput list. poison: outputs start as NaN (aliased inputs), so that rows the
  kernel never writes show. tile_bounds: "xla" or "kernel" (see Config).
  Returns per level (out [K,R,Dp] f32, lse [K,R] f32 natural log); with combine=False the key
  splits unmerged: (out [P,K,R,Dp], lse [P,K,R]).
  """
  specs, args, out_shape = [], [], []
  for lv in levels:
    kh, r, dp = lv.qp.shape
    if lv.layout.block_m != lv.plan.block_m:
      raise ValueError(f"layout.block_m={lv.layout.block_m} != plan.block_m={lv.plan.block_m}")
    if tile_bounds not in ("xla", "kernel"):
      raise ValueError(f"tile_bounds must be 'xla' or 'kernel', got {tile_bounds!r}")
    in_kernel = tile_bounds == "kernel"
    reg = None if lv.regular is None else lv.regular[0]
    if lv.priors and (reg is None or not reg.per_sequence or reg.tiles_per_node != 1
                      or lv.plan.splits != 1):
      raise ValueError("priors need a regular per-sequence level of one tile a sequence and "
                       f"one key split, got {reg} with {lv.plan.splits} splits")
    specs.append(_Spec(lv.plan.block_m, lv.plan.block_n, lv.plan.blocks_per_split,
                       lv.plan.splits, lv.layout.num_tiles, kh, float(scale) * flash.LOG2E,
                       lv.qp.dtype == jnp.float32, in_kernel,
                       reg is None and not isinstance(lv.layout.count, np.ndarray), reg,
                       tuple(o.shape[0] for o, _ in lv.priors)))
    if reg is not None:
      _, order, layer, lengths = lv.regular
      args += [x for x in (order, layer) if x is not None] + [lengths, lv.qp, lv.k, lv.v]
      args += [x for pair in lv.priors for x in pair]
      if lv.priors:
        g = reg.rows_per_node
        out_shape += [jax.ShapeDtypeStruct((r // g, kh, g, dp), lv.qp.dtype),
                      jax.ShapeDtypeStruct((r // g, kh, g), jnp.float32)]
      else:
        out_shape += [jax.ShapeDtypeStruct((lv.plan.splits, kh, r, dp), jnp.float32),
                      jax.ShapeDtypeStruct((lv.plan.splits, kh, r), jnp.float32)]
      continue
    tiles = [jnp.asarray(x, jnp.int32) for x in (lv.layout.node, lv.layout.start,
                                                 lv.layout.count)]
    if in_kernel:
      bounds = tiles[1:3]
    else:
      bounds = list(_tile_bounds(lv.layout, lv.row_limits) if lv.bounds is None else lv.bounds)
    args += tiles + bounds
    args += [lv.row_limits.astype(jnp.int32), lv.qp, lv.k, lv.v]
    out_shape += [jax.ShapeDtypeStruct((lv.plan.splits, kh, r, dp), jnp.float32),
                  jax.ShapeDtypeStruct((lv.plan.splits, kh, r), jnp.float32)]
  aliases = {}
  if poison:
    aliases = {len(args) + i: i for i in range(len(out_shape))}
    args += [jnp.full(o.shape, jnp.nan, o.dtype) for o in out_shape]
  total = sum(sp.num_tiles * sp.splits * sp.kv_heads for sp in specs)
  plan = levels[0].plan          # the first (widest) level sets warps and stages
  outs = pl.pallas_call(
      functools.partial(_kernel, specs=tuple(specs)),
      grid=(total,),
      out_shape=out_shape,
      compiler_params=None if interpret else plt.CompilerParams(
          num_warps=plan.num_warps, num_stages=plan.num_stages),
      interpret=interpret,
      input_output_aliases=aliases,
      name="hydrax_grouped_attention",
  )(*args)
  parts = [(outs[2 * i], outs[2 * i + 1]) for i in range(len(levels))]
  if not combine:
    return parts
  return [p if lv.priors else flash.combine_splits(*p) for p, lv in zip(parts, levels)]


def _pack(q, order, kh, dp):
  """q [B,T,H,D] -> [K,R,Dp] rows (sequence in `order`, t, g)."""
  b, t, h, d = q.shape
  if dp != d:
    q = jnp.pad(q, ((0, 0), (0, 0), (0, 0), (0, dp - d)))
  q5 = q.reshape(b, t, kh, h // kh, dp)
  if order is not None:
    q5 = jnp.take(q5, jnp.asarray(order), axis=0)
  return jnp.transpose(q5, (2, 0, 1, 3, 4)).reshape(kh, b * t * (h // kh), dp)


def _inverse(order):
  if isinstance(order, np.ndarray):
    inv = np.empty_like(order)
    inv[order] = np.arange(order.shape[0], dtype=order.dtype)
    return inv
  return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))


def _unpack(out, lse, order, shape, dtype=jnp.float32, inverse=None):
  """Inverse of `_pack`: out [K,R,Dp], lse [K,R] -> [B,T,H,D] (dtype), [B,T,H]; inverse:
  `_inverse(order)` when already computed."""
  o, l = _query_rows(_Part(out[None], lse[None], None, order), shape, inverse)
  return o[0, ..., :shape[3]].astype(dtype), l[0]


def _same_order(a, b) -> bool:
  if a is None or b is None:
    return a is None and b is None
  return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)
          and a.shape == b.shape and bool(np.array_equal(a, b)))


class _TritonTables(NamedTuple):
  """What a level on the Triton kernel needs besides q, k, v and the layer; none of it
  depends on them, so the layers of a decode step share it (`prepare_levels`).

  layout: the row layout (nodes not yet moved by a stacked cache's layer); plan; dp: the
  padded head dim; row_limits [R] int32; bounds: the tiles' (lo, hi) key bounds [Tn] when XLA
  computes them (`Config.tile_bounds`), else None; regular: None, or (`Regular`, order [B] or
  None, lengths [N]) for a decode level whose tiles the kernel finds itself (`_regular`);
  stacked: a stacked cache is read in place (else its layer is sliced out)."""
  layout: grouping.Layout
  plan: _Plan
  dp: int
  row_limits: jax.Array
  bounds: Optional[tuple]
  regular: Optional[tuple]
  stacked: bool

  @property
  def order(self):
    """The sequences in row order ([B]), or None (as `_MosaicTables.order`)."""
    return self.layout.order

  @property
  def pos(self):
    """None: the Triton kernel writes packed row r at row r (as `_MosaicTables.pos`)."""
    return None


class _MosaicTables(NamedTuple):
  """What a level on the Mosaic GPU kernel needs besides q, k, v and the layer (as
  `_TritonTables`): order [B] or None, the sequences in row order; src [Tn*TILE] int32, the
  packed row of each tile row, or None when the rows are in place; tab [Tn,4] int32 (node,
  lo, hi, the folded suffix's hi); limt [Tn*TILE] int32, each tile row's key limit; pos None
  (rows in place) or [R] int32, the tile row of each packed row; suffix None, or the folded
  per-sequence level's (table, limits) (`mosaic_gpu.Suffix`); the key splits; heads: None
  (q packed), or G: q read and out written in place (`MosaicConfig.q_in_place`; tab, limt
  and the suffix's tables in the kernel's tile rows, `mosaic_gpu.tile_rows_in_place`)."""
  order: Optional[object]
  src: Optional[jax.Array]
  tab: jax.Array
  limt: jax.Array
  pos: Optional[object]
  suffix: Optional[tuple]
  splits: int
  blocks_per_split: int
  heads: Optional[int] = None


def _layer_view(k, v, layer, cfg: Config, in_place_ok: bool = True):
  """(k, v, node offset) of a level for the kernels.

  Without `layer`, k and v as given ([N,S,K,D]) and offset None. With `layer` (int32 scalar,
  may be traced), k and v are stacked [L,N,S,K,D] caches: read in place they are seen as
  [L*N,S,K,D] (merging the two leading axes of a row-major array is a bitcast, not a copy)
  and the tile table's nodes move by offset layer*N; otherwise (`cfg.layer_in_place` off, or
  `in_place_ok` false because the caller must copy the keys anyway to pad them) the layer is
  sliced out and offset is None.
  """
  if layer is None:
    return k, v, None
  if cfg.layer_in_place and in_place_ok:
    l, n = k.shape[:2]
    return (k.reshape((l * n,) + k.shape[2:]), v.reshape((l * n,) + v.shape[2:]),
            jnp.asarray(layer, jnp.int32) * n)
  index = jnp.asarray(layer, jnp.int32)
  return (lax.dynamic_index_in_dim(k, index, 0, keepdims=False),
          lax.dynamic_index_in_dim(v, index, 0, keepdims=False), None)


def _kernel_layer_view(k, v, layer, cfg: Config, in_place_ok: bool = True):
  """(k, v, layer) for `mosaic_gpu.tile_attention`: a stacked cache read in place goes whole
  with its layer (the kernel finds the layer's nodes, so the tables do not depend on it);
  otherwise (`cfg.layer_in_place` off, or `in_place_ok` false) the layer is sliced out and
  the layer returned is None (see `_layer_view`)."""
  if layer is not None and cfg.layer_in_place and in_place_ok:
    return k, v, layer
  k, v, _ = _layer_view(k, v, layer, cfg, in_place_ok=False)
  return k, v, None


def _offset_nodes(node, offset):
  """The tile table's nodes moved by a stacked cache's layer offset (see `_layer_view`)."""
  return node if offset is None else jnp.asarray(node, jnp.int32) + offset


_OWN = "own"    # a level's rows in its own order: sequences sorted (stably) by node


def _layout_in(order, owner, n: int, b: int, rows_per_seq: int, block_m: int):
  """The row layout (`grouping.make_layout`) of a level with its rows in `order`.

  order: `_OWN` (the level's own order), or [B] int32 (NumPy or traced; None for the
  identity), the sequences in row order, which only a level whose nodes stay contiguous in
  any order can take: one node (N == 1), or one node per sequence (owner None), where tile
  j's node becomes the sequence at its rows, order[node]. Levels that take the same order
  have the same packed rows, so their parts merge without unpacking (`_grouped_levels`)."""
  layout = grouping.make_layout(owner, n, b, rows_per_seq, block_m)
  if isinstance(order, str):
    return layout
  if owner is not None and n != 1:
    raise ValueError(f"a level of N={n} nodes with owners keeps its own row order")
  if layout.order is not None:
    raise ValueError("a level that takes another order must start from the identity")
  if order is None or owner is not None:
    return layout._replace(order=order)
  if isinstance(order, np.ndarray):
    return layout._replace(order=order, node=order[layout.node].astype(np.int32))
  return layout._replace(order=order, node=jnp.take(order, jnp.asarray(layout.node)))


def _packed_row_limits(limits, order, g: int):
  """Each packed row's key limit [B*T*G] (int32): limits [B,T] with the sequences in `order`
  (None: as given), repeated over the G query heads of a KV head (`_pack`'s row order)."""
  lim = limits.astype(jnp.int32)
  if order is not None:
    lim = jnp.take(lim, jnp.asarray(order), axis=0)
  return jnp.repeat(lim.reshape(-1), g)


def _triton_tables(q_shape, k_shape, k_dtype, owner, limits, cfg: Config, stacked: bool,
                   order=_OWN, lengths=None) -> _TritonTables:
  """`_TritonTables` of one level (static, or a runtime tile table for traced owners) with its
  rows in `order` (`_layout_in`). k_shape: [N,S,K,D] or a stacked [L,N,S,K,D]; stacked: the
  call gives the level a layer; lengths: see `_regular`."""
  b, t, h, d = q_shape
  n, s, kh, _ = k_shape[-4:]
  g = h // kh
  interpret = _interpret(cfg)
  dp = flash.pow2_at_least(d)
  in_place = stacked and cfg.layer_in_place and dp == d     # (padding dp != d copies anyway)
  rows_per_seq = t * g
  rows_per_node = _rows_per_node(q_shape, n, kh, owner)
  itemsize = jnp.dtype(k_dtype).itemsize
  bm = cfg.block_m or min(_max_block_m(cfg, dp, itemsize),
                          flash.pow2_at_least(math.ceil(rows_per_node)))
  layout = _layout_in(order, owner, n, b, rows_per_seq, bm)
  plan = _plan(dataclasses.replace(cfg, block_m=bm), rows_per_node,
               _busy_tiles(layout, b * rows_per_seq), kh, s, dp, interpret, itemsize)
  row_limits = _packed_row_limits(limits, layout.order, g)
  regular = _regular(q_shape, k_shape, owner, cfg, in_place, layout, lengths, plan.block_m)
  bounds = None
  if regular is None and cfg.tile_bounds == "xla":
    bounds = _tile_bounds(layout, row_limits)
  return _TritonTables(layout, plan, dp, row_limits, bounds, regular, in_place)


def _triton_kv(k, v, layer, tabs: _TritonTables, cfg: Config):
  """(k, v, layout) of a level for the Triton kernel: k, v padded to Dp (a stacked cache read
  in place seen as L*N nodes, the layout's nodes moved by layer*N; see `_layer_view`)."""
  d = k.shape[-1]
  k, v, offset = _layer_view(k, v, layer, cfg, in_place_ok=tabs.stacked)
  if tabs.dp != d:
    pad = ((0, 0), (0, 0), (0, 0), (0, tabs.dp - d))
    k, v = jnp.pad(k, pad), jnp.pad(v, pad)
  layout = tabs.layout._replace(node=_offset_nodes(tabs.layout.node, offset))
  return k, v, layout


def _use_mosaic(q_shape, k_shape, owner, dtype, cfg: Config) -> bool:
  """Whether this level runs on the Mosaic GPU kernel (static decision; see Config.lowering).

  "auto": on Hopper, for shared levels whose nodes hold on average >= min_rows_per_node rows
  per KV head, T*G*B / min(N, B) from the static shapes alone (so concrete and traced owners
  decide alike): the stacked, matrix-bound products. Per-sequence levels and narrow shared
  levels stay on the Triton kernel, which is faster there. A level that would qualify but the
  Mosaic kernel cannot take (dtype, head dim) falls back to Triton, logged once.
  k_shape: [N,S,K,D] or a stacked [L,N,S,K,D] cache's."""
  if cfg.lowering == "triton":
    return False
  d = q_shape[3]
  n, _, kh, _ = k_shape[-4:]
  if cfg.lowering == "auto":
    if _interpret(cfg) or not _is_hopper() or owner is None:
      return False
    if _rows_per_node(q_shape, n, kh, owner) < cfg.mosaic.min_rows_per_node:
      return False
  reason = mosaic_gpu.unsupported_reason(dtype, d, cfg.mosaic.block_kv)
  if reason is not None:
    log_once(("mosaic-fallback", reason),
             "hydrax pallas backend: Mosaic GPU kernel cannot take %s; this level runs on the "
             "Triton kernel (slower on Hopper)", reason)
    return False
  return True


class _Part(NamedTuple):
  """One level's kernel results in packed rows (the level's `order`), key splits not merged:
  out [P,K,X,Dx] (q's dtype or f32; Dx = D, or Dp for the Triton kernel), lse [P,K,X] f32;
  slot None when packed row r is at X-index r (X = R), else [R] int32, the X-index of row r.
  heads: None, or G when the Mosaic GPU kernel wrote out in place, [P,B*T,H,D], its lse
  [P,K,R] in the kernel's tile rows (`mosaic_gpu.tile_attention(heads=)`)."""
  out: jax.Array
  lse: jax.Array
  slot: Optional[object]
  order: Optional[object]
  final: bool = False      # out [B,K,G,D] (q's dtype), lse [B,K,G]: every level merged in
  heads: Optional[int] = None


def _query_rows(part: _Part, shape, inverse=None):
  """A part's splits in query order: (out [P,B,T,H,Dx] as stored, lse [P,B,T,H] f32).
  inverse: `_inverse(part.order)` when already computed."""
  b, t, h, _ = shape
  out, lse = part.out, part.lse
  p, kh = lse.shape[:2]
  if part.heads:
    g = part.heads
    n = mosaic_gpu.BLOCK_Q // g
    # tile row gi*n + x of block c (64 rows) is query row c*n + x at head kvh*G + gi
    lse = lse.reshape(p, kh, -1, g, n).transpose(0, 2, 4, 1, 3)
    return out.reshape(p, b, t, h, -1), lse.reshape(p, b, t, h)
  if part.slot is not None:
    slot = jnp.asarray(part.slot)
    out, lse = jnp.take(out, slot, axis=2), jnp.take(lse, slot, axis=2)
  o = out.reshape(p, kh, b, t, h // kh, out.shape[-1])
  l = lse.reshape(p, kh, b, t, h // kh)
  if part.order is not None:
    inv = jnp.asarray(_inverse(part.order) if inverse is None else inverse)
    o, l = jnp.take(o, inv, axis=2), jnp.take(l, inv, axis=2)
  o = jnp.transpose(o, (0, 2, 3, 1, 4, 5)).reshape(p, b, t, h, -1)
  return o, jnp.transpose(l, (0, 2, 3, 1, 4)).reshape(p, b, t, h)


def _merge_in_query_order(parts, shape, dtype, inverse=None):
  """(out [B,T,H,D] dtype, lse [B,T,H]): every split of `parts` (`_Part`s) put in query
  order (`_query_rows`) and merged in one pass; for parts of which one at least was written
  in place by the Mosaic GPU kernel (`_Part.heads`)."""
  outs, lses = zip(*[_query_rows(part, shape, inverse) for part in parts])
  out, lse = flash.combine_splits(
      jnp.concatenate([o[..., :shape[3]].astype(jnp.float32) for o in outs]),
      jnp.concatenate(lses))
  return out.astype(dtype), lse


def _finish(part: _Part, shape, dtype=jnp.float32):
  """A level's (out [B,T,H,D] dtype, lse [B,T,H]) from its `_Part`: splits merged, rows
  unpacked."""
  if part.heads:
    return _merge_in_query_order([part], shape, dtype)
  out, lse = flash.combine_splits(part.out.astype(jnp.float32), part.lse)
  if part.slot is not None:
    out = jnp.take(out, jnp.asarray(part.slot), axis=1)
    lse = jnp.take(lse, jnp.asarray(part.slot), axis=1)
  return _unpack(out, lse, part.order, shape, dtype)


def _q_in_place_reason(rows_in_place: bool, order, g: int, cfg: Config,
                       folded: bool) -> Optional[str]:
  """Why the Mosaic GPU kernel cannot read q in place (`MosaicConfig.q_in_place`), or None."""
  if not rows_in_place:
    return "the level's rows do not fill whole tiles in order"
  if order is not None:
    return "another level fixes the rows' order"
  if g not in mosaic_gpu.HEAD_GROUPS:
    return f"G = {g} query heads a KV head (in place: {mosaic_gpu.HEAD_GROUPS})"
  if folded and cfg.mosaic.suffix_transposed:
    return "suffix_transposed takes packed rows"
  return None


def _mosaic_tables(q_shape, k_shape, owner, limits, cfg: Config, order=_OWN,
                   suffix=None) -> _MosaicTables:
  """`_MosaicTables` of one level on `mosaic_gpu.tile_attention` (see `_use_mosaic`).

  Rows are packed as for Triton (sorted by node), then cut in tiles of TILE rows of one node
  each; a tile's unused rows are padding (limit 0, results dropped). With concrete owners the
  tile table and both index maps are NumPy constants (skipped when every tile is full and in
  place); with traced owners they are computed at run time (`grouping.make_layout`) for a
  static upper bound of tiles, and the unused tiles (no rows: hi = 0) run no key block.

  suffix: None, or (limits [B,T], K) of the per-sequence level to fold into the same launch
  (`_fold_levels` says when it can)."""
  b, t, h, d = q_shape
  n, s, kh, _ = k_shape[-4:]
  g = h // kh
  tile = mosaic_gpu.TILE
  nblk = -(-s // cfg.mosaic.block_kv)
  layout = _layout_in(order, owner, n, b, t * g, tile)
  row_limits = _packed_row_limits(limits, layout.order, g)         # [R]
  r = b * t * g
  static = isinstance(layout.count, np.ndarray)
  xp = np if static else jnp
  num_tiles = layout.num_tiles
  local = xp.arange(tile)[None, :]
  valid = local < xp.asarray(layout.count)[:, None]                # [Tn, TILE]
  src = xp.where(valid, xp.asarray(layout.start)[:, None] + local, 0).reshape(-1)
  in_place = static and bool(valid.all()) and np.array_equal(src, np.arange(r))
  heads = None
  if cfg.mosaic.q_in_place:
    why = _q_in_place_reason(in_place, layout.order, g, cfg, suffix is not None)
    if why is None:
      heads = g
    else:
      log_once(("q-in-place", why),
               "hydrax pallas backend: q_in_place asked for, but %s: the Mosaic GPU kernel "
               "reads q packed (a launch before it, one after it)", why)

  def packed_tile_rows(x):
    """A packed-row array [R] in packed tile rows [Tn*TILE] (0 in padding rows)."""
    if in_place:
      return x
    return jnp.where(jnp.asarray(valid.reshape(-1)), jnp.take(x, jnp.asarray(src, jnp.int32)), 0)

  def tile_rows(x):
    """A packed-row array [R] in the kernel's tile rows: with q in place (rows in place),
    each warpgroup's rows by head (`mosaic_gpu.tile_rows_in_place`)."""
    if not heads:
      return packed_tile_rows(x)
    bq = mosaic_gpu.BLOCK_Q
    idx = np.arange(r) // bq * bq + np.tile(mosaic_gpu.tile_rows_in_place(heads), r // bq)
    return jnp.take(x, jnp.asarray(idx, jnp.int32))

  limt = tile_rows(row_limits)
  lim2 = limt.reshape(num_tiles, tile)
  valid_j = jnp.asarray(valid)
  hi = jnp.max(lim2, axis=1)
  lo = jnp.min(jnp.where(valid_j, lim2, jnp.iinfo(jnp.int32).max), axis=1)
  lo = jnp.where(hi > 0, lo, 0)
  node = jnp.asarray(layout.node, jnp.int32)
  sfx, suffix_hi = None, jnp.zeros((num_tiles,), jnp.int32)
  if suffix is not None:
    # (groups of a sequence's rows in the packed tile rows; the limits then in the kernel's)
    (stab, slim), suffix_hi = _suffix_tables(suffix, q_shape, layout.order, packed_tile_rows,
                                             num_tiles)
    sfx = (stab, tile_rows(slim) if heads else slim)
  tab = jnp.stack([node, lo, hi, suffix_hi], axis=1)
  if cfg.mosaic.splits:
    splits = cfg.mosaic.splits
  elif _interpret(cfg):
    splits = 1
  else:
    splits = _choose_splits(_busy_tiles(layout, r) * kh, nblk, _num_sms())
  splits = max(1, min(splits, nblk))
  bps = -(-nblk // splits)
  splits = -(-nblk // bps)
  pos = None
  if not in_place:
    slots = num_tiles * tile
    if static:
      pos = np.empty((r,), np.int32)                               # slot of each packed row
      pos[src.reshape(num_tiles, tile)[valid]] = np.nonzero(valid.reshape(-1))[0]
    else:
      pos = jnp.zeros((r,), jnp.int32).at[jnp.where(valid.reshape(-1), src, r)].set(
          jnp.arange(slots, dtype=jnp.int32), mode="drop")
  return _MosaicTables(layout.order, None if in_place else jnp.asarray(src, jnp.int32), tab,
                       limt, pos, sfx, splits, bps, heads)


def _mosaic_part(q, k, v, tabs: _MosaicTables, scale, cfg: Config, layer=None,
                 suffix=None) -> _Part:
  """One level through `mosaic_gpu.tile_attention`, as a `_Part`, from its tables.

  suffix: None, or the per-sequence level (k, v, layer) folded into the same launch (its
  tables in `tabs.suffix`): the part then holds both levels, merged by the splits' merge."""
  b, t, h, d = q.shape
  n, s, kh, _ = k.shape[-4:]
  bk = cfg.mosaic.block_kv
  nblk = -(-s // bk)
  k, v, layer = _kernel_layer_view(k, v, layer, cfg, in_place_ok=s % bk == 0)
  if tabs.heads:
    qt = q.reshape(b * t, h, d)                                    # read in place
  else:
    qp = _pack(q, tabs.order, kh, d)                               # [K, R, D]
    qt = qp if tabs.src is None else jnp.take(qp, tabs.src, axis=1)
  if s % bk:                      # pad the capacity to whole key blocks (masked inside)
    if s > bk:
      log_once(("mosaic-pad", s, bk),
               "hydrax pallas backend: a level's key capacity S=%d is not a multiple of %d; "
               "the Mosaic GPU kernel copies it padded (allocate caches in multiples of %d "
               "to avoid the copy)", s, bk, bk)
    pad = ((0, 0), (0, nblk * bk - s), (0, 0), (0, 0))
    k, v = jnp.pad(k, pad), jnp.pad(v, pad)
  sfx = None
  if suffix is not None:
    ks, vs, slayer = suffix
    ks, vs, slayer = _kernel_layer_view(ks, vs, slayer, cfg)
    table, slim = tabs.suffix
    sfx = mosaic_gpu.Suffix(ks, vs, slim, table, t * (h // ks.shape[-2]), slayer)
  transposed = sfx is not None and cfg.mosaic.suffix_transposed
  if transposed and sfx.seq_rows > mosaic_gpu.SUFFIX_COLS:
    log_once(("suffix-transposed", sfx.seq_rows),
             "hydrax pallas backend: suffix_transposed asked for, but a sequence has %d query "
             "rows (transposed steps take at most %d); its folded suffix steps run "
             "untransposed", sfx.seq_rows, mosaic_gpu.SUFFIX_COLS)
    transposed = False
  swg = sfx is not None and cfg.mosaic.suffix_warpgroup
  if swg:
    why = mosaic_gpu.suffix_warpgroup_reason(bk, cfg.mosaic.stages, cfg.mosaic.suffix_stages,
                                             sfx.seq_rows, sfx.k.shape[-3], d, q.dtype)
    if why is not None:
      log_once(("suffix-warpgroup", why),
               "hydrax pallas backend: suffix_warpgroup asked for, but %s; the folded suffix "
               "runs as wgmma steps of the compute warpgroups", why)
      swg = False
  out, lse = mosaic_gpu.tile_attention(
      qt, k, v, tabs.tab, tabs.limt, scale=scale, block_kv=bk, stages=cfg.mosaic.stages,
      splits=tabs.splits, blocks_per_split=tabs.blocks_per_split, interpret=_interpret(cfg),
      suffix=sfx, stagger=cfg.mosaic.suffix_stagger and sfx is not None,
      lead=cfg.mosaic.suffix_lead, layer=layer,
      transposed=transposed, overlap=cfg.mosaic.node_overlap, heads=tabs.heads,
      suffix_warpgroup=swg, suffix_stages=cfg.mosaic.suffix_stages,
      registers=cfg.mosaic.registers)
  # [P, K, Tn*TILE, D] (with heads [P, B*T, H, D]), [P, K, Tn*TILE]; with the suffix
  # warpgroup one plane more, the suffix's
  return _Part(out, lse, tabs.pos, tabs.order, heads=tabs.heads)


def _suffix_tables(suffix, q_shape, order, tile_rows, num_tiles: int):
  """((table, limits) of `mosaic_gpu.Suffix`, the largest suffix limit of each tile [Tn]) for
  the per-sequence level with `suffix` = (limits [B,T], K) folded into a Mosaic level whose
  packed rows (sequences in `order`) `tile_rows` places in its tiles: a packed row's sequence
  is order[row // (T*G)], its node in the per-sequence level's cache."""
  b, t, h, _ = q_shape
  limits, kh = suffix
  g = h // kh
  rows = t * g
  slim = tile_rows(_packed_row_limits(limits, order, g))           # [Tn*TILE]
  seq = jnp.arange(b * rows, dtype=jnp.int32) // rows
  if order is not None:
    seq = jnp.take(jnp.asarray(order, jnp.int32), seq)
  seq = tile_rows(seq)                                              # (padding rows: 0)
  groups = mosaic_gpu.BLOCK_Q // rows
  shape = (num_tiles, mosaic_gpu.COMPUTE_WGS, groups, rows)
  table = jnp.stack([seq.reshape(shape)[..., 0], slim.reshape(shape).max(axis=-1)], axis=-1)
  return (table, slim), slim.reshape(num_tiles, mosaic_gpu.TILE).max(axis=1)


def _fold_levels(q_shape, dtype, kvl, owners, cfg: Config) -> tuple:
  """((shared, per-sequence) level indices, None) when the call's per-sequence level is folded
  into the Mosaic GPU launch of a shared level (`MosaicConfig.fold_suffix`), else (None, why
  not): one per-sequence level the kernel can take (`mosaic_gpu.suffix_unsupported_reason`;
  the reason logged once), beside shared levels of which one runs on the Mosaic kernel (the
  first such takes it), and no `level_stream`. Other levels run on their own kernels."""
  if not cfg.mosaic.fold_suffix:
    return None, "fold_suffix is off"
  per_seq = [i for i, o in enumerate(owners) if o is None]
  if len(per_seq) != 1 or len(kvl) < 2:
    return None, "not one per-sequence level beside shared levels"
  if cfg.level_stream:
    return None, "level_stream puts the per-sequence level on its own stream"
  mosaic = [i for i, o in enumerate(owners)
            if o is not None and _use_mosaic(q_shape, kvl[i][0].shape, o, dtype, cfg)]
  if not mosaic:
    return None, "no shared level runs on the Mosaic GPU kernel"
  ks = kvl[per_seq[0]][0]
  _, t, h, _ = q_shape
  reason = mosaic_gpu.suffix_unsupported_reason(cfg.mosaic.block_kv, t * (h // ks.shape[-2]),
                                                ks.shape[-3])
  if reason is None and jnp.dtype(ks.dtype) != jnp.dtype(dtype):
    reason = f"its keys are {jnp.dtype(ks.dtype).name}, the queries {jnp.dtype(dtype).name}"
  if reason is not None:
    log_once(("fold-suffix", reason),
             "hydrax pallas backend: the per-sequence level is not folded into the Mosaic GPU "
             "launch (%s); it runs as a launch of its own", reason)
    return None, reason
  return (mosaic[0], per_seq[0]), None


def _level_tables(q_shape, k_shape, k_dtype, owner, limits, cfg: Config, stacked: bool,
                  order=_OWN, lengths=None):
  """The tables of one level on the kernel `_use_mosaic` picks, its rows in `order`
  (`lengths`: see `_regular`)."""
  if _use_mosaic(q_shape, k_shape, owner, k_dtype, cfg):
    return _mosaic_tables(q_shape, k_shape, owner, limits, cfg, order)
  return _triton_tables(q_shape, k_shape, k_dtype, owner, limits, cfg, stacked, order, lengths)


def _level_run(q, k, v, tabs, layer, scale, cfg: Config) -> _Part:
  """One level as a `_Part` from its tables (`_level_tables`)."""
  if isinstance(tabs, _MosaicTables):
    return _mosaic_part(q, k, v, tabs, scale, cfg, layer)
  return _triton_part(q, k, v, tabs, layer, scale, cfg)


def _forward(q, k, v, owner, limits, scale, cfg: Config, layer=None):
  tabs = _level_tables(q.shape, k.shape, k.dtype, owner, limits, cfg, layer is not None)
  return _finish(_level_run(q, k, v, tabs, layer, scale, cfg), q.shape)


def _regular(q_shape, k_shape, owner, cfg: Config, stacked: bool, layout: grouping.Layout,
             lengths, block_m: int):
  """`_TritonTables.regular` for a level whose tiles the kernel can find itself (`Regular`: a
  single query, one node or one node per sequence, a static layout, its lengths given), else
  None. stacked: a stacked cache read in place (the kernel adds its layer's nodes)."""
  b, t, h, d = q_shape
  n, _, kh, _ = k_shape[-4:]
  if (not cfg.regular_tiles or lengths is None or t != 1 or (owner is not None and n != 1)
      or not isinstance(layout.count, np.ndarray)):
    return None
  per_sequence = owner is None
  rows = h // kh if per_sequence else b * (h // kh)
  tiles = -(-rows // block_m)
  if tiles * (b if per_sequence else 1) != layout.num_tiles:
    raise ValueError(f"regular tiles: {tiles} a node does not match the layout's "
                     f"{layout.num_tiles} tiles")
  # (a one-node level's rows are all its node's: their order matters to the packing only)
  order = (None if layout.order is None or not per_sequence
           else jnp.asarray(layout.order, jnp.int32))
  reg = Regular(rows, tiles, per_sequence, order is not None, stacked, n)
  return reg, order, jnp.asarray(lengths, jnp.int32)


def _triton_part(q, k, v, tabs: _TritonTables, layer, scale, cfg: Config,
                 priors=()) -> _Part:
  """One level through the Triton kernel (`grouped_attention`), as a `_Part`, from its tables.
  A regular per-sequence level of one key split also merges `priors` (earlier levels' (out,
  lse) in its row order) in the kernel and returns the final part (`_Part.final`)."""
  k, v, layout = _triton_kv(k, v, layer, tabs, cfg)
  qp = _pack(q, layout.order, k.shape[-2], tabs.dp)
  reg = None
  if tabs.regular is not None:
    r, order, lengths = tabs.regular
    reg = (r, order, jnp.asarray(layer, jnp.int32).reshape(1) if r.stacked else None, lengths)
  merge = (bool(priors) and reg is not None and reg[0].per_sequence
           and reg[0].tiles_per_node == 1 and tabs.plan.splits == 1)
  [(out, lse)] = grouped_attention(
      [LevelInput(qp, k, v, tabs.row_limits, layout, tabs.plan, reg,
                  tuple(priors) if merge else (), tabs.bounds)],
      scale=scale, interpret=_interpret(cfg), poison=cfg.poison, tile_bounds=cfg.tile_bounds,
      combine=False)
  return _Part(out, lse, None, layout.order, final=merge)


def _on_gpu_stream(stream: int, fn):
  """fn as a call XLA runs on GPU stream `stream` (`jax.experimental.compute_on`: the
  function form, `compute_on2` in jax 0.10, `compute_on` from 0.11), its outputs in device
  memory. Off GPU the annotation is ignored."""
  from jax.experimental import compute_on as co
  import inspect
  wrap = co.compute_on
  if "out_memory_spaces" not in inspect.signature(wrap).parameters:
    wrap = co.compute_on2
  space = getattr(getattr(jax, "memory", None), "Space", None)
  if space is None:
    from jax._src.core import MemorySpace as space        # jax 0.10: not public yet
  return wrap(fn, compute_type=f"gpu_stream:{stream}", out_memory_spaces=space.Device)


def _part_on_stream(stream: int, q, k, v, tabs, layer, scale, cfg: Config) -> _Part:
  """A per-sequence level's `_Part` computed on GPU stream `stream` (see Config.level_stream);
  its tables' arrays enter the stream's call as arguments, their static parts closed over."""
  arrays, static = prepared.split_arrays(tabs)

  def run(q, k, v, layer, arrays):
    part = _level_run(q, k, v, prepared.join_arrays(static, arrays), layer, scale, cfg)
    return part.out, part.lse

  out, lse = _on_gpu_stream(stream, run)(q, k, v, layer, arrays)
  return _Part(out, lse, tabs.pos, tabs.order)


def _fixes_order(k, owner) -> bool:
  """Whether a level's rows must come in its own order: owners over several nodes (a
  one-node level and the per-sequence level can take any order; `_layout_in`)."""
  return owner is not None and k.shape[-4] != 1


class _GroupedTables(NamedTuple):
  """The tables of `_grouped_forward` (`_grouped_tables`): steps, in run order, (level, kind,
  tables) with kind "fold" (a shared level on the Mosaic GPU kernel with the per-sequence
  level `fold[1]` folded into its launch), "level" (a level on its kernel), "last" (the
  per-sequence level, merging the earlier parts in its kernel when it can: `_triton_part`'s
  priors) or "stream" (on its own GPU stream); order: the rows' final order ([B] or None) and
  inverse its inverse, for the one unpack."""
  steps: tuple
  fold: Optional[tuple]
  order: Optional[object]
  inverse: Optional[object]


def _grouped_tables(q_shape, kvl, owners, limits, cfg: Config) -> _GroupedTables:
  """`_GroupedTables` of every level (kvl: [(k, v, lengths, layer)], k and v arrays or
  `jax.ShapeDtypeStruct`s, layer None or not; owners: NumPy, traced or None; limits [B,T]
  each): the one level whose nodes (N > 1, with owners) fix the row order packs its rows
  sorted by node, the others (one node, or one per sequence) take that order too (see
  `_grouped_forward`)."""
  t = q_shape[1]
  bound = [i for i, ((k, _, _, _), o) in enumerate(zip(kvl, owners)) if _fixes_order(k, o)]
  per_seq = [i for i in range(len(kvl)) if owners[i] is None]
  fold, _ = _fold_levels(q_shape, kvl[0][0].dtype, kvl, owners, cfg)
  last = per_seq if (fold is None and cfg.merge_in_kernel and len(per_seq) == 1 and t == 1
                     and not cfg.level_stream) else []
  first = bound + [i for i in range(len(kvl)) if i not in bound and i not in last] + last
  if fold is not None:
    first.remove(fold[1])       # (run inside the launch of level fold[0])
  steps, order, in_place = [], _OWN, True
  for i in first:
    k, _, lengths, layer = kvl[i]
    stacked = layer is not None
    if fold is not None and i == fold[0]:
      ks = kvl[fold[1]][0]
      kind, tabs = "fold", _mosaic_tables(q_shape, k.shape, owners[i], limits[i], cfg, order,
                                          suffix=(limits[fold[1]], ks.shape[-2]))
    elif i in last and in_place:
      kind, tabs = "last", _triton_tables(q_shape, k.shape, k.dtype, None, limits[i], cfg,
                                          stacked, order, lengths)
    else:
      kind = "stream" if owners[i] is None and cfg.level_stream else "level"
      tabs = _level_tables(q_shape, k.shape, k.dtype, owners[i], limits[i], cfg, stacked,
                           order, lengths)
    steps.append((i, kind, tabs))
    order = tabs.order
    # (a kernel that merges earlier parts reads them in packed rows)
    in_place = in_place and tabs.pos is None and not getattr(tabs, "heads", None)
  return _GroupedTables(tuple(steps), fold, order, None if order is None else _inverse(order))


def _grouped_forward(q, kvl, owners, limits, scale: float, cfg: Config, tables=None):
  """Every level (kvl: [(k, v, lengths, layer)], owners: NumPy, traced or None, limits [B,T]
  each) on its grouped kernel, the parts merged in packed rows: the one level whose nodes
  (N > 1, with owners) fix the row order packs its rows sorted by node, the others (one
  node, or one per sequence) take that order too, so every part's row r is the same query
  row, and one XLA pass merges all key splits of all levels and unpacks (instead of a merge
  and an unpack per level and a merge of the levels: launches that cost more than the bytes
  they move at decode). With `Config.merge_in_kernel` at decode the per-sequence level runs
  last and merges the others' parts in its kernel (`_merge_and_store`) when it can (one key
  split, the others' rows in place), and nothing runs after it. A shared level on the Mosaic
  GPU kernel and the per-sequence level run as one launch when `_fold_levels` allows
  (`MosaicConfig.fold_suffix`). tables: `_grouped_tables` of these levels (None: computed
  here). Returns out [B,T,H,D] in q's dtype and lse [B,T,H] f32."""
  b, t, h, d = q.shape
  if tables is None:
    tables = _grouped_tables(q.shape, kvl, owners, limits, cfg)
  parts = {}
  for i, kind, tabs in tables.steps:
    k, v, _, layer = kvl[i]
    if kind == "fold":
      ks, vs, _, slayer = kvl[tables.fold[1]]
      parts[i] = _mosaic_part(q, k, v, tabs, scale, cfg, layer, suffix=(ks, vs, slayer))
    elif kind == "last":
      earlier = [(parts[j].out, parts[j].lse) for j in parts]
      part = _triton_part(q, k, v, tabs, layer, scale, cfg, earlier)
      if part.final:     # every level merged in the kernel: [B,K,G,Dp] -> [B,1,H,D]
        return part.out[..., :d].reshape(b, 1, h, d), part.lse.reshape(b, 1, h)
      parts[i] = part
    elif kind == "stream":
      parts[i] = _part_on_stream(cfg.level_stream, q, k, v, tabs, layer, scale, cfg)
    else:
      parts[i] = _level_run(q, k, v, tabs, layer, scale, cfg)
  if any(p.heads for p in parts.values()):
    # out written in place by the Mosaic GPU kernel: every part in query order, one merge
    return _merge_in_query_order([parts[i] for i in sorted(parts)], q.shape, q.dtype,
                                 tables.inverse)
  outs, lses = [], []
  for i in sorted(parts):
    o, lse = parts[i].out, parts[i].lse
    if parts[i].slot is not None:
      slot = jnp.asarray(parts[i].slot)
      o, lse = jnp.take(o, slot, axis=2), jnp.take(lse, slot, axis=2)
    outs.append(o[..., :d].astype(jnp.float32))
    lses.append(lse)
  out, lse = flash.combine_splits(jnp.concatenate(outs), jnp.concatenate(lses))
  return _unpack(out, lse, tables.order, q.shape, q.dtype, inverse=tables.inverse)


@functools.partial(jax.jit, static_argnames=("owner_keys", "scale", "cfg", "tables_static"))
def _grouped_jit(q, kvl, owners_dyn, limits, tables_arrays, *, owner_keys, scale, cfg,
                 tables_static):
  tables = (None if tables_static is None
            else prepared.join_arrays(tables_static, tables_arrays))
  return _grouped_forward(q, kvl, _owners(owners_dyn, owner_keys), limits, scale, cfg, tables)


@functools.partial(jax.jit, static_argnames=("owner_keys", "scale"))
def _xla_levels_vjp(q, kvl, owners_dyn, limits, cts, *, owner_keys, scale):
  """Cotangents of q and every level's (k, v), recomputed with the XLA backend
  (`xla.levels_attention`; stacked k, v: zero outside the level's layer)."""
  _, vjp = jax.vjp(lambda q, kv: xla.levels_attention(
      q, kv, [n for _, _, n, _ in kvl], _owners(owners_dyn, owner_keys), limits,
      [layer for *_, layer in kvl], scale=scale), q, [(k, v) for k, v, _, _ in kvl])
  return vjp((cts[0].astype(jnp.float32), cts[1]))


def _grouped_inputs(levels, b: int):
  """(kvl [(k, v, lengths, layer)], owners_dyn: traced owners or None, owner_keys: static
  owners' keys) of KVLevels, or None when more than one level fixes a row order."""
  statics, traced = zip(*[_static_owner(lv.owner, lv.k.shape[-4], b) for lv in levels])
  if sum(_fixes_order(lv.k, lv.owner) for lv in levels) > 1:
    return None
  keys = tuple(_owner_key(st) for st in statics)
  kvl = [(lv.k, lv.v,
          jnp.full((lv.k.shape[-4],), lv.k.shape[-3], jnp.int32) if lv.lengths is None
          else jnp.asarray(lv.lengths, jnp.int32),
          None if lv.layer is None else jnp.asarray(lv.layer, jnp.int32)) for lv in levels]
  owners_dyn = [lv.owner if tr else None for lv, tr in zip(levels, traced)]
  return kvl, owners_dyn, keys


def grouped_levels(q, levels, limits, *, scale: float, cfg: Config, tables=None):
  """`_grouped_forward` over KVLevels (stacked caches read in place at their layer), or None
  when more than one level fixes a row order (the caller runs the levels one by one).
  tables: None, or `grouped_tables` of the same levels (computed once for many calls).
  Differentiable: the backward pass recomputes the levels with the XLA backend."""
  inputs = _grouped_inputs(levels, q.shape[0])
  if inputs is None:
    return None
  kvl, owners_dyn, keys = inputs
  limits = [jnp.asarray(x, jnp.int32) for x in limits]
  tables_arrays, tables_static = [], None
  if tables is not None:
    tables_arrays, tables_static = prepared.split_arrays(tables)

  def impl(q, kvl, owners_dyn, limits, tables_arrays):
    if cfg.lowering == "mosaic" and _interpret(cfg):
      # Op by op, not one program: several interpreted Mosaic GPU kernels in one program
      # have deadlocked jax's Mosaic GPU interpreter on a 2-core machine (see Config).
      tabs = (None if tables_static is None
              else prepared.join_arrays(tables_static, tables_arrays))
      return _grouped_forward(q, kvl, _owners(owners_dyn, keys), limits, float(scale), cfg,
                              tabs)
    return _grouped_jit(q, kvl, owners_dyn, limits, tables_arrays, owner_keys=keys,
                        scale=float(scale), cfg=cfg, tables_static=tables_static)

  f = jax.custom_vjp(impl)

  def fwd(*args):
    return impl(*args), args

  def bwd(res, cts):
    q, kvl, owners_dyn, limits, tables_arrays = res
    dq, dkv = _xla_levels_vjp(q, kvl, owners_dyn, limits, cts, owner_keys=keys,
                              scale=float(scale))
    return (dq, [(dk, dv, None, None) for dk, dv in dkv], [None] * len(owners_dyn),
            [None] * len(limits), [None] * len(tables_arrays))

  f.defvjp(fwd, bwd)
  return f(q, kvl, owners_dyn, limits, tables_arrays)


def grouped_tables(q_shape, levels, limits, *, cfg: Config):
  """The tables `grouped_levels` computes for these levels (lengths, owners, limits), or None
  when it would return None; levels' k and v may be `jax.ShapeDtypeStruct`s."""
  inputs = _grouped_inputs(levels, q_shape[0])
  if inputs is None:
    return None
  kvl, owners_dyn, keys = inputs
  return _grouped_tables(tuple(q_shape), kvl, _owners(owners_dyn, keys),
                         [jnp.asarray(x, jnp.int32) for x in limits], cfg)


def _static_owner(owner, n: int, b: int):
  """(owner as NumPy or None when per-sequence, is_traced)."""
  if owner is None:
    return None, False
  if n == 1:
    return np.zeros((b,), np.int32), False
  c = concrete(owner)
  return (c, False) if c is not None else (None, True)


def _owner_key(static_owner):
  """Hashable form of a concrete owner array (None stays None: per-sequence level)."""
  return None if static_owner is None else tuple(int(x) for x in static_owner)


def _owners(owners_dyn, keys):
  """Each level's owner: its traced array, else the static one its key holds (or None)."""
  return [od if od is not None else _owner_of(key) for od, key in zip(owners_dyn, keys)]


def _owner_of(key):
  return None if key is None else np.asarray(key, np.int32)


@functools.partial(jax.jit, static_argnames=("owner_key", "scale", "cfg"))
def _forward_jit(q, k, v, limits, owner_dyn, layer, *, owner_key, scale, cfg):
  """`_forward` under jit (eager callers hit the compilation cache; keyed by the config):
  owner_dyn is a traced owner array or None; owner_key the static owner (`_owner_key`) when
  owner_dyn is None; layer None or the int32 layer of stacked k, v."""
  owner = owner_dyn if owner_dyn is not None else _owner_of(owner_key)
  return _forward(q, k, v, owner, limits, scale, cfg, layer)


@functools.partial(jax.jit, static_argnames=("owner_key", "scale"))
def _xla_level_vjp(q, k, v, lengths, limits, owner_dyn, layer, cts, *, owner_key, scale):
  """Cotangents of (q, k, v) for one level, recomputed with the XLA backend (k, v stacked
  [L,N,S,K,D] when layer is given: their cotangents are zero outside that layer)."""
  owner = owner_dyn if owner_dyn is not None else _owner_of(owner_key)

  def level(q, k, v):
    if layer is not None:
      k = lax.dynamic_index_in_dim(k, layer, 0, keepdims=False)
      v = lax.dynamic_index_in_dim(v, layer, 0, keepdims=False)
    return xla.level_attention(q, k, v, lengths, owner, limits, scale=scale)

  _, vjp = jax.vjp(level, q, k, v)
  return vjp(cts)


def level_attention(q, k, v, lengths, owner, limits, *, scale, config: Optional[Config] = None,
                    layer=None):
  """One level of attention through the Pallas kernels; contract in `hydrax.attention.xla`.

  config: the kernel configuration (`Config`; None: the defaults). layer: None, or an int32
  scalar (may be traced): k and v are then stacked [L,N,S,K,D] caches and the level is that
  layer, read in place by the kernels (no copy of it is made; see `_layer_view`).
  Raises backends.Unsupported for dtypes other than bf16/fp16/fp32. Differentiable: the
  backward pass recomputes the level with the XLA backend.
  """
  b, t, h, d = q.shape
  n, s, kh, _ = k.shape[-4:]
  if k.ndim != (4 if layer is None else 5):
    raise ValueError(f"k must be [N,S,K,D] without layer and [L,N,S,K,D] with it, got shape "
                     f"{tuple(k.shape)} with layer={layer!r}")
  if s == 0 or b == 0 or t == 0:
    return (jnp.zeros(q.shape, jnp.float32), jnp.full((b, t, h), -jnp.inf, jnp.float32))
  if q.dtype not in _DTYPES:
    raise backends.Unsupported(f"dtype {q.dtype} (the kernels take bfloat16, float16, float32)")
  cfg = Config() if config is None else config
  static_owner, traced = _static_owner(owner, n, b)
  key = _owner_key(static_owner)
  if layer is not None:
    layer = jnp.asarray(layer, jnp.int32)

  def impl(q, k, v, lengths, limits, owner_dyn, layer):
    return _forward_jit(q, k, v, limits, owner_dyn, layer, owner_key=key, scale=float(scale),
                        cfg=cfg)

  f = jax.custom_vjp(impl)

  def f_fwd(*args):
    return impl(*args), args

  def f_bwd(res, cts):
    q, k, v, lengths, limits, owner_dyn, layer = res
    grads = _xla_level_vjp(q, k, v, lengths, limits, owner_dyn, layer, cts, owner_key=key,
                           scale=float(scale))
    return (*grads, None, None, None, None)

  f.defvjp(f_fwd, f_bwd)
  # (lengths only feed the XLA backward: the forward's limits already bound every query.)
  lengths = jnp.full((n,), s, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
  return f(q, k, v, lengths, limits, owner if traced else None, layer)


def _level_limits(levels, b: int, t: int, causal_last: bool):
  """Per level, limits [B,T] int32 (`hydrax.attention.hydragen_attention`'s)."""
  from hydrax.attention import hydragen
  return hydragen._limits(levels, b, t, causal_last)


def _concurrent(q, levels, causal_last: bool, scale: float, cfg: Config):
  """Forward of `hydragen_attention_fused`: every level's programs in one launch."""
  b, t, h, d = q.shape
  inputs, orders, packed = [], [], {}
  for level, limits in zip(levels, _level_limits(levels, b, t, causal_last)):
    if level.k.shape[-3] == 0:
      continue
    tabs = _triton_tables(q.shape, level.k.shape, level.k.dtype, level.owner, limits, cfg,
                          level.layer is not None)
    k, v, layout = _triton_kv(level.k, level.v, level.layer, tabs, cfg)
    order = layout.order
    key = (None if order is None else order.tobytes() if isinstance(order, np.ndarray)
           else id(order), tabs.dp)
    if key not in packed:
      packed[key] = _pack(q, order, level.k.shape[-2], tabs.dp)
    inputs.append(LevelInput(packed[key], k, v, tabs.row_limits, layout, tabs.plan))
    orders.append(order)
  if not inputs:
    return jnp.zeros(q.shape, q.dtype), jnp.full((b, t, h), -jnp.inf, jnp.float32)
  # Matrix-bound (wide) levels first: their programs start first, the memory-bound ones fill in.
  rank = sorted(range(len(inputs)), key=lambda i: -inputs[i].plan.block_m)
  inputs, orders = [inputs[i] for i in rank], [orders[i] for i in rank]
  parts = grouped_attention(inputs, scale=scale, interpret=_interpret(cfg), poison=cfg.poison,
                            tile_bounds=cfg.tile_bounds)
  if all(_same_order(o, orders[0]) for o in orders):
    out, lse = merge_parts(parts) if len(parts) > 1 else parts[0]   # merged in packed rows
    return _unpack(out, lse, orders[0], q.shape, q.dtype)
  out, lse = merge_parts([_unpack(o, l, od, q.shape) for (o, l), od in zip(parts, orders)])
  return out.astype(q.dtype), lse


def _levels_of(kvl, owners):
  """KVLevels from [(k, v, lengths, layer)] and their owners."""
  from hydrax.attention import hydragen
  return [hydragen.KVLevel(k, v, n, o, layer) for (k, v, n, layer), o in zip(kvl, owners)]


@functools.partial(jax.jit, static_argnames=("owner_keys", "causal_last", "scale", "cfg"))
def _concurrent_jit(q, kvl, *, owner_keys, causal_last, scale, cfg):
  return _concurrent(q, _levels_of(kvl, [_owner_of(key) for key in owner_keys]), causal_last,
                     scale, cfg)


@functools.partial(jax.jit, static_argnames=("owner_keys", "causal_last", "scale"))
def _xla_fused_vjp(q, kvl, owners_dyn, cts, *, owner_keys, causal_last, scale):
  """Cotangents of q and every level's (k, v), recomputed with the XLA backend."""
  from hydrax.attention import hydragen
  owners = _owners(owners_dyn, owner_keys)

  def ref(q, kv):
    lv = _levels_of([(k, v, n, layer) for (k, v), (_, _, n, layer) in zip(kv, kvl)], owners)
    return hydragen.hydragen_attention(q, lv, causal_last=causal_last, scale=scale,
                                       backend="xla")

  _, vjp = jax.vjp(ref, q, [(k, v) for k, v, _, _ in kvl])
  return vjp(cts)


def hydragen_attention_fused(q, levels, *, causal_last: bool = True,
                             scale: Optional[float] = None, backend="pallas"):
  """`hydrax.attention.hydragen_attention` with all levels in one kernel launch.

  Same arguments and result (out [B,T,H,D] in q's dtype, lse [B,T,H] float32); `backend` is
  the pallas backend (its name or a configured value, e.g. `configure(block_n=32)`) whose
  kernel configuration is used. The programs of every level share one grid, so the
  matrix-bound shared levels and the memory-bound per-sequence level run at the same time;
  when the levels' rows come in the same order (per-sequence levels, shared levels whose
  concrete owners are sorted by node) the parts are merged in the packed row layout and
  unpacked once. Traced owners: one launch per level. Levels with `layer` are read in place.
  Gradients recompute everything with the XLA backend.
  """
  from hydrax.attention import hydragen
  impl_backend = backends.get(backend)
  if impl_backend.name != "pallas":
    raise ValueError(f"hydragen_attention_fused runs the pallas backend, got "
                     f"backend={impl_backend.name!r}")
  cfg = impl_backend.config
  checks.check_rank(q, 4, "q", "B,T,H,D")
  if isinstance(levels, hydragen.KVLevel) or not isinstance(levels, (list, tuple)) or not levels:
    raise ValueError("levels must be a non-empty list of KVLevel")
  b, t, h, d = q.shape
  for i, level in enumerate(levels):
    hydragen._check_level(i, level, q, b)
  if q.dtype not in _DTYPES:
    raise ValueError(f"hydragen_attention_fused takes bfloat16, float16 or float32, got {q.dtype}")
  scale = float(d) ** -0.5 if scale is None else scale
  statics, traced = zip(*[_static_owner(lv.owner, lv.k.shape[-4], b) for lv in levels])
  if b == 0 or t == 0:
    return jnp.zeros(q.shape, q.dtype), jnp.full((b, t, h), -jnp.inf, jnp.float32)

  def impl(q, kvl, owners_dyn):
    if any(traced):
      # Traced owners: rows differ in order per level; run each level, merge outside.
      lv = _levels_of(kvl, [od if tr else st for od, tr, st in zip(owners_dyn, traced, statics)])
      parts = [level_attention(q, x.k, x.v, x.lengths, x.owner, lim, scale=scale, config=cfg,
                               layer=x.layer)
               for x, lim in zip(lv, _level_limits(lv, b, t, causal_last))]
      out, lse = merge_parts(parts)
      return out.astype(q.dtype), lse
    return _concurrent_jit(q, kvl, owner_keys=tuple(_owner_key(st) for st in statics),
                           causal_last=causal_last, scale=float(scale), cfg=cfg)

  f = jax.custom_vjp(impl)

  def f_fwd(q, kvl, owners_dyn):
    return impl(q, kvl, owners_dyn), (q, kvl, owners_dyn)

  def f_bwd(res, cts):
    q, kvl, owners_dyn = res
    dq, dkv = _xla_fused_vjp(q, kvl, owners_dyn, cts,
                             owner_keys=tuple(_owner_key(st) for st in statics),
                             causal_last=causal_last, scale=float(scale))
    return dq, [(dk, dv, None, None) for dk, dv in dkv], [None] * len(owners_dyn)

  f.defvjp(f_fwd, f_bwd)
  kvl = [(lv.k, lv.v, lv.lengths,
          None if lv.layer is None else jnp.asarray(lv.layer, jnp.int32)) for lv in levels]
  return f(q, kvl, [lv.owner if tr else None for lv, tr in zip(levels, traced)])


def path_mode(q_shape, dtype, levels, cfg: Config) -> tuple:
  """(takes the path kernel, why not): the cost rule of the small-shape path, for calls with a
  shared level (per-sequence attention alone keeps the grouped kernel). Sharing a level
  saves (B - min(N, B)) node reads of its keys and values; below `cfg.path_crossover_bytes`
  saved (all KV heads) the grouped levels' fixed costs (a launch per level, row packing, tile
  bounds, the merges) outweigh it and one launch over every sequence's path wins."""
  if cfg.path == "off":
    return False, "path='off'"
  if cfg.path == "auto" and cfg.lowering == "mosaic":
    return False, "lowering='mosaic' asks for the grouped Mosaic GPU kernel"
  kv_heads = levels[0].k.shape[-2]
  reason = path_gpu.unsupported_reason(q_shape, dtype, kv_heads)
  if reason is not None:
    return False, reason
  if cfg.path == "always":
    return True, None
  if all(lv.owner is None for lv in levels):
    # Per-sequence attention only (dense attention, replicated caches): nothing to share, and
    # the measured crossover is about trees; these calls keep the grouped kernel.
    return False, "no shared level"
  shapes = [fused_worklist.LevelShape(lv.k.shape[-4], lv.k.shape[-3], lv.owner is not None)
            for lv in levels]
  saved = fused_worklist.sharing_saved_bytes(q_shape, shapes, jnp.dtype(dtype).itemsize)
  saved *= kv_heads
  if saved >= cfg.path_crossover_bytes:
    return False, f"sharing saves {saved} bytes >= path_crossover_bytes"
  return True, None


def _all_levels_route(q_shape, dtype, levels, limits, cfg: Config):
  """(route, live levels, their limits) of `all_levels`: route "path" (the small-shape path),
  "grouped" (`grouped_levels`) or None (level by level); static (shapes and configuration)."""
  b, t = q_shape[:2]
  live = [(lv, lim) for lv, lim in zip(levels, limits) if lv.k.shape[-3] > 0]
  lv_live, lim_live = [lv for lv, _ in live], [lim for _, lim in live]
  if b == 0 or t == 0 or not live:
    return None, lv_live, lim_live
  take, why = path_mode(q_shape, dtype, lv_live, cfg)
  if take:
    return "path", lv_live, lim_live
  if cfg.path == "always":
    log_once(("pallas-path", why), "hydrax pallas backend: path='always' but the path kernel "
             "cannot take this call (%s); the levels run one by one", why)
  if cfg.finish == "once" and len(live) > 1 and dtype in _DTYPES:
    return "grouped", lv_live, lim_live
  return None, lv_live, lim_live


def all_levels(q, levels, limits, *, scale, config: Optional[Config] = None, tables=None):
  """Every level of a call at once: through the small-shape path (`path_gpu`) when the cost
  rule (`path_mode`) picks it, else, for two or more levels with keys and `Config.finish`
  "once", through the grouped kernels with one merge in packed rows (`grouped_levels`);
  None otherwise, also when several levels each fix a row order (the caller runs the levels
  one by one through the grouped kernels: a decision, not a fallback). tables: None, or
  `prepare_levels` of the same levels and limits. Returns out [B,T,H,D] in q's dtype and lse
  [B,T,H] f32. With path='always', inputs the path kernel cannot take are logged once."""
  cfg = Config() if config is None else config
  route, live, live_limits = _all_levels_route(q.shape, q.dtype, levels, limits, cfg)
  if route == "grouped":
    return grouped_levels(q, live, live_limits, scale=scale, cfg=cfg, tables=tables)
  if route is None:
    return None
  interpret = _interpret(cfg)
  caps = [lv.k.shape[-3] for lv in live]
  block_n, warps, stages = cfg.narrow
  block_n = cfg.block_n or min(block_n, flash.pow2_at_least(max(caps)))
  plan = path_gpu.make_plan(q.shape, levels[0].k.shape[-2], caps, num_sms=_num_sms(),
                            block_n=block_n, num_warps=cfg.num_warps or warps,
                            num_stages=cfg.num_stages or stages,
                            splits=cfg.splits or (1 if interpret else None),
                            programs_per_sm=cfg.path_programs_per_sm,
                            group=cfg.path_group)
  out, lse = path_gpu.path_attention(q, live, live_limits, scale=scale, plan=plan,
                                     interpret=interpret)
  return out.astype(q.dtype), lse


def prepare_levels(q_shape, dtype, levels, limits, *, scale,
                   config: Optional[Config] = None):
  """The tables `all_levels` would compute for these levels' lengths, owners and limits (the
  grouped kernels' layouts, tile tables, bounds and row orders), or None when its route has
  none (the small-shape path, level by level). `Backend.prepare_levels`."""
  del scale          # (the tables do not depend on it)
  cfg = Config() if config is None else config
  if not cfg.prepare_tables:
    return None
  route, live, live_limits = _all_levels_route(tuple(q_shape), jnp.dtype(dtype), levels,
                                               limits, cfg)
  if route != "grouped":
    return None
  return grouped_tables(q_shape, live, live_limits, cfg=cfg)


def clear_jit_caches() -> None:
  """Drops the traces of this module's jitted entry points. They are keyed by shapes and
  configuration, not by the kernel functions, so a test that swaps a kernel function (an
  emulator) clears them before and after."""
  for fn in (_forward_jit, _grouped_jit, _concurrent_jit):
    fn.clear_cache()


def _available() -> bool:
  return jax.default_backend() in ("gpu", "cuda", "rocm")


backends.register(backends.Backend("pallas", level_attention, platforms=("gpu",),
                                   is_available=_available, config=Config(), takes_layer=True,
                                   all_levels=all_levels, prepare_levels=prepare_levels))
