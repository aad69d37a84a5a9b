"""The experiment runner end to end on CPU: quickstart config, overrides, OOM, typos."""

import csv
import json
import os

import pytest
from absl import app

from experiments import run

SMALL = ["grid.prefix=[32]", "grid.batch=[3]", "generation_point.min_shared_tokens=0",
         "experiment.fixed={'model': 'tiny', 'dtype': 'float32', 'suffix': 4, "
         "'max_new_tokens': 3}"]


def _rows(directory):
  with open(os.path.join(directory, "rows.csv")) as f:
    return list(csv.DictReader(f))


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


def test_out_of_memory_point_is_recorded_and_sweep_goes_on(tmp_path):
  # Replicated caches of the larger batch exceed the simulated memory; hydragen's do not.
  directory = run.run(["quickstart.gin"], SMALL + [
      "grid.attention=['replicated', 'hydragen']", "grid.batch=[16]", "grid.prefix=[256]",
      "generation_point.memory_limit_bytes=600000"], str(tmp_path), [])
  status = {(r["attention"], r["batch"]): r["status"] for r in _rows(directory)}
  assert status[("replicated", "16")] == "OOM"              # the first point: the sweep goes on
  assert status[("hydragen", "16")] == "ok"


def test_config_typo_is_a_clear_error(tmp_path):
  with pytest.raises(app.UsageError, match=r"gin config error.*nmae"):
    run.run(["quickstart.gin"], ["experiment.nmae='x'"], str(tmp_path), [])
  with pytest.raises(app.UsageError, match="not found.*available"):
    run.run(["no_such_config.gin"], [], str(tmp_path), [])


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


@pytest.mark.parametrize("config", sorted(
    f for f in os.listdir(run.CONFIGS) if f.endswith(".gin")))
def test_every_config_parses_to_an_experiment(config):
  run.parse_config([config], [])
  spec = run.experiment()
  assert spec["name"] and list(spec["points"]) and callable(spec["measure"])


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
