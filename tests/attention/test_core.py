"""Exactness and robustness of the attention core against the float64 oracle.

Tests that take `backend` (tests/attention/conftest.py) run once per backend that runs here
and check, through a spy, that every level went through that backend (no XLA fallback).
Keys and values past each node's length hold NaN or +-Inf in the hypothesis cases: nothing
past `lengths` may reach the output.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from hydrax import _log
from hydrax.attention import KVLevel, attention, hydragen_attention, merge
from tests import oracle

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 3e-2, jnp.float16: 5e-3}
POISONS = (None, np.nan, np.inf, -np.inf)


def _poison(rng, k, v, lengths, poison):
  """Writes `poison` into keys and values past each node's length (they must stay unseen)."""
  if poison is None:
    return
  for node, n in enumerate(lengths):
    k[node, n:] = poison
    v[node, n:] = poison if rng.random() < 0.5 else np.nan


@st.composite
def trees(draw, dtype=jnp.float32, max_levels=4, d_choices=(4, 8, 24, 128)):
  """Random q and 1..4 levels with random (not only contiguous) owners, ragged lengths,
  GQA 1..8, and NaN/Inf past the lengths. Returns (q, levels, causal, dtype, traced owners)."""
  b = draw(st.integers(1, 5))
  t = draw(st.sampled_from([1, 1, 2, 3]))
  kh = draw(st.sampled_from([1, 2]))
  g = draw(st.integers(1, 8))
  d = draw(st.sampled_from(d_choices))
  n_levels = draw(st.integers(1, max_levels))
  poison = draw(st.sampled_from(POISONS))
  seed = draw(st.integers(0, 2**31 - 1))
  rng = np.random.default_rng(seed)
  levels = []
  for i in range(n_levels):
    per_seq = i == n_levels - 1 and draw(st.booleans())     # only the last level per sequence
    n = b if per_seq else draw(st.integers(1, 3))
    s = draw(st.integers(0, 6))
    lengths = rng.integers(0, s + 1, size=n).astype(np.int32)
    if draw(st.booleans()):           # full and empty nodes are common cases
      lengths[rng.integers(0, n)] = s
    owner = None if per_seq else rng.integers(0, n, size=b).astype(np.int32)
    k = rng.standard_normal((n, s, kh, d)).astype(np.float32)
    v = rng.standard_normal((n, s, kh, d)).astype(np.float32)
    _poison(rng, k, v, lengths, poison)
    levels.append((k, v, lengths, owner))
  q = rng.standard_normal((b, t, kh * g, d)).astype(np.float32)
  causal = draw(st.booleans())
  traced = draw(st.booleans())
  return q, levels, causal, dtype, traced


def _run(backend, q, levels, causal, dtype, *, traced=False, jit=True):
  """hydragen_attention through the spied `backend` (one call per level checked), under jit
  (one compile per shape) unless jit=False. Owners are closed over as NumPy constants
  (static), or with traced=True passed as jit arguments (traced)."""
  static = [owner for *_, owner in levels]
  dynamic = [None if o is None else jnp.asarray(o) for o in static] if traced else None

  def fn(impl):
    def call(q, arrays, dynamic):
      owners = static if dynamic is None else dynamic
      lv = [KVLevel(k, v, lengths, owner) for (k, v, lengths), owner in zip(arrays, owners)]
      return hydragen_attention(q, lv, causal_last=causal, backend=impl)

    arrays = [(jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.asarray(lengths))
              for k, v, lengths, _ in levels]
    return (jax.jit(call) if jit else call)(jnp.asarray(q, dtype), arrays, dynamic)

  return backend.run(fn, [np.shape(k) for k, *_ in levels])


def _expect(q, levels, causal, dtype):
  rnd = lambda x: np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))
  keys, values = oracle.concat_levels(
      [(rnd(k), rnd(v), lengths, owner) for k, v, lengths, owner in levels])
  return oracle.dense(rnd(q), keys, values, causal=causal)


