"""The pallas backend's small-shape path (`kernels/path_gpu.py`) in Pallas interpret mode.

The hypothesis exactness suite runs it as the `pallas_path` case of the `backend` fixture
(tests/attention/conftest.py), which fails a call the kernel should have taken but declined.
Here: that the kernel is what runs (its pallas_call in the program), the cost rule, key splits
with stacked caches and traced owners, multi-query calls, NaN past lengths, no recompilation
for a new tree, the plan's splits, and bad configuration.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hydrax import _log
from hydrax.attention import KVLevel, backends, hydragen_attention
from hydrax.attention.kernels import pallas_gpu as pg
from hydrax.attention.kernels import path_gpu
from tests import oracle
from tests.attention.test_pallas import _assert_close as _check

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


def _tree(seed, b, t, kh, g, d, dtype, *, layers=None, nan=True):
  """q and a 3-level tree (shared root, 3 middle nodes, per-sequence suffixes) as NumPy
  levels (k, v, lengths, owner) with NaN stored past every length; stacked [L,...] copies
  (the level at layer 1) when `layers`."""
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((b, t, kh * g, d)).astype(np.float32)
  shapes = [(1, 45, np.zeros(b, np.int32)), (3, 21, rng.integers(0, 3, b).astype(np.int32)),
            (b, 9, None)]
  levels = []
  for n, s, owner in shapes:
    k = rng.standard_normal((n, s, kh, d)).astype(np.float32)
    v = rng.standard_normal((n, s, kh, d)).astype(np.float32)
    lengths = rng.integers(0, s + 1, n).astype(np.int32)
    lengths[0] = s
    if n == b:
      lengths[-1] = 0                       # a zero-length suffix
    if nan:
      for j, length in enumerate(lengths):
        k[j, length:] = np.nan
        v[j, length:] = np.nan
    levels.append((k, v, lengths, owner))
  return q, levels


def _reference(q, levels, dtype, causal):
  rounded = [(np.asarray(jnp.asarray(k, dtype).astype(jnp.float32)),
              np.asarray(jnp.asarray(v, dtype).astype(jnp.float32)), n, o)
             for k, v, n, o in levels]
  keys, values = oracle.concat_levels(rounded)
  qr = np.asarray(jnp.asarray(q, dtype).astype(jnp.float32))
  return oracle.dense(qr, keys, values, causal=causal)


def _run(q, levels, dtype, backend, *, causal=True, traced=True, layers=None):
  """hydragen_attention under jit, owners traced (or closed over), caches stacked at a
  traced layer when `layers`."""
  def stack(x):
    if layers is None:
      return jnp.asarray(x, dtype)
    return jnp.asarray(np.stack([np.full_like(x, 7.0)] + [x] * (layers - 1)), dtype)

  kvs = [(stack(k), stack(v)) for k, v, _, _ in levels]
  lengths = [jnp.asarray(n) for _, _, n, _ in levels]
  owners = [None if o is None else (jnp.asarray(o) if traced else o) for *_, o in levels]

  def fn(q, kvs, lengths, owners, layer):
    lv = [KVLevel(k, v, n, o if traced else levels[i][3], None if layers is None else layer)
          for i, ((k, v), n, o) in enumerate(zip(kvs, lengths, owners))]
    return hydragen_attention(q, lv, causal_last=causal, backend=backend)

  dyn = [o if traced else None for o in owners]
  return jax.jit(fn)(jnp.asarray(q, dtype), kvs, lengths, dyn, jnp.int32(1))


def _program_kernels(q, levels, backend):
  """Names of the pallas_calls in the jaxpr of one call."""
  lv = [KVLevel(jnp.asarray(k), jnp.asarray(v), jnp.asarray(n), o) for k, v, n, o in levels]
  jaxpr = jax.make_jaxpr(lambda q: hydragen_attention(q, lv, backend=backend))(jnp.asarray(q))
  return [str(e.params.get("name", "")) for e in _eqns(jaxpr.jaxpr)
          if e.primitive.name == "pallas_call"]


def _eqns(jaxpr):
  for e in jaxpr.eqns:
    yield e
    for p in e.params.values():
      for sub in (p if isinstance(p, (list, tuple)) else [p]):
        inner = getattr(sub, "jaxpr", None)
        if inner is not None:
          yield from _eqns(getattr(inner, "jaxpr", inner))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("splits, group", [(None, None), (3, None), (None, 1), (3, 2)])
def test_tree_matches_oracle_with_stacked_cache_and_traced_owners(dtype, splits, group):
  """B = 7, G = 4: groups of 4 sequences (automatic; the last group has a padding
  sequence), of 2 and of 1 (the backend's default); the middle level's owners put some
  sequences of a group on one node and others on another."""
  q, levels = _tree(0, 7, 1, 2, 4, 32, dtype)
  backend = backends.get("pallas", path="always", splits=splits, path_group=group)
  out, lse = _run(q, levels, dtype, backend, layers=3)
  _check(out, lse, *_reference(q, levels, dtype, True), TOL[dtype])


@pytest.mark.parametrize("b, g, group", [(7, 1, None), (7, 1, 16), (5, 2, None)])
def test_groups_of_many_sequences_and_every_node_shared_or_not(b, g, group):
  """G = 1 (R = 1): 4 sequences a program (automatic), or 8 (16 asked, capped at B's power
  of two); owners all equal, all distinct and mixed."""
  q, levels = _tree(4, b, 1, 2, g, 16, jnp.float32)
  rng = np.random.default_rng(b)
  for owner in (np.zeros(b, np.int32), np.arange(b, dtype=np.int32) % 3,
                rng.integers(0, 3, b).astype(np.int32)):
    levels[1] = levels[1][:3] + (owner,)
    out, lse = _run(q, levels, jnp.float32, backends.get("pallas", path="always",
                                                         path_group=group))
    _check(out, lse, *_reference(q, levels, jnp.float32, True), TOL[jnp.float32])


@pytest.mark.parametrize("traced", [True, False])
@pytest.mark.parametrize("t, g", [(3, 3), (2, 2)])
def test_multi_query_causal_calls(traced, t, g):
  """T = 3, G = 3 (R = 9 rows padded to 16, one sequence a program) and T = 2, G = 2 (R = 4:
  four sequences a program, automatic groups): per-row limits of a causal chunk."""
  q, levels = _tree(1, 5, t, 2, g, 16, jnp.float32)
  backend = backends.get("pallas", path="always", path_group=None)
  out, lse = _run(q, levels, jnp.float32, backend, traced=traced)
  _check(out, lse, *_reference(q, levels, jnp.float32, True), TOL[jnp.float32])


def test_the_path_kernel_is_what_runs_and_the_cost_rule_picks_it():
  q, levels = _tree(2, 6, 1, 2, 2, 16, jnp.float32, nan=False)
  always = _program_kernels(q, levels, backends.get("pallas", path="always"))
  assert always == ["hydrax_path_attention"]
  off = _program_kernels(q, levels, backends.get("pallas", path="off"))
  assert off and "hydrax_path_attention" not in off
  # "auto": this tree saves a few KB by sharing: under the crossover, the path runs ...
  assert _program_kernels(q, levels, backends.get("pallas")) == ["hydrax_path_attention"]
  # ... and with a crossover of 0 bytes the grouped levels do.
  assert "hydrax_path_attention" not in _program_kernels(
      q, levels, backends.get("pallas", path_crossover_bytes=0))
  # Without a shared level (dense attention, replicated caches) "auto" keeps the grouped kernel.
  dense = [(k, v, n, None) for k, v, n, _ in levels[2:]]
  assert "hydrax_path_attention" not in _program_kernels(q, dense, backends.get("pallas"))
  assert _program_kernels(q, dense, backends.get("pallas", path="always")) == [
      "hydrax_path_attention"]
  # lowering="mosaic" asks for the grouped Mosaic GPU kernel: "auto" leaves the path alone.
  lv = [KVLevel(jnp.asarray(k), jnp.asarray(v), jnp.asarray(n), o) for k, v, n, o in levels]
  assert not pg.path_mode(q.shape, jnp.float32, lv, pg.Config(lowering="mosaic"))[0]


def test_cost_rule_is_the_bytes_sharing_saves():
  """B = 16 sequences on one 1K-token root: 15 root reads saved per KV head (k and v)."""
  b, kh, d, p = 16, 8, 128, 1024
  lv = [KVLevel(jnp.zeros((1, p, kh, d), jnp.bfloat16), jnp.zeros((1, p, kh, d), jnp.bfloat16),
                jnp.full((1,), p), np.zeros(b, np.int32)),
        KVLevel(jnp.zeros((b, 128, kh, d), jnp.bfloat16),
                jnp.zeros((b, 128, kh, d), jnp.bfloat16), jnp.full((b,), 128))]
  saved = (b - 1) * p * 2 * d * 2 * kh
  q_shape = (b, 1, 32, d)
  assert pg.path_mode(q_shape, jnp.bfloat16, lv, pg.Config(path_crossover_bytes=saved + 1))[0]
  take, why = pg.path_mode(q_shape, jnp.bfloat16, lv, pg.Config(path_crossover_bytes=saved))
  assert not take and str(saved) in why


def test_plan_splits_for_two_programs_an_sm():
  one = dict(group=1)
  # B*K = 128 programs on 132 SMs: 3 splits make 384 >= 2 an SM.
  plan = path_gpu.make_plan((16, 1, 32, 128), 8, [1024, 128], num_sms=132, **one)
  assert plan.splits == 3 and plan.blocks_per_split == (6, 1)
  # B*K = 512: enough programs, one split (no merge).
  plan = path_gpu.make_plan((64, 1, 32, 128), 8, [1024, 128], num_sms=132, **one)
  assert plan.splits == 1 and plan.blocks_per_split == (16, 2)
  # B*K = 8: 33 wanted, capped so that each split has >= 4 key blocks of the longest level.
  plan = path_gpu.make_plan((2, 1, 16, 128), 4, [4096, 128], num_sms=132, **one)
  assert plan.splits == 16 and plan.blocks_per_split == (4, 1)
  # More programs an SM asked for: 5 wanted at B*K = 128, capped at 16 blocks / 4.
  plan = path_gpu.make_plan((16, 1, 32, 128), 8, [1024, 128], num_sms=132, programs_per_sm=4,
                            **one)
  assert plan.splits == 4 and plan.blocks_per_split == (4, 1)
  assert path_gpu.make_plan((2, 1, 16, 128), 4, [4096], num_sms=132, splits=5).splits == 5
  assert path_gpu.make_plan((2, 1, 16, 128), 4, [64], num_sms=132, splits=5).splits == 1


def test_plan_groups_fill_sixteen_rows():
  # G = 4: 4 sequences of 4 rows; ceil(16 / 4) * 8 = 32 programs: 9 splits wanted, capped
  # at 16 blocks / 4.
  plan = path_gpu.make_plan((16, 1, 32, 128), 8, [1024, 128], num_sms=132)
  assert (plan.group, plan.seq_rows, plan.rows_padded, plan.splits) == (4, 4, 16, 4)
  # G = 1: 4 sequences of one row padded to 4 (automatic groups stop at 4); a forced 16
  # is capped at B's power of two (B = 5: 8 sequences, two rows each).
  plan = path_gpu.make_plan((5, 1, 8, 64), 8, [256], num_sms=132)
  assert (plan.group, plan.seq_rows, plan.rows_padded) == (4, 4, 16)
  plan = path_gpu.make_plan((5, 1, 8, 64), 8, [256], num_sms=132, group=16)
  assert (plan.group, plan.seq_rows, plan.rows_padded) == (8, 2, 16)
  # R = 9 (T = 3, G = 3): one sequence of 16 rows; a forced group of 2 pads 9 to 16 each.
  assert path_gpu.make_plan((4, 3, 6, 64), 2, [64], num_sms=132).group == 1
  plan = path_gpu.make_plan((4, 3, 6, 64), 2, [64], num_sms=132, group=2)
  assert (plan.seq_rows, plan.rows_padded) == (16, 32)
  # R = 64: one sequence; R = 4 with group 2: rows padded to 8 each (M = 16).
  assert path_gpu.make_plan((4, 1, 64, 64), 1, [64], num_sms=132).rows_padded == 64
  plan = path_gpu.make_plan((4, 1, 8, 64), 2, [64], num_sms=132, group=2)
  assert (plan.seq_rows, plan.rows_padded) == (8, 16)
  with pytest.raises(ValueError, match="group must be a power of two >= 1.*got 3"):
    path_gpu.make_plan((4, 1, 8, 64), 2, [64], num_sms=132, group=3)


def test_unsupported_calls_run_level_by_level_logged_once(caplog, monkeypatch):
  """D = 24 (not a power of two): path='always' logs once and the grouped levels run."""
  monkeypatch.setattr(_log, "_seen", set())      # (other tests may have logged it already)
  q, levels = _tree(3, 4, 1, 1, 2, 24, jnp.float32)
  backend = backends.get("pallas", path="always")
  with caplog.at_level(logging.INFO, logger="hydrax"):
    out, lse = _run(q, levels, jnp.float32, backend)
    _run(q, levels, jnp.float32, backend)
  _check(out, lse, *_reference(q, levels, jnp.float32, True), TOL[jnp.float32])
  notes = [r for r in caplog.records if "path kernel cannot take" in r.getMessage()]
  assert len(notes) == 1 and "head dim D = 24" in notes[0].getMessage()


def test_new_tree_of_same_shapes_does_not_recompile():
  q, levels = _tree(4, 6, 1, 2, 2, 16, jnp.float32, nan=False)
  backend = backends.get("pallas", path="always")
  rng = np.random.default_rng(5)
  sizes = None
  for i in range(3):
    levels[1] = levels[1][:3] + (rng.integers(0, 3, 6).astype(np.int32),)
    out, lse = _run(q, levels, jnp.float32, backend)
    _check(out, lse, *_reference(q, levels, jnp.float32, True), TOL[jnp.float32])
    if sizes is None:
      sizes = path_gpu._forward._cache_size()
  assert path_gpu._forward._cache_size() == sizes


def test_the_backend_passes_its_programs_an_sm_to_the_plan(monkeypatch):
  seen = []
  make_plan = path_gpu.make_plan
  monkeypatch.setattr(path_gpu, "make_plan",
                      lambda *a, **kw: seen.append(kw["programs_per_sm"]) or make_plan(*a, **kw))
  q, levels = _tree(3, 4, 1, 2, 2, 16, np.float32)
  _run(q, levels, jnp.float32, backends.get("pallas", path="always", path_programs_per_sm=6))
  assert seen and set(seen) == {6}


@pytest.mark.parametrize("change, match", [
    (dict(path="sometimes"), "path must be 'auto', 'always' or 'off', got 'sometimes'"),
    (dict(path_crossover_bytes=-1), "path_crossover_bytes must be >= 0, got -1"),
    (dict(path_programs_per_sm=0), "path_programs_per_sm must be >= 1, got 0"),
    (dict(path_group=3), "path_group must be None or a power of two >= 1, got 3"),
    (dict(path_group=0), "path_group must be None or a power of two >= 1, got 0"),
])
def test_bad_configuration_names_the_field(change, match):
  with pytest.raises(ValueError, match=match):
    backends.get("pallas", **change)


def _cuda_ops(backend, b=16, p=1024, u=128, kh=8, g=4, d=128):
  """The StableHLO ops of a decode call (T = 1, stacked caches at a traced layer, traced
  owners) lowered for CUDA from this CPU (`jax.export`): the GPU program's ops, no GPU."""
  import re
  from jax import export

  def f(q, kp, vp, ks, vs, own, lengths, layer):
    lv = [KVLevel(kp, vp, jnp.full((1,), p, jnp.int32), own, layer),
          KVLevel(ks, vs, lengths, None, layer)]
    return hydragen_attention(q, lv, backend=backend)

  sds = jax.ShapeDtypeStruct
  args = (sds((b, 1, kh * g, d), jnp.bfloat16), *[sds((2, 1, p, kh, d), jnp.bfloat16)] * 2,
          *[sds((2, b, u, kh, d), jnp.bfloat16)] * 2, sds((b,), jnp.int32),
          sds((b,), jnp.int32), sds((), jnp.int32))
  try:
    exported = export.export(jax.jit(f), platforms=["cuda"], disabled_checks=[
        export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
  except Exception as e:      # a jaxlib that cannot lower Pallas for Triton here
    pytest.skip(f"cannot lower for CUDA here: {type(e).__name__}: {str(e)[:200]}")
  text = exported.mlir_module()
  body = text[text.index("func.func public @main"):]
  return re.findall(r"= (stablehlo\.[a-z_]+)", body), body.count("__gpu$xla.gpu.triton")


def test_a_decode_call_is_one_triton_kernel_on_the_gpu():
  """On a GPU the small-shape path of a decode call with one key split (B = 256 in groups
  of 4, K = 8: 512 programs) is the kernel launch and the limit arithmetic on [B] vectors: no reduction, transpose,
  exponent or second kernel, where the grouped levels lower to two kernels and the XLA work
  around them. With fewer sequences (B = 16) it splits the keys: still one kernel, and the
  splits' merge."""
  ops, kernels = _cuda_ops(backends.get("pallas", path="always", interpret=False), b=256)
  assert kernels == 1
  assert not {"stablehlo.reduce", "stablehlo.transpose", "stablehlo.exponential",
              "stablehlo.dot_general", "stablehlo.gather"} & set(ops), sorted(set(ops))
  split_ops, split_kernels = _cuda_ops(backends.get("pallas", path="always", interpret=False))
  assert split_kernels == 1 and "stablehlo.exponential" in split_ops
  grouped, grouped_kernels = _cuda_ops(backends.get("pallas", path="off", interpret=False),
                                       b=64)
  assert (grouped_kernels == 2 and "stablehlo.exponential" in grouped
          and len(grouped) > len(ops))
