"""The `pallas_tpu` backend: grouped flash attention in Pallas, lowered through Mosaic TPU.

Axis letters: B sequences, T queries per sequence, S keys (a node's capacity), H = K*G query
heads, K KV heads, D head dim, N nodes, L layers (stacked caches), R = B*T*G rows per KV head,
M rows per tile (block_m), Sb keys per block (block_k), Tn tiles.

One kernel serves every level (contract in `hydrax.attention.xla`). Per KV head, the R query
rows are the T*G rows (t, g) of every sequence with the sequences sorted by node
(`grouping.make_layout`): a shared level stacks the queries of all sequences of a node and all
G query heads of a KV head into the M rows of one product with that node's key block
(Hydragen's inter-sequence batching); the per-sequence level is the case N = B. The rows are cut
into tiles of <= M rows of one node each and gathered into slots [Tn*M] (tile i owns slots
i*M .. i*M+M-1; unused slots are padding with key limit 0).

Owners are run-time data. The tile table (tile -> node, min and max key limit of its rows, and
the key block to fetch) is computed with `jnp` from the owner array inside the compiled program
(argsort by node, static bound Tn = (R + min(N, B) * (M - 1)) // M tiles), and reaches the
kernel by scalar prefetch (`pltpu.PrefetchScalarGridSpec`), where the index maps read it: a new
tree of the same shapes reuses the compiled program. Tiles past the real count see no key,
fetch no new key block and write only their own padding slots.

Grid (Tn, ceil(S / Sb)): tiles "parallel", key blocks "arbitrary" (the innermost loop carries
the online softmax in VMEM scratch, float32, natural log). A program loads the key and value
blocks [Sb, K, D] of its tile's node (all K heads: a block over the last two dims (K, D) is
whole, as Mosaic's (8, 128) tiling requires), and for each KV head runs the [M, D] x [D, Sb]
product of its rows. Key blocks at or past the tile's largest limit are skipped, both their
compute and their DMA (the index map repeats the previous block, so the pipeline does not
fetch); blocks below the tile's smallest limit run unmasked; the rest are masked per row, and
value rows past the largest limit are zeroed, so keys and values past the valid lengths (even
NaN or Inf, even the out-of-bounds rows of a partial last block) never reach the output. A row
that sees no key gives out 0 and lse -inf, never NaN.

Stacked caches: with `layer` (the backend has takes_layer=True), k, v are [L,N,S,K,D] and the
index maps read layer `layer` (a scalar-prefetch operand, may be traced) in place: no copy.

Shapes: any B, T, S, D. S needs no padding (the partial last block is masked); D is a whole
block dimension (VMEM rows are lane-padded to 128 inside Mosaic, so D = 64 or 80 costs the lanes
of D = 128, not a copy). Dtypes bfloat16 and float32 (float32 products at HIGHEST precision);
float16 raises `backends.Unsupported` (the caller falls back to XLA for that level, logged
once).

Block sizes (`TpuConfig`, chosen statically by `plan`): M = the rows per node and KV head
rounded up to the dtype's sublane tile (8 float32, 16 bfloat16), at most 512 (two passes of
v6e's 256-wide MXU, four of v5e's 128-wide ones): each tile reads its node's keys once, so a
larger M divides the shared prefix's reads. Sb = 512 keys (a 2 MiB k+v step at K=8, D=128,
bf16: DMA-sized steps against the ~0.35 us fixed cost of a grid step). While the estimated
VMEM use (`vmem_bytes`: double-buffered q, k, v, out, lse and limit blocks, the scratch and the
score temporaries, K and D padded to the (sublane, 128) tile) exceeds `vmem_budget` = 24 MiB,
Sb shrinks to 256, then M to 256, then Sb to 128, then M. The scoped VMEM limit passed to
Mosaic follows the estimate (`vmem_limit`; v5e and v6e have 128 MiB of VMEM per core, 16 and
32 MiB scoped by default; on a chip with 16 MiB of VMEM (v4) pass `vmem_budget=10 << 20`).
These are design choices, not measured optima: `experiments/bench_attention_tpu.py --sweep`
measures them.

Gradients: `jax.custom_vjp` whose backward pass recomputes the level with the XLA backend.

Off TPU the kernel runs in Pallas TPU interpret mode (`TpuConfig(interpret=None)`: interpret
unless the default backend is a TPU; logged once); `interpret="generic"` uses Pallas' generic
interpreter (faster; tests). Hardware status: written for Mosaic TPU and lowered to Mosaic
MLIR on CPU in the tests (`lower(lowering_platforms=("tpu",))`); it has
not been compiled by libtpu or run on a TPU (none was available).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from hydrax._log import log_once
from hydrax.attention import backends, xla
from hydrax.attention.kernels import grouping

_LANES = 128
_MiB = 1 << 20


@dataclasses.dataclass(frozen=True)
class TpuConfig:
  """Kernel configuration (hashable). None picks by shape (see `plan`)."""
  block_m: Optional[int] = None        # M, rows per tile: a multiple of 8
  max_block_m: int = 512               # cap on the automatic M
  block_k: Optional[int] = None        # Sb, keys per block: a multiple of 8 (or >= S)
  max_block_k: int = 512               # cap on the automatic Sb
  vmem_budget: int = 24 * _MiB         # estimated VMEM use the automatic sizes stay under
  vmem_limit: Optional[int] = None     # Mosaic's scoped VMEM limit; None: see `vmem_limit`
  # None: interpret unless the default backend is a TPU. True: Pallas TPU interpret mode
  # (simulates the pipeline's DMAs; uninitialised VMEM reads NaN). "generic": Pallas' generic
  # interpreter (faster to compile and run; for tests).
  interpret: Optional[object] = None


class Plan(NamedTuple):
  """Static block sizes of one level: M rows per tile, Sb keys per block, Tn tiles."""
  block_m: int
  block_k: int
  num_tiles: int
  num_blocks: int
  vmem_bytes: int


def _round_up(x: int, m: int) -> int:
  return -(-int(x) // m) * m


def _sublanes(dtype) -> int:
  """Rows of one (sublane, 128) VMEM tile: 8 for 32-bit, 16 for 16-bit types."""
  return 8 * (4 // jnp.dtype(dtype).itemsize)


def vmem_bytes(block_m: int, block_k: int, kv_heads: int, d: int, dtype) -> int:
  """Estimated VMEM of one program: double-buffered q, k, v, limits, out, lse blocks, the
  float32 scratch (m, l lane-replicated; the accumulator) and the score temporaries; K and D
  padded to the VMEM tile."""
  isz = jnp.dtype(dtype).itemsize
  dl = _round_up(d, _LANES)
  kp = _round_up(kv_heads, _sublanes(dtype))
  mp = _round_up(block_m, 8)
  q = kv_heads * _round_up(block_m, _sublanes(dtype)) * dl * isz
  kv = 2 * block_k * kp * dl * isz
  out = kv_heads * mp * dl * 4
  small = (_round_up(kv_heads, 8) * _round_up(block_m, _LANES)   # lse block [K, M]
           + mp * _LANES) * 4                                     # limits [M, 1], lane-padded
  scratch = out + 2 * kv_heads * mp * _LANES * 4    # acc, m, l
  temps = max(3 * mp * _round_up(block_k, _LANES), 2 * mp * _round_up(block_m, _LANES)) * 4
  return 2 * (q + kv + out + small) + scratch + temps


def vmem_limit(p: Plan, cfg: TpuConfig) -> int:
  """Scoped VMEM limit passed to Mosaic: the estimate plus a quarter and 4 MiB for Mosaic's
  own buffers, at least 16 MiB (v5e's scoped default; v6e's is 32 MiB, both have 128 MiB)."""
  if cfg.vmem_limit is not None:
    return cfg.vmem_limit
  return max(16 * _MiB, _round_up(p.vmem_bytes * 5 // 4 + 4 * _MiB, _MiB))


def plan(q_shape, k_shape, dtype, num_nodes: int, per_sequence: bool,
         cfg: TpuConfig) -> Plan:
  """Block sizes for one level (static). k_shape is [N,S,K,D] (the layer's view)."""
  b, t, h, d = q_shape
  s, kh = k_shape[1], k_shape[2]
  g = h // kh
  sub = _sublanes(dtype)
  rows_per_node = t * g * (1 if per_sequence else b / max(1, min(num_nodes, b)))
  if cfg.block_m is not None:
    bm = cfg.block_m
    if bm < 8 or bm % 8:
      raise ValueError(f"TpuConfig.block_m must be a positive multiple of 8, got {bm}")
  else:
    bm = min(_round_up(cfg.max_block_m, sub), _round_up(math.ceil(rows_per_node), sub))
  if cfg.block_k is not None:
    bk = min(cfg.block_k, s)
    if bk < 1 or (bk % 8 and bk != s):
      raise ValueError(f"TpuConfig.block_k must be a positive multiple of 8, got "
                       f"{cfg.block_k}")
  else:
    bk = s if s <= cfg.max_block_k else cfg.max_block_k
  # Over the budget: Sb down to 256, then M down to 256, then Sb to 128, then M.
  for floor_k, floor_m in ((256, 256), (_LANES, sub)):
    while vmem_bytes(bm, bk, kh, d, dtype) > cfg.vmem_budget:
      if cfg.block_k is None and bk > floor_k:
        bk = max(floor_k, _round_up(bk // 2, 8))
      elif cfg.block_m is None and bm > floor_m:
        bm = max(floor_m, _round_up(bm // 2, sub))
      else:
        break
  rows = t * g
  if per_sequence:
    num_tiles = b * (-(-rows // bm))
  else:
    num_tiles = (b * rows + min(num_nodes, b) * (bm - 1)) // bm
  return Plan(bm, bk, max(1, num_tiles), -(-s // bk), vmem_bytes(bm, bk, kh, d, dtype))


def _interpret(cfg: TpuConfig):
  """Value for pallas_call's `interpret`: False on TPU, else TPU interpret mode."""
  use = cfg.interpret
  if use is None:
    use = jax.default_backend() != "tpu"
    if use:
      log_once(("pallas-tpu-interpret", jax.default_backend()),
               "hydrax pallas_tpu backend: no TPU (default backend %r), running the kernels in "
               "Pallas TPU interpret mode (slow; meant for tests)", jax.default_backend())
  if use not in (True, False, "generic"):
    raise ValueError(f"TpuConfig.interpret must be None, True, False or 'generic', got {use!r}")
  if not use:
    return False
  if use == "generic":
    return True
  params = getattr(pltpu, "InterpretParams", None)
  return params() if params is not None else True


def _squeezed():
  return pl.Squeezed() if hasattr(pl, "Squeezed") else None


class _Spec(NamedTuple):
  """Static parameters of the kernel body."""
  block_m: int
  block_k: int
  kv_heads: int
  scale: float
  exact: bool             # float32 inputs: products at HIGHEST precision


def _kernel(layer_ref, node_ref, fnode_ref, fblk_ref, lo_ref, hi_ref,   # scalar prefetch
            lim_ref, q_ref, k_ref, v_ref,                                # VMEM blocks
            o_ref, lse_ref,                                              # outputs
            m_sc, l_sc, acc_sc, *, spec: _Spec):
  """Tile i, key block j. lim [M,1] int32, q [K,M,D], k, v [Sb,K,D]; o [K,M,D] f32,
  lse [K,M] f32 (rows along lanes: dense in HBM); scratch m, l [K,M,128] f32
  (lane-replicated), acc [K,M,D] f32."""
  del layer_ref, node_ref, fnode_ref, fblk_ref     # read by the index maps only
  i, j = pl.program_id(0), pl.program_id(1)
  bm, bk = spec.block_m, spec.block_k
  lo, hi = lo_ref[i], hi_ref[i]
  start = j * bk

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  precision = lax.Precision.HIGHEST if spec.exact else lax.Precision.DEFAULT

  def block(masked: bool):
    lim = lim_ref[...]                                               # [M, 1]
    keys = start + lax.broadcasted_iota(jnp.int32, (1, bk), 1)       # [1, Sb]
    key_ok = keys < lim                                              # [M, Sb]
    v_ok = (start + lax.broadcasted_iota(jnp.int32, (bk, 1), 0)) < hi
    for kh in range(spec.kv_heads):
      q = q_ref[kh]                                                  # [M, D]
      kb = k_ref[:, kh, :]                                           # [Sb, D]
      vb = v_ref[:, kh, :]
      s = lax.dot_general(q, kb, (((1,), (1,)), ((), ())), precision=precision,
                          preferred_element_type=jnp.float32) * spec.scale
      if masked:
        s = jnp.where(key_ok, s, -jnp.inf)
        vb = jnp.where(v_ok, vb, jnp.zeros_like(vb))
      m_prev = m_sc[kh][:, :1]                                       # [M, 1]
      m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
      m_use = jnp.where(m_new > -jnp.inf, m_new, 0.0)                # rows that saw no key yet
      alpha = jnp.exp(m_prev - m_use)
      p = jnp.exp(s - m_use)
      l_new = alpha * l_sc[kh][:, :1] + jnp.sum(p, axis=1, keepdims=True)
      pv = lax.dot_general(p.astype(vb.dtype), vb, (((1,), (0,)), ((), ())),
                           precision=precision, preferred_element_type=jnp.float32)
      acc_sc[kh] = acc_sc[kh] * alpha + pv
      m_sc[kh] = jnp.broadcast_to(m_new, (bm, _LANES))
      l_sc[kh] = jnp.broadcast_to(l_new, (bm, _LANES))

  # Blocks entirely below every row's limit need no mask; blocks from hi on are skipped.
  pl.when(start + bk <= lo)(lambda: block(False))
  pl.when(jnp.logical_and(start < hi, start + bk > lo))(lambda: block(True))

  @pl.when(j == pl.num_programs(1) - 1)
  def _finish():
    # The [M, 1] column of a head's lse becomes a [1, M] row through its diagonal (a select
    # and a sublane sum: no transpose), so the lse output is lane-dense.
    eye = (lax.broadcasted_iota(jnp.int32, (bm, bm), 0)
           == lax.broadcasted_iota(jnp.int32, (bm, bm), 1))
    for kh in range(spec.kv_heads):
      l = l_sc[kh][:, :1]
      has = l > 0
      l_safe = jnp.where(has, l, 1.0)
      o_ref[kh] = jnp.where(has, acc_sc[kh] / l_safe, 0.0)
      col = jnp.where(has, m_sc[kh][:, :1] + jnp.log(l_safe), -jnp.inf)
      lse_ref[pl.ds(kh, 1), :] = jnp.sum(jnp.where(eye, col, 0.0), axis=0, keepdims=True)


class Tiles(NamedTuple):
  """Run-time tile table and slot maps of one level (all int32 jnp or NumPy arrays).

  node, fetch_node, fetch_block, lo, hi: [Tn] each tile's node, the node and key block its
  index maps fetch when it has no key to see, and the min / max key limit of its rows.
  src: [Tn*M] the unsorted row (b*T*G + t*G + g) of each slot; valid: [Tn*M] bool.
  lim: [Tn*M] the key limit of each slot (0 for padding). pos: [R] the slot of each row.
  """
  node: object
  fetch_node: object
  fetch_block: object
  lo: object
  hi: object
  src: object
  valid: object
  lim: object
  pos: object


def tile_table(owner, limits, num_nodes: int, g: int, p: Plan) -> Tiles:
  """The tile table of a level from its owner array ([B] int32, traced or not; None for the
  per-sequence level) and key limits [B,T], computed with `jnp` (run-time data)."""
  b, t = limits.shape
  rows_per_seq = t * g
  if owner is not None and num_nodes > 1:
    owner = jnp.asarray(owner, jnp.int32)       # run-time: never a static layout
  layout = grouping.make_layout(owner, num_nodes, b, rows_per_seq, p.block_m)
  if layout.num_tiles > p.num_tiles:
    raise AssertionError(f"tile bound {p.num_tiles} < {layout.num_tiles} tiles")
  pad = p.num_tiles - layout.num_tiles
  node, start, count = (jnp.pad(jnp.asarray(x, jnp.int32), (0, pad)) for x in
                        (layout.node, layout.start, layout.count))
  bm = p.block_m
  local = jnp.arange(bm, dtype=jnp.int32)[None, :]
  valid = local < count[:, None]                                        # [Tn, M]
  row = jnp.where(valid, start[:, None] + local, 0)                     # sorted row
  seq = row // rows_per_seq
  if layout.order is not None:
    seq = jnp.asarray(layout.order, jnp.int32)[seq]
  src = (seq * rows_per_seq + row % rows_per_seq).reshape(-1)
  valid = valid.reshape(-1)
  row_lim = jnp.repeat(limits.astype(jnp.int32).reshape(b * t), g)     # [R]
  lim = jnp.where(valid, row_lim[src], 0)
  lim2 = lim.reshape(p.num_tiles, bm)
  hi = jnp.max(lim2, axis=1)
  lo = jnp.min(jnp.where(valid.reshape(p.num_tiles, bm), lim2, jnp.iinfo(jnp.int32).max),
               axis=1)
  lo = jnp.where(hi > 0, lo, 0)
  # A tile with no key to see fetches what the last tile with keys fetched last (no new DMA).
  has = hi > 0
  last_block = jnp.maximum(hi - 1, 0) // p.block_k
  idx = lax.cummax(jnp.where(has, jnp.arange(p.num_tiles, dtype=jnp.int32), -1), axis=0)
  prev = jnp.maximum(idx, 0)
  fetch_node = jnp.where(idx >= 0, node[prev], 0)
  fetch_block = jnp.where(idx >= 0, last_block[prev], 0)
  r = b * rows_per_seq
  slots = jnp.arange(p.num_tiles * bm, dtype=jnp.int32)
  pos = jnp.zeros((r,), jnp.int32).at[jnp.where(valid, src, r)].set(slots, mode="drop")
  return Tiles(node, fetch_node, fetch_block, lo, hi, src, valid, lim, pos)


def _kv_spec(p: Plan, kv_heads: int, d: int, stacked: bool):
  sq = _squeezed()

  def kv_map(i, j, layer, node, fnode, fblk, lo, hi):
    blk = jnp.where(hi[i] > 0, jnp.minimum(j, lax.div(hi[i] - 1, p.block_k)), fblk[i])
    if stacked:
      return (layer[0], fnode[i], blk, 0, 0)
    return (fnode[i], blk, 0, 0)

  shape = ((sq,) if stacked else ()) + (sq, p.block_k, kv_heads, d)
  return pl.BlockSpec(shape, kv_map)


def grouped_call(qt, k, v, layer, tiles: Tiles, p: Plan, *, scale: float, interpret,
                 stacked: bool, vmem_limit: Optional[int] = None):
  """The pallas_call over gathered query slots qt [K, Tn*M, D] and k, v [N,S,K,D] (or
  [L,N,S,K,D] with `stacked`, layer [1] int32). Returns out [K, Tn*M, D] f32 and
  lse [Tn, K, M] f32 (natural log)."""
  kh, _, d = qt.shape
  bm = p.block_m
  spec = _Spec(bm, p.block_k, kh, float(scale), qt.dtype == jnp.float32)
  row_map = lambda i, j, *_: (i, 0)
  head_map = lambda i, j, *_: (0, i, 0)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=6,
      grid=(p.num_tiles, p.num_blocks),
      in_specs=[pl.BlockSpec((bm, 1), row_map),                      # slot key limits
                pl.BlockSpec((kh, bm, d), head_map),                 # q slots
                _kv_spec(p, kh, d, stacked), _kv_spec(p, kh, d, stacked)],
      out_specs=[pl.BlockSpec((kh, bm, d), head_map),
                 pl.BlockSpec((_squeezed(), kh, bm), lambda i, j, *_: (i, 0, 0))],
      scratch_shapes=[pltpu.VMEM((kh, bm, _LANES), jnp.float32),
                      pltpu.VMEM((kh, bm, _LANES), jnp.float32),
                      pltpu.VMEM((kh, bm, d), jnp.float32)])
  rows = p.num_tiles * bm
  return pl.pallas_call(
      functools.partial(_kernel, spec=spec),
      grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct((kh, rows, d), jnp.float32),
                 jax.ShapeDtypeStruct((p.num_tiles, kh, bm), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"),
                                           vmem_limit_bytes=vmem_limit),
      interpret=interpret,
      name="hydrax_tpu_grouped_attention",
  )(layer, tiles.node, tiles.fetch_node, tiles.fetch_block, tiles.lo, tiles.hi,
    tiles.lim.reshape(rows, 1), qt, k, v)


def _forward(q, k, v, limits, owner, layer, *, scale: float, cfg: TpuConfig):
  """One level (see `level_attention`); owner [B] int32 or None; layer [1] int32 or None."""
  b, t, h, d = q.shape
  stacked = layer is not None
  n, s, kh = k.shape[-4], k.shape[-3], k.shape[-2]
  g = h // kh
  p = plan(q.shape, (n, s, kh, d), q.dtype, n, owner is None, cfg)
  tiles = tile_table(owner, limits, n, g, p)
  qf = jnp.transpose(q.reshape(b, t, kh, g, d), (2, 0, 1, 3, 4)).reshape(kh, b * t * g, d)
  qt = jnp.take(qf, tiles.src, axis=1)
  if layer is None:
    layer = jnp.zeros((1,), jnp.int32)
  out, lse = grouped_call(qt, k, v, layer.reshape(1), tiles, p, scale=scale,
                          interpret=_interpret(cfg), stacked=stacked,
                          vmem_limit=vmem_limit(p, cfg))
  out = jnp.take(out, tiles.pos, axis=1).reshape(kh, b, t, g, d)
  lse = jnp.transpose(lse, (1, 0, 2)).reshape(kh, p.num_tiles * p.block_m)
  lse = jnp.take(lse, tiles.pos, axis=1).reshape(kh, b, t, g)
  return (jnp.transpose(out, (1, 2, 0, 3, 4)).reshape(b, t, h, d),
          jnp.transpose(lse, (1, 2, 0, 3)).reshape(b, t, h))


@functools.partial(jax.jit, static_argnames=("per_sequence", "scale", "cfg"))
def _forward_jit(q, k, v, limits, owner, layer, *, per_sequence, scale, cfg):
  """`_forward` under jit: owner and layer are run-time arrays (a new tree of the same shapes
  reuses the program)."""
  return _forward(q, k, v, limits, None if per_sequence else owner, layer, scale=scale,
                  cfg=cfg)


@functools.partial(jax.jit, static_argnames=("per_sequence", "scale"))
def _xla_vjp(q, k, v, lengths, limits, owner, layer, cts, *, per_sequence, scale):
  """Cotangents of (q, k, v) for one level, recomputed with the XLA backend."""

  def ref(q, k, v):
    if layer is not None:
      k = lax.dynamic_index_in_dim(k, layer[0], 0, keepdims=False)
      v = lax.dynamic_index_in_dim(v, layer[0], 0, keepdims=False)
    return xla.level_attention(q, k, v, lengths, None if per_sequence else owner, limits,
                               scale=scale)

  _, vjp = jax.vjp(ref, q, k, v)
  return vjp(cts)


_DTYPES = (jnp.bfloat16, jnp.float32)


def level_attention(q, k, v, lengths, owner, limits, *, scale, config: Optional[TpuConfig] = None,
                    layer=None):
  """One level of attention through the Mosaic TPU kernel; contract in `hydrax.attention.xla`.

  With `layer` (int32 scalar, may be traced), k and v are stacked [L,N,S,K,D] caches and the
  level is that layer, read in place. Raises backends.Unsupported for dtypes other than
  bfloat16 and float32. Differentiable: the backward pass recomputes with the XLA backend.
  """
  cfg = TpuConfig() if config is None else config
  b, t, h, d = q.shape
  n, s = k.shape[-4], k.shape[-3]
  if s == 0 or b == 0 or t == 0:
    return (jnp.zeros(q.shape, jnp.float32), jnp.full((b, t, h), -jnp.inf, jnp.float32))
  if q.dtype not in _DTYPES:
    raise backends.Unsupported(f"dtype {q.dtype} (the TPU kernels take bfloat16, float32)")
  per_sequence = owner is None
  owner_arr = (jnp.zeros((b,), jnp.int32) if per_sequence
               else jnp.asarray(owner).astype(jnp.int32))
  layer_arr = None if layer is None else jnp.asarray(layer, jnp.int32).reshape(1)
  lengths = jnp.full((n,), s, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
  scale = float(scale)

  @jax.custom_vjp
  def f(q, k, v, lengths, limits, owner_arr, layer_arr):
    return _forward_jit(q, k, v, limits, owner_arr, layer_arr, per_sequence=per_sequence,
                        scale=scale, cfg=cfg)

  def f_fwd(q, k, v, lengths, limits, owner_arr, layer_arr):
    return f(q, k, v, lengths, limits, owner_arr, layer_arr), (q, k, v, lengths, limits,
                                                               owner_arr, layer_arr)

  def f_bwd(res, cts):
    q, k, v, lengths, limits, owner_arr, layer_arr = res
    dq, dk, dv = _xla_vjp(q, k, v, lengths, limits, owner_arr, layer_arr, cts,
                          per_sequence=per_sequence, scale=scale)
    return dq, dk, dv, None, None, None, None

  f.defvjp(f_fwd, f_bwd)
  return f(q, k, v, lengths, limits.astype(jnp.int32), owner_arr, layer_arr)


def _available() -> bool:
  return jax.default_backend() == "tpu"


BACKEND = backends.Backend("pallas_tpu", level_attention, platforms=("tpu",),
                           is_available=_available, config=TpuConfig(), takes_layer=True)
backends.register(BACKEND)
