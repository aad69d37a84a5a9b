"""The pallas backend's kernels, in Pallas interpret mode on CPU (small shapes).

Each level is compared with an independent NumPy float64 reference and with the XLA backend;
the core's exactness tests run against this backend through the `backend` fixture
(tests/attention/conftest.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hydrax.attention import KVLevel, backends, hydragen_attention
from hydrax.attention import xla as xla_backend
from hydrax.attention.kernels import grouping
from hydrax.attention.kernels import pallas_gpu as pg
from tests import oracle

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 3e-2, jnp.float16: 5e-3}


def _level_ref(q, k, v, owner, limits, scale):
  """NumPy float64 attention of one level: query (b,t,h) over keys s < limits[b,t] of its node."""
  q, k, v = (np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64) for x in (q, k, v))
  b_, t_, h_, _ = q.shape
  g = h_ // k.shape[2]
  out = np.zeros(q.shape)
  lse = np.full((b_, t_, h_), -np.inf)
  for b in range(b_):
    n = b if owner is None else int(owner[b])
    for t in range(t_):
      lim = int(limits[b, t])
      if lim == 0:
        continue
      for h in range(h_):
        s = k[n, :lim, h // g] @ q[b, t, h] * scale
        m = s.max()
        p = np.exp(s - m)
        out[b, t, h] = p @ v[n, :lim, h // g] / p.sum()
        lse[b, t, h] = m + np.log(p.sum())
  return out, lse


def _assert_close(out, lse, ref_out, ref_lse, tol):
  out = np.asarray(jnp.asarray(out).astype(jnp.float32))
  lse = np.asarray(lse)
  assert out.dtype == np.float32 and lse.dtype == np.float32
  assert not np.isnan(out).any() and not np.isnan(lse).any()
  finite = np.isfinite(ref_lse)
  np.testing.assert_array_equal(np.isfinite(lse), finite)
  np.testing.assert_array_equal(out[~finite], 0.0)
  np.testing.assert_allclose(out, ref_out, rtol=tol, atol=tol)
  np.testing.assert_allclose(lse[finite], ref_lse[finite], rtol=tol, atol=tol)


def _case(seed, b, t, kh, g, d, n, s, dtype, per_seq, causal, empty_node=True):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((b, t, kh * g, d)), dtype)
  k = jnp.asarray(rng.standard_normal((n, s, kh, d)), dtype)
  v = jnp.asarray(rng.standard_normal((n, s, kh, d)), dtype)
  lengths = rng.integers(0, s + 1, size=n)
  lengths[0] = s
  owner = None
  if not per_seq:
    owner = rng.integers(0, n, size=b).astype(np.int32)
    if empty_node and n > 2:
      owner[owner == 1] = 2                    # node 1 owns no sequence
    lengths[rng.integers(0, n)] = 0 if n > 3 else lengths[-1]
  seq_len = lengths if owner is None else lengths[owner]
  if causal:   # bottom-right: query t sees keys up to seq_len - T + t (+ some earlier level)
    shift = rng.integers(0, 3, size=b)
    limits = np.clip(seq_len[:, None] - t + 1 + np.arange(t)[None, :] + shift[:, None],
                     0, seq_len[:, None])
  else:
    limits = np.broadcast_to(seq_len[:, None], (b, t))
  return q, k, v, jnp.asarray(lengths, jnp.int32), owner, jnp.asarray(limits, jnp.int32)


CASES = [
    # id, seed, B, T, K, G, D, N, S, dtype, per_seq, causal, config
    ("shared_ragged_bf16", 0, 5, 3, 2, 2, 64, 4, 37, jnp.bfloat16, False, True, {}),
    ("decode_gqa8_fp16", 1, 3, 1, 1, 8, 128, 3, 50, jnp.float16, True, False, {}),
    ("prefill_causal_f32_d8", 2, 2, 20, 2, 3, 8, 2, 29, jnp.float32, True, True, {}),
    ("mha_d128_f32_splits", 3, 3, 2, 1, 1, 128, 3, 70, jnp.float32, False, False,
     {"splits": 3, "block_n": 16, "block_m": 16}),
    ("gqa4_tiles_poison_bounds_in_kernel", 4, 6, 2, 2, 4, 64, 3, 33, jnp.bfloat16, False, True,
     {"block_m": 16, "poison": True, "tile_bounds": "kernel"}),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_level_matches_references(case):
  _, seed, b, t, kh, g, d, n, s, dtype, per_seq, causal, cfg = case
  q, k, v, lengths, owner, limits = _case(seed, b, t, kh, g, d, n, s, dtype, per_seq, causal)
  scale = 0.7 / np.sqrt(d)
  out, lse = jax.jit(lambda q, k, v, lim: pg.level_attention(
      q, k, v, lengths, owner, lim, scale=scale, config=pg.Config(**cfg)))(q, k, v, limits)
  _assert_close(out, lse, *_level_ref(q, k, v, owner, np.asarray(limits), scale), TOL[dtype])
  xo, xl = xla_backend.level_attention(q, k, v, lengths, owner, limits, scale=scale)
  _assert_close(out, lse, np.asarray(xo), np.asarray(xl), TOL[dtype])


def test_traced_owner_matches_concrete():
  q, k, v, lengths, owner, limits = _case(5, 5, 2, 2, 4, 64, 4, 21, jnp.bfloat16, False, True)
  fn = lambda q, k, v, own, lim: pg.level_attention(q, k, v, lengths, own, lim, scale=0.125)
  traced = jax.jit(fn)(q, k, v, jnp.asarray(owner), limits)
  _assert_close(*traced, *_level_ref(q, k, v, owner, np.asarray(limits), 0.125), 3e-2)


def test_empty_and_zero_capacity_levels_never_nan():
  q, k, v, _, owner, limits = _case(6, 3, 2, 1, 2, 64, 2, 5, jnp.float32, False, False)
  out, lse = pg.level_attention(q, k, v, jnp.zeros(2, jnp.int32), owner,
                                jnp.zeros_like(limits), scale=0.1)
  assert np.all(np.asarray(out) == 0) and np.all(np.isneginf(np.asarray(lse)))
  out, lse = pg.level_attention(q, k[:, :0], v[:, :0], jnp.zeros(2, jnp.int32), owner,
                                jnp.zeros_like(limits), scale=0.1)
  assert out.shape == q.shape and np.all(np.isneginf(np.asarray(lse)))


def test_fused_levels_match_dense_oracle():
  """Three levels (two shared, one per sequence), chained in the kernels, vs the oracle."""
  rng = np.random.default_rng(7)
  b, t, kh, g, d = 4, 2, 2, 2, 64
  q = rng.standard_normal((b, t, kh * g, d)).astype(np.float32)
  levels = [(rng.standard_normal((1, 30, kh, d)), rng.standard_normal((1, 30, kh, d)),
             np.array([30], np.int32), np.zeros(b, np.int32)),
            (rng.standard_normal((3, 11, kh, d)), rng.standard_normal((3, 11, kh, d)),
             np.array([11, 0, 6], np.int32), np.array([0, 0, 2, 2], np.int32)),
            (rng.standard_normal((b, 7, kh, d)), rng.standard_normal((b, 7, kh, d)),
             np.array([7, 0, 1, 4], np.int32), None)]
  keys, values = oracle.concat_levels(levels)
  lv = [KVLevel(jnp.asarray(k, jnp.float32), jnp.asarray(v, jnp.float32), jnp.asarray(n), o)
        for k, v, n, o in levels]
  out, lse = jax.jit(lambda q, lv: pg.hydragen_attention_fused(
      q, lv, backend=pg.configure(poison=True)))(jnp.asarray(q), lv)
  ref = oracle.dense(q, keys, values, causal=True)
  assert out.dtype == jnp.float32
  _assert_close(out, lse, *ref, 1e-5)


def test_grouping_layout_covers_rows_once():
  rng = np.random.default_rng(8)
  for n, b, rows_per_seq, bm in [(4, 9, 3, 16), (1, 5, 8, 16), (6, 6, 20, 16), (3, 7, 1, 32)]:
    owner = rng.integers(0, n, size=b).astype(np.int32)
    conc = grouping.make_layout(owner, n, b, rows_per_seq, bm)
    trac = jax.jit(lambda o: grouping.make_layout(o, n, b, rows_per_seq, bm)[1:4],
                   )(jnp.asarray(owner))
    order = np.argsort(owner, kind="stable") if conc.order is not None else np.arange(b)
    row_node = np.repeat(owner[order], rows_per_seq)
    for node, start, count in [(conc.node, conc.start, conc.count),
                               tuple(np.asarray(x) for x in trac)]:
      covered = np.zeros(b * rows_per_seq, np.int64)
      for nd, st, ct in zip(node, start, count):
        assert 0 <= ct <= bm
        covered[st:st + ct] += 1
        assert np.all(row_node[st:st + ct] == nd)      # one node per tile
      np.testing.assert_array_equal(covered, 1)


def test_choose_splits_fills_whole_waves():
  assert pg._choose_splits(programs=64, nblk=256, slots=132) == 2     # one full wave
  assert pg._choose_splits(programs=512, nblk=256, slots=132) == 1    # already 3.9 waves
  p = pg._choose_splits(programs=8, nblk=256, slots=264)
  assert 29 <= p <= 33 and 8 * p <= 264                               # one wave, nearly full
  assert pg._choose_splits(programs=8, nblk=3, slots=264) == 1        # too few key blocks


def test_unsupported_dtype_raises_unsupported():
  x = jnp.zeros((1, 1, 2, 16), jnp.float8_e4m3fn)
  with pytest.raises(backends.Unsupported, match="float8"):
    pg.level_attention(x, x, x, jnp.ones(1, jnp.int32), None, jnp.ones((1, 1), jnp.int32),
                       scale=1.0)


def test_registry():
  assert backends.get("pallas").name == "pallas"
  assert "pallas" in backends.names()
  if jax.default_backend() == "cpu":
    assert backends.get("auto").name == "xla"


# --- sharing structure as data: traced owners, stacked caches, no recompilation ------------

TRACED = [
    # id, seed, B, T, K, G, D, N, S, dtype, causal, config
    ("bf16_gqa4_T3_causal", 20, 7, 3, 2, 4, 64, 5, 37, jnp.bfloat16, True, {}),
    ("f32_mha_T1_splits", 21, 5, 1, 1, 1, 32, 4, 45, jnp.float32, False,
     {"splits": 2, "block_n": 16, "block_m": 16}),
    ("bf16_gqa8_T2_bounds_in_kernel", 22, 9, 2, 1, 8, 64, 6, 20, jnp.bfloat16, True,
     {"tile_bounds": "kernel"}),
]


@pytest.mark.parametrize("case", TRACED, ids=[c[0] for c in TRACED])
def test_traced_owners_runtime_tile_table(case):
  """Owners as jit arguments (random, non-contiguous, an empty node, ragged lengths): the tile
  table is built at run time for a static bound of tiles; outputs poisoned, so every row must
  be written by a real tile while the unused tiles exit."""
  _, seed, b, t, kh, g, d, n, s, dtype, causal, cfg = case
  q, k, v, lengths, owner, limits = _case(seed, b, t, kh, g, d, n, s, dtype, False, causal)
  config = pg.Config(poison=True, **cfg)
  fn = jax.jit(lambda q, k, v, own, lim: pg.level_attention(q, k, v, lengths, own, lim,
                                                            scale=0.3, config=config))
  out, lse = fn(q, k, v, jnp.asarray(owner), limits)
  _assert_close(out, lse, *_level_ref(q, k, v, owner, np.asarray(limits), 0.3), TOL[dtype])
  static = pg.level_attention(q, k, v, lengths, owner, limits, scale=0.3, config=config)
  _assert_close(out, lse, np.asarray(static[0]), np.asarray(static[1]), TOL[dtype])


def _stacked(seed, layers, n, s, kh, d, dtype):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.standard_normal((layers, n, s, kh, d)), dtype),
          jnp.asarray(rng.standard_normal((layers, n, s, kh, d)), dtype))


@pytest.mark.parametrize("per_seq,d,in_place", [(False, 64, True), (True, 32, True),
                                                 (False, 24, True), (False, 64, False)])
def test_stacked_layer_read_in_place_equals_slicing(per_seq, d, in_place):
  """k, v [L,N,S,K,D] with a traced layer index give exactly the results of slicing the layer
  first (the same kernel over the same keys), for shared and per-sequence levels, a head dim
  that is padded inside (the layer is then sliced before padding) and layer_in_place off."""
  b, t, kh, g, n, s, layers = 5, 2, 2, 2, (5 if per_seq else 3), 19, 3
  q, _, _, lengths, owner, limits = _case(30, b, t, kh, g, d, n, s, jnp.float32, per_seq, True)
  ks, vs = _stacked(31, layers, n, s, kh, d, jnp.float32)
  config = pg.Config(layer_in_place=in_place, poison=True)
  fn = jax.jit(lambda q, ks, vs, lim, layer: pg.level_attention(
      q, ks, vs, lengths, owner, lim, scale=0.2, config=config, layer=layer))
  for layer in (2, 0):
    out, lse = fn(q, ks, vs, limits, jnp.int32(layer))
    ref = pg.level_attention(q, ks[layer], vs[layer], lengths, owner, limits, scale=0.2,
                             config=config)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref[0]))
    np.testing.assert_array_equal(np.asarray(lse), np.asarray(ref[1]))
    _assert_close(out, lse, *_level_ref(q, ks[layer], vs[layer], owner, np.asarray(limits),
                                        0.2), 1e-5)


def test_stacked_layer_in_place_makes_no_copy_of_the_cache():
  """The in-place read reshapes [L,N,...] to [L*N,...] (a bitcast): no slice of a layer, and no
  copy of the stack's size, appears in the optimized program (interpret mode, CPU)."""
  b, t, kh, g, d, n, s, layers = 3, 1, 1, 2, 64, 3, 64, 6
  q, _, _, lengths, owner, limits = _case(32, b, t, kh, g, d, n, s, jnp.float32, False, False)
  ks, vs = _stacked(33, layers, n, s, kh, d, jnp.float32)
  hlo = {}
  for in_place in (True, False):
    cfg = pg.Config(layer_in_place=in_place)
    fn = jax.jit(lambda q, ks, vs, lim, layer: pg.level_attention(
        q, ks, vs, lengths, owner, lim, scale=0.2, config=cfg, layer=layer))
    hlo[in_place] = fn.lower(q, ks, vs, limits, jnp.int32(1)).compile().as_text()
  layer_shape = f"f32[{n},{s},{kh},{d}]"
  assert layer_shape in hlo[False] and "dynamic-slice" in hlo[False]     # the test can fail
  assert layer_shape not in hlo[True]


