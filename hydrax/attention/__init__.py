"""Exact attention in parts: dense attention with LSE, the LSE merge, and Hydragen levels.

Public API (names are fixed; scripts and notebooks rely on them):
  attention(q, k, v, *, kv_lengths=None, causal=False, scale=None) -> (out, lse)
  merge(parts) -> (out, lse)
  KVLevel(k, v, lengths, owner)
  hydragen_attention(q, levels, *, causal_last=True, scale=None, backend="auto") -> (out, lse)
"""

from hydrax.attention import backends
from hydrax.attention.hydragen import KVLevel, attention, hydragen_attention
from hydrax.attention.merge import merge

backends.register_lazy("pallas", "hydrax.attention.kernels.pallas_gpu", platforms=("gpu",))
backends.register_lazy("pallas_tpu", "hydrax.attention.kernels.pallas_tpu", platforms=("tpu",))
# The fused decode kernel (native Triton through jax-triton, both optional): asked for by name;
# not picked by "auto" (no platform) until the H200 measurement shows it beats "pallas".
backends.register_lazy("fused", "hydrax.attention.kernels.fused_triton", platforms=())

__all__ = ["attention", "merge", "KVLevel", "hydragen_attention", "backends"]
