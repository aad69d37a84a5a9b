"""The XLA backend's layouts of a shared level: grouped by node (static owners) and tiles of
c sequences of one node (traced owners, or static ones too uneven to group), against the
float64 oracle; the tile table's invariants; no recompilation for a new tree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from hydrax.attention import KVLevel, hydragen_attention
from hydrax.attention import xla
from tests import oracle
from tests.attention.conftest import BACKENDS, Spied
from tests.attention.test_core import _check, _expect, _run


@st.composite
def skewed_trees(draw):
  """q and 1..3 levels: shared levels with random, uneven (often one dominant node) owners,
  empty nodes, ragged and zero lengths; the last level per sequence or not; GQA 1..8, T 1..3."""
  b = draw(st.integers(1, 12))
  t = draw(st.integers(1, 3))
  kh = draw(st.sampled_from([1, 2]))
  g = draw(st.sampled_from([1, 2, 3, 8]))
  d = draw(st.sampled_from([4, 8]))
  rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
  levels = []
  n_levels = draw(st.integers(1, 3))
  for i in range(n_levels):
    per_seq = i == n_levels - 1 and draw(st.booleans())
    n = b if per_seq else draw(st.integers(1, 6))
    s = draw(st.integers(0, 7))
    lengths = rng.integers(0, s + 1, size=n).astype(np.int32)
    if draw(st.booleans()):
      lengths[rng.integers(0, n)] = 0
    owner = None
    if not per_seq:
      owner = rng.integers(0, n, size=b).astype(np.int32)
      if draw(st.booleans()):               # one node owns most sequences
        owner[rng.random(b) < 0.8] = rng.integers(0, n)
    levels.append((rng.standard_normal((n, s, kh, d)).astype(np.float32),
                   rng.standard_normal((n, s, kh, d)).astype(np.float32), lengths, owner))
  q = rng.standard_normal((b, t, kh * g, d)).astype(np.float32)
  return q, levels, draw(st.booleans()), draw(st.sampled_from([jnp.float32, jnp.bfloat16]))


def _run_traced(q, levels, causal, dtype, layers=None):
  """hydragen_attention(backend="xla") with owners and lengths as jit arguments; with
  `layers`, every level stored as the last layer of a stacked cache read at a traced layer."""
  def fn(q, arrays, owners, layer):
    lv = [KVLevel(k, v, n, o, layer) for (k, v, n), o in zip(arrays, owners)]
    return hydragen_attention(q, lv, causal_last=causal, backend="xla")

  def stack(x):
    x = jnp.asarray(x, dtype)
    return x if layers is None else jnp.concatenate(
        [jnp.full((layers - 1,) + x.shape, 7.0, dtype), x[None]])

  arrays = [(stack(k), stack(v), jnp.asarray(n)) for k, v, n, _ in levels]
  owners = [None if o is None else jnp.asarray(o) for *_, o in levels]
  layer = None if layers is None else jnp.int32(layers - 1)
  return jax.jit(fn)(jnp.asarray(q, dtype), arrays, owners, layer)


@pytest.mark.slow
@given(skewed_trees())
def test_traced_owners_match_oracle(case):
  q, levels, causal, dtype = case
  out, lse = _run_traced(q, levels, causal, dtype, layers=2)
  _check(out, lse, *_expect(q, levels, causal, dtype), dtype)


@pytest.mark.slow
@given(skewed_trees())
def test_static_owners_match_oracle(case):
  """Static owners: grouped by node, or tiles with a NumPy table when the groups are uneven."""
  q, levels, causal, dtype = case
  xla = Spied(BACKENDS[0])
  assert xla.name == "xla"
  out, lse = _run(xla, q, levels, causal, dtype)          # owners closed over: static
  _check(out, lse, *_expect(q, levels, causal, dtype), dtype)


def test_tile_table_invariants():
  """Every sequence sits in exactly one slot of a tile of its own node; at most c per tile;
  the traced table (static bound of tiles) and the NumPy one agree on the used tiles."""
  rng = np.random.default_rng(3)
  for n, b in [(1, 5), (3, 7), (6, 4), (4, 40), (16, 33)]:
    for owner in (rng.integers(0, n, size=b), np.zeros(b, np.int64),
                  np.minimum(rng.integers(0, 2, size=b) * rng.integers(0, n, size=b), n - 1)):
      owner = owner.astype(np.int32)
      c = xla.tile_size(n, b)
      bound = xla.num_tiles(n, b, c)
      ref = xla._tiled_grouping(np, owner, n, b, c)
      got = jax.jit(lambda o: xla._tiled_grouping(jnp, o, n, b, c))(jnp.asarray(owner))
      got = [np.asarray(x) for x in got]
      assert got[0].shape == (bound, c) and ref[0].shape[0] <= bound
      for seq_idx, tile_node, tile, slot in (ref, got):
        np.testing.assert_array_equal(seq_idx[tile, slot], np.arange(b))
        np.testing.assert_array_equal(tile_node[tile], owner)
        assert (seq_idx < b).sum() == b
      used = ref[0].shape[0]
      np.testing.assert_array_equal(got[0][:used], ref[0])
      np.testing.assert_array_equal(got[1][:used], ref[1])
      assert (got[0][used:] == b).all()                     # unused tiles: padding only


def test_uneven_static_owners_take_tiles_and_balanced_ones_group():
  b, n = 64, 8
  seen = []
  real_tiled, real_grouped = xla._tiled, xla._grouped

  def spy(name, fn):
    def wrapped(*a, **k):
      seen.append(name)
      return fn(*a, **k)
    return wrapped

  q = jnp.ones((b, 1, 2, 4), jnp.float32)
  k = jnp.ones((n, 3, 1, 4), jnp.float32)
  lengths, limits = jnp.full((n,), 3, jnp.int32), jnp.full((b, 1), 3, jnp.int32)
  try:
    xla._tiled, xla._grouped = spy("tiled", real_tiled), spy("grouped", real_grouped)
    balanced = np.repeat(np.arange(n), b // n).astype(np.int32)
    skewed = np.r_[np.zeros(b - n + 1), np.arange(1, n)].astype(np.int32)
    for owner in (balanced, skewed):
      xla.level_attention(q, k, k, lengths, owner, limits, scale=1.0)
  finally:
    xla._tiled, xla._grouped = real_tiled, real_grouped
  assert seen == ["grouped", "tiled"]


def test_new_tree_of_same_shapes_does_not_recompile():
  rng = np.random.default_rng(5)
  b, n, s, kh, d = 7, 3, 6, 1, 4
  traces = []

  def fn(q, k, v, lengths, owner):
    traces.append(1)
    return hydragen_attention(q, [KVLevel(k, v, lengths, owner)], causal_last=False,
                              backend="xla")

  jfn = jax.jit(fn)
  q = rng.standard_normal((b, 1, 2, d)).astype(np.float32)
  k = rng.standard_normal((n, s, kh, d)).astype(np.float32)
  v = rng.standard_normal((n, s, kh, d)).astype(np.float32)
  for _ in range(3):
    owner = rng.integers(0, n, size=b).astype(np.int32)
    lengths = rng.integers(0, s + 1, size=n).astype(np.int32)
    out, lse = jfn(q, k, v, lengths, owner)
    keys, values = oracle.concat_levels([(k, v, lengths, owner)])
    _check(out, lse, *oracle.dense(q, keys, values, causal=False), jnp.float32)
  assert len(traces) == 1 and jfn._cache_size() == 1


def test_gradients_with_traced_owners_match_static():
  """The tiled layout is differentiable (the pallas backend's backward pass runs it too)."""
  rng = np.random.default_rng(6)
  b, n, s, kh, g, d = 6, 3, 5, 2, 2, 4
  q = jnp.asarray(rng.standard_normal((b, 2, kh * g, d)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((n, s, kh, d)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((n, s, kh, d)), jnp.float32)
  lengths = jnp.asarray([5, 0, 3], jnp.int32)
  owner = np.array([2, 0, 2, 1, 0, 2], np.int32)

  def loss(q, k, v, own):
    out, lse = hydragen_attention(q, [KVLevel(k, v, lengths, own)], backend="xla")
    return jnp.sum(out * out) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

  static = jax.jit(lambda q, k, v: jax.grad(loss, argnums=(0, 1, 2))(q, k, v, owner))(q, k, v)
  traced = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v, jnp.asarray(owner))
  for a, b_ in zip(static, traced):
    assert np.isfinite(np.asarray(b_)).all()
    np.testing.assert_allclose(np.asarray(b_), np.asarray(a), rtol=1e-5, atol=1e-6)
