r"""End-to-end decode benchmark of the engine against its roofline ideal (issue 13's targets).

For each (prefix P, batch B) point it runs `hydrax.engine.generate` twice on random weights
(attention="none", then "hydragen") and reports, per decode step:

  none_ms        the step without attention (the paper's upper bound)
  hydragen_ms    the step with exact Hydragen attention
  attn_layer_us  (hydragen_ms - none_ms) / L: attention's cost per layer inside the real step
  floor_layer_us one layer's attention floor: max(FLOPs / matmul ceiling, bytes / copy ceiling)
                 with FLOPs = 4*B*H*(P+U)*D and bytes = the prefix's K,V once + every suffix's
                 K,V + q + out (U = unique tokens per sequence at the middle of decode)
  ideal_ms       none_ms + L * floor_layer_us: the best exact engine
  pct_of_ideal   ideal_ms / hydragen_ms
  compile_s      prefill + decode compile seconds of each mode (Generation.compile_seconds)

and, from XLA's optimized HLO of the compiled decode loop (dumped with --xla_dump_to), the
instructions that produce one layer of the per-sequence cache by a copy, slice or fusion: the
per-layer cache copies made before a kernel call show up there (the HLO files are copied to
--out).

Ceilings are measured in the same run (a large bf16 matmul and a device copy, through torch when
it is installed, else jnp; jnp reads lower) unless --ceilings gives them.

  python3 experiments/bench_engine.py --points 16384x1024,16384x256,1024x1024 --out $OUT
  python3 experiments/bench_engine.py --model tiny --points 64x4 --new-tokens 4 --out /tmp/x

`--profile-steps N` profiles each mode's generation of 2 and of 2 + N new tokens (compiled and
warmed up first) under torch's profiler (CUPTI records every kernel of the process, jax's
included; ncu died at its start in 4 of 7 tries in run 13) and takes the difference: the same
prefill and the same decode program (the suffix capacity stays in one bucket: the report
says where it did not), N more decode steps, so the kernels of one decode step alone. It
prints, per mode, the kernels of a step (launches and us a step and a layer) and what the
hydragen step adds to or takes from the step without attention (`kernel_report`; also
`profile.json` in --out), and each mode's step on the GPU's timeline: the longer
generation cut at each decode iteration's copy of the loop's condition, the median step's
wall, busy (the union of device activity) and idle us, and the largest gaps between
activities a step with the activities on either side (`step_timeline`, `timeline_report`,
`timeline.json`): whether the step waits on its kernels or between them (run 14 found it
moved by neither fewer kernels' time nor fewer launches). N >= 3 leaves a few steps after
the first and last stretches are dropped.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import sys
import tempfile
import time
from typing import Optional

def _setup_dump(out: str) -> str:
  """XLA dumps the optimized HLO of every jit_decode module under out/hlo (set before jax)."""
  path = os.path.join(tempfile.mkdtemp(prefix="hlo_"), "hlo")
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={path}"
                             " --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*decode.*")
  return path


_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1,
          "f64": 8, "s64": 8}


_LAYER_OP = re.compile(r"=\s*(\w+)\[(?:1,)?(\d+),(\d+),(\d+),(\d+)\]\{?[^ ]*\s+"
                       r"(copy|transpose|dynamic-slice|fusion|slice|gather)\(")


def _layer_sized_ops(paths: list, b: int, k: int, d: int, min_s: int) -> tuple:
  """(count, a few example lines) of instructions in optimized-HLO files that produce one
  layer of a per-sequence cache, [B,S,K,D] with S >= min_s, by a copy, slice, transpose, gather
  or fusion: the per-layer cache copies made before a custom call (XLA's own attention fuses
  its slice instead and shows none)."""
  count, lines = 0, []
  for path in paths:
    with open(path) as f:
      for line in f:
        # (ROOT lines are the bodies of fusions already counted at their call site.)
        m = None if line.lstrip().startswith("ROOT") else _LAYER_OP.search(line)
        if m and (int(m.group(2)), int(m.group(4)), int(m.group(5))) == (b, k, d) \
            and int(m.group(3)) >= min_s:
          count += 1
          if len(lines) < 6:
            lines.append(line.strip()[:240])
  return count, lines


def _ceilings(jax, jnp):
  """(matmul FLOP/s, copy bytes/s) measured now: torch if present (closer to the hardware)."""
  try:
    import torch
    if torch.cuda.is_available():
      a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
      b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
      x = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16)
      y = torch.empty_like(x)
      for _ in range(3):
        a @ b
        y.copy_(x)
      torch.cuda.synchronize()
      n = 20
      t0 = time.perf_counter()
      for _ in range(n):
        a @ b
      torch.cuda.synchronize()
      flops = 2 * 8192 ** 3 * n / (time.perf_counter() - t0)
      t0 = time.perf_counter()
      for _ in range(n):
        y.copy_(x)
      torch.cuda.synchronize()
      bw = 2 * x.numel() * 2 * n / (time.perf_counter() - t0)
      del a, b, x, y
      torch.cuda.empty_cache()
      return flops, bw, "torch"
  except ImportError:
    pass
  size = 4096 if jax.default_backend() != "cpu" else 512
  a = jnp.ones((size, size), jnp.bfloat16)
  mm = jax.jit(lambda a: a @ a)
  cp = jax.jit(lambda a: a * 1)
  mm(a).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(10):
    r = mm(a)
  r.block_until_ready()
  flops = 2 * size ** 3 * 10 / (time.perf_counter() - t0)
  x = jnp.ones((1 << (26 if jax.default_backend() != "cpu" else 22),), jnp.bfloat16)
  cp(x).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(10):
    r = cp(x)
  r.block_until_ready()
  bw = 2 * x.size * 2 * 10 / (time.perf_counter() - t0)
  return flops, bw, "jnp"


PROFILED_MODES = ("none", "hydragen")


def cupti_spans(run) -> tuple:
  """([(start us, end us, name)] of run()'s GPU activity, run's result) through CUPTI
  (`profile_decode_h200.cupti_timeline`), after one run() to compile and warm up."""
  import torch
  run()
  torch.cuda.synchronize()
  return _profile_decode().cupti_timeline(run)


STEP_MARKER = "Memcpy DtoH"   # the copy of the decode loop's condition: one an iteration


def step_timeline(spans: list, marker: str = STEP_MARKER,
                  decode_steps: Optional[int] = None, steps_per_cut: int = 1) -> dict:
  """One decode step on the GPU's timeline: a generation's spans (`cupti_spans`) cut at the
  end of each `marker` activity (at least one a decode iteration), every stretch between two
  consecutive cuts a step, but the first and the last (the prefill's end, the generation's
  own copies). Returns the steps' count, the median step's wall, busy (the union of its
  activities) and idle us, the walls' range, and the gaps a step (averaged over the steps,
  summed per (before, after) pair, `profile_decode_h200.timeline_stats`; the gap that opens
  a step counts after the marker); `decode_steps` (the generation's, if given) is passed
  through for the report. Other copies cut too: on the H200 (run 16) a generation of 7
  decode steps gave 10 stretches of 0.8-218.6 ms, so the median, not the mean, is the
  step's figure. (The difference of two generations' walls is no step: it mixes in their
  non-step stretches, which differ, and gave more busy than wall time.) steps_per_cut: decode
  steps between two copies of the condition (`Runtime.check_every`); a stretch's figures are
  divided by it."""
  pd = _profile_decode()
  cuts = [end for _, end, name in spans if name.startswith(marker)]
  steps = []
  for lo, hi in list(zip(cuts, cuts[1:]))[1:-1]:
    inside = [(max(s, lo), min(e, hi), n) for s, e, n in spans if e > lo and s < hi]
    steps.append(pd.timeline_stats([(lo, lo, marker)] + sorted(inside), top=None))
  if not steps:
    return {"steps": 0, "decode_steps": decode_steps, "wall_us": 0.0, "busy_us": 0.0,
            "idle_us": 0.0, "wall_range": [], "gaps": []}
  mid = sorted(steps, key=lambda x: x["wall_us"])[len(steps) // 2]
  gaps = {}
  for st in steps:
    for before, after, n, t in st["gaps"]:
      m, u = gaps.get((before, after), (0, 0.0))
      gaps[(before, after)] = (m + n, u + t)
  ranked = sorted(gaps.items(), key=lambda kv: -kv[1][1])
  walls = [x["wall_us"] / steps_per_cut for x in steps]
  per = len(steps) * steps_per_cut
  return {"steps": len(steps), "decode_steps": decode_steps, "steps_per_cut": steps_per_cut,
          "wall_us": mid["wall_us"] / steps_per_cut, "busy_us": mid["busy_us"] / steps_per_cut,
          "idle_us": mid["idle_us"] / steps_per_cut, "wall_range": [min(walls), max(walls)],
          "gaps": [[x, y, n / per, t / per] for (x, y), (n, t) in ranked]}


def subtract(a: dict, b: dict) -> dict:
  """{kernel: (launches, us)} of a minus b, over the kernels of either."""
  zero = (0, 0.0)
  return {k: (a.get(k, zero)[0] - b.get(k, zero)[0], a.get(k, zero)[1] - b.get(k, zero)[1])
          for k in set(a) | set(b)}


def per_step(longer: dict, shorter: dict, steps: int) -> dict:
  """{kernel: (launches, us)} of one decode step: the kernels of a generation `steps` decode
  steps longer than another, minus the other's, over `steps` (kernels that cancel dropped)."""
  if steps < 1:
    raise ValueError(f"the longer generation ran {steps} more decode steps (need >= 1)")
  return {k: (n / steps, t / steps) for k, (n, t) in subtract(longer, shorter).items() if n}


