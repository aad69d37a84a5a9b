"""Prepacking: packed suffix attention == the float64 oracle == padded hydragen attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from hydrax.attention import KVLevel, hydragen_attention
from hydrax.offline import packing as P
from tests import oracle

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 3e-2}


def test_pack_places_every_suffix_once_without_overlap():
  rng = np.random.default_rng(0)
  lengths = rng.integers(0, 40, 50)
  pk = P.pack(lengths, width=48)
  used = np.zeros((pk.rows, pk.width), int)
  for b, n in enumerate(lengths):
    used[pk.row[b], pk.offset[b]:pk.offset[b] + n] += 1
  assert used.max() == 1 and used.sum() == lengths.sum()
  # first fit decreasing: at most 11/9 of the lower bound, plus one
  assert pk.rows <= 11 / 9 * np.ceil(lengths.sum() / 48) + 1
  assert P.padding_ratio(lengths, pk) > 1.3
  with pytest.raises(ValueError, match="width=8 is shorter"):
    P.pack([3, 9], width=8)
  with pytest.raises(ValueError, match="lengths"):
    P.pack([-1])


def test_pack_tokens_and_unpack_round_trip():
  lengths = np.array([3, 0, 5, 1])
  tokens = np.arange(4 * 6).reshape(4, 6) + 1
  starts = np.array([10, 0, 2, 7])
  pk = P.pack(lengths)
  packed, seg, pos = P.pack_tokens(tokens, lengths, starts, pk)
  assert packed.shape == (pk.rows, 5) and (seg >= 0).sum() == 9
  for b, n in enumerate(lengths):
    cols = slice(pk.offset[b], pk.offset[b] + n)
    assert list(packed[pk.row[b], cols]) == list(tokens[b, :n])
    assert list(seg[pk.row[b], cols]) == [b] * n
    assert list(pos[pk.row[b], cols]) == list(range(starts[b], starts[b] + n))
  back = np.asarray(P.unpack(jnp.asarray(packed), pk, lengths, 6))
  assert np.array_equal(back, np.where(np.arange(6) < lengths[:, None], tokens, 0))


@given(st.lists(st.integers(0, 9), min_size=1, max_size=12), st.integers(0, 3),
       st.integers(0, 2**31 - 1))
def test_pack_tokens_equals_two_dimensional_indexing(lengths, extra_width, seed):
  """pack_tokens' flat indices place exactly what 2-D fancy indexing does (its first form)."""
  rng = np.random.default_rng(seed)
  lengths = np.asarray(lengths)
  tokens = rng.integers(0, 100, (lengths.size, lengths.max() + 2)).astype(np.int32)
  starts = rng.integers(0, 50, lengths.size)
  pk = P.pack(lengths, width=max(int(lengths.max()), 1) + extra_width)
  seq, index, row, col = P._slots(pk, lengths)
  want = (np.zeros((pk.rows, pk.width), np.int32), np.full((pk.rows, pk.width), -1, np.int32),
          np.zeros((pk.rows, pk.width), np.int32))
  want[0][row, col] = tokens[seq, index]
  want[1][row, col] = seq
  want[2][row, col] = starts[seq] + index
  for got, ref in zip(P.pack_tokens(tokens, lengths, starts, pk), want):
    assert got.dtype == ref.dtype and np.array_equal(got, ref)


@st.composite
def batches(draw):
  """Shared levels (random owners, ragged, empty nodes) + ragged suffixes (zero-length too)."""
  b = draw(st.integers(1, 6))
  kh = draw(st.sampled_from([1, 2]))
  g = draw(st.sampled_from([1, 2, 3, 4, 8]))
  d = draw(st.sampled_from([4, 8]))
  n_levels = draw(st.integers(0, 2))
  rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
  levels = []
  for _ in range(n_levels):
    n, s = int(rng.integers(1, 4)), int(rng.integers(0, 7))
    lengths = rng.integers(0, s + 1, n).astype(np.int32)
    owner = rng.integers(0, n, b).astype(np.int32)
    levels.append((rng.standard_normal((n, s, kh, d)).astype(np.float32),
                   rng.standard_normal((n, s, kh, d)).astype(np.float32), lengths, owner))
  suffix = rng.integers(0, 9, b)
  if draw(st.booleans()):
    suffix[rng.integers(0, b)] = 0
  suffix[rng.integers(0, b)] = max(suffix.max(), 1)
  width = int(suffix.max()) + int(rng.integers(0, 5))
  s = int(suffix.max())
  q = rng.standard_normal((b, s, kh * g, d)).astype(np.float32)
  k = rng.standard_normal((b, s, kh, d)).astype(np.float32)
  v = rng.standard_normal((b, s, kh, d)).astype(np.float32)
  traced = draw(st.booleans())
  return levels, suffix, width, q, k, v, traced


def _packed(x, pk, lengths):
  seq, index, row, col = P._slots(pk, lengths)
  out = np.zeros((pk.rows, pk.width) + x.shape[2:], x.dtype)
  out[row, col] = x[seq, index]
  return out


