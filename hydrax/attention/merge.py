"""The exact log-sum-exp merge of partial attentions over disjoint key sets."""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
from jax import lax


def merge(parts: Sequence[tuple]) -> tuple:
  """Combines partial attentions `(out_i, lse_i)` into the attention over all their keys.

  Each out_i is [..., D] and lse_i is [...] (float32, natural log), e.g. out [B,T,H,D] and
  lse [B,T,H]. A part with no keys (lse = -inf) gets weight 0; if every part is empty the
  result is out = 0, lse = -inf. Never NaN, also in gradients. `out` is float32 (or the
  widest input dtype), lse float32.

    out = sum_i exp(lse_i - m) out_i / sum_i exp(lse_i - m),  m = max_i lse_i
    lse = m + log sum_i exp(lse_i - m)
  """
  parts = list(parts)
  if not parts:
    raise ValueError("merge(parts): parts is empty; pass at least one (out, lse) pair")
  for i, part in enumerate(parts):
    if not isinstance(part, (tuple, list)) or len(part) != 2:
      raise ValueError(f"merge(parts): parts[{i}] must be an (out, lse) pair, got {type(part)}")
    out, lse = part
    if tuple(out.shape[:-1]) != tuple(lse.shape):
      raise ValueError(
          f"merge(parts): parts[{i}] has out shape {tuple(out.shape)} and lse shape "
          f"{tuple(lse.shape)}; expected lse.shape == out.shape[:-1]")
    if tuple(out.shape) != tuple(parts[0][0].shape):
      raise ValueError(
          f"merge(parts): parts[{i}] out shape {tuple(out.shape)} differs from parts[0] "
          f"out shape {tuple(parts[0][0].shape)}")
  out_dtype = jnp.result_type(jnp.float32, *[o.dtype for o, _ in parts])
  if len(parts) == 1:
    out, lse = parts[0]
    return out.astype(out_dtype), lse.astype(jnp.float32)
  lses = jnp.stack([lse.astype(jnp.float32) for _, lse in parts])
  m = jnp.max(lses, axis=0)
  # The merge is invariant to m; stopping its gradient keeps -inf out of the backward pass.
  m = lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  w = jnp.exp(lses - m)                       # 0 for empty parts
  total = jnp.sum(w, axis=0)
  nonempty = total > 0
  total_safe = jnp.where(nonempty, total, 1.0)
  out = sum(w[i][..., None] * parts[i][0].astype(out_dtype) for i in range(len(parts)))
  out = out / total_safe[..., None]
  lse = jnp.where(nonempty, m + jnp.log(total_safe), -jnp.inf)
  return out, lse