def _check(out, lse, ref_out, ref_lse, dtype):
  out, lse = np.asarray(out.astype(jnp.float32)), np.asarray(lse)
  assert not np.isnan(out).any() and not np.isnan(lse).any()
  assert lse.dtype == np.float32
  tol = TOL[dtype]
  np.testing.assert_allclose(out, ref_out, rtol=tol, atol=tol)
  finite = np.isfinite(ref_lse)
  np.testing.assert_array_equal(np.isfinite(lse), finite)
  np.testing.assert_allclose(lse[finite], ref_lse[finite], rtol=tol, atol=tol)
  np.testing.assert_array_equal(out[~finite], 0.0)


def _exact(backend, case):
  q, levels, causal, dtype, traced = case
  out, lse = _run(backend, q, levels, causal, dtype, traced=traced)
  assert out.dtype == dtype
  _check(out, lse, *_expect(q, levels, causal, dtype), dtype)


@pytest.mark.slow
def test_hydragen_matches_dense_float32(backend):
  backend.settings(given(trees())(lambda case: _exact(backend, case)))()


@pytest.mark.slow
def test_hydragen_matches_dense_bfloat16(backend):
  backend.settings(given(trees(dtype=jnp.bfloat16))(lambda case: _exact(backend, case)))()


@pytest.mark.parametrize("g, dtype", [(1, jnp.float32), (3, jnp.bfloat16), (8, jnp.bfloat16)])
def test_head_dim_128(backend, g, dtype):
  rng = np.random.default_rng(g)
  b, t, kh, d = 3, 2, 2, 128
  levels = [(rng.standard_normal((1, 37, kh, d)), rng.standard_normal((1, 37, kh, d)),
             np.array([37], np.int32), np.zeros(b, np.int32)),
            (rng.standard_normal((b, 9, kh, d)), rng.standard_normal((b, 9, kh, d)),
             np.array([9, 0, 4], np.int32), None)]
  q = rng.standard_normal((b, t, kh * g, d))
  for causal in (False, True):
    out, lse = _run(backend, q, levels, causal, dtype)
    _check(out, lse, *_expect(q, levels, causal, dtype), dtype)


def test_attention_matches_dense(backend):
  @given(st.integers(1, 4), st.integers(1, 5), st.integers(0, 9), st.booleans(),
         st.integers(1, 8), st.integers(0, 2**31 - 1))
  def check(b, t, s, causal, g, seed):
    rng = np.random.default_rng(seed)
    kh, d = 2, 8
    q = rng.standard_normal((b, t, kh * g, d)).astype(np.float32)
    k = rng.standard_normal((b, s, kh, d)).astype(np.float32)
    v = rng.standard_normal((b, s, kh, d)).astype(np.float32)
    lengths = rng.integers(0, s + 1, size=b).astype(np.int32)
    ref = oracle.dense(q, [k[i, :lengths[i]] for i in range(b)],
                       [v[i, :lengths[i]] for i in range(b)], causal=causal)
    _poison(rng, k, v, lengths, np.nan)
    fn = lambda impl: jax.jit(lambda q, k, v, n: attention(
        q, k, v, kv_lengths=n, causal=causal, backend=impl))(
            jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(lengths))
    _check(*backend.run(fn, [k.shape]), *ref, jnp.float32)

  backend.settings(check)()


def test_attention_default_lengths_and_scale(backend):
  rng = np.random.default_rng(0)
  q, k, v = (rng.standard_normal(sh).astype(np.float32)
             for sh in [(2, 3, 4, 8), (2, 5, 4, 8), (2, 5, 4, 8)])
  out, lse = backend.run(lambda impl: attention(q, k, v, scale=0.3, backend=impl), [k.shape])
  ref = oracle.dense(q, list(k), list(v), causal=False, scale=0.3)
  _check(out, lse, *ref, jnp.float32)


def test_causal_query_longer_than_last_level(backend):
  """T exceeds the last level's length: earlier queries must not see later shared keys."""
  rng = np.random.default_rng(1)
  b, t, kh, d = 2, 4, 1, 8
  levels = [(rng.standard_normal((1, 6, kh, d)), rng.standard_normal((1, 6, kh, d)),
             np.array([6], np.int32), np.zeros(b, np.int32)),
            (rng.standard_normal((b, 3, kh, d)), rng.standard_normal((b, 3, kh, d)),
             np.array([1, 0], np.int32), None)]
  q = rng.standard_normal((b, t, kh, d))
  for traced in (False, True):
    out, lse = _run(backend, q, levels, True, jnp.float32, traced=traced)
    _check(out, lse, *_expect(q, levels, True, jnp.float32), jnp.float32)