def test_fused_levels_with_stacked_cache_and_traced_owner():
  """`hydragen_attention_fused`: a shared level read from a stacked cache at a traced layer,
  a traced owner, and a per-sequence level, vs the oracle on the sliced layer."""
  rng = np.random.default_rng(34)
  b, t, kh, g, d = 4, 2, 2, 2, 32
  q = jnp.asarray(rng.standard_normal((b, t, kh * g, d)), jnp.float32)
  ks, vs = _stacked(35, 3, 3, 13, kh, d, jnp.float32)
  own = np.array([2, 0, 2, 0], np.int32)
  lens = np.array([13, 0, 9], np.int32)
  suf = [rng.standard_normal((b, 5, kh, d)).astype(np.float32) for _ in range(2)]
  suf_len = np.array([5, 0, 2, 4], np.int32)

  def fn(q, ks, vs, own, layer):
    lv = [KVLevel(ks, vs, jnp.asarray(lens), own, layer),
          KVLevel(jnp.asarray(suf[0]), jnp.asarray(suf[1]), jnp.asarray(suf_len), None)]
    return pg.hydragen_attention_fused(q, lv, backend=pg.configure(poison=True))

  out, lse = jax.jit(fn)(q, ks, vs, jnp.asarray(own), jnp.int32(1))
  keys, values = oracle.concat_levels([(np.asarray(ks[1]), np.asarray(vs[1]), lens, own),
                                       (suf[0], suf[1], suf_len, None)])
  _assert_close(out, lse, *oracle.dense(np.asarray(q), keys, values, causal=True), 1e-5)


