"""python -m hydrax.generate / hydrax.generate.run end to end on the tiny model (CPU, float32).

Completions equal per-request engine.generate (greedy); an interrupted run resumed gives the
same file as an uninterrupted one; bad lines; stop ids and strings; the README's command.
"""

import json
import os
import re
import shlex
import subprocess
import sys
import threading

import numpy as np
import pytest
from flax import nnx

from hydrax import _log, engine
from hydrax import generate as G
from hydrax.models import configs, llama
from hydrax.offline import requests as R

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = configs.LlamaConfig.from_preset("tiny")
PARAMS = nnx.split(llama.init(CONFIG, seed=0))[1]
RUN = dict(model=(CONFIG, PARAMS), memory_budget=1 << 30, min_shared_tokens=0, merge_cost=0,
           progress=False)


def _dataset(n=12, seed=0):
  """n requests of <= 16 tokens under 3 shared prefixes, arrival order shuffled."""
  rng = np.random.default_rng(seed)
  heads = [rng.integers(3, 256, 8).tolist() for _ in range(3)]
  return [dict(id=f"r{i}", tokens=heads[i % 3] + rng.integers(3, 256, 1 + i % 8).tolist())
          for i in rng.permutation(n)]


def _write(path, records):
  with open(path, "w") as f:
    f.write("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


def _read(path, drop_timings=True):
  out = [json.loads(x) for x in open(path)]
  for r in out:
    if drop_timings:
      r.pop("timings")
  return out


def _reference(tokens, max_new, stop_ids):
  """Per-request engine.generate, cut before the first eos / stop id."""
  gen = engine.generate(CONFIG, PARAMS, [np.asarray(tokens, np.int32)], max_new_tokens=max_new,
                        eos_id=CONFIG.eos_token_id)
  out = gen.tokens[0, :gen.lengths[0]].tolist()
  for i, t in enumerate(out):
    if t in stop_ids:
      return out[:i], "stop"
  return out, "length"


@pytest.mark.slow
def test_completions_equal_per_request_generate(tmp_path):
  reqs = _dataset()
  for i, r in enumerate(reqs):
    r["max_new_tokens"] = (3, 8)[i % 2]
  first = _reference(reqs[1]["tokens"], reqs[1]["max_new_tokens"], ())[0]
  reqs[1]["stop"] = [first[2]]             # a stop id the model produces at step 3
  path = _write(tmp_path / "p.jsonl", reqs)
  summary = G.run(path, str(tmp_path / "out.jsonl"), max_batch=4, **RUN)
  assert summary.ok and summary.completed == len(reqs) and summary.batches_run >= 3
  # One batch of all 12: its ragged suffixes are prefilled packed (batches of 4 and the
  # one-request reference are padded: the schedule's buckets keep at least 4 packed rows),
  # and the completions are the same.
  whole = G.run(path, str(tmp_path / "whole.jsonl"), max_batch=16, **RUN)
  assert whole.packed_batches == whole.batches_run == 1 and summary.packed_batches == 0
  assert whole.prefill_slots < whole.padded_slots
  by_id = lambda name: sorted(_read(tmp_path / name), key=lambda r: r["id"])
  assert by_id("whole.jsonl") == by_id("out.jsonl")
  got = {r["id"]: r for r in _read(tmp_path / "out.jsonl")}
  assert set(got) == {r["id"] for r in reqs}
  for r in reqs:
    stop_ids = {CONFIG.eos_token_id, *r.get("stop", [])}
    tokens, reason = _reference(r["tokens"], r["max_new_tokens"], stop_ids)
    rec = got[r["id"]]
    assert rec["tokens"] == tokens and rec["finish_reason"] == reason, (r, rec)
    assert rec["prompt_tokens"] == len(r["tokens"]) and rec["text"] is None
  assert got[reqs[1]["id"]]["finish_reason"] == "stop"
  assert got[reqs[1]["id"]]["stop"] == first[2]


class _Killed(Exception):
  pass


@pytest.mark.slow
def test_killed_and_resumed_equals_uninterrupted(tmp_path):
  reqs = _dataset(14, seed=1)
  for i in range(0, 14, 3):
    reqs[i].update(temperature=0.7, top_p=0.9)   # sampled rows: their own batches
  path = _write(tmp_path / "p.jsonl", reqs)
  full = tmp_path / "full.jsonl"
  s = G.run(path, str(full), max_batch=4, seed=3, **RUN)
  assert s.completed == 14 and s.batches_run >= 4

  cut = tmp_path / "cut.jsonl"

  def kill_after_two(index, records):
    kill_after_two.seen += 1
    if kill_after_two.seen == 2:
      raise _Killed
  kill_after_two.seen = 0
  with pytest.raises(_Killed):
    G.run(path, str(cut), max_batch=4, seed=3, on_batch=kill_after_two, **RUN)
  written = _read(cut)
  assert 0 < len(written) < 14
  with open(cut, "a") as f:                     # and a write cut short by the kill
    f.write('{"id": "r0", "text": nu')
  s = G.run(path, str(cut), max_batch=4, seed=3, **RUN)
  assert s.skipped == len(written) and s.completed == 14 - len(written)
  assert _read(cut) == _read(full)
  again = G.run(path, str(cut), max_batch=4, seed=3, **RUN)
  assert again.ok and again.completed == 0 and again.skipped == 14 and again.batches_run == 0


@pytest.mark.slow
def test_samples_draw_their_own_streams(tmp_path, monkeypatch, caplog):
  """n completions a prompt, each from its own random stream (seed, id hash, sample): the
  same completions whatever the batches (max_batch 3 vs 16, global vs arrival order), and
  resuming runs only the missing (id, sample)."""
  reqs = _dataset(6, seed=7)
  for i, r in enumerate(reqs):
    r.update(temperature=1.0, max_new_tokens=6)
    if i % 2:
      r["n"] = 3
  path = _write(tmp_path / "p.jsonl", reqs)
  small = G.run(path, str(tmp_path / "small.jsonl"), max_batch=3, seed=5, n=2, **RUN)
  assert (small.requests, small.completions, small.completed) == (6, 15, 15)
  assert small.batches_run >= 5
  big = G.run(path, str(tmp_path / "big.jsonl"), max_batch=16, seed=5, n=2,
              strategy="arrival", **RUN)
  assert big.batches_run == 1
  key = lambda r: (r["id"], r["sample"])
  got = sorted(_read(tmp_path / "small.jsonl"), key=key)
  assert [key(r) for r in got] == sorted((r["id"], k) for r in reqs
                                         for k in range(r.get("n", 2)))
  assert got == sorted(_read(tmp_path / "big.jsonl"), key=key)
  # A prompt's samples differ; each is engine.generate's row of its prompt alone with its
  # row seed (id hash, sample).
  for r in reqs[:2]:
    mine = [g["tokens"] for g in got if g["id"] == r["id"]]
    assert len({tuple(t) for t in mine}) == len(mine) > 1
    for k, tokens in enumerate(mine):
      alone = engine.generate(CONFIG, PARAMS, [np.asarray(r["tokens"], np.int32)],
                              max_new_tokens=6, temperature=1.0, seed=5,
                              eos_id=CONFIG.eos_token_id,
                              row_seeds=[[G.id_hash(r["id"]), k]])
      want = alone.tokens[0, :alone.lengths[0]].tolist()
      eos = CONFIG.eos_token_id
      assert (want[:want.index(eos)] if eos in want else want) == tokens
  other = G.run(path, str(tmp_path / "other.jsonl"), max_batch=16, seed=6, n=2, **RUN)
  assert sorted(_read(tmp_path / "other.jsonl"), key=key) != got
  # Resuming: the completions missing from the file run again, and come out the same.
  out = tmp_path / "small.jsonl"
  lines = out.read_text().splitlines(keepends=True)
  kept = [x for x in lines if key(json.loads(x)) not in {(reqs[1]["id"], 2), (reqs[0]["id"], 0)}]
  out.write_text("".join(kept))
  again = G.run(path, str(out), max_batch=3, seed=5, n=2, **RUN)
  assert (again.skipped, again.completed) == (13, 2)
  assert sorted(_read(out), key=key) == got
  # n > 1 greedy: n equal completions, logged once; a bad n is refused.
  monkeypatch.setattr(_log, "_seen", set())
  plain = [dict(r, temperature=0.0) for r in reqs]
  with caplog.at_level("WARNING", logger="hydrax"):
    greedy = G.run(_write(tmp_path / "g.jsonl", plain), str(tmp_path / "greedy.jsonl"),
                   max_batch=16, n=2, **RUN)
  assert greedy.completed == 15
  assert "6 request(s) ask for n > 1 greedy completions" in caplog.text
  for r in reqs:
    mine = {tuple(g["tokens"]) for g in _read(tmp_path / "greedy.jsonl") if g["id"] == r["id"]}
    assert len(mine) == 1
  for bad in (0, 1.5, True):
    with pytest.raises(ValueError, match=f"n must be an int >= 1, got {bad!r}"):
      G.run(path, str(tmp_path / "bad.jsonl"), n=bad, **RUN)


def test_a_requests_seed_is_its_stream(tmp_path):
  """A request's `seed` replaces its id's hash in its row seeds: requests with one seed and
  prompt draw the same completions whatever their ids, each engine.generate's row of the
  prompt alone with row seed (seed, sample); without a seed, the id's stream."""
  prompt = _dataset(1, seed=9)[0]["tokens"]
  reqs = [dict(id="a", tokens=prompt, seed=77, n=2), dict(id="b", tokens=prompt, seed=77, n=2),
          dict(id="c", tokens=prompt, n=2)]
  path = _write(tmp_path / "p.jsonl", reqs)
  G.run(path, str(tmp_path / "out.jsonl"), temperature=1.0, max_new_tokens=6, seed=3, **RUN)
  got = {(r["id"], r["sample"]): r["tokens"] for r in _read(tmp_path / "out.jsonl")}
  for k in range(2):
    assert got["a", k] == got["b", k]
    for rid, stream in (("a", 77), ("c", G.id_hash("c"))):
      alone = engine.generate(CONFIG, PARAMS, [np.asarray(prompt, np.int32)], max_new_tokens=6,
                              temperature=1.0, seed=3, eos_id=CONFIG.eos_token_id,
                              row_seeds=[[stream, k]])
      want = alone.tokens[0, :alone.lengths[0]].tolist()
      eos = CONFIG.eos_token_id
      assert (want[:want.index(eos)] if eos in want else want) == got[rid, k], (rid, k)
  assert got["a", 0] != got["a", 1] and got["a", 0] != got["c", 0]


def test_logprobs_in_records(tmp_path):
  reqs = _dataset(4, seed=8)
  reqs[0].update(temperature=1.0)
  path = _write(tmp_path / "p.jsonl", reqs)
  s = G.run(path, str(tmp_path / "out.jsonl"), max_new_tokens=5, logprobs=True, seed=1, **RUN)
  assert s.completed == 4
  for rec, r in zip(sorted(_read(tmp_path / "out.jsonl"), key=lambda x: x["id"]),
                    sorted(reqs, key=lambda x: x["id"])):
    assert len(rec["logprobs"]) == len(rec["tokens"]) and max(rec["logprobs"]) <= 0
    alone = engine.generate(CONFIG, PARAMS, [np.asarray(r["tokens"], np.int32)],
                            max_new_tokens=5, eos_id=CONFIG.eos_token_id, logprobs=True,
                            seed=1, temperature=r.get("temperature", 0.0),
                            row_seeds=[[G.id_hash(r["id"]), 0]])
    assert alone.tokens[0, :len(rec["tokens"])].tolist() == rec["tokens"]
    np.testing.assert_allclose(rec["logprobs"], alone.logprobs[0, :len(rec["tokens"])],
                               rtol=1e-4, atol=1e-4)
  plain = G.run(path, str(tmp_path / "plain.jsonl"), max_new_tokens=5, seed=1, **RUN)
  assert plain.completed == 4 and all("logprobs" not in r for r in _read(tmp_path /
                                                                         "plain.jsonl"))


@pytest.mark.slow
def test_scored_requests_equal_engine_score(tmp_path):
  """`continuation` requests: log p(continuation | prompt) per token and summed, and greedy,
  as engine.score gives them, beside generation requests in the same file (batches of their
  own, compiled ahead), and resumed."""
  rng = np.random.default_rng(9)
  header = rng.integers(3, 256, 12).tolist()              # a few-shot header shared by all
  reqs, pairs = [], []
  for q in range(4):
    question = header + rng.integers(3, 256, 3 + q).tolist()
    greedy = engine.generate(CONFIG, PARAMS, [np.asarray(question, np.int32)],
                             max_new_tokens=2).tokens[0].tolist()
    choices = [greedy] + [rng.integers(3, 256, 1 + c).tolist() for c in (1, 2)]
    for c, cont in enumerate(choices):
      reqs.append(dict(id=f"q{q}c{c}", tokens=question, continuation=cont))
      pairs.append((question, cont))
  reqs.append(dict(id="gen", tokens=header + [5], max_new_tokens=3))
  path = _write(tmp_path / "p.jsonl", reqs)
  out = tmp_path / "out.jsonl"
  s = G.run(path, str(out), max_batch=4, **RUN)
  assert s.completed == 13 and s.batches_run >= 4
  want = engine.score(CONFIG, PARAMS, [np.asarray(q, np.int32) for q, _ in pairs],
                      [c for _, c in pairs], sharing_options=dict(min_shared_tokens=0))
  got = {r["id"]: r for r in _read(out)}
  for i, r in enumerate(reqs[:-1]):
    rec = got[r["id"]]
    assert rec["finish_reason"] == "scored" and rec["tokens"] == r["continuation"]
    n = len(r["continuation"])
    np.testing.assert_allclose(rec["logprobs"], want.logprobs[i, :n], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(rec["logprob"], want.total[i], rtol=1e-4, atol=1e-4)
    assert rec["greedy"] == want.greedy[i] == (i % 3 == 0), r["id"]
  assert got["gen"]["finish_reason"] == "length" and len(got["gen"]["tokens"]) == 3
  # Taken in the prefill (the default: no decode step) or through the decode loop: the same
  # records up to float rounding.
  scored = [r for r in _read(out, drop_timings=False) if "logprob" in r]
  assert scored and all(r["timings"]["decode_s"] == 0 for r in scored)
  dec = G.run(path, str(tmp_path / "dec.jsonl"), max_batch=4, score_method="decode", **RUN)
  assert dec.completed == 13
  scored = [r for r in _read(tmp_path / "dec.jsonl", drop_timings=False) if "logprob" in r]
  assert any(r["timings"]["decode_s"] > 0 for r in scored)
  for rec in _read(tmp_path / "dec.jsonl"):
    mine = got[rec["id"]]
    assert rec["tokens"] == mine["tokens"] and rec.get("greedy") == mine.get("greedy")
    if "logprob" in rec:
      np.testing.assert_allclose(rec["logprobs"], mine["logprobs"], rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="score_method must be one of .*, got 'loop'"):
    G.run(path, str(tmp_path / "bad.jsonl"), score_method="loop", **RUN)
  lines = out.read_text().splitlines(keepends=True)
  out.write_text("".join(x for x in lines if json.loads(x)["id"] != "q2c1"))
  again = G.run(path, str(out), max_batch=4, **RUN)
  assert (again.skipped, again.completed) == (12, 1)
  # The record run again (its batch without the finished rows: other shapes, so up to float
  # rounding).
  resumed = {r["id"]: r for r in _read(out)}
  assert resumed.keys() == got.keys()
  for rid, rec in resumed.items():
    want = got[rid]
    if rid != "q2c1":
      assert rec == want
    else:
      np.testing.assert_allclose(rec.pop("logprobs"), want["logprobs"], rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(rec.pop("logprob"), want["logprob"], rtol=1e-5, atol=1e-5)
      assert rec == {k: v for k, v in want.items() if k not in ("logprobs", "logprob")}


def test_bad_lines_error_or_skip(tmp_path):
  good = _dataset(3)
  lines = [json.dumps(good[0]), "{oops", json.dumps(dict(id="big", tokens=[1, 999])),
           json.dumps(good[1]), json.dumps(dict(id="x", prompt="text without tokenizer"))]
  path = tmp_path / "p.jsonl"
  path.write_text("\n".join(lines) + "\n")
  out = tmp_path / "out.jsonl"
  with pytest.raises(R.BadInput, match="line 2") as e:
    G.run(str(path), str(out), max_new_tokens=4, max_batch=4, **RUN)
  assert [b.line for b in e.value.bad_lines] == [2]
  assert not out.exists() or out.read_text() == ""
  s = G.run(str(path), str(out), max_new_tokens=4, max_batch=4, on_bad_line="skip", **RUN)
  assert [b.line for b in s.bad_lines] == [2, 3, 5]
  assert "outside the vocabulary" in s.bad_lines[1].message
  assert s.ok and sorted(r["id"] for r in _read(out)) == sorted([good[0]["id"], good[1]["id"]])


def test_everything_failed_exits_nonzero(tmp_path, capsys):
  path = tmp_path / "p.jsonl"
  path.write_text('{"id": 1}\n{"tokens": []}\n')
  args = ["--preset", "tiny", "--prompts", str(path), "--out", str(tmp_path / "o.jsonl"),
          "--quiet"]
  assert G.main(args + ["--on_bad_line", "skip"]) == 1
  assert G.main(args) == 2
  with pytest.raises(ValueError, match=r"prefill must be one of \['auto', 'packed', "):
    G.run(str(path), str(tmp_path / "o.jsonl"), prefill="packd", **RUN)
  err = capsys.readouterr().err
  assert "line 1" in err and "line 2" in err


def test_stop_strings_trim_text_and_tokens():
  tok = G.train_tokenizer(["the cat sat on the mat", "a dog ran"] * 5, vocab_size=300)
  ids = tok.encode("the cat sat on the mat", add_special_tokens=False).ids
  tokens, text, reason, stop = G.finish(np.asarray(ids), max_new_tokens=50, stop_ids=set(),
                                        stop_strings=("on the", "zebra"), tokenizer=tok)
  assert (text, reason, stop) == ("the cat sat ", "stop", "on the")
  assert "on the" in tok.decode(tokens) and "on the" not in tok.decode(tokens[:-1])
  tokens, text, reason, stop = G.finish(np.asarray(ids), max_new_tokens=2, stop_ids=set(),
                                        stop_strings=("mat",), tokenizer=tok)
  assert (tokens, reason, stop) == (ids[:2], "length", None)
  assert text == tok.decode(ids[:2])


@pytest.mark.slow
def test_a_document_over_several_batches_is_prefilled_once(tmp_path):
  # 20 questions on one 120-token document, 8 a batch: 3 batches, run back to back; the
  # second and third take the document's keys and values from the one before.
  rng = np.random.default_rng(3)
  doc = rng.integers(3, 256, 120).tolist()
  reqs = [dict(id=f"q{i}", tokens=doc + rng.integers(3, 256, 1 + i % 7).tolist(),
               max_new_tokens=4) for i in range(20)]
  path = _write(tmp_path / "doc.jsonl", reqs)
  kept = G.run(path, str(tmp_path / "kept.jsonl"), max_batch=8, **RUN)
  own = G.run(path, str(tmp_path / "own.jsonl"), max_batch=8, keep_nodes=False, **RUN)
  assert kept.batches_run == own.batches_run == 3
  assert kept.schedule.reprefill_tokens == 2 * len(doc)
  assert kept.reused_tokens == 2 * len(doc) and own.reused_tokens == 0
  by_id = lambda name: sorted(_read(tmp_path / name), key=lambda r: r["id"])
  assert by_id("kept.jsonl") == by_id("own.jsonl")


@pytest.mark.slow
def test_compiling_ahead_gives_the_same_file(tmp_path, monkeypatch, caplog):
  reqs = _dataset(12, seed=5)
  path = _write(tmp_path / "p.jsonl", reqs)
  engine.clear_compiled_cache()
  plain = G.run(path, str(tmp_path / "plain.jsonl"), max_batch=4, compile_ahead=False,
                 **RUN)
  engine.clear_compiled_cache()
  planned = []
  real = engine.compile_jobs
  monkeypatch.setattr(engine, "compile_jobs", lambda *a, **kw: planned.append(1) or real(*a, **kw))
  ahead = G.run(path, str(tmp_path / "ahead.jsonl"), max_batch=4, compile_ahead=True, **RUN)
  # (seconds may be 0: the main thread can compile a program before its job runs; the jobs
  # were planned either way)
  assert plain.ahead_compile_seconds == 0 <= ahead.ahead_compile_seconds and planned
  by_id = lambda name: sorted(_read(tmp_path / name), key=lambda r: r["id"])
  assert by_id("ahead.jsonl") == by_id("plain.jsonl")
  # A failure, planning a batch or in a compile job, is logged once; the batches compile
  # their own programs.
  def planted(*args, **kwargs):
    raise RuntimeError("planted")
  jobs = engine.compile_jobs
  for name, broken in (("plan", planted), ("job", lambda *a, **k: jobs(*a, **k)._replace(
      prefill=planted, decode=planted))):
    monkeypatch.setattr(engine, "compile_jobs", broken)
    monkeypatch.setattr(_log, "_seen", set())
    engine.clear_compiled_cache()
    caplog.clear()
    with caplog.at_level("WARNING", logger="hydrax"):
      failed = G.run(path, str(tmp_path / f"failed_{name}.jsonl"), max_batch=4,
                     compile_ahead=True, **RUN)
    assert failed.ok and failed.ahead_compile_seconds == 0 and failed.compiles > 0, name
    assert re.search(r"compiling ahead stopped at batch \d \(RuntimeError: planted\)",
                     caplog.text), name
    assert by_id(f"failed_{name}.jsonl") == by_id("plain.jsonl")


@pytest.mark.slow
def test_compiling_ahead_compiles_beside_the_first_prefill(tmp_path, monkeypatch):
  # 24 questions on one document, 8 a batch: a chain of 3 batches that hand the document's
  # levels on, so batch 1's prefill (laid into kept levels) and decode are programs of their
  # own. While batch 0's prefill compiles, compiling ahead compiles batch 0's decode and batch
  # 1's prefill beside it: the first three compiles run at once (each waits, at most 60 s,
  # until three have started). The main thread compiles batch 0's prefill and nothing else;
  # every program compiles once; the file is the one without compiling ahead.
  rng = np.random.default_rng(3)
  doc = rng.integers(3, 256, 120).tolist()
  reqs = [dict(id=f"q{i}", tokens=doc + rng.integers(3, 256, 1 + i % 7).tolist(),
               max_new_tokens=4) for i in range(24)]
  path = _write(tmp_path / "doc.jsonl", reqs)
  main = threading.current_thread()
  three = threading.Barrier(3, timeout=60)
  guard, started, overlapped, programs = threading.Lock(), [], [], []
  compile, put_program = engine._EXECUTABLES.compile, engine._EXECUTABLES.put_program

  def spy_compile(*args, **kwargs):
    with guard:
      started.append(threading.current_thread().name)
      first_three = len(started) <= 3
    if first_three:
      try:
        three.wait()
        overlapped.append(True)
      except threading.BrokenBarrierError:
        overlapped.append(False)
    return compile(*args, **kwargs)

  def spy_put_program(table, key, program):
    with guard:
      programs.append((threading.current_thread() is main, table, key))
    return put_program(table, key, program)

  monkeypatch.setattr(engine._EXECUTABLES, "put_program", spy_put_program)
  engine.clear_compiled_cache()
  plain = G.run(path, str(tmp_path / "plain.jsonl"), max_batch=8, compile_ahead=False,
                 **RUN)
  assert plain.batches_run == 3 and plain.reused_tokens == 2 * len(doc)
  # Without compiling ahead the decode loops still compile beside the prefills (engine).
  assert [p[1] for p in programs if p[0]] == ["prefills"] * 2, programs
  assert [p[1] for p in programs if not p[0]] == ["decodes"] * 2, programs
  first_prefill = next(p for p in programs if p[0])
  programs.clear()
  monkeypatch.setattr(engine._EXECUTABLES, "compile", spy_compile)
  engine.clear_compiled_cache()
  ahead = G.run(path, str(tmp_path / "ahead.jsonl"), max_batch=8, compile_ahead=True, **RUN)
  assert ahead.batches_run == 3 and ahead.reused_tokens == 2 * len(doc)
  assert overlapped == [True] * 3, started
  assert [p for p in programs if p[0]] == [first_prefill], programs
  assert len(programs) == len({(table, key) for _, table, key in programs}) == 4, programs
  by_id = lambda name: sorted(_read(tmp_path / name), key=lambda r: r["id"])
  assert by_id("ahead.jsonl") == by_id("plain.jsonl")


@pytest.mark.slow
def test_compilations_bounded_as_the_dataset_grows(tmp_path):
  # The engine compiles once per signature, not per tree (tests/test_engine.py), so batches of
  # one signature share their executables.
  compiles = {}
  for n in (10, 200):
    path = _write(tmp_path / f"p{n}.jsonl", _dataset(n, seed=n))
    s = G.run(path, str(tmp_path / f"o{n}.jsonl"), max_new_tokens=4, max_batch=16, **RUN)
    assert s.completed == n
    compiles[n] = (s.compiles, s.batches_run, s.signatures)
  # 200 requests run in >= 13 batches; compilations follow the (few) signatures, not batches
  assert compiles[200][1] >= 13 and compiles[200][0] <= compiles[10][0] + 4, compiles


@pytest.mark.slow
def test_steps_between_checks_give_the_same_file(tmp_path, monkeypatch):
  # check_every = 3 (`engine.Runtime.check_every`) with lengths 1..7 a request, so batches end
  # inside an iteration: the same completions as 1. Compiling ahead builds the programs of the
  # same runtime: each program compiles once, and every one carries check_every = 3.
  reqs = [dict(r, max_new_tokens=1 + i % 7) for i, r in enumerate(_dataset(12, seed=4))]
  path = _write(tmp_path / "p.jsonl", reqs)
  engine.clear_compiled_cache()
  one = G.run(path, str(tmp_path / "one.jsonl"), max_batch=4, compile_ahead=False, **RUN)
  programs = []
  put_program = engine._EXECUTABLES.put_program

  def spy_put_program(table, key, program):
    programs.append((table, key))
    return put_program(table, key, program)

  monkeypatch.setattr(engine._EXECUTABLES, "put_program", spy_put_program)
  engine.clear_compiled_cache()
  three = G.run(path, str(tmp_path / "three.jsonl"), max_batch=4, compile_ahead=True,
                check_every=3, **RUN)
  assert one.ok and three.ok and three.batches_run == one.batches_run >= 3
  by_id = lambda name: sorted(_read(tmp_path / name), key=lambda r: r["id"])
  assert by_id("three.jsonl") == by_id("one.jsonl")
  assert {len(r["tokens"]) for r in by_id("one.jsonl")} - {0, 1} != set()
  runtimes = [[x for x in key if isinstance(x, engine.Runtime)] for _, key in programs]
  assert programs and len(programs) == len(set(programs)), programs
  assert all(len(r) == 1 and r[0].check_every == 3 for r in runtimes), runtimes


def _command_args(tmp_path) -> list:
  return ["--preset", "tiny", "--prompts", str(tmp_path / "p.jsonl"), "--out",
          str(tmp_path / "o.jsonl")]


def _what_run_gets(monkeypatch, tmp_path, name: str, *flag_lists) -> list:
  """The value of `run`'s keyword `name` as the command passes it with each list of flags
  (`run` replaced by a stand-in that records it and stops the command with exit code 2)."""
  seen = []

  def fake_run(*args, **kwargs):
    seen.append(kwargs[name])
    raise ValueError("stop here")
  monkeypatch.setattr(G, "run", fake_run)
  assert all(G.main(_command_args(tmp_path) + flags) == 2 for flags in flag_lists)
  return seen


def test_the_command_passes_check_every_and_names_a_bad_one(tmp_path, monkeypatch, capsys):
  assert G.main(_command_args(tmp_path) + ["--check_every", "0"]) == 2
  assert "check_every must be an int >= 1" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "o.jsonl")
  assert _what_run_gets(monkeypatch, tmp_path, "check_every", [], ["--check_every", "4"]) == \
      [1, 4]


def test_sampled_runs_give_the_same_file_with_either_nucleus(tmp_path, monkeypatch):
  # top_p's cutoff by the search (`engine.Runtime.nucleus`, traced into the programs: the
  # spy counts its traces) against the sort: the same completions.
  reqs = [dict(r, temperature=1.0, top_p=0.8, n=2) for r in _dataset(6, seed=9)]
  path = _write(tmp_path / "p.jsonl", reqs)
  traced = []
  cutoff = engine._nucleus_cutoff
  monkeypatch.setattr(engine, "_nucleus_cutoff", lambda *a: traced.append(1) or cutoff(*a))
  sort = G.run(path, str(tmp_path / "sort.jsonl"), max_new_tokens=4, max_batch=8, **RUN)
  assert not traced
  search = G.run(path, str(tmp_path / "search.jsonl"), max_new_tokens=4, max_batch=8,
                 nucleus="search", **RUN)
  assert traced
  assert sort.ok and search.ok and sort.completed == 12
  by_id = lambda name: sorted(_read(tmp_path / name), key=lambda r: (r["id"], r["sample"]))
  assert by_id("search.jsonl") == by_id("sort.jsonl")
  assert len({tuple(r["tokens"]) for r in by_id("sort.jsonl")}) > 6    # really sampled


def test_the_command_passes_nucleus(tmp_path, monkeypatch, capsys):
  with pytest.raises(SystemExit):
    G.main(_command_args(tmp_path) + ["--nucleus", "bisect"])
  assert "invalid choice: 'bisect'" in capsys.readouterr().err
  assert _what_run_gets(monkeypatch, tmp_path, "nucleus", [], ["--nucleus", "search"]) == \
      ["sort", "search"]


def test_the_command_compiles_ahead_unless_told_not_to(tmp_path, monkeypatch):
  assert _what_run_gets(monkeypatch, tmp_path, "compile_ahead", [], ["--no_compile_ahead"]) \
      == [True, False]


@pytest.mark.slow
def test_readme_example_runs(tmp_path):
  readme = open(os.path.join(ROOT, "README.md")).read()
  match = re.search(r"^ *(python -m hydrax\.generate .*)$", readme, re.M)
  assert match, "README.md has no `python -m hydrax.generate` command"
  args = shlex.split(match.group(1))[3:]
  out = str(tmp_path / "completions.jsonl")
  args[args.index("--out") + 1] = out
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, "-m", "hydrax.generate", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = _read(out, drop_timings=False)
  prompts = [json.loads(x) for x in open(os.path.join(ROOT, "experiments/data/prompts.jsonl"))]
  assert [r["id"] for r in records] != [] and {r["id"] for r in records} == \
      {p["id"] for p in prompts}
  for r in records:
    assert r["finish_reason"] in ("stop", "length") and isinstance(r["text"], str)
    assert {"batch", "prefill_s", "decode_s", "compile_s", "at_s"} <= set(r["timings"])
  assert "completions" in proc.stderr and "tokens/s" in proc.stderr
  summary = json.loads(proc.stderr.strip().splitlines()[-1])
  assert summary["ahead_compile_seconds"] > 0        # compiling ahead is the default


@pytest.mark.slow
def test_checkpoint_and_hf_directories_with_their_tokenizer(tmp_path):
  from hydrax import checkpoint
  from tests.test_checkpoint import _write_hf_dir
  texts = ["the cat sat on the mat", "the cat sat on a hat", "a dog ran far away"]
  tok = G.train_tokenizer(texts * 3, vocab_size=300)
  config = CONFIG.replace(vocab_size=tok.get_vocab_size())
  model = llama.init(config, seed=1)
  params = nnx.split(model)[1]
  ck = tmp_path / "ck"
  checkpoint.save(str(ck), config, params)
  hf = _write_hf_dir(str(tmp_path / "hf"), config, model, bos_token_id=1,
                     eos_token_id=[2, 7])
  for folder in (str(ck), hf):
    tok.save(os.path.join(folder, "tokenizer.json"))
  prompts = tmp_path / "p.txt"
  prompts.write_text("\n".join(texts) + "\n")
  options = dict(max_new_tokens=5, memory_budget=1 << 30, min_shared_tokens=0, merge_cost=0,
                 progress=False)
  G.run(str(prompts), str(tmp_path / "a.jsonl"), checkpoint=str(ck), **options)
  G.run(str(prompts), str(tmp_path / "b.jsonl"), hf_dir=hf, **options)
  a, b = _read(tmp_path / "a.jsonl"), _read(tmp_path / "b.jsonl")
  assert [r["id"] for r in a] and sorted(r["id"] for r in a) == ["1", "2", "3"]
  by_id = {r["id"]: r for r in b}
  for rec in a:
    ids = tok.encode(texts[int(rec["id"]) - 1]).ids
    assert ids[0] == 1 and rec["prompt_tokens"] == len(ids)       # BOS from the template
    ref = engine.generate(config, params, [np.asarray(ids, np.int32)], max_new_tokens=5,
                          eos_id=2)
    want = ref.tokens[0, :ref.lengths[0]].tolist()
    cut = want.index(2) if 2 in want else len(want)
    assert rec["tokens"] == want[:cut] and rec["text"] == tok.decode(want[:cut])
    other = by_id[rec["id"]]            # the HF directory also stops at its second EOS, 7
    stop7 = rec["tokens"].index(7) if 7 in rec["tokens"] else len(rec["tokens"])
    assert other["tokens"] == rec["tokens"][:stop7]
