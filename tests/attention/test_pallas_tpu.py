"""The pallas_tpu backend's Mosaic TPU kernel, in Pallas TPU interpret mode on CPU.

Each case is checked against the independent float64 oracle (tests/oracle.py) and the XLA
backend. Interpret mode compiles slowly, so hypothesis draws values (owners, ragged lengths,
NaN planted past the lengths, causality) for a few fixed shape profiles: owners and lengths are
jit arguments (run-time data), so every profile compiles once.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from hydrax.attention import KVLevel, backends, hydragen_attention
from hydrax.attention import xla as xla_backend
from hydrax.attention.kernels import pallas_tpu as pt
from tests import oracle
from tests.attention.test_core import TOL, _check
from tests.attention.test_core import _expect as _core_expect


class Profile(NamedTuple):
  """Static shape of a case: levels [(N, or None for per-sequence, S)], cfg TpuConfig fields
  (interpret: True for TPU interpret mode, else the generic interpreter)."""
  name: str
  b: int
  t: int
  kh: int
  g: int
  d: int
  dtype: type
  causal: bool
  levels: tuple
  cfg: tuple = ()


PROFILES = [
    # GQA 4, D 64, three levels, key blocks of 16 with a partial last block (S=40), in TPU
    # interpret mode.
    Profile(name="gqa4_d64_f32", b=5, t=1, kh=2, g=4, d=64, dtype=jnp.float32, causal=True,
            levels=((3, 40), (2, 9), (None, 12)), cfg=(("block_k", 16), ("interpret", True))),
    # GQA 8, D 128, bf16, a prefix shared by all (N=1), not causal, T=3.
    Profile(name="gqa8_d128_bf16", b=3, t=3, kh=1, g=8, d=128, dtype=jnp.bfloat16,
            causal=False, levels=((1, 33), (None, 7)), cfg=(("block_k", 8),)),
    # Odd D (80), GQA 3, K=3, four nodes for four sequences (some nodes empty).
    Profile(name="gqa3_d80_f32", b=4, t=2, kh=3, g=3, d=80, dtype=jnp.float32, causal=True,
            levels=((4, 20), (None, 6))),
    # Chunked causal prefill: T=5 queries over a ragged per-sequence cache (T > some lengths).
    Profile(name="prefill_mha_bf16", b=2, t=5, kh=2, g=1, d=64, dtype=jnp.bfloat16,
            causal=True, levels=((None, 13),), cfg=(("block_k", 8),)),
    # Odd batch, GQA 2, D 128, several tiles per node (block_m 8 < rows per node).
    Profile(name="tiles_d128_f32", b=7, t=1, kh=4, g=2, d=128, dtype=jnp.float32,
            causal=False, levels=((2, 130), (None, 5)), cfg=(("block_m", 8),)),
]


def _backend(cfg=(), interpret="generic"):
  """The backend in Pallas' generic interpreter (fast), or with interpret=True in Pallas TPU
  interpret mode (DMAs simulated, uninitialised VMEM reads NaN). Both read NaN for the rows of
  a partial last block past the array."""
  return backends.get("pallas_tpu", **{"interpret": interpret, **dict(cfg)})


def _draw(p: Profile, seed: int):
  """Random values for profile p: q, levels as NumPy (k, v, lengths, owner), NaN and Inf
  planted in k and v past each node's length."""
  rng = np.random.default_rng(seed)
  levels = []
  for n, s in p.levels:
    nodes = p.b if n is None else n
    lengths = rng.integers(0, s + 1, size=nodes).astype(np.int32)
    lengths[rng.integers(0, nodes)] = s if rng.random() < 0.7 else 0
    k = rng.standard_normal((nodes, s, p.kh, p.d)).astype(np.float32)
    v = rng.standard_normal((nodes, s, p.kh, p.d)).astype(np.float32)
    for i in range(nodes):
      k[i, lengths[i]:] = np.nan
      v[i, lengths[i]:] = np.inf
    owner = None if n is None else rng.integers(0, n, size=p.b).astype(np.int32)
    levels.append((k, v, lengths, owner))
  q = rng.standard_normal((p.b, p.t, p.kh * p.g, p.d)).astype(np.float32)
  return q, levels


def _expect(p: Profile, q, levels):
  return _core_expect(q, levels, p.causal, p.dtype)


