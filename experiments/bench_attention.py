"""Kernel benchmark and GPU exactness check of hydrax's attention backends.

Axis letters: B sequences, T queries per sequence (1 here: one decode step), H query heads,
K KV heads, D head dim, P shared-prefix length, U per-sequence suffix length.

Sections (flags; several may be given, they run in this order):
  --check     exactness of every kernel variant on the GPU against the XLA backend run on
              float32 copies of fresh random inputs (ragged lengths, odd batches, empty nodes,
              GQA 1..8, D 64/80/128, bf16/fp16/fp32, T = 1 and T > 1 causal, traced owners,
              forced key splits, fused levels); outputs poisoned with NaN before the kernel.
  --ceilings  bf16 matmul 8192^3 and a large device copy, through jnp and through torch.
  --sweep     block sizes / warps / stages of the kernel on a few shapes, each level alone.
  --mgpu      jax's bundled Mosaic GPU flash attention (FA3 style, Hopper only) on the same
              stacked shared-prefix product, for the choice of lowering.
  --kernel    hydrax's Mosaic GPU kernel alone (no XLA work around it), key blocks x splits.
  --decode    decode step, H=32, K=8, D=128, U=128, P in {1K,4K,16K}, B in {16,64,256,1024}.
  --micro     the paper's micro-benchmark: H=8, K=1, D=128, (B,P) in {(512,1K),(1024,2K),
              (2048,4K),(4096,8K)}, U in 0..512 step 64.
Every timed shape reports the median time of: hydrax pallas backend (levels run separately and
merged; lowering "auto": Mosaic GPU for the shared level on Hopper), the same with every level
on the Triton kernel (pallas_triton), optionally all levels in one Triton launch
(`hydragen_attention_fused`, impl pallas_fused), hydrax's XLA backend, and cuDNN attention over caches holding a copy of the prefix in every sequence
(`jax.nn.dot_product_attention(implementation="cudnn")`; the copy is made before timing).
Floors: FLOPs = 4*B*T*H*(P+U)*D; bytes = prefix KV once + suffix KV + q + out (bf16) + lse;
floor = max(FLOPs / matmul ceiling, bytes / copy ceiling), with the ceilings of this run.

With --sweep, the decode/micro tables run with the sweep's best configuration (logged).

Usage: python experiments/bench_attention.py --check --ceilings --decode --micro --out DIR
Writes DIR/results.csv (one row per timed shape and implementation), DIR/check.csv,
DIR/sweep.csv, DIR/ceilings.json; prints a table last.
  python experiments/bench_attention.py --plot DIR/results.csv   (no GPU: PNG + markdown table)
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import os
import subprocess
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from hydrax.attention import KVLevel, hydragen_attention  # noqa: E402
from hydrax.attention import xla as xla_backend  # noqa: E402
from hydrax.attention.kernels import pallas_gpu as pg  # noqa: E402

T0 = time.time()
ARGS = None


def log(*a):
  print(f"[{time.time() - T0:7.1f}s]", *a, flush=True)


def left() -> float:
  return ARGS.budget - (time.time() - T0)


# --- timing ----------------------------------------------------------------------------------

def bench(fn, arg_sets, min_batch_s=5e-3, outer=7):
  """Median seconds per call of fn over rotating argument sets (after warm-up).

  Calls are issued back to back in batches (one block_until_ready per batch) so that host
  dispatch overlaps device work; the median over `outer` batches of batch time / batch size.
  """
  out = fn(*arg_sets[0])
  jax.block_until_ready(out)
  for a in arg_sets:
    jax.block_until_ready(fn(*a))
  t = time.perf_counter()
  jax.block_until_ready(fn(*arg_sets[0]))
  one = time.perf_counter() - t
  inner = int(min(64, max(1, math.ceil(min_batch_s / max(one, 1e-6)))))
  times = []
  for _ in range(outer):
    t = time.perf_counter()
    res = None
    for i in range(inner):
      res = fn(*arg_sets[i % len(arg_sets)])
    jax.block_until_ready(res)
    times.append((time.perf_counter() - t) / inner)
  return float(np.median(times)), float(np.min(times)), inner


def rotations(nbytes: int, l2_bytes: int = 60 << 20) -> int:
  """Input copies to rotate so that one pass over them exceeds twice the L2."""
  return int(min(4, max(1, math.ceil(2 * l2_bytes / max(nbytes, 1)))))


# --- ceilings --------------------------------------------------------------------------------

TORCH_CEILINGS = r"""
import json, torch
def med(f, n=10):
  for _ in range(3): f()
  torch.cuda.synchronize()
  ts = []
  for _ in range(n):
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record(); f(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b) / 1e3)
  ts.sort(); return ts[len(ts) // 2]
n = 8192
x = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
y = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
t_mm = med(lambda: x @ y)
src = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16)   # 2 GiB
dst = torch.empty_like(src)
t_cp = med(lambda: dst.copy_(src))
print(json.dumps({"torch_tflops": 2 * n**3 / t_mm / 1e12,
                  "torch_tbps": 2 * src.numel() * 2 / t_cp / 1e12,
                  "torch_name": torch.cuda.get_device_name()}))
