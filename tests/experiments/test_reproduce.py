"""The paper-reproduction configs (experiments/configs/reproduce_*.gin), their measure wrapper,
the H200 script's logic and compare_paper.py, on CPU at tiny size (gin macro overrides)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

from experiments import compare_paper, harness, reproduce, run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(f for f in os.listdir(run.CONFIGS)
                 if f.startswith("reproduce_") and f.endswith(".gin"))
TINY = list(reproduce.TINY_BINDINGS)


def _spec(config, bindings=()):
  run.parse_config([config], list(bindings))
  spec = run.experiment()
  run.check_points(spec)
  return spec


def test_the_four_experiments_have_configs():
  assert CONFIGS == [f"{n}.gin" for n in sorted(compare_paper.EXPERIMENTS)]


@pytest.mark.parametrize("config", CONFIGS)
def test_config_parses_at_full_and_tiny_size(config):
  full = _spec(config)
  assert full["fixed"]["model"] in ("llama3-8b", "yi-6b", "codellama-13b")
  assert full["fixed"]["memory_limit_bytes"] > 100e9
  tiny = _spec(config, TINY)
  assert tiny["fixed"]["model"] == "tiny" and tiny["name"] == full["name"] == config[:-4]
  assert len(tiny["points"]) == len(full["points"])
  keys = [tuple(sorted(p.items(), key=str)) for p in full["points"]]
  assert len(set(keys)) == len(keys), "a point is listed twice"


def _distinct_modes(points):
  """One point of each distinct way of running (attention mode and sharing options): its
  smallest batch (compiling dominates on CPU and grows with the batch; the script's smoke test
  below runs the configs' first, largest points)."""
  best = {}
  for p in points:
    mode = tuple(str(p.get(k)) for k in ("attention", "max_levels", "min_shared_tokens"))
    if mode not in best or p["batch"] < best[mode]["batch"]:
      best[mode] = p
  return list(best.values())


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS)
def test_config_runs_tiny(config, tmp_path):
  spec = _spec(config, TINY)
  points = _distinct_modes(spec["points"])
  rows = harness.run_sweep(points, spec["measure"], spec["fixed"])
  bad = [(r, r.get("error")) for r in rows if r["status"] != "ok"]
  assert not bad, bad
  assert all(r["e2e_s"] > 0 and r["new_tokens"] > 0 for r in rows)


@pytest.mark.slow
def test_hierarchical_scopes_change_the_tree():
  spec = _spec("reproduce_hierarchical.gin", TINY)
  rows = harness.run_sweep(
      [{"scope": s, "batch": 128, "attention": "hydragen", "max_levels": None}
       for s in ("spp4", "spp64")], spec["measure"], spec["fixed"])
  assert [r["status"] for r in rows] == ["ok", "ok"]
  # 32 problems stored once vs 2: the full tree's shared levels hold fewer keys at spp64.
  assert rows[1]["kv_bytes"] < rows[0]["kv_bytes"]
  assert all(r["shared_levels"] == 2 for r in rows)


def test_scoped_point_rejects_an_unbound_scope():
  _spec("reproduce_hierarchical.gin", TINY)
  with pytest.raises(ValueError, match="scope='spp65' has no binding"):
    reproduce.scoped_point(scope="spp65", batch=65, prefix=8, attention="hydragen")


def test_misspelt_point_key_is_a_config_error(tmp_path):
  with pytest.raises(run.ConfigError, match=r"grid key 'scop' is not a parameter of "
                                            r"scoped_point \(did you mean 'scope'\?\)"):
    run.run(["reproduce_hierarchical.gin"], TINY + [
        "experiment.points=[{'scop': 'spp4', 'batch': 8, 'attention': 'hydragen'}]"],
        str(tmp_path), [])
  assert not os.listdir(tmp_path)


