"""An independent dense attention oracle in NumPy float64 (shares no code with hydrax).

keys[b], values[b]: [L_b, K, D] (float64) — the full key sequence of sequence b.
q: [B, T, H, D]. Query t of sequence b sits at position L_b - T + t when causal.
Returns out [B, T, H, D] and lse [B, T, H] (float64; -inf and 0 where no key is visible).
"""

import numpy as np


def dense(q, keys, values, *, causal, scale=None):
  q = np.asarray(q, np.float64)
  b_, t_, h_, d_ = q.shape
  scale = d_ ** -0.5 if scale is None else scale
  out = np.zeros((b_, t_, h_, d_))
  lse = np.full((b_, t_, h_), -np.inf)
  for b in range(b_):
    k = np.asarray(keys[b], np.float64)
    v = np.asarray(values[b], np.float64)
    n_keys, kh = k.shape[0], (k.shape[1] if k.ndim == 3 else 1)
    g = h_ // kh
    for t in range(t_):
      visible = n_keys if not causal else max(0, min(n_keys, n_keys - t_ + t + 1))
      if visible == 0:
        continue
      for h in range(h_):
        s = k[:visible, h // g, :] @ q[b, t, h] * scale
        m = s.max()
        p = np.exp(s - m)
        out[b, t, h] = p @ v[:visible, h // g, :] / p.sum()
        lse[b, t, h] = m + np.log(p.sum())
  return out, lse


def concat_levels(levels):
  """Each sequence's keys and values from a list of (k, v, lengths, owner) NumPy levels."""
  batch = None
  for k, v, lengths, owner in levels:
    if owner is not None:
      batch = len(owner)
    elif batch is None:
      batch = k.shape[0]
  keys, values = [], []
  for b in range(batch):
    ks, vs = [], []
    for k, v, lengths, owner in levels:
      n = b if owner is None else int(owner[b])
      ks.append(np.asarray(k[n, :int(lengths[n])], np.float64))
      vs.append(np.asarray(v[n, :int(lengths[n])], np.float64))
    keys.append(np.concatenate(ks))
    values.append(np.concatenate(vs))
  return keys, values
