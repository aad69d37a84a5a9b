"""The attention benchmark's logic on CPU: its smoke mode (tiny shapes, interpret mode) runs
the exactness check (traced owners, a stacked cache at a traced layer), the back-to-back and
dependent-loop timings, traced vs static owners and the engine step, and writes its files."""

import csv
import json
import time

import pytest

from experiments import bench_attention


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_smoke_mode_runs_every_section(tmp_path, capsys, monkeypatch):
  # As in a test worker that imported the module long ago: the budget counts from main().
  monkeypatch.setattr(bench_attention, "T0", time.time() - 10 * 3600)
  results, engine, fails = bench_attention.main([
      "--smoke", "--check", "--decode", "--trees", "--engine", "--impls", "xla",
      "--tree-impls", "xla", "--loop", "2", "--outer", "1", "--engine-layers", "1",
      "--engine-new-tokens", "2", "--engine-backend", "xla", "--out", str(tmp_path)])
  assert fails == 0
  by = {(r["shape"], r["impl"]): r for r in results}
  decode = by[("decode_P64_B4", "xla")]
  assert decode["us"] > 0 and decode["device_us"] > 0 and "error" not in decode
  assert decode["engine_us_per_layer"] == engine[(64, 4)]
  for label in ("xla_static", "xla_traced"):
    row = by[("tree_B6_P32_N2x16_U8", label)]
    assert row["us"] > 0 and row["rel_err_vs_first"] < 1e-4
  steps = {r["impl"]: r for r in results if r["shape"] == "engine_P64_B4"}
  assert set(steps) == {"engine_none", "engine_hydragen"}
  assert all(r["step_us"] > 0 for r in steps.values())
  with open(tmp_path / "check.csv") as f:
    checks = list(csv.DictReader(f))
  assert checks and all(r["ok"] == "True" and r["traced"] == "True" for r in checks)
  with open(tmp_path / "results.csv") as f:
    assert len(list(csv.DictReader(f))) == len(results)
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["check_failures"] == 0 and "64x4" in summary["engine_us_per_layer"]
  printed = capsys.readouterr().out
  assert "decode_P64_B4 |" in printed and "check: 0 failures" in printed


@pytest.mark.filterwarnings("ignore")
def test_peers_join_the_decode_table_or_say_why_not(tmp_path, monkeypatch):
  """torch SDPA, FlashInfer and tokamax by name in --impls: on this CPU-only machine each row
  records why it did not run (not importable, or no GPU); the hydrax rows still run."""
  monkeypatch.setattr(bench_attention, "T0", time.time() - 10 * 3600)
  results, _, fails = bench_attention.main([
      "--smoke", "--decode", "--impls", "xla,torch_sdpa,flashinfer,tokamax", "--loop", "2",
      "--outer", "1", "--out", str(tmp_path)])
  by = {r["impl"]: r for r in results if r["shape"] == "decode_P64_B4"}
  assert not fails and "error" not in by["xla"] and by["xla"]["device_us"] > 0
  for impl in ("torch_sdpa", "flashinfer", "tokamax"):
    assert "not importable" in by[impl]["error"] or "needs a GPU" in by[impl]["error"]


def test_dependent_loop_unrolled_is_the_same_calls_without_a_while_loop():
  import jax
  import jax.numpy as jnp
  import numpy as np

  def op(q, k, layer):
    return q * k[layer]
  q = jnp.ones((2, 1, 1, 1), jnp.float32)
  k = jnp.asarray(np.arange(1.0, 4.0).reshape(3, 1, 1, 1, 1), jnp.float32)
  rolled = bench_attention.dependent_loop(op, 5)
  unrolled = bench_attention.dependent_loop(op, 5, unroll=True)
  np.testing.assert_array_equal(np.asarray(rolled(q, k)), np.asarray(unrolled(q, k)))
  assert "while" in rolled.lower(q, k).as_text()
  assert "while" not in unrolled.lower(q, k).as_text()


def test_timed_decode_calls_take_the_plan_arrays_as_inputs(monkeypatch):
  """As in check_fused_h200: the engine passes lengths and owners as arrays, so the timed
  decode calls take them as arguments (back to back and in the dependent loop), and use them."""
  import argparse

  import jax
  import jax.numpy as jnp
  import numpy as np

  monkeypatch.setattr(bench_attention, "ARGS", argparse.Namespace(
      loop=2, loop_unroll=True, outer=1, budget=1e9))
  seen = []
  monkeypatch.setattr(bench_attention, "bench",
                      lambda f, arg_sets, **kw: seen.append((f, arg_sets)) or (1e-6, 1e-6, 1))
  rows = []
  bench_attention.time_shape("t", 4, 64, 8, 4, 2, 16, {}, ["xla"], rows,
                             bench_attention.pg.configure())
  (_, direct), (loop, looped) = seen
  want = [[64], [8] * 4, [0] * 4]
  assert len(looped) == 1 and len(looped[0]) == 8
  for a in direct + looped:
    assert [np.asarray(x).tolist() for x in a[5:8]] == want
  fn = bench_attention.decode_fns(4, 64, 8, bench_attention.pg.configure())["xla"]
  args = direct[0]
  short = fn(*args[:6], args[6].at[0].set(3), *args[7:])
  full = fn(*args)
  assert not np.allclose(full[0], short[0]) and np.allclose(full[1:], short[1:])
  jax.block_until_ready(loop(*looped[0]))
  assert rows and "device_us" in rows[0]