"""


def ceilings():
  res = {}
  try:
    out = subprocess.run([sys.executable, "-c", TORCH_CEILINGS], capture_output=True,
                         text=True, timeout=120)
    res.update(json.loads(out.stdout.strip().splitlines()[-1]))
  except Exception as e:  # torch missing or failed: the jnp ceilings remain
    log("torch ceilings failed:", repr(e)[:300])
  n = 8192
    # jnp matmul
  kx, ky = jax.random.split(jax.random.key(0))
  xs = [jax.random.normal(jax.random.fold_in(kx, i), (n, n), jnp.bfloat16) for i in range(2)]
  ys = [jax.random.normal(jax.random.fold_in(ky, i), (n, n), jnp.bfloat16) for i in range(2)]
  mm = jax.jit(lambda a, b: a @ b)
  t, _, _ = bench(mm, list(zip(xs, ys)))
  res["jnp_tflops"] = 2 * n ** 3 / t / 1e12
  del xs, ys
  src = jax.random.normal(jax.random.key(1), (1 << 30,), jnp.bfloat16)
  cp = jax.jit(lambda a: a + jnp.bfloat16(1))
  t, _, _ = bench(cp, [(src,)])
  res["jnp_tbps"] = 2 * src.size * 2 / t / 1e12
  del src
  tiny = jnp.ones((8,), jnp.float32)
  t, _, _ = bench(jax.jit(lambda a: a + 1), [(tiny,)])
  res["dispatch_floor_us"] = t * 1e6     # back-to-back calls of a trivial jitted function
  res["device"] = str(jax.devices()[0].device_kind)
  res["jax"] = jax.__version__
  return res


# --- cases -----------------------------------------------------------------------------------

def make_case(key, b, p, u, h, kh, d, dtype=jnp.bfloat16):
  """q [B,1,H,D], prefix k/v [1,P,K,D], suffix k/v [B,U,K,D] (all keys valid)."""
  ks = jax.random.split(key, 5)
  q = jax.random.normal(ks[0], (b, 1, h, d), dtype)
  kp = jax.random.normal(ks[1], (1, p, kh, d), dtype)
  vp = jax.random.normal(ks[2], (1, p, kh, d), dtype)
  ksf = jax.random.normal(ks[3], (b, u, kh, d), dtype)
  vsf = jax.random.normal(ks[4], (b, u, kh, d), dtype)
  return q, kp, vp, ksf, vsf


def hydragen_fns(b, p, u):
  owner = np.zeros((b,), np.int32)
  lp = jnp.full((1,), p, jnp.int32)
  ls = jnp.full((b,), u, jnp.int32)

  def levels(kp, vp, ks, vs):
    lv = [KVLevel(kp, vp, lp, owner)]
    if u:
      lv.append(KVLevel(ks, vs, ls, None))
    return lv

  return {
      "pallas": jax.jit(lambda q, kp, vp, ks, vs: hydragen_attention(
          q, levels(kp, vp, ks, vs), backend="pallas")[0]),
      "pallas_triton": jax.jit(lambda q, kp, vp, ks, vs: _with_config(
          {"lowering": "triton"}, hydragen_attention, q, levels(kp, vp, ks, vs),
          backend="pallas")[0]),
      "pallas_fused": jax.jit(lambda q, kp, vp, ks, vs: pg.hydragen_attention_fused(
          q, levels(kp, vp, ks, vs))[0]),
      "xla": jax.jit(lambda q, kp, vp, ks, vs: hydragen_attention(
          q, levels(kp, vp, ks, vs), backend="xla")[0]),
  }


def _with_config(cfg, fn, *args, **kwargs):
  """Calls fn with the kernel configuration changed (at trace time, inside jit)."""
  with pg.configure(**cfg):
    return fn(*args, **kwargs)


def replicated(kp, vp, ks, vs):
  b = ks.shape[0]
  k = jnp.concatenate([jnp.broadcast_to(kp, (b,) + kp.shape[1:]), ks], axis=1)
  v = jnp.concatenate([jnp.broadcast_to(vp, (b,) + vp.shape[1:]), vs], axis=1)
  return k, v


CUDNN = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"))


def floors(b, p, u, h, kh, d, ceil, t=1):
  flops = 4.0 * b * t * h * (p + u) * d
  nbytes = 2.0 * (2 * p * kh * d + 2 * b * u * kh * d + 2 * b * t * h * d) + 4.0 * b * t * h
  out = {"flops": flops, "bytes": nbytes}
  for src in ("torch", "jnp"):
    if f"{src}_tflops" in ceil:
      tf, tb = flops / (ceil[f"{src}_tflops"] * 1e12), nbytes / (ceil[f"{src}_tbps"] * 1e12)
      out[f"floor_{src}_us"] = max(tf, tb) * 1e6
      out[f"bound_{src}"] = "flop" if tf >= tb else "byte"
  return out


def time_shape(name, b, p, u, h, kh, d, ceil, impls, rows, seed=0):
  """Times the implementations on one shape; appends rows; returns {impl: us}."""
  fl = floors(b, p, u, h, kh, d, ceil)
  per_call = 2 * (2 * p * kh * d + 2 * b * u * kh * d + 2 * b * h * d)
  rot = rotations(per_call)
  cases = [make_case(jax.random.key(seed + i), b, p, u, h, kh, d) for i in range(rot)]
  fns = hydragen_fns(b, p, u)
  res = {}
  for impl in impls:
    if left() < 20:
      log("budget: skipping", name, impl)
      continue
    try:
      if impl == "cudnn":
        if 2 * b * (p + u) * kh * d * 2 > ARGS.max_replicated_gb * 1e9:
          raise MemoryError(f"replicated caches would take {2*b*(p+u)*kh*d*2/1e9:.0f} GB")
        reps = [(c[0], *replicated(*c[1:])) for c in cases[:1]]
        t, tmin, inner = bench(CUDNN, reps)
        del reps
      else:
        t, tmin, inner = bench(fns[impl], cases)
      res[impl] = t * 1e6
      row = dict(shape=name, impl=impl, B=b, P=p, U=u, H=h, K=kh, D=d, us=t * 1e6,
                 us_min=tmin * 1e6, inner=inner, rotations=rot if impl != "cudnn" else 1, **fl)
      for src in ("torch", "jnp"):
        if f"floor_{src}_us" in fl:
          row[f"pct_floor_{src}"] = 100 * fl[f"floor_{src}_us"] / (t * 1e6)
      rows.append(row)
      log(f"{name:>22} {impl:>13} {t*1e6:10.1f} us  (floor {fl.get('floor_torch_us', 0):.1f})")
    except Exception as e:
      msg = repr(e).splitlines()[0][:200]
      rows.append(dict(shape=name, impl=impl, B=b, P=p, U=u, H=h, K=kh, D=d, error=msg, **fl))
      log(f"{name:>22} {impl:>13} FAILED {msg}")
  del cases
  return res


# --- check -----------------------------------------------------------------------------------

def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def run_checks(rows):
  """Pallas variants vs the XLA backend on float32 copies; returns number of failures."""
  rng = np.random.default_rng(int(time.time()))
  tol = {jnp.bfloat16: 2e-2, jnp.float16: 4e-3, jnp.float32: 2e-5}
  cases = [
      # name, B, T, K, G, D, dtype, shared levels [(N, S)], suffix U, traced owner, config
      ("decode_gqa4_odd", 7, 1, 8, 4, 128, jnp.bfloat16, [(1, 1000)], 130, False, {}),
      ("decode_gqa8_mqa", 33, 1, 1, 8, 128, jnp.bfloat16, [(1, 2048)], 100, False, {}),
      ("prefill_T37_fp16", 5, 37, 2, 3, 64, jnp.float16, [(3, 200)], 90, False, {}),
      ("prefill_traced_owner", 5, 9, 2, 2, 64, jnp.bfloat16, [(3, 150), (4, 70)], 40, True, {}),
      ("f32_D80_G1", 4, 5, 3, 1, 80, jnp.float32, [(2, 77)], 33, False, {}),
      ("gqa5_D128_T3", 6, 3, 2, 5, 128, jnp.bfloat16, [(2, 300)], 64, False, {}),
      ("splits3_decode", 7, 1, 8, 4, 128, jnp.bfloat16, [(1, 1000)], 130, False, {"splits": 3}),
      ("bn128_bm64", 9, 2, 2, 4, 64, jnp.float16, [(2, 517)], 45, False,
       {"block_n": 128, "block_m": 64}),
      ("bn32_warps4", 9, 2, 2, 4, 128, jnp.bfloat16, [(2, 517)], 45, False,
       {"block_n": 32, "num_warps": 4, "num_stages": 2}),
      ("bounds_in_kernel", 7, 3, 8, 4, 128, jnp.bfloat16, [(3, 700)], 130, False,
       {"tile_bounds": "kernel", "splits": 2}),
      # Mosaic GPU kernel (variant pallas_mosaic): ragged nodes, S not a multiple of the key
      # block, S below one block, many tiles per node, key splits, prefill rows.
      ("mosaic_ragged_nodes", 67, 1, 2, 4, 128, jnp.bfloat16, [(3, 1000)], 130, False, {}),
      ("mosaic_small_S_fp16", 9, 2, 2, 8, 64, jnp.float16, [(2, 100)], 20, False, {}),
      ("mosaic_splits_T5", 40, 5, 1, 8, 128, jnp.bfloat16, [(1, 2100), (2, 300)], 64, False,
       {"mosaic": {"splits": 3}}),
      ("mosaic_kv64_s4", 70, 1, 4, 2, 128, jnp.float16, [(2, 777)], 50, False,
       {"mosaic": {"block_kv": 64, "stages": 4}}),
  ]
  failures = 0
  if ARGS.check_cases:
    cases = [c for c in cases if c[0] in ARGS.check_cases.split(",")]
  for name, b, t, kh, g, d, dtype, shared, u, traced, cfg in cases:
    try:
      h = kh * g
      q = rng.standard_normal((b, t, h, d))
      levels_np = []
      for n, s in shared:
        lengths = rng.integers(0, s + 1, size=n)
        lengths[0] = s
        if n > 2:
          lengths[1] = 0                       # an empty node
        owner = rng.integers(0, n, size=b)
        owner[-1] = n - 1 if n > 2 else owner[-1]
        levels_np.append((rng.standard_normal((n, s, kh, d)), rng.standard_normal((n, s, kh, d)),
                          lengths.astype(np.int32), owner.astype(np.int32)))
      lengths = rng.integers(0, u + 1, size=b)
      lengths[0] = u
      lengths[min(1, b - 1)] = 0
      levels_np.append((rng.standard_normal((b, u, kh, d)), rng.standard_normal((b, u, kh, d)),
                        lengths.astype(np.int32), None))

      def lv(dt, owners_traced=None):
        out = []
        for i, (k, v, ln, own) in enumerate(levels_np):
          if own is not None and owners_traced is not None:
            own = owners_traced[i]
          out.append(KVLevel(jnp.asarray(k, dt), jnp.asarray(v, dt), jnp.asarray(ln), own))
        return out

      qd = jnp.asarray(q, dtype)
      ref = None
      for causal in (True, False):
        # float32 copies of the (rounded) inputs, XLA backend at HIGHEST precision.
        rq = jnp.asarray(qd, jnp.float32)
        rl = [x._replace(k=x.k.astype(jnp.float32), v=x.v.astype(jnp.float32)) for x in lv(dtype)]
        ref = hydragen_attention(rq, rl, causal_last=causal, backend="xla")
        for variant in ("pallas", "pallas_fused", "pallas_mosaic"):
          extra = {"lowering": "mosaic"} if variant == "pallas_mosaic" else {}
          if variant == "pallas_mosaic" and (dtype == jnp.float32 or d not in (64, 128)):
            continue
          with pg.configure(poison=True, **cfg, **extra):
            variant_api = "pallas" if variant == "pallas_mosaic" else variant
            if traced:
              owners = [jnp.asarray(x[3]) if x[3] is not None else None for x in levels_np]
              if variant_api == "pallas":
                fn = jax.jit(lambda q, ow: hydragen_attention(q, lv(dtype, ow), causal_last=causal,
                                                              backend="pallas"))
              else:
                fn = jax.jit(lambda q, ow: pg.hydragen_attention_fused(q, lv(dtype, ow),
                                                                       causal_last=causal))
              out, lse = fn(qd, owners)
            else:
              if variant_api == "pallas":
                out, lse = jax.jit(lambda q: hydragen_attention(q, lv(dtype), causal_last=causal,
                                                                backend="pallas"))(qd)
              else:
                out, lse = jax.jit(lambda q: pg.hydragen_attention_fused(
                    q, lv(dtype), causal_last=causal))(qd)
          out = np.asarray(out.astype(jnp.float32))
          lse = np.asarray(lse)
          ro, rlse = np.asarray(ref[0]), np.asarray(ref[1])
          fin = np.isfinite(rlse)
          nan = bool(np.isnan(out).any() or np.isnan(lse).any())
          pattern = bool(np.array_equal(np.isfinite(lse), fin))
          empty_zero = bool(np.all(out[~fin] == 0))
          e_out = _rel(out, ro)
          e_lse = float(np.max(np.abs(lse[fin] - rlse[fin]))) if fin.any() else 0.0
          ok = (not nan) and pattern and empty_zero and e_out < tol[dtype] and e_lse < 10 * tol[dtype]
          failures += not ok
          rows.append(dict(case=name, variant=variant, causal=causal, dtype=jnp.dtype(dtype).name,
                           rel_err_out=e_out, max_abs_err_lse=e_lse, nan=nan,
                           lse_pattern_ok=pattern, empty_rows_zero=empty_zero, ok=ok,
                           empty_rows=int((~fin).sum())))
          log(f"check {name:>22} {variant:>12} causal={causal!s:5} rel_err={e_out:.2e} "
              f"lse_err={e_lse:.2e} nan={nan} {'PASS' if ok else 'FAIL'}")
    except Exception as e:
      failures += 1
      rows.append(dict(case=name, variant="all", ok=False, error=repr(e)[:300]))
      log(f"check {name} FAILED with {repr(e)[:300]}")
      traceback.print_exc()
  # The cuDNN baseline computes the same function (sanity of the comparison).
  try:
    q, kp, vp, ks, vs = make_case(jax.random.key(7), 8, 1024, 128, 32, 8, 128)
    ours = hydragen_fns(8, 1024, 128)["xla"](q, kp, vp, ks, vs)
    cud = CUDNN(q, *replicated(kp, vp, ks, vs))
    e = _rel(cud.astype(jnp.float32), ours.astype(jnp.float32))
    rows.append(dict(case="cudnn_replicated_vs_xla", variant="cudnn", rel_err_out=e, ok=e < 2e-2))
    log(f"check cudnn replicated vs xla rel_err={e:.2e}")
  except Exception as e:
    log("cudnn check failed:", repr(e)[:300])
  return failures


# --- sweep -----------------------------------------------------------------------------------

SWEEP_SHAPES = [
    # name, B, P (keys of the level), H, K, level kind
    ("prefix_decode_B256_P16K", 256, 16384, 32, 8, "shared"),
    ("prefix_micro_B2048_P4K", 2048, 4096, 8, 1, "shared"),
    ("suffix_decode_B1024_U128", 1024, 128, 32, 8, "suffix"),
    ("suffix_micro_B4096_U512", 4096, 512, 8, 1, "suffix"),
]
SWEEP_SHARED = [   # wide = (block_n, num_stages); warps = M/32 (4..8); max_block_m caps M
    {"wide": (64, 3)}, {"wide": (64, 4)},
    {"lowering": "mosaic", "mosaic": {"block_kv": 128, "stages": 2}},
    {"lowering": "mosaic", "mosaic": {"block_kv": 64, "stages": 4}},
    {"lowering": "mosaic", "mosaic": {"block_kv": 128, "stages": 3}},
    {"lowering": "mosaic", "mosaic": {"block_kv": 64, "stages": 3}}]
SWEEP_SUFFIX = [{"narrow": c} for c in [(64, 4, 2), (64, 2, 3), (32, 4, 3), (128, 4, 2)]]


def level_fn(kind, b, s):
  owner = np.zeros((b,), np.int32)
  if kind == "shared":
    lengths = jnp.full((1,), s, jnp.int32)
    lim = jnp.full((b, 1), s, jnp.int32)
    return lambda q, k, v: pg.level_attention(q, k, v, lengths, owner, lim, scale=0.088)
  lengths = jnp.full((b,), s, jnp.int32)
  lim = jnp.full((b, 1), s, jnp.int32)
  return lambda q, k, v: pg.level_attention(q, k, v, lengths, None, lim, scale=0.088)


def run_sweep(rows):
  """Times each level alone under each (block_n, warps, stages); returns the best per kind
  ({"wide": tuple, "narrow": tuple}) by the sum over that kind's shapes of time / best time."""
  scores = {}
  for name, b, s, h, kh, kind in SWEEP_SHAPES:
    if kind not in ARGS.sweep_kinds.split(","):
      continue
    n = 1 if kind == "shared" else b
    d = 128
    key = jax.random.key(3)
    nbytes = 2 * n * s * kh * d * 2
    rot = rotations(nbytes)
    args = [(jax.random.normal(jax.random.fold_in(key, 3 * i), (b, 1, h, d), jnp.bfloat16),
             jax.random.normal(jax.random.fold_in(key, 3 * i + 1), (n, s, kh, d), jnp.bfloat16),
             jax.random.normal(jax.random.fold_in(key, 3 * i + 2), (n, s, kh, d), jnp.bfloat16))
            for i in range(rot)]
    flops = 4.0 * b * h * s * d
    nb = nbytes + 2 * b * h * d * 2
    table = "wide" if kind == "shared" else "narrow"
    configs = SWEEP_SHARED if kind == "shared" else SWEEP_SUFFIX
    times = {}
    for cfg in configs:
      if left() < 90:
        log("budget: sweep cut short")
        break
      try:
        with pg.configure(**cfg):
          fn = jax.jit(level_fn(kind, b, s))
          t, tmin, inner = bench(fn, args)
        tf = flops / t / 1e12
        bw = nb / t / 1e12
        rows.append(dict(shape=name, kind=kind, config=json.dumps(cfg), us=t * 1e6,
                         us_min=tmin * 1e6, tflops=tf, tbps=bw))
        log(f"sweep {name:>26} {json.dumps(cfg):>45} {t*1e6:9.1f} us {tf:6.1f} TF/s "
            f"{bw:5.2f} TB/s")
        if "splits" not in cfg:
          times[json.dumps(cfg)] = t
      except Exception as e:
        rows.append(dict(shape=name, kind=kind, config=json.dumps(cfg), error=repr(e)[:300]))
        log(f"sweep {name} {cfg} FAILED {repr(e)[:300]}")
    if times:
      tbest = min(times.values())
      for c, t in times.items():
        scores.setdefault(table, {}).setdefault(c, []).append(t / tbest)
  best = {}
  for table, per in scores.items():
    n_shapes = max(len(v) for v in per.values())
    full = {c: sum(v) for c, v in per.items() if len(v) == n_shapes}
    best.update(json.loads(min(full, key=full.get)))
  log("sweep best:", best)
  return best


