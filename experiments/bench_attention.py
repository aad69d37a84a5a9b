"""Kernel benchmark and GPU exactness check of hydrax's attention backends.

Axis letters: B sequences, T queries per sequence (1 here: one decode step), H query heads,
K KV heads, D head dim, P shared-prefix length, U per-sequence suffix length.

Sections (flags; several may be given, they run in this order):
  --check     exactness of every kernel variant on the GPU against the XLA backend run on
              float32 copies of fresh random inputs (ragged lengths, odd batches, empty nodes,
              GQA 1..8, D 64/80/128, bf16/fp16/fp32, T = 1 and T > 1 causal, forced key
              splits, fused levels; random deep trees with traced owners and caches stacked
              [L,...] read at a traced layer); outputs poisoned with NaN before the kernel.
  --ceilings  bf16 matmul 8192^3 and a large device copy, through jnp and through torch.
  --sweep     block sizes / warps / stages of the kernel on a few shapes, each level alone.
  --mgpu      jax's bundled Mosaic GPU flash attention (FA3 style, Hopper only) on the same
              stacked shared-prefix product, for the choice of lowering.
  --kernel    hydrax's Mosaic GPU kernel alone (no XLA work around it), key blocks x splits.
  --decode    decode step, H=32, K=8, D=128, U=128, P in {1K,4K,16K}, B in {16,64,256,1024}.
  --trees     traced vs static owners on 3-level trees (P=2K prefix, B/16 problems of 1K, U=128)
              at B = 256 and 1024: the pallas and XLA backends, back to back.
  --engine    decode step of a llama3-8b-shaped model (random bf16 weights, --engine-layers
              layers, default 4 to bound compile time and memory) through `engine.generate`
              with attention="hydragen" and "none", for the issue's points (16K/1024, 16K/256,
              1K/1024) then the other decode shapes while the budget lasts; attention per
              layer inside the step = (step_hydragen - step_none) / layers.
  --micro     the paper's micro-benchmark: H=8, K=1, D=128, (B,P) in {(512,1K),(1024,2K),
              (2048,4K),(4096,8K)}, U in 0..512 step 64.
  --smoke     tiny shapes (CPU, interpret mode): the script's logic in seconds (tests).
Every timed shape reports, per implementation, (a) `us`: the median time per call issued back
to back (host dispatch overlaps device work), and (b) `device_us`: the device time of the op
alone, from one jit of --loop dependent calls in a `lax.fori_loop` (each call's q depends on
the previous output through a 1e-30 term) divided by --loop. Caches are stacked [R,...] and
each call reads copy i % R through KVLevel.layer (in place for pallas; XLA fuses the slice),
R chosen so that one pass exceeds twice the L2. Implementations: hydrax pallas backend (levels
run separately and merged; lowering "auto": Mosaic GPU for the shared level on Hopper), the
same with every level on the Triton kernel (pallas_triton), optionally all levels in one
Triton launch (`hydragen_attention_fused`, impl pallas_fused), hydrax's XLA backend, and cuDNN
attention over caches holding a copy of the prefix in every sequence
(`jax.nn.dot_product_attention(implementation="cudnn")`; the copy is made before timing).
Floors: FLOPs = 4*B*T*H*(P+U)*D; bytes = prefix KV once + suffix KV + q + out (bf16) + lse;
floor = max(FLOPs / matmul ceiling, bytes / copy ceiling), with the ceilings of this run.

With --sweep, the decode/micro tables run with the sweep's best configuration (logged). The
kernel configuration is a value (`pallas_gpu.configure(**json of --config)`) passed as
`backend=`, never global state.

H200 (one invocation, about 6 minutes; the table of the decode shapes prints last):
  python3 experiments/bench_attention.py --check --check-cases decode_gqa4_odd,\
mosaic_ragged_nodes,mosaic_splits_T5,tree_traced_layer,tree_traced_layer_fp16_T3,\
tree_traced_wide_B256,tree_traced_layer_f32_D80,tree_layer_copy --ceilings --decode --trees \
--engine --impls pallas,xla,cudnn --out $OUT --budget 540
The peers (experiments/peers.py: torch SDPA and tokamax with the prefix copied, FlashInfer's
cascade; carried as in WORKSPACE.md) join any table by name: --impls
pallas,cudnn,torch_sdpa,flashinfer,tokamax (each row has rel_err against the XLA backend).
Writes DIR/results.csv (one row per timed shape and implementation, engine steps included),
DIR/check.csv, DIR/sweep.csv, DIR/ceilings.json, DIR/summary.json; prints a table last.
  python experiments/bench_attention.py --plot DIR/results.csv   (no GPU: PNG + markdown table)
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
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
from jax import lax  # noqa: E402

from hydrax.attention import KVLevel, hydragen_attention  # noqa: E402
from hydrax.attention.kernels import pallas_gpu as pg  # noqa: E402
from experiments import peers  # noqa: E402

T0 = time.time()               # reset by main(): --budget counts from the run's start
ARGS = None
BASE_CONFIG = pg.Config()     # the kernel configuration of every timed pallas call


def log(*a):
  print(f"[{time.time() - T0:7.1f}s]", *a, flush=True)


def left() -> float:
  return ARGS.budget - (time.time() - T0)


# --- timing ----------------------------------------------------------------------------------

def bench(fn, arg_sets, min_batch_s=5e-3, outer=None):
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
  outer = outer or ARGS.outer
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


def warm_device(seconds: float) -> int:
  """Runs dependent bf16 matrix products for `seconds` (GPU clocks ramp up under load: on
  the H200 the same small-shape call timed first in a process ran up to 1.8x slower than
  later in it; experiments/results/fused_h200/run8). Returns the products run."""
  if seconds <= 0:
    return 0
  x = jnp.ones((4096, 4096), jnp.bfloat16)
  step = jax.jit(lambda x: (x @ x) * jnp.asarray(1e-3, x.dtype))
  end, n = time.perf_counter() + seconds, 0
  while time.perf_counter() < end:
    for _ in range(8):
      x = step(x)
    jax.block_until_ready(x)
    n += 8
  return n


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

def make_case(key, b, p, u, h, kh, d, dtype=jnp.bfloat16, copies=1):
  """q [B,1,H,D]; prefix k/v [R,1,P,K,D] and suffix k/v [R,B,U,K,D] (all keys valid): R =
  `copies` stacked caches, read one per call through KVLevel.layer (the engine's layout: in
  place for the pallas backend, a fused slice for XLA), so that rotating them defeats L2."""
  ks = jax.random.split(key, 5)
  q = jax.random.normal(ks[0], (b, 1, h, d), dtype)
  kp = jax.random.normal(ks[1], (copies, 1, p, kh, d), dtype)
  vp = jax.random.normal(ks[2], (copies, 1, p, kh, d), dtype)
  ksf = jax.random.normal(ks[3], (copies, b, u, kh, d), dtype)
  vsf = jax.random.normal(ks[4], (copies, b, u, kh, d), dtype)
  return q, kp, vp, ksf, vsf


def plan_inputs(case) -> tuple:
  """(prefix length [1], suffix lengths [B], owners [B]) of a case (`make_case`), as device
  arrays: the timed calls take them as inputs, as the engine passes them (built inside the
  jitted function they are constants that XLA writes with a kernel every call: 1.6-1.7 us
  each on the H200, experiments/results/fused_h200 run 9)."""
  q, kp, _, ks, _ = case
  b, p, u = q.shape[0], kp.shape[2], ks.shape[2]
  return (jnp.full((1,), p, jnp.int32), jnp.full((b,), u, jnp.int32),
          jnp.zeros((b,), jnp.int32))


def decode_fns(b, p, u, backend):
  """{impl: jitted fn(q, kp, vp, ks, vs, lp, ls, owner, layer) -> out} for one prefix shared
  by all (one node) and per-sequence suffixes, caches stacked [R,...] and read at `layer`;
  lp, ls, owner from `plan_inputs`."""

  def levels(kp, vp, ks, vs, lp, ls, owner, layer):
    lv = [KVLevel(kp, vp, lp, owner, layer)]
    if u:
      lv.append(KVLevel(ks, vs, ls, None, layer))
    return lv

  def with_backend(bk):
    return jax.jit(lambda q, kp, vp, ks, vs, lp, ls, owner, layer: hydragen_attention(
        q, levels(kp, vp, ks, vs, lp, ls, owner, layer), backend=bk)[0])

  return {
      "pallas": with_backend(backend),
      "pallas_triton": with_backend(backend.configured(lowering="triton")),
      "pallas_fused": jax.jit(
          lambda q, kp, vp, ks, vs, lp, ls, owner, layer: pg.hydragen_attention_fused(
              q, levels(kp, vp, ks, vs, lp, ls, owner, layer), backend=backend)[0]),
      "xla": with_backend("xla"),
  }


def dependent_loop(fn, n: int, unroll: bool = False):
  """jit of n dependent calls of fn(q, *rest, layer) in a `lax.fori_loop`: call i reads cache
  copy i % R (R = the leading axis of rest[0]) and its q carries 1e-30 * out[0,0,0,0] of the
  previous call (numerically nothing, but a real data dependency: calls cannot overlap or be
  hoisted). Time / n is the op's device time without host dispatch. unroll: the n calls as
  straight-line code instead of a while loop, whose per-iteration condition (on a GPU a
  device-to-host copy unless XLA puts the loop in a CUDA graph) is then not timed: on the H200
  the rolled loop added 8-14 us a call at ops of 25-60 us (experiments/results/fused_h200/
  run8), so the scripts unroll by default."""
  def run(q, *rest):
    copies = rest[0].shape[0]

    def body(i, q):
      out = fn(q, *rest, lax.rem(i, copies))
      return q + (jnp.asarray(1e-30, q.dtype) * out[:1, :1, :1, :1]).astype(q.dtype)

    return lax.fori_loop(0, n, body, q, unroll=bool(unroll))

  return jax.jit(run)


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


def _cudnn_step(q, k, v, layer):
  """cuDNN on k, v [1,B,P+U,K,D]: one replicated copy (R copies of it rarely fit)."""
  del layer
  return CUDNN(q, k[0], v[0])


def check_copied_fits(b, p, u, kh, d) -> None:
  """Raises MemoryError when bf16 caches with the prefix copied into every sequence would
  exceed --max-replicated-gb (the copied-prefix baselines build them)."""
  gb = 2 * b * (p + u) * kh * d * 2 / 1e9
  if gb > ARGS.max_replicated_gb:
    raise MemoryError(f"copied caches would take {gb:.0f} GB")


def time_peer(impl, b, p, u, h, kh, d, case, xla_fn) -> dict:
  """A peer of experiments/peers.py on this case: back-to-back and device us (a CUDA graph of
  dependent calls for torch peers, an in-jit loop for tokamax: `device_timing` says which)
  and its output's error against hydrax's XLA backend."""
  why = peers.unavailable(impl)
  if why:
    raise RuntimeError(f"not importable: {why}")
  if jax.default_backend() != "gpu":
    raise RuntimeError("needs a GPU")
  if impl != "flashinfer":
    check_copied_fits(b, p, u, kh, d)
  us, dev, how, out = peers.run(impl, b, p, u, h, kh, d, case, loop=ARGS.loop,
                                outer=ARGS.outer)
  ref = xla_fn(*case, *plan_inputs(case), jnp.int32(0))
  return dict(us=us, device_us=dev, device_timing=how,
              rel_err=_rel(out, np.asarray(ref[:, 0], np.float32)))


def time_shape(name, b, p, u, h, kh, d, ceil, impls, rows, backend, seed=0):
  """Times the implementations on one shape: back to back (`us`, host dispatch overlapping
  the device) and in a dependent in-jit loop (`device_us`); appends rows; returns
  {impl: row}."""
  fl = floors(b, p, u, h, kh, d, ceil)
  per_call = 2 * (2 * p * kh * d + 2 * b * u * kh * d + 2 * b * h * d)
  rot = rotations(per_call)
  case = make_case(jax.random.key(seed), b, p, u, h, kh, d, copies=rot)
  fns = decode_fns(b, p, u, backend)
  res = {}
  for impl in impls:
    if left() < 20:
      log("budget: skipping", name, impl)
      continue
    try:
      if impl in peers.PEERS:
        measured = time_peer(impl, b, p, u, h, kh, d, case, fns["xla"])
      else:
        if impl == "cudnn":
          check_copied_fits(b, p, u, kh, d)
          q, kp, vp, ks, vs = case
          k, v = replicated(kp[0], vp[0], ks[0], vs[0])
          fn, args, copies = _cudnn_step, (q, k[None], v[None]), 1
          t, tmin, inner = bench(CUDNN, [(q, k, v)])
        else:
          fn, args, copies = fns[impl], case + plan_inputs(case), rot
          t, tmin, inner = bench(fn, [args + (jnp.int32(i),) for i in range(rot)])
        loop = dependent_loop(lambda q, *r: fn(q, *r), ARGS.loop, ARGS.loop_unroll)
        td, _, _ = bench(loop, [args], min_batch_s=0, outer=ARGS.outer)
        measured = dict(us=t * 1e6, us_min=tmin * 1e6, device_us=td / ARGS.loop * 1e6,
                        inner=inner, rotations=copies)
        del args
      row = dict(shape=name, impl=impl, B=b, P=p, U=u, H=h, K=kh, D=d, **measured, **fl)
      for src in ("torch", "jnp"):
        if f"floor_{src}_us" in fl:
          row[f"pct_floor_{src}"] = 100 * fl[f"floor_{src}_us"] / row["device_us"]
      rows.append(row)
      res[impl] = row
      log(f"{name:>22} {impl:>13} {row['us']:10.1f} us back to back, {row['device_us']:10.1f} "
          f"us device (floor {fl.get('floor_torch_us', 0):.1f})")
    except Exception as e:
      msg = repr(e).splitlines()[0][:200]
      rows.append(dict(shape=name, impl=impl, B=b, P=p, U=u, H=h, K=kh, D=d, error=msg, **fl))
      log(f"{name:>22} {impl:>13} FAILED {msg}")
  del case
  return res


def tree_fns(b, p, problems, s, u, backend, traced):
  """A 3-level tree: a P-token prefix (one node), `problems` nodes of S tokens (sequence b
  owns problem b // (B / problems), contiguous as in plan order), per-sequence suffixes of U.
  Returns (fn(q, kp, vp, kn, vn, ks, vs, owner) jitted, owner): with `traced` the owner array
  is a jit argument (a runtime tile table), else a NumPy constant (a static layout)."""
  owner = (np.arange(b) * problems // b).astype(np.int32)
  lens = [jnp.full((1,), p, jnp.int32), jnp.full((problems,), s, jnp.int32),
          jnp.full((b,), u, jnp.int32)]

  def fn(q, kp, vp, kn, vn, ks, vs, own):
    lv = [KVLevel(kp, vp, lens[0], np.zeros((b,), np.int32)),
          KVLevel(kn, vn, lens[1], own if traced else owner),
          KVLevel(ks, vs, lens[2], None)]
    return hydragen_attention(q, lv, backend=backend)[0]

  return jax.jit(fn), owner


def time_trees(rows, backend, shapes, heads):
  """Traced vs static owners on 3-level trees ((H, K, D) = heads, bf16), back to back."""
  h, kh, d = heads
  for b, p, problems, s, u in shapes:
    name = f"tree_B{b}_P{p}_N{problems}x{s}_U{u}"
    key = jax.random.key(b + p)
    ks_ = jax.random.split(key, 7)
    args = [jax.random.normal(ks_[0], (b, 1, h, d), jnp.bfloat16)]
    for i, shape in enumerate([(1, p, kh, d)] * 2 + [(problems, s, kh, d)] * 2
                              + [(b, u, kh, d)] * 2):
      args.append(jax.random.normal(ks_[1 + i], shape, jnp.bfloat16))
    ref = None
    for impl, bk in (("pallas", backend), ("xla", "xla")):
      if impl not in ARGS.tree_impls.split(","):
        continue
      for traced in (False, True):
        if left() < 20:
          log("budget: skipping", name)
          return
        label = f"{impl}_{'traced' if traced else 'static'}"
        try:
          fn, owner = tree_fns(b, p, problems, s, u, bk, traced)
          call = tuple(args) + (jnp.asarray(owner),)
          out = fn(*call)
          ref = out if ref is None else ref
          err = _rel(out.astype(jnp.float32), ref.astype(jnp.float32))
          t, tmin, inner = bench(fn, [call])
          rows.append(dict(shape=name, impl=label, B=b, P=p, N=problems, S=s, U=u, us=t * 1e6,
                           us_min=tmin * 1e6, rel_err_vs_first=err))
          log(f"{name:>34} {label:>14} {t*1e6:10.1f} us (rel. diff {err:.1e})")
        except Exception as e:
          rows.append(dict(shape=name, impl=label, B=b, error=repr(e)[:300]))
          log(f"{name} {label} FAILED {repr(e)[:300]}")


def engine_steps(rows, shapes, layers: int, backend_name: str, new_tokens: int):
  """Decode step time through `hydrax.engine.generate` (llama3-8b shapes, `layers` layers,
  random bf16 weights; prompts: a P-token prefix shared by all + 16 own tokens) with
  attention="hydragen" (backend `backend_name`) and "none"; attention per layer in the step =
  (step_hydragen - step_none) / layers. Returns {(P, B): us per layer}."""
  from hydrax import engine, sharing
  from hydrax.models import configs, llama
  name = "tiny" if ARGS.smoke else "llama3-8b"
  config = configs.LlamaConfig.from_preset(name, num_layers=layers)
  model = llama.init(config, seed=0, dtype=jnp.bfloat16 if not ARGS.smoke else jnp.float32)
  rng = np.random.default_rng(0)
  steps, out = {}, {}
  for p, b in shapes:
    for mode in ("none", "hydragen"):
      key = (mode, b) if mode == "none" else (mode, b, p)
      if key in steps:
        continue
      if left() < 45:
        log("budget: skipping engine", mode, p, b)
        continue
      head = rng.integers(3, config.vocab_size, size=p)
      prompts = [np.concatenate([head, rng.integers(3, config.vocab_size, size=16)]).astype(
          np.int32) for _ in range(b)]
      try:
        gen = engine.generate(model, sharing.plan(prompts), max_new_tokens=new_tokens,
                              attention=mode, backend=backend_name)
        steps[key] = gen.decode_seconds / max(gen.decode_steps, 1) * 1e6
        rows.append(dict(shape=f"engine_P{p}_B{b}", impl=f"engine_{mode}", B=b, P=p,
                         layers=layers, step_us=steps[key], decode_steps=gen.decode_steps,
                         compile_s=gen.compile_seconds, backend=backend_name))
        log(f"engine P={p} B={b} {mode:>8}: step {steps[key]:10.1f} us ({layers} layers)")
      except Exception as e:
        rows.append(dict(shape=f"engine_P{p}_B{b}", impl=f"engine_{mode}", B=b, P=p,
                         error=repr(e)[:300]))
        log(f"engine P={p} B={b} {mode} FAILED {repr(e)[:300]}")
    if ("none", b) in steps and ("hydragen", b, p) in steps:
      out[(p, b)] = (steps[("hydragen", b, p)] - steps[("none", b)]) / layers
  return out


# --- check -----------------------------------------------------------------------------------

def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


CHECKS = [
    # name, B, T, K, G, D, dtype, shared levels [(N, S)], suffix U, traced owners, layers
    # (0: plain [N,S,K,D] levels; L: every level stacked [L,...] and read at a traced layer),
    # config
    ("decode_gqa4_odd", 7, 1, 8, 4, 128, jnp.bfloat16, [(1, 1000)], 130, False, 0, {}),
    ("decode_gqa8_mqa", 33, 1, 1, 8, 128, jnp.bfloat16, [(1, 2048)], 100, False, 0, {}),
    ("prefill_T37_fp16", 5, 37, 2, 3, 64, jnp.float16, [(3, 200)], 90, False, 0, {}),
    ("prefill_traced_owner", 5, 9, 2, 2, 64, jnp.bfloat16, [(3, 150), (4, 70)], 40, True, 0,
     {}),
    ("f32_D80_G1", 4, 5, 3, 1, 80, jnp.float32, [(2, 77)], 33, False, 0, {}),
    ("gqa5_D128_T3", 6, 3, 2, 5, 128, jnp.bfloat16, [(2, 300)], 64, False, 0, {}),
    ("splits3_decode", 7, 1, 8, 4, 128, jnp.bfloat16, [(1, 1000)], 130, False, 0,
     {"splits": 3}),
    ("bn128_bm64", 9, 2, 2, 4, 64, jnp.float16, [(2, 517)], 45, False, 0,
     {"block_n": 128, "block_m": 64}),
    ("bn32_warps4", 9, 2, 2, 4, 128, jnp.bfloat16, [(2, 517)], 45, False, 0,
     {"block_n": 32, "num_warps": 4, "num_stages": 2}),
    ("bounds_in_kernel", 7, 3, 8, 4, 128, jnp.bfloat16, [(3, 700)], 130, False, 0,
     {"tile_bounds": "kernel", "splits": 2}),
    # Mosaic GPU kernel (variant pallas_mosaic): ragged nodes, S not a multiple of the key
    # block, S below one block, many tiles per node, key splits, prefill rows.
    ("mosaic_ragged_nodes", 67, 1, 2, 4, 128, jnp.bfloat16, [(3, 1000)], 130, False, 0, {}),
    ("mosaic_small_S_fp16", 9, 2, 2, 8, 64, jnp.float16, [(2, 100)], 20, False, 0, {}),
    ("mosaic_splits_T5", 40, 5, 1, 8, 128, jnp.bfloat16, [(1, 2100), (2, 300)], 64, False, 0,
     {"mosaic": {"splits": 3}}),
    ("mosaic_kv64_s4", 70, 1, 4, 2, 128, jnp.float16, [(2, 777)], 50, False, 0,
     {"mosaic": {"block_kv": 64, "stages": 4}}),
    # Random deep trees with traced owners (runtime tile tables) and stacked caches read at a
    # traced layer (in place: capacities multiples of 128 for the Mosaic kernel, others not).
    ("tree_traced_layer", 300, 1, 8, 4, 128, jnp.bfloat16, [(1, 1536), (19, 256), (75, 130)],
     70, True, 3, {}),
    ("tree_traced_layer_fp16_T3", 45, 3, 2, 8, 64, jnp.float16, [(1, 384), (7, 200), (20, 64)],
     33, True, 2, {}),
    ("tree_traced_wide_B256", 256, 1, 8, 4, 128, jnp.bfloat16, [(1, 2048), (16, 1024)], 128,
     True, 4, {}),
    ("tree_traced_layer_f32_D80", 11, 2, 2, 3, 80, jnp.float32, [(1, 90), (4, 50)], 17, True,
     2, {}),
    ("tree_layer_copy", 40, 1, 8, 4, 128, jnp.bfloat16, [(1, 1024), (5, 256)], 64, True, 2,
     {"layer_in_place": False}),
]
SMOKE_CHECKS = [("smoke_tree_traced_layer", 3, 2, 1, 2, 64, jnp.bfloat16, [(1, 40), (2, 20)],
                 9, True, 2, {"block_m": 16})]


def _check_levels(rng, b, u, shared, kh, d, layers):
  """(levels as NumPy (k, v, lengths, owner) at their own layer, stacked k/v per level or None,
  the layer index): random owners (non-contiguous), ragged lengths, an empty node."""
  levels_np = []
  for n, s in shared + [(b, u)]:
    per_seq = len(levels_np) == len(shared)
    lengths = rng.integers(0, s + 1, size=n)
    lengths[0] = s
    if per_seq:
      lengths[min(1, b - 1)] = 0
    elif n > 2:
      lengths[1] = 0                       # an empty node
    owner = None
    if not per_seq:
      owner = rng.integers(0, n, size=b)
      owner[-1] = n - 1 if n > 2 else owner[-1]
      owner = owner.astype(np.int32)
    levels_np.append((rng.standard_normal((n, s, kh, d)), rng.standard_normal((n, s, kh, d)),
                      lengths.astype(np.int32), owner))
  if not layers:
    return levels_np, None, None
  layer = int(rng.integers(0, layers))
  stacks = []
  for k, v, _, _ in levels_np:
    sk, sv = (rng.standard_normal((layers,) + k.shape) for _ in range(2))
    sk[layer], sv[layer] = k, v
    stacks.append((sk, sv))
  return levels_np, stacks, layer


def run_checks(rows):
  """Pallas variants vs the XLA backend on float32 copies; returns number of failures."""
  rng = np.random.default_rng(int(time.time()))
  tol = {jnp.bfloat16: 2e-2, jnp.float16: 4e-3, jnp.float32: 2e-5}
  cases = SMOKE_CHECKS if ARGS.smoke else CHECKS
  variants = ("pallas",) if ARGS.smoke else ("pallas", "pallas_fused", "pallas_mosaic")
  failures = 0
  if ARGS.check_cases:
    cases = [c for c in cases if c[0] in ARGS.check_cases.split(",")]
  for name, b, t, kh, g, d, dtype, shared, u, traced, layers, cfg in cases:
    try:
      h = kh * g
      q = rng.standard_normal((b, t, h, d))
      levels_np, stacks, layer = _check_levels(rng, b, u, shared, kh, d, layers)

      def lv(dt, owners, layer_dyn):
        out = []
        for i, (k, v, ln, own) in enumerate(levels_np):
          if stacks is not None:
            k, v = stacks[i]
          out.append(KVLevel(jnp.asarray(k, dt), jnp.asarray(v, dt), jnp.asarray(ln),
                             owners[i] if traced else own,
                             layer_dyn if stacks is not None else None))
        return out

      qd = jnp.asarray(q, dtype)
      owners = [None if x[3] is None else jnp.asarray(x[3]) for x in levels_np]
      for causal in (True,) if ARGS.smoke else (True, False):
        # float32 copies of the (rounded) inputs, plain levels, XLA backend.
        rq = jnp.asarray(qd, jnp.float32)
        rl = [KVLevel(jnp.asarray(jnp.asarray(k, dtype), jnp.float32),
                      jnp.asarray(jnp.asarray(v, dtype), jnp.float32), jnp.asarray(ln), own)
              for k, v, ln, own in levels_np]
        ro, rlse = (np.asarray(x) for x in hydragen_attention(rq, rl, causal_last=causal,
                                                               backend="xla"))
        for variant in variants:
          extra = {"lowering": "mosaic"} if variant == "pallas_mosaic" else {}
          if variant == "pallas_mosaic" and (dtype == jnp.float32 or d not in (64, 128)):
            continue
          backend = pg.configure(poison=True, **cfg, **extra)
          if variant == "pallas_fused":
            fn = jax.jit(lambda q, ow, ly: pg.hydragen_attention_fused(
                q, lv(dtype, ow, ly), causal_last=causal, backend=backend))
          else:
            fn = jax.jit(lambda q, ow, ly: hydragen_attention(
                q, lv(dtype, ow, ly), causal_last=causal, backend=backend))
          out, lse = fn(qd, owners, jnp.int32(layer or 0))
          out = np.asarray(out.astype(jnp.float32))
          lse = np.asarray(lse)
          fin = np.isfinite(rlse)
          nan = bool(np.isnan(out).any() or np.isnan(lse).any())
          pattern = bool(np.array_equal(np.isfinite(lse), fin))
          empty_zero = bool(np.all(out[~fin] == 0))
          e_out = _rel(out, ro)
          e_lse = float(np.max(np.abs(lse[fin] - rlse[fin]))) if fin.any() else 0.0
          ok = (not nan and pattern and empty_zero and e_out < tol[dtype]
                and e_lse < 10 * tol[dtype])
          failures += not ok
          rows.append(dict(case=name, variant=variant, causal=causal, dtype=jnp.dtype(dtype).name,
                           traced=traced, layers=layers, rel_err_out=e_out,
                           max_abs_err_lse=e_lse, nan=nan, lse_pattern_ok=pattern,
                           empty_rows_zero=empty_zero, ok=ok, empty_rows=int((~fin).sum())))
          log(f"check {name:>26} {variant:>13} causal={causal!s:5} rel_err={e_out:.2e} "
              f"lse_err={e_lse:.2e} nan={nan} {'PASS' if ok else 'FAIL'}")
    except Exception as e:
      failures += 1
      rows.append(dict(case=name, variant="all", ok=False, error=repr(e)[:300]))
      log(f"check {name} FAILED with {repr(e)[:300]}")
      traceback.print_exc()
  if jax.default_backend() != "gpu":
    return failures
  # The cuDNN baseline computes the same function (sanity of the comparison).
  try:
    case = make_case(jax.random.key(7), 8, 1024, 128, 32, 8, 128)
    q, kp, vp, ks, vs = case
    ours = decode_fns(8, 1024, 128, pg.configure())["xla"](*case, *plan_inputs(case),
                                                           jnp.int32(0))
    cud = CUDNN(q, *replicated(kp[0], vp[0], ks[0], vs[0]))
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
# wide = (block_n, num_stages); warps = M/32 (4..8); max_block_m caps M. (3 Mosaic stages of
# 128 keys overflow a CTA's shared memory at D = 128: `mosaic_gpu.smem_bytes`.)
SWEEP_SHARED = [
    {"wide": (64, 3)}, {"wide": (64, 4)},
    {"lowering": "mosaic", "mosaic": {"block_kv": 128, "stages": 2}},
    {"lowering": "mosaic", "mosaic": {"block_kv": 64, "stages": 4}},
    {"lowering": "mosaic", "mosaic": {"block_kv": 64, "stages": 3}}]
SWEEP_SUFFIX = [{"narrow": c} for c in [(64, 4, 2), (64, 2, 3), (32, 4, 3), (128, 4, 2)]]


def level_fn(kind, b, s, config):
  owner = np.zeros((b,), np.int32) if kind == "shared" else None
  lengths = jnp.full((1 if kind == "shared" else b,), s, jnp.int32)
  lim = jnp.full((b, 1), s, jnp.int32)
  return lambda q, k, v: pg.level_attention(q, k, v, lengths, owner, lim, scale=0.088,
                                            config=config)


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
        fn = jax.jit(level_fn(kind, b, s, dataclasses.replace(BASE_CONFIG, **cfg)))
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


def summary(rows, engine, checks_failed):
  """Prints, per decode shape: the floor, pallas back to back and device time, its attention
  time per layer inside an engine decode step and the ratio of that to the device time, % of
  the floor (device time), the other implementations' device times and the speedups; then
  traced vs static owners on trees; then the check result."""
  nan = float("nan")
  by, trees = {}, {}
  for r in rows:
    if "us" in r:
      (trees if r["shape"].startswith("tree") else by).setdefault(r["shape"], {})[r["impl"]] = r
  impls = [i for i in ("pallas_triton", "pallas_fused", "xla", "cudnn")
           if any(i in d for d in by.values())]
  print("\nshape | floor us | pallas b2b us | pallas device us | in engine us/layer | "
        "engine / device | pallas % floor | " + " | ".join(f"{i} device us" for i in impls)
        + " | vs cudnn | vs xla")
  for shape, d in by.items():
    any_row = next(iter(d.values()))
    fl = any_row.get("floor_torch_us", nan)
    dev = lambda k: d[k]["device_us"] if k in d else nan
    b2b = d["pallas"]["us"] if "pallas" in d else nan
    eng = engine.get((any_row["P"], any_row["B"]), nan)
    print(f"{shape} | {fl:.1f} | {b2b:.1f} | {dev('pallas'):.1f} | {eng:.1f} | "
          f"{eng / dev('pallas'):.2f} | {100 * fl / dev('pallas'):.0f}% | "
          + " | ".join(f"{dev(i):.1f}" for i in impls)
          + f" | {dev('cudnn') / dev('pallas'):.1f}x | {dev('xla') / dev('pallas'):.1f}x")
  if trees:
    print("\ntree (back to back) | pallas static us | pallas traced us | traced / static | "
          "xla static us | xla traced us | traced / static")
    for shape, d in trees.items():
      g = lambda k: d[k]["us"] if k in d else nan
      print(f"{shape} | {g('pallas_static'):.1f} | {g('pallas_traced'):.1f} | "
            f"{g('pallas_traced') / g('pallas_static'):.2f} | {g('xla_static'):.1f} | "
            f"{g('xla_traced'):.1f} | {g('xla_traced') / g('xla_static'):.2f}")
  if checks_failed is not None:
    print(f"\ncheck: {checks_failed} failures" + (" (see check.csv)" if checks_failed else ""))


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


DECODE = [(p, b) for p in (1024, 4096, 16384) for b in (16, 64, 256, 1024)]
ENGINE_FIRST = [(16384, 1024), (16384, 256), (1024, 1024)]     # the three points
TREES = [(256, 2048, 16, 1024, 128), (1024, 2048, 64, 1024, 128)]  # B, P, problems, S, U


def main(argv=None):
  global ARGS, BASE_CONFIG, T0
  # The budget is the run's, not the interpreter's: main() called in a process that imported
  # this module long before (a test worker) must not find its budget already spent.
  T0 = time.time()
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  for flag in ("check", "ceilings", "sweep", "mgpu", "kernel", "decode", "micro", "trees",
               "engine", "smoke"):
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
  ap.add_argument("--loop", type=int, default=20, help="dependent calls per device-time loop")
  ap.add_argument("--loop_unroll", action=argparse.BooleanOptionalAction, default=True,
                  help="the device-time loop's calls unrolled (no while loop around them; "
                  "the H200 timed a rolled loop 8-14 us a call slower at 25-60 us ops: "
                  "experiments/results/fused_h200/run8)")
  ap.add_argument("--outer", type=int, default=7, help="timed repetitions (median)")
  ap.add_argument("--engine-layers", type=int, default=4,
                  help="layers of the llama3-8b-shaped model of the engine steps")
  ap.add_argument("--engine-new-tokens", type=int, default=16)
  ap.add_argument("--engine-shapes", default="",
                  help="PxB list (default: the issue's three points, then the decode table)")
  ap.add_argument("--engine-backend", default="pallas")
  ap.add_argument("--decode-shapes", default="",
                  help="PxB list for --decode (default: every shape of the decode table)")
  ap.add_argument("--tree-impls", default="pallas,xla")
  ARGS = ap.parse_args(argv)
  if ARGS.plot:
    plot(ARGS.plot, os.path.splitext(ARGS.plot)[0] + ".png")
    print(markdown(ARGS.plot))
    return
  os.makedirs(ARGS.out, exist_ok=True)
  log("jax", jax.__version__, jax.devices())
  cfg_over = json.loads(ARGS.config)
  ceil = {}
  results, sweep_rows, check_rows = [], [], []
  fails = None
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
      cfg_over.setdefault(name, c)
    log("tables run with config", cfg_over)
  if ARGS.mgpu:
    run_mgpu(sweep_rows)
    write_csv(os.path.join(ARGS.out, "sweep.csv"), sweep_rows)
  if ARGS.kernel:
    run_kernel_only(sweep_rows)
    write_csv(os.path.join(ARGS.out, "sweep.csv"), sweep_rows)
  impls = ARGS.impls.split(",")
  backend = pg.configure(**cfg_over)
  BASE_CONFIG = backend.config
  save = lambda: write_csv(os.path.join(ARGS.out, "results.csv"), results)
  # Smoke mode (CPU, interpret mode: tests the script's logic in seconds): tiny shapes.
  heads = (4, 2, 64) if ARGS.smoke else (32, 8, 128)
  decode = [(64, 4)] if ARGS.smoke else DECODE
  if ARGS.decode_shapes:
    decode = [tuple(int(x) for x in ps.split("x")) for ps in ARGS.decode_shapes.split(",")]
  if ARGS.decode:
    for p, b in decode:
      time_shape(f"decode_P{p}_B{b}" if ARGS.smoke else f"decode_P{p // 1024}K_B{b}", b, p,
                 8 if ARGS.smoke else 128, *heads, ceil, impls, results, backend)
      save()
  if ARGS.trees:
    time_trees(results, backend, [(6, 32, 2, 16, 8)] if ARGS.smoke else TREES, heads)
    save()
  engine = {}
  if ARGS.engine:
    if ARGS.engine_shapes:
      shapes = [tuple(int(x) for x in ps.split("x")) for ps in ARGS.engine_shapes.split(",")]
    else:
      shapes = decode if ARGS.smoke else ENGINE_FIRST + [x for x in DECODE
                                                         if x not in ENGINE_FIRST]
    engine = engine_steps(results, shapes, ARGS.engine_layers, ARGS.engine_backend,
                          ARGS.engine_new_tokens)
    for row in results:
      if row["shape"].startswith("decode") and (row["P"], row["B"]) in engine:
        row["engine_us_per_layer"] = engine[(row["P"], row["B"])]
    save()
  if ARGS.micro:
    for b, p in ((512, 1024), (1024, 2048), (2048, 4096), (4096, 8192)):
      for u in [int(x) for x in ARGS.micro_suffixes.split(",")]:
        time_shape(f"micro_B{b}_P{p//1024}K_U{u}", b, p, u, 8, 1, 128, ceil, impls, results,
                   backend)
        save()
  save()
  with open(os.path.join(ARGS.out, "summary.json"), "w") as f:
    json.dump({"check_failures": fails, "config": repr(backend.config),
               "engine_us_per_layer": {f"{p}x{b}": v for (p, b), v in engine.items()},
               "engine_layers": ARGS.engine_layers, "jax": jax.__version__,
               "device": str(jax.devices()[0].device_kind)}, f, indent=1)
  summary(results, engine, fails)
  log("done")
  return results, engine, fails


if __name__ == "__main__":
  main()
