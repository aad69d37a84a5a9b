"""The experiment runner end to end on CPU: quickstart config, overrides, OOM, typos, exit
codes, column definitions."""

import csv
import inspect
import json
import os
import subprocess
import sys

import pytest

from experiments import harness, run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SMALL = ["grid.prefix=[32]", "grid.batch=[3]", "generation_point.min_shared_tokens=0",
         "experiment.fixed={'model': 'tiny', 'dtype': 'float32', 'suffix': 4, "
         "'max_new_tokens': 3}"]


def _rows(directory):
  with open(os.path.join(directory, "rows.csv")) as f:
    return list(csv.DictReader(f))


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
  directory = run.run(["quickstart.gin"], SMALL, str(tmp_path), ["test"])
  for name in ("config.gin", "env.json", "rows.csv", "rows.json",
               "decode_tokens_per_s_vs_batch.png", "kv_bytes_vs_batch.png"):
    assert os.path.isfile(os.path.join(directory, name)), name
  rows = _rows(directory)
  assert len(rows) == 3                                      # gin overrides applied
  for column in ("prefix", "batch", "attention", "status", "decode_tokens_per_s", "prefill_s",
                 "e2e_s", "kv_bytes", "decode_tokens_per_s_vs_none"):
    assert column in rows[0], column
  assert all(r["status"] == "ok" for r in rows)
  assert all(float(r["decode_tokens_per_s"]) > 0 for r in rows)
  assert {r["attention"] for r in rows} == {"hydragen", "replicated", "none"}
  none = [r for r in rows if r["attention"] == "none"]
  assert all(abs(float(r["decode_tokens_per_s_vs_none"]) - 1.0) < 1e-9 for r in none)
  hydra = {r["batch"]: int(r["kv_bytes"]) for r in rows if r["attention"] == "hydragen"}
  repl = {r["batch"]: int(r["kv_bytes"]) for r in rows if r["attention"] == "replicated"}
  assert all(hydra[b] < repl[b] for b in hydra)              # the prefix is stored once
  env = json.load(open(os.path.join(directory, "env.json")))
  assert env["platform"] == "cpu" and env["jax"]
  assert "grid.batch = [3]" in open(os.path.join(directory, "config.gin")).read()
  _check_columns(directory, "generation_point")


def test_out_of_memory_point_is_recorded_and_sweep_goes_on(tmp_path):
  # Replicated caches of the larger batch exceed the simulated memory; hydragen's do not.
  directory = run.run(["quickstart.gin"], SMALL + [
      "grid.attention=['replicated', 'hydragen']", "grid.batch=[16]", "grid.prefix=[256]",
      "generation_point.memory_limit_bytes=600000"], str(tmp_path), [])
  status = {(r["attention"], r["batch"]): r["status"] for r in _rows(directory)}
  assert status[("replicated", "16")] == "OOM"              # the first point: the sweep goes on
  assert status[("hydragen", "16")] == "ok"


@pytest.mark.parametrize("files, bindings, match", [
    (["quickstart.gin"], ["experiment.nmae='x'"],
     r"gin binding \"experiment.nmae='x'\": .*doesn't have a parameter named 'nmae'"),
    (["no_such_config.gin"], [], "not found.*available"),
    (["quickstart.gin"], ["grid.batch=[8"], r"'grid.batch=\[8' is malformed"),
    (["quickstart.gin"], ["grid.bach=[8]"],
     r"grid key 'bach' is not a parameter of generation_point \(did you mean 'batch'\?\)"),
    (["quickstart.gin"], ["experiment.fixed={'modle': 'tiny'}"],
     r"experiment.fixed key 'modle' is not a parameter of generation_point"),
    (["quickstart.gin"], ["grid.batch=[]"], r"experiment config: grid: axis 'batch'"),
])
def test_config_errors_are_raised_before_any_point(tmp_path, files, bindings, match):
  with pytest.raises(run.ConfigError, match=match) as info:
    run.run(files, bindings, str(tmp_path), [])
  assert "\n" not in str(info.value)
  assert not os.listdir(tmp_path)                        # no results folder


