"""How the decoder's layers are iterated, measured: a no-attention decode step per strategy.

The engine's `none` step (the model without attention: projections, MLP, logits) is the base
of every decode step. Under `lax.scan` over stacked [L, ...] weights, XLA on the GPU may copy
each layer's weight slice out of the stack before its matrix products (cuBLAS reads whole
buffers); unrolled layers or per-layer weight buffers avoid that at the price of compile time.
This script times, per batch size B, one jitted loop of `--steps` dependent greedy decode
steps (T = 1, `skip_attention=True`, logits + argmax feeding the next step) for:

  scan            lax.scan over the stacked weights, one layer per iteration (unroll=1)
  scan+dsf        the same, compiled with XLA's dynamic-slice fusion on and Triton GEMMs off
                  (`compile(compiler_options=...)`: cuBLAS may then read the slice in place)
  scan+dsf-only   dynamic-slice fusion on, Triton GEMMs left as they are
  unrolled        lax.scan fully unrolled (static slices of the stacked weights)
  per-layer       the weights split once into L separate buffers (outside the step), the
                  layers a Python loop over them: nothing to slice

and reports compile seconds, ms per step (median of --repeats timed loops after a warm-up) and,
from the optimized HLO, the number of fusions whose name says dynamic-slice (a weight copy per
layer and step when they sit in the loop) and of cuBLAS GEMM calls.

  python experiments/bench_layers.py --out $OUT                    # llama3-8b, B 256 and 1024
  python experiments/bench_layers.py --preset tiny --batches 4 --steps 2   # CPU smoke

Writes `bench_layers.json` and each variant's optimized HLO op counts under --out; prints a
table last. Axis letters: B sequences, T new tokens (1), E hidden, L layers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hydrax.models import LlamaConfig, llama

DSF = {"xla_gpu_enable_dynamic_slice_fusion": True, "xla_gpu_enable_triton_gemm": False}
DSF_ONLY = {"xla_gpu_enable_dynamic_slice_fusion": True}
VARIANTS = ("scan", "scan+dsf", "scan+dsf-only", "unrolled", "per-layer")


def _per_layer_forward(model, layers, tokens, positions):
  """The decoder with `layers` a Python list of per-layer Blocks (no attention)."""
  config = model.config
  eps = config.rms_norm_eps
  del positions           # (no attention: the layers take no RoPE tables)
  x = jnp.take(model.embed.embedding[...], tokens, axis=0)
  for index, block in enumerate(layers):
    a, _ = llama._attention_layer(config, block.attn, llama.rms_norm(block.attn_norm, x, eps),
                                  None, (), None, index, skip_attention=True,
                                  backend="xla", reduce=None, attend=None)
    x = x + a
    x = x + llama._mlp(block.mlp, llama.rms_norm(block.mlp_norm, x, eps), None)
  return llama.rms_norm(model.norm, x, eps)


def _loop(variant, graphdef, steps):
  """A jittable fn(params, layer_params, tokens) -> tokens after `steps` greedy steps."""

  def step(model, layers, tokens, i):
    positions = jnp.full(tokens.shape, i, jnp.int32)
    if variant == "per-layer":
      hidden = _per_layer_forward(model, layers, tokens, positions)
    else:
      hidden, _ = llama.forward(model, tokens, positions, None, skip_attention=True,
                                unroll=True if variant == "unrolled" else 1)
    return jnp.argmax(llama.logits(model, hidden[:, -1]), axis=-1).astype(jnp.int32)[:, None]

  def run(params, layer_params, tokens):
    model = nnx.merge(graphdef, params)
    layers = None
    if layer_params is not None:
      block_def = nnx.graphdef(model.layers)
      layers = [nnx.merge(block_def, p) for p in layer_params]
    return jax.lax.fori_loop(0, steps, lambda i, t: step(model, layers, t, i), tokens)

  return run


def _hlo_counts(text: str) -> dict:
  return {
      "dynamic_slice_fusions": len(re.findall(r"^\s*\S*dynamic[-_]slice\S* = .*fusion\(",
                                              text, re.M)),
      "dynamic_slice_fusion_kind": text.count("dynamic_slice_fusion") +
                                   text.count("address_computation"),
      "cublas_gemms": text.count('custom_call_target="__cublas$gemm"') +
                      text.count('custom_call_target="__cublas$lt$matmul"'),
      "triton_gemm_fusions": len(re.findall(r'kind":"__triton_gemm', text)),
  }


def measure(variant, model, b, args) -> dict:
  graphdef, params = nnx.split(model)
  layer_params = None
  if variant == "per-layer":
    stacked = nnx.state(model.layers)
    # L separate buffers, made once outside the timed step (what a per-layer layout stores).
    layer_params = [jax.tree.map(lambda a, i=i: jnp.array(a[i]), stacked)
                    for i in range(model.config.num_layers)]
  tokens = jnp.asarray(np.random.default_rng(0).integers(
      0, model.config.vocab_size, (b, 1)), jnp.int32)
  fn = jax.jit(_loop(variant, graphdef, args.steps))
  options = {"scan+dsf": DSF, "scan+dsf-only": DSF_ONLY}.get(variant)
  start = time.perf_counter()
  lowered = fn.lower(params, layer_params, tokens)
  compiled = lowered.compile(compiler_options=options) if options else lowered.compile()
  compile_s = time.perf_counter() - start
  text = compiled.as_text() or ""
  counts = _hlo_counts(text)
  if args.dump:
    os.makedirs(os.path.join(args.out, "hlo"), exist_ok=True)
    with open(os.path.join(args.out, "hlo", f"{variant}_B{b}.txt"), "w") as f:
      f.write(text)
  out = compiled(params, layer_params, tokens)
  out.block_until_ready()
  times = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    out = compiled(params, layer_params, out)
    out.block_until_ready()
    times.append(time.perf_counter() - t0)
  ms = 1e3 * float(np.median(times)) / args.steps
  del layer_params
  return {"variant": variant, "batch": b, "compile_s": round(compile_s, 2),
          "ms_per_step": round(ms, 3), **counts}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="llama3-8b")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--batches", default="256,1024")
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--skip", default="unrolled@256",
                      help="variant@batch pairs not to run (comma-separated)")
  parser.add_argument("--steps", type=int, default=16, help="dependent decode steps per loop")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default=os.environ.get("OUT", "."))
  parser.add_argument("--dump", action="store_true", help="write each optimized HLO under out/hlo")
  args = parser.parse_args()
  for v in args.variants.split(","):
    if v not in VARIANTS:
      raise SystemExit(f"--variants: unknown variant {v!r} (choose from {', '.join(VARIANTS)})")
  device = jax.devices()[0]
  print(f"{args.preset} {args.dtype} on {device.platform} ({device.device_kind}), "
        f"jax {jax.__version__}", flush=True)
  model = llama.init(LlamaConfig.from_preset(args.preset), dtype=jnp.dtype(args.dtype))
  skip = set(filter(None, args.skip.split(",")))
  rows = []
  for b in [int(x) for x in args.batches.split(",")]:
    for v in args.variants.split(","):
      if f"{v}@{b}" in skip:
        continue
      try:
        row = measure(v, model, b, args)
      except Exception as e:  # one failing variant must not lose the others
        row = {"variant": v, "batch": b, "error": f"{type(e).__name__}: {e}"[:400]}
      rows.append(row)
      print(json.dumps(row), flush=True)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "bench_layers.json"), "w") as f:
    json.dump({"args": vars(args), "device": device.device_kind, "jax": jax.__version__,
               "host": platform.node(), "rows": rows}, f, indent=2)
  print("\n| B | variant | compile s | ms/step | dyn-slice fusions | DSF kind | cuBLAS | "
        "Triton GEMM |\n|---|---|---|---|---|---|---|---|")
  for r in rows:
    if "error" in r:
      print(f"| {r['batch']} | {r['variant']} | error: {r['error'][:80]} |")
      continue
    print(f"| {r['batch']} | {r['variant']} | {r['compile_s']} | {r['ms_per_step']} | "
          f"{r['dynamic_slice_fusions']} | {r['dynamic_slice_fusion_kind']} | "
          f"{r['cublas_gemms']} | {r['triton_gemm_fusions']} |")


if __name__ == "__main__":
  main()
