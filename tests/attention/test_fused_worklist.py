"""The fused backend on CPU without Triton: its plan, work list and cost rule against NumPy
references, the fallback when jax-triton is missing, and its lazy registration.

(The kernel itself runs in Triton's interpreter in tests/attention/test_fused_kernel.py, where
triton is installed; CI does not need it.)
"""

import logging
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hydrax.attention import KVLevel, backends, hydragen_attention
from hydrax.attention.kernels import fused_worklist as wl

from tests import oracle


def _tree(rng, b, t, shared, u):
  """Owners [B] per shared level (random, unsorted, some nodes unused), limits [B,T] per level
  (ragged, some 0), capacities; the last level is per-sequence (owner None)."""
  owners, caps, nodes, limits = [], [], [], []
  for n, s in shared:
    owners.append(rng.integers(0, n, size=b).astype(np.int32))
    caps.append(s)
    nodes.append(n)
  owners.append(None)
  caps.append(u)
  nodes.append(b)
  for s in caps:
    lim = rng.integers(0, s + 1, size=(b, t)).astype(np.int32)
    lim[0] = s
    limits.append(lim)
  return owners, caps, nodes, limits


def _plan(b, t, h, kh, owners, caps, nodes, mode, **kw):
  shapes = wl.static_plan_inputs(
      [((n, s, kh, 8), o) for n, s, o in zip(nodes, caps, owners)], b)
  return wl.make_plan((b, t, h, 8), kh, shapes, mode=mode, **kw)


def _check_cover(plan, work, owners, nodes, limits, offsets=None):
  """Every (sequence, level, KV head, split) in exactly one item, of the sequence's node; the
  splits of a level cover its capacity; tiles hold <= C sequences of one node; costs never
  increase; items without sequences last."""
  items, orders, cost = (np.asarray(x) for x in work)
  b, kh = plan.batch, plan.kv_heads
  assert items.shape == (plan.num_items, len(wl.ITEM_FIELDS))
  seen = np.zeros((len(plan.levels), b, kh, max(lp.splits for lp in plan.levels)), np.int64)
  for lvl, node, start, count, h, split, key_end in items:
    lp = plan.levels[lvl]
    assert 0 <= count <= lp.seqs_per_tile and lp.block_m == max(16, lp.seqs_per_tile * plan.tgp)
    assert 0 <= split < lp.splits and 0 <= h < kh
    seqs = orders[lvl][start:start + count]
    # The key loop's end: the split's end, clipped to the tile's largest limit.
    hi = max([int(limits[lvl][x].max()) for x in seqs], default=0)
    assert key_end == min((split + 1) * lp.chunk, hi), (key_end, split, lp.chunk, hi)
    for b_ in seqs:
      own = b_ if owners[lvl] is None else owners[lvl][b_]
      off = 0 if offsets is None or offsets[lvl] is None else offsets[lvl]
      assert node == own + off, (lvl, b_, node, own)
      seen[lvl, b_, h, split] += 1
  for lvl, lp in enumerate(plan.levels):
    assert (seen[lvl, :, :, :lp.splits] == 1).all(), f"level {lvl}: coverage {seen[lvl]}"
    assert (seen[lvl, :, :, lp.splits:] == 0).all()
    assert lp.splits * lp.chunk >= np.max(limits[lvl]), "splits do not cover the keys"
    assert sorted(orders[lvl].tolist()) == list(range(b))
  assert (np.diff(cost) <= 0).all(), "items are not heaviest first"
  empty = items[:, 3] == 0
  if empty.any():
    assert empty[np.argmax(empty):].all(), "items without sequences are not last"
  return items, cost


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("mode", ["shared", "per_sequence"])
def test_work_list_covers_every_row_once(seed, mode):
  rng = np.random.default_rng(seed)
  b, t = int(rng.integers(1, 40)), int(rng.integers(1, 4))
  kh, g = int(rng.choice([1, 2])), int(rng.choice([1, 4, 8]))
  shared = [(1, int(rng.integers(1, 600)))] + [(int(rng.integers(2, 9)), int(rng.integers(0, 300)))
                                               for _ in range(int(rng.integers(0, 3)))]
  owners, caps, nodes, limits = _tree(rng, b, t, shared, int(rng.integers(0, 200)))
  plan = _plan(b, t, kh * g, kh, owners, caps, nodes, mode, num_sms=int(rng.integers(1, 9)))
  items, cost = _check_cover(plan, wl.work_list(plan, owners, nodes, limits), owners, nodes,
                             limits)
  # Heaviest first: a tile's cost grows with its keys, so the first item has the most keys.
  lp0 = plan.levels[items[0, 0]]
  assert cost[0] == max(cost)
  assert lp0.block_m >= 16


