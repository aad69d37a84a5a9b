"""The engine check script (experiments/check_engine.py) on CPU: it passes on the engine as it
is, and its two criteria catch what they are for (tokens that differ between check_every
values; a token far from the model's own top choice)."""

import json

import numpy as np
import pytest

from experiments import check_engine
from hydrax import engine
from hydrax.models import LlamaConfig, llama

ARGS = ["--preset", "tiny", "--layers", "2", "--dtype", "float32", "--batch", "6", "--prefix",
        "40", "--new", "6", "--check-every", "1,3"]


@pytest.mark.slow
def test_the_engine_passes_and_the_table_says_so(tmp_path, capsys):
  assert check_engine.main(ARGS + ["--out", str(tmp_path)]) == 0
  rows = json.load(open(tmp_path / "check_engine.json"))
  assert [r["attention"] for r in rows] == ["hydragen", "replicated"]
  for r in rows:
    assert r["ok"] and r["same_tokens"] and r["worst_gap"] <= r["tolerance"]
    assert r["shared_levels"] >= 1 and r["backend"] == "xla" and r["check_every"] == [1, 3]
  assert "| hydragen | 1 | [1, 3] | True |" in capsys.readouterr().out


def test_a_token_off_the_top_is_caught():
  config = LlamaConfig.from_preset("tiny").replace(num_layers=2)
  model = llama.init(config, seed=0)
  graphdef, params, _ = engine.resolve_model(model, None)
  prompts = check_engine.shared_prompts(config.vocab_size, 4, 24)
  gen = engine.generate(model, prompts, max_new_tokens=5, backend="xla")
  tokens, lengths = np.asarray(gen.tokens), np.asarray(gen.lengths)
  gaps = check_engine.reference_gaps(graphdef, params, prompts, tokens, lengths)
  assert gaps.shape == (4, 5) and np.nanmax(gaps) == 0       # greedy: the top choice
  wrong = tokens.copy()
  wrong[2, 3] = (wrong[2, 3] + 1) % config.vocab_size
  gaps = check_engine.reference_gaps(graphdef, params, prompts, wrong, lengths)
  assert gaps[2, 3] > 0.05 and np.nanmax(np.delete(gaps[2], [3, 4])) == 0
  short = lengths.copy()
  short[1] = 2
  assert np.isnan(check_engine.reference_gaps(graphdef, params, prompts, tokens,
                                              short)[1, 2:]).all()


def test_tokens_that_differ_between_check_every_values_fail(monkeypatch, tmp_path):
  real = engine.generate

  def off_by_one(*args, runtime=None, **kwargs):
    gen = real(*args, runtime=runtime, **kwargs)
    if runtime.check_every == 3:
      gen.tokens = np.asarray(gen.tokens).copy()
      gen.tokens[0, -1] = (gen.tokens[0, -1] + 1) % 256
    return gen
  monkeypatch.setattr(engine, "generate", off_by_one)
  assert check_engine.main(ARGS + ["--attention", "hydragen", "--out", str(tmp_path)]) == 1
  (row,) = json.load(open(tmp_path / "check_engine.json"))
  assert not row["same_tokens"] and not row["ok"]


def test_bad_check_every_is_refused():
  with pytest.raises(SystemExit):
    check_engine.main(["--check-every", "0,2"])
