"""GPU check: the pallas backend on float32 inputs with D=128 and T=64 (a shape whose default
tiles used to exceed shared memory) against the XLA backend. Prints the max relative error."""

import jax
import jax.numpy as jnp
import numpy as np

from hydrax.attention import KVLevel, hydragen_attention

rng = np.random.default_rng(0)
b, t, kh, g, d = 4, 64, 8, 4, 128
q = jnp.asarray(rng.standard_normal((b, t, kh * g, d)), jnp.float32)
levels = [KVLevel(jnp.asarray(rng.standard_normal((1, 1000, kh, d)), jnp.float32),
                  jnp.asarray(rng.standard_normal((1, 1000, kh, d)), jnp.float32),
                  jnp.array([1000], jnp.int32), np.zeros(b, np.int32)),
          KVLevel(jnp.asarray(rng.standard_normal((b, 80, kh, d)), jnp.float32),
                  jnp.asarray(rng.standard_normal((b, 80, kh, d)), jnp.float32),
                  jnp.array([80, 64, 77, 70], jnp.int32), None)]
ref, ref_lse = hydragen_attention(q, levels, backend="xla")
out, lse = jax.jit(lambda q: hydragen_attention(q, levels, backend="pallas"))(q)
err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
print(f"pallas float32 D=128 T=64 on {jax.devices()[0].device_kind}: relative error {err:.2e}, "
      f"max |lse diff| {float(jnp.max(jnp.abs(lse - ref_lse))):.2e}, NaN: {bool(jnp.isnan(out).any())}")
assert err < 1e-5 and not jnp.isnan(out).any()