def test_long_document_no_sharing_point_shares_nothing():
  spec = _spec("reproduce_long_document.gin", TINY)
  [unshared] = [p for p in spec["points"][:3] if "min_shared_tokens" in p]
  [row] = harness.run_sweep([{**unshared, "batch": 3}], spec["measure"], spec["fixed"])
  assert row["status"] == "ok" and row["shared_levels"] == 0


def test_prefill_flops_by_hand():
  # tiny: L=2, E=64, H=4, K=2, D=16, I=128, V=256.
  per_token = 2 * 2 * (64 * (4 + 4) * 16 + 4 * 16 * 64 + 3 * 64 * 128)
  shared = compare_paper.prefill_flops("tiny", 3, 10, 2, True)
  pairs = 10 * 11 / 2 + 3 * (2 * 10 + 3)
  assert shared == pytest.approx(per_token * 16 + 4 * 2 * 4 * 16 * pairs + 2 * 3 * 64 * 256)
  whole = compare_paper.prefill_flops("tiny", 3, 10, 2, False)
  assert whole == pytest.approx(per_token * 36 + 4 * 2 * 4 * 16 * 3 * 78 + 2 * 3 * 64 * 256)


def _write(path, rows):
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
    w.writeheader()
    w.writerows(rows)


def test_claims_from_rows(tmp_path):
  doc = dict(model="tiny", prefix=10, suffix=2)
  _write(tmp_path / "reproduce_long_document.csv", [
      dict(doc, batch=1024, attention="hydragen", status="ok", e2e_s=2.0, prefill_s=1.5,
           decode_s=0.5, shared_levels=1),
      dict(doc, batch=2, attention="hydragen", status="ok", e2e_s=0.5, prefill_s=0.4,
           decode_s=0.1, shared_levels=1),
      dict(doc, batch=16, attention="replicated", min_shared_tokens=10**9, status="ok",
           e2e_s=4.0, prefill_s=3.9, decode_s=0.1, shared_levels=0),
      dict(doc, batch=64, attention="replicated", status="ok", e2e_s=1.0, prefill_s=0.8,
           decode_s=0.2, shared_levels=1),
      dict(doc, batch=1024, attention="replicated", status="OOM")])
  _write(tmp_path / "reproduce_hierarchical.csv", [
      dict(scope=s, batch=256, attention="hydragen", max_levels=m, status="ok", e2e_s=e,
           decode_s=d) for s, m, e, d in [("spp64", "", 1.0, 0.5), ("spp64", "1", 4.0, 1.0),
                                          ("spp4", "", 3.0, 0.9), ("spp4", "1", 4.0, 1.0)]])
  _write(tmp_path / "reproduce_throughput_8b.csv", [
      dict(attention=a, prefix=p, batch=b, status="ok", decode_tokens_per_s=v)
      for a, p, b, v in [("hydragen", 1024, 1024, 100.0), ("hydragen", 16384, 1024, 90.0),
                         ("replicated", 16384, 16, 2.0), ("none", 16384, 16, 40.0),
                         ("replicated", 1024, 256, 30.0), ("replicated", 1024, 64, 25.0)]])
  text = {c[0]: c for c in compare_paper.claims(compare_paper.load(str(tmp_path)))}
  _, _, ours, verdict = text["long document: hydragen time for 1024 questions / no sharing's"]
  assert verdict == "met" and "2 s / 256 s = 1/128" in ours            # 64 calls of 16 x 4 s
  _, _, ours, verdict = text["long document: hydragen time for 1024 questions / replicated's"]
  assert verdict == "not met" and "1/8" in ours and "10-16 s" in ours   # 16 calls, re-prefill 0.4
  assert "64 calls of 16: 256 s" in text[
      "long document: hydragen time for 1024 questions / no sharing's"][2]
  _, _, ours, verdict = text["hierarchical: full tree vs one shared level, spp64 batch 256"]
  assert verdict == "met" and ours.startswith("75% less e2e, 50% less decode")
  _, _, ours, verdict = text["llama3-8b: hydragen loss from prefix 1024 to 16384, batch 1024"]
  assert verdict == "met" and ours == "10%"
  _, _, ours, verdict = text["llama3-8b: best hydragen / best replicated decode tok/s, prefix 16384"]
  assert verdict == "met" and ours.startswith("45.0x")
  _, _, ours, verdict = text["llama3-8b: replicated / none decode tok/s, prefix 16384"]
  assert verdict == "reported" and ours == "5% at batch 16"
  _, paper, ours, verdict = text[
      "llama3-8b: best replicated loss from prefix 1024 (batch 256) to 16384 (batch 16)"]
  assert paper == "> 90%" and verdict == "met" and ours == "93%"        # 30 -> 2 tok/s
  assert text["end to end, codellama-13b"][3] == "pending"
  out = tmp_path / "summary.md"
  assert compare_paper.main(["--rows", str(tmp_path), "--out", str(out),
                             "--plot", str(tmp_path / "claims.png")]) == 0
  assert "| 64 | 256 | 1 | 4 | 75% | 50% |" in out.read_text()
  assert os.path.getsize(tmp_path / "claims.png") > 0


