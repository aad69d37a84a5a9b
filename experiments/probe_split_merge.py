"""How many launches the merge of a Mosaic launch's key splits takes, by how it is written.

Axis letters: P key splits, K KV heads, R packed rows of a KV head (B*T*G), D head dim, B
sequences, T queries a sequence, H query heads (K*G).

After the Mosaic GPU launch a decode call merges its P key splits (out [P,K,R,D] in q's dtype,
lse [P,K,R] f32) and unpacks the rows to [B,T,H,D] (`pallas_gpu._finish`). On the H200 XLA
makes that two launches (run 18, call 4b: `loop_exponential_fusion`, the weights
exp(lse_p - max) on [P,K,R], 2.4 us; then `loop_transpose_fusion`, the weighted sum
transposed, 3.9 us at 16K/256): it does not fuse the exponentials into a consumer that would
recompute each of them D times. Each form here gives the same result; the GPU decides which
makes fewer, shorter launches:

  reduce       `flash.combine_splits` (reductions over P), then the unpacking: what runs now
  elementwise  `flash.merge_list` (the planes one by one), then the unpacking
  broadcast    the weights' exponentials taken on [P,K,R,D] (lse broadcast over D first), so
               that each is used once and nothing is recomputed by fusing them
  query_order  lse and out transposed to query order first, then merged elementwise

    python3 experiments/probe_split_merge.py --out $OUT/merge      # GPU: launches and times
    python3 experiments/probe_split_merge.py --check               # CPU: exactness only

Each form is checked against a float64 NumPy merge (relative error of out, absolute of lse),
then on a GPU compiled (its optimised HLO's launches counted and saved), timed back to back
(median of 5 rounds of 200 calls) and its kernels' device time taken through CUPTI
(`profile_decode_h200.cupti_kernels`, mean of 50 calls).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from hydrax.attention.kernels import flash

# (B, G, K): the decode shapes of the table (32 query heads, 8 KV heads, T = 1)
SHAPES = ((256, 4, 8), (64, 4, 8), (1024, 4, 8))
D = 128


def _unpack(out, lse, b: int, t: int, g: int):
  """[K,R,D], [K,R] (R = B*T*G, rows b-major) -> [B,T,H,D], [B,T,H] (H = K*G)."""
  k = out.shape[0]
  o = out.reshape(k, b, t, g, -1).transpose(1, 2, 0, 3, 4).reshape(b, t, k * g, -1)
  return o, lse.reshape(k, b, t, g).transpose(1, 2, 0, 3).reshape(b, t, k * g)


def reduce_form(out, lse, b, t, g):
  o, l = flash.combine_splits(out.astype(jnp.float32), lse)
  o, l = _unpack(o, l, b, t, g)
  return o.astype(out.dtype), l


def elementwise_form(out, lse, b, t, g):
  o, l = flash.merge_list([x.astype(jnp.float32) for x in out], list(lse))
  o, l = _unpack(o, l, b, t, g)
  return o.astype(out.dtype), l


def broadcast_form(out, lse, b, t, g):
  m = jnp.max(lse, axis=0)
  m_safe = jnp.where(m > -jnp.inf, m, 0.0)
  w = jnp.exp(lse[..., None] - m_safe[..., None])                  # [P,K,R,D]
  total = jnp.sum(w, axis=0)
  has = total > 0
  o = jnp.sum(w * out.astype(jnp.float32), axis=0) / jnp.where(has, total, 1.0)
  wl = jnp.exp(lse - m_safe)
  tl = jnp.sum(wl, axis=0)
  l = jnp.where(tl > 0, m_safe + jnp.log(jnp.where(tl > 0, tl, 1.0)), -jnp.inf)
  o, l = _unpack(o, l, b, t, g)
  return o.astype(out.dtype), l


def query_order_form(out, lse, b, t, g):
  outs, lses = zip(*[_unpack(o, l, b, t, g) for o, l in zip(out, lse)])
  o, l = flash.merge_list([x.astype(jnp.float32) for x in outs], list(lses))
  return o.astype(out.dtype), l


FORMS = {"reduce": reduce_form, "elementwise": elementwise_form,
         "broadcast": broadcast_form, "query_order": query_order_form}


def reference(out, lse, b, t, g):
  """float64 NumPy: the merge, then the unpacking."""
  out, lse = np.asarray(out, np.float64), np.asarray(lse, np.float64)
  m = lse.max(axis=0)
  m = np.where(np.isfinite(m), m, 0.0)
  w = np.exp(lse - m)
  tot = w.sum(axis=0)
  o = (w[..., None] * out).sum(axis=0) / np.where(tot > 0, tot, 1.0)[..., None]
  l = np.where(tot > 0, m + np.log(np.where(tot > 0, tot, 1.0)), -np.inf)
  k = out.shape[1]
  o = o.reshape(k, b, t, g, -1).transpose(1, 2, 0, 3, 4).reshape(b, t, k * g, -1)
  return o, l.reshape(k, b, t, g).transpose(1, 2, 0, 3).reshape(b, t, k * g)


def make_inputs(p: int, b: int, t: int, g: int, k: int, seed: int = 0):
  """out [P,K,R,D] bf16, lse [P,K,R] f32 with some rows empty in one split (-inf, out 0) and
  one row empty in every split."""
  rng = np.random.default_rng(seed)
  r = b * t * g
  out = rng.standard_normal((p, k, r, D)).astype(np.float32)
  lse = (rng.standard_normal((p, k, r)) * 4).astype(np.float32)
  empty = rng.random((p, k, r)) < 0.1
  lse[empty] = -np.inf
  out[empty] = 0.0
  lse[:, 0, 0] = -np.inf
  out[:, 0, 0] = 0.0
  return jnp.asarray(out, jnp.bfloat16), jnp.asarray(lse)


def check(p: int, b: int, t: int, g: int, k: int) -> dict:
  """Each form's errors against `reference` (out rounded to bf16: its tolerance 1e-2)."""
  out, lse = make_inputs(p, b, t, g, k)
  ro, rl = reference(out.astype(jnp.float32), lse, b, t, g)
  errs = {}
  for name, form in FORMS.items():
    o, l = jax.jit(form, static_argnums=(2, 3, 4))(out, lse, b, t, g)
    o, l = np.asarray(o, np.float64), np.asarray(l, np.float64)
    finite = np.isfinite(rl)
    ok_inf = bool(np.all(np.isneginf(l[~finite])) and np.all(o[~finite] == 0))
    oe = float(np.max(np.abs(o - ro)) / max(np.max(np.abs(ro)), 1e-30))
    le = float(np.max(np.abs(l[finite] - rl[finite])))
    errs[name] = {"out_rel": oe, "lse_abs": le, "empty_rows_ok": ok_inf,
                  "ok": oe < 1e-2 and le < 1e-4 and ok_inf}
  return errs


