"""`experiments/bench_engine.py --parse`: a --profile-steps ncu CSV -> kernels per mode and the
difference the hydragen step makes (the profiling itself needs a GPU and torch)."""

import pytest

from experiments import bench_engine

HEADER = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream",'
          '"Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit",'
          '"Metric Value"\n')


def _csv(tmp_path, kernels):
  rows = "".join(
      f'"{i}","1","python3","h","{name}","1","7","(128, 1, 1)","{grid}","0","9.0",'
      f'"Command line profiler metrics","gpu__time_duration.sum","usecond","{us}"\n'
      for i, (name, grid, us) in enumerate(kernels))
  path = tmp_path / "ncu.csv"
  path.write_text("==PROF== Connected\n" + HEADER + rows)
  return str(path)


def test_report_per_mode_and_the_difference(tmp_path):
  mark = ("loop_sine_fusion", "(13, 1, 1)", "1")
  none = [mark, ("gemm", "(8, 1, 1)", "100"), ("gemm", "(8, 1, 1)", "100"),
          ("rope", "(4, 1, 1)", "3")]
  hyd = [mark, ("gemm", "(8, 1, 1)", "100"), ("gemm", "(8, 1, 1)", "101"),
         ("scatter", "(2, 1, 1)", "5"), ("scatter", "(2, 1, 1)", "5"),
         ("mosaic_gpu_kernel", "(8, 2, 8)", "60")]
  text = bench_engine.profile_report(_csv(tmp_path, none + hyd), ["4096x256"])
  assert "4096x256 none: 3 kernels, 203.0 us serialised" in text
  assert "4096x256 hydragen: 5 kernels, 271.0 us serialised" in text
  assert "     200.0 us      2x  gemm (8, 1, 1)" in text
  assert "4096x256 hydragen minus none: 68.0 us serialised" in text
  assert "     +60.0 us     +1x  mosaic_gpu_kernel (8, 2, 8)" in text
  assert "     +10.0 us     +2x  scatter (2, 1, 1)" in text
  assert "      -3.0 us     -1x  rope (4, 1, 1)" in text


def test_report_needs_both_modes_of_every_point(tmp_path):
  mark = ("loop_sine_fusion", "(13, 1, 1)", "1")
  path = _csv(tmp_path, [mark, ("gemm", "(8, 1, 1)", "1")])
  with pytest.raises(SystemExit, match="found 1 profiled generations, expected 2"):
    bench_engine.profile_report(path, ["4096x256"])


def test_flags_reject_negative_steps_and_a_missing_out():
  with pytest.raises(SystemExit, match="--profile-steps must be >= 0, got -1"):
    bench_engine.main(["--profile-steps", "-1", "--out", "x"])
  with pytest.raises(SystemExit, match="--out is required"):
    bench_engine.main([])
