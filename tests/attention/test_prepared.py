"""`hydrax.attention.prepare` / `hydragen_attention(prepared=)`: what the layers of a decode
step share, computed once.

Exactness: the layers of a stacked cache (each layer's keys different, NaN past every length)
attend through one `Prepared` on every backend that runs here, against the float64 oracle,
with static and traced owners. Structure: in a `lax.scan` over layers the table work (the
traced owners' sort, the slots' scatter) is outside the loop body with `prepared=` and inside
it without. Misuse: a `Prepared` of other shapes, another backend, causal flag or scale is
a one-line ValueError naming `prepared`; one of other lengths is caught by checks="runtime".
"""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from jax import lax
from jax.experimental import checkify

from hydrax.attention import KVLevel, Prepared, hydragen_attention, prepare
from hydrax.attention import prepared as prepared_lib
from hydrax.attention.kernels import pallas_gpu
from tests.attention.test_core import _check, _expect, _poison, trees

LAYERS = 2


def _stack(levels):
  """Each level's k, v stacked over LAYERS layers (layer l: the keys * (l + 1) + l, poison
  past the lengths kept: NaN stays NaN)."""
  return [(np.stack([k * (l + 1) + l for l in range(LAYERS)]),
           np.stack([v * (l + 1) - l for l in range(LAYERS)]), lengths, owner)
          for k, v, lengths, owner in levels]


def _run_layers(backend, q, stacked, causal, dtype, traced, use_prepared=True):
  """Every layer of `stacked` through one `prepare` (under jit, q of layer l = q * (l + 1))
  and the spied backend; returns [(out, lse)] per layer."""
  static = [owner for *_, owner in stacked]
  dynamic = [None if o is None else jnp.asarray(o) for o in static] if traced else None

  def fn(impl):
    def call(q, arrays, dynamic):
      owners = static if dynamic is None else dynamic
      levels = [KVLevel(k, v, lengths, owner, 0)
                for (k, v, lengths), owner in zip(arrays, owners)]
      prep = prepare(q, levels, causal_last=causal, backend=impl) if use_prepared else None
      outs = []
      for layer in range(LAYERS):
        lv = [x._replace(layer=jnp.int32(layer)) for x in levels]
        outs.append(hydragen_attention(q * (layer + 1), lv, causal_last=causal,
                                       backend=impl, prepared=prep))
      return outs

    arrays = [(jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.asarray(lengths))
              for k, v, lengths, _ in stacked]
    return jax.jit(call)(jnp.asarray(q, dtype), arrays, dynamic)

  layered = backend.backend.takes_layer
  shapes = [np.shape(k) if layered else np.shape(k)[1:] for k, *_ in stacked]
  return backend.run(fn, shapes * LAYERS)


def _expect_layers(q, stacked, causal, dtype):
  return [_expect(q * (layer + 1), [(k[layer], v[layer], n, o) for k, v, n, o in stacked],
                  causal, dtype) for layer in range(LAYERS)]


def test_prepared_layers_match_dense(backend):
  """Hypothesis trees (1..4 levels, ragged and empty nodes, GQA 1..8, poison past lengths)
  stacked over layers, one `Prepared` for every layer's call."""

  @backend.settings
  @given(trees(max_levels=3, d_choices=(8, 16)))
  def check(case):
    q, levels, causal, dtype, traced = case
    stacked = _stack(levels)
    got = _run_layers(backend, q, stacked, causal, dtype, traced)
    for (out, lse), ref in zip(got, _expect_layers(q, stacked, causal, dtype)):
      assert out.dtype == dtype
      _check(out, lse, *ref, dtype)

  check()


def _decode_case(seed=3, b=6, kh=2, g=2, d=16):
  """A decode step's levels (T = 1): a shared level of three nodes, owners out of order and
  unequal groups, and the per-sequence suffixes; both stacked over LAYERS, NaN past every
  length."""
  rng = np.random.default_rng(seed)
  shared = rng.standard_normal((3, 21, kh, d)).astype(np.float32), None
  shared = (shared[0], rng.standard_normal((3, 21, kh, d)).astype(np.float32),
            np.array([21, 9, 14], np.int32), np.array([2, 0, 2, 1, 2, 0], np.int32))
  suffix = (rng.standard_normal((b, 6, kh, d)).astype(np.float32),
            rng.standard_normal((b, 6, kh, d)).astype(np.float32),
            np.array([0, 6, 3, 1, 5, 2], np.int32), None)
  for k, v, n, _ in (shared, suffix):
    _poison(rng, k, v, n, np.nan)
  q = rng.standard_normal((b, 1, kh * g, d)).astype(np.float32)
  return q, _stack([shared, suffix])