def test_new_tree_of_same_shapes_does_not_recompile():
  """Owners, lengths and the layer are runtime values: a second tree of the same shapes runs
  the same trace and the same compiled executable (traces counted, jit caches compared)."""
  b, t, kh, g, d, n, s = 6, 1, 1, 2, 32, 4, 16
  q, _, _, _, _, limits = _case(40, b, t, kh, g, d, n, s, jnp.float32, False, False)
  ks, vs = _stacked(41, 2, n, s, kh, d, jnp.float32)
  traces = []
  backend = pg.configure(path="off")      # the grouped kernel (the path kernel: test_path_gpu)

  def fn(q, ks, vs, lengths, own, layer):
    traces.append(1)
    lv = [KVLevel(ks, vs, lengths, own, layer)]
    return hydragen_attention(q, lv, causal_last=False, backend=backend)

  jfn = jax.jit(fn)
  rng = np.random.default_rng(42)
  results = []
  for i in range(3):
    own = rng.integers(0, n, size=b).astype(np.int32)
    lengths = rng.integers(0, s + 1, size=n).astype(np.int32)
    out, lse = jfn(q, ks, vs, jnp.asarray(lengths), jnp.asarray(own), jnp.int32(i % 2))
    results.append((out, lse, own, lengths, i % 2))
    if i == 0:
      sizes = (jfn._cache_size(), pg._forward_jit._cache_size())
  assert len(traces) == 1
  assert (jfn._cache_size(), pg._forward_jit._cache_size()) == sizes
  for out, lse, own, lengths, layer in results:
    keys, values = oracle.concat_levels([(np.asarray(ks[layer]), np.asarray(vs[layer]),
                                          lengths, own)])
    _assert_close(out, lse, *oracle.dense(np.asarray(q), keys, values, causal=False), 1e-5)