def test_shared_tiles_stack_sequences_of_a_node():
  b, t, kh, g = 64, 1, 2, 4
  owners = [np.zeros(b, np.int32), (np.arange(b) % 3).astype(np.int32), None]
  caps, nodes = [4096, 256, 128], [1, 3, b]
  limits = [np.full((b, t), s, np.int32) for s in caps]
  plan = _plan(b, t, kh * g, kh, owners, caps, nodes, "shared", max_block_m=64)
  assert [lp.shared for lp in plan.levels] == [True, True, False]
  assert plan.levels[0].seqs_per_tile == 16 and plan.levels[0].num_tiles == 4
  items, cost = _check_cover(plan, wl.work_list(plan, owners, nodes, limits), owners, nodes,
                             limits)
  # The prefix level's items (most keys per item) come first.
  first = items[:plan.levels[0].num_tiles * kh * plan.levels[0].splits]
  assert (first[:, 0] == 0).all()
  assert (items[-b * kh:, 0] == 2).all() or plan.levels[2].splits > 1


def test_per_sequence_mode_reads_every_level_per_sequence():
  b, t, kh = 8, 1, 2
  owners = [np.zeros(b, np.int32), None]
  plan = _plan(b, t, 8, kh, owners, [100, 10], [1, b], "per_sequence")
  assert not any(lp.shared for lp in plan.levels)
  assert all(lp.num_tiles == b and lp.seqs_per_tile == 1 for lp in plan.levels)
  limits = [np.full((b, t), 100, np.int32), np.full((b, t), 10, np.int32)]
  work = wl.work_list(plan, owners, [1, b], limits)
  assert isinstance(work.items, np.ndarray)     # concrete inputs: a NumPy (static) list
  _check_cover(plan, work, owners, [1, b], limits)


def test_traced_work_list_equals_static_and_bounds_hold():
  rng = np.random.default_rng(7)
  b, t, kh = 37, 2, 2
  owners, caps, nodes, limits = _tree(rng, b, t, [(1, 500), (6, 90), (11, 40)], 30)
  plan_static = _plan(b, t, 4, kh, owners, caps, nodes, "shared")
  # Traced owners: the plan knows the shapes only (a bound on the tiles; N = 1 is static).
  shapes = [wl.LevelShape(n, s, o is not None, np.zeros(b, np.int32) if n == 1 else None)
            for n, s, o in zip(nodes, caps, owners)]
  plan = wl.make_plan((b, t, 4, 8), kh, shapes, mode="shared")
  offsets = [None, 6 * 2, None, b * 1]

  @jax.jit
  def build(own1, own2, lims):
    return wl.work_list(plan, [owners[0], own1, own2, None], nodes, lims,
                        [None, jnp.int32(12), None, jnp.int32(b)])

  work = build(jnp.asarray(owners[1]), jnp.asarray(owners[2]), [jnp.asarray(x) for x in limits])
  items, _ = _check_cover(plan, work, owners, nodes, limits, offsets)
  used = items[items[:, 3] > 0]
  static = np.asarray(wl.work_list(plan_static, owners, nodes, limits).items)
  for lvl in range(len(nodes)):
    # Same tiles, once the traced bound's unused tiles (no sequence) are dropped.
    assert (used[:, 0] == lvl).sum() <= (items[:, 0] == lvl).sum()
    assert (plan.levels[lvl].num_tiles >= plan_static.levels[lvl].num_tiles)
  assert sorted(map(tuple, static[static[:, 3] > 0][:, [0, 3, 4, 5, 6]].tolist())) == sorted(
      map(tuple, used[:, [0, 3, 4, 5, 6]].tolist()))


def test_plan_rejects_bad_configuration():
  shapes = [wl.LevelShape(4, 10, False)]
  with pytest.raises(ValueError, match="mode must be"):
    wl.make_plan((4, 1, 4, 8), 1, shapes, mode="fast")
  with pytest.raises(ValueError, match="block_n must be a power of two"):
    wl.make_plan((4, 1, 4, 8), 1, shapes, mode="shared", block_n=48)
  with pytest.raises(ValueError, match="1 to 4 levels"):
    wl.make_plan((4, 1, 4, 8), 1, shapes * 5, mode="shared")
  with pytest.raises(ValueError, match="T\\*G = 128"):
    wl.make_plan((4, 32, 4, 8), 1, shapes, mode="shared", max_block_m=64)
  with pytest.raises(ValueError, match="crossover_bytes must be >= 0"):
    wl.choose_mode((4, 1, 4, 8), shapes, 1, 2, crossover_bytes=-1)


