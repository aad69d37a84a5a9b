"""Where a decode attention call's device time goes, kernel by kernel (H200, under ncu).

Axis letters: B sequences, P shared-prefix length, U per-sequence suffix length, H query heads,
K KV heads, D head dim.

The call is the one `experiments/check_fused_h200.py` times (`hydrax_fn`: one prefix shared by
all B sequences, per-sequence suffixes, caches stacked and read at a traced layer, lengths and
owners as inputs, as the engine passes them: as constants, XLA would write them with a kernel
each call). Each shape is compiled and warmed up outside the profiled region; then,
inside it (cudaProfilerStart/Stop through torch), `--calls` calls run one at a time, each
preceded by a marker kernel (a jitted elementwise op on 12,345 floats: the region's first
kernel, told apart by its name, grid and block together) so that the kernels of one call can
be told apart. Run under Nsight Compute with one metric and the clocks left
alone, then parse its CSV:

    ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum \
      --csv --log-file $OUT/ncu.csv python3 experiments/profile_decode_h200.py \
      --shapes 16384x256,4096x256 --out $OUT
    python3 experiments/profile_decode_h200.py --parse $OUT/ncu.csv --shapes 16384x256,4096x256

With `--layers L` (> 1) a call is the engine's form of a decode step's attention: a
`lax.scan` over L layers of stacked caches, each layer's q the previous layer's output, the
lengths and owners shared (`check_fused_h200.hydrax_layers_fn`), and the report gives the
serialised time per layer; with `--prepared` the work that does not depend on the layer (the
key limits, the kernels' tables) runs once before the scan (`hydrax.attention.prepare`).

`--config` takes one pallas Config change or a list of them (each a group of every shape),
and `--peers torch_sdpa,cudnn,flashinfer` profiles the peers (the copied-prefix baselines,
FlashInfer's cascade) after hydrax's groups,
so the report holds each call's kernels in one process: the op's device time alone, without
the host's launches (a jitted loop of small calls can be bound by them: run 13).

ncu serialises kernels, so the per-kernel times add up to more than a step where kernels could
overlap; what it gives is each launch's own duration: the attention kernels against the XLA
work around them. `--out` also gets each shape's optimised HLO (fusions and custom calls).
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import os
import re
import sys
from typing import Optional

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")   # torch shares the GPU
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_UNITS = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3,
          "second": 1e6, "s": 1e6}
MARKER_ELEMENTS = 12345


def parse_shapes(text: str):
  try:
    return [tuple(int(x) for x in s.split("x")) for s in text.split(",") if s]
  except ValueError:
    raise SystemExit(f"--shapes must be a list of PxB like 16384x256, got {text!r}") from None


def read_kernels(path: str):
  """[(kernel name, grid, block, microseconds)] in launch order from ncu's CSV (one metric)."""
  with open(path, newline="") as f:
    lines = [line for line in f if line.startswith('"')]   # drop ==PROF== and program lines
  out = []
  for row in csv.DictReader(lines):
    if row.get("Metric Name") != "gpu__time_duration.sum":
      continue
    unit = row.get("Metric Unit", "nsecond")
    if unit not in _UNITS:
      raise SystemExit(f"{path}: unknown time unit {unit!r}")
    value = float(row["Metric Value"].replace(",", ""))
    out.append((row["Kernel Name"], row.get("Grid Size", ""), row.get("Block Size", ""),
                value * _UNITS[unit]))
  return out


def split_calls(kernels):
  """Calls in launch order: the region's first kernel is the marker; each call is the
  kernels after a marker (same name, grid and block) up to the next one."""
  if not kernels:
    return []
  marker = kernels[0][:3]
  calls = []
  for name, grid, block, us in kernels:
    if (name, grid, block) == marker:
      calls.append([])
    else:
      calls[-1].append((f"{name} {grid}", us))
  return calls


def short(name: str, width: int = 60) -> str:
  name = re.sub(r"\s+", " ", name)
  return name if len(name) <= width else name[:width - 3] + "..."


def parse_configs(text: str) -> list:
  """--config: a JSON object (one pallas Config change) or a non-empty list of them."""
  try:
    configs = json.loads(text)
  except json.JSONDecodeError as e:
    raise SystemExit(f"--config must be JSON, got {text!r} ({e.msg})") from None
  configs = configs if isinstance(configs, list) else [configs]
  if not configs or not all(isinstance(c, dict) for c in configs):
    raise SystemExit(f"--config must be a JSON object or a non-empty list of them, "
                     f"got {text!r}")
  return configs


def group_labels(shapes, configs: int = 1, peers=()) -> list:
  """The profiled groups of calls in launch order: every shape under each of `configs`
  pallas configurations, then every shape of each peer (`experiments/peers.py`)."""
  labels = []
  for c in range(configs):
    tag = f" config {c}" if configs > 1 else ""
    labels += [f"P{p}_B{b}{tag}" for p, b in shapes]
  for peer in peers:
    labels += [f"P{p}_B{b} {peer}" for p, b in shapes]
  return labels