def test_configuration_is_a_hashable_value():
  base = backends.get("pallas")
  tuned = pg.configure(block_n=32, mosaic={"splits": 2}, wide=[64, 4])
  assert isinstance(tuned, backends.Backend) and tuned.takes_layer and base.takes_layer
  assert tuned.config.mosaic.splits == 2 and tuned.config.wide == (64, 4)
  assert hash(tuned) == hash(pg.configure(block_n=32, mosaic={"splits": 2}, wide=(64, 4)))
  assert tuned != base and backends.get("pallas") == base       # nothing global changed
  assert not hasattr(pg, "_config")
  with pytest.raises(ValueError, match="lowering"):
    pg.configure(lowering="bogus")
  with pytest.raises(ValueError, match="tile_bounds"):
    pg.Config(tile_bounds="nowhere")
  with pytest.raises(ValueError, match="no configuration field"):
    pg.configure(blockn=32)


def test_backend_spec_strings():
  """"name:field=value,..." (what a gin grid or a command line carries) is the configured
  backend; values are literals where they parse, else strings; malformed specs name
  themselves."""
  assert backends.get("pallas:path=off,wide=(64, 4)") == pg.configure(path="off", wide=(64, 4))
  assert backends.parse_spec("pallas: block_n=32 , splits=None") == (
      "pallas", {"block_n": 32, "splits": None})
  assert backends.get("pallas:path=off", path="always").config.path == "always"
  with pytest.raises(ValueError, match=r"backend spec 'pallas:path': expected field=value"):
    backends.get("pallas:path")
  with pytest.raises(ValueError, match=r"path must be 'auto', 'always' or 'off', got 'of'"):
    backends.get("pallas:path=of")


