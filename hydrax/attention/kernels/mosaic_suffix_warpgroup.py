"""The per-sequence level on a warpgroup of its own inside the Mosaic GPU launch.

`mosaic_gpu.tile_attention(suffix_warpgroup=True)` (`MosaicConfig.suffix_warpgroup`, off)
folds a call's per-sequence level into the shared level's launch as a fourth warpgroup,
which runs on the CUDA cores beside the two wgmma warpgroups instead of taking their
tensor-core steps. A wgmma suffix step costs a node step's time for the T*G rows of one
sequence in its M of 64 (4 of 64 rows at decode with G = 4: run 16); written per thread,
a sequence's step is arithmetic on its own rows only. The compute warpgroups then run the
node's steps alone, as the unfolded kernel does.

Axis letters as in `mosaic_gpu`: K KV heads, D head dim, plus Rs = T*G rows of one sequence
(Rs in SEQ_ROWS), W = 4 warps of the warpgroup.

What it does, for one CTA (tile, key split p, KV head kvh):
- It takes the sequences the folded wgmma steps would give split p (row groups [p*ceil(J/P),
  (p+1)*ceil(J/P)) of each compute warpgroup's 64 rows, J = 64 / Rs), one after another.
- A sequence's suffix keys stream through `stages` shared-memory slots of KEYS = 32 keys
  (k and v, unswizzled), loaded by this warpgroup's own TMA copies, `stages` blocks ahead,
  across sequence boundaries; its q rows come by one copy into one of two buffers, a
  sequence ahead. Every sequence of the tile runs ceil(tab[tile, 3] / KEYS) blocks (the
  tile's largest suffix limit), masked per row.
- Warp w takes keys [8w, 8w + 8) of every block with its own online softmax (base 2), so
  every reduction of a step stays within a warp: lane l scores key l // 4 against a quarter
  of D (its partial dots added by two shuffles), the warp's maximum and sum over its 8 keys
  by three, then lane l accumulates columns [l*D/32, (l+1)*D/32) of p v over them. The
  warps' running (out, maximum, sum) live in shared memory between steps.
- At a sequence's end its threads merge the four warps' parts and write the rows' out and
  lse straight to global memory, as one more key split: plane P of out [P+1, ...] and lse
  [P+1, K, R]. The caller's merge of the splits then merges both levels; every tile row
  gets plane P from exactly one CTA (0 and -inf for rows that see no suffix key).

On the GPU the steps are written per thread through `plgpu.inline_mgpu` (Mosaic GPU's
lower level: MLIR's arith, vector, memref, and PTX's ex2 and shuffles). The GPU interpreter
cannot run that, so in interpret mode the same steps run as jnp on the same buffers (the
same warp split, state and merge); the two share the loop, the copies, the barriers, the
row maps and the output planes, which the interpreter checks. The per-thread code is
lowered for CUDA on the CPU in the tests.

On the H200 (run 18, call 3) it is exact against float32 XLA, but slower than the wgmma
fold: at 4K/256 its launch takes 123-131 us against 57 (the warpgroup's ~1.9 us a block of
32 keys bounds it), at 16K/256 177-186 against 139. So `MosaicConfig.suffix_warpgroup`
stays off.

Registers: four warpgroups of 128 threads share 65,536 registers, so the sum of the four
warpgroups' counts is at most 512 (`MosaicConfig.registers`: compute, memory, suffix; the
three-warpgroup kernel gives 232, 232, 40).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

KEYS = 32             # suffix keys a step
WARPS = 4
WARP_KEYS = KEYS // WARPS
SEQ_ROWS = (1, 2, 4, 8)   # T*G rows of a sequence the warpgroup takes
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# mosaic_gpu's TILE and BLOCK_Q, repeated (it imports this module; it asserts they agree)
_TILE, _BLOCK_Q = 128, 64


class Layout(NamedTuple):
  """Static facts of one launch the suffix warpgroup needs."""
  seq_rows: int          # Rs = T*G
  heads: int             # G when q is read in place (`tile_attention(heads=)`), else 0
  d: int
  stages: int
  splits: int            # P (the suffix's plane is P)
  scale_log2: float
  interpret: bool

  @property
  def queries(self) -> int:
    """T: query rows of a sequence (in-place layout)."""
    return self.seq_rows // self.heads if self.heads else self.seq_rows

  def row_offsets(self):
    """[Rs] of a sequence's rows r = t*G + g: their offset in the kernel's tile rows from the
    sequence's first (packed: r; q in place: g*(64 / G) + t, the warpgroup's rows by head)."""
    if not self.heads:
      return list(range(self.seq_rows))
    n = _BLOCK_Q // self.heads
    return [(r % self.heads) * n + r // self.heads for r in range(self.seq_rows)]


def unsupported_reason(seq_rows: int, capacity: int) -> Optional[str]:
  """Why the suffix warpgroup cannot take a per-sequence level (None when it can)."""
  if seq_rows not in SEQ_ROWS:
    return f"{seq_rows} query rows a sequence (the suffix warpgroup takes {SEQ_ROWS})"
  if capacity % KEYS or capacity == 0:
    return f"suffix capacity {capacity} (the suffix warpgroup takes a multiple of {KEYS})"
  return None


def check_registers(registers) -> tuple:
  """(compute, memory, suffix) registers a thread, validated: multiples of 8 in [24, 256]
  whose sum over the four warpgroups' threads fits the SM's 65,536 (2*c + m + s <= 512)."""
  regs = tuple(registers)
  if (len(regs) != 3 or any(isinstance(x, bool) or not isinstance(x, int) or x % 8
                            or not 24 <= x <= 256 for x in regs)
      or 2 * regs[0] + regs[1] + regs[2] > 512):
    raise ValueError(f"registers={registers!r}: (compute, memory, suffix), multiples of 8 in "
                     "[24, 256] with 2*compute + memory + suffix <= 512")
  return regs


def scratch(lay: Layout, dtype):
  """(buffers, barriers) of `run`, for the kernel's `pl.run_scoped`."""
  rs, d, t = lay.seq_rows, lay.d, lay.queries
  q_shape = (2, lay.heads, t, d) if lay.heads else (2, rs, d)      # (in place: by head)
  buffers = (plgpu.SMEM((lay.stages, KEYS, d), dtype), plgpu.SMEM((lay.stages, KEYS, d), dtype),
             plgpu.SMEM(q_shape, dtype), plgpu.SMEM((rs, d), jnp.float32),
             plgpu.SMEM((WARPS, rs, d), jnp.float32), plgpu.SMEM((WARPS, rs, 2), jnp.float32),
             plgpu.SMEM((WARPS, WARP_KEYS, rs), jnp.float32), plgpu.SMEM((_TILE,), jnp.int32))
  barriers = (plgpu.Barrier(num_arrivals=1, num_barriers=lay.stages),     # k
              plgpu.Barrier(num_arrivals=1, num_barriers=lay.stages),     # v
              plgpu.Barrier(num_arrivals=lay.heads or 1, num_barriers=2),  # q (a copy a head)
              plgpu.Barrier(num_arrivals=1, num_barriers=1))              # limits
  return buffers, barriers


