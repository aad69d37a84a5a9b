"""experiments/probe_split_merge.py: every form of the split merge it times is exact, and its
check fails a wrong form (so a GPU call that times the forms compares equals)."""

import jax
import numpy as np

from experiments import probe_split_merge as probe


def test_every_form_matches_the_float64_merge():
  for p in (2, 3):
    errs = probe.check(p, 8, 2, 4, 2)
    assert all(e["ok"] for e in errs.values()), errs


def test_check_fails_a_form_that_skips_a_split(monkeypatch):
  def first_split_only(out, lse, b, t, g):
    return probe.reduce_form(out[:1], lse[:1], b, t, g)
  monkeypatch.setitem(probe.FORMS, "wrong", first_split_only)
  errs = probe.check(2, 8, 1, 4, 2)
  assert not errs["wrong"]["ok"] and errs["reduce"]["ok"]


def test_launches_lists_the_entry_kernels():
  out, lse = probe.make_inputs(2, 8, 1, 4, 2)
  hlo = jax.jit(lambda o, l: probe.reduce_form(o, l, 8, 1, 4)).lower(out, lse).compile()
  names = probe.launches(hlo.as_text())
  assert names and all(":" in n for n in names)
  assert not any(n.startswith(("parameter:", "bitcast:", "tuple:")) for n in names)


def test_inputs_have_empty_rows():
  out, lse = probe.make_inputs(2, 8, 1, 4, 2)
  lse = np.asarray(lse)
  assert np.isneginf(lse[:, 0, 0]).all() and np.isneginf(lse).any(axis=0).sum() > 1


def test_launches_counts_a_multi_output_fusion():
  hlo = ("HloModule m\n\nENTRY %main (p: f32[8]) -> f32[8] {\n"
         "  %p = f32[8]{0} parameter(0)\n"
         "  %f = (f32[8]{0}, bf16[8,4]{1,0}) fusion(%p), kind=kLoop, calls=%c\n"
         "  %g = f32[8]{0} get-tuple-element(%f), index=0\n"
         "  ROOT %h = f32[8]{0} fusion(%g), kind=kLoop, calls=%d\n}\n")
  assert probe.launches(hlo) == ["fusion:f", "fusion:h"]
