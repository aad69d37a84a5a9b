"""`experiments/bench_engine.py --profile-steps`: the kernels of one decode step from two
generations' difference, and the report (the CUPTI profiling itself needs a GPU and torch)."""

import json
from types import SimpleNamespace

import pytest

from experiments import bench_engine


def test_a_decode_step_is_the_difference_over_the_extra_steps():
  short = {"prefill_gemm": (8, 800.0), "gemm": (2, 20.0), "scatter": (2, 4.0)}
  long = {"prefill_gemm": (8, 800.0), "gemm": (8, 83.0), "scatter": (8, 16.0), "cond": (3, 3.0)}
  step = bench_engine.per_step(long, short, 3)
  assert step == {"gemm": (2.0, 21.0), "scatter": (2.0, 4.0), "cond": (1.0, 1.0)}
  with pytest.raises(ValueError, match="ran 0 more decode steps"):
    bench_engine.per_step(long, short, 0)


def _generation_spans(steps):
  """A generation's GPU activity: a 50 us prefill, then per decode step a 9 us gap, four
  2.5 us layer kernels back to back and a 1 us copy of the loop's condition (a 20 us step:
  11 busy, 9 idle)."""
  spans, t = [(0.0, 50.0, "prefill")], 50.0
  for _ in range(steps):
    t += 9.0                                  # the gap after the prefill or the last step
    for _ in range(4):
      spans.append((t, t + 2.5, "layer"))
      t += 2.5
    spans.append((t, t + 1.0, "Memcpy DtoH"))
    t += 1.0
  return spans


def test_profile_decode_step_runs_2_and_2_plus_n_tokens(monkeypatch):
  calls = []

  def fake_cupti(run):
    g = run()
    return _generation_spans(g.decode_steps), g

  def generate(n):
    calls.append(n)
    return SimpleNamespace(decode_steps=n - 1, signature=SimpleNamespace(
        main=(256, 24 if n < 9 else 48)))

  monkeypatch.setattr(bench_engine, "cupti_spans", fake_cupti)
  step, timeline, note = bench_engine.profile_decode_step(generate, 4)
  assert calls == [2, 6] and note == ""
  assert step == {"layer": (4.0, 10.0), "Memcpy DtoH": (1.0, 1.0)}
  # the 6-token generation's 5 decode steps: 4 stretches between their copies, the first
  # and the last dropped
  assert timeline["steps"] == 2 and timeline["wall_range"] == [20.0, 20.0]
  assert timeline["decode_steps"] == 5
  assert timeline["wall_us"] == pytest.approx(20.0)
  assert timeline["busy_us"] == pytest.approx(11.0)
  assert timeline["idle_us"] == pytest.approx(9.0)
  # the extra steps' gaps: 9 us a step between the condition's copy and the next layer
  assert timeline["gaps"] == [["Memcpy DtoH", "layer", 1.0, pytest.approx(9.0)]]
  _, _, note = bench_engine.profile_decode_step(generate, 8)
  assert "suffix passes differ ((256, 24) vs (256, 48))" in note


def test_steps_cut_at_the_condition_copies():
  """Stretches between consecutive copies are steps (the first and last dropped); an
  activity across a cut counts in both stretches, clipped; a copy of the generation's own
  at its end does not make its stretch a step."""
  spans = [(0.0, 50.0, "prefill"), (50.0, 51.0, "Memcpy DtoH")]
  t = 51.0
  for wall in (20.0, 30.0, 25.0, 40.0):
    spans += [(t + 4.0, t + wall - 2.0, "layer"), (t + wall - 1.0, t + wall, "Memcpy DtoH")]
    t += wall
  spans += [(t + 900.0, t + 901.0, "Memcpy DtoH (results)")]
  spans.append((120.0, 130.0, "copy engine"))          # across the cut at 126
  tl = bench_engine.step_timeline(sorted(spans))
  # stretches: 20 (first, dropped), 30, 25 (the copy's part: busy 21), 40, 901 (dropped)
  assert tl["steps"] == 3 and tl["wall_range"] == [25.0, 40.0]
  assert tl["wall_us"] == 30.0 and tl["busy_us"] == 25.0 and tl["idle_us"] == 5.0
  # the 4 us gap after the copy opens the 30 and 25 us steps (the copy engine fills the
  # 40 us step's): 8 us over 3 steps; the 1 us before the copy, in 2 of them
  assert tl["gaps"][0] == ["Memcpy DtoH", "layer", pytest.approx(2 / 3), pytest.approx(8 / 3)]
  assert tl["gaps"][1] == ["layer", "Memcpy DtoH", pytest.approx(2 / 3), pytest.approx(2 / 3)]
  assert bench_engine.step_timeline(spans[:4])["steps"] == 0
  # Two decode steps between copies (`Runtime.check_every` = 2): a stretch's figures halved.
  two = bench_engine.step_timeline(sorted(spans), steps_per_cut=2)
  assert (two["wall_us"], two["busy_us"], two["idle_us"]) == (15.0, 12.5, 2.5)
  assert two["wall_range"] == [12.5, 20.0] and two["steps_per_cut"] == 2
  assert two["gaps"][0] == ["Memcpy DtoH", "layer", pytest.approx(1 / 3), pytest.approx(4 / 3)]


