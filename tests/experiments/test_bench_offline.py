"""The offline benchmark's smoke mode on CPU: one workload run (with its prefill slot counts),
the engine-level padded vs packed prefill point and the attention-level Prepacking point."""

import csv

import pytest

from experiments import bench_offline


@pytest.mark.filterwarnings("ignore")
def test_smoke_mode_runs_and_compares_packed_with_padded_prefill(tmp_path, capsys):
  assert bench_offline.main(["--out", str(tmp_path), "--smoke", "--workloads", "samples",
                             "--modes", "global", "--time_budget", "600"]) == 0
  with open(tmp_path / "rows.csv") as f:
    (row,) = list(csv.DictReader(f))
  assert row["status"] == "ok" and int(row["packed_batches"]) >= 1
  assert 0 < int(row["prefill_slots"]) < int(row["padded_slots"])
  with open(tmp_path / "prepack_engine.csv") as f:
    (point,) = list(csv.DictReader(f))
  # float32: packed prefill gives the padded prefill's greedy tokens, in fewer slots
  assert point["tokens_equal"] == "True"
  assert (point["padded_ran"], point["packed_ran"]) == ("padded", "packed")
  assert int(point["packed_slots"]) < int(point["padded_slots"]) == 8 * 64
  assert float(point["packed_padding"]) < float(point["padded_padding"])
  assert float(point["padded_prefill_s"]) > 0 and float(point["packed_total_s"]) > 0
  with open(tmp_path / "prepack.csv") as f:
    (attn,) = list(csv.DictReader(f))
  assert "error" not in attn and float(attn["slot_ratio"]) > 1
  printed = capsys.readouterr().out
  assert "packed vs padded" in printed and "| samples | global |" in printed