# --- Mosaic GPU reference --------------------------------------------------------------------

def run_mgpu(rows):
  """jax's Mosaic GPU flash attention on the stacked prefix product vs our kernel."""
  try:
    from jax.experimental.pallas.ops.gpu import attention_mgpu as am
  except Exception as e:
    am = None
    log("mgpu import failed:", repr(e)[:200])
  for name, b, p, h, kh in [("decode_B256_P16K", 256, 16384, 32, 8),
                            ("decode_B1024_P16K", 1024, 16384, 32, 8),
                            ("micro_B4096_P8K", 4096, 8192, 8, 1)]:
    if left() < 60:
      return
    g, d = h // kh, 128
    key = jax.random.key(5)
    # The stacked product: rows (b, g) of each KV head as one query sequence of length B*G.
    # float16: the bundled kernel's shared-memory buffers are float16 only.
    q = jax.random.normal(key, (1, b * g, kh, d), jnp.float16)
    k = jax.random.normal(jax.random.fold_in(key, 1), (1, p, kh, d), jnp.float16)
    v = jax.random.normal(jax.random.fold_in(key, 2), (1, p, kh, d), jnp.float16)
    flops = 4.0 * b * h * p * d
    try:   # our kernel on the same product (one node, all rows see all keys)
      lengths = jnp.full((1,), p, jnp.int32)
      lim = jnp.full((b * g, 1), p, jnp.int32)
      own = np.zeros((b * g,), np.int32)
      ours = jax.jit(lambda q, k, v: pg.level_attention(q, k, v, lengths, own, lim,
                                                        scale=0.088))
      t2, tmin2, _ = bench(ours, [(q.reshape(b * g, 1, kh, d), k, v)])
      rows.append(dict(shape=name, kind="pallas_triton_stacked_fp16", config="default",
                       us=t2 * 1e6, us_min=tmin2 * 1e6, tflops=flops / t2 / 1e12))
      log(f"ours {name:>20} {'(same product)':>16} {t2*1e6:9.1f} us {flops/t2/1e12:6.1f} TF/s")
    except Exception as e:
      log(f"ours {name} FAILED {repr(e)[:300]}")
    if am is None:
      continue
    for cfgname, cfg in [("bq64_bkv128_s2", dict(block_q=64, block_kv=128, max_concurrent_steps=2)),
                         ("bq64_bkv64_s4", dict(block_q=64, block_kv=64, max_concurrent_steps=4))]:
      try:
        tc = am.TuningConfig(**cfg)
        fn = jax.jit(lambda q, k, v: am.attention(q, k, v, tc))
        t, tmin, inner = bench(fn, [(q, k, v)])
        rows.append(dict(shape=name, kind="mgpu_fa3_stacked", config=cfgname, us=t * 1e6,
                         us_min=tmin * 1e6, tflops=flops / t / 1e12))
        log(f"mgpu {name:>20} {cfgname:>16} {t*1e6:9.1f} us {flops/t/1e12:6.1f} TF/s")
      except Exception as e:
        rows.append(dict(shape=name, kind="mgpu_fa3_stacked", config=cfgname, error=repr(e)[:300]))
        log(f"mgpu {name} {cfgname} FAILED {repr(e)[:300]}")


