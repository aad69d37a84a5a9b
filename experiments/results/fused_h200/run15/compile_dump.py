"""Run 15, call 4: compile the Mosaic GPU launch at 16K/256 (one node, suffixes of 128, bf16,
32/8 heads, D 128) once per pallas configuration given as JSON on the command line, with
Mosaic GPU's compiler dumps on (MOSAIC_GPU_DUMP_TO and friends, set by the caller), so that
ptxas's report (registers, spills, wgmma serialisation) of each variant can be read."""
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from hydrax.attention import KVLevel, hydragen_attention
from hydrax.attention.kernels import pallas_gpu

b, p, u, h, kh, d = 256, 16384, 128, 32, 8, 128
rng = np.random.default_rng(0)
q = jnp.asarray(rng.standard_normal((b, 1, h, d)), jnp.bfloat16)
root = KVLevel(jnp.asarray(rng.standard_normal((1, p, kh, d)), jnp.bfloat16),
               jnp.asarray(rng.standard_normal((1, p, kh, d)), jnp.bfloat16),
               jnp.full((1,), p, jnp.int32), jnp.zeros((b,), jnp.int32))
suffix = KVLevel(jnp.asarray(rng.standard_normal((b, u, kh, d)), jnp.bfloat16),
                 jnp.asarray(rng.standard_normal((b, u, kh, d)), jnp.bfloat16),
                 jnp.full((b,), u, jnp.int32))
for i, cfg in enumerate(json.loads(sys.argv[1])):
  backend = pallas_gpu.configure(path="off", **cfg)
  fn = jax.jit(lambda q, root, suffix: hydragen_attention(q, [root, suffix], backend=backend))
  out, lse = fn(q, root, suffix)
  jax.block_until_ready(out)
  print(f"config {i} {cfg}: compiled and ran, out finite {bool(jnp.isfinite(out.astype(jnp.float32)).all())}",
        flush=True)
