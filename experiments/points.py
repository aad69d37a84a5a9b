"""Gin-configurable measurements of one sweep point, and the synthetic prompts they use.

Prompts are synthetic token ids (as in the paper: only the sharing structure matters for
throughput), drawn from a seeded generator so every run of a config sees the same prompts.
"""

from __future__ import annotations

import functools
import time

import gin
import jax
import numpy as np

from experiments.harness import OutOfMemory


@gin.configurable
def shared_prefix_prompts(batch: int, prefix: int, suffix: int, vocab: int, seed: int = 0):
  """B prompts: one `prefix`-token prefix shared by all, then `suffix` unique tokens each."""
  rng = np.random.default_rng(seed)
  head = rng.integers(3, vocab, size=prefix)
  return [np.concatenate([head, rng.integers(3, vocab, size=suffix)]).astype(np.int32)
          for _ in range(batch)]


@gin.configurable
def hierarchy_prompts(batch: int, prefix: int, suffix: int, vocab: int, seed: int = 0,
                      samples_per_problem: int = 8, problem_tokens: int = 256):
  """APPS-like tree: shared instructions (`prefix` tokens), then batch / samples_per_problem
  problem statements (`problem_tokens` each), each sampled `samples_per_problem` times; each
  sample's prompt ends with `suffix` unique tokens."""
  if batch % samples_per_problem:
    raise ValueError(f"hierarchy_prompts: batch={batch} must be a multiple of "
                     f"samples_per_problem={samples_per_problem}")
  rng = np.random.default_rng(seed)
  head = rng.integers(3, vocab, size=prefix)
  out = []
  for _ in range(batch // samples_per_problem):
    problem = rng.integers(3, vocab, size=problem_tokens)
    for _ in range(samples_per_problem):
      out.append(np.concatenate([head, problem, rng.integers(3, vocab, size=suffix)]))
  return [p.astype(np.int32) for p in out]


PROMPTS = {"shared_prefix": shared_prefix_prompts, "hierarchy": hierarchy_prompts}


@functools.lru_cache(maxsize=2)
def _model(preset: str, dtype: str, num_layers, mesh=None):
  """Random-weight model of a preset; with `mesh` (a spec such as "1x8"), created sharded."""
  from hydrax.models import configs, llama
  overrides = {} if num_layers is None else {"num_layers": num_layers}
  config = configs.LlamaConfig.from_preset(preset, **overrides)
  dt = jax.numpy.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
  if mesh is not None:
    from hydrax import parallel
    return parallel.init(config, parallel.make_mesh(mesh), seed=0, dtype=dt)
  return llama.init(config, seed=0, dtype=dt)


def _peak_bytes():
  """Process-wide peak device memory so far (max over local devices), if reported."""
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
  peaks = [p for p in peaks if p is not None]
  return max(peaks) if peaks else None


@gin.configurable
def generation_point(*, batch: int, prefix: int, attention: str, model: str = "tiny",
                     dtype: str = "float32", num_layers=None, suffix: int = 16,
                     max_new_tokens: int = 128, prompts: str = "shared_prefix",
                     backend: str = "auto", min_shared_tokens=None, max_levels=None,
                     eos_id=None, seed: int = 0, memory_limit_bytes=None, mesh=None,
                     check_every: int = 1) -> dict:
  """End-to-end generation of one point; returns its metrics.

  mesh: None (one device) or a mesh spec for `hydrax.parallel.make_mesh` ("2x4": data x model)
  to run the sharded engine. check_every: decode steps between the decode loop's checks
  (`engine.Runtime.check_every`).
  Row fields: see `experiments.harness.COLUMNS` (decode_tokens_per_s counts only the tokens
  the decode loop produced: the first token of each sequence comes from prefill).
  memory_limit_bytes: treat the point as out of memory when its KV cache would exceed this
  (simulates a smaller device; also how the tests exercise OOM recording).
  """
  from hydrax import engine, sharing
  net = _model(model, dtype, num_layers, mesh)
  config = net.config
  tokens = PROMPTS[prompts](batch=batch, prefix=prefix, suffix=suffix,
                            vocab=config.vocab_size, seed=seed)
  plan_kw = {}
  if min_shared_tokens is not None:
    plan_kw["min_shared_tokens"] = min_shared_tokens
  if max_levels is not None:
    plan_kw["max_levels"] = max_levels
  plan = sharing.plan(tokens, **plan_kw)
  if memory_limit_bytes is not None:
    need = engine.estimate_kv_bytes(config, plan, max_new_tokens=max_new_tokens,
                                    attention=attention, dtype=dtype)
    if need > memory_limit_bytes:
      raise OutOfMemory(f"KV cache needs {need} bytes > memory_limit_bytes={memory_limit_bytes}")
  start = time.perf_counter()
  gen = engine.generate(net, plan, max_new_tokens=max_new_tokens, attention=attention,
                        eos_id=eos_id, seed=seed,
                        runtime=engine.Runtime.build(backend, mesh, check_every=check_every))
  e2e = time.perf_counter() - start
  lengths = np.asarray(gen.lengths)
  new_tokens = int(np.sum(lengths))
  # The first token of each sequence is sampled by prefill: the decode loop made the rest.
  decode_tokens = int(np.sum(np.maximum(lengths - 1, 0)))
  return {
      "decode_tokens_per_s": (decode_tokens / gen.decode_seconds if gen.decode_seconds > 0
                              else float("nan")),
      "e2e_tokens_per_s": new_tokens / (gen.prefill_seconds + gen.decode_seconds),
      "prefill_s": gen.prefill_seconds, "decode_s": gen.decode_seconds,
      "e2e_s": gen.prefill_seconds + gen.decode_seconds, "wall_with_compile_s": e2e,
      "kv_bytes": gen.kv_bytes, "peak_bytes": _peak_bytes(), "new_tokens": new_tokens,
      "decode_tokens": decode_tokens, "compile_s": gen.compile_seconds,
      "shared_levels": len(plan.levels),
      "timing": "one generate call; prefill and decode loop each timed by perf_counter around "
                "the compiled call with block_until_ready, compile excluded",
  }


@gin.configurable
def attention_point(*, batch_prefix, suffix: int, implementation: str = "hydragen",
                    backend: str = "auto", heads: int = 8, kv_heads: int = 1,
                    head_dim: int = 128, dtype: str = "bfloat16", repeats: int = 20,
                    seed: int = 0) -> dict:
  """Times one decode step of attention alone (the paper's micro-benchmark shape).

  batch_prefix: (B, P): B sequences share a P-token prefix; each has `suffix` own tokens.
  implementation: "hydragen" (hydragen_attention over [prefix, suffixes] with `backend`) or
  "replicated" (dense attention with the prefix copied into every sequence's keys).
  Returns the median microseconds over `repeats` calls and the achieved TFLOP/s and TB/s
  (FLOPs 4*B*H*(P+U)*D; bytes: q, out, and each key/value read once as hydragen needs).
  The full kernel benchmark, with measured ceilings and cuDNN, is experiments/bench_attention.py.
  """
  from hydrax.attention import KVLevel, attention, hydragen_attention
  b, p = (int(x) for x in batch_prefix)
  dt = jax.numpy.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
  keys = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(keys[0], (b, 1, heads, head_dim), dt)
  kp, vp = (jax.random.normal(k, (1, p, kv_heads, head_dim), dt) for k in keys[1:3])
  ks, vs = (jax.random.normal(k, (b, suffix, kv_heads, head_dim), dt) for k in keys[3:5])
  if implementation == "hydragen":
    owner = np.zeros((b,), np.int32)
    fn = jax.jit(lambda q, kp, vp, ks, vs: hydragen_attention(
        q, [KVLevel(kp, vp, jax.numpy.full((1,), p, jax.numpy.int32), owner),
            KVLevel(ks, vs, jax.numpy.full((b,), suffix, jax.numpy.int32), None)],
        backend=backend)[0])
    args = (q, kp, vp, ks, vs)
  elif implementation == "replicated":
    k = jax.numpy.concatenate([jax.numpy.broadcast_to(kp, (b,) + kp.shape[1:]), ks], axis=1)
    v = jax.numpy.concatenate([jax.numpy.broadcast_to(vp, (b,) + vp.shape[1:]), vs], axis=1)
    fn = jax.jit(lambda q, k, v: attention(q, k, v, causal=True, backend=backend)[0])
    args = (q, k, v)
  else:
    raise ValueError(f"attention_point: implementation must be 'hydragen' or 'replicated', "
                     f"got {implementation!r}")
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  seconds = float(np.median(times))
  item = np.dtype(dt).itemsize
  flops = 4.0 * b * heads * (p + suffix) * head_dim
  nbytes = item * (2 * p * kv_heads * head_dim + 2 * b * suffix * kv_heads * head_dim
                   + 2 * b * heads * head_dim)
  return {"median_us": seconds * 1e6, "tflops_per_s": flops / seconds / 1e12,
          "tb_per_s": nbytes / seconds / 1e12, "platform": jax.default_backend(),
          "timing": f"median of {repeats} jitted calls after one warm-up, each synchronised "
                    f"(block_until_ready), perf_counter"}