@functools.lru_cache(maxsize=None)
def _compiled(p: Profile, backend_name: str):
  """hydragen_attention under jit with owners and lengths as arguments (traced owners)."""
  backend = "xla" if backend_name == "xla" else _backend(p.cfg)
  per_seq = [n is None for n, _ in p.levels]

  def fn(q, arrays):
    lv = [KVLevel(k, v, lengths, None if ps else owner)
          for (k, v, lengths, owner), ps in zip(arrays, per_seq)]
    return hydragen_attention(q, lv, causal_last=p.causal, backend=backend)

  return jax.jit(fn)


def _args(p: Profile, q, levels):
  return (jnp.asarray(q, p.dtype),
          [(jnp.asarray(k, p.dtype), jnp.asarray(v, p.dtype), jnp.asarray(lengths),
            jnp.zeros((p.b,), jnp.int32) if owner is None else jnp.asarray(owner))
           for k, v, lengths, owner in levels])


@pytest.mark.parametrize("p", PROFILES, ids=lambda p: p.name)
@settings(max_examples=3)
@given(seed=st.integers(0, 2**31 - 1))
def test_matches_oracle_and_xla_traced_owners(p, seed):
  q, levels = _draw(p, seed)
  out, lse = _compiled(p, "pallas_tpu")(*_args(p, q, levels))
  assert _compiled(p, "pallas_tpu")._cache_size() == 1     # every tree of p: one program
  assert out.dtype == p.dtype
  _check(out, lse, *_expect(p, q, levels), p.dtype)
  # (The XLA backend multiplies values past the lengths by 0: give it finite ones.)
  finite = [(np.nan_to_num(k, posinf=0.0), np.nan_to_num(v, posinf=0.0), n, o)
            for k, v, n, o in levels]
  ref_out, ref_lse = _compiled(p, "xla")(*_args(p, q, finite))
  tol = TOL[p.dtype]
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out, np.float32),
                             rtol=tol, atol=tol)
  np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(ref_lse))


def test_static_owners_eager_and_no_recompile():
  """NumPy owners, eager: right results, and a new owner array of the same shape reuses the
  compiled kernel (owners are run-time data)."""
  p = PROFILES[2]
  backend = _backend(p.cfg)
  sizes = []
  for seed in (1, 2):
    q, levels = _draw(p, seed)
    lv = [KVLevel(jnp.asarray(k), jnp.asarray(v), jnp.asarray(lengths), owner)
          for k, v, lengths, owner in levels]
    out, lse = hydragen_attention(jnp.asarray(q), lv, causal_last=p.causal, backend=backend)
    _check(out, lse, *_expect(p, q, levels), p.dtype)
    sizes.append(pt._forward_jit._cache_size())
  assert sizes[1] == sizes[0], sizes