def _limits_case(seed):
  """One level called directly with per-query limits below the nodes' lengths; keys and
  values past each node's largest limit (valid by length, seen by no query) are NaN/Inf."""
  rng = np.random.default_rng(seed)
  b, t, kh, g, d, n, s = 5, 3, 2, 2, 8, 3, 11
  q = rng.standard_normal((b, t, kh * g, d)).astype(np.float32)
  k = rng.standard_normal((n, s, kh, d)).astype(np.float32)
  v = rng.standard_normal((n, s, kh, d)).astype(np.float32)
  lengths = np.array([11, 7, 4], np.int32)
  owner = np.array([2, 0, 0, 2, 1], np.int32)
  limits = np.minimum(rng.integers(0, 8, size=(b, t)), lengths[owner][:, None]).astype(np.int32)
  hi = np.zeros(n, np.int32)
  np.maximum.at(hi, owner, limits.max(1))
  for node in range(n):
    k[node, hi[node]:] = np.inf
    v[node, hi[node]:] = np.nan
  return q, k, v, lengths, owner, limits


@pytest.mark.parametrize("per_seq", [False, True])
def test_keys_past_limits_never_reach_output(backend, per_seq):
  q, k, v, lengths, owner, limits = _limits_case(3)
  if per_seq:
    k, v, lengths, owner = k[owner], v[owner], lengths[owner], None
  out, lse = backend.run(lambda impl: impl.attend(
      jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(lengths), owner,
      jnp.asarray(limits), scale=0.5), [k.shape])
  rows = [(b, t) for b in range(q.shape[0]) for t in range(q.shape[1])]
  node = lambda b: b if owner is None else owner[b]
  for b, t in rows:
    lim = limits[b, t]
    ref = oracle.dense(q[b:b + 1, t:t + 1], [k[node(b), :lim]], [v[node(b), :lim]],
                       causal=False, scale=0.5)
    _check(out[b:b + 1, t:t + 1], lse[b:b + 1, t:t + 1], *ref, jnp.float32)


def test_stacked_layer_reads_its_layer_only(backend):
  """KVLevel.layer: k, v are [L,N,S,K,D]; the other layers hold NaN and must stay unread."""
  rng = np.random.default_rng(6)
  b, t, kh, g, d, layers = 3, 2, 1, 2, 8, 3
  shared = rng.standard_normal((layers, 2, 6, kh, d)).astype(np.float32)
  suffix = rng.standard_normal((layers, b, 4, kh, d)).astype(np.float32)
  for x in (shared, suffix):
    x[[0, 2]] = np.nan
  lengths = [np.array([6, 2], np.int32), np.array([4, 0, 3], np.int32)]
  owner = np.array([1, 0, 1], np.int32)
  q = rng.standard_normal((b, t, kh * g, d)).astype(np.float32)

  def fn(impl):
    def call(q, ks, layer):
      lv = [KVLevel(ks[0], ks[0], jnp.asarray(lengths[0]), owner, layer),
            KVLevel(ks[1], ks[1], jnp.asarray(lengths[1]), None, layer)]
      return hydragen_attention(q, lv, backend=impl)
    return jax.jit(call)(jnp.asarray(q), (jnp.asarray(shared), jnp.asarray(suffix)),
                         jnp.int32(1))

  layered = backend.backend.takes_layer
  out, lse = backend.run(fn, [x.shape if layered else x.shape[1:] for x in (shared, suffix)])
  levels = [(shared[1], shared[1], lengths[0], owner), (suffix[1], suffix[1], lengths[1], None)]
  _check(out, lse, *_expect(q, levels, True, jnp.float32), jnp.float32)


def _parts(rng, n_parts, shape=(2, 3, 4), d=8, empty=()):
  parts = []
  for i in range(n_parts):
    lse = rng.standard_normal(shape).astype(np.float32) * 3
    if i in empty:
      lse[:] = -np.inf
    parts.append((jnp.asarray(rng.standard_normal(shape + (d,)), jnp.float32),
                  jnp.asarray(lse)))
  return parts