def profile_decode_step(generate, steps: int, steps_per_cut: int = 1) -> tuple:
  """(kernels of one decode step, its timeline, note): `generate(max_new_tokens)` profiled at
  2 and 2 + steps new tokens (`per_step`, `step_timeline`); the note says when their
  signatures' suffix capacities differ (then the two decode programs differ and the
  difference is approximate)."""
  pd = _profile_decode()
  short, g_short = cupti_spans(lambda: generate(2))
  long, g_long = cupti_spans(lambda: generate(2 + steps))
  note = ""
  a, b = g_short.signature, g_long.signature
  if a is not None and b is not None and a.main != b.main:
    note = f"suffix passes differ ({a.main} vs {b.main}): approximate"
  n = g_long.decode_steps - g_short.decode_steps
  return (per_step(pd.aggregate(long), pd.aggregate(short), n),
          step_timeline(long, decode_steps=g_long.decode_steps, steps_per_cut=steps_per_cut),
          note)


def timeline_report(point: str, timelines: dict, top: int = 6) -> str:
  """{mode: `step_timeline`} of one point -> a block per mode: wall, busy and idle us a
  decode step, and its largest gaps."""
  short = _profile_decode().short
  lines = []
  for mode, tl in timelines.items():
    walls = "-".join(f"{w:.1f}" for w in tl["wall_range"])
    of = f" of a generation of {tl['decode_steps']}" if tl.get("decode_steps") else ""
    lines.append(f"\n{point} {mode}, a decode step on the GPU's timeline (the median of "
                 f"{tl['steps']} stretches between copies{of}, walls {walls} us): "
                 f"{tl['wall_us']:.1f} us wall, {tl['busy_us']:.1f} busy, "
                 f"{tl['idle_us']:.1f} idle")
    for before, after, n, t in tl["gaps"][:top]:
      lines.append(f"  {t:10.1f} us {n:6.1f}x  gap after {short(before, 40)} "
                   f"before {short(after, 40)}")
  return "\n".join(lines)