def launches(hlo: str) -> list:
  """The launches of an optimised HLO module's entry computation: fusions, custom calls,
  copies and other ops that run as kernels (bitcasts, tuples and parameters do not)."""
  entry = hlo[hlo.index("\nENTRY"):]
  names = []
  for line in entry.splitlines()[1:]:
    # (a multi-output fusion's type is a tuple, with spaces: "(f32[8], bf16[8,4]{1,0})")
    m = re.match(r"\s*(?:ROOT )?%(\S+) = (?:\([^=]*?\)|\S+) ([\w-]+)\(", line)
    if m and m.group(2) not in ("parameter", "bitcast", "tuple", "get-tuple-element",
                                "constant"):
      names.append(f"{m.group(2)}:{m.group(1)}")
  return names


def gpu_rows(p: int, b: int, t: int, g: int, k: int, out_dir: str, calls: int) -> list:
  """Per form: launches, back-to-back us a call, CUPTI device us a call."""
  from experiments import profile_decode_h200 as prof
  out, lse = make_inputs(p, b, t, g, k)
  rows = []
  for name, form in FORMS.items():
    fn = jax.jit(lambda o, l, form=form: form(o, l, b, t, g))
    hlo = fn.lower(out, lse).compile().as_text()
    with open(os.path.join(out_dir, f"hlo_{name}_P{p}_B{b}.txt"), "w") as f:
      f.write(hlo)
    jax.block_until_ready(fn(out, lse))
    rounds = []
    for _ in range(5):
      t0 = time.perf_counter()
      for _ in range(200):
        res = fn(out, lse)
      jax.block_until_ready(res)
      rounds.append((time.perf_counter() - t0) / 200 * 1e6)
    kernels, _ = prof.cupti_collect(lambda: [jax.block_until_ready(fn(out, lse))
                                             for _ in range(calls)])
    device = sum(tt for _, tt in kernels.values()) / calls
    per = {kn: round(tt / calls, 2) for kn, (_, tt) in kernels.items()}
    rows.append({"form": name, "P": p, "B": b, "launches": launches(hlo),
                 "b2b_us": float(np.median(rounds)), "device_us": device, "kernels": per})
  return rows


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--check", action="store_true", help="exactness only (any machine)")
  ap.add_argument("--out", default="", help="GPU: where the HLO and results.json go")
  ap.add_argument("--calls", type=int, default=50)
  args = ap.parse_args(argv)
  failed = False
  for b, g, k in SHAPES:
    for p in (2, 3):
      errs = check(p, b, 1, g, k)
      for name, e in errs.items():
        print(f"check P{p} B{b} {name}: out rel {e['out_rel']:.2e} lse abs {e['lse_abs']:.2e}"
              f" empty rows {e['empty_rows_ok']} -> {'ok' if e['ok'] else 'FAIL'}", flush=True)
        failed |= not e["ok"]
  if args.check or failed:
    return int(failed)
  os.makedirs(args.out, exist_ok=True)
  rows = []
  for b, g, k in SHAPES:
    rows += gpu_rows(2, b, 1, g, k, args.out, args.calls)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(rows, f, indent=1)
  print("\n| form | P | B | launches | back-to-back us | device us (CUPTI) |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['form']} | {r['P']} | {r['B']} | {len(r['launches'])} | {r['b2b_us']:.1f} | "
          f"{r['device_us']:.1f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