def _two_level_case(seed, b, t, kh, g, d, n, sp, su, layers):
  """A shared level of n nodes (stacked [L,...]) and a per-sequence level, ragged lengths
  with an empty node and an empty suffix, NaN stored past every length."""
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((b, t, kh * g, d)), jnp.float32)
  own = rng.integers(0, n, size=b).astype(np.int32)
  own[0] = n - 1
  lp = rng.integers(1, sp + 1, size=n).astype(np.int32)
  lp[0] = 0
  lu = rng.integers(0, su + 1, size=b).astype(np.int32)
  lu[-1] = 0

  def stack(nodes, s, lengths):
    x = rng.standard_normal((layers, nodes, s, kh, d)).astype(np.float32)
    x[:, np.arange(s)[None, :] >= lengths[:, None]] = np.nan
    return jnp.asarray(x)

  shared = (stack(n, sp, lp), stack(n, sp, lp), lp, own)
  suffix = (stack(b, su, lu), stack(b, su, lu), lu, None)
  return q, shared, suffix


def _oracle_of(q, levels, layer, causal):
  clean = [(np.nan_to_num(np.asarray(k[layer])), np.nan_to_num(np.asarray(v[layer])), n, o)
           for k, v, n, o in levels]
  keys, values = oracle.concat_levels(clean)
  return oracle.dense(np.asarray(q), keys, values, causal=causal)