def _profile_decode():
  """experiments/profile_decode_h200 (the CUPTI collector and the kernel names' shortening),
  importable when this file runs as a script."""
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from experiments import profile_decode_h200 as pd
  return pd


def kernel_report(point: str, modes: dict, layers: int, top: int = 30) -> str:
  """modes: {mode: {kernel: (launches, us)} of one decode step} of one point -> each mode's
  kernels, largest first, then per kernel the hydragen step's launches and time minus the
  other's; us a step and a layer."""
  short = _profile_decode().short
  lines = []
  for mode in PROFILED_MODES:
    agg = modes[mode]
    total = sum(t for _, t in agg.values())
    lines.append(f"\n{point} {mode}, a decode step: {sum(n for n, _ in agg.values()):.0f} "
                 f"kernels, {total:.1f} us ({total / layers:.1f} us a layer of {layers})")
    for name, (n, t) in sorted(agg.items(), key=lambda kv: -kv[1][1])[:top]:
      lines.append(f"  {t:10.1f} us {n:6.1f}x  {short(name, 90)}")
  diff = subtract(modes["hydragen"], modes["none"])
  total = sum(t for _, t in diff.values())
  lines.append(f"\n{point} hydragen minus none, a decode step: {total:.1f} us "
               f"({total / layers:.1f} us a layer)")
  for name, (n, t) in sorted(diff.items(), key=lambda kv: -abs(kv[1][1]))[:top]:
    lines.append(f"  {t:+10.1f} us {n:+6.1f}x  {short(name, 90)}")
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default="llama3-8b")
  ap.add_argument("--layers", type=int, default=None, help="override num_layers")
  ap.add_argument("--points", default="16384x1024,16384x256,1024x1024",
                  help="comma-separated PREFIXxBATCH")
  ap.add_argument("--suffix", type=int, default=16, help="unique prompt tokens per sequence")
  ap.add_argument("--new-tokens", type=int, default=64)
  ap.add_argument("--backend", default="auto")
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--unroll", default="1", help="layers per scan iteration, or 'all'")
  ap.add_argument("--xla-options", default="auto", choices=("auto", "xla-defaults"),
                  help="the engine's GPU XLA options (auto) or XLA's defaults (for comparison)")
  ap.add_argument("--check-every", type=int, default=1,
                  help="decode steps between the loop's checks (engine.Runtime.check_every); "
                  "--profile-steps must be a multiple")
  ap.add_argument("--temperature", type=float, default=0.0,
                  help="sampling temperature (0: greedy); each row draws from its own keys")
  ap.add_argument("--top-p", type=float, default=None)
  ap.add_argument("--nucleus", choices=("sort", "search"), default="sort",
                  help="how top_p's cutoff is found (engine.Runtime.nucleus)")
  ap.add_argument("--logprobs", action="store_true",
                  help="also return the tokens' log-probabilities (Generation.logprobs)")
  ap.add_argument("--ceilings", default=None, help="FLOPS,BYTES_PER_S (skip measuring)")
  ap.add_argument("--no-dump", action="store_true", help="do not dump/scan the decode HLO")
  ap.add_argument("--out", default="")   # required (checked after the other flags)
  ap.add_argument("--profile-steps", type=int, default=0,
                  help="N > 0: each mode's generations of 2 and 2 + N tokens under torch's "
                  "profiler; their difference is N decode steps")
  args = ap.parse_args(argv)
  if args.profile_steps < 0:
    raise SystemExit(f"--profile-steps must be >= 0, got {args.profile_steps}")
  if args.check_every < 1 or args.profile_steps % args.check_every:
    raise SystemExit(f"--check-every must be >= 1 and divide --profile-steps, got "
                     f"{args.check_every} (--profile-steps {args.profile_steps})")
  if not args.out:
    raise SystemExit("--out is required")
  os.makedirs(args.out, exist_ok=True)
  dump = None if args.no_dump else _setup_dump(args.out)

  import jax
  import jax.numpy as jnp
  import numpy as np
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from hydrax import engine, sharing
  from hydrax.models import configs, llama

  overrides = {} if args.layers is None else {"num_layers": args.layers}
  config = configs.LlamaConfig.from_preset(args.model, **overrides)
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.dtype(args.dtype)
  if args.ceilings:
    flops_s, bytes_s = (float(x) for x in args.ceilings.split(","))
    how = "given"
  else:
    flops_s, bytes_s, how = _ceilings(jax, jnp)
  env = {"device": str(jax.devices()[0]), "jax": jax.__version__, "model": args.model,
         "layers": config.num_layers, "dtype": args.dtype, "backend": args.backend,
         "new_tokens": args.new_tokens, "suffix": args.suffix, "unroll": args.unroll,
         "xla_options": args.xla_options, "check_every": args.check_every,
         "temperature": args.temperature, "top_p": args.top_p, "nucleus": args.nucleus,
         "logprobs": args.logprobs,
         "ceiling_flops": flops_s,
         "ceiling_bytes_per_s": bytes_s, "ceilings_from": how, "argv": sys.argv}
  print(json.dumps(env), flush=True)
  sampling = dict(temperature=args.temperature, top_p=args.top_p, logprobs=args.logprobs)
  t0 = time.perf_counter()
  model = llama.init(config, seed=0, dtype=dtype)
  print(f"init {time.perf_counter() - t0:.1f}s", flush=True)
  h, k, d, nl = config.num_heads, config.num_kv_heads, config.head_dim, config.num_layers
  item = jnp.dtype(dtype).itemsize
  rows = []
  profiled = {}      # point -> mode -> {kernel: (launches, us)} (--profile-steps)
  timelines = {}     # point -> mode -> `step_timeline` (--profile-steps)
  for point in args.points.split(","):
    p, b = (int(x) for x in point.lower().split("x"))
    rng = np.random.default_rng(0)
    head = rng.integers(3, config.vocab_size, size=p)
    prompts = [np.concatenate([head, rng.integers(3, config.vocab_size, size=args.suffix)])
               .astype(np.int32) for _ in range(b)]
    plan = sharing.plan(prompts)
    u = args.suffix + args.new_tokens / 2
    flops = 4.0 * b * h * (p + u) * d
    nbytes = item * (2 * p * k * d + 2 * b * u * k * d + 2 * b * h * d)
    floor_us = max(flops / flops_s, nbytes / bytes_s) * 1e6
    row = {"prefix": p, "batch": b, "floor_layer_us": floor_us,
           "shared_levels": len(plan.levels)}
    for mode in PROFILED_MODES:
      engine.clear_compiled_cache()
      before = set(glob.glob(os.path.join(dump, "*after_optimizations.txt"))) if dump else set()
      try:
        runtime = engine.Runtime.build(
            args.backend, unroll=True if args.unroll == "all" else int(args.unroll),
            xla_options="auto" if args.xla_options == "auto" else {},
            check_every=args.check_every, nucleus=args.nucleus)
        gen = engine.generate(model, plan, max_new_tokens=args.new_tokens, attention=mode,
                              runtime=runtime, **sampling)
      except engine.OutOfMemoryError as e:
        row[f"{mode}_error"] = str(e)[:200]
        print(f"P={p} B={b} {mode}: OOM", flush=True)
        continue
      step_ms = gen.decode_seconds / max(gen.decode_steps, 1) * 1e3
      row[f"{mode}_ms"] = step_ms
      row[f"{mode}_compile_s"] = gen.compile_seconds
      row[f"{mode}_prefill_s"] = gen.prefill_seconds
      if dump and mode == "hydragen":
        new = sorted(set(glob.glob(os.path.join(dump, "*after_optimizations.txt"))) - before)
        count, lines = _layer_sized_ops(new, b, k, d, args.suffix)
        row["decode_modules"] = [os.path.basename(n) for n in new]
        row["decode_layer_copies"] = count
        row["decode_copy_examples"] = lines
        for n in new:
          shutil.copy(n, os.path.join(args.out, f"hlo_P{p}_B{b}_{os.path.basename(n)}"))
      print(f"P={p} B={b} {mode}: step {step_ms:.2f} ms, compile {gen.compile_seconds:.1f} s, "
            f"prefill {gen.prefill_seconds:.2f} s", flush=True)
      if args.profile_steps:
        kernels, timeline, note = profile_decode_step(
            lambda n: engine.generate(model, plan, max_new_tokens=n, attention=mode,
                                      runtime=runtime, **sampling), args.profile_steps,
            args.check_every)
        profiled.setdefault(point, {})[mode] = kernels
        timelines.setdefault(point, {})[mode] = timeline
        if note:
          print(f"P={p} B={b} {mode} profile: {note}", flush=True)
    if "none_ms" in row and "hydragen_ms" in row:
      row["attn_layer_us"] = (row["hydragen_ms"] - row["none_ms"]) / nl * 1e3
      row["ideal_ms"] = row["none_ms"] + nl * floor_us / 1e3
      row["pct_of_ideal"] = 100 * row["ideal_ms"] / row["hydragen_ms"]
      row["attn_vs_floor"] = row["attn_layer_us"] / floor_us
    rows.append(row)
    with open(os.path.join(args.out, "engine.json"), "w") as f:
      json.dump({"env": env, "rows": rows}, f, indent=1)
  for point, modes in profiled.items():
    if set(modes) == set(PROFILED_MODES):
      print(kernel_report(point, modes, nl), flush=True)
    else:
      print(f"{point}: profiled {sorted(modes)} only (a mode failed): no kernel report")
    print(timeline_report(point, timelines[point]), flush=True)
  if profiled:
    with open(os.path.join(args.out, "profile.json"), "w") as f:
      json.dump({pt: {m: {k: list(v) for k, v in ks.items()} for m, ks in ms.items()}
                 for pt, ms in profiled.items()}, f, indent=1)
    with open(os.path.join(args.out, "timeline.json"), "w") as f:
      json.dump(timelines, f, indent=1)
  print("\n| P / B | none ms | hydragen ms | attn/layer us | floor/layer us | ideal ms | "
        "% of ideal | compile s (none, hyd) | [B,S,K,D] copies/slices in decode HLO |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    def g(key, fmt="{:.2f}"):
      return fmt.format(r[key]) if key in r else "-"
    print(f"| {r['prefix']} / {r['batch']} | {g('none_ms')} | {g('hydragen_ms')} | "
          f"{g('attn_layer_us', '{:.0f}')} | {g('floor_layer_us', '{:.0f}')} | {g('ideal_ms')} | "
          f"{g('pct_of_ideal', '{:.0f}%')} | {g('none_compile_s', '{:.1f}')}, "
          f"{g('hydragen_compile_s', '{:.1f}')} | {r.get('decode_layer_copies', '-')} |")


if __name__ == "__main__":
  main()