@pytest.mark.parametrize("traced", [False, True])
def test_prepared_equals_unprepared(backend, traced):
  """The same calls with and without `prepared=` give the same results (to float32 rounding:
  XLA fuses the two programs' element-wise work differently)."""
  q, stacked = _decode_case()
  with_prep = _run_layers(backend, q, stacked, True, jnp.float32, traced)
  without = _run_layers(backend, q, stacked, True, jnp.float32, traced, use_prepared=False)
  for (o1, l1), (o2, l2) in zip(with_prep, without):
    np.testing.assert_allclose(np.asarray(o1), np.asarray(o2), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(l1), np.asarray(l2), rtol=1e-6, atol=1e-6)
  for (out, lse), ref in zip(with_prep, _expect_layers(q, stacked, True, jnp.float32)):
    _check(out, lse, *ref, jnp.float32)


def _scan_jaxpr(impl, use_prepared: bool, t: int = 1):
  """The jaxpr of the engine's form: a `lax.scan` over the layers of stacked caches, owners
  and lengths traced, each layer's q the previous layer's output."""
  q, stacked = _decode_case()
  q = np.repeat(q, t, axis=1)
  (ks, vs, n0, o0), (ss, sv, n1, _) = stacked

  def step(q, ks, vs, n0, o0, ss, sv, n1):
    levels = [KVLevel(ks, vs, n0, o0, 0), KVLevel(ss, sv, n1, None, 0)]
    prep = prepare(q, levels, backend=impl) if use_prepared else None

    def layer(q, index):
      lv = [x._replace(layer=index) for x in levels]
      out, _ = hydragen_attention(q, lv, backend=impl, prepared=prep)
      return out, None

    return lax.scan(layer, q, jnp.arange(LAYERS, dtype=jnp.int32))[0]

  return jax.make_jaxpr(step)(q, ks, vs, n0, o0, ss, sv, n1)


def _scan_body_primitives(closed) -> set:
  """Primitive names inside the body of the (one) scan of a jaxpr, nested calls included."""
  def subs(value):
    if isinstance(value, jax.extend.core.ClosedJaxpr):
      yield value.jaxpr
    elif isinstance(value, jax.extend.core.Jaxpr):
      yield value
    elif isinstance(value, (tuple, list)):
      for x in value:
        yield from subs(x)

  def walk(jaxpr, inside, found):
    for eqn in jaxpr.eqns:
      if inside:
        found.add(eqn.primitive.name)
      for sub in subs(list(eqn.params.values())):
        walk(sub, inside or eqn.primitive.name == "scan", found)
    return found
  return walk(closed.jaxpr, False, set())


@pytest.mark.parametrize("lowering", ["triton", "mosaic"])
def test_tables_leave_the_layer_loop(lowering):
  """With `prepared=`, the tables of traced owners (their sort; the slots' scatter) are
  computed before the layer scan, not in its body; without it they are in the body (XLA's
  GPU pipeline does not hoist them: experiments/results/fused_h200, run 11). Triton: the
  shared level and the suffixes on the grouped kernel; Mosaic: the suffixes folded into the
  shared level's launch."""
  mosaic = {"block_kv": 64, "fold_suffix": True}
  impl = pallas_gpu.configure(lowering=lowering, path="off", mosaic=mosaic)
  without = _scan_body_primitives(_scan_jaxpr(impl, False))
  with_prep = _scan_body_primitives(_scan_jaxpr(impl, True))
  assert "sort" in without and "pallas_call" in without, sorted(without)
  assert "pallas_call" in with_prep
  assert "sort" not in with_prep and "scatter" not in with_prep, sorted(with_prep)
  if lowering == "mosaic":
    assert "scatter" in without
  # Config.prepare_tables off (for measuring): only the limits are prepared, tables per layer.
  off = pallas_gpu.configure(lowering=lowering, path="off", mosaic=mosaic, prepare_tables=False)
  assert "sort" in _scan_body_primitives(_scan_jaxpr(off, True))


def _prepared_for(**changes):
  q, stacked = _decode_case()
  levels = [KVLevel(jnp.asarray(k), jnp.asarray(v), jnp.asarray(n), o, 0)
            for k, v, n, o in stacked]
  args = dict(causal_last=True, scale=None, backend="xla")
  return q, levels, prepare(q, levels, **{**args, **changes})