def test_timeline_counts_overlap_once_and_ranks_gaps():
  from experiments import profile_decode_h200 as pd
  spans = [(0, 10, "a"), (5, 12, "b"), (6, 8, "inside"), (20, 25, "c"), (30, 31, "d"),
           (40, 45, "c")]
  stats = pd.timeline_stats(spans)
  assert (stats["wall_us"], stats["busy_us"], stats["idle_us"]) == (45, 23.0, 22.0)
  assert stats["gaps"] == [["d", "c", 1, 9.0], ["b", "c", 1, 8.0], ["c", "d", 1, 5.0]]
  assert pd.aggregate(spans)["c"] == (2, 10.0)
  assert pd.timeline_stats([])["wall_us"] == 0.0
  text = bench_engine.timeline_report("4096x256", {"hydragen": {
      "steps": 3, "decode_steps": 7, "wall_us": 20.0, "busy_us": 11.0, "idle_us": 9.0,
      "wall_range": [19.0, 22.5],
      "gaps": [["Memcpy DtoH", "layer", 1.0, 6.0]]}})
  assert "4096x256 hydragen, a decode step on the GPU's timeline (the median of 3 stretches " \
         "between copies of a generation of 7, walls 19.0-22.5 us): 20.0 us wall, 11.0 busy, " \
         "9.0 idle" in text
  assert "       6.0 us    1.0x  gap after Memcpy DtoH before layer" in text


def test_report_per_mode_and_the_difference():
  modes = {"none": {"gemm": (2, 200.0), "rope": (1, 3.0)},
           "hydragen": {"gemm": (2, 201.0), "scatter": (2, 10.0), "mosaic_gpu_kernel": (1, 60.0)}}
  text = bench_engine.kernel_report("4096x256", modes, layers=2)
  assert "4096x256 none, a decode step: 3 kernels, 203.0 us (101.5 us a layer of 2)" in text
  assert "4096x256 hydragen, a decode step: 5 kernels, 271.0 us" in text
  assert "     200.0 us    2.0x  gemm" in text
  assert "4096x256 hydragen minus none, a decode step: 68.0 us (34.0 us a layer)" in text
  assert "     +60.0 us   +1.0x  mosaic_gpu_kernel" in text
  assert "     +10.0 us   +2.0x  scatter" in text
  assert "      -3.0 us   -1.0x  rope" in text


def test_flags_reject_negative_steps_and_a_missing_out():
  with pytest.raises(SystemExit, match="--profile-steps must be >= 0, got -1"):
    bench_engine.main(["--profile-steps", "-1", "--out", "x"])
  with pytest.raises(SystemExit, match="--out is required"):
    bench_engine.main([])
  with pytest.raises(SystemExit, match=r"--check-every must be >= 1 and divide --profile-steps, "
                     r"got 3 \(--profile-steps 4\)"):
    bench_engine.main(["--check-every", "3", "--profile-steps", "4", "--out", "x"])


@pytest.mark.slow
def test_sampled_step_with_logprobs_runs_on_cpu(tmp_path, monkeypatch):
  """The tiny model end to end with sampling and log-probabilities: each mode's generate gets
  them, and the rows and settings are written."""
  from hydrax import engine   # bench_engine imports it inside main (after the XLA flags)
  seen = []
  real = engine.generate
  monkeypatch.setattr(engine, "generate", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
  bench_engine.main(["--model", "tiny", "--points", "64x4", "--new-tokens", "4",
                     "--temperature", "1.0", "--top-p", "0.9", "--logprobs", "--no-dump",
                     "--ceilings", "1e12,1e11", "--out", str(tmp_path)])
  assert len(seen) == 2 and all(
      (kw["temperature"], kw["top_p"], kw["logprobs"]) == (1.0, 0.9, True) for kw in seen)
  out = json.loads((tmp_path / "engine.json").read_text())
  assert (out["env"]["temperature"], out["env"]["logprobs"]) == (1.0, True)
  assert out["rows"][0]["hydragen_ms"] > 0 and out["rows"][0]["none_ms"] > 0
