"""The parser of `experiments/profile_decode_h200.py` (ncu's CSV -> kernels per call)."""

import pytest

from experiments import profile_decode_h200 as pd

HEADER = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream",'
          '"Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit",'
          '"Metric Value"\n')


def _row(i, name, value, unit="nsecond"):
  name, _, grid = name.partition("@")          # "name@grid": another kernel of the same name
  grid = grid or ("(97, 1, 1)" if name == "loop_multiply_fusion" else "(8, 1, 1)")
  return (f'"{i}","1","python3","h","{name}","1","7","(128, 1, 1)","{grid}","0","9.0",'
          f'"Command line profiler metrics","gpu__time_duration.sum","{unit}","{value}"\n')


def _write(tmp_path, kernels):
  path = tmp_path / "ncu.csv"
  text = "==PROF== Connected to process\nprofiled 1 shapes\n" + HEADER
  text += "".join(_row(i, n, v, u) for i, (n, v, u) in enumerate(kernels))
  path.write_text(text)
  return str(path)


def test_report_splits_calls_at_markers_and_takes_medians(tmp_path):
  call = lambda a: [("loop_multiply_fusion", "2,000", "nsecond"), ("mosaic_gpu_kernel", a, "usecond"),
                    ("loop_multiply_fusion@(4, 1, 1)", "3000", "nsecond")]
  path = _write(tmp_path, call("120") + call("130") + call("500") +
                call("40") + call("41") + call("42"))
  text = pd.report(path, [(16384, 256), (4096, 256)], 3)
  assert "P16384_B256: 2 kernels, 133.0 us" in text
  assert "   0    130.0 us" in text       # the median of 120, 130 and 500
  assert "P4096_B256: 2 kernels, 44.0 us" in text
  assert "(97, 1, 1)" not in text                  # the markers are not reported
  assert "loop_multiply_fusion (4, 1, 1)" in text  # the same name on another grid is a kernel


def test_report_rejects_wrong_call_counts_and_units(tmp_path):
  path = _write(tmp_path, [("loop_multiply_fusion", "1", "nsecond"), ("k", "1", "nsecond")])
  with pytest.raises(SystemExit, match="found 1 marked calls, expected 2"):
    pd.report(path, [(1024, 16)], 2)
  path = _write(tmp_path, [("loop_multiply_fusion", "1", "nsecond"), ("k", "1", "parsec")])
  with pytest.raises(SystemExit, match="unknown time unit 'parsec'"):
    pd.report(path, [(1024, 16)], 1)
  path = _write(tmp_path, [("loop_multiply_fusion", "1", "nsecond"), ("k", "1", "nsecond"),
                           ("loop_multiply_fusion", "1", "nsecond")])
  with pytest.raises(SystemExit, match="different kernel counts"):
    pd.report(path, [(1024, 16)], 2)


def test_shapes_flag_rejects_bad_text():
  with pytest.raises(SystemExit, match="--shapes must be"):
    pd.parse_shapes("16kx256")


def test_report_per_layer_of_a_layer_scan(tmp_path):
  call = [("loop_multiply_fusion", "2000", "nsecond"), ("table_fusion", "2", "usecond")]
  call += [("mosaic_gpu_kernel", "30", "usecond")] * 4
  text = pd.report(_write(tmp_path, call), [(4096, 256)], 1, layers=4)
  assert ("P4096_B256: 5 kernels, 122.0 us serialised (median of 1 calls), "
          "30.5 us a layer of 4") in text


@pytest.mark.parametrize("prepared", [False, True])
def test_layer_scan_runs_the_layers_in_order_from_one_q(prepared):
  """The engine's form (`check_fused_h200.hydrax_layers_fn`, what --layers profiles): layer l
  reads cache copy l, its q is layer l-1's output; prepared once or not, the same result."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from experiments import bench_attention as ba
  from experiments import check_fused_h200 as cf
  b, p, u, h, kh, d, layers = 3, 8, 4, 4, 2, 8, 3
  case = ba.make_case(jax.random.key(0), b, p, u, h, kh, d, dtype=jnp.float32, copies=layers)
  plan = ba.plan_inputs(case)
  got = cf.hydrax_layers_fn(b, p, u, "xla", layers, prepared)(*case, *plan)
  q = case[0]
  for layer in range(layers):
    q = cf.hydrax_fn(b, p, u, "xla")(q, *case[1:], *plan, jnp.int32(layer))
  np.testing.assert_allclose(np.asarray(got), np.asarray(q), rtol=1e-5, atol=1e-5)


def test_layers_flag_rejects_zero():
  with pytest.raises(SystemExit, match="--layers must be >= 1, got 0"):
    pd.main(["--layers", "0"])


def test_report_groups_configs_then_peers(tmp_path):
  """--config as a list and --peers: every shape under each config, then each peer's."""
  mark = ("loop_multiply_fusion", "1000", "nsecond")
  kernels = []
  for us in ("10", "11", "20", "21", "30", "31"):
    kernels += [mark, ("k", us, "usecond")]
  text = pd.report(_write(tmp_path, kernels), [(1024, 16)], 2, configs=2, peers=["torch_sdpa"])
  assert "P1024_B16 config 0: 1 kernels" in text
  assert "P1024_B16 config 1: 1 kernels, 21.0 us" in text
  assert "P1024_B16 torch_sdpa: 1 kernels, 31.0 us" in text
  with pytest.raises(SystemExit, match="found 6 marked calls, expected 4"):
    pd.report(_write(tmp_path, kernels), [(1024, 16)], 2, configs=1, peers=["torch_sdpa"])


def test_peers_flag_rejects_unknown_peer():
  with pytest.raises(SystemExit, match="one of torch_sdpa, cudnn, flashinfer, got 'tokamax'"):
    pd.main(["--peers", "tokamax", "--parse", "x.csv"])


@pytest.mark.parametrize("text,match", [
    ("{nope", "--config must be JSON, got '{nope'"),
    ("[]", "a non-empty list of them, got '\\[\\]'"),
    ('[{}, 3]', "a JSON object or a non-empty list of them, got '\\[\\{\\}, 3\\]'"),
])
def test_config_flag_rejects_bad_json(text, match):
  with pytest.raises(SystemExit, match=match):
    pd.main(["--config", text, "--parse", "x.csv"])
  assert pd.parse_configs('{"path": "always"}') == [{"path": "always"}]
