"""Exact attention in parts: dense attention with LSE, the LSE merge, and Hydragen levels.

Public API (names are fixed; scripts and notebooks rely on them):
  attention(q, k, v, *, kv_lengths=None, causal=False, scale=None) -> (out, lse)
  merge(parts) -> (out, lse)
  KVLevel(k, v, lengths, owner)
  hydragen_attention(q, levels, *, causal_last=True, scale=None, backend="auto",
                     prepared=None) -> (out, lse)
  prepare(q, levels, *, causal_last=True, scale=None, backend="auto") -> Prepared
    (what the calls of one decode step's layers share, computed once)
"""

from hydrax.attention import backends
from hydrax.attention.hydragen import KVLevel, attention, hydragen_attention, prepare
from hydrax.attention.merge import merge
from hydrax.attention.prepared import Prepared

backends.register_lazy("pallas", "hydrax.attention.kernels.pallas_gpu", platforms=("gpu",))
backends.register_lazy("pallas_tpu", "hydrax.attention.kernels.pallas_tpu", platforms=("tpu",))
# The fused decode kernel (native Triton through jax-triton, both optional): asked for by name;
# not picked by "auto" (no platform) until the H200 measurement shows it beats "pallas".
backends.register_lazy("fused", "hydrax.attention.kernels.fused_triton", platforms=())

__all__ = ["attention", "merge", "KVLevel", "hydragen_attention", "prepare", "Prepared",
           "backends"]
