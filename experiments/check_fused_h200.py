"""H200 check of the fused Triton decode kernel (issue 16): exactness, timing against peers,
the cost rule's crossover. Self-checking, one invocation, <= 4 minutes including compiles.

Axis letters: B sequences, T queries per sequence, H query heads, K KV heads, D head dim,
P shared-prefix length, U per-sequence suffix length, L layers of a stacked cache.

    python3 experiments/check_fused_h200.py --out $OUT          (H200: jax 0.11.2, triton
                                                                 3.6, torch, jax-triton)
    python3 experiments/check_fused_h200.py --smoke --out DIR   (CPU: tiny shapes, seconds)

(a) Exactness: random deep trees (2-3 levels, ragged lengths with empty nodes and sequences,
    GQA 1/4/8, D 128, bf16 and fp32, traced owners, caches stacked [L,...] read at a traced
    layer, NaN stored past every length in keys and values) through backend "fused" (cost rule,
    forced shared, forced per-sequence, forced key splits) against the XLA backend on float32
    copies with the NaN zeroed. Relative error per case; NaN or error > tolerance fails.
(b) Timing at decode shapes (T=1, H=32, K=8, D=128, bf16, U=128; P in 1K/4K/16K/32K x B in
    16/64/256/1024, FlashInfer's blog shape 32K/256 among them): fused (shared and
    per-sequence modes; "fused" is the one the cost rule picks), the `pallas` backend, the XLA
    backend, cuDNN with the prefix copied (jax.nn.dot_product_attention(implementation=
    "cudnn")), torch SDPA with the prefix copied, FlashInfer's MultiLevelCascadeAttentionWrapper
    and tokamax if importable (else the exact failure is printed). Each: back to back (`us`)
    and device time (`device_us`: an in-jit loop of dependent calls; for torch and FlashInfer
    a CUDA graph of calls with one dependent kernel each, `peers.torch_times`),
    the roofline floor (every level's keys read once / 4.22 TB/s vs flops / 805 TFLOP/s) and %
    of it. Every (shape, implementation) runs in try/except: one failure loses nothing else.
(c) Crossover: per shape, fused shared vs fused per-sequence device time against the bytes
    sharing saves; the smallest saving where sharing wins is the value for
    fused_worklist.SHARING_CROSSOVER_BYTES.
Writes OUT/fused_check.csv, OUT/fused_timing.csv, OUT/fused_summary.json; the table prints last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")   # torch shares the GPU
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments import bench_attention as ba  # noqa: E402
from experiments import peers as pe  # noqa: E402
from hydrax.attention import KVLevel, backends, hydragen_attention, prepare  # noqa: E402
from hydrax.attention.kernels import fused_triton as ft  # noqa: E402
from hydrax.attention.kernels import pallas_gpu as pg  # noqa: E402
from hydrax.attention.kernels import fused_worklist as wl  # noqa: E402

T0 = time.time()               # reset by main()
ARGS = None


def log(*a):
  print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def left() -> float:
  return ARGS.budget - (time.time() - T0)


def err_line(e: BaseException) -> str:
  return f"{type(e).__name__}: {str(e).splitlines()[0][:240] if str(e) else ''}"


# --- (a) exactness ---------------------------------------------------------------------------

# name, B, T, K, G, dtype, shared levels [(N, S)], U, layers, fused config changes
CHECKS = [   # most telling first: the budget may cut the tail (skipped, not failed)
    ("tree3_bf16_gqa4_auto", 67, 1, 8, 4, "bfloat16", [(1, 1500), (7, 300)], 130, 3, {}),
    ("tree3_f32_gqa1_splits3", 33, 1, 8, 1, "float32", [(1, 700), (5, 200)], 64, 2,
     {"mode": "shared", "splits": 3}),
    ("tree3_bf16_gqa8_per_seq", 40, 1, 4, 8, "bfloat16", [(1, 900), (5, 200)], 64, 2,
     {"mode": "per_sequence"}),
    ("tree2_bf16_gqa4_B256_4K", 256, 1, 8, 4, "bfloat16", [(1, 4096)], 128, 2,
     {"mode": "shared"}),
    ("tree3_bf16_gqa4_shared", 67, 1, 8, 4, "bfloat16", [(1, 1500), (7, 300)], 130, 3,
     {"mode": "shared"}),
    ("tree3_bf16_B1024_per_seq", 1024, 1, 8, 4, "bfloat16", [(1, 1024), (16, 256)], 128, 2,
     {"mode": "per_sequence"}),
    ("tree2_f32_gqa4_T3", 9, 3, 2, 4, "float32", [(3, 333)], 45, 2, {"mode": "shared"}),
    # The pallas backend's small-shape path (kernels/path_gpu.py), forced on.
    ("path_tree3_bf16_gqa4", 67, 1, 8, 4, "bfloat16", [(1, 1500), (7, 300)], 130, 3,
     {"backend": "pallas", "path": "always"}),
    ("path_tree3_f32_gqa1_splits3", 33, 1, 8, 1, "float32", [(1, 700), (5, 200)], 64, 2,
     {"backend": "pallas", "path": "always", "splits": 3}),
    ("path_tree2_f32_gqa4_T3", 9, 3, 2, 4, "float32", [(3, 333)], 45, 2,
     {"backend": "pallas", "path": "always"}),
    ("path_tree3_bf16_gqa8_B16", 16, 1, 4, 8, "bfloat16", [(1, 1024), (4, 100)], 128, 2,
     {"backend": "pallas", "path": "always"}),
    # The pallas backend's grouped levels merged once in packed rows (finish "once": the
    # root's Mosaic GPU kernel on Hopper, the other levels' Triton kernel, every level in the
    # order of the one with owners over several nodes), and the per-sequence level on its own
    # GPU stream.
    ("grouped_tree3_bf16_gqa4", 67, 1, 8, 4, "bfloat16", [(1, 1500), (7, 300)], 130, 3,
     {"backend": "pallas", "path": "off"}),
    ("grouped_tree2_bf16_gqa4_B256_4K_stream", 256, 1, 8, 4, "bfloat16", [(1, 4096)], 128, 2,
     {"backend": "pallas", "path": "off", "level_stream": 1}),
    ("grouped_tree3_f32_gqa1_T3", 33, 3, 8, 1, "float32", [(1, 700), (5, 200)], 64, 2,
     {"backend": "pallas", "path": "off"}),
    ("grouped_tree3_bf16_gqa8_stream", 40, 1, 4, 8, "bfloat16", [(1, 900), (5, 200)], 64, 2,
     {"backend": "pallas", "path": "off", "level_stream": 1}),
    # The per-sequence level folded into a shared level's Mosaic GPU launch
    # (`MosaicConfig.fold_suffix`): a three-level tree (into the one-node root, the 7 nodes
    # of the middle level, whose traced owners fix the row order, on the Triton kernel); a
    # one-node root; five nodes with traced owners and an odd batch (tiles with padding
    # rows, a suffix of three half blocks); two queries a sequence.
    ("grouped_fold_tree3_bf16_gqa4", 67, 1, 8, 4, "bfloat16", [(1, 1500), (7, 300)], 128, 3,
     {"backend": "pallas", "path": "off", "mosaic": {"fold_suffix": True}}),
    ("grouped_fold_tree2_bf16_gqa4_B256_4K", 256, 1, 8, 4, "bfloat16", [(1, 4096)], 128, 2,
     {"backend": "pallas", "path": "off", "mosaic": {"fold_suffix": True}}),
    ("grouped_fold_tree2_bf16_gqa4_N5", 67, 1, 8, 4, "bfloat16", [(5, 700)], 192, 3,
     {"backend": "pallas", "path": "off", "lowering": "mosaic", "mosaic": {"fold_suffix": True}}),
    ("grouped_fold_tree2_bf16_gqa2_T2", 33, 2, 8, 2, "bfloat16", [(3, 333)], 64, 2,
     {"backend": "pallas", "path": "off", "lowering": "mosaic", "mosaic": {"fold_suffix": True}}),
    # The fold's suffix steps as transposed products (`MosaicConfig.suffix_transposed`), at 4
    # rows a sequence (G = 4), 8 (G = 8) and 16 (T = 4, G = 4: the most they take). (Run 14's
    # call 1 ran the cases above with them on, the default then, and these with 8 and 16
    # rows, before its budget cut the last.)
    ("grouped_fold_transposed_tree2_bf16_gqa4_N5", 67, 1, 8, 4, "bfloat16", [(5, 700)], 192,
     3, {"backend": "pallas", "path": "off", "lowering": "mosaic",
         "mosaic": {"fold_suffix": True, "suffix_transposed": True}}),
    ("grouped_fold_transposed_tree2_bf16_gqa8_N5", 67, 1, 4, 8, "bfloat16", [(5, 700)], 192,
     3, {"backend": "pallas", "path": "off", "lowering": "mosaic",
         "mosaic": {"fold_suffix": True, "suffix_transposed": True}}),
    ("grouped_fold_transposed_tree2_bf16_gqa4_T4", 33, 4, 8, 4, "bfloat16", [(3, 333)], 128, 2,
     {"backend": "pallas", "path": "off", "lowering": "mosaic",
      "mosaic": {"fold_suffix": True, "suffix_transposed": True}}),
    # The unmasked node steps software-pipelined (`MosaicConfig.node_overlap`): a one-node
    # root of 16K with the suffix folded, five nodes with traced owners, a three-level tree
    # (its root on the Mosaic kernel unfolded: a suffix capacity of 130 is no whole number
    # of 64-key halves), and two queries a sequence.
    ("grouped_overlap_fold_tree2_bf16_gqa4_B256_16K", 256, 1, 8, 4, "bfloat16",
     [(1, 16384)], 128, 2, {"backend": "pallas", "path": "off",
                            "mosaic": {"fold_suffix": True, "node_overlap": True}}),
    ("grouped_overlap_fold_tree2_bf16_gqa4_N5", 67, 1, 8, 4, "bfloat16", [(5, 700)], 192, 3,
     {"backend": "pallas", "path": "off", "lowering": "mosaic",
      "mosaic": {"fold_suffix": True, "node_overlap": True}}),
    ("grouped_overlap_tree3_bf16_gqa4", 67, 1, 8, 4, "bfloat16", [(1, 1500), (7, 300)], 130, 3,
     {"backend": "pallas", "path": "off", "mosaic": {"node_overlap": True}}),
    ("grouped_overlap_fold_tree2_bf16_gqa2_T2", 33, 2, 8, 2, "bfloat16", [(3, 333)], 64, 2,
     {"backend": "pallas", "path": "off", "lowering": "mosaic",
      "mosaic": {"fold_suffix": True, "node_overlap": True}}),
    # The same with the suffix steps staggered between CTAs (`MosaicConfig.suffix_stagger`),
    # and a one-node root of 16K (node steps before a staggered CTA's first suffix step).
    ("grouped_fold_tree2_bf16_gqa4_N5_stagger", 67, 1, 8, 4, "bfloat16", [(5, 700)], 192, 3,
     {"backend": "pallas", "path": "off", "lowering": "mosaic",
      "mosaic": {"fold_suffix": True, "suffix_stagger": True}}),
    ("grouped_fold_tree2_bf16_gqa4_B256_16K_stagger", 256, 1, 8, 4, "bfloat16", [(1, 16384)],
     128, 2, {"backend": "pallas", "path": "off",
              "mosaic": {"fold_suffix": True, "suffix_stagger": True}}),
    # `stages` node steps before the first suffix step (`MosaicConfig.suffix_lead` None; the
    # default, 0, starts on the suffixes).
    ("grouped_fold_tree2_bf16_gqa4_N5_lead", 67, 1, 8, 4, "bfloat16", [(5, 700)], 192, 3,
     {"backend": "pallas", "path": "off", "lowering": "mosaic",
      "mosaic": {"fold_suffix": True, "suffix_lead": None}}),
    # q read and out written in place by the Mosaic GPU kernel (`MosaicConfig.q_in_place`): a
    # one-node root of 16K with the suffix folded (the engine's decode); the same root
    # unfolded (a suffix capacity of 130: the per-sequence level on Triton, packed, merged
    # with the root's in-place part); two queries a sequence at G = 2; G = 8; a three-level
    # tree, whose middle level fixes the rows' order (so the root reads q packed, logged).
    ("grouped_inplace_fold_tree2_bf16_gqa4_B256_16K", 256, 1, 8, 4, "bfloat16",
     [(1, 16384)], 128, 2, {"backend": "pallas", "path": "off",
                            "mosaic": {"fold_suffix": True, "q_in_place": True}}),
    ("grouped_inplace_tree2_bf16_gqa4_B256_4K", 256, 1, 8, 4, "bfloat16", [(1, 4096)], 130, 2,
     {"backend": "pallas", "path": "off", "mosaic": {"q_in_place": True}}),
    ("grouped_inplace_fold_tree2_bf16_gqa2_T2", 64, 2, 8, 2, "bfloat16", [(1, 1000)], 64, 2,
     {"backend": "pallas", "path": "off", "lowering": "mosaic",
      "mosaic": {"fold_suffix": True, "q_in_place": True}}),
    ("grouped_inplace_fold_tree2_bf16_gqa8_B32", 32, 1, 4, 8, "bfloat16", [(1, 3000)], 192, 2,
     {"backend": "pallas", "path": "off", "lowering": "mosaic",
      "mosaic": {"fold_suffix": True, "q_in_place": True}}),
    ("grouped_inplace_fold_tree3_bf16_gqa4", 67, 1, 8, 4, "bfloat16", [(1, 1500), (7, 300)],
     128, 3, {"backend": "pallas", "path": "off",
              "mosaic": {"fold_suffix": True, "q_in_place": True}}),
    # The folded suffix on a fourth warpgroup, per thread (`MosaicConfig.suffix_warpgroup`):
    # a one-node root of 16K (the engine's decode), the same at 4K with q in place, five nodes
    # with traced owners and an odd batch (padding rows, three 64-key halves of suffix), two
    # queries a sequence at G = 2 (4 rows), G = 8 with q in place (8 rows), G = 1 (1 row).
    ("grouped_swg_fold_tree2_bf16_gqa4_B256_16K", 256, 1, 8, 4, "bfloat16", [(1, 16384)],
     128, 2, {"backend": "pallas", "path": "off",
              "mosaic": {"fold_suffix": True, "suffix_warpgroup": True}}),
    ("grouped_swg_inplace_fold_tree2_bf16_gqa4_B256_4K", 256, 1, 8, 4, "bfloat16",
     [(1, 4096)], 128, 2, {"backend": "pallas", "path": "off", "mosaic": {
         "fold_suffix": True, "suffix_warpgroup": True, "q_in_place": True}}),
    ("grouped_swg_fold_tree2_bf16_gqa4_N5", 67, 1, 8, 4, "bfloat16", [(5, 700)], 192, 3,
     {"backend": "pallas", "path": "off", "lowering": "mosaic",
      "mosaic": {"fold_suffix": True, "suffix_warpgroup": True}}),
    ("grouped_swg_fold_tree2_bf16_gqa2_T2", 33, 2, 8, 2, "bfloat16", [(3, 333)], 64, 2,
     {"backend": "pallas", "path": "off", "lowering": "mosaic",
      "mosaic": {"fold_suffix": True, "suffix_warpgroup": True}}),
    ("grouped_swg_inplace_fold_tree2_bf16_gqa8_B32", 32, 1, 4, 8, "bfloat16", [(1, 3000)],
     192, 2, {"backend": "pallas", "path": "off", "lowering": "mosaic", "mosaic": {
         "fold_suffix": True, "suffix_warpgroup": True, "q_in_place": True}}),
    ("grouped_swg_fold_tree2_bf16_gqa1_B128", 128, 1, 8, 1, "bfloat16", [(1, 2000)], 128, 2,
     {"backend": "pallas", "path": "off", "lowering": "mosaic",
      "mosaic": {"fold_suffix": True, "suffix_warpgroup": True}}),
]
SMOKE_CHECKS = [("smoke_tree3_f32", 3, 1, 1, 2, "float32", [(1, 40), (2, 20)], 9, 2,
                 {"mode": "shared", "splits": 2}),
                ("smoke_path_tree3_f32", 3, 1, 1, 2, "float32", [(1, 40), (2, 20)], 9, 2,
                 {"backend": "pallas", "path": "always", "splits": 2}),
                ("smoke_grouped_tree3_f32", 3, 1, 1, 2, "float32", [(1, 40), (2, 20)], 9, 2,
                 {"backend": "pallas", "path": "off", "level_stream": 1})]
TOL = {"bfloat16": 2e-2, "float32": 1e-4}


def _tree(rng, b, kh, d, shared, u, layers, dtype):
  """NumPy levels (k, v, lengths, owner) with NaN past every length, stacked [L,...] copies
  (the level at `layer`), and the layer."""
  levels_np, stacks, layer = ba._check_levels(rng, b, u, shared, kh, d, layers)
  poisoned = []
  for (k, v, n, o), (sk, sv) in zip(levels_np, stacks):
    k, v = k.copy(), v.copy()
    for j, length in enumerate(n):
      k[j, length:] = np.nan
      v[j, length:] = np.nan
    sk[layer], sv[layer] = k, v
    poisoned.append((k, v, n, o))
  return poisoned, [(sk.astype(dtype), sv.astype(dtype)) for sk, sv in stacks], layer


def run_checks(cases, d=128):
  rows, fails = [], 0
  rng = np.random.default_rng(int(time.time()) % 100000)
  for name, b, t, kh, g, dtype, shared, u, layers, cfg in cases:
    if ARGS.checks and not any(name.startswith(x) for x in ARGS.checks.split(",")):
      continue
    if left() < ARGS.timing_reserve:
      log("budget: skipping check", name)
      rows.append(dict(case=name, ok=None, error="skipped (budget)"))
      continue
    try:
      levels_np, stacks, layer = _tree(rng, b, kh, d, shared, u, layers, np.dtype(dtype)
                                       if dtype == "float32" else jnp.bfloat16)
      q = rng.standard_normal((b, t, kh * g, d)).astype(np.float32)
      cfg = dict(cfg)
      kind = cfg.pop("backend", "fused")
      backend = backends.get(kind, **cfg, **(ARGS.fused_extra if kind == "fused" else {}))

      def fused_fn(q, stacks, owners, lengths, layer):
        lv = [KVLevel(sk, sv, n, o, layer) for (sk, sv), o, n in zip(stacks, owners, lengths)]
        prep = None
        if ARGS.prepared:        # (the engine's form: prepared at layer 0, run at `layer`)
          prep = prepare(q, [x._replace(layer=0) for x in lv], backend=backend)
        return hydragen_attention(q, lv, backend=backend, prepared=prep)

      owners = [None if o is None else jnp.asarray(o) for *_, o in levels_np]
      lengths = [jnp.asarray(n) for _, _, n, _ in levels_np]
      qd = jnp.asarray(q).astype(dtype)
      # Mosaic GPU launches traced: whether each folds a suffix ("warpgroup": on the suffix
      # warpgroup)
      folds = []
      real_tile = pg.mosaic_gpu.tile_attention

      def spy_tile(*a, **kw):
        folded = kw.get("suffix") is not None
        folds.append("warpgroup" if folded and kw.get("suffix_warpgroup") else folded)
        return real_tile(*a, **kw)

      pg.mosaic_gpu.tile_attention = spy_tile
      pg.clear_jit_caches()       # (so that the launches are traced again, and seen)
      try:
        out, lse = jax.jit(fused_fn)(qd, [(jnp.asarray(a), jnp.asarray(c)) for a, c in stacks],
                                     owners, lengths, jnp.int32(layer))
      finally:
        pg.mosaic_gpu.tile_attention = real_tile
      # A fold case must have run as one launch with the suffix folded in (on the suffix
      # warpgroup when asked).
      mcfg = cfg.get("mosaic", {})
      want = "warpgroup" if mcfg.get("suffix_warpgroup") else True
      fold_ok = folds == [want] if mcfg.get("fold_suffix") else True
      # Reference: the XLA backend on float32 copies of the same (rounded) inputs, the NaN
      # past lengths zeroed.
      ref_levels = [KVLevel(jnp.asarray(np.nan_to_num(np.asarray(sk[layer], np.float32))),
                            jnp.asarray(np.nan_to_num(np.asarray(sv[layer], np.float32))),
                            jnp.asarray(n), None if o is None else np.asarray(o))
                    for (sk, sv), (_, _, n, o) in zip(stacks, levels_np)]
      with jax.default_matmul_precision("highest"):
        ref_out, ref_lse = hydragen_attention(qd.astype(jnp.float32), ref_levels,
                                              backend="xla")
      out, lse = np.asarray(out, np.float64), np.asarray(lse, np.float64)
      ref_out, ref_lse = np.asarray(ref_out, np.float64), np.asarray(ref_lse, np.float64)
      empty = np.isneginf(ref_lse)
      nan = bool(np.isnan(out).any() or np.isnan(lse).any())
      rel = ba._rel(out, ref_out)
      lse_err = float(np.abs(np.where(empty, 0, lse - np.where(empty, 0, ref_lse))).max())
      empty_ok = bool((np.isneginf(lse) == empty).all() and (out[empty] == 0).all())
      ok = (not nan) and rel <= TOL[dtype] and lse_err <= 10 * TOL[dtype] and empty_ok and fold_ok
      rows.append(dict(case=name, B=b, T=t, K=kh, G=g, dtype=dtype, levels=len(shared) + 1,
                       layers=layers, config=json.dumps(cfg), rel_err=rel, lse_abs_err=lse_err,
                       nan=nan, empty_rows=int(empty.sum()), empty_ok=empty_ok,
                       mosaic_launches=folds, ok=ok))
      fails += not ok
      log(f"check {name:28s} rel err {rel:.2e} lse err {lse_err:.2e} nan={nan} "
          f"empty rows {int(empty.sum())} ok={empty_ok} mosaic {folds} "
          f"-> {'ok' if ok else 'FAIL'}")
    except Exception as e:
      fails += 1
      rows.append(dict(case=name, ok=False, error=err_line(e)))
      log(f"check {name} FAILED {err_line(e)}")
      traceback.print_exc(limit=3)
  return rows, fails


# --- (b) timing ------------------------------------------------------------------------------

def _levels(b, p, u, kp, vp, ks, vs, layer, lp=None, ls=None, owner=None):
  """The decode call's levels: one prefix of P keys shared by all B sequences, suffixes of
  U. The lengths and the owners are the call's inputs when given (`ba.plan_inputs`), as the
  engine passes them: built here as constants, XLA writes each with a kernel every call
  (1.6-1.7 us on the H200, run 9's profiles)."""
  owner = np.zeros((b,), np.int32) if owner is None else owner
  lp = jnp.full((1,), p, jnp.int32) if lp is None else lp
  ls = jnp.full((b,), u, jnp.int32) if ls is None else ls
  return [KVLevel(kp, vp, lp, owner, layer), KVLevel(ks, vs, ls, None, layer)]


def hydrax_fn(b, p, u, backend):
  """jit of fn(q, kp, vp, ks, vs, lp, ls, owner, layer) -> out (`ba.plan_inputs` gives the
  three plan arrays)."""
  return jax.jit(lambda q, kp, vp, ks, vs, lp, ls, owner, layer: hydragen_attention(
      q, _levels(b, p, u, kp, vp, ks, vs, layer, lp, ls, owner), backend=backend)[0])


def hydrax_layers_fn(b, p, u, backend, layers: int, prepared: bool):
  """jit of step(q, kp, vp, ks, vs, lp, ls, owner) -> out, the engine's form of a decode
  step's attention: a `lax.scan` over `layers` layers of the stacked caches (layer i reads
  copy i), each layer's q the previous layer's output; with `prepared`, the levels' key
  limits and the backend's tables computed once before the scan (`hydrax.attention.prepare`,
  as `llama.forward` does), else in every layer."""
  from jax import lax

  def step(q, kp, vp, ks, vs, lp, ls, owner):
    prep = None
    if prepared:
      prep = prepare(q, _levels(b, p, u, kp, vp, ks, vs, 0, lp, ls, owner), backend=backend)

    def body(x, layer):
      out, _ = hydragen_attention(x, _levels(b, p, u, kp, vp, ks, vs, layer, lp, ls, owner),
                                  backend=backend, prepared=prep)
      return out.astype(x.dtype), None

    return lax.scan(body, q, jnp.arange(layers, dtype=jnp.int32))[0]

  return jax.jit(step)


def time_layers(shapes, h, kh, d, u, layers: int, rounds: int = 2):
  """Rows `pallas_scan` and `pallas_scan_prepared` (`hydrax_layers_fn` without and with
  `prepared`; the XLA backend in smoke mode) at every shape, interleaved A B A B over
  `rounds`: `us` the back-to-back time of a whole step / layers (one dispatch runs every layer,
  so this is close to device time), rel_err of the step's output against the XLA backend's."""
  rows = []
  bk = backends.get("pallas") if jax.default_backend() == "gpu" else backends.get("xla")
  for p, b in shapes:
    name = f"P{p}_B{b}"
    floor = wl.roofline_us((b, 1, h, d), kh, [(1, p), (b, u)], 2)
    base = dict(shape=name, B=b, P=p, U=u, H=h, K=kh, D=d, L=layers, floor_us=floor)
    if left() < 20:
      rows.append(dict(base, impl="pallas_scan", error="skipped (budget)"))
      continue
    try:
      case = _case(p + b, b, p, u, h, kh, d, layers)
      args = case + ba.plan_inputs(case)
      fns = {prep: hydrax_layers_fn(b, p, u, bk, layers, prep) for prep in (False, True)}
      with jax.default_matmul_precision("highest"):
        want = np.asarray(hydrax_layers_fn(b, p, u, "xla", layers, False)(*args), np.float64)
      errs = {prep: ba._rel(np.asarray(fn(*args), np.float64), want)
              for prep, fn in fns.items()}
      for r in range(rounds):
        for prep, fn in fns.items():
          t, _, _ = ba.bench(fn, [args])
          us = t * 1e6 / layers
          impl = "pallas_scan_prepared" if prep else "pallas_scan"
          rows.append(dict(base, impl=impl, round=r, us=us, pct_floor=100 * floor / us,
                           rel_err=errs[prep]))
          log(f"{name:>12} {impl:>20} round {r}: {us:8.1f} us a layer of {layers} "
              f"({100 * floor / us:.0f}% of floor {floor:.1f}; rel err {errs[prep]:.1e})")
      del case, args
    except Exception as e:
      rows.append(dict(base, impl="pallas_scan", error=err_line(e)))
      log(f"{name:>12} layers FAILED {err_line(e)}")
      traceback.print_exc(limit=4)
  return rows


def _on_case(fn, case):
  """fn with the case's plan inputs bound: g(q, kp, vp, ks, vs, layer), for direct calls."""
  plan = ba.plan_inputs(case)
  return lambda q, kp, vp, ks, vs, layer: fn(q, kp, vp, ks, vs, *plan, layer)


def _path_error(b, p, u, case, backend=None):
  """Relative error of the forced path kernel (or `backend`) against the XLA backend (layer 0
  of the case)."""
  backend = backend or backends.get("pallas", path="always")
  got = _on_case(hydrax_fn(b, p, u, backend), case)(*case, jnp.int32(0))
  with jax.default_matmul_precision("highest"):
    want = _on_case(hydrax_fn(b, p, u, "xla"), case)(*case, jnp.int32(0))
  return ba._rel(np.asarray(got, np.float64), np.asarray(want, np.float64))


def _time_jax(fn, case, rot):
  """(back-to-back us, device us) of fn(q, kp, vp, ks, vs, lp, ls, owner, layer) over
  rotating copies, the plan arrays passed as inputs (in the dependent loop too: closed
  over, they would be constants written by a kernel each call)."""
  args = case + ba.plan_inputs(case)
  t, _, _ = ba.bench(fn, [args + (jnp.int32(i),) for i in range(rot)])
  loop = ba.dependent_loop(lambda q, *r: fn(q, *r), ARGS.loop, ARGS.loop_unroll)
  td, _, _ = ba.bench(loop, [args], min_batch_s=0, outer=ARGS.outer)
  return t * 1e6, td / ARGS.loop * 1e6


def time_path_variants(shapes, h, kh, d, u, variants, force_path=True):
  """Rows of the pallas backend with each Config change in `variants` at every shape, the
  path kernel forced (`force_path`) or the backend's cost rule choosing, exactness (rel_err
  against XLA) included; GPU only, cut by the budget."""
  rows = []
  impl, label = ("pallas_path_variant", "path") if force_path else ("pallas_variant", "pallas")
  for cfg in variants:
    for p, b in shapes:
      name = f"P{p}_B{b}"
      base = dict(shape=name, impl=impl, variant=json.dumps(cfg), B=b, P=p, U=u)
      if left() < 20:
        rows.append(dict(base, error="skipped (budget)"))
        continue
      try:
        if jax.default_backend() != "gpu":
          raise RuntimeError("needs a GPU (interpret mode is not timed)")
        bk = backends.get("pallas", **({**cfg, "path": "always"} if force_path else cfg))
        # As many cache copies as the table's rows rotate (one copy stays in L2 at small
        # shapes: runs 6-8 timed the variants that way, faster than the table's rows).
        rot = _rotations(b, p, u, h, kh, d)
        case = _case(p + b, b, p, u, h, kh, d, rot)
        us, dev = _time_jax(hydrax_fn(b, p, u, bk), case, rot)
        err = _path_error(b, p, u, case, bk)
        rows.append(dict(base, us=us, device_us=dev, rel_err=err))
        log(f"{name:>12} {label} {json.dumps(cfg)}: {us:.1f} us b2b {dev:.1f} us device "
            f"(rel err {err:.1e})")
      except Exception as e:
        rows.append(dict(base, error=err_line(e)))
        log(f"{name:>12} {label} {json.dumps(cfg)} FAILED {err_line(e)}")
  return rows


def _rotations(b, p, u, h, kh, d) -> int:
  """Cache copies a decode call's timing rotates (`bench_attention.rotations` of the bytes
  one call reads and writes: bf16 keys and values of both levels, q and out)."""
  return ba.rotations(2 * (2 * p * kh * d + 2 * b * u * kh * d + 2 * b * h * d))


def _case(seed, b, p, u, h, kh, d, copies):
  """`bench_attention.make_case` (q, stacked prefix and suffix caches); in smoke mode from
  NumPy (a jax.random compile per shape costs seconds on a CPU, nothing on the GPU)."""
  if not ARGS.smoke:
    return ba.make_case(jax.random.key(seed), b, p, u, h, kh, d, copies=copies)
  rng = np.random.default_rng(seed)
  shapes = [(b, 1, h, d), (copies, 1, p, kh, d), (copies, 1, p, kh, d), (copies, b, u, kh, d),
            (copies, b, u, kh, d)]
  return tuple(jnp.asarray(rng.standard_normal(x), jnp.bfloat16) for x in shapes)


BROKEN = {}   # impl -> the error of its first failure: not retried (each retry recompiles)


def time_shapes(shapes, h, kh, d, u, impls):
  rows = []
  peers = {impl: pe.unavailable(impl) for impl in pe.PEERS}
  for name, why in peers.items():
    if why and name in impls:
      log(f"{name}: not importable here ({why}); its rows are skipped")
  on_gpu = jax.default_backend() == "gpu"
  fused_why = ft.unavailable_reason(ft.Config(**ARGS.fused_extra))
  if fused_why:
    log(f"fused: unavailable here ({fused_why}); its rows are skipped")
  for p, b in shapes:
    name = f"P{p}_B{b}"
    floor = wl.roofline_us((b, 1, h, d), kh, [(1, p), (b, u)], 2)
    shapes_ = [wl.LevelShape(1, p, True, np.zeros(b, np.int32)), wl.LevelShape(b, u, False)]
    saved = wl.sharing_saved_bytes((b, 1, h, d), shapes_, 2) * kh
    rule = wl.choose_mode((b, 1, h, d), shapes_, kh, 2)
    rot = _rotations(b, p, u, h, kh, d)
    case = _case(p + b, b, p, u, h, kh, d, rot)
    for impl in impls:
      base = dict(shape=name, impl=impl, B=b, P=p, U=u, H=h, K=kh, D=d, floor_us=floor,
                  saved_bytes=saved, rule=rule)
      if left() < 5:
        rows.append(dict(base, error="skipped (budget)"))
        continue
      if impl in BROKEN:
        rows.append(dict(base, error=f"skipped: failed before ({BROKEN[impl]})"))
        continue
      try:
        extra = {}
        if impl.startswith("fused"):
          if fused_why:
            raise RuntimeError(f"unavailable: {fused_why}")
          mode = {"fused_shared": "shared", "fused_per_seq": "per_sequence"}[impl]
          fn = hydrax_fn(b, p, u, backends.get("fused", mode=mode, **ARGS.fused_extra))
          us, dev = _time_jax(fn, case, rot)
        elif impl in ("pallas", "xla", "pallas_path", "pallas_grouped"):
          if impl != "xla" and not on_gpu:
            raise RuntimeError("needs a GPU (interpret mode is not timed)")
          # pallas: the backend's default (the cost rule picks the small-shape path or the
          # grouped levels); pallas_path / pallas_grouped: one of the two forced.
          bk = {"pallas_path": backends.get("pallas", path="always"),
                "pallas_grouped": backends.get("pallas", path="off")}.get(impl, impl)
          us, dev = _time_jax(hydrax_fn(b, p, u, bk), case, rot)
          if impl == "pallas_path":
            extra["rel_err"] = _path_error(b, p, u, case)
            extra["path_rule"] = pg.path_mode((b, 1, h, d), jnp.bfloat16, _levels(
                b, p, u, *case[1:], jnp.int32(0)), pg.Config())[0]
        elif impl == "cudnn":
          if not on_gpu:
            raise RuntimeError("needs a GPU")
          ba.check_copied_fits(b, p, u, kh, d)
          q, kp, vp, ks, vs = case
          k, v = ba.replicated(kp[0], vp[0], ks[0], vs[0])
          t, _, _ = ba.bench(ba.CUDNN, [(q, k, v)])
          loop = ba.dependent_loop(ba._cudnn_step, ARGS.loop, ARGS.loop_unroll)
          td, _, _ = ba.bench(loop, [(q, k[None], v[None])], min_batch_s=0, outer=ARGS.outer)
          us, dev = t * 1e6, td / ARGS.loop * 1e6
          del k, v
        elif impl in peers:
          timed = ba.time_peer(impl, b, p, u, h, kh, d, case, hydrax_fn(b, p, u, "xla"))
          us, dev = timed["us"], timed["device_us"]
          extra.update(rel_err=timed["rel_err"], device_timing=timed["device_timing"])
        else:
          raise ValueError(f"unknown impl {impl!r}")
        row = dict(base, us=us, device_us=dev, pct_floor=100 * floor / dev, **extra)
        rows.append(row)
        log(f"{name:>12} {impl:>13} {us:9.1f} us b2b {dev:9.1f} us device "
            f"({row['pct_floor']:.0f}% of floor {floor:.1f})")
      except Exception as e:
        rows.append(dict(base, error=err_line(e)))
        log(f"{name:>12} {impl:>13} FAILED {err_line(e)}")
        if not isinstance(e, MemoryError) and not any(
            x in str(e) for x in ("needs a GPU", "not importable", "unavailable")):
          BROKEN[impl] = err_line(e)[:120]
          traceback.print_exc(limit=4)
    del case
  # "fused" = what the cost rule picks (no extra compile: it is one of the two modes).
  by = {(r["shape"], r["impl"]): r for r in rows}
  for p, b in shapes:
    name = f"P{p}_B{b}"
    rule = by.get((name, "fused_shared"), {}).get("rule")
    pick = by.get((name, "fused_shared" if rule == "shared" else "fused_per_seq"))
    if pick and "device_us" in pick:
      rows.append(dict(pick, impl="fused"))
  return rows


def crossover(rows):
  """Smallest saving where shared beats per-sequence, largest where it loses, suggestion."""
  by = {}
  for r in rows:
    if "device_us" in r and r["impl"] in ("fused_shared", "fused_per_seq"):
      by.setdefault(r["shape"], {})[r["impl"]] = r
  wins, losses = [], []
  for d in by.values():
    if len(d) == 2:
      s = d["fused_shared"]
      (wins if s["device_us"] <= d["fused_per_seq"]["device_us"] else losses).append(
          s["saved_bytes"])
  res = {"shared_wins_at_saved_bytes": sorted(wins), "per_seq_wins_at_saved_bytes":
         sorted(losses), "current_bytes": wl.SHARING_CROSSOVER_BYTES}
  if wins:
    lo = max([x for x in losses if x < min(wins)], default=0)
    res["suggested_bytes"] = int(math.sqrt(max(lo, 1) * min(wins))) if lo else int(min(wins))
    res["consistent"] = all(x < min(wins) for x in losses)
  return res


def path_crossover(rows):
  """The pallas backend's cost rule against measurement: per shape the bytes sharing saves,
  the forced path and grouped device times, and a suggested `path_crossover_bytes` (between
  the largest saving where the path won and the smallest where the grouped levels won)."""
  by = {}
  for r in rows:
    if "device_us" in r and r["impl"] in ("pallas_path", "pallas_grouped"):
      by.setdefault(r["shape"], {})[r["impl"]] = r
  points = sorted((d["pallas_path"]["saved_bytes"], d["pallas_path"]["device_us"],
                   d["pallas_grouped"]["device_us"]) for d in by.values() if len(d) == 2)
  path_wins = [sv for sv, tp, tg in points if tp < tg]
  grouped_wins = [sv for sv, tp, tg in points if tp >= tg]
  res = {"points_saved_path_grouped_us": points, "current_bytes": pg.PATH_CROSSOVER_BYTES}
  if path_wins and grouped_wins:
    hi, lo = max(path_wins), min(grouped_wins)
    res["consistent"] = hi < lo
    res["suggested_bytes"] = int(math.sqrt(hi * lo)) if hi < lo else None
  return res


def variant_spread(rows):
  """Per shape and variant of the pallas backend (the table's `pallas` row as "default",
  each `--pallas-variants` entry by its JSON; an entry listed twice is timed twice, in list
  order, so A B A B interleaves them): the device times, their median and their spread
  (max / min), and each variant's median against the default's. Differences smaller than a
  variant's own spread are noise."""
  out = {}
  for r in rows:
    if "device_us" not in r or r["impl"] not in ("pallas", "pallas_variant"):
      continue
    name = "default" if r["impl"] == "pallas" else r["variant"]
    out.setdefault(r["shape"], {}).setdefault(name, []).append(float(r["device_us"]))
  res = {}
  for shape, by in out.items():
    base = float(np.median(by["default"])) if "default" in by else None
    res[shape] = {name: dict(us=us, median=float(np.median(us)),
                             spread=max(us) / min(us),
                             vs_default=None if base is None else float(np.median(us)) / base)
                  for name, us in by.items()}
  return res


def table(rows, checks_failed):
  nan = float("nan")
  by = {}
  for r in rows:
    if r["impl"] != "fused_variant":
      by.setdefault(r["shape"], {})[r["impl"]] = r
  impls = ["fused", "fused_shared", "fused_per_seq", "pallas", "pallas_path", "pallas_grouped",
           "xla", "cudnn", "torch_sdpa", "flashinfer", "tokamax"]
  present = [i for i in impls if any("device_us" in d.get(i, {}) for d in by.values())]
  print("\nshape | rule | floor us | fused b2b us | " + " | ".join(
      f"{i} dev us" for i in present) + " | fused % floor | best copied / fused | "
      "pallas / fused | flashinfer / fused | pallas speed-up over best copied")
  for shape, d in by.items():
    dev = lambda k: d.get(k, {}).get("device_us", nan)
    row0 = next(iter(d.values()))
    best_copied = min(dev("cudnn"), dev("torch_sdpa"))
    print(f"{shape} | {row0.get('rule', '')} | {row0.get('floor_us', nan):.1f} | "
          f"{d.get('fused', {}).get('us', nan):.1f} | "
          + " | ".join(f"{dev(i):.1f}" for i in present)
          + f" | {100 * row0.get('floor_us', nan) / dev('fused'):.0f}% | "
          f"{best_copied / dev('fused'):.2f}x | {dev('pallas') / dev('fused'):.2f}x | "
          f"{dev('flashinfer') / dev('fused'):.2f}x | {best_copied / dev('pallas'):.2f}x")
  for r in rows:
    if r["impl"] == "fused_variant" and "device_us" in r:
      base = by.get(r["shape"], {}).get("fused", {}).get("device_us", nan)
      print(f"variant {r['variant']} at {r['shape']}: {r['device_us']:.1f} us device "
            f"(default fused {base:.1f})")
  scan = {}
  for r in rows:
    if r["impl"].startswith("pallas_scan") and "us" in r:
      scan.setdefault(r["shape"], {}).setdefault(r["impl"], []).append(r["us"])
  for shape, d in scan.items():
    a, b = d.get("pallas_scan", [nan]), d.get("pallas_scan_prepared", [nan])
    print(f"layer scan {shape}: {min(a):.1f} us a layer, {min(b):.1f} prepared "
          f"({min(b) / min(a):.3f}x; rounds {', '.join(f'{x:.1f}' for x in a)} / "
          f"{', '.join(f'{x:.1f}' for x in b)})")
  print(f"\nexactness: {checks_failed} failure(s)")
  if BROKEN:
    print("not retried after a failure:", json.dumps(BROKEN))


def write_csv(path, rows):
  ba.write_csv(path, rows)


def main(argv=None):
  global ARGS, T0
  # --budget counts from the run's start, not from the import (a test imports long before)
  T0 = time.time()
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default="results_fused")
  ap.add_argument("--smoke", action="store_true", help="CPU: tiny shapes, XLA/interpreter")
  ap.add_argument("--budget", type=float, default=220.0, help="seconds for everything")
  ap.add_argument("--timing-reserve", type=float, default=130.0,
                  help="seconds kept for timing: checks stop when less is left")
  ap.add_argument("--loop", type=int, default=10, help="dependent calls per device time")
  ap.add_argument("--loop-unroll", action=argparse.BooleanOptionalAction, default=True,
                  help="the device-time loop's calls unrolled (no while loop around them; "
                  "the H200 timed a rolled loop 8-14 us a call slower at 25-60 us ops: "
                  "experiments/results/fused_h200/run8)")
  ap.add_argument("--outer", type=int, default=5, help="timed repetitions (median)")
  ap.add_argument("--warmup", type=float, default=3.0,
                  help="seconds of matrix products before the timing (GPU clocks ramp up)")
  ap.add_argument("--max-replicated-gb", type=float, default=40.0)
  ap.add_argument("--shapes", default="", help="PxB list (default: the issue's table)")
  ap.add_argument("--impls", default="fused_shared,fused_per_seq,pallas,cudnn,torch_sdpa,"
                  "flashinfer,tokamax,xla")
  ap.add_argument("--checks", default="", help="comma-separated name prefixes of the "
                  "exactness checks to run (default: all)")
  ap.add_argument("--xla-max-keys", type=int, default=64 * 4096,
                  help="time the XLA backend only where B*P <= this (it is slow)")
  ap.add_argument("--fused", default="{}", help="JSON of extra fused Config fields")
  ap.add_argument("--variants", default='[{"max_block_m": 128}, {"num_warps": 4, '
                  '"programs_per_sm": 2}, {"block_n": 128}]',
                  help="JSON list of fused Config changes timed at the first two shapes last")
  ap.add_argument("--path-variants", default="[]",
                  help="JSON list of pallas Config changes for the path kernel (forced), each "
                  "timed at every shape after the table, if time is left; e.g. "
                  "'[{\"path_programs_per_sm\": 4}, {\"num_stages\": 3}]'")
  ap.add_argument("--prepared", action="store_true",
                  help="the exactness checks' calls take `prepared=` (`hydrax.attention."
                  "prepare` of their levels, as the engine's layers do)")
  ap.add_argument("--layers", type=int, default=0,
                  help="L > 0: after the table, time the engine's form (a scan over L layers) "
                  "with and without `prepare` at every shape (`time_layers`)")
  ap.add_argument("--pallas-variants", default="[]",
                  help="JSON list of pallas Config changes, each timed at every shape (the "
                  "cost rule choosing the path) after the table, before the path variants; "
                  "e.g. '[{\"finish\": \"per_level\"}, {\"level_stream\": 1}]'")
  ARGS = ap.parse_args(argv)
  ARGS.fused_extra = json.loads(ARGS.fused)
  ba.ARGS = argparse.Namespace(outer=ARGS.outer, budget=ARGS.budget, loop=ARGS.loop,
                               loop_unroll=ARGS.loop_unroll,
                               max_replicated_gb=ARGS.max_replicated_gb)
  ba.T0 = T0                 # the bench_attention timing helpers read their budget from it
  os.makedirs(ARGS.out, exist_ok=True)
  log("jax", jax.__version__, jax.devices(), "fused:",
      ft.unavailable_reason(ft.Config(**ARGS.fused_extra)) or "available")
  if ARGS.smoke:
    ARGS.timing_reserve = min(ARGS.timing_reserve, ARGS.budget / 2)
    fused_ok = ft.available(ft.Config(**ARGS.fused_extra))
    check_rows, fails = run_checks([c for c in SMOKE_CHECKS
                                    if fused_ok or c[-1].get("backend") == "pallas"], d=16)
    shapes, h, kh, d, u = [(64, 4)], 4, 2, 16, 8
  else:
    check_rows, fails = run_checks(CHECKS)
    shapes = [(1024, 16), (1024, 64), (4096, 256), (16384, 256), (32768, 256), (1024, 1024),
              (4096, 16), (4096, 64), (16384, 64), (32768, 64), (1024, 256), (4096, 1024),
              (16384, 16), (32768, 16), (16384, 1024), (32768, 1024)]
    h, kh, d, u = 32, 8, 128, 128
  if ARGS.shapes:
    shapes = [tuple(int(x) for x in s.split("x")) for s in ARGS.shapes.split(",")]
  if jax.default_backend() == "gpu" and ARGS.warmup > 0:
    log(f"warm-up: {ba.warm_device(ARGS.warmup)} matrix products in {ARGS.warmup:.0f} s")
  write_csv(os.path.join(ARGS.out, "fused_check.csv"), check_rows)
  impls = [i for i in ARGS.impls.split(",") if i]
  rows = []
  for p, b in shapes:      # the headline shapes first: budget cuts the tail
    use = [i for i in impls if i != "xla" or b * p <= ARGS.xla_max_keys]
    rows += time_shapes([(p, b)], h, kh, d, u, use)
    write_csv(os.path.join(ARGS.out, "fused_timing.csv"), rows)
  variants = json.loads(ARGS.variants)
  if ft.unavailable_reason(ft.Config(**ARGS.fused_extra)):
    variants = []            # (the backend would run its fallback: nothing to compare)
  for cfg in variants:     # kernel settings to try next, if time is left (device time only)
    for p, b in shapes[:2]:
      if left() < 20:
        log("budget: skipping variant", cfg)
        break
      name = f"P{p}_B{b}"
      try:
        fn = hydrax_fn(b, p, u, backends.get("fused", **{**ARGS.fused_extra, **cfg}))
        case = _case(1, b, p, u, h, kh, d, 1)
        us, dev = _time_jax(fn, case, 1)
        rows.append(dict(shape=name, impl="fused_variant", variant=json.dumps(cfg), B=b, P=p,
                         U=u, us=us, device_us=dev))
        log(f"{name:>12} variant {json.dumps(cfg)}: {us:.1f} us b2b {dev:.1f} us device")
      except Exception as e:
        rows.append(dict(shape=name, impl="fused_variant", variant=json.dumps(cfg),
                         error=err_line(e)))
        log(f"{name:>12} variant {json.dumps(cfg)} FAILED {err_line(e)}")
  if ARGS.layers > 0:
    rows += time_layers(shapes, h, kh, d, u, ARGS.layers)
    write_csv(os.path.join(ARGS.out, "fused_timing.csv"), rows)
  rows += time_path_variants(shapes, h, kh, d, u, json.loads(ARGS.pallas_variants),
                             force_path=False)
  rows += time_path_variants(shapes, h, kh, d, u, json.loads(ARGS.path_variants))
  write_csv(os.path.join(ARGS.out, "fused_timing.csv"), rows)
  cross = crossover(rows)
  path_cross = path_crossover(rows)
  skipped = [r["case"] for r in check_rows if r.get("ok") is None]
  if skipped:
    log("checks skipped for the budget (not failures):", skipped)
  summary = dict(check_failures=fails, checks_skipped=skipped, crossover=cross,
                 path_crossover=path_cross, variant_spread=variant_spread(rows),
                 broken=BROKEN, device=str(jax.devices()[0]),
                 jax=jax.__version__, seconds=time.time() - T0)
  with open(os.path.join(ARGS.out, "fused_summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  print("\ncrossover:", json.dumps(cross))
  print("path crossover:", json.dumps(path_cross))
  for shape, by in summary["variant_spread"].items():
    for name, v in by.items():
      rel = "" if v["vs_default"] is None else f", {v['vs_default']:.3f}x the default's"
      print(f"variant {shape} {name}: median {v['median']:.1f} us over {len(v['us'])}, "
            f"spread {v['spread']:.2f}{rel}")
  table(rows, fails)
  return rows, check_rows, fails


if __name__ == "__main__":
  _, _, n_fail = main()
  sys.exit(1 if n_fail else 0)