@pytest.mark.parametrize("traced", [False, True])
@pytest.mark.parametrize("t,regular", [(1, True), (1, False), (3, True)])
def test_levels_merged_once_in_packed_rows(traced, t, regular):
  """finish="once": a shared level with owners (concrete or traced) and a per-sequence level
  run through `grouped_levels` (all_levels takes the call: spied), the per-sequence rows in
  the shared level's order, one merge; exact against the dense oracle and equal to
  finish="per_level" (which all_levels declines), stacked caches at a traced layer. At T = 1
  the per-sequence level finds its tiles in-kernel (`Regular`, spied) unless regular_tiles
  is off; at T = 3 it never does."""
  b, kh, g, d, n = 7, 2, 3, 16, 3
  q, shared, suffix = _two_level_case(50 + t, b, t, kh, g, d, n, 21, 6, 2)
  taken, regulars = [], []
  real, real_regular = pg.grouped_levels, pg._regular

  def spy(*args, **kwargs):
    out = real(*args, **kwargs)
    taken.append(out is not None)
    return out

  def spy_regular(*args, **kwargs):
    out = real_regular(*args, **kwargs)
    regulars.append(None if out is None else out[0])
    return out

  def run(finish, layer):
    backend = pg.configure(path="off", finish=finish, regular_tiles=regular)
    own = jnp.asarray(shared[3]) if traced else shared[3]

    def fn(q, ks, vs, layer, own):
      lv = [KVLevel(ks[0], vs[0], jnp.asarray(shared[2]), own, layer),
            KVLevel(ks[1], vs[1], jnp.asarray(suffix[2]), None, layer)]
      return hydragen_attention(q, lv, backend=backend)

    if traced:
      return jax.jit(fn)(q, (shared[0], suffix[0]), (shared[1], suffix[1]), layer, own)
    return jax.jit(lambda q, ks, vs, layer: fn(q, ks, vs, layer, own))(
        q, (shared[0], suffix[0]), (shared[1], suffix[1]), layer)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(pg, "grouped_levels", spy)
    mp.setattr(pg, "_regular", spy_regular)
    pg.clear_jit_caches()
    once = run("once", jnp.int32(1))
    assert taken == [True]
    if t == 1 and regular:
      assert [r.per_sequence for r in regulars if r is not None] == [True], regulars
      assert regulars[-1].has_order == (traced or not np.array_equal(
          np.argsort(shared[3], kind="stable"), np.arange(b)))
      assert regulars[-1].stacked and regulars[-1].rows_per_node == g
    else:
      assert regulars and all(r is None for r in regulars), regulars
    per_level = run("per_level", jnp.int32(1))
    assert taken == [True]                       # per_level never asks for it
  ref = _oracle_of(q, [shared, suffix], 1, causal=True)
  _assert_close(*once, *ref, 1e-5)
  _assert_close(*per_level, *ref, 1e-5)