def _cli(tmp_path, *args):
  return subprocess.run([sys.executable, "experiments/run.py", f"--results_root={tmp_path}",
                         *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                        env={**os.environ, "PYTHONPATH": ROOT})


def test_cli_config_error_is_one_line_exit_2(tmp_path):
  """Every ConfigError takes this path (the messages are tested above, in process)."""
  done = _cli(tmp_path, "--gin.grid.batch=[8")
  expect = "error: gin binding 'grid.batch=[8' is malformed"
  assert done.returncode == 2, done.stderr
  assert done.stderr.strip().startswith(expect), done.stderr
  assert len(done.stderr.strip().splitlines()) == 1, done.stderr          # no usage text
  assert not os.listdir(tmp_path)


def test_every_point_errored_exits_1_with_messages(tmp_path):
  done = _cli(tmp_path, *[f"--gin_bindings={b}" for b in SMALL],
              "--gin.experiment.fixed={'model': 'no_such_preset'}",
              "--gin.grid.attention=['none']")
  assert done.returncode == 1, done.stderr[-2000:]
  assert "error: every point that ran failed" in done.stderr
  [folder] = os.listdir(os.path.join(tmp_path, "quickstart"))
  rows = _rows(os.path.join(tmp_path, "quickstart", folder))
  assert rows and all(r["status"] == "error" and "no_such_preset" in r["error"] for r in rows)


def test_exit_code():
  assert run.exit_code([{"status": "ok"}, {"status": "error"}]) == 0
  assert run.exit_code([{"status": "OOM"}]) == 0                     # OOM is a result
  assert run.exit_code([{"status": "error"}, {"status": "OOM"}]) == 1
  assert run.exit_code([{"status": "error"}]) == 1


@pytest.mark.slow
def test_check_every_binding_reaches_the_engine(tmp_path, monkeypatch):
  from hydrax import engine
  seen, real = [], engine.generate

  def spy(*args, runtime=None, **kwargs):
    seen.append(runtime.check_every)
    return real(*args, runtime=runtime, **kwargs)
  monkeypatch.setattr(engine, "generate", spy)
  directory = run.run(["quickstart.gin"], SMALL + ["generation_point.check_every=3"],
                      str(tmp_path), ["test"])
  assert all(r["status"] == "ok" for r in _rows(directory))
  assert seen == [3] * 3, seen
  assert "generation_point.check_every = 3" in open(os.path.join(directory,
                                                                  "config.gin")).read()


def _check_columns(directory, measure):
  """columns.md defines each metric column of rows.csv; every other column is a parameter of
  the measure function; every row says how it was timed."""
  params = set(inspect.signature(getattr(run.points, measure)).parameters)
  with open(os.path.join(directory, "rows.csv")) as f:
    header = next(csv.reader(f))
  text = open(os.path.join(directory, "columns.md")).read()
  for column in header:
    if column in params:
      continue
    assert column in harness.COLUMNS or "_vs_" in column, f"undocumented column {column}"
    assert f"| {column} |" in text, column
  assert all(r["timing"] for r in _rows(directory) if r["status"] == "ok")


def test_decode_tokens_per_s_counts_decode_loop_tokens_only(tmp_path):
  directory = run.run(["quickstart.gin"], SMALL + ["grid.attention=['none']"], str(tmp_path),
                      [])
  [row] = _rows(directory)
  batch, new = int(row["batch"]), int(row["new_tokens"])
  assert int(row["decode_tokens"]) == new - batch                    # no eos: 3 - 1 per row
  assert float(row["decode_tokens_per_s"]) == pytest.approx(
      (new - batch) / float(row["decode_s"]), rel=1e-9)


def test_gin_shorthand():
  assert run.split_gin_shorthand(["x", "--gin.grid.batch=[2]", "--gin_file=a.gin"]) == [
      "x", "--gin_bindings=grid.batch=[2]", "--gin_file=a.gin"]


def test_attention_microbench_config(tmp_path):
  directory = run.run(["attention_microbench.gin"], [
      "grid.batch_prefix=[(3, 40)]", "grid.suffix=[0, 5]", "grid.backend=['xla']",
      "experiment.fixed={'heads': 4, 'kv_heads': 2, 'head_dim': 8, 'dtype': 'float32'}",
      "attention_point.repeats=2"], str(tmp_path), [])
  rows = _rows(directory)
  assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
  assert all(float(r["median_us"]) > 0 for r in rows)
  repl = [r for r in rows if r["implementation"] == "replicated"]
  assert all(abs(float(r["median_us_vs_replicated"]) - 1.0) < 1e-9 for r in repl)
  assert os.path.isfile(os.path.join(directory, "median_us_vs_suffix.png"))
  _check_columns(directory, "attention_point")


def test_backend_spec_strings_flow_from_gin_to_the_kernel(tmp_path):
  """ablation_small_shape.gin at toy size: "pallas:path=always" / "pallas:path=off" (spec
  strings) reach the pallas backend (interpret mode here) and every point runs."""
  directory = run.run(["ablation_small_shape.gin"], [
      "grid.batch_prefix=[(3, 40)]", "grid.suffix=[5]",
      "grid.backend=['pallas:path=always', 'pallas:path=off']",
      "experiment.fixed={'heads': 4, 'kv_heads': 2, 'head_dim': 16, 'dtype': 'float32'}",
      "attention_point.repeats=1"], str(tmp_path), [])
  rows = _rows(directory)
  assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
  assert {r["backend"] for r in rows} == {"pallas:path=always", "pallas:path=off"}


@pytest.mark.parametrize("config", sorted(
    f for f in os.listdir(run.CONFIGS) if f.endswith(".gin")))
def test_every_config_parses_to_an_experiment(config):
  run.parse_config([config], [])
  spec = run.experiment()
  assert spec["name"] and list(spec["points"]) and callable(spec["measure"])


@pytest.mark.slow
def test_hierarchical_config_runs_small(tmp_path):
  directory = run.run(["hierarchical.gin"], [
      "grid.batch=[4]", "grid.attention=['hydragen']",
      "experiment.fixed={'model': 'tiny', 'dtype': 'float32', 'prefix': 40, 'suffix': 0, "
      "'prompts': 'hierarchy', 'max_new_tokens': 2, 'min_shared_tokens': 0}",
      "hierarchy_prompts.samples_per_problem=2", "hierarchy_prompts.problem_tokens=64"],
      str(tmp_path), [])
  rows = {r["max_levels"]: r for r in _rows(directory)}
  assert all(r["status"] == "ok" for r in rows.values())
  assert rows[""]["shared_levels"] == "2" and rows["1"]["shared_levels"] == "1"
  assert int(rows[""]["kv_bytes"]) < int(rows["1"]["kv_bytes"])   # the full tree stores less
