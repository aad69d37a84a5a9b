"""The fused kernel's H200 check script in its CPU smoke mode: every section runs, a failing
implementation (no GPU, peers not installed, fused without its toolchain) is a row with its
error instead of a crash, files and the table come out."""

import csv
import json

import pytest

from experiments import bench_attention, check_fused_h200


@pytest.mark.filterwarnings("ignore")
def test_smoke_mode_runs_and_records_every_failure(tmp_path, capsys, monkeypatch):
  # as in a CI worker that imported the script long before: --budget counts from main()
  monkeypatch.setattr(check_fused_h200, "T0", check_fused_h200.T0 - 10_000)
  monkeypatch.setattr(check_fused_h200.ba, "T0", check_fused_h200.ba.T0 - 10_000)
  rows, checks, fails = check_fused_h200.main([
      "--smoke", "--out", str(tmp_path), "--loop", "2", "--outer", "1", "--budget", "120",
      "--path-variants", '[{"path_programs_per_sm": 4}]',
      "--pallas-variants", '[{"finish": "per_level"}]', "--layers", "2", "--prepared"])
  assert fails == 0
  assert {c["case"] for c in checks} >= {"smoke_path_tree3_f32", "smoke_grouped_tree3_f32"}
  for impl, cfg in (("pallas_path_variant", '{"path_programs_per_sm": 4}'),
                    ("pallas_variant", '{"finish": "per_level"}')):
    variant = [r for r in rows if r["impl"] == impl]
    assert [(r["shape"], r["variant"]) for r in variant] == [("P64_B4", cfg)]
    assert "needs a GPU" in variant[0]["error"]
  by = {r["impl"]: r for r in rows if r["shape"] == "P64_B4"}
  assert by["xla"]["device_us"] > 0 and by["xla"]["us"] > 0 and "error" not in by["xla"]
  for impl in ("pallas", "cudnn", "torch_sdpa"):
    assert "GPU" in by[impl]["error"] or "not importable" in by[impl]["error"], by[impl]
  for impl in ("fused_shared", "fused_per_seq"):      # no Triton toolchain in CI
    assert "device_us" in by[impl] or "unavailable" in by[impl]["error"], by[impl]
  assert by["xla"]["rule"] in ("shared", "per_sequence") and by["xla"]["floor_us"] > 0
  scan = [r for r in rows if r["impl"].startswith("pallas_scan")]    # (XLA off GPU)
  assert sorted((r["impl"], r["round"]) for r in scan) == [
      ("pallas_scan", 0), ("pallas_scan", 1), ("pallas_scan_prepared", 0),
      ("pallas_scan_prepared", 1)]
  assert all(r["us"] > 0 and r["L"] == 2 and r["rel_err"] < 1e-2 for r in scan), scan
  with open(tmp_path / "fused_timing.csv") as f:
    assert len(list(csv.DictReader(f))) == len(rows)
  summary = json.loads((tmp_path / "fused_summary.json").read_text())
  assert summary["check_failures"] == 0 and "current_bytes" in summary["crossover"]
  printed = capsys.readouterr().out
  assert "P64_B4 |" in printed and "exactness: 0 failure(s)" in printed
  assert "layer scan P64_B4:" in printed


def test_variant_spread_medians_and_ratio_to_the_default():
  rows = [dict(shape="P4096_B256", impl="pallas", device_us=100.0),
          dict(shape="P4096_B256", impl="pallas_variant", variant='{"a": 1}', device_us=90.0),
          dict(shape="P4096_B256", impl="pallas_variant", variant='{"a": 1}', device_us=99.0),
          dict(shape="P4096_B256", impl="pallas_variant", variant='{"a": 1}', error="x"),
          dict(shape="P4096_B256", impl="pallas_path_variant", variant="{}", device_us=1.0),
          dict(shape="P1024_B16", impl="pallas_variant", variant='{"a": 1}', device_us=30.0)]
  res = check_fused_h200.variant_spread(rows)
  a = res["P4096_B256"]['{"a": 1}']
  assert a["us"] == [90.0, 99.0] and a["median"] == pytest.approx(94.5)
  assert a["spread"] == pytest.approx(1.1) and a["vs_default"] == pytest.approx(0.945)
  assert res["P4096_B256"]["default"]["spread"] == 1.0
  assert res["P1024_B16"]['{"a": 1}']["vs_default"] is None and len(res) == 2