@given(st.integers(1, 6), st.integers(0, 2**31 - 1), st.data())
def test_merge_is_invariant_to_order_and_grouping(n_parts, seed, data):
  rng = np.random.default_rng(seed)
  empty = data.draw(st.sets(st.integers(0, n_parts - 1)))
  parts = _parts(rng, n_parts, empty=empty)
  out, lse = merge(parts)
  perm = data.draw(st.permutations(range(n_parts)))
  out2, lse2 = merge([parts[i] for i in perm])
  cut = data.draw(st.integers(1, n_parts))
  grouped = [merge(parts[:cut])] + ([merge(parts[cut:])] if cut < n_parts else [])
  out3, lse3 = merge(grouped)
  for o, l in [(out2, lse2), (out3, lse3)]:
    np.testing.assert_allclose(o, out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(l, lse, rtol=1e-5, atol=1e-6)
  assert not np.isnan(out).any()


def test_merge_equals_attention_over_union():
  rng = np.random.default_rng(3)
  q = rng.standard_normal((2, 1, 2, 8)).astype(np.float32)
  k = rng.standard_normal((2, 10, 2, 8)).astype(np.float32)
  v = rng.standard_normal((2, 10, 2, 8)).astype(np.float32)
  whole = attention(q, k, v, backend="xla")
  a = attention(q, k[:, :4], v[:, :4], backend="xla")
  b = attention(q, k[:, 4:], v[:, 4:], backend="xla")
  for x, y in zip(merge([a, b]), whole):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_merge_all_empty_is_zero_not_nan():
  rng = np.random.default_rng(0)
  out, lse = merge(_parts(rng, 3, empty={0, 1, 2}))
  assert np.all(np.asarray(out) == 0) and np.all(np.isneginf(np.asarray(lse)))
  grad = jax.grad(lambda p: merge(p)[0].sum())(_parts(rng, 2, empty={0, 1}))
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(grad))


def test_empty_levels_never_nan(backend):
  rng = np.random.default_rng(0)
  b, kh, d = 3, 2, 8
  levels = [(rng.standard_normal((2, 4, kh, d)), rng.standard_normal((2, 4, kh, d)),
             np.zeros(2, np.int32), np.array([0, 1, 1], np.int32)),
            (rng.standard_normal((b, 0, kh, d)), rng.standard_normal((b, 0, kh, d)),
             np.zeros(b, np.int32), None)]
  levels[0][0][:] = np.nan                     # past every length
  q = rng.standard_normal((b, 2, kh * 4, d))
  for causal, traced in ((False, False), (True, True)):
    out, lse = _run(backend, q, levels, causal, jnp.float32, traced=traced)
    assert np.all(np.asarray(out) == 0) and np.all(np.isneginf(np.asarray(lse)))


# --- transformations -----------------------------------------------------------------------

def _fixed_case(seed=0, b=4, t=2, kh=2, g=2, d=8):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((b, t, kh * g, d)), jnp.float32)
  shared = KVLevel(jnp.asarray(rng.standard_normal((2, 5, kh, d)), jnp.float32),
                   jnp.asarray(rng.standard_normal((2, 5, kh, d)), jnp.float32),
                   jnp.array([5, 3], jnp.int32), np.array([1, 0, 1, 1], np.int32))
  suffix = KVLevel(jnp.asarray(rng.standard_normal((b, 4, kh, d)), jnp.float32),
                   jnp.asarray(rng.standard_normal((b, 4, kh, d)), jnp.float32),
                   jnp.array([4, 2, 3, 4], jnp.int32), None)
  return q, [shared, suffix]


@pytest.mark.slow
def test_jit_with_static_and_traced_owners(backend):
  q, levels = _fixed_case()
  shapes = [lv.k.shape for lv in levels]
  eager = backend.run(lambda impl: hydragen_attention(q, levels, backend=impl), shapes)
  static = backend.run(lambda impl: jax.jit(lambda q, k0, k1: hydragen_attention(
      q, [levels[0]._replace(k=k0), levels[1]._replace(k=k1)], backend=impl))(
          q, levels[0].k, levels[1].k), shapes)
  traced = backend.run(lambda impl: jax.jit(lambda q, lv: hydragen_attention(
      q, lv, backend=impl))(q, [levels[0]._replace(owner=jnp.asarray(levels[0].owner)),
                                levels[1]]), shapes)
  for got in (static, traced):
    for x, y in zip(got, eager):
      np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)