def report(path: str, shapes, calls_per_shape: int, layers: int = 1, configs: int = 1,
           peers=()) -> str:
  """Per group (`group_labels`): each kernel of one call (median over the calls), its share,
  the total (and per layer, for calls of `layers` layers)."""
  calls = split_calls(read_kernels(path))
  labels = group_labels(shapes, configs, peers)
  want = len(labels) * calls_per_shape
  if len(calls) != want:
    raise SystemExit(f"{path}: found {len(calls)} marked calls, expected {want} "
                     f"({len(labels)} groups x {calls_per_shape} calls)")
  lines = []
  for i, label in enumerate(labels):
    group = calls[i * calls_per_shape:(i + 1) * calls_per_shape]
    counts = {len(c) for c in group}
    if len(counts) != 1:
      raise SystemExit(f"{label}: calls launched different kernel counts {sorted(counts)}")
    per_kernel = collections.defaultdict(list)
    for c in group:
      for j, (name, us) in enumerate(c):
        per_kernel[(j, name)].append(us)
    rows = [(j, name, sorted(v)[len(v) // 2]) for (j, name), v in sorted(per_kernel.items())]
    total = sum(us for _, _, us in rows)
    per_layer = f", {total / layers:.1f} us a layer of {layers}" if layers > 1 else ""
    lines.append(f"\n{label}: {len(rows)} kernels, {total:.1f} us serialised "
                 f"(median of {calls_per_shape} calls){per_layer}")
    for j, name, us in rows:
      lines.append(f"  {j:2d} {us:8.1f} us {100 * us / total:5.1f}%  {short(name)}")
  return "\n".join(lines)


PEERS = ("torch_sdpa", "cudnn", "flashinfer")


def _peer_call(peer: str, p: int, b: int, u: int, h: int, kh: int, d: int, case):
  """A peer's decode call on `case`: torch SDPA (`peers.torch_sdpa_call`) or cuDNN through jax
  with the prefix copied into every sequence (the copies made here), or FlashInfer's cascade
  (`peers.flashinfer_call`, planned here)."""
  import jax
  import torch

  from experiments import bench_attention as ba
  from experiments import peers as peer_fns
  if peer in ("torch_sdpa", "flashinfer"):
    f, _ = (peer_fns.torch_sdpa_call(b, case) if peer == "torch_sdpa"
            else peer_fns.flashinfer_call(b, p, u, h, kh, d, case))
    return lambda: (f(), torch.cuda.synchronize())
  q, kp, vp, ks, vs = case
  k, v = ba.replicated(kp[0], vp[0], ks[0], vs[0])
  return lambda: jax.block_until_ready(ba.CUDNN(q, k, v))


def cupti_timeline(run) -> tuple:
  """([(start us, end us, name)] of every GPU activity of run() (kernels, copies, memsets)
  by start, as CUPTI records it through torch's profiler (no ncu: kernels not serialised, no
  replay; jax's kernels included); run's result)."""
  import torch
  from torch.profiler import ProfilerActivity, profile as torch_profile
  with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
    result = run()
    torch.cuda.synchronize()
  spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                 if e.device_type == torch.autograd.DeviceType.CUDA
                 and e.time_range.end > e.time_range.start)
  return spans, result


def aggregate(spans) -> dict:
  """{name: (launches, total us)} of `cupti_timeline` spans."""
  out = {}
  for start, end, name in spans:
    n, t = out.get(name, (0, 0.0))
    out[name] = (n + 1, t + (end - start))
  return out


def timeline_stats(spans, top: Optional[int] = 8) -> dict:
  """What a stretch of GPU activity spent: wall (first start to last end), busy (the union of
  the spans: overlapping kernels count once), idle = wall - busy, and the gaps between
  consecutive activities (no activity at all) summed per (before, after) pair of names,
  largest first (`top` of them, None: all; us and count)."""
  if not spans:
    return {"wall_us": 0.0, "busy_us": 0.0, "idle_us": 0.0, "gaps": []}
  busy, reach = 0.0, spans[0][0]
  gaps, last = {}, None
  for start, end, name in spans:
    if start > reach and last is not None:
      n, t = gaps.get((last, name), (0, 0.0))
      gaps[(last, name)] = (n + 1, t + (start - reach))
    busy += max(0.0, end - max(start, reach))
    if end >= reach:
      reach, last = end, name
  wall = reach - spans[0][0]
  ranked = sorted(gaps.items(), key=lambda kv: -kv[1][1])[:top]
  return {"wall_us": wall, "busy_us": busy, "idle_us": wall - busy,
          "gaps": [[a, b, n, t] for (a, b), (n, t) in ranked]}


def cupti_collect(run) -> tuple:
  """({kernel name: (launches, total us)}, run's result) of run() (`cupti_timeline`)."""
  spans, result = cupti_timeline(run)
  return aggregate(spans), result


def cupti_kernels(label: str, call, calls: int) -> str:
  """The kernels of `calls` calls of call() (`cupti_collect`) as a report block: per kernel
  its mean time a call; the total is the op's device time alone, less any overlap of its
  kernels."""
  kernels, _ = cupti_collect(lambda: [call() for _ in range(calls)])
  count = sum(n for n, _ in kernels.values())
  per = {name: t / calls for name, (_, t) in kernels.items()}
  total = sum(per.values())
  lines = [f"\n{label}: {count / calls:.0f} kernels, {total:.1f} us (CUPTI, mean of {calls} calls)"]
  for j, (name, us) in enumerate(sorted(per.items(), key=lambda kv: -kv[1])):
    lines.append(f"  {j:2d} {us:8.1f} us {100 * us / max(total, 1e-9):5.1f}%  {short(name)}")
  return "\n".join(lines)


def profile(shapes, calls: int, out: str, u: int, h: int, kh: int, d: int,
            configs, layers: int = 1, prepared: bool = False, peers=(),
            cupti: bool = False) -> None:
  """Profiles the groups of `group_labels(shapes, len(configs), peers)` in that order:
  hydrax's call under each pallas Config change of `configs`, then each peer's. Each group
  is compiled and warmed up, profiled (`calls` calls, each after a marker) and freed before
  the next: the peers' copied caches of one shape at a time stay in memory."""
  import jax
  import jax.numpy as jnp
  import torch

  from experiments import bench_attention as ba
  from experiments import check_fused_h200 as cf
  from hydrax.attention import backends

  torch.cuda.init()
  marker = jax.jit(lambda x: jnp.sin(x) * 3.0)
  x = jnp.ones((MARKER_ELEMENTS,), jnp.float32)
  jax.block_until_ready(marker(x))
  os.makedirs(out, exist_ok=True)
  cases = {(p, b): ba.make_case(jax.random.key(p + b), b, p, u, h, kh, d, copies=layers)
           for p, b in shapes}

  labels = iter(group_labels(shapes, len(configs), peers))

  def run(call):
    for _ in range(3):
      call()
    torch.cuda.synchronize()
    if cupti:
      print(cupti_kernels(next(labels), call, calls), flush=True)
      return
    torch.cuda.profiler.start()
    for _ in range(calls):
      jax.block_until_ready(marker(x))
      call()
    torch.cuda.profiler.stop()

  for c, config in enumerate(configs):
    for p, b in shapes:
      case = cases[(p, b)]
      backend = backends.get("pallas", **config)
      args = case + ba.plan_inputs(case)                      # lengths, owners: inputs
      if layers > 1:
        fn = cf.hydrax_layers_fn(b, p, u, backend, layers, prepared)
      else:
        fn = cf.hydrax_fn(b, p, u, backend)
        args = args + (jnp.int32(0),)
      with open(os.path.join(out, f"hlo_P{p}_B{b}_config{c}.txt"), "w") as f:
        f.write(fn.lower(*args).compile().as_text())
      run(lambda fn=fn, args=args: jax.block_until_ready(fn(*args)))
  for peer in peers:
    for p, b in shapes:
      run(_peer_call(peer, p, b, u, h, kh, d, cases[(p, b)]))   # copies freed on return
      torch.cuda.empty_cache()                      # (torch's cached blocks back for jax)
  print(f"profiled {len(group_labels(shapes, len(configs), peers))} groups x {calls} calls")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--shapes", default="16384x256,4096x256", help="PxB list")
  ap.add_argument("--calls", type=int, default=3, help="profiled calls per shape")
  ap.add_argument("--out", default="profile_decode")
  ap.add_argument("--parse", default="", help="ncu CSV to report instead of profiling")
  ap.add_argument("--suffix", type=int, default=128, help="U, keys per sequence's suffix")
  ap.add_argument("--config", default="{}",
                  help="JSON of pallas_gpu.Config changes, or a list of them (a group each)")
  ap.add_argument("--peers", default="",
                  help="comma list of peers profiled after hydrax (`_peer_call`): "
                  + ", ".join(PEERS))
  ap.add_argument("--cupti", action="store_true",
                  help="without ncu: each group's kernels through torch's profiler (CUPTI), "
                  "printed as they run")
  ap.add_argument("--layers", type=int, default=1,
                  help="L > 1: a call is a lax.scan over L layers (the engine's form)")
  ap.add_argument("--prepared", action="store_true",
                  help="with --layers: the levels' limits and tables prepared once before the "
                  "scan (`hydrax.attention.prepare`, as llama.forward does)")
  args = ap.parse_args(argv)
  if args.calls < 1:
    raise SystemExit(f"--calls must be >= 1, got {args.calls}")
  if args.layers < 1:
    raise SystemExit(f"--layers must be >= 1, got {args.layers}")
  shapes = parse_shapes(args.shapes)
  configs = parse_configs(args.config)
  peers = [x for x in args.peers.split(",") if x]
  bad = [x for x in peers if x not in PEERS]
  if bad:
    raise SystemExit(f"--peers: one of {', '.join(PEERS)}, got {bad[0]!r}")
  if args.parse:
    print(report(args.parse, shapes, args.calls, args.layers, len(configs), peers))
    return
  profile(shapes, args.calls, args.out, args.suffix, 32, 8, 128, configs,
          args.layers, args.prepared, peers, args.cupti)


if __name__ == "__main__":
  main()