def test_new_tree_under_jit_does_not_retrace():
  """Owners passed as jit arguments: one trace of the kernel's program for two trees."""
  p = PROFILES[2]
  traces = []
  backend = _backend(p.cfg)

  @jax.jit
  def fn(q, k, v, lengths, owner, limits):
    traces.append(1)
    return pt.level_attention(q, k, v, lengths, owner, limits, scale=0.3, config=backend.config)

  n, s = p.levels[0]
  for seed in (4, 5):
    q, levels = _draw(p, seed)
    k, v, lengths, owner = levels[0]
    k, v = np.nan_to_num(k, posinf=0.0), np.nan_to_num(v, posinf=0.0)
    limits = np.repeat(lengths[owner][:, None], p.t, axis=1)
    out, lse = fn(q, k, v, lengths, owner, limits)
    ref = xla_backend.level_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                      jnp.asarray(lengths), owner, jnp.asarray(limits), scale=0.3)
    np.testing.assert_allclose(out, ref[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.where(np.isfinite(lse), lse, 0),
                               np.where(np.isfinite(ref[1]), ref[1], 0), rtol=1e-5, atol=1e-5)
  assert len(traces) == 1


def _pallas_operand_shapes(jaxpr):
  """Shapes of the operands of every pallas_call in a (closed) jaxpr, nested ones included."""
  shapes = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      shapes += [tuple(x.aval.shape) for x in eqn.invars]
    for param in eqn.params.values():
      inner = param if hasattr(param, "eqns") else getattr(param, "jaxpr", None)
      if hasattr(inner, "eqns"):
        shapes += _pallas_operand_shapes(inner)
  return shapes


def test_stacked_cache_layer_read_in_place():
  """KVLevel.layer (traced): the kernel gets the whole [L,N,S,K,D] cache and the layer index;
  results equal the XLA backend on that layer's slice."""
  rng = np.random.default_rng(7)
  b, t, kh, g, d, layers = 3, 2, 2, 2, 64, 3
  k = rng.standard_normal((layers, 2, 24, kh, d)).astype(np.float32)
  v = rng.standard_normal((layers, 2, 24, kh, d)).astype(np.float32)
  lengths = np.array([24, 11], np.int32)
  k[:, 1, 11:] = np.nan
  owner = np.array([1, 0, 1], np.int32)
  ks = rng.standard_normal((layers, b, 5, kh, d)).astype(np.float32)
  vs = rng.standard_normal((layers, b, 5, kh, d)).astype(np.float32)
  sl = np.array([5, 0, 3], np.int32)
  q = rng.standard_normal((b, t, kh * g, d)).astype(np.float32)
  backend = _backend((("block_k", 8),))

  def fn(q, k, v, ks, vs, owner, layer, backend):
    return hydragen_attention(q, [KVLevel(k, v, jnp.asarray(lengths), owner, layer),
                                  KVLevel(ks, vs, jnp.asarray(sl), None, layer)],
                              backend=backend)

  run = jax.jit(functools.partial(fn, backend=backend))
  for layer in (2, 0):
    out, lse = run(q, k, v, ks, vs, owner, np.int32(layer))
    keys, values = oracle.concat_levels([(k[layer], v[layer], lengths, owner),
                                         (ks[layer], vs[layer], sl, None)])
    _check(out, lse, *oracle.dense(q, keys, values, causal=True), jnp.float32)
  shapes = _pallas_operand_shapes(jax.make_jaxpr(functools.partial(fn, backend=backend))(
      q, k, v, ks, vs, owner, np.int32(1)).jaxpr)
  assert k.shape in shapes and ks.shape in shapes, shapes


def test_gradients_match_xla():
  rng = np.random.default_rng(11)
  b, t, kh, g, d = 3, 2, 1, 2, 64
  k0, v0 = (rng.standard_normal((2, 12, kh, d)).astype(np.float32) for _ in range(2))
  k1, v1 = (rng.standard_normal((b, 4, kh, d)).astype(np.float32) for _ in range(2))
  lengths0, lengths1 = np.array([12, 5], np.int32), np.array([4, 0, 2], np.int32)
  owner = np.array([1, 1, 0], np.int32)
  q = rng.standard_normal((b, t, kh * g, d)).astype(np.float32)
  w = rng.standard_normal((b, t, kh * g, d)).astype(np.float32)

  def loss(args, backend):
    q, k0, v0, k1, v1 = args
    out, lse = hydragen_attention(q, [KVLevel(k0, v0, lengths0, owner),
                                      KVLevel(k1, v1, lengths1, None)], backend=backend)
    return jnp.sum(out * w) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

  args = tuple(jnp.asarray(x) for x in (q, k0, v0, k1, v1))
  ours = jax.jit(jax.grad(functools.partial(loss, backend=_backend())))(args)
  ref = jax.jit(jax.grad(functools.partial(loss, backend="xla")))(args)
  for a, r in zip(ours, ref):
    assert np.isfinite(np.asarray(a)).all()
    np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-5)


def test_empty_and_zero_length_levels():
  """A level of capacity 0, all-zero lengths and B*T rows that see nothing: out 0, lse -inf."""
  rng = np.random.default_rng(2)
  b, t, kh, d = 2, 3, 1, 64
  q = jnp.asarray(rng.standard_normal((b, t, 2, d)), jnp.float32)
  backend = _backend()
  k = jnp.full((2, 9, kh, d), jnp.nan, jnp.float32)
  out, lse = backend.attend(q, k, k, jnp.zeros((2,), jnp.int32), np.array([1, 0], np.int32),
                            jnp.zeros((b, t), jnp.int32), scale=0.1)
  assert np.all(np.asarray(out) == 0) and np.all(np.isneginf(np.asarray(lse)))
  k0 = jnp.zeros((b, 0, kh, d), jnp.float32)
  out, lse = backend.attend(q, k0, k0, jnp.zeros((b,), jnp.int32), None,
                            jnp.zeros((b, t), jnp.int32), scale=0.1)
  assert np.all(np.asarray(out) == 0) and np.all(np.isneginf(np.asarray(lse)))