@pytest.mark.parametrize("change, call, match", [
    ({}, dict(q=lambda q: q[:, :, :2]), r"q: made for \(\(6, 1, 4, 16\), 'float32'\), this "
                                        r"call has \(\(6, 1, 2, 16\)"),
    ({}, dict(levels=lambda lv: lv[:1]), r"levels: made for"),
    ({}, dict(levels=lambda lv: [lv[0], lv[1]._replace(layer=None, k=lv[1].k[0],
                                                      v=lv[1].v[0])]),
     r"levels\[1\] k shape: made for \(2, 6, 6, 2, 16\), this call has \(6, 6, 2, 16\)"),
    ({}, dict(causal_last=False), r"causal_last: made for True, this call has False"),
    ({}, dict(scale=0.5), r"scale: made for 0\.25, this call has 0\.5"),
    ({"backend": pallas_gpu.configure(path="off")}, {},
     r"backend: made for 'pallas' with config .*, this call has 'xla'"),
])
def test_prepared_for_another_call_is_rejected(change, call, match):
  q, levels, prep = _prepared_for(**change)
  kwargs = dict(causal_last=True, backend="xla")
  if "q" in call:
    q = call["q"](q)
  if "levels" in call:
    levels = call["levels"](levels)
  kwargs.update({k: v for k, v in call.items() if k not in ("q", "levels")})
  with pytest.raises(ValueError, match="prepared does not fit this call: " + match):
    hydragen_attention(jnp.asarray(q), levels, prepared=prep, **kwargs)


def test_prepared_must_be_a_prepared():
  q, levels, prep = _prepared_for()
  with pytest.raises(ValueError, match="prepared must be a hydrax.attention.Prepared .* got "
                                       "tuple"):
    hydragen_attention(jnp.asarray(q), levels, backend="xla", prepared=(prep.limits,))


def test_prepared_of_other_lengths_caught_at_runtime():
  """Traced lengths cannot be compared at trace time; checks="runtime" compares the limits."""
  q, levels, _ = _prepared_for()

  def f(q, levels, other):
    prep = prepare(q, [levels[0], levels[1]._replace(lengths=other)], backend="xla")
    return hydragen_attention(q, levels, backend="xla", checks="runtime", prepared=prep)[0]

  same, _ = checkify.checkify(jax.jit(f))(jnp.asarray(q), levels, levels[1].lengths)
  same.throw()
  err, _ = checkify.checkify(jax.jit(f))(jnp.asarray(q), levels, levels[1].lengths + 1)
  with pytest.raises(checkify.JaxRuntimeError, match=r"prepared.limits\[1\] differ"):
    err.throw()


def test_prepared_is_a_pytree_through_jit():
  """A `Prepared` crosses a jit boundary: its arrays are arguments, its static tables (NumPy
  tables of concrete owners) auxiliary data compared by value, so an equal one reuses the
  compiled program and a different one does not."""
  q, stacked = _decode_case()
  impl = pallas_gpu.configure(lowering="triton", path="off")
  levels = [KVLevel(jnp.asarray(k), jnp.asarray(v), jnp.asarray(n), o, 0)
            for k, v, n, o in stacked]
  prep = prepare(q, levels, backend=impl)
  arrays, (_, static) = prepared_lib.split_arrays((prep.limits, prep.tables))
  assert arrays and any(isinstance(s.value, np.ndarray) for s in static if s is not None)
  traces = []

  @jax.jit
  def f(q, levels, prep):
    traces.append(1)
    return hydragen_attention(q, levels, backend=impl, prepared=prep)

  out = f(jnp.asarray(q), levels, prep)
  f(jnp.asarray(q), levels, prepare(q, levels, backend=impl))             # equal: no retrace
  assert len(traces) == 1
  ref = hydragen_attention(jnp.asarray(q), levels, backend=impl)
  np.testing.assert_allclose(np.asarray(out[0]), np.asarray(ref[0]), rtol=1e-6, atol=1e-6)
  other = [levels[0]._replace(owner=np.array([0, 0, 2, 1, 2, 0], np.int32)), levels[1]]
  f(jnp.asarray(q), other, prepare(q, other, backend=impl))
  assert len(traces) == 2
  assert isinstance(jax.tree_util.tree_unflatten(*reversed(jax.tree_util.tree_flatten(prep))),
                    Prepared)


@pytest.mark.parametrize("lowering", ["triton", "mosaic"])
def test_prepare_from_shapes_alone(lowering):
  """q and the caches as `jax.ShapeDtypeStruct`s (what `llama.forward` passes: only shapes
  and dtypes are read) give the same `Prepared` as the arrays."""
  q, stacked = _decode_case()
  impl = pallas_gpu.configure(lowering=lowering, path="off",
                              mosaic={"block_kv": 64, "fold_suffix": True})
  levels = [KVLevel(jnp.asarray(k), jnp.asarray(v), jnp.asarray(n), jnp.asarray(o)
                    if o is not None else None, 0) for k, v, n, o in stacked]
  spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
  shapes = [lv._replace(k=spec(lv.k), v=spec(lv.v)) for lv in levels]
  a = prepare(jnp.asarray(q), levels, backend=impl)
  b = prepare(spec(jnp.asarray(q)), shapes, backend=impl)
  assert a.tables is not None
  (la, ta), (lb, tb) = jax.tree_util.tree_flatten(a), jax.tree_util.tree_flatten(b)
  assert ta == tb and len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