def test_grouped_levels_declines_two_orders_and_layout_rules():
  """Two levels with owners over several nodes each fix a row order: `grouped_levels`
  returns None (the levels run one by one, still exact); `_layout_in` refuses to reorder
  such a level."""
  b, t, kh, g, d = 5, 1, 1, 2, 16
  q, shared, suffix = _two_level_case(60, b, t, kh, g, d, 2, 9, 4, 1)
  _, other, _ = _two_level_case(61, b, t, kh, g, d, 3, 7, 4, 1)
  levels = [KVLevel(x[0][0], x[1][0], jnp.asarray(x[2]), x[3]) for x in (shared, other)]
  limits = [jnp.asarray(lv.lengths)[lv.owner][:, None] for lv in levels]
  assert pg.grouped_levels(q, levels, limits, scale=0.25, cfg=pg.Config()) is None
  out = hydragen_attention(q, levels + [KVLevel(suffix[0][0], suffix[1][0],
                                                jnp.asarray(suffix[2]), None)],
                           backend=pg.configure(path="off"))
  ref = _oracle_of(q, [(x[0], x[1], x[2], x[3]) for x in (shared, other, suffix)], 0, True)
  _assert_close(*out, *ref, 1e-5)
  with pytest.raises(ValueError, match="keeps its own row order"):
    pg._layout_in(np.arange(b, dtype=np.int32), shared[3], 2, b, 2, 16)
  layout = pg._layout_in(np.array([4, 3, 2, 1, 0], np.int32), None, b, b, 2, 16)
  np.testing.assert_array_equal(layout.node, [4, 3, 2, 1, 0])


def test_level_stream_annotates_the_per_sequence_level():
  """Config.level_stream puts the per-sequence level's kernel on a GPU stream through
  compute_on (an annotation XLA ignores on CPU): the lowered program carries it, results are
  unchanged; the field is validated."""
  b, t, kh, g, d = 4, 1, 2, 2, 16
  q, shared, suffix = _two_level_case(70, b, t, kh, g, d, 2, 12, 5, 1)

  def fn(backend):
    def run(q, own):
      lv = [KVLevel(shared[0][0], shared[1][0], jnp.asarray(shared[2]), own),
            KVLevel(suffix[0][0], suffix[1][0], jnp.asarray(suffix[2]), None)]
      return hydragen_attention(q, lv, backend=backend)
    return jax.jit(run)

  own = jnp.asarray(shared[3])
  on = fn(pg.configure(path="off", level_stream=1))
  assert "_xla_stream_annotation" in on.lower(q, own).as_text()
  assert "_xla_stream_annotation" not in fn(pg.configure(path="off")).lower(q, own).as_text()
  _assert_close(*on(q, own), *_oracle_of(q, [shared, suffix], 0, True), 1e-5)
  with pytest.raises(ValueError, match="level_stream must be >= 0, got -1"):
    pg.Config(level_stream=-1)
  with pytest.raises(ValueError, match="finish must be 'once' or 'per_level', got 'twice'"):
    pg.Config(finish="twice")


def test_regular_tiles_leave_one_merge_around_the_kernels():
  """Lowered for CUDA from this CPU (`jax.export`): a decode call of a one-node level and a
  per-sequence level through `grouped_levels` is the two kernels and one merge (elementwise
  over the parts: no reduction), without the tile tables, row limits and tile bounds that the
  regular_tiles=False and finish="per_level" programs compute before the launches (their
  compares, selects, iotas and reductions)."""
  from tests.attention.test_path_gpu import _cuda_ops
  table_ops = ("stablehlo.compare", "stablehlo.select", "stablehlo.iota", "stablehlo.reduce",
               "stablehlo.and")
  counts = {}
  for regular, finish in ((True, "once"), (False, "once"), (True, "per_level")):
    ops, kernels = _cuda_ops(pg.configure(path="off", interpret=False, regular_tiles=regular,
                                          finish=finish), b=64)
    assert kernels == 2
    counts[regular, finish] = (sum(ops.count(op) for op in table_ops),
                               ops.count("stablehlo.reduce"))
  assert counts[True, "once"][1] == 0, counts
  assert counts[True, "once"][0] * 3 < counts[False, "once"][0] < counts[True, "per_level"][0]


