"""Compile time of a Llama decode step (and a prefill chunk), with abstract parameters.

Nothing is allocated: parameters and caches are `jax.ShapeDtypeStruct`s; the step is
`jax.jit(step, donate_argnums=...).lower(...)` then `.compile()`, each timed. The decode step
is what the engine's decode loop runs per token: the forward over one new token per sequence,
attending a shared prefix (one node owned by every sequence) and each sequence's suffix cache,
then the logits and a greedy argmax. The prefill step is one chunk of `--chunk` tokens.

Variants: the layers under `lax.scan` with each `--unroll` value (when the installed
`llama.forward` takes `unroll`; `full` unrolls every layer), else the forward as installed
("python loop": the per-layer Python loop of older hydrax).

  python experiments/compile_time.py                       # llama3-8b, B 1024, prefix 16K
  python experiments/compile_time.py --preset tiny --batch 8 --prefix 64

Writes `compile_time.json` under $OUT (or --out) and prints a table last. Axis letters: B
sequences, T new tokens, S keys, K KV heads, D head dim, L layers.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hydrax.cache import KVCache, LevelKV
from hydrax.models import LlamaConfig, llama


def _spec(shape, dtype):
  return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


def _level(config, n, s, dtype):
  shape = (config.num_layers, n, s, config.num_kv_heads, config.head_dim)
  return LevelKV(_spec(shape, dtype), _spec(shape, dtype), _spec((n,), jnp.int32))


def _measure(fn, args, donate):
  start = time.perf_counter()
  lowered = jax.jit(fn, donate_argnums=donate).lower(*args)
  lowered_at = time.perf_counter()
  lowered.compile()
  done = time.perf_counter()
  return lowered_at - start, done - lowered_at


def run(args) -> list[dict]:
  config = LlamaConfig.from_preset(args.preset)
  if args.layers:
    config = config.replace(num_layers=args.layers)
  dtype = jnp.dtype(args.dtype)
  graphdef, params = nnx.split(llama.abstract(config, dtype=dtype))
  b = args.batch
  owner = np.zeros((b,), np.int32)          # one prefix node shared by every sequence
  shared = _level(config, 1, args.prefix, dtype)
  takes_unroll = "unroll" in inspect.signature(llama.forward).parameters
  variants = [("scan", u) for u in args.unroll.split(",")] if takes_unroll else \
      [("python loop", None)]

  def steps(unroll):
    kw = {} if unroll is None else {"unroll": True if unroll == "full" else int(unroll)}

    def decode(params, shared, suffix, tokens, positions):
      model = nnx.merge(graphdef, params)
      cache = KVCache(suffix, (shared,), (owner,))
      hidden, cache = llama.forward(model, tokens, positions, cache, backend=args.backend, **kw)
      return jnp.argmax(llama.logits(model, hidden[:, -1]), axis=-1), cache.suffix

    suffix = _level(config, b, args.suffix, dtype)
    one = (params, shared, suffix, _spec((b, 1), jnp.int32), _spec((b, 1), jnp.int32))
    chunk_rows = min(b, args.prefill_rows)
    prefill_suffix = _level(config, chunk_rows, max(args.suffix, args.chunk), dtype)
    chunk = (params, shared, prefill_suffix, _spec((chunk_rows, args.chunk), jnp.int32),
             _spec((chunk_rows, args.chunk), jnp.int32))
    out = {"decode": (decode, one)}
    if args.prefill:
      def prefill(params, shared, suffix, tokens, positions):
        model = nnx.merge(graphdef, params)
        own = np.zeros((chunk_rows,), np.int32)
        cache = KVCache(suffix, (shared,), (own,))
        hidden, cache = llama.forward(model, tokens, positions, cache, backend=args.backend,
                                      **kw)
        return jnp.argmax(llama.logits(model, hidden[:, -1]), axis=-1), cache.suffix
      out["prefill"] = (prefill, chunk)
    return out

  rows = []
  for kind, unroll in variants:
    for name, (fn, fargs) in steps(unroll).items():
      lower_s, compile_s = _measure(fn, fargs, donate=(2,))
      rows.append({"step": name, "layers": kind, "unroll": unroll, "lower_s": round(lower_s, 2),
                   "compile_s": round(compile_s, 2), "total_s": round(lower_s + compile_s, 2)})
      print(f"  {name} {kind} unroll={unroll}: lower {lower_s:.2f} s, compile {compile_s:.2f} s",
            flush=True)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="llama3-8b")
  parser.add_argument("--layers", type=int, default=0, help="override num_layers (0: preset's)")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--batch", type=int, default=1024)
  parser.add_argument("--prefix", type=int, default=16384, help="shared prefix capacity S")
  parser.add_argument("--suffix", type=int, default=256, help="suffix cache capacity S")
  parser.add_argument("--chunk", type=int, default=512, help="prefill chunk tokens T")
  parser.add_argument("--prefill_rows", type=int, default=64, help="rows of the prefill chunk")
  parser.add_argument("--no-prefill", dest="prefill", action="store_false")
  parser.add_argument("--unroll", default="1,full", help="comma-separated scan unroll values")
  parser.add_argument("--backend", default="auto")
  parser.add_argument("--out", default=os.environ.get("OUT", "."))
  args = parser.parse_args()
  device = jax.devices()[0]
  print(f"{args.preset} {args.dtype} B={args.batch} prefix={args.prefix} suffix={args.suffix} "
        f"on {device.platform} ({device.device_kind}), jax {jax.__version__}", flush=True)
  rows = run(args)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "compile_time.json"), "w") as f:
    json.dump({"args": vars(args), "device": device.device_kind, "platform": device.platform,
               "jax": jax.__version__, "host": platform.node(), "rows": rows}, f, indent=2)
  print("\n| step | layers | unroll | lower s | compile s | total s |\n|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['step']} | {r['layers']} | {r['unroll']} | {r['lower_s']} | {r['compile_s']} "
          f"| {r['total_s']} |")


if __name__ == "__main__":
  main()