def test_splits_fill_the_machine_and_cover_the_capacity():
  b, kh = 16, 8
  shapes = [wl.LevelShape(1, 32768, True, np.zeros(b, np.int32)), wl.LevelShape(b, 128, False)]
  plan = wl.make_plan((b, 1, 32, 128), kh, shapes, mode="shared", num_sms=132)
  prefix, suffix = plan.levels
  assert prefix.num_tiles == 1 and prefix.splits * kh >= 132   # one tile, split to fill SMs
  assert prefix.splits * prefix.chunk >= 32768 and prefix.chunk % plan.block_n == 0
  assert plan.parts == prefix.splits + suffix.splits
  assert plan.grid == min(plan.num_items, 132)


def test_cost_rule_shares_only_when_it_saves_enough():
  kh, item = 8, 2

  def mode(b, prefix, crossover=wl.SHARING_CROSSOVER_BYTES, nodes=1):
    shapes = [wl.LevelShape(nodes, prefix, True), wl.LevelShape(b, 128, False)]
    return wl.choose_mode((b, 1, 32, 128), shapes, kh, item, crossover)

  # Saved bytes: (B - N) * P * K * 2 * D * itemsize.
  saved = wl.sharing_saved_bytes((16, 1, 32, 128), [wl.LevelShape(1, 1024, True)], item) * kh
  assert saved == 15 * 1024 * kh * 2 * 128 * item
  assert mode(16, 1024, crossover=saved) == "shared"
  assert mode(16, 1024, crossover=saved + 1) == "per_sequence"
  assert mode(1, 32768) == "per_sequence"              # one sequence: nothing to share
  assert mode(64, 32768, nodes=64) == "per_sequence"   # a node per sequence: nothing either
  assert mode(256, 32768) == "shared"
  assert mode(2, 16) == "per_sequence"                 # short prefix, few sequences
  # Monotone: more sequences or a longer prefix never turn sharing off.
  for b in (2, 4, 16, 64):
    for p in (16, 256, 4096):
      if mode(b, p) == "shared":
        assert mode(2 * b, p) == "shared" and mode(b, 2 * p) == "shared"
  only_suffix = [wl.LevelShape(8, 100, False)]
  assert wl.choose_mode((8, 1, 4, 8), only_suffix, 1, 2, crossover_bytes=0) == "per_sequence"


def test_roofline_floor():
  # 32K prefix read once + 256 suffixes of 128: memory bound on the H200.
  us = wl.roofline_us((256, 1, 32, 128), 8, [(1, 32768), (256, 128)], 2)
  nbytes = 2 * (32768 + 256 * 128) * 8 * 128 * 2 + 2 * 256 * 32 * 128 * 2 + 4 * 256 * 32
  flops = 4.0 * 256 * 32 * 128 * (32768 + 128)
  assert us == pytest.approx(1e6 * max(nbytes / 4.22e12, flops / 805e12))


# --- availability, fallback, registration ----------------------------------------------------

def _small_levels(rng, b=3, t=1, kh=1, g=2, d=8):
  lv = [(rng.standard_normal((1, 9, kh, d)).astype(np.float32),
         rng.standard_normal((1, 9, kh, d)).astype(np.float32), np.array([7], np.int32),
         np.zeros(b, np.int32)),
        (rng.standard_normal((b, 5, kh, d)).astype(np.float32),
         rng.standard_normal((b, 5, kh, d)).astype(np.float32), np.array([5, 0, 3], np.int32),
         None)]
  q = rng.standard_normal((b, t, kh * g, d)).astype(np.float32)
  return q, lv


def test_missing_jax_triton_falls_back_once_and_stays_exact(monkeypatch, caplog):
  from hydrax.attention.kernels import fused_triton as ft
  real_import = ft.importlib.import_module

  def no_jax_triton(name, *a, **k):
    if name in ("jax_triton", "triton"):
      raise ImportError(f"No module named {name!r} (simulated)")
    return real_import(name, *a, **k)

  monkeypatch.setattr(ft.importlib, "import_module", no_jax_triton)
  monkeypatch.setattr(ft, "_on_gpu", lambda: True)       # as on a GPU without the toolchain
  ft._import_reason.cache_clear()
  try:
    reason = ft.unavailable_reason(ft.Config())
    assert "cannot import triton" in reason and "simulated" in reason
    assert not ft.available()
    assert ft._fallback(ft.Config()).name == "pallas"     # a GPU's fallback
    rng = np.random.default_rng(0)
    q, lv = _small_levels(rng)
    levels = [KVLevel(jnp.asarray(k), jnp.asarray(v), jnp.asarray(n), o) for k, v, n, o in lv]
    backend = backends.get("fused", fallback="xla")       # xla: fast on this CPU
    with caplog.at_level(logging.WARNING, logger="hydrax"):
      out, lse = hydragen_attention(jnp.asarray(q), levels, backend=backend)
      out2, _ = hydragen_attention(jnp.asarray(q), levels, backend=backend)
    msgs = [r.getMessage() for r in caplog.records if "'fused'" in r.getMessage()]
    assert len(msgs) == 1 and "cannot import triton" in msgs[0] and "'xla'" in msgs[0], msgs
    keys, vals = oracle.concat_levels(lv)
    ref_out, ref_lse = oracle.dense(q, keys, vals, causal=True)
    np.testing.assert_allclose(np.asarray(out), ref_out, atol=2e-5)
    np.testing.assert_allclose(np.asarray(lse), ref_lse, atol=2e-5)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(out2))
    # One level alone (the backend contract) also runs the fallback.
    o1, l1 = backend.attend(jnp.asarray(q), *(jnp.asarray(x) for x in lv[1][:3]), None,
                            jnp.asarray(np.array([[5], [0], [3]], np.int32)), scale=0.5)
    assert np.isfinite(np.asarray(o1)).all() and np.isneginf(np.asarray(l1)[1]).all()
  finally:
    ft._import_reason.cache_clear()


