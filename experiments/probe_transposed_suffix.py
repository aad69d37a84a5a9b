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


def main() -> None:
  print("| N | swizzle | result |\n|---|---|---|")
  for n in (8, 16, 32, 64):
    for swizzle in (32, 64, 128):
      print(f"| {n} | {swizzle} | {lowers(n, swizzle)} |", flush=True)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  main()