def run(lay: Layout, refs, buffers, barriers, *, tile, split, kvh, snode0):
  """The suffix warpgroup of CTA (tile, split, kvh): every sequence of split `split`'s row
  groups through its suffix keys, each written as plane P of out and lse.

  refs: (tab [Tn,4], suffix table [Tn,2,J,2], suffix limits [Tn*TILE], suffix k, v
  [Ns,Ss,K,D] (a stacked cache seen as [L*Ns,...]), q, out, lse) as `mosaic_gpu._kernel`
  has them; snode0: the layer's first node in the suffix cache (0 when not stacked)."""
  tab_ref, stab_ref, slim_ref, ks_ref, vs_ref, q_ref, o_ref, lse_ref = refs
  kbuf, vbuf, qbuf, qf, st, ml, pb, lim = buffers
  k_bar, v_bar, q_bar, lim_bar = barriers
  rs, stages = lay.seq_rows, lay.stages
  groups = _BLOCK_Q // rs
  per_split = -(-groups // lay.splits)
  j0 = split * per_split
  nsj = jnp.clip(groups - j0, 0, per_split)
  nseq = 2 * nsj                                   # (the two compute warpgroups' halves)
  nb = lax.div(tab_ref[tile, 3] + (KEYS - 1), jnp.int32(KEYS))
  total = nseq * nb
  plgpu.copy_gmem_to_smem(slim_ref.at[pl.ds(tile * _TILE, _TILE)], lim, lim_bar.at[0])

  def sequence(s):
    """(compute warpgroup half h, row group j, its first tile row in the tile) of sequence s."""
    h, j = lax.div(s, nsj), j0 + lax.rem(s, nsj)
    first = h * _BLOCK_Q + (j * lay.queries if lay.heads else j * rs)
    return h, j, first

  def query_row(first):
    """q in place: the query row (of q [B*T, ...]) of a sequence's first row, whose tile row
    is tile*TILE + first (the warpgroup's head-0 rows are its query rows in order)."""
    return (lax.div(tile * _TILE + first - lax.rem(first, _BLOCK_Q), jnp.int32(lay.heads))
            + lax.rem(first, _BLOCK_Q))

  def load_q(s):
    _, _, first = sequence(s)
    slot = lax.rem(s, 2)
    if lay.heads:
      # one copy a head from q seen as [B*T, H*D] (a copy takes at most 256 columns)
      bt0 = query_row(first)
      for gi in range(lay.heads):
        col = pl.multiple_of((kvh * lay.heads + gi) * lay.d, lay.d)
        src = q_ref.at[pl.ds(bt0, lay.queries), pl.ds(col, lay.d)]
        plgpu.copy_gmem_to_smem(src, qbuf.at[slot, gi], q_bar.at[slot])
    else:
      plgpu.copy_gmem_to_smem(q_ref.at[kvh, pl.ds(tile * _TILE + first, rs)], qbuf.at[slot],
                              q_bar.at[slot])

  def load_block(u):
    s, c = lax.div(u, nb), lax.rem(u, nb)
    h, j, _ = sequence(s)
    node = stab_ref[tile, h, j, 0] + snode0
    slot = lax.rem(u, jnp.int32(stages))
    rows = (node, pl.ds(c * KEYS, KEYS), kvh)
    plgpu.copy_gmem_to_smem(ks_ref.at[rows], kbuf.at[slot], k_bar.at[slot])
    plgpu.copy_gmem_to_smem(vs_ref.at[rows], vbuf.at[slot], v_bar.at[slot])

  pl.when(nseq > 0)(functools.partial(load_q, jnp.int32(0)))
  for i in range(stages):
    pl.when(i < total)(functools.partial(load_block, jnp.int32(i)))
  plgpu.barrier_wait(lim_bar.at[0])
  steps = _jnp_steps(lay) if lay.interpret else _thread_steps(lay)

  @pl.loop(0, nseq)
  def _(s):
    pl.when(s + 1 < nseq)(functools.partial(load_q, s + 1))
    qslot = lax.rem(s, 2)
    plgpu.barrier_wait(q_bar.at[qslot])
    h, j, first = sequence(s)
    seq_hi = stab_ref[tile, h, j, 1]
    steps.start(qbuf, qf, st, ml, qslot)

    @pl.loop(0, nb)
    def _(c):
      u = s * nb + c
      slot = lax.rem(u, jnp.int32(stages))
      plgpu.barrier_wait(k_bar.at[slot])
      plgpu.barrier_wait(v_bar.at[slot])
      steps.step(kbuf, vbuf, qf, st, ml, pb, lim, slot, c * KEYS, first, seq_hi)
      pl.when(u + stages < total)(functools.partial(load_block, u + stages))

    # out's rows: packed, tile rows from tile*TILE + first; in place, query rows from bt0
    row0 = tile * _TILE + first
    bt0 = query_row(first) if lay.heads else row0
    steps.finish(st, ml, o_ref, lse_ref, kvh, row0, bt0)


class _Steps(NamedTuple):
  start: object     # (qbuf, qf, st, ml, qslot): q to float32, the warps' state emptied
  step: object      # (kbuf, vbuf, qf, st, ml, pb, lim, slot, key0, first, seq_hi)
  finish: object    # (st, ml, o_ref, lse_ref, kvh, row0, bt0): warps merged, plane P written


# --- interpret mode: the steps in jnp on the same buffers -----------------------------------

def _jnp_steps(lay: Layout) -> _Steps:
  rs, d, g = lay.seq_rows, lay.d, lay.heads
  offs = lay.row_offsets()

  def start(qbuf, qf, st, ml, qslot):
    q = qbuf[qslot].astype(jnp.float32)
    qf[...] = q.transpose(1, 0, 2).reshape(rs, d) if g else q          # (row t*G + g)
    st[...] = jnp.zeros((WARPS, rs, d), jnp.float32)
    ml[...] = jnp.stack([jnp.full((WARPS, rs), -jnp.inf, jnp.float32),
                         jnp.zeros((WARPS, rs), jnp.float32)], axis=-1)

  def step(kbuf, vbuf, qf, st, ml, pb, lim, slot, key0, first, seq_hi):
    del pb
    k = kbuf[slot].astype(jnp.float32).reshape(WARPS, WARP_KEYS, d)
    v = vbuf[slot].astype(jnp.float32).reshape(WARPS, WARP_KEYS, d)
    key = key0 + lax.broadcasted_iota(jnp.int32, (WARPS, WARP_KEYS), 0) * WARP_KEYS \
        + lax.broadcasted_iota(jnp.int32, (WARPS, WARP_KEYS), 1)
    v = jnp.where((key < seq_hi)[..., None], v, 0.0)         # (0 * NaN past the suffix)
    limits = jnp.stack([lim[first + off] for off in offs])                 # [Rs]
    s = jnp.einsum("rd,wkd->wrk", qf[...], k) * lay.scale_log2
    s = jnp.where(key[:, None, :] < limits[None, :, None], s, -jnp.inf)    # [W,Rs,8]
    m_old, l_old = ml[:, :, 0], ml[:, :, 1]
    m_new = jnp.maximum(m_old, s.max(axis=-1))
    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp2(m_old - m_use)
    p = jnp.exp2(s - m_use[..., None])
    st[...] = st[...] * alpha[..., None] + jnp.einsum("wrk,wkd->wrd", p, v)
    ml[...] = jnp.stack([m_new, l_old * alpha + p.sum(-1)], axis=-1)

  def finish(st, ml, o_ref, lse_ref, kvh, row0, bt0):
    out, lse = _merge_warps(st[...], ml[:, :, 0], ml[:, :, 1])
    out = out.astype(o_ref.dtype)
    plane = lay.splits
    if not g:
      o_ref[plane, kvh, pl.ds(row0, rs)] = out
      lse_ref[plane, kvh, pl.ds(row0, rs)] = lse
      return
    t = lay.queries
    o_ref[plane, pl.ds(bt0, t), pl.ds(kvh * g * d, g * d)] = out.reshape(t, g * d)
    lse_t = lse.reshape(t, g)
    n = _BLOCK_Q // g
    for gi in range(g):
      lse_ref[plane, kvh, pl.ds(row0 + gi * n, t)] = lse_t[:, gi]

  return _Steps(start, step, finish)


def _merge_warps(o, m, l):
  """The four warps' parts (o [W,Rs,D] unnormalised, m [W,Rs] base 2, l [W,Rs]) -> (out
  [Rs,D] f32, lse [Rs] natural log; 0 and -inf for a row that saw no key)."""
  top = m.max(axis=0)
  top = jnp.where(top == -jnp.inf, 0.0, top)
  wgt = jnp.exp2(m - top)
  total = (wgt * l).sum(axis=0)
  has = total > 0
  safe = jnp.where(has, total, 1.0)
  out = jnp.where(has[:, None], (wgt[..., None] * o).sum(axis=0) / safe[:, None], 0.0)
  return out, jnp.where(has, (top + jnp.log2(safe)) * LN2, -jnp.inf)


# --- on the GPU: the steps per thread (`plgpu.inline_mgpu`) ---------------------------------

def _thread_steps(lay: Layout) -> _Steps:
  """The steps of `_jnp_steps`, per thread. Thread t of the warpgroup: warp w = t // 32,
  lane l = t % 32. Each function ends with the warpgroup's barrier (its buffers are then
  free to reuse and its state visible to every thread)."""
  from jax.experimental.mosaic.gpu import utils as mu
  from jaxlib.mlir import ir
  from jaxlib.mlir.dialects import arith, llvm, math as mmath, memref, vector

  rs, d, g = lay.seq_rows, lay.d, lay.heads
  offs = lay.row_offsets()
  nch = d // 32             # 8-dim chunks of a lane's quarter of D
  cpl = d // 32             # out columns a lane
  ref = plgpu.RefType()
  scalar = plgpu.Layout.WG_SPLAT

  def common():
    f32, i32 = ir.F32Type.get(), ir.IntegerType.get_signless(32)
    idx = ir.IndexType.get()
    c = dict(
        f32=f32, i32=i32,
        vty=lambda n, ty: ir.VectorType.get((n,), ty),
        ci=lambda x: arith.constant(i32, x),
        cf=lambda x: arith.constant(f32, x),
        ix=lambda x: arith.index_cast(idx, x),
        cx=lambda x: arith.constant(idx, x),
    )
    t = arith.andi(mu.thread_idx(), c["ci"](127))
    return c, t, arith.shrui(t, c["ci"](5)), arith.andi(t, c["ci"](31))

  def val(x):
    """The ir.Value of a scalar argument (a splat fragmented array)."""
    return x.registers.flat[0]

  def zeros(c, n):
    ty = c["vty"](n, c["f32"])
    return arith.constant(ty, ir.DenseElementsAttr.get_splat(ty, ir.FloatAttr.get(c["f32"], 0.0)))

  def splat(c, x, n):
    return vector.broadcast(c["vty"](n, c["f32"]), x)

  def ex2(c, x):
    return llvm.inline_asm(c["f32"], [x], "ex2.approx.ftz.f32 $0, $1;", "=f,f")

  def q_index(c, qslot, row, col):
    """The index of q's element (row r = t*G + g of the sequence, col) in its buffer."""
    if not g:
      return [c["ix"](qslot), c["ix"](row), c["ix"](col)]
    return [c["ix"](qslot), c["ix"](arith.remui(row, c["ci"](g))),      # ([G, T, D] a slot)
            c["ix"](arith.divui(row, c["ci"](g))), c["ix"](col)]

  @plgpu.inline_mgpu(arg_types=(ref, ref, ref, ref, scalar))
  def start(ctx, qbuf, qf, st, ml, qslot):
    del ctx
    c, t, w, lane = common()
    qslot = val(qslot)
    dt = ir.MemRefType(qbuf.type).element_type
    total = rs * d
    for it in range(-(-total // (4 * 128))):
      e = arith.muli(arith.addi(t, c["ci"](128 * it)), c["ci"](4))
      with mu.when(arith.cmpi(arith.CmpIPredicate.slt, e, c["ci"](total))):
        row, col = arith.divui(e, c["ci"](d)), arith.remui(e, c["ci"](d))
        x = vector.load(c["vty"](4, dt), qbuf, q_index(c, qslot, row, col), alignment=8)
        vector.store(arith.extf(c["vty"](4, c["f32"]), x), qf, [c["ix"](row), c["ix"](col)],
                     alignment=16)
    col = c["ix"](arith.muli(lane, c["ci"](cpl)))
    for r in range(rs):
      vector.store(zeros(c, cpl), st, [c["ix"](w), c["cx"](r), col], alignment=4 * cpl)
    with mu.when(arith.cmpi(arith.CmpIPredicate.eq, lane, c["ci"](0))):
      for r in range(rs):
        memref.store(c["cf"](float("-inf")), ml, [c["ix"](w), c["cx"](r), c["cx"](0)])
        memref.store(c["cf"](0.0), ml, [c["ix"](w), c["cx"](r), c["cx"](1)])
    mu.warpgroup_barrier()

  @plgpu.inline_mgpu(arg_types=(ref,) * 7 + (scalar,) * 4)
  def step(ctx, kbuf, vbuf, qf, st, ml, pb, lim, slot, key0, first, seq_hi):
    del ctx
    c, t, w, lane = common()
    ci, ix, cx, f32 = c["ci"], c["ix"], c["cx"], c["f32"]
    slot, key0, first, seq_hi = (val(x) for x in (slot, key0, first, seq_hi))
    dt = ir.MemRefType(kbuf.type).element_type
    kl, dq = arith.shrui(lane, ci(2)), arith.andi(lane, ci(3))
    kw = arith.addi(arith.muli(w, ci(WARP_KEYS)), kl)           # this lane's key in the block
    key = arith.addi(key0, kw)
    # q k^T: lane (kl, dq) takes key kl against dims [dq*D/4, (dq+1)*D/4) in 8-dim chunks,
    # in an order that puts a quarter warp's 16-byte reads on distinct banks
    rot = arith.addi(kl, arith.muli(arith.shrui(dq, ci(1)), ci(2))) if nch == 4 else kl
    # (one scalar chain a row: a vector accumulator would hold 8 registers a row, and the
    # GPU has no vector FMA in float32 anyway)
    acc = [c["cf"](0.0) for _ in range(rs)]
    elem = lambda x, e: vector.extract(x, dynamic_position=[],
                                       static_position=ir.DenseI64ArrayAttr.get([e]))
    for ch in range(nch):
      chunk = arith.andi(arith.addi(rot, ci(ch)), ci(nch - 1))
      dim0 = arith.addi(arith.muli(dq, ci(d // 4)), arith.muli(chunk, ci(8)))
      kv = arith.extf(c["vty"](8, f32), vector.load(c["vty"](8, dt), kbuf,
                                                    [ix(slot), ix(kw), ix(dim0)], alignment=16))
      ks = [elem(kv, e) for e in range(8)]
      for r in range(rs):
        qv = vector.load(c["vty"](8, f32), qf, [cx(r), ix(dim0)], alignment=16)
        for e in range(8):
          acc[r] = mmath.fma(elem(qv, e), ks[e], acc[r])
    neg_inf = c["cf"](float("-inf"))
    p, m_new, l_new, alpha = [], [], [], []
    for r in range(rs):
      s = acc[r]
      s = arith.addf(s, mu.shfl_bfly(s, 1))
      s = arith.addf(s, mu.shfl_bfly(s, 2))
      s = arith.mulf(s, c["cf"](lay.scale_log2))
      limit = memref.load(lim, [ix(arith.addi(first, ci(offs[r])))])
      s = arith.select(arith.cmpi(arith.CmpIPredicate.slt, key, limit), s, neg_inf)
      # the warp's 8 keys: lane bits 2..4 (bits 0..1 hold the same key)
      mx = s
      for dist in (4, 8, 16):
        mx = arith.maximumf(mx, mu.shfl_bfly(mx, dist))
      m_old = memref.load(ml, [ix(w), cx(r), cx(0)])
      l_old = memref.load(ml, [ix(w), cx(r), cx(1)])
      mn = arith.maximumf(m_old, mx)
      m_use = arith.select(arith.cmpf(arith.CmpFPredicate.OEQ, mn, neg_inf), c["cf"](0.0), mn)
      a = ex2(c, arith.subf(m_old, m_use))
      pr = ex2(c, arith.subf(s, m_use))
      ps = pr
      for dist in (4, 8, 16):
        ps = arith.addf(ps, mu.shfl_bfly(ps, dist))
      p.append(pr)
      m_new.append(mn)
      l_new.append(arith.addf(arith.mulf(l_old, a), ps))
      alpha.append(a)
    with mu.when(arith.cmpi(arith.CmpIPredicate.eq, dq, ci(0))):
      for r in range(rs):
        memref.store(p[r], pb, [ix(w), ix(kl), cx(r)])
    mu.warp_barrier()
    # p v: lane l takes columns [l*D/32, (l+1)*D/32) over the warp's 8 keys
    col = ix(arith.muli(lane, ci(cpl)))
    o = [arith.mulf(vector.load(c["vty"](cpl, f32), st, [ix(w), cx(r), col], alignment=4 * cpl),
                    splat(c, alpha[r], cpl)) for r in range(rs)]
    for kk in range(WARP_KEYS):
      vrow = arith.addi(arith.muli(w, ci(WARP_KEYS)), ci(kk))
      vj = arith.extf(c["vty"](cpl, f32), vector.load(c["vty"](cpl, dt), vbuf,
                                                      [ix(slot), ix(vrow), col], alignment=2 * cpl))
      # value rows past the sequence's suffix are not finite data: p is 0 there, 0 * NaN not
      live = arith.cmpi(arith.CmpIPredicate.slt, arith.addi(key0, vrow), seq_hi)
      vj = arith.select(live, vj, zeros(c, cpl))
      for r in range(rs):
        pk = memref.load(pb, [ix(w), cx(kk), cx(r)])
        o[r] = mmath.fma(splat(c, pk, cpl), vj, o[r])
    for r in range(rs):
      vector.store(o[r], st, [ix(w), cx(r), col], alignment=4 * cpl)
    with mu.when(arith.cmpi(arith.CmpIPredicate.eq, lane, ci(0))):
      for r in range(rs):
        memref.store(m_new[r], ml, [ix(w), cx(r), cx(0)])
        memref.store(l_new[r], ml, [ix(w), cx(r), cx(1)])
    mu.warpgroup_barrier()

  @plgpu.inline_mgpu(arg_types=(ref,) * 4 + (scalar,) * 3)
  def finish(ctx, st, ml, o_ref, lse_ref, kvh, row0, bt0):
    del ctx
    c, t, _, _ = common()
    ci, ix, cx, f32 = c["ci"], c["ix"], c["cx"], c["f32"]
    kvh, row0, bt0 = (val(x) for x in (kvh, row0, bt0))
    dt = ir.MemRefType(o_ref.type).element_type
    plane = cx(lay.splits)
    neg_inf, zero = c["cf"](float("-inf")), c["cf"](0.0)
    total = rs * d
    for it in range(-(-total // 128)):
      e = arith.addi(t, ci(128 * it))
      with mu.when(arith.cmpi(arith.CmpIPredicate.slt, e, ci(total))):
        r, col = arith.divui(e, ci(d)), arith.remui(e, ci(d))
        ms = [memref.load(ml, [cx(w), ix(r), cx(0)]) for w in range(WARPS)]
        top = ms[0]
        for m in ms[1:]:
          top = arith.maximumf(top, m)
        top = arith.select(arith.cmpf(arith.CmpFPredicate.OEQ, top, neg_inf), zero, top)
        tot, acc = zero, zero
        for w in range(WARPS):
          wgt = ex2(c, arith.subf(ms[w], top))
          tot = mmath.fma(wgt, memref.load(ml, [cx(w), ix(r), cx(1)]), tot)
          acc = mmath.fma(wgt, memref.load(st, [cx(w), ix(r), ix(col)]), acc)
        has = arith.cmpf(arith.CmpFPredicate.OGT, tot, zero)
        safe = arith.select(has, tot, c["cf"](1.0))
        out = arith.truncf(dt, arith.select(has, arith.divf(acc, safe), zero))
        # the row's place in the kernel's tile rows (lse, packed out) from the sequence's first
        off = (r if not g else arith.addi(arith.muli(arith.remui(r, ci(g)), ci(_BLOCK_Q // g)),
                                          arith.divui(r, ci(g))))
        trow = arith.addi(row0, off)
        if g:
          head = arith.addi(arith.muli(kvh, ci(g)), arith.remui(r, ci(g)))
          memref.store(out, o_ref, [plane, ix(arith.addi(bt0, arith.divui(r, ci(g)))),
                                    ix(arith.addi(arith.muli(head, ci(d)), col))])
        else:
          memref.store(out, o_ref, [plane, ix(kvh), ix(trow), ix(col)])
        with mu.when(arith.cmpi(arith.CmpIPredicate.eq, col, ci(0))):
          lg2 = llvm.inline_asm(f32, [safe], "lg2.approx.ftz.f32 $0, $1;", "=f,f")
          lse = arith.select(has, arith.mulf(arith.addf(top, lg2), c["cf"](LN2)), neg_inf)
          memref.store(lse, lse_ref, [plane, ix(kvh), ix(trow)])
    mu.warpgroup_barrier()

  def as_scalars(fn, n_refs):
    """Scalar arguments as int32 jax scalars (inline_mgpu takes them as splat arrays)."""
    def call(*args):
      return fn(*args[:n_refs], *(jnp.asarray(x, jnp.int32) for x in args[n_refs:]))
    return call

  return _Steps(as_scalars(start, 4), as_scalars(step, 7), as_scalars(finish, 4))
