"""Synthetic offline workloads shaped like real ones, as `hydrax.generate` requests (token ids).

  make(name, *, scale=1.0, group_scale=1.0, length_scale=1.0, vocab_size=32000, seed=0,
       max_new=(128, 256)) -> list of dicts
  python experiments/offline_workloads.py --workload system --scale 0.1 --out prompts.jsonl

Workloads (sizes at scale 1): `scale` multiplies the number of groups (system prompts,
questions, problems, control prompts), `group_scale` the requests per group (system prompt,
problem), `length_scale` every token length.
  system     48 system prompts of 1-4K tokens, each with 10-500 requests (a unique 20-200-token
             user message): synthetic-data generation, chat evaluation.
  document   one 12K-token document with 1,000 questions of 10-50 tokens (long-document QA).
  samples    128 problems of 300-1,000 tokens after a 500-token few-shot header, 64 identical
             requests each (sampled: temperature 0.8). 64 lines rather than one with n = 64:
             each draws its own max_new_tokens (below), where n completions share one.
  control    2,000 unrelated prompts of 200-2,000 tokens (no sharing).
Every request's `max_new_tokens` is drawn in [lo, hi] (default 128-256): with random weights the
model never emits EOS, so early EOS is modelled by the per-request limit. Requests arrive
shuffled (groups interleaved), as a dataset assembled from several sources would.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

WORKLOADS = ("system", "document", "samples", "control")


def _count(x: float, scale: float) -> int:
  return max(1, int(round(x * scale)))


def make(name: str, *, scale: float = 1.0, group_scale: float = 1.0, length_scale: float = 1.0,
         vocab_size: int = 32000, seed: int = 0, max_new=(128, 256)) -> list:
  """The workload's requests: dicts with id, tokens, max_new_tokens (and temperature)."""
  if name not in WORKLOADS:
    raise ValueError(f"workload must be one of {list(WORKLOADS)}, got {name!r}")
  rng = np.random.default_rng(seed)
  lo, hi = max_new

  def toks(n):
    return rng.integers(3, vocab_size, _count(n, length_scale)).tolist()

  prompts, extra = [], {}
  if name == "system":
    for _ in range(_count(48, scale)):
      system = toks(rng.integers(1024, 4097))
      for _ in range(_count(rng.integers(10, 501), group_scale)):
        prompts.append(system + toks(rng.integers(20, 201)))
  elif name == "document":
    doc = toks(12288)
    prompts = [doc + toks(rng.integers(10, 51)) for _ in range(_count(1000, scale))]
  elif name == "samples":
    header = toks(500)
    for _ in range(_count(128, scale)):
      problem = header + toks(rng.integers(300, 1001))
      prompts.extend([problem] * _count(64, group_scale))
    extra = {"temperature": 0.8}
  else:
    prompts = [toks(rng.integers(200, 2001)) for _ in range(_count(2000, scale))]
  order = rng.permutation(len(prompts))
  return [dict(id=f"{name}-{i}", tokens=prompts[j],
               max_new_tokens=int(rng.integers(lo, hi + 1)), **extra)
          for i, j in enumerate(order)]


def write_jsonl(records, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  return path


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workload", choices=WORKLOADS, required=True)
  p.add_argument("--scale", type=float, default=1.0)
  p.add_argument("--group_scale", type=float, default=1.0)
  p.add_argument("--length_scale", type=float, default=1.0)
  p.add_argument("--vocab_size", type=int, default=32000)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", required=True)
  a = p.parse_args(argv)
  recs = make(a.workload, scale=a.scale, group_scale=a.group_scale,
              length_scale=a.length_scale, vocab_size=a.vocab_size, seed=a.seed)
  write_jsonl(recs, a.out)
  print(f"{len(recs)} requests, {sum(len(r['tokens']) for r in recs):,} prompt tokens -> "
        f"{a.out}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
