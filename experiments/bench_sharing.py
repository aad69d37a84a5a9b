"""Benchmark of hydrax.sharing.plan: time and peak memory to plan B prompts of ~L tokens.

    python experiments/bench_sharing.py --sizes 10000,100000

Workloads (token ids in [0, 32000), the B sequences handed over as a list of int32 arrays in
random order, as a batch of requests would arrive):
  tree:   a 500-token few-shot prefix shared by all, B/100 problems of 300 tokens, 100 samples
          per problem each with its own 200 tokens (the paper's hierarchy, found by search);
  chat:   ragged prompts (600..1400 tokens): a 30-token template, one of 64 system prompts of
          200..400 tokens, then a unique user message;
  random: unique random prompts of L tokens (nothing worth sharing);
  chain:  every prompt a prefix of one 2L-token document, lengths uniform in [1, 2L] (a deep
          tree of 2L nodes: the adversarial case for a sort that peels one node per pass).

Columns: plan_s = `plan(...)` (validation, radix tree, cost model), median of --repeats;
arrays_s = building the padded `levels` and `suffix_tokens` afterwards; input_MB = the
token ids handed in (int32); plan_MB = peak of traced allocations during `plan` (tracemalloc,
a separate run; the plan keeps one int32 copy of the input), peak_MB = the same peak once the
padded arrays are built too; nodes = radix-tree nodes / kept nodes; stored = tokens stored by the
plan; ratio = tokens if every prefix were copied / stored.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from hydrax.sharing import plan  # noqa: E402

VOCAB = 32000


def tree_workload(b: int, length: int, rng) -> list:
  prefix, problem = length // 2, (3 * length) // 10
  own = length - prefix - problem
  per = 100
  problems = rng.integers(0, VOCAB, (max(1, b // per), problem), dtype=np.int32)
  arr = np.empty((b, length), np.int32)
  arr[:, :prefix] = rng.integers(0, VOCAB, prefix, dtype=np.int32)
  arr[:, prefix:prefix + problem] = problems[np.minimum(np.arange(b) // per, len(problems) - 1)]
  arr[:, prefix + problem:] = rng.integers(0, VOCAB, (b, own), dtype=np.int32)
  return list(arr[rng.permutation(b)])


def chat_workload(b: int, length: int, rng) -> list:
  template = rng.integers(0, VOCAB, 30, dtype=np.int32)
  systems = [rng.integers(0, VOCAB, n, dtype=np.int32) for n in rng.integers(200, 401, 64)]
  lengths = rng.integers(int(length * 0.6), int(length * 1.4) + 1, b)
  pool = rng.integers(0, VOCAB, int(lengths.sum()), dtype=np.int32)
  out, pos = [], 0
  for i, sys_i in enumerate(rng.integers(0, 64, b)):
    head = np.concatenate([template, systems[sys_i]])
    tail = max(1, int(lengths[i]) - head.size)
    out.append(np.concatenate([head, pool[pos:pos + tail]]))
    pos += tail
  return out


def random_workload(b: int, length: int, rng) -> list:
  return list(rng.integers(0, VOCAB, (b, length), dtype=np.int32))


def chain_workload(b: int, length: int, rng) -> list:
  doc = rng.integers(0, VOCAB, 2 * length, dtype=np.int32)
  return [doc[:n] for n in rng.integers(1, 2 * length + 1, b)]


WORKLOADS = {"tree": tree_workload, "chat": chat_workload, "random": random_workload,
             "chain": chain_workload}


def _run(seqs, **kw):
  t0 = time.perf_counter()
  p = plan(seqs, **kw)
  t1 = time.perf_counter()
  _ = p.levels, p.suffix_tokens
  t2 = time.perf_counter()
  return p, t1 - t0, t2 - t1


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--sizes", default="10000,100000", help="comma-separated batch sizes B")
  ap.add_argument("--length", type=int, default=1000, help="tokens per sequence (about)")
  ap.add_argument("--workloads", default="tree,chat,random,chain")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--share-all", action="store_true",
                  help="min_shared_tokens=0, merge_cost=0 instead of the default cost model")
  ap.add_argument("--no-memory", action="store_true", help="skip the tracemalloc run")
  args = ap.parse_args(argv)
  kw = dict(min_shared_tokens=0, merge_cost=0) if args.share_all else {}
  print(f"numpy {np.__version__}, {os.cpu_count()} CPUs, cost model "
        f"{'share-all' if args.share_all else 'default'}; L ~ {args.length}")
  head = (f"{'workload':>8} {'sequences':>10} {'tokens':>12} {'plan_s':>7} {'arrays_s':>8} "
          f"{'input_MB':>8} {'plan_MB':>8} {'peak_MB':>8} {'nodes':>13} {'levels':>6} "
          f"{'stored':>12} {'ratio':>7}")
  print(head)
  print("-" * len(head))
  for b in (int(x) for x in args.sizes.split(",")):
    for name in args.workloads.split(","):
      seqs = WORKLOADS[name](b, args.length, np.random.default_rng(0))
      tokens = sum(s.size for s in seqs)
      times, arrays = [], []
      for _ in range(args.repeats):
        gc.collect()
        p, t_plan, t_arr = _run(seqs, **kw)
        times.append(t_plan)
        arrays.append(t_arr)
        del p
      plan_peak = peak = float("nan")
      if not args.no_memory:
        gc.collect()
        tracemalloc.start()
        p = plan(seqs, **kw)
        plan_peak = tracemalloc.get_traced_memory()[1] / 2**20
        _ = p.levels, p.suffix_tokens
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        del p, _
      p = plan(seqs, **kw)
      st = p.stats
      print(f"{name:>8} {b:>10} {tokens:>12} {statistics.median(times):>7.2f} "
            f"{statistics.median(arrays):>8.2f} {tokens * 4 / 2**20:>8.0f} {plan_peak:>8.0f} "
            f"{peak:>8.0f} "
            f"{f'{st.radix_nodes}/{sum(st.nodes_per_level)}':>13} {st.levels:>6} "
            f"{st.stored_tokens:>12} {st.ratio:>7.2f}", flush=True)
      del p, seqs


if __name__ == "__main__":
  main()
