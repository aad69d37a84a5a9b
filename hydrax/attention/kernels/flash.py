"""The online-softmax pieces shared by the Pallas (Triton-lowered) attention kernels.

Axis letters: M query rows of a program, Bn keys of a block, D head dim, P key splits.

Scores are kept in base 2 (scaled by scale * log2 e) so the exponent is `exp2`; the carry of a
program is (m, l, acc): the running maximum [M], the sum of exp2(s - m) [M] and the
unnormalised output [M, D], all float32. `finish` turns it into the normalised output and the
natural-log lse; `combine_splits` merges the results of P key splits through their lses.
A row that sees no key keeps m = -inf and l = 0 and ends with out = 0, lse = -inf (no NaN).
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
from jax import lax

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def pow2_at_least(x: int, low: int = 16) -> int:
  """The smallest power of two >= max(x, low)."""
  return max(low, 1 << max(0, int(x) - 1).bit_length())


def initial_carry(rows: int, d: int) -> tuple:
  """(m, l, acc) before any key: -inf, 0, 0."""
  return (jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32),
          jnp.zeros((rows, d), jnp.float32))


def softmax_step(carry, q, kb, vb, *, scale_log2: float, precision,
                 visible: Optional[jnp.ndarray] = None) -> tuple:
  """One key block: q [M, D], kb, vb [Bn, D]; visible [M, Bn] bool (None: every score counts,
  so no row can still be at m = -inf and no guard is needed)."""
  m, l, acc = carry
  s = lax.dot_general(q, kb, (((1,), (1,)), ((), ())), precision=precision,
                      preferred_element_type=jnp.float32) * scale_log2
  if visible is not None:
    s = jnp.where(visible, s, -jnp.inf)
  m_new = jnp.maximum(m, jnp.max(s, axis=1))
  m_use = m_new if visible is None else jnp.where(m_new > -jnp.inf, m_new, 0.0)
  alpha = jnp.exp2(m - m_use)
  p = jnp.exp2(s - m_use[:, None])
  l = l * alpha + jnp.sum(p, axis=1)
  pv = lax.dot_general(p.astype(vb.dtype), vb, (((1,), (0,)), ((), ())),
                       precision=precision, preferred_element_type=jnp.float32)
  return m_new, l, acc * alpha[:, None] + pv


def finish(carry) -> tuple:
  """(out [M, D] normalised, lse [M] natural log) of a carry; out = 0, lse = -inf for rows
  that saw no key."""
  m, l, acc = carry
  has = l > 0
  l_safe = jnp.where(has, l, 1.0)
  return acc / l_safe[:, None], jnp.where(has, (m + jnp.log2(l_safe)) * LN2, -jnp.inf)


ELEMENTWISE_SPLITS = 16     # up to this many splits `combine_splits` merges plane by plane


def combine_splits(out, lse) -> tuple:
  """Merges P key splits: out [P,...,D] f32, lse [P,...] -> ([..., D], [...])."""
  if out.shape[0] == 1:
    return out[0], lse[0]
  if out.shape[0] <= ELEMENTWISE_SPLITS:
    # Plane by plane: XLA on the H200 fuses each weight's exponential into the weighted sum
    # and the unpacking after it; written as reductions over P it made the weights a launch
    # of their own. The merge with the unpacking, P = 2: 2.9 against 4.4 us of device time
    # at B = 256, 2.3 against 3.2 at B = 64 (`experiments/probe_split_merge.py`, run 19).
    return merge_list(list(out), list(lse))
  m = jnp.max(lse, axis=0)
  m_safe = jnp.where(m > -jnp.inf, m, 0.0)
  w = jnp.exp(lse - m_safe)
  total = jnp.sum(w, axis=0)
  has = total > 0
  total_safe = jnp.where(has, total, 1.0)
  o = jnp.sum(w[..., None] * out, axis=0) / total_safe[..., None]
  return o, jnp.where(has, m_safe + jnp.log(total_safe), -jnp.inf)


def merge_list(outs, lses) -> tuple:
  """Merges partial attentions over disjoint keys: outs [..., D] f32 (normalised), lses [...]
  (natural log, -inf: no key) -> (out, lse); written elementwise so that a kernel can run it
  on its tiles (rows with no key anywhere: out 0, lse -inf)."""
  m = lses[0]
  for lse in lses[1:]:
    m = jnp.maximum(m, lse)
  m_safe = jnp.where(m > -jnp.inf, m, 0.0)
  weights = [jnp.exp(lse - m_safe) for lse in lses]
  total = weights[0]
  for w in weights[1:]:
    total = total + w
  has = total > 0
  total_safe = jnp.where(has, total, 1.0)
  o = weights[0][..., None] * outs[0]
  for w, out in zip(weights[1:], outs[1:]):
    o = o + w[..., None] * out
  return o / total_safe[..., None], jnp.where(has, m_safe + jnp.log(total_safe), -jnp.inf)


def level_node(refs, pos: int, index, local, *, mapped: bool, stacked: bool, nodes: int):
  """A program's node from a level's optional refs at `pos`: [map] (the local node is
  map[index]; else `local`), then [layer] (a stacked cache [L*N,...] read in place: the node
  moves by layer * N). Returns (local node, node in the cache, the next ref position)."""
  if mapped:
    local = refs[pos][index]
    pos += 1
  node = local
  if stacked:
    node = local + refs[pos][0] * nodes
    pos += 1
  return local, node, pos