def test_vmap_over_leading_axis():
  cases = [_fixed_case(seed) for seed in range(3)]
  qs = jnp.stack([c[0] for c in cases])
  stack = lambda i, f: jnp.stack([getattr(c[1][i], f) for c in cases])
  owner = cases[0][1][0].owner
  levels = [KVLevel(stack(0, "k"), stack(0, "v"), stack(0, "lengths"), None),
            KVLevel(stack(1, "k"), stack(1, "v"), stack(1, "lengths"), None)]
  # owner is shared by all vmapped cases: close over it.
  fn = lambda q, k0, v0, l0, k1, v1, l1: hydragen_attention(
      q, [KVLevel(k0, v0, l0, owner), KVLevel(k1, v1, l1, None)], backend="xla")
  out, lse = jax.vmap(fn)(qs, *levels[0][:3], *levels[1][:3])
  for i, (q, lv) in enumerate(cases):
    o, l = hydragen_attention(q, lv, backend="xla")
    np.testing.assert_allclose(out[i], o, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(lse[i], l, rtol=1e-6, atol=1e-6)


def _dense_jnp(q, levels, causal):
  """Differentiable dense reference in jnp: gather each sequence's keys with masks."""
  b, t, h, d = q.shape
  ks, vs, valid = [], [], []
  for lv in levels:
    idx = jnp.arange(b) if lv.owner is None else jnp.asarray(lv.owner)
    ks.append(lv.k[idx]); vs.append(lv.v[idx])
    valid.append(jnp.arange(lv.k.shape[1])[None, :] < lv.lengths[idx][:, None])
  k, v, valid = (jnp.concatenate(x, axis=1) for x in (ks, vs, valid))
  pos = jnp.cumsum(valid, axis=1) - 1                 # position among valid keys
  total = valid.sum(1)
  g = h // k.shape[2]
  k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
  s = jnp.einsum("bthd,bshd->bhts", q, k, precision="highest") * d ** -0.5
  qpos = total[:, None] - t + jnp.arange(t)[None, :]
  mask = valid[:, None, None, :]
  if causal:
    mask = mask & (pos[:, None, None, :] <= qpos[:, None, :, None])
  s = jnp.where(mask, s, -1e30)
  p = jax.nn.softmax(s, axis=-1)
  return jnp.einsum("bhts,bshd->bthd", p, v, precision="highest")


@pytest.mark.parametrize("causal", [False, True])
def test_grad_matches_dense_autodiff(backend, causal):
  q, levels = _fixed_case(seed=5)
  w = jnp.asarray(np.random.default_rng(9).standard_normal(q.shape), jnp.float32)

  def loss(fn, q, k0, v0, k1, v1):
    lv = [levels[0]._replace(k=k0, v=v0), levels[1]._replace(k=k1, v=v1)]
    return jnp.sum(fn(q, lv) * w)

  ref = lambda q, lv: _dense_jnp(q, lv, causal)
  args = (q, levels[0].k, levels[0].v, levels[1].k, levels[1].v)
  g_ours = backend.run(lambda impl: jax.grad(lambda *a: loss(
      lambda q, lv: hydragen_attention(q, lv, causal_last=causal, backend=impl)[0], *a),
      argnums=tuple(range(5)))(*args), [lv.k.shape for lv in levels])
  g_ref = jax.grad(lambda *a: loss(ref, *a), argnums=tuple(range(5)))(*args)
  for x, y in zip(g_ours, g_ref):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def test_grad_through_lse_and_empty_rows_is_finite():
  q, levels = _fixed_case(seed=2)
  levels[1] = levels[1]._replace(lengths=jnp.array([0, 0, 0, 0], jnp.int32))
  levels[0] = levels[0]._replace(lengths=jnp.array([0, 3], jnp.int32))
  fn = lambda q: jnp.sum(jnp.where(jnp.isfinite(l := hydragen_attention(
      q, levels, backend="xla")[1]), l, 0.0)) + hydragen_attention(
          q, levels, backend="xla")[0].sum()
  grad = jax.grad(fn)(q)
  assert np.isfinite(np.asarray(grad)).all()


# --- bad input -----------------------------------------------------------------------------

def _ok():
  q = jnp.zeros((2, 1, 4, 8)); k = jnp.zeros((2, 5, 2, 8))
  return q, k


@pytest.mark.parametrize("make, match", [
    (lambda q, k: attention(q, k[..., :4], k[..., :4]), r"head dim mismatch.*D=8.*D=4"),
    (lambda q, k: attention(q[:, :, :3], k, k), r"H=3 .* multiple of KV heads K=2"),
    (lambda q, k: attention(q[0], k, k), r"q must have rank 4 \[B,T,H,D\], got shape \(1, 4, 8\)"),
    (lambda q, k: attention(q, k.astype(jnp.bfloat16), k), r"share a dtype"),
    (lambda q, k: attention(q, k, k[:, :4]), r"same shape"),
    (lambda q, k: attention(q, k[:1], k[:1]), r"batch mismatch"),
    (lambda q, k: attention(q, k, k, kv_lengths=jnp.array([2, 6])),
     r"kv_lengths\[1\] = 6 is out of range.*capacity S=5"),
    (lambda q, k: attention(q, k, k, kv_lengths=jnp.array([2])), r"kv_lengths must have shape"),
    (lambda q, k: attention(q, k, k, kv_lengths=jnp.array([2.0, 1.0])), r"integer"),
    (lambda q, k: attention(q.astype(jnp.int32), k.astype(jnp.int32), k.astype(jnp.int32)),
     r"floating-point"),
    (lambda q, k: hydragen_attention(q, [KVLevel(k, k, jnp.array([1, 1]), jnp.array([0, 2]))]),
     r"levels\[0\].owner\[1\] = 2 is out of range.*N=2"),
    (lambda q, k: hydragen_attention(q, [KVLevel(k, k, jnp.array([1, -1]), None)]),
     r"levels\[0\].lengths\[1\] = -1"),
    (lambda q, k: hydragen_attention(q, [KVLevel(k[:1], k[:1], jnp.array([1]), None)]),
     r"owner is None .* N=1 nodes for B=2"),
    (lambda q, k: hydragen_attention(q, []), r"non-empty list of KVLevel"),
    (lambda q, k: hydragen_attention(q, KVLevel(k, k, jnp.array([1, 1]), None)),
     r"wrap a single level in a list"),
    (lambda q, k: hydragen_attention(q, [(k, k, jnp.array([1, 1]), None)]),
     r"levels\[0\] must be a KVLevel"),
    (lambda q, k: attention(q, k, k, backend="cuda-magic"), r"backend='cuda-magic' is unknown"),
    (lambda q, k: merge([]), r"parts is empty"),
    (lambda q, k: merge([(q, q)]), r"lse.shape == out.shape\[:-1\]"),
])
def test_bad_input_raises_clear_error(make, match):
  with pytest.raises(ValueError, match=match):
    make(*_ok())


def test_auto_backend_on_cpu_is_xla():
  from hydrax.attention import backends
  if jax.default_backend() == "cpu":
    assert backends.get("auto").name == "xla"


def test_sequences_of_empty_nodes_get_no_rows(backend):
  """A deep plan level: most sequences own one empty node; the real node keeps its size."""
  from hydrax.attention import xla
  rng = np.random.default_rng(4)
  b, kh, d = 9, 1, 8
  owner = np.array([2, 2, 0, 2, 2, 1, 2, 2, 0], np.int32)       # node 2 is empty
  lengths = np.array([5, 3, 0], np.int32)
  seq_idx, slot, _ = xla._static_grouping(xla._static_owner(owner, lengths, 3, b), 3, b)
  assert seq_idx.shape == (3, 2)                                  # not 6 rows per node
  levels = [(rng.standard_normal((3, 5, kh, d)), rng.standard_normal((3, 5, kh, d)),
             lengths, owner),
            (rng.standard_normal((b, 2, kh, d)), rng.standard_normal((b, 2, kh, d)),
             np.full(b, 2, np.int32), None)]
  q = rng.standard_normal((b, 1, 2, d))
  out, lse = _run(backend, q, levels, True, jnp.float32)
  _check(out, lse, *_expect(q, levels, True, jnp.float32), jnp.float32)


def _mosaic_run(backend, monkeypatch, levels, q, calls_expected, dtype):
  """Runs `levels` eagerly through the interpreted Mosaic kernel, every level on it."""
  from hydrax.attention.kernels import pallas_gpu
  calls = []
  real = pallas_gpu.mosaic_gpu.tile_attention
  monkeypatch.setattr(pallas_gpu.mosaic_gpu, "tile_attention",
                      lambda *a, **kw: calls.append(kw) or real(*a, **kw))
  pallas_gpu.clear_jit_caches()
  try:
    # Not under an outer jit: several interpreted Mosaic kernels in one program deadlocked
    # the interpreter on a 2-core machine.
    out, lse = _run(backend, q, levels, True, dtype, jit=False)
  finally:
    pallas_gpu.clear_jit_caches()
  assert len(calls) == calls_expected, calls        # every level ran on the Mosaic kernel
  assert all(c["interpret"] for c in calls)
  _check(out, lse, *_expect(q, levels, True, dtype), dtype)
  return calls


@pytest.mark.slow
def test_mosaic_kernel_exact(mosaic_backend, monkeypatch, caplog, hang_guard):
  """The Mosaic GPU kernel (interpret mode off GPU, ~4 s per program on CPU) on its own small
  case: float16 (its tolerance catches one key more or less), D 64, a shared level of two
  nodes of S=100 (padded to whole key blocks, which is logged) with owners out of order, and a
  per-sequence level with an empty suffix (a tile that runs no key block): 4 programs. q is
  scaled up so that each key's weight matters. (bfloat16 through the interpreted kernel:
  tests/attention/test_mosaic.py.)"""
  monkeypatch.setattr(_log, "_seen", set())
  rng = np.random.default_rng(12)
  b, t, kh, g, d = 2, 2, 1, 2, 64
  levels = [(rng.standard_normal((2, 100, kh, d)), rng.standard_normal((2, 100, kh, d)),
             np.array([100, 77], np.int32), np.array([1, 0], np.int32)),
            (rng.standard_normal((b, 5, kh, d)), rng.standard_normal((b, 5, kh, d)),
             np.array([5, 0], np.int32), None)]
  q = 3 * rng.standard_normal((b, t, kh * g, d))
  with caplog.at_level(logging.WARNING, logger="hydrax"):
    _mosaic_run(mosaic_backend, monkeypatch, levels, q, 2, jnp.float16)
  assert any("S=100" in r.getMessage() for r in caplog.records)     # the padding is logged


@pytest.mark.slow
def test_mosaic_folded_exact(mosaic_folded_backend, monkeypatch, hang_guard):
  """The per-sequence level folded into the shared level's Mosaic GPU launch
  (`MosaicConfig.fold_suffix`; interpret mode, 4 programs): two nodes with owners out of
  order (two tiles, each with padding rows), T = 2 causal queries of G = 4 heads (8 rows a
  sequence: 8 row groups a warpgroup, 4 a key split), a root of 3 key blocks in 2 splits,
  suffixes of 3 half blocks with ragged lengths (0, partial, full), NaN past every length,
  float16. The mutation check's case for the folded kernel."""
  rng = np.random.default_rng(16)
  b, t, kh, g, d = 9, 2, 1, 4, 64
  owner = np.array([1, 0, 1, 1, 0, 1, 1, 0, 1], np.int32)
  root = rng.standard_normal((2, 2, 384, kh, d))
  suffix = rng.standard_normal((2, b, 192, kh, d))
  root_len = np.array([300, 131], np.int32)
  suffix_len = np.array([0, 70, 192, 5, 128, 64, 191, 100, 33], np.int32)
  _poison(rng, *root, root_len, np.nan)
  _poison(rng, *suffix, suffix_len, np.nan)
  levels = [(*root, root_len, owner), (*suffix, suffix_len, None)]
  q = 3 * rng.standard_normal((b, t, kh * g, d))
  [call] = _mosaic_run(mosaic_folded_backend, monkeypatch, levels, q, 1, jnp.float16)
  assert call["suffix"] is not None and call["splits"] == 2        # one launch, folded


def test_mosaic_keys_past_lengths_never_reach_output(mosaic_backend, monkeypatch):
  rng = np.random.default_rng(13)
  b, t, kh, g, d = 2, 1, 1, 2, 64                   # one program
  k, v = rng.standard_normal((2, 1, 64, kh, d))
  lengths = np.array([40], np.int32)
  _poison(rng, k, v, lengths, np.nan)
  _mosaic_run(mosaic_backend, monkeypatch, [(k, v, lengths, np.zeros(b, np.int32))],
              rng.standard_normal((b, t, kh * g, d)), 1, jnp.bfloat16)


# --- checked mode (checks="runtime") ---------------------------------------------------------

def _checked(levels_fn, *, checks="runtime", wrap=True):
  """Runs hydragen_attention(checks=...) under jit on traced lengths/owners/layer, through
  checkify.checkify when `wrap`; returns (checkify error or None, out)."""
  from jax.experimental import checkify
  q, levels = _fixed_case()
  f = jax.jit(lambda q, lv: hydragen_attention(q, levels_fn(lv), checks=checks,
                                               backend="xla")[0])
  if not wrap:
    return None, f(q, levels)
  return checkify.checkify(f)(q, levels)


def _stacked(lv):
  return [lv[0]._replace(k=jnp.stack([lv[0].k] * 2), v=jnp.stack([lv[0].v] * 2),
                         layer=jnp.int32(1)), lv[1]]


@pytest.mark.parametrize("change, match", [
    (lambda lv: [lv[0]._replace(lengths=lv[0].lengths.at[1].set(6)), lv[1]],
     r"levels\[0\].lengths\[1\] = 6 is out of range: valid keys per node \(capacity S=5\)"),
    (lambda lv: [lv[0], lv[1]._replace(lengths=lv[1].lengths.at[2].set(-1))],
     r"levels\[1\].lengths\[2\] = -1 is out of range"),
    (lambda lv: [lv[0]._replace(owner=jnp.array([1, 0, 2, 1], jnp.int32)), lv[1]],
     r"levels\[0\].owner\[2\] = 2 is out of range: node indices \(N=2\) must lie in \[0, 1\]"),
    (lambda lv: [lv[0]._replace(owner=jnp.array([-1, 0, 1, 1], jnp.int32)), lv[1]],
     r"levels\[0\].owner\[0\] = -1"),
    (lambda lv: [(s := _stacked(lv))[0]._replace(layer=s[0].layer + 1), s[1]],
     r"levels\[0\].layer = 2 is out of range: layer indices \(L=2\) must lie in \[0, 1\]"),
])
def test_runtime_checks_raise_under_jit(change, match):
  err, _ = _checked(change)
  with pytest.raises(ValueError, match=match):
    err.throw()
  # The default mode cannot see traced values: the same input runs and reports nothing.
  assert _checked(change, checks="static")[0].get() is None


def test_runtime_checks_pass_valid_input_unchanged():
  err, out = _checked(_stacked)
  assert err.get() is None
  np.testing.assert_array_equal(out, _checked(_stacked, checks="static", wrap=False)[1])


def test_runtime_checks_need_checkify_under_jit_and_a_known_mode():
  with pytest.raises(ValueError, match=r"checkify.check which was not functionalized"):
    _checked(lambda lv: lv, wrap=False)
  q, levels = _fixed_case()
  with pytest.raises(ValueError, match=r"checks must be one of \('static', 'runtime'\), got 'on'"):
    hydragen_attention(q, levels, checks="on")
  # Eagerly, runtime checks raise at once (the values are concrete: the static checks see them).
  with pytest.raises(ValueError, match=r"levels\[1\].lengths\[0\] = 9"):
    hydragen_attention(q, [levels[0], levels[1]._replace(lengths=jnp.array([9, 0, 0, 0]))],
                       checks="runtime")


def test_runtime_checks_through_attention_and_pallas(backend):
  from jax.experimental import checkify
  rng = np.random.default_rng(2)
  q, k = (jnp.asarray(rng.standard_normal(sh), jnp.float32) for sh in [(2, 1, 2, 8), (2, 4, 1, 8)])
  f = jax.jit(lambda n: attention(q, k, k, kv_lengths=n, backend=backend.backend,
                                  checks="runtime"))
  err, _ = checkify.checkify(f)(jnp.array([4, 5], jnp.int32))
  assert "kv_lengths" not in (err.get() or "") and "lengths[1] = 5" in (err.get() or "")
  err, (out, _) = checkify.checkify(f)(jnp.array([4, 2], jnp.int32))
  assert err.get() is None and np.isfinite(np.asarray(out)).all()
