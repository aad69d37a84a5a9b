"""Does the transposed suffix product lower for the H200's Mosaic GPU? (CPU, no GPU needed.)

Axis letters: D head dim, N query rows of one sequence in the product (G = 4 padded), KEYS a
suffix block. The folded suffix steps of `hydrax/attention/kernels/mosaic_gpu.py` multiply a
warpgroup's whole 64-row q tile with one sequence's keys, of which 4 rows are that sequence's
(15/16 of the products wasted; experiments/results/fused_h200 README, "The next call"). The
transposed form makes the keys wgmma's M and the sequence's rows its N:

    s^T [KEYS, N] = k [KEYS, D] @ q^T [D, N]     softmax over axis 0 (the keys)
    o^T [D, N]    = v^T [D, KEYS] @ p^T [KEYS, N]  (p^T through shared memory)

This builds that chain as a one-CTA Pallas Mosaic GPU kernel and exports it for CUDA from the
CPU (`jax.export`: Pallas lowers it to Mosaic GPU's module, layouts and wgmma checked; only
the PTX compile waits for a GPU), for each N and shared-memory swizzle, and prints which
lower. Run 13 (jax 0.10.2): N = 64 lowers with swizzle 128; N = 16 and 32 only with every
operand at a swizzle of 2 N bytes or less (wgmma wants lhs and rhs swizzles equal, and p^T's
rows are 2 N bytes); N = 8 does not lower.

    python experiments/probe_transposed_suffix.py

`--time` (GPU) times one step of each form in a loop on blocks already in shared memory
(`STEPS`, `step_kernel`): the node step at the kernel's 128-byte swizzle and at the 32 bytes
the transposed steps impose on every tile, the untransposed suffix step, and the transposed
one cut after each piece (its product alone, + the softmax over the keys, + p v, + the merge
into the rows), and one sequence's step on the CUDA cores in warpgroup arrays (`cc_qk`: its
scores alone; `cc_step`: the whole online-softmax step, no wgmma). Run 14 found the
transposed fold slower than the untransposed on the H200; this says which piece costs what,
and what the per-sequence work costs off the tensor cores (run 17):

    python experiments/probe_transposed_suffix.py --time
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
from jax import export, lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

D, KEYS = 128, 64


def chain(n: int, swizzle: int, softmax_max: bool = True):
  """The kernel: q [N,D], k, v [KEYS,D] (bf16) -> o^T [D,N] f32, all shared memory tiled
  (8, swizzle / 2) and swizzled by `swizzle` bytes."""
  tiling = plgpu.TilingTransform((8, swizzle // 2))
  swz = plgpu.SwizzleTransform(swizzle)

  def body(q_ref, k_ref, v_ref, o_ref, q_smem, k_smem, v_smem, o_smem, pt_smem, bar):
    for src, dst in ((q_ref, q_smem), (k_ref, k_smem), (v_ref, v_smem)):
      plgpu.copy_gmem_to_smem(src, dst, bar.at[0])
    plgpu.barrier_wait(bar.at[0])

    def qk(acc_ref):
      plgpu.wgmma(acc_ref, k_smem, plgpu.transpose_ref(q_smem, (1, 0)))
      return acc_ref[...]

    st = pl.run_scoped(qk, plgpu.ACC((KEYS, n), jnp.float32))
    if softmax_max:
      st = st - lax.broadcast_in_dim(st.max(axis=0), st.shape, [1])
    pt_smem[...] = jnp.exp2(st).astype(jnp.bfloat16)
    plgpu.commit_smem()

    def pv(acc_ref):
      plgpu.wgmma(acc_ref, plgpu.transpose_ref(v_smem, (1, 0)), pt_smem)
      return acc_ref[...]

    o_smem[...] = pl.run_scoped(pv, plgpu.ACC((D, n), jnp.float32))
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_ref)
    plgpu.wait_smem_to_gmem(0)

  def entry(q_ref, k_ref, v_ref, o_ref):
    smem = lambda shape: plgpu.SMEM(shape, jnp.bfloat16, transforms=(tiling, swz))
    pl.run_scoped(lambda *s: body(q_ref, k_ref, v_ref, o_ref, *s),
                  smem((n, D)), smem((KEYS, D)), smem((KEYS, D)),
                  plgpu.SMEM((D, n), jnp.float32), smem((KEYS, n)),
                  plgpu.Barrier(num_arrivals=3, num_barriers=1))

  return plgpu.kernel(entry, out_type=jax.ShapeDtypeStruct((D, n), jnp.float32), grid=(1,),
                      grid_names=("x",))


def lowers(n: int, swizzle: int) -> str:
  """'lowers', or the last line of the error Pallas / Mosaic GPU raised."""
  sds = jax.ShapeDtypeStruct
  args = (sds((n, D), jnp.bfloat16), sds((KEYS, D), jnp.bfloat16), sds((KEYS, D), jnp.bfloat16))
  try:
    export.export(jax.jit(chain(n, swizzle)), platforms=["cuda"])(*args)
    return "lowers"
  except Exception as e:      # noqa: BLE001 (the probe reports whatever stops the lowering)
    lines = [x for x in str(e).splitlines() if x.strip()]
    return f"{type(e).__name__}: {lines[-1][:150] if lines else ''}"


# --- timing (GPU): what one step of each form costs, piece by piece ---------------------------

# Steps timed by `step_kernel`: a node step of 128 keys (the kernel's, 64 q rows) at the
# kernel's 128-byte swizzle and at 32; the untransposed suffix step (64 q rows, 64 keys); the
# transposed one cut after each of its pieces.
STEPS = ("node_swz128", "node_swz32", "suffix_rows", "t_qk", "t_softmax", "t_pv", "t_merge",
         "cc_qk", "cc_step")


def step_kernel(step: str, iters: int, ctas: int):
  """`ctas` CTAs of one warpgroup, each running `step` `iters` times on blocks already in
  shared memory (no loads in the loop, no masks that depend on the data): f(q [64,D],
  k, v [128,D]) -> [ctas, 64, D] f32, the last step's accumulator."""
  if step not in STEPS:
    raise ValueError(f"step {step!r}: one of {STEPS}")
  cols = 16
  swz = 128 if step in ("node_swz128", "suffix_rows") else 32
  keys = 128 if step.startswith("node") else 64
  tiling = plgpu.TilingTransform((8, swz // 2))
  transforms = (tiling, plgpu.SwizzleTransform(swz))
  scale = D ** -0.5

  def body(q_ref, k_ref, v_ref, o_ref, q_smem, k_smem, v_smem, pt_smem, ot_smem, o_smem, bar):
    plgpu.copy_gmem_to_smem(q_ref, q_smem, bar.at[0])
    plgpu.copy_gmem_to_smem(k_ref.at[pl.ds(0, keys)], k_smem, bar.at[0])
    plgpu.copy_gmem_to_smem(v_ref.at[pl.ds(0, keys)], v_smem, bar.at[0])
    plgpu.barrier_wait(bar.at[0])
    wg = plgpu.Layout.WGMMA
    row = wg.reduce(1)

    def rows_step(acc, m_i, l_i):
      def qk(acc_ref):
        plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem, (1, 0)))
        return acc_ref[...]
      s = pl.run_scoped(qk, plgpu.ACC((64, keys), jnp.float32))
      m_new = jnp.maximum(m_i, s.max(axis=1) * scale)
      alpha = jnp.exp2(m_i - m_new)
      p = jnp.exp2(s * scale - lax.broadcast_in_dim(m_new, s.shape, [0]))
      l_i = l_i * alpha + p.sum(axis=1)
      acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])

      def pv(acc_ref):
        plgpu.wgmma(acc_ref, p.astype(jnp.bfloat16), v_smem)
      return pl.run_state(pv)(plgpu.ACC.init(acc)), m_new, l_i

    def t_step(acc, m_i, l_i, j):
      base = lax.rem(j, jnp.int32(4)) * 16
      q_blk = q_smem.at[pl.ds(base, cols)]

      def qk(acc_ref):
        plgpu.wgmma(acc_ref, k_smem, plgpu.transpose_ref(q_blk, (1, 0)))
        return acc_ref[...]
      st = pl.run_scoped(qk, plgpu.ACC((64, cols), jnp.float32))
      if step == "t_qk":
        return acc + lax.broadcast_in_dim(st.max(axis=1), acc.shape, [0]), m_i, l_i
      r_of = plgpu.layout_cast(lax.broadcasted_iota(jnp.int32, (64, cols), 0), wg)
      x_of = plgpu.layout_cast(lax.broadcasted_iota(jnp.int32, (64, cols), 1), wg)
      sel = r_of == x_of + base
      st = jnp.where(r_of < lax.broadcast_in_dim(jnp.full((cols,), 60, jnp.int32) - x_of.max(axis=0),
                                                   st.shape, [1]), st, -jnp.inf)
      m_blk = st.max(axis=0) * scale
      pt = jnp.exp2(st * scale - lax.broadcast_in_dim(m_blk, st.shape, [1]))
      l_blk = pt.sum(axis=0)
      pt_smem[...] = pt.astype(jnp.bfloat16)
      plgpu.commit_smem()
      if step == "t_softmax":
        return acc, m_i, l_i + lax.broadcast_in_dim(l_blk, sel.shape, [1]).max(axis=1)

      def pv(acc_ref):
        plgpu.wgmma(acc_ref, plgpu.transpose_ref(v_smem, (1, 0)), pt_smem)
        return acc_ref[...]
      ot = pl.run_scoped(pv, plgpu.ACC((D, cols), jnp.float32))
      if step == "t_pv":
        return acc, m_i, l_i + lax.broadcast_in_dim(ot.max(axis=0), sel.shape, [1]).max(axis=1)
      m_col = jnp.where(sel, lax.broadcast_in_dim(m_i, sel.shape, [0]), -jnp.inf).max(axis=0)
      m_col_new = jnp.maximum(m_col, m_blk)
      w = jnp.exp2(m_blk - m_col_new)
      m_row = jnp.maximum(m_i, jnp.where(
          sel, lax.broadcast_in_dim(m_col_new, sel.shape, [1]), -jnp.inf).max(axis=1))
      alpha = jnp.exp2(m_i - m_row)
      l_i = l_i * alpha + jnp.where(sel, lax.broadcast_in_dim(l_blk * w, sel.shape, [1]),
                                    0.0).sum(axis=1)
      acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
      ot_smem[...] = (ot * lax.broadcast_in_dim(w, ot.shape, [1])).astype(jnp.bfloat16)
      plgpu.commit_smem()
      e = sel.astype(jnp.bfloat16)

      def merge(acc_ref):
        plgpu.wgmma(acc_ref, e, plgpu.transpose_ref(ot_smem, (1, 0)))
      return pl.run_state(merge)(plgpu.ACC.init(acc)), m_row, l_i

    def cc_step(j, carry):
      """One sequence's G = 4 rows against 64 keys on the CUDA cores, in Mosaic GPU's
      warpgroup arrays (no wgmma): the keys and values in the WGMMA layout as float32, each
      row's scores a product with its q row broadcast and summed over D (within a quad of
      lanes), its maximum over the keys (across the 4 warps), p v as the values times p
      summed over the keys (across the warps). The block alternates between the two halves
      of the 128 keys loaded, so that no load is loop-invariant."""
      o, m, l = carry
      half = lax.rem(j, jnp.int32(2)) * 64
      kf = plgpu.layout_cast(k_smem.at[pl.ds(half, 64)][...], wg).astype(jnp.float32)
      s = [(kf * lax.broadcast_in_dim(c, kf.shape, [1])).sum(axis=1) * scale for c in q_cols]
      if step == "cc_qk":
        return [x + y for x, y in zip(o, [kf.sum(axis=0)] * 4)], m, [x + y.max(axis=0)
                                                                      for x, y in zip(l, s)]
      vf = plgpu.layout_cast(v_smem.at[pl.ds(half, 64)][...], wg).astype(jnp.float32)
      o_new, m_new, l_new = [], [], []
      for g in range(4):
        mg = jnp.maximum(m[g], s[g].max(axis=0))
        alpha = jnp.exp2(m[g] - mg)
        pg = jnp.exp2(s[g] - mg)
        l_new.append(l[g] * alpha + pg.sum(axis=0))
        o_new.append(o[g] * alpha + (vf * lax.broadcast_in_dim(pg, vf.shape, [0])).sum(axis=0))
        m_new.append(mg)
      return o_new, m_new, l_new

    def loop(j, carry):
      acc, m_i, l_i = carry
      if step.startswith("node") or step == "suffix_rows":
        return rows_step(acc, m_i, l_i)
      return t_step(acc, m_i, l_i, j)

    carry = (plgpu.layout_cast(jnp.zeros((64, D), jnp.float32), wg),
             plgpu.layout_cast(jnp.zeros((64,), jnp.float32), row),
             plgpu.layout_cast(jnp.zeros((64,), jnp.float32), row))
    if step.startswith("cc"):
      qt = plgpu.layout_cast(q_smem[...], wg).astype(jnp.float32)
      r_of = plgpu.layout_cast(lax.broadcasted_iota(jnp.int32, (64, D), 0), wg)
      q_cols = [jnp.where(r_of == g, qt, 0.0).sum(axis=0) for g in range(4)]
      zero = jnp.float32(0.0)
      o, _, l = lax.fori_loop(0, iters, cc_step, (
          [plgpu.layout_cast(jnp.zeros((D,), jnp.float32), wg.reduce(0))] * 4,
          [jnp.float32(-jnp.inf)] * 4, [zero] * 4))
      acc = lax.broadcast_in_dim(o[0] + o[1] + o[2] + o[3], (64, D), [1])
      l_i = carry[2] + (l[0] + l[1] + l[2] + l[3])
    else:
      acc, _, l_i = lax.fori_loop(0, iters, loop, carry)
    o_smem[...] = acc + lax.broadcast_in_dim(l_i, acc.shape, [0])
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_ref.at[lax.axis_index("x")])
    plgpu.wait_smem_to_gmem(0)

  def entry(q_ref, k_ref, v_ref, o_ref):
    smem = lambda shape: plgpu.SMEM(shape, jnp.bfloat16, transforms=transforms)
    small = plgpu.TilingTransform((8, 16)), plgpu.SwizzleTransform(32)
    pl.run_scoped(lambda *s: body(q_ref, k_ref, v_ref, o_ref, *s),
                  smem((64, D)), smem((keys, D)), smem((keys, D)),
                  plgpu.SMEM((64, cols), jnp.bfloat16, transforms=small),
                  plgpu.SMEM((D, cols), jnp.bfloat16, transforms=small),
                  plgpu.SMEM((64, D), jnp.float32),
                  plgpu.Barrier(num_arrivals=3, num_barriers=1))

  return plgpu.kernel(entry, out_type=jax.ShapeDtypeStruct((ctas, 64, D), jnp.float32),
                      grid=(ctas,), grid_names=("x",))


