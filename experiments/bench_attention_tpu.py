"""TPU benchmark and exactness check of the pallas_tpu backend (Mosaic TPU kernel).

Axis letters: B sequences, T queries per sequence (1: one decode step), H query heads, K KV
heads, D head dim, P shared-prefix length, U per-sequence suffix length.

Sections (flags; run in this order):
  --roofline  no device needed: for TPU v5e and v6e (public peak bf16 FLOP/s and HBM bandwidth)
              the floor of each decode shape and the block sizes the kernel plans there.
  --check     on the TPU: pallas_tpu against the XLA backend run on float32 copies (ragged
              lengths, odd batches, empty nodes, traced owners, a stacked cache with a traced
              layer, GQA 1..8, D 64/80/128, bf16/fp32, T = 1 and T = 5 causal).
  --ceilings  bf16 matmul 8192^3 and a 2 GiB copy through jnp (this chip's measured ceilings).
  --decode    decode step, H=32, K=8, D=128, U=128, P in {1K,4K,16K}, B in {16,64,256,1024}:
              median time of pallas_tpu, the XLA backend, and XLA attention over caches holding
              a copy of the prefix in every sequence ("replicated"; the copy is made before timing).
  --sweep     block_m x block_k of the kernel on two decode shapes (VMEM limit raised to
              100 MiB; the shapes that do not compile are recorded as errors).
Floors: FLOPs = 4*B*T*H*(P+U)*D; bytes = prefix KV once + suffix KV + q + out (bf16) + lse;
floor = max(FLOPs / peak, bytes / bandwidth), with the public figures and with --ceilings'.

Usage (on a TPU VM, from the repository root):
  python experiments/bench_attention_tpu.py --check --ceilings --decode --sweep --out DIR
Writes DIR/results.csv, DIR/check.csv, DIR/ceilings.json, DIR/roofline.csv; prints a table last.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from hydrax.attention import KVLevel, backends, hydragen_attention  # noqa: E402
from hydrax.attention.kernels import pallas_tpu as pt  # noqa: E402

T0 = time.time()
# Public figures (cloud.google.com/tpu/docs/v5e, /v6e): peak bf16 FLOP/s, HBM bytes/s.
CHIPS = {"v5e": (197e12, 819e9), "v6e": (918e12, 1640e9)}
DECODE = [(p, b) for p in (1024, 4096, 16384) for b in (16, 64, 256, 1024)]
H, KH, D, U = 32, 8, 128, 128


def log(*a):
  print(f"[{time.time() - T0:7.1f}s]", *a, flush=True)


def bench(fn, args, outer=7, min_batch_s=5e-3):
  """Median seconds per call (batches of back-to-back calls, one sync per batch)."""
  jax.block_until_ready(fn(*args))
  t = time.perf_counter()
  jax.block_until_ready(fn(*args))
  inner = int(min(64, max(1, math.ceil(min_batch_s / max(time.perf_counter() - t, 1e-6)))))
  times = []
  for _ in range(outer):
    t = time.perf_counter()
    res = None
    for _ in range(inner):
      res = fn(*args)
    jax.block_until_ready(res)
    times.append((time.perf_counter() - t) / inner)
  return float(np.median(times))


def floor_terms(b, p, u=U, t=1):
  flops = 4.0 * b * t * H * (p + u) * D
  nbytes = 2.0 * (2 * p * KH * D + 2 * b * u * KH * D + 2 * b * t * H * D) + 4.0 * b * t * H
  return flops, nbytes


STEP_US = 0.35   # the Pallas TPU docs' estimate of the fixed cost of one grid step


def kernel_model(b, p, sh, sf):
  """Bytes, MXU FLOPs and grid steps of the two kernel launches of a decode step as planned,
  padded rows included (shared level: each tile reads the whole prefix; the float32 out and
  lse of every slot are written, then read back by the merge; lse rows lane-padded to 128)."""
  kv = KH * D * 2 * 2                                    # k and v bytes per key (bf16)
  nbytes = (sh.num_tiles * p + b * U) * kv               # key/value reads
  nbytes += 2 * (2 * b * H * D * 2)                      # q read by both launches (bf16)
  for lv in (sh, sf):
    slots = lv.num_tiles * lv.block_m
    nbytes += 2 * (KH * slots * D * 4 + KH * lv.num_tiles * -(-lv.block_m // 128) * 128 * 4)
  flops = 4.0 * KH * D * (sh.num_tiles * sh.block_m * p + b * sf.block_m * U)
  steps = sh.num_tiles * sh.num_blocks + sf.num_tiles * sf.num_blocks
  return nbytes, flops, steps


def roofline(out_dir):
  cfg = pt.TpuConfig()
  rows = []
  for p, b in DECODE:
    flops, nbytes = floor_terms(b, p)
    sh = pt.plan((b, 1, H, D), (1, p, KH, D), jnp.bfloat16, 1, False, cfg)
    sf = pt.plan((b, 1, H, D), (b, U, KH, D), jnp.bfloat16, b, True, cfg)
    kbytes, kflops, steps = kernel_model(b, p, sh, sf)
    row = dict(P=p, B=b, gflop=flops / 1e9, mbytes=nbytes / 1e6, kernel_mbytes=kbytes / 1e6,
               kernel_gflop=kflops / 1e9, steps=steps,
               shared_blocks=f"M={sh.block_m} Sb={sh.block_k} tiles={sh.num_tiles}",
               suffix_blocks=f"M={sf.block_m} Sb={sf.block_k} tiles={sf.num_tiles}",
               vmem_mib=max(sh.vmem_bytes, sf.vmem_bytes) / 2**20)
    for chip, (peak, bw) in CHIPS.items():
      tf, tb = flops / peak, nbytes / bw
      row[f"{chip}_floor_us"] = max(tf, tb) * 1e6
      row[f"{chip}_bound"] = "flop" if tf >= tb else "byte"
      row[f"{chip}_model_us"] = (max(kflops / peak, kbytes / bw) + steps * STEP_US * 1e-6) * 1e6
    rows.append(row)
  write_csv(os.path.join(out_dir, "roofline.csv"), rows)
  print("| prefix / batch | GFLOP | MB | v5e floor us | v6e floor us | shared level | "
        "suffix level | VMEM MiB | kernel MB | kernel GFLOP | steps | v5e model us | "
        "v6e model us |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['P'] // 1024}K / {r['B']} | {r['gflop']:.1f} | {r['mbytes']:.0f} | "
          f"{r['v5e_floor_us']:.0f} ({r['v5e_bound']}) | {r['v6e_floor_us']:.0f} "
          f"({r['v6e_bound']}) | {r['shared_blocks']} | {r['suffix_blocks']} | "
          f"{r['vmem_mib']:.1f} | {r['kernel_mbytes']:.0f} | {r['kernel_gflop']:.1f} | "
          f"{r['steps']} | {r['v5e_model_us']:.0f} | {r['v6e_model_us']:.0f} |")
  return rows


def make_case(key, b, p, u=U, dtype=jnp.bfloat16):
  ks = jax.random.split(key, 5)
  q = jax.random.normal(ks[0], (b, 1, H, D), dtype)
  kp, vp = (jax.random.normal(k, (1, p, KH, D), dtype) for k in ks[1:3])
  ksf, vsf = (jax.random.normal(k, (b, u, KH, D), dtype) for k in ks[3:5])
  return q, kp, vp, ksf, vsf


def decode_fns(b, p, backend):
  owner = np.zeros((b,), np.int32)
  lp, ls = jnp.full((1,), p, jnp.int32), jnp.full((b,), U, jnp.int32)

  def run(q, kp, vp, ks, vs, backend):
    return hydragen_attention(q, [KVLevel(kp, vp, lp, owner), KVLevel(ks, vs, ls, None)],
                              backend=backend)[0]

  def replicated(q, k, v):
    return hydragen_attention(q, [KVLevel(k, v, jnp.full((b,), p + U, jnp.int32), None)],
                              backend="xla")[0]

  return {"pallas_tpu": jax.jit(lambda *a: run(*a, backend)),
          "xla": jax.jit(lambda *a: run(*a, "xla")),
          "replicated": jax.jit(replicated)}


def decode(rows, ceil, backend, shapes=DECODE, impls=("pallas_tpu", "xla", "replicated")):
  for p, b in shapes:
    case = make_case(jax.random.key(p + b), b, p)
    fns = decode_fns(b, p, backend)
    flops, nbytes = floor_terms(b, p)
    for impl in impls:
      fn = fns[impl]
      try:
        if impl == "replicated":
          q, kp, vp, ks, vs = case
          k = jnp.concatenate([jnp.broadcast_to(kp, (b,) + kp.shape[1:]), ks], axis=1)
          v = jnp.concatenate([jnp.broadcast_to(vp, (b,) + vp.shape[1:]), vs], axis=1)
          t = bench(fn, (q, k, v))
          del k, v
        else:
          t = bench(fn, case)
        row = dict(shape=f"decode_P{p // 1024}K_B{b}", impl=impl, P=p, B=b, us=t * 1e6,
                   gflops=flops / 1e9, mbytes=nbytes / 1e6)
        if ceil:
          fl = max(flops / (ceil["tflops"] * 1e12), nbytes / (ceil["tbps"] * 1e12)) * 1e6
          row.update(floor_us=fl, pct_floor=100 * fl / (t * 1e6))
        rows.append(row)
        log(f"{row['shape']:>18} {impl:>11} {t * 1e6:10.1f} us")
      except Exception as e:  # an OOM or a compile failure is a result, not the end
        rows.append(dict(shape=f"decode_P{p // 1024}K_B{b}", impl=impl, P=p, B=b,
                         error=repr(e).splitlines()[0][:300]))
        log(f"decode P={p} B={b} {impl} FAILED", repr(e)[:300])


def ceilings():
  n = 8192
  x = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  y = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
  res = {"tflops": 2 * n ** 3 / bench(jax.jit(lambda a, b: a @ b), (x, y)) / 1e12}
  src = jax.random.normal(jax.random.key(2), (1 << 30,), jnp.bfloat16)
  res["tbps"] = 2 * src.size * 2 / bench(jax.jit(lambda a: a + jnp.bfloat16(1)), (src,)) / 1e12
  res["device"] = str(jax.devices()[0].device_kind)
  res["jax"] = jax.__version__
  return res


CHECKS = [  # name, B, T, K, G, D, dtype, shared levels [(N, S)], suffix U, traced owners
    ("decode_gqa4_odd", 7, 1, 8, 4, 128, jnp.bfloat16, [(1, 1000)], 130, False),
    ("decode_mqa_g8", 33, 1, 1, 8, 128, jnp.bfloat16, [(1, 2048)], 100, False),
    ("ragged_nodes_traced", 9, 1, 2, 4, 128, jnp.bfloat16, [(4, 700), (3, 129)], 64, True),
    ("f32_d80_g1", 5, 1, 4, 1, 80, jnp.float32, [(2, 300)], 17, False),
    ("prefill_T5_d64", 3, 5, 2, 3, 64, jnp.bfloat16, [(2, 513)], 40, True),
    ("stacked_layer", 6, 1, 8, 4, 128, jnp.bfloat16, [(2, 640)], 128, True),
]


def check(rows, backend):
  for name, b, t, kh, g, d, dtype, shared, u, traced in CHECKS:
    rng = np.random.default_rng(len(rows))
    stacked = name == "stacked_layer"
    try:
      levels = []
      for n, s in shared + [(None, u)]:
        nodes = b if n is None else n
        lengths = rng.integers(0, s + 1, size=nodes).astype(np.int32)
        lengths[0] = s
        shape = ((3,) if stacked else ()) + (nodes, s, kh, d)
        k, v = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
        owner = None if n is None else rng.integers(0, n, size=b).astype(np.int32)
        levels.append((k, v, lengths, owner))
      q = rng.standard_normal((b, t, kh * g, d)).astype(np.float32)

      def fn(q, arrays, layer, backend, dt):
        lv = [KVLevel(jnp.asarray(k, dt), jnp.asarray(v, dt), n,
                      o_dyn if (traced and o is not None) else o,
                      layer if stacked else None)
              for (k, v, n, o_dyn), (_, _, _, o) in zip(arrays, levels)]
        return hydragen_attention(q.astype(dt), lv, backend=backend)

      arrays = [(k, v, n, None if o is None else jnp.asarray(o)) for k, v, n, o in levels]
      layer = jnp.int32(1)
      out, lse = jax.jit(lambda q, a, l: fn(q, a, l, backend, dtype))(q, arrays, layer)
      rnd = [(np.asarray(jnp.asarray(k, dtype).astype(jnp.float32)),
              np.asarray(jnp.asarray(v, dtype).astype(jnp.float32)), n, o)
             for k, v, n, o in arrays]
      ref_out, ref_lse = jax.jit(lambda q, a, l: fn(q, a, l, "xla", jnp.float32))(
          jnp.asarray(q, dtype).astype(jnp.float32), rnd, layer)
      err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref_out)))
      fin = jnp.isfinite(ref_lse)
      lerr = float(jnp.max(jnp.where(fin, jnp.abs(lse - ref_lse), 0.0)))
      ok = (err < (3e-2 if dtype == jnp.bfloat16 else 1e-4) and lerr < 1e-2
            and bool(jnp.all(fin == jnp.isfinite(lse))) and not bool(jnp.isnan(out).any()))
      rows.append(dict(case=name, ok=ok, max_abs_out=err, max_abs_lse=lerr))
      log(f"check {name:>22}: {'ok' if ok else 'MISMATCH'} out {err:.2e} lse {lerr:.2e}")
    except Exception as e:
      rows.append(dict(case=name, ok=False, error=repr(e).splitlines()[0][:300]))
      log(f"check {name} FAILED", traceback.format_exc()[-1500:])


def sweep(rows, ceil):
  for p, b in [(16384, 256), (4096, 1024)]:
    for bm in (64, 128, 256, 512):
      for bk in (256, 512, 1024, 2048):
        cfg = backends.get("pallas_tpu", block_m=bm, block_k=bk, vmem_limit=100 << 20)
        n0 = len(rows)
        decode(rows, ceil, cfg, shapes=[(p, b)], impls=("pallas_tpu",))
        for r in rows[n0:]:
          r.update(block_m=bm, block_k=bk)


def write_csv(path, rows):
  if not rows:
    return
  keys = sorted({k for r in rows for k in r})
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  for flag in ("roofline", "check", "ceilings", "decode", "sweep"):
    ap.add_argument(f"--{flag}", action="store_true")
  ap.add_argument("--out", default=os.environ.get("OUT", "results/bench_attention_tpu"))
  args = ap.parse_args()
  os.makedirs(args.out, exist_ok=True)
  if args.roofline:
    roofline(args.out)
  if not any((args.check, args.ceilings, args.decode, args.sweep)):
    return
  if jax.default_backend() != "tpu":
    sys.exit(f"--check/--ceilings/--decode/--sweep need a TPU (default backend: "
             f"{jax.default_backend()!r}); only --roofline runs here")
  backend = backends.get("pallas_tpu")
  ceil, checks, results = {}, [], []
  if args.check:
    check(checks, backend)
    write_csv(os.path.join(args.out, "check.csv"), checks)
  if args.ceilings:
    ceil = ceilings()
    with open(os.path.join(args.out, "ceilings.json"), "w") as f:
      json.dump(ceil, f, indent=1)
    log("ceilings", ceil)
  if args.decode:
    decode(results, ceil, backend)
  if args.sweep:
    sweep(results, ceil)
  write_csv(os.path.join(args.out, "results.csv"), results)
  if checks:
    print(f"check: {sum(r['ok'] for r in checks)}/{len(checks)} cases match XLA")
  print(f"device {jax.devices()[0].device_kind}, ceilings {ceil}")
  print("| shape | impl | us | % of floor |")
  print("|---|---|---|---|")
  for r in results:
    if "us" in r and "block_m" not in r:
      pct = r.get("pct_floor", float("nan"))
      print(f"| {r['shape']} | {r['impl']} | {r['us']:.1f} | {pct:.0f}% |")


if __name__ == "__main__":
  main()
