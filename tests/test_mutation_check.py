"""tests/mutation_check.py's helpers (the script itself runs outside pytest: minutes)."""

import importlib
import inspect

from tests import mutation_check as mc


def test_table_and_outcomes():
  muts = [mc.by_name("none"), mc.by_name("causal_off_by_one"), mc.by_name("flash_lse_log2")]
  results = {("none", "xla"): mc.outcome(True, 0), ("none", "pallas"): mc.outcome(True, 0),
             ("causal_off_by_one", "xla"): mc.outcome(False, 1),
             ("causal_off_by_one", "pallas"): mc.outcome(False, 0),
             ("flash_lse_log2", "pallas"): mc.outcome(False, 4)}
  text = mc.table(results, muts, ["xla", "pallas"])
  lines = text.splitlines()
  assert lines[0] == "| mutation | what | xla | pallas |"
  assert lines[1] == "| --- | --- | --- | --- |"
  assert lines[2].endswith("| passes | passes |")
  assert lines[3].startswith("| causal_off_by_one |") and lines[3].endswith("| caught | missed |")
  assert lines[4].endswith("| - | error (pytest exit 4) |")       # xla: does not apply
  assert mc.failed(results) == [("causal_off_by_one", "pallas"), ("flash_lse_log2", "pallas")]
  assert mc.outcome(True, 1) == "FAILS" and mc.failed({("none", "xla"): "FAILS"})


def test_every_mutation_can_be_planted():
  """Each mutation's text occurs exactly once in its function (else the code moved on)."""
  for m in mc.MUTATIONS[1:]:
    source = inspect.getsource(getattr(importlib.import_module(m.module), m.function))
    assert source.count(m.old) == 1, m.name
    assert set(m.backends) <= set(mc.COLUMNS)
