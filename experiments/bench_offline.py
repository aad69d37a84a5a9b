"""Offline batch inference benchmark: the global plan vs arrival-order batches vs replicated.

  python experiments/bench_offline.py --out DIR                       (H200: llama3-8b, bf16)
  python experiments/bench_offline.py --out DIR --smoke                (CPU: tiny, toy sizes)

For each workload of `offline_workloads.py` (system prompts, one document, problems x samples,
a no-sharing control; scaled by --scale and --length_scale), `hydrax.generate.run` processes the
whole file three ways with the same model, budget and engine:
  global      one radix tree over the dataset, sharers batched together, BatchLLM order, a
              node shared across batches passed from one to the next (keep_nodes);
  arrival     the same engine fed in arrival order, fixed-size batches each planned and
              prefilled on its own (keep_nodes off);
  replicated  the global batches with the prefix copied into every sequence's cache;
  (with --modes: global_padded, global with every batch's suffixes prefilled padded;
  global_nokeep, global with every batch prefilling its own nodes.)
Every run prefills its batches' unique suffixes packed where that runs fewer token slots
(`engine.generate(prefill="auto")`); rows.csv counts the slots (prefill_slots, padded_slots,
packed_batches).
Wall time covers planning, prefill, decode and compiles (the model is loaded once before; the
engine's compiled executables are dropped before every run, so each run pays its own).
Prepacking, twice (the engine points run first and are never skipped; their time counts
against --time_budget, which cuts workload runs):
  engine      `engine.generate(prefill="padded")` vs `prefill="packed"` on B prompts of one
              shared prefix + suffixes of lo..hi tokens (--engine_prepack; the whole model,
              both on the same backend): prefill seconds (median of --repeats runs after a
              compiling one), prefill + decode seconds, compile seconds, the token slots the
              suffix pass runs and its padding (1 - suffix tokens / slots), and whether the
              greedy tokens agree (bf16 may round apart; float32 must not);
  attention   one layer's suffix attention alone, padded vs the packed op (--prepack).

Writes DIR/rows.csv (one row per workload x mode), DIR/prepack_engine.csv, DIR/prepack.csv,
DIR/runs/*.jsonl (the completions) and DIR/workloads/*.jsonl; prints a short table last.
--time_budget stops starting new runs when it is spent (the table then says which were
skipped). --smoke: the tiny model in float32 on CPU at toy sizes (what
tests/experiments/test_bench_offline.py runs).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from experiments import offline_workloads  # noqa: E402
from hydrax import engine  # noqa: E402
from hydrax import generate as generate_lib  # noqa: E402
from hydrax.attention import KVLevel, hydragen_attention  # noqa: E402
from hydrax.models import configs  # noqa: E402
from hydrax.offline import packing  # noqa: E402

MODES = {"global": dict(strategy="global", attention="hydragen"),
         "arrival": dict(strategy="arrival", attention="hydragen", keep_nodes=False),
         "global_nokeep": dict(strategy="global", attention="hydragen", keep_nodes=False),
         "replicated": dict(strategy="global", attention="replicated"),
         "global_padded": dict(strategy="global", attention="hydragen", prefill="padded")}
FIELDS = ["workload", "mode", "requests", "prompt_tokens", "generated_tokens", "wall_s",
          "wall_minus_compile_s", "planning_s", "compile_s", "ahead_compile_s", "prefill_s", "decode_s",
          "tokens_per_s", "batches", "signatures", "compiles", "prefill_tokens",
          "reprefill_tokens", "reused_tokens", "shared_fraction", "memory_budget", "speedup_vs_arrival",
          "speedup_minus_compile", "planning_pct", "prefill_slots", "padded_slots",
          "packed_batches", "status"]


def _run_one(path, out, model, mode, args):
  if os.path.exists(out):
    os.remove(out)
  engine.clear_compiled_cache()
  t0 = time.perf_counter()
  s = generate_lib.run(path, out, model=model, max_batch=args.max_batch,
                       memory_budget=args.memory_budget, min_shared_tokens=args.min_shared_tokens,
                       backend=args.backend, progress=False,
                       compile_ahead=args.compile_ahead, check_every=args.check_every,
                       **MODES[mode])
  wall = time.perf_counter() - t0
  d = s.as_dict()
  return dict(requests=s.requests, prompt_tokens=d["prompt_tokens"],
              generated_tokens=s.generated_tokens, wall_s=round(wall, 2),
              wall_minus_compile_s=round(wall - s.compile_seconds, 2),
              planning_s=round(s.planning_seconds, 3), compile_s=round(s.compile_seconds, 2),
              ahead_compile_s=round(s.ahead_compile_seconds, 2),
              prefill_s=round(s.prefill_seconds, 2), decode_s=round(s.decode_seconds, 2),
              tokens_per_s=round(s.generated_tokens / wall, 1), batches=d["batches"],
              signatures=s.signatures, compiles=s.compiles, prefill_tokens=d["prefill_tokens"],
              reprefill_tokens=d["reprefill_tokens"], reused_tokens=s.reused_tokens,
              shared_fraction=d["shared_fraction"],
              memory_budget=d["memory_budget"],
              planning_pct=round(100 * s.planning_seconds / wall, 2),
              prefill_slots=s.prefill_slots, padded_slots=s.padded_slots,
              packed_batches=s.packed_batches,
              status="ok" if s.completed == s.completions else f"{s.failed} failed")


def _timed(fn, *args, repeats=5):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def prepack_point(config, dtype, *, batch, lo, hi, prefix, seed=0, backend="xla"):
  """Padded vs packed suffix-prefill attention (one layer), with a shared prefix level. Both
  on the same backend (default XLA: the packed in-row part is jnp, so a Pallas padded path
  would compare kernels, not packing)."""
  rng = np.random.default_rng(seed)
  h, kh, d = config.num_heads, config.num_kv_heads, config.head_dim
  lengths = rng.integers(lo, hi + 1, batch)
  s = int(lengths.max())
  pk = packing.pack(lengths, width=s)
  _, seg, _ = packing.pack_tokens(np.zeros((batch, s), np.int32), lengths,
                                  np.zeros(batch, np.int32), pk)
  key = jax.random.key(seed)
  ks = jax.random.split(key, 5)
  q = jax.random.normal(ks[0], (batch, s, h, d), dtype)
  k = jax.random.normal(ks[1], (batch, s, kh, d), dtype)
  v = jax.random.normal(ks[2], (batch, s, kh, d), dtype)
  pre_k = jax.random.normal(ks[3], (1, prefix, kh, d), dtype)
  pre_v = jax.random.normal(ks[4], (1, prefix, kh, d), dtype)
  owner = np.zeros(batch, np.int32)
  pre_len = jnp.array([prefix], jnp.int32)
  full = jnp.full((batch,), s, jnp.int32)

  @jax.jit
  def padded(q, k, v, pk_, pv_):
    return hydragen_attention(q, [KVLevel(pk_, pv_, pre_len, owner), KVLevel(k, v, full, None)],
                              backend=backend)

  def to_packed(x):
    seq, index, row, col = packing._slots(pk, lengths)
    return jnp.zeros((pk.rows, pk.width) + x.shape[2:], x.dtype).at[row, col].set(x[seq, index])

  qp, kp, vp = to_packed(q), to_packed(k), to_packed(v)

  @jax.jit
  def packed(q, k, v, pk_, pv_):
    return packing.packed_attention(q, k, v, seg, [KVLevel(pk_, pv_, pre_len, owner)],
                                    backend=backend)

  t_pad = _timed(padded, q, k, v, pre_k, pre_v)
  t_pack = _timed(packed, qp, kp, vp, pre_k, pre_v)
  return dict(backend=backend, batch=batch, suffix_lo=lo, suffix_hi=hi, prefix=prefix,
              tokens=int(lengths.sum()), padded_slots=batch * s, packed_slots=pk.slots,
              slot_ratio=round(batch * s / pk.slots, 3), padded_attention_ms=round(1e3 * t_pad, 3),
              packed_attention_ms=round(1e3 * t_pack, 3),
              attention_speedup=round(t_pad / t_pack, 3))


def engine_prepack_point(model, *, batch, lo, hi, prefix, max_new=8, repeats=3, seed=0,
                         backend="auto"):
  """Padded vs packed unique-suffix prefill through the engine: B prompts = one shared prefix
  of `prefix` tokens + a suffix of lo..hi tokens each (uniform), greedy, max_new tokens."""
  config, params = model
  rng = np.random.default_rng(seed)
  head = rng.integers(3, config.vocab_size, prefix)
  lengths = rng.integers(lo, hi + 1, batch)
  prompts = [np.concatenate([head, rng.integers(3, config.vocab_size, n)]).astype(np.int32)
             for n in lengths]
  share = dict(min_shared_tokens=0, merge_cost=0, max_levels=1)
  row = dict(batch=batch, suffix_lo=lo, suffix_hi=hi, prefix=prefix, max_new=max_new,
             suffix_tokens=int(lengths.sum()))
  tokens = {}
  for mode in ("padded", "packed"):
    run = lambda: engine.generate(config, params, prompts, max_new_tokens=max_new,
                                  sharing_options=share, backend=backend, prefill=mode)
    first = run()                                      # compiles (or reuses) its executables
    gens = [run() for _ in range(repeats)]
    tokens[mode] = first.tokens
    row.update({f"{mode}_prefill_s": round(statistics.median(g.prefill_seconds for g in gens), 4),
                f"{mode}_total_s": round(statistics.median(g.prefill_seconds + g.decode_seconds
                                                           for g in gens), 4),
                f"{mode}_compile_s": round(first.compile_seconds, 2),
                f"{mode}_slots": first.prefill_slots,
                f"{mode}_padding": round(1 - int(lengths.sum()) / first.prefill_slots, 3),
                f"{mode}_ran": first.prefill})
  row["slot_ratio"] = round(row["padded_slots"] / row["packed_slots"], 3)
  row["prefill_speedup"] = round(row["padded_prefill_s"] / row["packed_prefill_s"], 3)
  row["total_speedup"] = round(row["padded_total_s"] / row["packed_total_s"], 3)
  row["tokens_equal"] = bool(np.array_equal(tokens["padded"], tokens["packed"]))
  return row


def _write_csv(path, rows):
  with open(path, "w", newline="") as f:
    wr = csv.DictWriter(f, list(dict.fromkeys(k for r in rows for k in r)))
    wr.writeheader()
    wr.writerows(rows)


SMOKE = ["--model", "tiny", "--dtype", "float32", "--scale", "0.02", "--group_scale", "0.05",
         "--length_scale", "0.02", "--max_new", "4,12", "--max_batch", "16",
         "--prepack", "8,4,64,32", "--engine_prepack", "8,4,60,24", "--repeats", "1"]


def _print_rows(rows):
  print("| workload | mode | requests | wall s | compile s | plan % | tok/s | batches | sigs | "
        "compiles | prefill tok | re-prefill tok (passed on) | packed batches (slots / "
        "padded) | vs arrival | (no compile) | status |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    g = lambda k: r.get(k, "")
    print(f"| {g('workload')} | {g('mode')} | {g('requests')} | {g('wall_s')} | "
          f"{g('compile_s')} | {g('planning_pct')} | {g('tokens_per_s')} | {g('batches')} | "
          f"{g('signatures')} | {g('compiles')} | {g('prefill_tokens')} | "
          f"{g('reprefill_tokens')} ({g('reused_tokens')}) | {g('packed_batches')} ({g('prefill_slots')} / "
          f"{g('padded_slots')}) | {g('speedup_vs_arrival')} | "
          f"{g('speedup_minus_compile')} | {g('status')} |")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True)
  p.add_argument("--model", default="llama3-8b")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--workloads", default=",".join(offline_workloads.WORKLOADS))
  p.add_argument("--modes", default="global,arrival,replicated",
                 help=f"of {','.join(MODES)}")
  p.add_argument("--scale", type=float, default=0.1, help="groups x this (see the workloads)")
  p.add_argument("--group_scale", type=float, default=1.0, help="requests per group x this")
  p.add_argument("--length_scale", type=float, default=1.0, help="token lengths x this")
  p.add_argument("--max_new", default="128,256", help="per-request max_new_tokens range")
  p.add_argument("--max_batch", type=int, default=128)
  p.add_argument("--memory_budget", type=float, default=None, help="KV bytes per batch "
                 "(default: 80%% of free device memory after the weights)")
  p.add_argument("--min_shared_tokens", type=float, default=256)
  p.add_argument("--backend", default="auto")
  p.add_argument("--compile_ahead", action="store_true",
                 help="every mode compiles later batches' programs while a batch runs "
                 "(hydrax.generate's default; off here unless given, as in runs 1-4)")
  p.add_argument("--check_every", type=int, default=1,
                 help="decode steps between the decode loop's checks "
                 "(hydrax.generate's --check_every)")
  p.add_argument("--time_budget", type=float, default=480, help="seconds; no new run after")
  p.add_argument("--prepack", default="32,16,2048,1024",
                 help="batch,lo,hi,prefix of the attention-level Prepacking point ('' to skip)")
  p.add_argument("--engine_prepack", default="32,16,2048,1024;128,16,512,1024",
                 help="';'-separated batch,lo,hi,prefix points of the engine-level padded vs "
                 "packed prefill ('' to skip)")
  p.add_argument("--repeats", type=int, default=3, help="timed runs per engine prefill point")
  p.add_argument("--smoke", action="store_true", help="tiny model, float32, toy sizes (CPU): "
                 + " ".join(SMOKE))
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--smoke" in argv:
    argv = SMOKE + argv       # explicit flags after them still win
  args = p.parse_args(argv)
  t_start = time.perf_counter()
  os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
  lo, hi = (int(x) for x in args.max_new.split(","))
  dtype = jnp.dtype(args.dtype)
  config = configs.LlamaConfig.from_preset(args.model)
  t0 = time.perf_counter()
  model = generate_lib.load_model(preset=args.model, dtype=dtype)
  jax.block_until_ready(model[1])
  print(f"{args.model} ({dtype}) random weights in {time.perf_counter() - t0:.1f} s on "
        f"{jax.devices()[0].device_kind}", file=sys.stderr)
  if args.memory_budget is not None:
    args.memory_budget = int(args.memory_budget)
  # One throwaway generation, so that process-wide first-use costs (backend start, jax's own
  # caches) do not land on whichever run comes first.
  engine.generate(model[0], model[1], [np.arange(3, 40, dtype=np.int32)] * 2, max_new_tokens=2)

  # The engine-level Prepacking points first: bounded (a few compiles and runs), so that the
  # time budget cuts workload runs, not them.
  engine_rows = []
  for point in filter(None, args.engine_prepack.split(";")):
    b, plo, phi, prefix = (int(x) for x in point.split(","))
    try:
      engine_rows.append(engine_prepack_point(model, batch=b, lo=plo, hi=phi, prefix=prefix,
                                              repeats=args.repeats, backend=args.backend))
    except Exception as e:  # noqa: BLE001 -- recorded, the other points go on
      engine_rows.append(dict(batch=b, suffix_lo=plo, suffix_hi=phi, prefix=prefix,
                              error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"))
    print(json.dumps(engine_rows[-1]), file=sys.stderr)
  if engine_rows:
    _write_csv(os.path.join(args.out, "prepack_engine.csv"), engine_rows)

  paths = {}
  for w in filter(None, args.workloads.split(",")):
    recs = offline_workloads.make(w, scale=args.scale, group_scale=args.group_scale,
                                  length_scale=args.length_scale, vocab_size=config.vocab_size,
                                  max_new=(lo, hi))
    paths[w] = offline_workloads.write_jsonl(recs, os.path.join(args.out, "workloads",
                                                                f"{w}.jsonl"))
  rows = []
  for mode in filter(None, args.modes.split(",")):   # mode by mode: the budget cuts the last
    for w, path in paths.items():
      row = dict(workload=w, mode=mode)
      if time.perf_counter() - t_start > args.time_budget:
        row["status"] = "skipped (time budget)"
      else:
        try:
          row.update(_run_one(path, os.path.join(args.out, "runs", f"{w}_{mode}.jsonl"), model,
                              mode, args))
        except Exception as e:  # noqa: BLE001 -- recorded, the sweep goes on
          row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
      rows.append(row)
      print(json.dumps(row), file=sys.stderr)
  for row in rows:
    base = [r for r in rows if r["workload"] == row["workload"] and r["mode"] == "arrival"
            and "wall_s" in r]
    if base and "wall_s" in row:
      row["speedup_vs_arrival"] = round(base[0]["wall_s"] / row["wall_s"], 3)
      row["speedup_minus_compile"] = round(base[0]["wall_minus_compile_s"] /
                                           max(row["wall_minus_compile_s"], 1e-9), 3)
  with open(os.path.join(args.out, "rows.csv"), "w", newline="") as f:
    wr = csv.DictWriter(f, FIELDS)
    wr.writeheader()
    wr.writerows(rows)

  prepack = []
  if args.prepack:
    b, plo, phi, prefix = (int(x) for x in args.prepack.split(","))
    try:
      prepack.append(prepack_point(config, dtype, batch=b, lo=plo, hi=phi, prefix=prefix))
    except Exception as e:  # noqa: BLE001
      prepack.append(dict(batch=b, error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"))
    with open(os.path.join(args.out, "prepack.csv"), "w", newline="") as f:
      wr = csv.DictWriter(f, sorted({k for r in prepack for k in r}))
      wr.writeheader()
      wr.writerows(prepack)

  print(f"\ntotal {time.perf_counter() - t_start:.0f} s; results in {args.out}")
  if rows:
    _print_rows(rows)
  if engine_rows:
    print("\n| B | suffix | prefix | mode ran | slots | padding | prefill s | prefill+decode s | "
          "compile s | tokens equal |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in engine_rows:
      for mode in ("padded", "packed"):
        g = lambda k: r.get(f"{mode}_{k}", r.get("error", "") if k == "ran" else "")
        print(f"| {r['batch']} | {r['suffix_lo']}..{r['suffix_hi']} | {r['prefix']} | "
              f"{g('ran')} | {g('slots')} | {g('padding')} | {g('prefill_s')} | "
              f"{g('total_s')} | {g('compile_s')} | {r.get('tokens_equal', '')} |")
      if "prefill_speedup" in r:
        print(f"| | | | packed vs padded | {r['slot_ratio']}x fewer | | "
              f"{r['prefill_speedup']}x | {r['total_speedup']}x | | |")
  for r in prepack:
    print(f"prepack: {json.dumps(r)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
