"""The scoring benchmark's smoke mode on CPU: both modes and both methods score the same rows
alike, the shared header and questions stored once, the prefill method with no decode step;
bad flags."""

import csv

import pytest

from experiments import bench_score


@pytest.mark.filterwarnings("ignore")
def test_smoke_mode_scores_alike_with_less_kv(tmp_path, capsys):
  assert bench_score.main(["--out", str(tmp_path), "--smoke"]) == 0
  with open(tmp_path / "rows.csv") as f:
    rows = {(r["mode"], r["method"]): r for r in csv.DictReader(f)}
  assert set(rows) == {(m, k) for m in ("hydragen", "replicated") for k in ("decode", "prefill")}
  hyd, rep = rows["hydragen", "decode"], rows["replicated", "decode"]
  assert int(hyd["rows"]) == 18 and int(hyd["batches"]) == 2
  for r in rows.values():
    assert float(r["max_logprob_gap"]) < 1e-4 and int(r["greedy_differs"]) == 0
    assert float(r["seconds"]) > 0 and float(r["rows_per_s"]) > 0
  assert int(hyd["kv_bytes_per_batch"]) < int(rep["kv_bytes_per_batch"])
  assert int(hyd["decode_steps_per_batch"]) > 0
  assert int(rows["hydragen", "prefill"]["decode_steps_per_batch"]) == 0
  assert "| hydragen | prefill | 18 |" in capsys.readouterr().out


def test_workload_and_batches():
  prompts, conts, of = bench_score.workload(256, header=10, questions=3, question=4,
                                            choices=2, choice_tokens=3)
  assert len(prompts) == 6 and of.tolist() == [0, 0, 1, 1, 2, 2]
  assert prompts[0] is prompts[1] and (prompts[0][:10] == prompts[4][:10]).all()
  assert all(1 <= len(c) <= 3 for c in conts)
  assert bench_score.batches(6, 2, 5) == [(0, 4), (4, 6)]      # a question's choices together
  assert bench_score.batches(6, 2, 1) == [(0, 2), (2, 4), (4, 6)]


def test_bad_flags(tmp_path):
  with pytest.raises(SystemExit, match=r"--modes: unknown \['copied'\]"):
    bench_score.main(["--out", str(tmp_path), "--smoke", "--modes", "hydragen,copied"])
  with pytest.raises(SystemExit, match=r"--methods: unknown \['loop'\]"):
    bench_score.main(["--out", str(tmp_path), "--smoke", "--methods", "loop"])
  with pytest.raises(SystemExit, match="--choices must be >= 1, got 0"):
    bench_score.main(["--out", str(tmp_path), "--choices", "0"])