SCRIPT = os.path.join(ROOT, "experiments", "reproduce_h200.sh")
SMOKE = ["reproduce_hierarchical", "reproduce_throughput_8b"]


def _script_plan():
  """The config names of the script's PLAN, in order."""
  text = open(SCRIPT).read()
  body = text[text.index("PLAN=(") + len("PLAN=("):]
  return [entry.split(":")[0] for entry in body[:body.index(")")].split()]


def test_h200_script_plans_every_config_once():
  assert sorted(_script_plan()) == [c[:-4] for c in CONFIGS]


def test_h200_script_rejects_an_unknown_config_name(tmp_path):
  env = {**os.environ, "OUT": str(tmp_path / "out"), "REPRODUCE_ONLY": "reproduce_hierarchcal",
         "REPRODUCE_WORK": str(tmp_path / "work"), "PYTHON": sys.executable}
  done = subprocess.run(["bash", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=60)
  assert done.returncode == 2
  assert "REPRODUCE_ONLY names 'reproduce_hierarchcal', not one of: reproduce_hierarchical " \
      in done.stderr


@pytest.mark.slow
def test_h200_script_smoke_on_cpu(tmp_path):
  """The one H200 command at tiny size on two of its configs (the first and the last of its
  plan; the configs themselves run in-process above): each runs its first point only (points
  start within 1 s of a config's start, the rest are "skipped (time)"), within a share of
  90 s that bounds it under load without being spent, writes its rows to $OUT as it ends,
  and the claims table prints."""
  out = tmp_path / "out"
  env = {**os.environ, "OUT": str(out), "REPRODUCE_TINY": "1", "REPRODUCE_SHARE_S": "90",
         "REPRODUCE_RESERVE_S": "1000", "REPRODUCE_ONLY": " ".join(SMOKE),
         "REPRODUCE_WORK": str(tmp_path / "work"), "PYTHON": sys.executable,
         "JAX_PLATFORMS": "cpu"}
  done = subprocess.run(["bash", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=400)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  names = sorted(os.listdir(out))
  assert len(names) <= 8, names                     # what the device call brings back
  assert "results.tar.gz" in names and "log.txt" in names and "summary.md" in names
  assert [n for n in names if n.endswith(".csv")] == [f"{n}.csv" for n in SMOKE]
  for name in SMOKE:
    with open(out / f"{name}.csv") as f:
      rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["ok"] + ["skipped (time)"] * (len(rows) - 1), (
        name, rows)
    assert len(rows) == len(_spec(f"{name}.gin")["points"])
  log = (out / "log.txt").read_text()
  for name in _script_plan():
    assert (name in SMOKE) == (f"== {name}: not selected (REPRODUCE_ONLY)" not in log), name
  assert "| claim | paper | hydrax (this run) | verdict |" in done.stdout
  assert "Traceback" not in log
