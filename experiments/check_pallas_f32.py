"""GPU check: the pallas backend on float32 inputs with D=128 and T=64 (a shape whose default
tiles used to exceed shared memory) against the XLA backend, with plain levels and with the
levels stored in stacked [L,...] caches read at a traced layer under traced owners. Prints the
max relative error of each."""

import jax
import jax.numpy as jnp
import numpy as np

from hydrax.attention import KVLevel, backends, hydragen_attention

rng = np.random.default_rng(0)
b, t, kh, g, d, layers = 4, 64, 8, 4, 128, 3
normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
q = normal(b, t, kh * g, d)
levels = [KVLevel(normal(1, 1000, kh, d), normal(1, 1000, kh, d), jnp.array([1000], jnp.int32),
                  np.zeros(b, np.int32)),
          KVLevel(normal(2, 300, kh, d), normal(2, 300, kh, d), jnp.array([300, 211], jnp.int32),
                  np.array([1, 0, 1, 1], np.int32)),
          KVLevel(normal(b, 80, kh, d), normal(b, 80, kh, d),
                  jnp.array([80, 64, 77, 70], jnp.int32), None)]
ref, ref_lse = hydragen_attention(q, levels, backend="xla")
pallas = backends.get("pallas")


def stacked(level, layer):
  """The level as layer `layer` of a stacked cache (the other layers random)."""
  def stack(x):
    return jnp.stack([x if i == layer else normal(*x.shape) for i in range(layers)])
  return level._replace(k=stack(level.k), v=stack(level.v))


plain = jax.jit(lambda q: hydragen_attention(q, levels, backend=pallas))
stack_levels = [stacked(lv, 2) for lv in levels]
in_place = jax.jit(lambda q, owners, layer: hydragen_attention(
    q, [lv._replace(owner=o, layer=layer) for lv, o in zip(stack_levels, owners)],
    backend=pallas))
owners = [None if lv.owner is None else jnp.asarray(lv.owner) for lv in levels]
failed = False
for name, (out, lse) in (("plain levels", plain(q)),
                         ("stacked caches, traced layer and owners",
                          in_place(q, owners, jnp.int32(2)))):
  err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
  nan = bool(jnp.isnan(out).any())
  print(f"pallas float32 D=128 T=64 on {jax.devices()[0].device_kind}, {name}: relative error "
        f"{err:.2e}, max |lse diff| {float(jnp.max(jnp.abs(lse - ref_lse))):.2e}, NaN: {nan}")
  failed |= not (err < 1e-5 and not nan)
assert not failed