def time_steps(iters: int = 2000, ctas: int = 132, repeats: int = 5) -> None:
  """Prints each step's time (ns a step in one CTA, all SMs busy), median of `repeats`."""
  import time
  import numpy as np
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((64, D)), jnp.bfloat16)
  k = jnp.asarray(rng.standard_normal((128, D)), jnp.bfloat16)
  v = jnp.asarray(rng.standard_normal((128, D)), jnp.bfloat16)
  print(f"| step | ns a step ({ctas} CTAs of one warpgroup, {iters} steps each) |\n|---|---|")
  for step in STEPS:
    try:
      fn = jax.jit(step_kernel(step, iters, ctas))
      fn(q, k, v).block_until_ready()
      times = []
      for _ in range(repeats):
        t0 = time.perf_counter()
        fn(q, k, v).block_until_ready()
        times.append(time.perf_counter() - t0)
      print(f"| {step} | {np.median(times) / iters * 1e9:.0f} |", flush=True)
    except Exception as e:      # noqa: BLE001 (the probe reports what fails and goes on)
      lines = [x for x in str(e).splitlines() if x.strip()]
      print(f"| {step} | {type(e).__name__}: {lines[-1][:150] if lines else ''} |", flush=True)


def main() -> None:
  if "--time" in sys.argv:
    time_steps()
    return
  print("| N | swizzle | result |\n|---|---|---|")
  for n in (8, 16, 32, 64):
    for swizzle in (32, 64, 128):
      print(f"| {n} | {swizzle} | {lowers(n, swizzle)} |", flush=True)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  main()
