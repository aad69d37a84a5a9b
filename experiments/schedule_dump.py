"""Dumps the offline schedules of the benchmark's workloads, to prove a change keeps them.

    python experiments/schedule_dump.py dump OUT.pkl [--sizes full,small]
    python experiments/schedule_dump.py compare BEFORE.pkl AFTER.pkl

For each size (full: scale 1, group_scale 1, 77e9 bytes, max_batch 256; small: scale 0.25,
group_scale 0.1, 8e9 bytes, max_batch 128, as `schedule_signatures.py`), each workload of
`offline_workloads.py` and each strategy, every batch in run order: its rows, padded size, key,
max_new_tokens, KV bytes, prefill/decode/tree tokens, signature, plan order and plan stats,
and the schedule's totals. `compare` exits 1 naming the schedules that differ.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments import offline_workloads  # noqa: E402
from hydrax.models import configs  # noqa: E402
from hydrax.offline import schedule  # noqa: E402

SIZES = {"full": dict(scale=1, group_scale=1, memory_budget=77e9, max_batch=256),
         "small": dict(scale=0.25, group_scale=0.1, memory_budget=8e9, max_batch=128)}


def _record(sched) -> dict:
  """What a schedule decides, as plain comparable values."""
  batches = [(b.rows, b.size, b.key, b.max_new_tokens, b.kv_bytes, b.prefill_tokens,
              b.decode_tokens, b.tree_tokens, b.signature, tuple(np.asarray(b.plan.order).tolist()),
              b.plan.stats) for b in sched.batches]
  totals = (sched.prompt_tokens, sched.tree_tokens, sched.prefill_tokens,
            sched.reprefill_tokens, sched.budget)
  return dict(batches=batches, totals=totals)


def dump(out: str, sizes) -> None:
  config = configs.LlamaConfig.from_preset("llama3-8b")
  records = {}
  for size in sizes:
    a = SIZES[size]
    for name in offline_workloads.WORKLOADS:
      recs = offline_workloads.make(name, scale=a["scale"], group_scale=a["group_scale"],
                                    vocab_size=config.vocab_size)
      seqs = [np.asarray(r["tokens"], np.int32) for r in recs]
      keys = [(("temperature", r.get("temperature", 0.0)),) for r in recs]
      for strategy in schedule.STRATEGIES:
        sched = schedule.schedule(
            seqs, [r["max_new_tokens"] for r in recs], keys, config=config,
            dtype=jnp.bfloat16, memory_budget=int(a["memory_budget"]),
            max_batch=a["max_batch"], strategy=strategy,
            sharing_options=dict(min_shared_tokens=256, merge_cost=16, max_levels=2))
        records[(size, name, strategy)] = _record(sched)
        print(f"{size} {name} {strategy}: {len(sched.batches)} batches, planning "
              f"{sched.seconds:.2f} s", flush=True)
  with open(out, "wb") as f:
    pickle.dump(records, f)


def compare(before: str, after: str) -> int:
  with open(before, "rb") as f, open(after, "rb") as g:
    a, b = pickle.load(f), pickle.load(g)
  differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
  print(f"{len(a.keys() | b.keys())} schedules: " +
        ("identical" if not differ else f"these differ: {differ}"))
  return 1 if differ else 0


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="command", required=True)
  d = sub.add_parser("dump")
  d.add_argument("out")
  d.add_argument("--sizes", default=",".join(SIZES))
  c = sub.add_parser("compare")
  c.add_argument("before")
  c.add_argument("after")
  args = p.parse_args(argv)
  if args.command == "dump":
    dump(args.out, args.sizes.split(","))
    return 0
  return compare(args.before, args.after)


if __name__ == "__main__":
  sys.exit(main())