def test_timed_calls_take_the_plan_arrays_as_inputs(monkeypatch):
  """The engine passes lengths and owners as arrays; the timed calls must too (built inside
  the jitted function they would be constants that XLA writes with a kernel every call): the
  back-to-back calls and the dependent loop get them as arguments, and they are used."""
  import argparse

  import jax
  import jax.numpy as jnp
  import numpy as np

  monkeypatch.setattr(check_fused_h200, "ARGS",
                      argparse.Namespace(loop=2, loop_unroll=True, outer=1))
  keys = jax.random.split(jax.random.key(0), 5)
  shapes = [(4, 1, 4, 16), (2, 1, 64, 2, 16), (2, 1, 64, 2, 16), (2, 4, 8, 2, 16),
            (2, 4, 8, 2, 16)]
  case = tuple(jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, shapes))
  fn = check_fused_h200.hydrax_fn(4, 64, 8, "xla")
  seen = []
  monkeypatch.setattr(check_fused_h200.ba, "bench",
                      lambda f, arg_sets, **kw: seen.append((f, arg_sets)) or (1e-6, 0, 0))
  check_fused_h200._time_jax(fn, case, 2)
  (_, direct), (loop, looped) = seen
  lp, ls, owner = bench_attention.plan_inputs(case)
  assert [np.asarray(x).tolist() for x in (lp, ls, owner)] == [[64], [8] * 4, [0] * 4]
  assert [len(a) for a in direct] == [9, 9] and [len(a) for a in looped] == [8]
  for a in direct + looped:
    assert [np.asarray(x).tolist() for x in a[5:8]] == [[64], [8] * 4, [0] * 4]
  full = fn(*case, lp, ls, owner, jnp.int32(0))
  short = fn(*case, lp, ls.at[0].set(3), owner, jnp.int32(0))
  assert not np.allclose(full[0], short[0]) and np.allclose(full[1:], short[1:])
  jax.block_until_ready(loop(*looped[0]))


@pytest.mark.filterwarnings("ignore")
def test_a_peer_row_is_timed_and_checked_against_xla(tmp_path, monkeypatch):
  """A peer (faked: installed, on a "GPU", returning the XLA backend's own output) goes
  through `time_shapes` to a row with its times and an error of 0 (run 11 found the
  reference called with the wrong arguments on the H200, every peer row an error)."""
  import jax
  import numpy as np
  from hydrax.attention import backends

  check_fused_h200.main(["--smoke", "--out", str(tmp_path), "--checks", "none", "--impls", "",
                         "--budget", "60"])          # (sets the script's ARGS)
  def fake_run(impl, b, p, u, h, kh, d, case, loop, outer):
    fn = check_fused_h200.hydrax_fn(b, p, u, backends.get("xla"))
    out = fn(*case, *bench_attention.plan_inputs(case), jax.numpy.int32(0))
    return 12.0, 11.0, "graph", np.asarray(out[:, 0], np.float32)

  monkeypatch.setattr(bench_attention.peers, "unavailable", lambda impl: None)
  monkeypatch.setattr(check_fused_h200.pe, "unavailable", lambda impl: None)
  monkeypatch.setattr(bench_attention.peers, "run", fake_run)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(bench_attention, "check_copied_fits", lambda *a: None)
  rows = check_fused_h200.time_shapes([(64, 4)], 4, 2, 16, 8, ["torch_sdpa"])
  [row] = [r for r in rows if r["impl"] == "torch_sdpa"]
  assert "error" not in row, row
  assert row["us"] == 12.0 and row["device_us"] == 11.0 and row["rel_err"] < 1e-6