def _run_packed(levels, suffix, width, q, k, v, traced, dtype):
  """Packed attention under one jit: segment ids closed over (static) or passed (traced)."""
  pk = P.pack(suffix, width=width)
  _, seg, _ = P.pack_tokens(np.zeros(q.shape[:2], np.int32), suffix, np.zeros_like(suffix), pk)
  owners = [o for *_, o in levels]
  arrays = ([(jnp.asarray(lk, dtype), jnp.asarray(lv, dtype), jnp.asarray(n))
             for lk, lv, n, _ in levels],
            *(jnp.asarray(_packed(x, pk, suffix), dtype) for x in (q, k, v)))

  def run(kvl, q, k, v, seg):
    kv_levels = [KVLevel(lk, lv, n, o) for (lk, lv, n), o in zip(kvl, owners)]
    return P.packed_attention(q, k, v, seg, kv_levels, backend="xla")
  if traced:
    out, lse = jax.jit(run)(*arrays, seg)
  else:
    out, lse = jax.jit(lambda *a: run(*a, seg))(*arrays)
  return pk, seg, np.asarray(out, np.float32), np.asarray(lse)


def _padded(levels, q, k, v):
  """Padded prefill: every row holds S slots; query i of row b sees its path and suffix keys
  0..i (bottom-right causal over the padded width)."""
  b, s = q.shape[:2]
  owners = [o for *_, o in levels]

  @jax.jit
  def run(kvl, q, k, v):
    kv_levels = [KVLevel(lk, lv, n, o) for (lk, lv, n), o in zip(kvl, owners)]
    kv_levels.append(KVLevel(k, v, jnp.full((b,), s, jnp.int32), None))
    return hydragen_attention(q, kv_levels, causal_last=True, backend="xla")
  out, lse = run([(jnp.asarray(lk), jnp.asarray(lv), jnp.asarray(n)) for lk, lv, n, _ in levels],
                 jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
  return np.asarray(out), np.asarray(lse)


@pytest.mark.slow
@given(batches(), st.sampled_from([jnp.float32, jnp.float32, jnp.bfloat16]))
def test_packed_attention_matches_oracle_and_padded_prefill(case, dtype):
  levels, suffix, width, q, k, v, traced = case
  pk, seg, out, lse = _run_packed(levels, suffix, width, q, k, v, traced, dtype)
  rnd = lambda x: np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))
  tol = TOL[dtype]
  keys, values = oracle.concat_levels([(rnd(lk), rnd(lv), n, o) for lk, lv, n, o in levels] +
                                      [(rnd(k), rnd(v), suffix, None)])
  if dtype == jnp.float32:
    pad_out, pad_lse = _padded(levels, q, k, v)
  for b, n in enumerate(suffix):
    if n == 0:
      continue
    ref_out, ref_lse = oracle.dense(rnd(q[b:b + 1, :n]), [keys[b]], [values[b]], causal=True)
    cols = slice(pk.offset[b], pk.offset[b] + n)
    np.testing.assert_allclose(out[pk.row[b], cols], ref_out[0], atol=tol, rtol=tol)
    np.testing.assert_allclose(lse[pk.row[b], cols], ref_lse[0], atol=tol, rtol=tol)
    if dtype == jnp.float32:     # packed == padded prefill, float32 tight
      np.testing.assert_allclose(out[pk.row[b], cols], pad_out[b, :n], atol=1e-5, rtol=1e-5)
      np.testing.assert_allclose(lse[pk.row[b], cols], pad_lse[b, :n], atol=1e-5, rtol=1e-5)
  pad = seg < 0
  assert np.all(out[pad] == 0) and np.all(np.isneginf(lse[pad]))


def test_bad_input():
  q = jnp.zeros((2, 4, 2, 8))
  k = jnp.zeros((2, 4, 1, 8))
  with pytest.raises(ValueError, match="segment_ids must have shape"):
    P.packed_attention(q, k, k, np.zeros((2, 3), np.int32))
  with pytest.raises(ValueError, match="k and v must be"):
    P.packed_attention(q, k[:, :3], k[:, :3], np.zeros((2, 4), np.int32))
  # owner None: one node per sequence, so a segment id must name one of its N nodes
  lvl = KVLevel(jnp.zeros((2, 3, 1, 8)), jnp.zeros((2, 3, 1, 8)), jnp.array([1, 2]), None)
  seg = np.array([[0, 0, 1, 1], [3, 3, -1, -1]], np.int32)
  with pytest.raises(ValueError, match=r"owner\[4\] = 3 is out of range"):
    P.packed_attention(q, k, k, seg, [lvl])


def test_level_without_owner_is_one_node_per_sequence():
  """owner None (node b = sequence b: keys the sequences already hold) equals owner arange."""
  rng = np.random.default_rng(3)
  lengths = np.array([2, 0, 3])
  pk = P.pack(lengths, width=4)
  _, seg, _ = P.pack_tokens(np.zeros((3, 3), np.int32), lengths, np.zeros(3), pk)
  q, k = (jnp.asarray(rng.standard_normal((pk.rows, 4, h, 8)), jnp.float32) for h in (4, 2))
  kv = [jnp.asarray(rng.standard_normal((3, 5, 2, 8)), jnp.float32) for _ in "kv"]
  held = jnp.array([5, 1, 0], jnp.int32)
  a = P.packed_attention(q, k, k, seg, [KVLevel(*kv, held, None)])
  b = P.packed_attention(q, k, k, seg, [KVLevel(*kv, held, np.arange(3, dtype=np.int32))])
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