def test_fused_on_cpu_without_interpreter_runs_the_fallback():
  rng = np.random.default_rng(1)
  q, lv = _small_levels(rng)
  levels = [KVLevel(jnp.asarray(k), jnp.asarray(v), jnp.asarray(n), o) for k, v, n, o in lv]
  out, lse = hydragen_attention(jnp.asarray(q), levels, backend="fused")
  ref = hydragen_attention(jnp.asarray(q), levels, backend="xla")
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref[0]))
  np.testing.assert_array_equal(np.asarray(lse), np.asarray(ref[1]))


def test_launch_settings_by_dtype_and_explicit_values_win():
  from hydrax.attention.kernels import fused_triton as ft
  for dtype in (jnp.bfloat16, jnp.float16):
    assert ft.launch_settings(ft.Config(), dtype) == dict(num_warps=4, num_stages=3,
                                                          programs_per_sm=2)
  assert ft.launch_settings(ft.Config(), jnp.float32) == dict(num_warps=8, num_stages=2,
                                                              programs_per_sm=1)
  cfg = ft.Config(num_warps=2, programs_per_sm=3)
  assert ft.launch_settings(cfg, jnp.bfloat16) == dict(num_warps=2, num_stages=3,
                                                       programs_per_sm=3)
  # The plan's persistent grid follows the programs per SM of the dtype.
  shapes = [wl.LevelShape(1, 4096, True, np.zeros(256, np.int32)), wl.LevelShape(256, 128, False)]
  grid = {d: ft._plan_for((256, 1, 32, 128), 8, d, shapes, ft.Config(num_sms=10)).grid
          for d in (jnp.bfloat16, jnp.float32)}
  assert grid == {jnp.bfloat16: 20, jnp.float32: 10}


def test_offsets_within_a_node_are_64_bit_only_where_needed():
  from hydrax.attention.kernels import fused_triton as ft

  def off64(capacity, dtype, kh=8, d=128):
    shapes = [wl.LevelShape(1, capacity, True, np.zeros(4, np.int32)), wl.LevelShape(4, 16, False)]
    plan = ft._plan_for((4, 1, 4 * kh, d), kh, dtype, shapes, ft.Config())
    return ft.kernel_params(plan, shapes, (4, 1, 4 * kh, d), dtype, 1.0, ft.Config())[1]["OFF64"]
  assert not off64(32768, jnp.bfloat16)
  assert off64((2 ** 31) // (8 * 128), jnp.bfloat16)       # S*K*D reaches 2^31
  assert not off64((2 ** 31) // (8 * 128) - 128, jnp.bfloat16)
  assert off64(1024, jnp.float32)


def test_config_rejects_bad_values():
  with pytest.raises(ValueError, match="mode must be"):
    backends.get("fused", mode="fastest")
  with pytest.raises(ValueError, match="max_block_m must be a power of two"):
    backends.get("fused", max_block_m=100)
  with pytest.raises(ValueError, match="programs_per_sm must be >= 1"):
    backends.get("fused", programs_per_sm=0)
  with pytest.raises(ValueError, match="fallback must be another backend"):
    backends.get("fused", fallback="fused")


def test_registered_lazily_and_toolchain_never_imported_by_hydrax():
  code = (
      "import sys, hydrax\n"
      "from hydrax.attention import backends\n"
      "assert 'fused' in backends.names(), backends.names()\n"
      "bad = [m for m in ('triton', 'jax_triton', 'torch', "
      "'hydrax.attention.kernels.fused_triton') if m in sys.modules]\n"
      "assert not bad, bad\n"
      "assert backends.get('auto').name == 'xla'\n"
      "b = backends.get('fused', block_n=32)\n"
      "assert b.name == 'fused' and b.all_levels is not None and b.takes_layer\n"
      "assert b.config.block_n == 32\n"
      "bad = [m for m in ('triton', 'jax_triton') if m in sys.modules]\n"
      "assert not bad, bad\n"
      "print('ok')\n")
  res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
  assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
