"""The engine's greedy tokens checked on the device it runs on (the GPU check of the decode loop:
the cache writes, `Runtime.check_every`, the attention backend inside the loop).

  python experiments/check_engine.py [--preset llama3-8b --layers 2 --dtype bfloat16]
      [--backend auto] [--check-every 1,4] [--batch 64 --prefix 1000 --new 40]
      [--attention hydragen,replicated] [--tolerance 0.25] [--out DIR]

For each attention mode, generates greedily once per check_every value: the tokens must be
identical (the same step runs, only the loop's checks differ). Then scores them against the
model's full forward pass without a cache (the XLA backend, float32 copies of the weights,
teacher-forced on the generated tokens): at each generated position, the gap between the
highest logit and the chosen token's, in units of that position's logits' standard deviation.
A token chosen from a wrong cache (a write lost or misplaced) lands far from the top; bf16's
rounding moves near-ties only, within `--tolerance`. Its default, 0.25, lies between what was
measured (llama3-8b, 2 layers, bf16): rounding, worst 0.022 on the CPU (8 x 16 tokens) and
0.062 / 0.081 (hydragen / replicated, 64 x 40 tokens) on an H100; a planted cache bug (each
decode step's key written over the one before), 1.28 on the CPU
(experiments/results/fused_h200/README.md, run 20). The prompts are a shared-prefix batch:
two roots of about `--prefix` tokens, each sequence with 8..71 tokens of its own; hydragen
fails the check if its plan shared nothing (it would have checked the replicated layout).
Prints which custom calls the decode program launches (the kernels the backend ran) and a
table, writes `check_engine.json` under --out (default $OUT, else .). Exit 0 when all pass.
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
from flax import nnx

from hydrax import engine
from hydrax.models import LlamaConfig, llama


def shared_prompts(vocab: int, batch: int, prefix: int, seed: int = 0) -> list:
  """`batch` prompts under two roots of about `prefix` tokens, 8..71 own tokens each."""
  rng = np.random.default_rng(seed)
  roots = [rng.integers(3, vocab, max(prefix - 17 * r, 1)) for r in range(2)]
  return [np.concatenate([roots[i % 2], rng.integers(3, vocab, 8 + (7 * i) % 64)]).astype(
      np.int32) for i in range(batch)]


def reference_gaps(graphdef, params, prompts: list, tokens: np.ndarray,
                   lengths: np.ndarray, rows_a_pass: int = 16) -> np.ndarray:
  """[B, N] the gap between the highest logit and that of the generated token at each of its
  positions (NaN past a row's length), in units of the position's logits' standard deviation;
  from full forward passes (no cache, XLA, float32) over prompt + generated tokens."""
  params32 = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32)
                                    if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
  b, n = tokens.shape
  seq = np.zeros((b, max(len(p) for p in prompts) + n), np.int32)
  at = np.zeros((b, n), np.int32)        # the position whose logits choose each token
  for i, p in enumerate(prompts):
    seq[i, :len(p)] = p
    seq[i, len(p):len(p) + n] = tokens[i]
    at[i] = len(p) - 1 + np.arange(n)

  @jax.jit
  def gaps_of(params, seq, at, chosen):
    model = nnx.merge(graphdef, params)
    positions = jnp.broadcast_to(jnp.arange(seq.shape[1], dtype=jnp.int32), seq.shape)
    hidden, _ = llama.forward(model, seq, positions, None, backend="xla")
    logits = llama.logits(model, jnp.take_along_axis(hidden, at[..., None], axis=1))
    picked = jnp.take_along_axis(logits, chosen[..., None], axis=-1)[..., 0]
    return (logits.max(-1) - picked) / logits.std(-1)

  gaps = np.concatenate([np.asarray(gaps_of(params32, seq[lo:lo + rows_a_pass],
                                            at[lo:lo + rows_a_pass],
                                            tokens[lo:lo + rows_a_pass]), np.float64)
                         for lo in range(0, b, rows_a_pass)])
  gaps[np.arange(n)[None, :] >= np.asarray(lengths)[:, None]] = np.nan
  return gaps


def decode_custom_calls() -> list:
  """The custom-call targets of the last compiled decode program (its kernels)."""
  decode = list(engine._EXECUTABLES.items.values())[-1][1]    # pylint: disable=protected-access
  return sorted(set(re.findall(r'custom_call_target="([^"]+)"', decode.as_text())))


def check(model, prompts: list, *, attention: str, backend: str, check_every: list, new: int,
          tolerance: float) -> dict:
  """One attention mode: generations for each check_every, their agreement, their gaps."""
  graphdef, params = engine.resolve_model(model, None)[:2]
  runs, calls = {}, None
  for every in check_every:
    runtime = engine.Runtime.build(backend, check_every=every)
    t0 = time.perf_counter()
    gen = engine.generate(model, prompts, max_new_tokens=new, attention=attention,
                          runtime=runtime,
                          sharing_options=dict(min_shared_tokens=16, merge_cost=1))
    runs[every] = (gen, time.perf_counter() - t0)
    calls = decode_custom_calls() if calls is None else calls
  first = runs[check_every[0]][0]
  same = all(np.array_equal(g.tokens, first.tokens) and np.array_equal(g.lengths, first.lengths)
             for g, _ in runs.values())
  gaps = reference_gaps(graphdef, params, prompts, np.asarray(first.tokens),
                        np.asarray(first.lengths))
  worst = float(np.nanmax(gaps))
  # hydragen must have run on shared levels, or it checked the replicated layout again
  shared = len(first.signature.levels)
  return dict(attention=attention, backend=runtime.backend.name,
              check_every=list(check_every), same_tokens=same,
              top1=float(np.nanmean(gaps == 0)), worst_gap=worst, tolerance=tolerance,
              shared_levels=shared,
              ok=bool(same and worst <= tolerance and (shared > 0 or attention != "hydragen")),
              decode_custom_calls=calls,
              signature=str(first.signature),
              seconds={str(k): round(s, 2) for k, (_, s) in runs.items()})


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--preset", default="llama3-8b")
  ap.add_argument("--layers", type=int, default=2, help="override num_layers")
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--backend", default="auto")
  ap.add_argument("--attention", default="hydragen,replicated")
  ap.add_argument("--check-every", default="1,4")
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--prefix", type=int, default=1000)
  ap.add_argument("--new", type=int, default=40)
  ap.add_argument("--tolerance", type=float, default=0.25,
                  help="largest gap allowed, in logits' standard deviations")
  ap.add_argument("--out", default=os.environ.get("OUT", "."))
  args = ap.parse_args(argv)
  every = [int(x) for x in args.check_every.split(",")]
  if not every or min(every) < 1:
    ap.error(f"--check-every must list ints >= 1, got {args.check_every!r}")
  config = LlamaConfig.from_preset(args.preset, **(
      {} if args.layers is None else {"num_layers": args.layers}))
  model = llama.init(config, seed=0, dtype=jnp.dtype(args.dtype))
  prompts = shared_prompts(config.vocab_size, args.batch, args.prefix)
  print(json.dumps(dict(device=str(jax.devices()[0]), jax=jax.__version__, **vars(args))),
        flush=True)
  rows = []
  for attention in args.attention.split(","):
    row = check(model, prompts, attention=attention, backend=args.backend, check_every=every,
                new=args.new, tolerance=args.tolerance)
    print(json.dumps(row), flush=True)
    rows.append(row)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "check_engine.json"), "w") as f:
    json.dump(rows, f, indent=1)
  print("\n| attention | shared levels | check_every | same tokens | top-1 | worst gap (sd) | "
        "ok | decode's custom calls |\n|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['attention']} | {r['shared_levels']} | {r['check_every']} | "
          f"{r['same_tokens']} | {r['top1']:.3f} | {r['worst_gap']:.4f} | {r['ok']} | "
          f"{', '.join(r['decode_custom_calls']) or '-'} |")
  return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
