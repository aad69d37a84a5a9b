"""The offline schedule of the benchmark's workloads without running a model (CPU, seconds).

    python experiments/schedule_signatures.py [--model llama3-8b] [--scale 0.25]
        [--group_scale 0.1] [--length_scale 1] [--memory_budget 8e9] [--max_batch 128]

For each workload of `offline_workloads.py`, the global schedule that `hydrax.generate.run`
would make (same defaults as `bench_offline.py`): batches, their request counts, distinct
compiled signatures (each costs a prefill and a decode compile on the device), and the
planning seconds on this machine. Signatures are what the wall time with compiles follows.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments import offline_workloads  # noqa: E402
from hydrax.models import configs  # noqa: E402
from hydrax.offline import schedule  # noqa: E402


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="llama3-8b")
  p.add_argument("--scale", type=float, default=0.25)
  p.add_argument("--group_scale", type=float, default=0.1)
  p.add_argument("--length_scale", type=float, default=1.0)
  p.add_argument("--memory_budget", type=float, default=8e9)
  p.add_argument("--max_batch", type=int, default=128)
  p.add_argument("--min_shared_tokens", type=float, default=256)
  p.add_argument("--workloads", default=",".join(offline_workloads.WORKLOADS))
  args = p.parse_args(argv)
  config = configs.LlamaConfig.from_preset(args.model)
  print("| workload | requests | batches | signatures | requests a batch | planning s |")
  print("|---|---|---|---|---|---|")
  for name in filter(None, args.workloads.split(",")):
    recs = offline_workloads.make(name, scale=args.scale, group_scale=args.group_scale,
                                  length_scale=args.length_scale,
                                  vocab_size=config.vocab_size)
    seqs = [np.asarray(r["tokens"], np.int32) for r in recs]
    keys = [(("temperature", r.get("temperature", 0.0)),) for r in recs]
    t0 = time.perf_counter()
    sched = schedule.schedule(
        seqs, [r["max_new_tokens"] for r in recs], keys, config=config, dtype=jnp.bfloat16,
        memory_budget=int(args.memory_budget), max_batch=args.max_batch,
        sharing_options=dict(min_shared_tokens=args.min_shared_tokens, merge_cost=16,
                             max_levels=2))
    seconds = time.perf_counter() - t0
    sizes = [len(b.rows) for b in sched.batches]
    shown = ", ".join(map(str, sizes[:10])) + (", ..." if len(sizes) > 10 else "")
    print(f"| {name} | {len(seqs)} | {len(sizes)} | {sched.signatures} | {shown} | "
          f"{seconds:.2f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
