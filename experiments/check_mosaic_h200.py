"""GPU check: the Mosaic GPU kernel (pallas backend, lowering="mosaic") never lets keys or
values past a node's length reach the output, and stays exact and fast.

Each case plants NaN in the keys and values past every node's length (and past every
suffix's), runs `hydragen_attention` with the pallas backend forced onto the Mosaic GPU kernel
for shared levels (bf16 and fp16, D 64 and 128, lengths that end inside a key block, below one
block, on a block boundary, and a node with no keys; stacked caches read at a traced layer with
traced owners), and compares with the XLA backend on the same inputs with the poison replaced
by zeros (float32 accumulation): max |out - ref| / max |ref| and the lse, NaN fails. Speed is
measured by experiments/bench_attention.py (--decode), not here.

  python3 experiments/check_mosaic_h200.py              # on an H200; exit 1 on any failure
"""

from __future__ import annotations

import sys
import os

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hydrax.attention import KVLevel, hydragen_attention
from hydrax.attention.kernels import pallas_gpu

MOSAIC = pallas_gpu.configure(lowering="mosaic")
TOL = {jnp.bfloat16: 2e-2, jnp.float16: 5e-3}


def _level(rng, n, s, kh, d, lengths, owner, dtype, poison=np.nan):
  k = rng.standard_normal((n, s, kh, d)).astype(np.float32)
  v = rng.standard_normal((n, s, kh, d)).astype(np.float32)
  clean_k, clean_v = k.copy(), v.copy()
  for i, length in enumerate(lengths):
    k[i, length:], v[i, length:] = poison, poison
    clean_k[i, length:], clean_v[i, length:] = 0, 0
  lengths = jnp.asarray(lengths, jnp.int32)
  return (KVLevel(jnp.asarray(k, dtype), jnp.asarray(v, dtype), lengths, owner),
          KVLevel(jnp.asarray(clean_k, dtype), jnp.asarray(clean_v, dtype), lengths, owner))


def case(name, rng, *, b, kh, g, d, shared, suffix, dtype, stacked=False):
  """shared: list of (capacity, lengths, owner); suffix: (capacity, lengths [b])."""
  poisoned, clean = [], []
  for s, lengths, owner in shared:
    p, c = _level(rng, len(lengths), s, kh, d, lengths, np.asarray(owner, np.int32), dtype)
    poisoned.append(p)
    clean.append(c)
  p, c = _level(rng, b, suffix[0], kh, d, suffix[1], None, dtype)
  poisoned.append(p)
  clean.append(c)
  q = jnp.asarray(2 * rng.standard_normal((b, 1, kh * g, d)), dtype)
  ref, ref_lse = hydragen_attention(q.astype(jnp.float32),
                                    [lv._replace(k=lv.k.astype(jnp.float32),
                                                 v=lv.v.astype(jnp.float32)) for lv in clean],
                                    backend="xla")
  if stacked:
    # layer 1 of a 3-layer stack, the other layers NaN: read in place at a traced layer
    def stack(x):
      nan = jnp.full_like(x, jnp.nan)
      return jnp.stack([nan, x, nan])
    levels = [lv._replace(k=stack(lv.k), v=stack(lv.v)) for lv in poisoned[:-1]]
    fn = jax.jit(lambda q, owners, layer, own: hydragen_attention(
        q, [lv._replace(owner=o, layer=layer) for lv, o in zip(levels, owners)] + [own],
        backend=MOSAIC))
    out, lse = fn(q, [jnp.asarray(lv.owner) for lv in levels], jnp.int32(1), poisoned[-1])
  else:
    out, lse = jax.jit(lambda q: hydragen_attention(q, poisoned, backend=MOSAIC))(q)
  out, lse = np.asarray(out, np.float32), np.asarray(lse)
  ref, ref_lse = np.asarray(ref), np.asarray(ref_lse)
  err = float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-6))
  finite = np.isfinite(ref_lse)
  lse_err = float(np.abs(lse[finite] - ref_lse[finite]).max()) if finite.any() else 0.0
  ok = (np.isfinite(out).all() and err < TOL[dtype] and lse_err < 5e-2 and
        bool(np.all(np.isneginf(lse[~finite]))))
  print(f"{'ok  ' if ok else 'FAIL'} {name}: rel err {err:.2e}, lse err {lse_err:.2e}, "
        f"NaN in out: {int(np.isnan(out).sum())}", flush=True)
  return ok


def main():
  rng = np.random.default_rng(0)
  ok = True
  for dtype in (jnp.bfloat16, jnp.float16):
    dn = jnp.dtype(dtype).name
    ok &= case(f"{dn} D128 one node, length inside a block", rng, b=130, kh=2, g=4, d=128,
               shared=[(1024, [1000], [0] * 130)], suffix=(16, [3] * 130), dtype=dtype)
    ok &= case(f"{dn} D64 three nodes: below a block, on a boundary, empty", rng, b=300, kh=1,
               g=8, d=64, shared=[(512, [40, 256, 0], [0] * 100 + [1] * 100 + [2] * 100)],
               suffix=(16, list(rng.integers(0, 17, 300))), dtype=dtype)
    ok &= case(f"{dn} D128 two levels, ragged, stacked at a traced layer", rng, b=257, kh=8,
               g=1, d=128,
               shared=[(2048, [2047], [0] * 257),
                       (384, [300, 129, 383], list(rng.integers(0, 3, 257)))],
               suffix=(32, list(rng.integers(0, 33, 257))), dtype=dtype, stacked=True)
  print("mosaic past-length check:", "PASS" if ok else "FAIL")
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  main()