# --- Mosaic GPU kernel alone -----------------------------------------------------------------

def run_kernel_only(rows):
  """`mosaic_gpu.tile_attention` alone (no packing, split merge or unpacking) on the stacked
  prefix product of one node: every row sees all P keys. Separates the kernel from the XLA
  work around it in the `level_attention` timings of the sweep."""
  from hydrax.attention.kernels import mosaic_gpu as mg
  for name, b, p, h, kh in [("decode_B256_P16K", 256, 16384, 32, 8),
                            ("decode_B1024_P16K", 1024, 16384, 32, 8),
                            ("decode_B1024_P4K", 1024, 4096, 32, 8),
                            ("micro_B2048_P4K", 2048, 4096, 8, 1)]:
    g, d = h // kh, 128
    r = b * g
    tiles = -(-r // mg.TILE)
    key = jax.random.key(11)
    q = jax.random.normal(key, (kh, tiles * mg.TILE, d), jnp.bfloat16)
    k = jax.random.normal(jax.random.fold_in(key, 1), (1, p, kh, d), jnp.bfloat16)
    v = jax.random.normal(jax.random.fold_in(key, 2), (1, p, kh, d), jnp.bfloat16)
    tab = jnp.asarray(np.tile(np.array([[0, p, p, 0]], np.int32), (tiles, 1)))
    lim = jnp.full((tiles * mg.TILE,), p, jnp.int32)
    flops = 4.0 * r * kh * p * d
    for bkv, stages in ((128, 2), (64, 4)):
      nblk = p // bkv
      for splits in (1, 2, 4):
        if left() < 30:
          return
        bps = -(-nblk // splits)
        try:
          fn = jax.jit(functools.partial(mg.tile_attention, scale=0.088, block_kv=bkv,
                                         stages=stages, splits=splits, blocks_per_split=bps))
          t, tmin, _ = bench(fn, [(q, k, v, tab, lim)])
          ctas = tiles * kh * splits
          rows.append(dict(shape=name, kind="mosaic_kernel_only",
                           config=f"bkv{bkv}_s{stages}_splits{splits}", us=t * 1e6,
                           us_min=tmin * 1e6, tflops=flops / t / 1e12, ctas=ctas))
          log(f"kernel {name:>18} bkv{bkv} s{stages} splits{splits} ({ctas:4d} CTAs) "
              f"{t*1e6:8.1f} us {flops/t/1e12:6.1f} TF/s")
        except Exception as e:
          rows.append(dict(shape=name, kind="mosaic_kernel_only", config=f"bkv{bkv}_{splits}",
                           error=repr(e)[:300]))
          log(f"kernel {name} FAILED {repr(e)[:300]}")


# --- main ------------------------------------------------------------------------------------

def write_csv(path, rows):
  if not rows:
    return
  keys = []
  for r in rows:
    for k in r:
      if k not in keys:
        keys.append(k)
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)


def summary(rows, ceil):
  """Prints per shape: floor, each implementation's time, and the pallas backend's % of the
  floor and speedups over cuDNN-replicated and XLA."""
  by = {}
  for r in rows:
    if "us" in r:
      by.setdefault(r["shape"], {})[r["impl"]] = r
  impls = [i for i in ("pallas", "pallas_triton", "pallas_fused", "xla", "cudnn")
           if any(i in d for d in by.values())]
  print("\nshape | floor us | " + " | ".join(f"{i} us" for i in impls)
        + " | pallas % floor | pallas vs cudnn | pallas vs xla")
  for shape, d in by.items():
    fl = next(iter(d.values())).get("floor_torch_us", float("nan"))
    g = lambda k: d[k]["us"] if k in d else float("nan")
    print(f"{shape} | {fl:.1f} | " + " | ".join(f"{g(i):.1f}" for i in impls)
          + f" | {100*fl/g('pallas'):.0f}% | {g('cudnn')/g('pallas'):.1f}x"
          + f" | {g('xla')/g('pallas'):.1f}x")


def markdown(csv_path):
  """Markdown table of a results CSV: per shape the floor, pallas time and % of floor, and the
  speedups of pallas (levels run separately, the backend path) over cuDNN-replicated and XLA."""
  with open(csv_path) as f:
    rows = [r for r in csv.DictReader(f) if r.get("us")]
  by = {}
  for r in rows:
    by.setdefault(r["shape"], {})[r["impl"]] = r
  out = ["| shape | bound | floor us | pallas us | % floor | pallas, all Triton us | xla us | "
         "cuDNN-rep. us | vs cuDNN | vs XLA |", "|" + "---|" * 10]
  for shape, d in by.items():
    g = lambda k: float(d[k]["us"]) if k in d else float("nan")
    other = "pallas_triton" if "pallas_triton" in d else "pallas_fused"   # older runs: fused
    any_row = next(iter(d.values()))
    fl = float(any_row.get("floor_torch_us") or "nan")
    p = g("pallas")
    out.append(f"| {shape} | {any_row.get('bound_torch', '')} | {fl:.1f} | {p:.1f} | "
               f"{100 * fl / p:.0f}% | {g(other):.1f} | {g('xla'):.1f} | "
               f"{g('cudnn'):.1f} | {g('cudnn') / p:.1f}x | {g('xla') / p:.1f}x |")
  return "\n".join(out)


def plot(csv_path, png_path):
  """Micro-benchmark (time vs suffix per (B, P)) and decode (time vs B per P) panels."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt_
  with open(csv_path) as f:
    rows = [r for r in csv.DictReader(f) if r.get("us")]
  impls = [("pallas", "hydrax pallas (Mosaic GPU shared level)"),
           ("pallas_triton", "hydrax pallas, all Triton"),
           ("pallas_fused", "pallas, levels in one launch"),
           ("xla", "hydrax XLA"), ("cudnn", "cuDNN, prefix copied")]
  micro = sorted({(int(r["B"]), int(r["P"])) for r in rows if r["shape"].startswith("micro")})
  dec_p = sorted({int(r["P"]) for r in rows if r["shape"].startswith("decode")})
  ncol = max(len(micro), len(dec_p))
  if ncol == 0:
    return
  nrow = (len(micro) > 0) + (len(dec_p) > 0)
  fig, axes = plt_.subplots(nrow, ncol, figsize=(3.6 * ncol, 3.3 * nrow), squeeze=False)
  for ax in axes.ravel()[len(micro) if nrow == 1 else 0:]:
    ax.set_visible(False)
  micro_axes = list(axes[0][:len(micro)])
  dec_axes = list(axes[nrow - 1][:len(dec_p)])
  for ax in micro_axes + dec_axes:
    ax.set_visible(True)
  for ax, (b, p) in zip(micro_axes, micro):
    for impl, label in impls:
      pts = sorted((int(r["U"]), float(r["us"])) for r in rows if r["impl"] == impl and
                   r["shape"].startswith("micro") and int(r["B"]) == b and int(r["P"]) == p)
      if pts:
        ax.plot(*zip(*pts), marker=".", label=label)
    fl = sorted({(int(r["U"]), float(r["floor_torch_us"])) for r in rows
                 if r["shape"].startswith("micro") and int(r["B"]) == b and int(r["P"]) == p
                 and r.get("floor_torch_us")})
    if fl:
      ax.plot(*zip(*fl), "k--", lw=1, label="roofline floor")
    ax.set(title=f"H=8 K=1: B={b}, P={p // 1024}K", xlabel="suffix U", yscale="log")
  for ax, p in zip(dec_axes, dec_p):
    for impl, label in impls:
      pts = sorted((int(r["B"]), float(r["us"])) for r in rows if r["impl"] == impl and
                   r["shape"].startswith("decode") and int(r["P"]) == p)
      if pts:
        ax.plot(*zip(*pts), marker=".", label=label)
    fl = sorted({(int(r["B"]), float(r["floor_torch_us"])) for r in rows
                 if r["shape"].startswith("decode") and int(r["P"]) == p and r.get("floor_torch_us")})
    if fl:
      ax.plot(*zip(*fl), "k--", lw=1, label="roofline floor")
    ax.set(title=f"decode H=32 K=8 U=128: P={p // 1024}K", xlabel="batch B", xscale="log",
           yscale="log")
  for row in axes:
    row[0].set_ylabel("median us per call")
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(png_path, dpi=110)


def main():
  global ARGS
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  for flag in ("check", "ceilings", "sweep", "mgpu", "kernel", "decode", "micro"):
    ap.add_argument(f"--{flag}", action="store_true")
  ap.add_argument("--out", default="results_attention")
  ap.add_argument("--budget", type=float, default=560.0, help="seconds; later work is skipped")
  ap.add_argument("--max-replicated-gb", type=float, default=80.0)
  ap.add_argument("--impls", default="pallas,pallas_triton,xla,cudnn")
  ap.add_argument("--config", default="{}", help="JSON of pallas_gpu.Config fields")
  ap.add_argument("--plot", default="", help="CSV to plot (no benchmark runs); PNG beside it")
  ap.add_argument("--sweep-kinds", default="shared,suffix")
  ap.add_argument("--check-cases", default="", help="comma list of check case names")
  ap.add_argument("--micro-suffixes", default="0,64,128,192,256,320,384,448,512")
  ARGS = ap.parse_args()
  if ARGS.plot:
    plot(ARGS.plot, os.path.splitext(ARGS.plot)[0] + ".png")
    print(markdown(ARGS.plot))
    return
  os.makedirs(ARGS.out, exist_ok=True)
  log("jax", jax.__version__, jax.devices())
  cfg_over = {k: tuple(v) if isinstance(v, list) else v
              for k, v in json.loads(ARGS.config).items()}
  ceil = {}
  results, sweep_rows, check_rows = [], [], []
  if ARGS.check:
    fails = run_checks(check_rows)
    write_csv(os.path.join(ARGS.out, "check.csv"), check_rows)
    log(f"check: {fails} failures")
  if ARGS.ceilings:
    ceil = ceilings()
    with open(os.path.join(ARGS.out, "ceilings.json"), "w") as f:
      json.dump(ceil, f, indent=1)
    log("ceilings", ceil)
  if ARGS.sweep:
    best = run_sweep(sweep_rows)
    write_csv(os.path.join(ARGS.out, "sweep.csv"), sweep_rows)
    for name, c in best.items():
      if name == "lowering":     # the tables keep lowering="auto" (Mosaic for shared levels)
        continue
      cfg_over.setdefault(name, tuple(c) if isinstance(c, list) else c)
    log("tables run with config", cfg_over)
  if ARGS.mgpu:
    run_mgpu(sweep_rows)
    write_csv(os.path.join(ARGS.out, "sweep.csv"), sweep_rows)
  if ARGS.kernel:
    run_kernel_only(sweep_rows)
    write_csv(os.path.join(ARGS.out, "sweep.csv"), sweep_rows)
  impls = ARGS.impls.split(",")
  with pg.configure(**cfg_over):
    if ARGS.decode:
      for p in (1024, 4096, 16384):
        for b in (16, 64, 256, 1024):
          time_shape(f"decode_P{p//1024}K_B{b}", b, p, 128, 32, 8, 128, ceil, impls, results)
          write_csv(os.path.join(ARGS.out, "results.csv"), results)
    if ARGS.micro:
      for b, p in ((512, 1024), (1024, 2048), (2048, 4096), (4096, 8192)):
        for u in [int(x) for x in ARGS.micro_suffixes.split(",")]:
          time_shape(f"micro_B{b}_P{p//1024}K_U{u}", b, p, u, 8, 1, 128, ceil, impls, results)
          write_csv(os.path.join(ARGS.out, "results.csv"), results)
  write_csv(os.path.join(ARGS.out, "results.csv"), results)
  summary(results, ceil)
  log("done")


if __name__ == "__main__":
  main()