@pytest.mark.parametrize("traced", [False, True])
def test_levels_merged_in_the_per_sequence_kernel(traced):
  """merge_in_kernel: at decode the per-sequence level (run last, one key split) merges the
  earlier levels' results, the root's two key splits included, into its own and writes the
  final out and lse (spied: its part is final), exact against the dense oracle with an empty
  node, empty suffixes and NaN past every length; at T = 3 the one XLA merge runs instead."""
  b, kh, g, d = 7, 2, 3, 16
  for t in (1, 3):
    q, shared, suffix = _two_level_case(80 + t, b, t, kh, g, d, 3, 21, 6, 2)
    rng = np.random.default_rng(90 + t)
    root_len = np.array([37], np.int32)
    root = rng.standard_normal((2, 1, 40, kh, d)).astype(np.float32)
    root[:, :, 37:] = np.nan
    root = (jnp.asarray(root), jnp.asarray(root[::-1].copy()), root_len,
            np.zeros(b, np.int32))
    finals, prior_splits = [], []
    real, real_grouped = pg._triton_part, pg.grouped_attention

    def spy(*args, **kwargs):
      part = real(*args, **kwargs)
      finals.append(part.final)
      return part

    def spy_grouped(levels, **kwargs):
      prior_splits.extend(o.shape[0] for lv in levels for o, _ in lv.priors)
      return real_grouped(levels, **kwargs)

    # 16-key blocks: the root's 40 keys run in two key splits, the suffixes' 6 in one.
    backend = pg.configure(path="off", merge_in_kernel=True, splits=2, block_n=16)
    own = jnp.asarray(shared[3]) if traced else shared[3]

    def fn(q, layer, own):
      lv = [KVLevel(root[0], root[1], jnp.asarray(root_len), root[3], layer),
            KVLevel(shared[0], shared[1], jnp.asarray(shared[2]), own, layer),
            KVLevel(suffix[0], suffix[1], jnp.asarray(suffix[2]), None, layer)]
      return hydragen_attention(q, lv, backend=backend)

    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(pg, "_triton_part", spy)
      mp.setattr(pg, "grouped_attention", spy_grouped)
      pg.clear_jit_caches()
      if traced:
        out = jax.jit(fn)(q, jnp.int32(1), own)
      else:
        out = jax.jit(lambda q, layer: fn(q, layer, own))(q, jnp.int32(1))
    assert finals[-1] == (t == 1) and not any(finals[:-1]), finals
    assert prior_splits == ([2, 2] if t == 1 else []), prior_splits   # root, shared level
    _assert_close(*out, *_oracle_of(q, [root, shared, suffix], 1, causal=True), 1e-5)


@pytest.mark.parametrize("p", [2, 3, 16, 17])
def test_combine_splits_matches_float64_merge(p):
  """`flash.combine_splits`, plane by plane (P <= ELEMENTWISE_SPLITS) or by reductions over P
  (more splits): the float64 merge, with rows empty in some splits and in every split
  (out 0, lse -inf, no NaN)."""
  from hydrax.attention.kernels import flash
  rng = np.random.default_rng(p)
  out = rng.standard_normal((p, 3, 40, 16))
  lse = rng.standard_normal((p, 3, 40)) * 5
  empty = rng.random((p, 3, 40)) < 0.3
  empty[:, 0, :2] = True
  lse[empty], out[empty] = -np.inf, 0.0
  o, l = flash.combine_splits(jnp.asarray(out, jnp.float32), jnp.asarray(lse, jnp.float32))
  m = lse.max(axis=0)
  w = np.exp(lse - np.where(np.isfinite(m), m, 0.0))
  tot = w.sum(axis=0)
  ro = (w[..., None] * out).sum(axis=0) / np.where(tot > 0, tot, 1.0)[..., None]
  rl = np.where(tot > 0, np.where(np.isfinite(m), m, 0.0) + np.log(np.where(tot > 0, tot, 1)),
                -np.inf)
  np.testing.assert_allclose(np.asarray(o), ro, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.isneginf(np.asarray(l)), np.isneginf(rl))
  fin = np.isfinite(rl)
  np.testing.assert_allclose(np.asarray(l)[fin], rl[fin], rtol=1e-6, atol=1e-5)
  assert not np.isnan(np.asarray(o)).any() and (np.asarray(o)[0, :2] == 0).all()
