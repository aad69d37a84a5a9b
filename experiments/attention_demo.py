r"""CPU demo: Hydragen attention against attention with the prefix copied into every sequence.

One decode step (T = 1) of B sequences that share a P-token prefix and each own an S-token
suffix. Prints the median time of each, the KV memory each needs, and their agreement.

  python experiments/attention_demo.py [--batch 64 --prefix 2048 --suffix 64 --heads 8 ...]
"""

import time

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np

from hydrax.attention import KVLevel, attention, hydragen_attention

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 64, "B: sequences sharing the prefix.")
flags.DEFINE_integer("prefix", 2048, "P: shared prefix tokens.")
flags.DEFINE_integer("suffix", 64, "S: unique tokens per sequence.")
flags.DEFINE_integer("heads", 8, "H: query heads.")
flags.DEFINE_integer("kv_heads", 2, "K: KV heads.")
flags.DEFINE_integer("head_dim", 64, "D: head dim.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Dtype of q, k, v.")
flags.DEFINE_integer("repeats", 5, "Timed repeats (median reported).")
flags.DEFINE_string("backend", "auto", "hydrax attention backend.")


def _median_seconds(fn, *args, repeats):
  jax.block_until_ready(fn(*args))                     # compile and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def run(batch, prefix, suffix, heads, kv_heads, head_dim, dtype, repeats, backend):
  """Returns a dict of the demo's measurements (also used by the tests)."""
  dtype = jnp.dtype(dtype)
  keys = jax.random.split(jax.random.key(0), 6)
  q = jax.random.normal(keys[0], (batch, 1, heads, head_dim), dtype)
  pk = jax.random.normal(keys[1], (1, prefix, kv_heads, head_dim), dtype)
  pv = jax.random.normal(keys[2], (1, prefix, kv_heads, head_dim), dtype)
  sk = jax.random.normal(keys[3], (batch, suffix, kv_heads, head_dim), dtype)
  sv = jax.random.normal(keys[4], (batch, suffix, kv_heads, head_dim), dtype)
  owner = np.zeros((batch,), np.int32)

  @jax.jit
  def hydragen(q, pk, pv, sk, sv):
    levels = [KVLevel(pk, pv, jnp.array([prefix], jnp.int32), owner),
              KVLevel(sk, sv, jnp.full((batch,), suffix, jnp.int32), None)]
    return hydragen_attention(q, levels, backend=backend)

  # The baseline's cache: the prefix copied into every sequence, then its suffix.
  rk = jnp.concatenate([jnp.broadcast_to(pk, (batch,) + pk.shape[1:]), sk], axis=1)
  rv = jnp.concatenate([jnp.broadcast_to(pv, (batch,) + pv.shape[1:]), sv], axis=1)
  replicated = jax.jit(lambda q, k, v: attention(q, k, v, causal=True, backend=backend))

  out_h, lse_h = hydragen(q, pk, pv, sk, sv)
  out_r, lse_r = replicated(q, rk, rv)
  itemsize = dtype.itemsize
  return {
      "hydragen_s": _median_seconds(hydragen, q, pk, pv, sk, sv, repeats=repeats),
      "replicated_s": _median_seconds(replicated, q, rk, rv, repeats=repeats),
      "hydragen_kv_bytes": 2 * (pk.size + sk.size) * itemsize,
      "replicated_kv_bytes": 2 * rk.size * itemsize,
      "max_abs_diff": float(jnp.max(jnp.abs(out_h.astype(jnp.float32) -
                                            out_r.astype(jnp.float32)))),
      "max_lse_diff": float(jnp.max(jnp.abs(lse_h - lse_r))),
      "platform": jax.default_backend(),
  }


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  r = run(FLAGS.batch, FLAGS.prefix, FLAGS.suffix, FLAGS.heads, FLAGS.kv_heads,
          FLAGS.head_dim, FLAGS.dtype, FLAGS.repeats, FLAGS.backend)
  mib = 2.0 ** 20
  print(f"decode step on {r['platform']}: B={FLAGS.batch} prefix={FLAGS.prefix} "
        f"suffix={FLAGS.suffix} H={FLAGS.heads} K={FLAGS.kv_heads} D={FLAGS.head_dim} "
        f"{FLAGS.dtype}")
  print(f"{'':22}{'median ms':>12}{'KV MiB':>10}")
  print(f"{'hydragen':22}{r['hydragen_s'] * 1e3:12.2f}{r['hydragen_kv_bytes'] / mib:10.1f}")
  print(f"{'prefix copied':22}{r['replicated_s'] * 1e3:12.2f}"
        f"{r['replicated_kv_bytes'] / mib:10.1f}")
  print(f"speedup {r['replicated_s'] / r['hydragen_s']:.2f}x, KV memory "
        f"{r['replicated_kv_bytes'] / r['hydragen_kv_bytes']:.1f}x smaller; agreement: "
        f"max |out diff| = {r['max_abs_diff']:.2e}, max |lse diff| = {r['max_lse_diff']:.2e}")


if __name__ == "__main__":
  app.run(main)