def test_float16_is_unsupported_and_falls_back():
  q = jnp.ones((2, 1, 2, 64), jnp.float16)
  k = jnp.ones((2, 4, 1, 64), jnp.float16)
  with pytest.raises(backends.Unsupported, match="float16"):
    pt.level_attention(q, k, k, jnp.array([4, 4]), None, jnp.full((2, 1), 4), scale=0.1,
                       config=pt.TpuConfig(interpret=True))
  out, lse = hydragen_attention(q, [KVLevel(k, k, jnp.array([4, 4]))], backend=_backend())
  np.testing.assert_allclose(np.asarray(out, np.float32), 1.0)


def test_registry_and_config():
  backend = backends.get("pallas_tpu", interpret=True)
  assert backend.name == "pallas_tpu" and backend.takes_layer
  assert backend.config == pt.TpuConfig(interpret=True) and hash(backend) == hash(
      backends.get("pallas_tpu", interpret=True))
  assert "tpu" in backend.platforms
  if jax.default_backend() == "cpu":
    assert backends.get("auto").name == "xla"
  with pytest.raises(ValueError, match="block_m"):
    pt.plan((2, 1, 4, 64), (1, 16, 2, 64), jnp.float32, 1, False, pt.TpuConfig(block_m=12))
  with pytest.raises(ValueError, match="block_k"):
    pt.plan((2, 1, 4, 64), (1, 16, 2, 64), jnp.float32, 1, False, pt.TpuConfig(block_k=5))
  with pytest.raises(ValueError, match="interpret"):
    pt.level_attention(jnp.ones((1, 1, 1, 8)), jnp.ones((1, 4, 1, 8)), jnp.ones((1, 4, 1, 8)),
                       jnp.array([4]), None, jnp.full((1, 1), 4), scale=0.1,
                       config=pt.TpuConfig(interpret="yes"))


@pytest.mark.parametrize("prefix", [1024, 4096, 16384])
@pytest.mark.parametrize("batch", [16, 64, 256, 1024])
def test_decode_plans_fit_vmem(prefix, batch):
  """The WORKSPACE decode shapes (H=32, K=8, D=128, bf16): M a multiple of the bf16 sublane
  tile, Sb a multiple of 128 or the whole suffix, under the VMEM budget."""
  cfg = pt.TpuConfig()
  shared = pt.plan((batch, 1, 32, 128), (1, prefix, 8, 128), jnp.bfloat16, 1, False, cfg)
  suffix = pt.plan((batch, 1, 32, 128), (batch, 128, 8, 128), jnp.bfloat16, batch, True, cfg)
  for p in (shared, suffix):
    assert p.block_m % 16 == 0 and p.vmem_bytes <= cfg.vmem_budget
  assert shared.block_m == min(512, 4 * batch) and shared.block_k % 128 == 0
  assert suffix.block_m == 16 and suffix.block_k == 128 and suffix.num_tiles == batch


@pytest.mark.parametrize("dtype,d,kh,stacked", [(jnp.bfloat16, 128, 8, True),
                                                (jnp.float32, 80, 3, False)])
def test_lowers_to_mosaic_tpu(dtype, d, kh, stacked):
  """The kernel lowers to a Mosaic TPU custom call (block shapes pass Mosaic's (8, 128) checks;
  every op in the body has a Mosaic lowering). Compiling it needs libtpu and a TPU."""
  b, t = 5, 2
  q = jax.ShapeDtypeStruct((b, t, kh * 2, d), dtype)
  k = jax.ShapeDtypeStruct(((4,) if stacked else ()) + (3, 300, kh, d), dtype)
  cfg = pt.TpuConfig(interpret=False)

  def fn(q, k, v, owner, limits, layer):
    return pt.level_attention(q, k, v, jnp.full((3,), 300, jnp.int32), owner, limits,
                              scale=0.1, config=cfg, layer=layer if stacked else None)

  lowered = jax.jit(fn).trace(q, k, k, jax.ShapeDtypeStruct((b,), jnp.int32),
                              jax.ShapeDtypeStruct((b, t), jnp.int32),
                              jax.ShapeDtypeStruct((), jnp.int32)).lower(
                                  lowering_platforms=("tpu",))
  assert "tpu_custom_call" in lowered.as_text()
