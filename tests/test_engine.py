"""hydrax.engine: hydragen == replicated == a naive full-forward loop; eos, sampling, errors."""

import functools
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

from hydrax import engine
from hydrax.attention import backends
from hydrax.attention.kernels import pallas_gpu
from hydrax.models import LlamaConfig, llama


class PlanLevel(NamedTuple):   # the SharingPlan contract, built by hand
  tokens: np.ndarray
  lengths: np.ndarray
  owner: np.ndarray
  parent: np.ndarray
  start: np.ndarray


class Plan(NamedTuple):
  order: np.ndarray
  levels: tuple
  suffix_tokens: np.ndarray
  suffix_lengths: np.ndarray
  suffix_start: np.ndarray
  num_sequences: int
  sequences: list


def _hand_plan():
  """A 3-level tree over 6 sequences, in a plan order that permutes the input order.

  level 0: A (5 tokens) shared by all.  level 1: B1 (4) rows 0-2, B2 (3) rows 3-4, row 5 has
  no node (owns an empty one), plus a bucket-padding node.  level 2: C1 (2) rows 0-1, C2 (3)
  row 3, the others own an empty node.  Suffix lengths 3, 0, 0, 2, 1, 4: row 1 ends inside
  C1 (shared with row 0), row 2 ends inside B1.
  """
  rng = np.random.default_rng(0)
  seg = {name: rng.integers(1, 256, n).astype(np.int32)
         for name, n in (("A", 5), ("B1", 4), ("B2", 3), ("C1", 2), ("C2", 3))}
  l0 = PlanLevel(np.pad(seg["A"], (0, 3))[None], np.array([5], np.int32),
                 np.zeros(6, np.int32), np.array([-1], np.int32), np.array([0], np.int32))
  t1 = np.zeros((4, 4), np.int32)
  t1[0], t1[1, :3] = seg["B1"], seg["B2"]
  l1 = PlanLevel(t1, np.array([4, 3, 0, 0], np.int32), np.array([0, 0, 0, 1, 1, 2], np.int32),
                 np.array([0, 0, -1, -1], np.int32), np.array([5, 5, 0, 0], np.int32))
  t2 = np.zeros((4, 3), np.int32)
  t2[0, :2], t2[2] = seg["C1"], seg["C2"]
  l2 = PlanLevel(t2, np.array([2, 0, 3, 0], np.int32), np.array([0, 0, 1, 2, 1, 1], np.int32),
                 np.array([0, -1, 1, -1], np.int32), np.array([9, 0, 8, 0], np.int32))
  return _plan_from((l0, l1, l2), (3, 0, 0, 2, 1, 4), np.array([3, 0, 5, 1, 4, 2]), rng)


def _plan_from(levels, suffix_lengths, order, rng):
  """A Plan of these levels, random suffixes of these lengths, rows in input order `order`."""
  suffixes = [rng.integers(1, 256, n).astype(np.int32) for n in suffix_lengths]
  rows = []
  for i, suffix in enumerate(suffixes):
    parts = [lv.tokens[lv.owner[i], :lv.lengths[lv.owner[i]]] for lv in levels]
    rows.append(np.concatenate(parts + [suffix]))
  b = len(suffixes)
  inputs = [None] * b
  for i, o in enumerate(order):
    inputs[o] = rows[i]
  suffix_tokens = np.zeros((b, max(suffix_lengths)), np.int32)
  for i, s in enumerate(suffixes):
    suffix_tokens[i, :len(s)] = s
  lengths = np.array([len(s) for s in suffixes], np.int32)
  start = np.array([len(rows[i]) - lengths[i] for i in range(b)], np.int32)
  return Plan(order, levels, suffix_tokens, lengths, start, b, inputs)


def _greedy_reference(graphdef, params, prompts, steps):
  """Greedy tokens from repeated full forward passes (prompts right-padded: causal)."""
  apply = jax.jit(llama.apply, static_argnums=0)
  lens = np.array([len(p) for p in prompts])
  toks = np.zeros((len(prompts), lens.max() + steps), np.int32)
  for i, p in enumerate(prompts):
    toks[i, :len(p)] = p
  rows = np.arange(len(prompts))
  for _ in range(steps):
    logits = np.asarray(apply(graphdef, params, jnp.asarray(toks)))
    toks[rows, lens] = logits[rows, lens - 1].argmax(-1)
    lens = lens + 1
  return np.stack([toks[i, len(p):len(p) + steps] for i, p in enumerate(prompts)])


@pytest.fixture(scope="module")
def tiny():
  config = LlamaConfig.from_preset("tiny")
  model = llama.init(config, seed=0)
  graphdef, params = nnx.split(model)
  return config, model, graphdef, params


# The tests of `tree_runs` (two generations of the hand plan, ~15 s) run on one xdist worker.
TREE_RUNS = pytest.mark.xdist_group("test_engine.tree_runs")


@pytest.fixture(scope="module")
def tree_runs(tiny):
  _, model, graphdef, params = tiny
  plan = _hand_plan()
  hydragen = engine.generate(model, None, plan, max_new_tokens=6, attention="hydragen")
  # The plan's nodes are prefilled once and copied into every sequence's cache.
  replicated = engine.generate(graphdef, params, plan, max_new_tokens=6,
                               attention="replicated")
  return plan, hydragen, replicated


@TREE_RUNS
def test_three_level_tree_hydragen_equals_replicated_and_reference(tiny, tree_runs):
  config, _, graphdef, params = tiny
  plan, hydragen, replicated = tree_runs
  want = _greedy_reference(graphdef, params, plan.sequences, 6)
  np.testing.assert_array_equal(replicated.tokens, want)
  np.testing.assert_array_equal(hydragen.tokens, want)
  for g in (hydragen, replicated):
    assert g.tokens.shape == (6, 6) and g.tokens.dtype == np.int32
    np.testing.assert_array_equal(g.lengths, 6)
    assert g.decode_steps == 5 and g.num_generated == 36
    assert g.prefill_seconds > 0 and g.decode_seconds > 0
    # The decode loop produced 5 of each sequence's 6 tokens (the first comes from prefill).
    assert g.decode_tokens_per_second == pytest.approx(30 / g.decode_seconds)
    assert g.tokens_per_second == pytest.approx(36 / (g.prefill_seconds + g.decode_seconds))
  # KV bytes: each used node once, node counts bucketed (1, 3, 3 used nodes), capacities
  # bucketed to the 16-token floor; per-sequence caches of the longest suffix (4 -> 16) + 5
  # appended tokens -> 24; replicated: longest prompt (14 -> 16) + 5 -> 24.
  per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * 4
  assert hydragen.kv_bytes == per_token * (16 * (1 + 3 + 3) + 6 * 24)
  assert replicated.kv_bytes == per_token * 6 * 24
  for g in (hydragen, replicated):
    assert engine.estimate_kv_bytes(config, plan, max_new_tokens=6, attention=g.attention,
                                    dtype=jnp.float32) == g.kv_bytes


@TREE_RUNS
def test_pallas_small_shape_path_in_the_engine_equals_xla(tiny, tree_runs):
  """The pallas backend with its path kernel forced (decode steps: all three levels and the
  suffixes in one launch, stacked caches at a traced layer, runtime owners; Pallas interpret
  mode here) generates the XLA backend's tokens."""
  _, model, _, _ = tiny
  plan, hydragen, _ = tree_runs
  path = engine.generate(model, None, plan, max_new_tokens=6, attention="hydragen",
                         backend=backends.get("pallas", path="always"))
  np.testing.assert_array_equal(path.tokens, hydragen.tokens)


@TREE_RUNS
def test_sharing_plan_tree_and_plain_prompts(tiny, tree_runs):
  """hydrax.sharing's plan of the same prompts (full radix tree), and prompts that share
  nothing, give the replicated tokens."""
  sharing = pytest.importorskip("hydrax.sharing")
  _, model, _, _ = tiny
  plan, _, replicated = tree_runs
  radix = sharing.plan(plan.sequences, min_shared_tokens=0, merge_cost=0, buckets=None)
  assert len(radix.levels) == 3
  out = engine.generate(model, None, radix, max_new_tokens=6)
  np.testing.assert_array_equal(out.tokens, replicated.tokens)
  # Segments this short sit under the 16-token capacity floor, so sharing saves no bytes here.
  assert out.kv_bytes == engine.estimate_kv_bytes(model.config, radix, max_new_tokens=6,
                                                  dtype=jnp.float32)
  rng = np.random.default_rng(7)
  plain = [np.concatenate([[i + 1], rng.integers(0, 256, n)]) for i, n in enumerate((4, 9, 1))]
  a = engine.generate(model, None, plain, max_new_tokens=4, attention="hydragen")
  b = engine.generate(model, None, plain, max_new_tokens=4, attention="replicated")
  np.testing.assert_array_equal(a.tokens, b.tokens)


@TREE_RUNS
def test_eos_stops_sequences_and_pads(tiny, tree_runs):
  _, model, _, _ = tiny
  plan, _, replicated = tree_runs
  eos = int(replicated.tokens[0, 2])       # sequence 0 generates it at step 2
  out = engine.generate(model, None, plan, max_new_tokens=6, attention="replicated",
                        eos_id=eos, pad_id=255)
  for i in range(6):
    hits = np.flatnonzero(replicated.tokens[i] == eos)
    n = int(hits[0]) + 1 if hits.size else 6
    assert out.lengths[i] == n
    np.testing.assert_array_equal(out.tokens[i, :n], replicated.tokens[i, :n])
    assert np.all(out.tokens[i, n:] == 255)
  assert out.compile_seconds == 0.0        # eos and pad are inputs: executables reused
  # The loop runs until the last sequence is done.
  ends = [int(np.flatnonzero(r == eos)[0]) + 1 if eos in r else 6 for r in replicated.tokens]
  assert out.decode_steps == max(ends) - 1


def test_sample():
  logits = jnp.array([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 4.9]])
  key = jax.random.key(0)
  assert engine.sample(logits, key).tolist() == [1, 0]
  assert engine.sample(logits, key, temperature=5.0, top_k=1).tolist() == [1, 0]
  assert engine.sample(logits, key, temperature=5.0, top_p=1e-6).tolist() == [1, 0]
  keys = jax.random.split(key, 200)
  draws = np.asarray(jax.vmap(lambda k: engine.sample(logits, k, temperature=1.0, top_k=2))(
      keys))
  assert set(draws[:, 0]) == {1, 3} and set(draws[:, 1]) == {0, 3}
  # top_p=0.5 on row 1 (p ~ 0.52, 0.47, ...) keeps only the first token.
  draws = np.asarray(jax.vmap(lambda k: engine.sample(logits, k, temperature=1.0,
                                                      top_p=0.5))(keys))
  assert set(draws[:, 1]) == {0}
  uniform = np.asarray(jax.vmap(lambda k: engine.sample(jnp.zeros((1, 4)), k,
                                                        temperature=1.0))(keys))
  assert set(uniform[:, 0]) == {0, 1, 2, 3}
  with pytest.raises(ValueError, match="top_p"):
    engine.sample(logits, key, temperature=1.0, top_p=1.5)
  with pytest.raises(ValueError, match="temperature"):
    engine.sample(logits, key, temperature=-1.0)
  # One key a row: row i draws as it would alone with keys[i].
  wide = jnp.asarray(np.random.default_rng(0).standard_normal((3, 50)), jnp.float32)
  rows = jax.random.split(key, 3)
  got = engine.sample(wide, rows, temperature=1.0)
  want = [int(engine.sample(wide[i:i + 1], rows[i], temperature=1.0)[0]) for i in range(3)]
  assert got.tolist() == want
  assert got.tolist() != engine.sample(wide, key, temperature=1.0).tolist()
  with pytest.raises(ValueError, match=r"one a row \(3\), got keys of shape \(2,\)"):
    engine.sample(wide, rows[:2], temperature=1.0)


def _nucleus_reference(logits: np.ndarray, top_p: float) -> np.ndarray:
  """top_p's kept tokens in float64, one token at a time: those whose strictly more likely
  tokens hold less than top_p of the probability (ties kept together)."""
  with np.errstate(invalid="ignore"):
    p = np.exp(logits.astype(np.float64) - logits.max(-1, keepdims=True))
  p = np.nan_to_num(p) / np.nan_to_num(p).sum(-1, keepdims=True)
  above = np.stack([(p * (logits > logits[:, j:j + 1])).sum(-1)
                    for j in range(logits.shape[1])], -1)
  return above < top_p


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 4), vocab=st.integers(1, 200),
       scale=st.sampled_from([1e-3, 1.0, 8.0, 60.0]), decimals=st.sampled_from([None, 0, 1]),
       masked=st.floats(0.0, 0.9), top_p=st.sampled_from([1e-6, 0.05, 0.5, 0.9, 0.95, 0.999]),
       seed=st.integers(0, 2**31))
def test_nucleus_search_and_sort_keep_the_reference_tokens(rows, vocab, scale, decimals,
                                                           masked, top_p, seed):
  """top_p's search (8 passes, no sort) and its sort keep the float64 reference's tokens:
  ties (logits rounded), -inf (top_k's masked tokens), -0.0 beside +0.0, one-token
  vocabularies, scales from nearly uniform to nearly one-hot."""
  rng = np.random.default_rng(seed)
  logits = (rng.standard_normal((rows, vocab)) * scale).astype(np.float32)
  if decimals is not None:
    logits = np.round(logits, decimals)
    logits[logits == 0] = rng.choice([0.0, -0.0], size=int((logits == 0).sum()))
  logits[rng.random((rows, vocab)) < masked] = -np.inf
  logits[np.arange(rows), rng.integers(0, vocab, rows)] = 0.5    # one finite logit a row
  want = _nucleus_reference(logits, top_p)
  for nucleus in engine.NUCLEUS_METHODS:
    got = engine._nucleus_kept(jnp.asarray(logits), top_p, nucleus)
    np.testing.assert_array_equal(np.asarray(got), want, err_msg=nucleus)


def test_nucleus_methods_draw_the_same_tokens():
  rng = np.random.default_rng(3)
  logits = jnp.asarray(rng.standard_normal((6, 1000)) * 3, jnp.float32)
  keys = jax.random.split(jax.random.key(0), 6)
  for top_k, top_p in ((None, 0.9), (50, 0.5), (None, 0.999), (5, 1e-6)):
    kw = dict(temperature=0.7, top_k=top_k, top_p=top_p)
    np.testing.assert_array_equal(engine.sample(logits, keys, nucleus="search", **kw),
                                  engine.sample(logits, keys, **kw))
  draws = np.asarray(jax.vmap(lambda k: engine.sample(
      logits[:1], k, temperature=1.0, top_p=0.3, nucleus="search"))(
          jax.random.split(jax.random.key(1), 300)))
  assert set(draws[:, 0]) <= set(np.flatnonzero(_nucleus_reference(np.asarray(logits[:1]),
                                                                   0.3)[0]))
  with pytest.raises(ValueError,
                     match="nucleus must be one of \\['sort', 'search'\\], got 'bisect'"):
    engine.sample(logits, keys, temperature=1.0, top_p=0.5, nucleus="bisect")
  with pytest.raises(ValueError, match="nucleus must be one of .*got 'bisect'"):
    engine.Runtime.build("xla", nucleus="bisect")


def test_row_keys():
  one = engine.row_keys(7, [0, 1, 5])
  assert one.shape == (3, 2) and one.dtype == np.uint32
  np.testing.assert_array_equal(one, engine.row_keys(7, np.array([[0], [1], [5]])))
  want = jax.random.key_data(jax.random.fold_in(jax.random.key(7), 5))
  np.testing.assert_array_equal(one[2], np.asarray(want))
  two = engine.row_keys(7, [[5, 0], [5, 1]])        # words folded in turn
  want = jax.random.fold_in(jax.random.fold_in(jax.random.key(7), 5), 1)
  np.testing.assert_array_equal(two[1], np.asarray(jax.random.key_data(want)))
  assert len({tuple(k) for k in np.concatenate([one, two])}) == 5
  assert not np.array_equal(engine.row_keys(8, [0, 1, 5]), one)
  assert engine.row_keys(0, [2**32 - 1]).shape == (1, 2)
  for bad in ([-1], [2**32], [0.5], [[[1]]], np.zeros((2, 0), np.int32)):
    with pytest.raises(ValueError, match="row_seeds must be ints in"):
      engine.row_keys(0, bad)


@TREE_RUNS
def test_sampled_generation_is_reproducible(tiny, tree_runs):
  _, model, _, _ = tiny
  plan, _, _ = tree_runs
  kwargs = dict(max_new_tokens=5, attention="replicated", temperature=1.0, top_k=50,
                top_p=0.95)
  a = engine.generate(model, None, plan.sequences, seed=1, **kwargs)
  b = engine.generate(model, None, plan.sequences, seed=1, **kwargs)
  c = engine.generate(model, None, plan.sequences, seed=2, **kwargs)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert b.compile_seconds == 0.0          # executables reused
  assert not np.array_equal(a.tokens, c.tokens)
  # top_p's cutoff searched instead of sorted (`Runtime.nucleus`): other programs, the same
  # tokens.
  d = engine.generate(model, None, plan.sequences, seed=1,
                      runtime=engine.Runtime.build(nucleus="search"), **kwargs)
  assert d.compile_seconds > 0.0
  np.testing.assert_array_equal(a.tokens, d.tokens)


@TREE_RUNS
def test_each_row_samples_from_its_own_keys(tiny, tree_runs):
  """A row's sampled tokens depend on its prompt, the seed and its row seed only: the same
  in reverse input order (another plan row order), alone, and with check_every 3."""
  _, model, _, _ = tiny
  plan, _, _ = tree_runs
  seqs = plan.sequences
  kwargs = dict(max_new_tokens=5, temperature=1.0, seed=4)
  a = engine.generate(model, None, seqs, **kwargs)
  assert len({tuple(t) for t in a.tokens}) > 1
  back = engine.generate(model, None, seqs[::-1], row_seeds=np.arange(len(seqs))[::-1],
                         **kwargs)
  np.testing.assert_array_equal(back.tokens[::-1], a.tokens)
  alone = engine.generate(model, None, [seqs[2]], row_seeds=[2], **kwargs)
  np.testing.assert_array_equal(alone.tokens[0], a.tokens[2])
  checks = engine.generate(model, None, seqs, runtime=engine.Runtime.build(check_every=3),
                           **kwargs)
  np.testing.assert_array_equal(checks.tokens, a.tokens)
  words = engine.generate(model, None, seqs, row_seeds=[[i, 0] for i in range(len(seqs))],
                          **kwargs)
  assert words.compile_seconds == 0.0      # the keys are data: W words compile nothing new
  assert not np.array_equal(words.tokens, a.tokens)
  with pytest.raises(ValueError, match=f"one seed a prompt \\({len(seqs)}\\), got 2"):
    engine.generate(model, None, seqs, row_seeds=[0, 1], **kwargs)

  # Token i of row b is drawn with key(seed) folded with b's row seed, then with i: checked
  # against the model's full forward pass over the prompt and the tokens drawn.
  graphdef, params = nnx.split(model)
  for b in (0, 3):
    full = np.concatenate([seqs[b], a.tokens[b]]).astype(np.int32)
    logits = np.asarray(llama.apply(graphdef, params, jnp.asarray(full[None])))[0]
    row = jax.random.wrap_key_data(engine.row_keys(4, [b])[0])
    for i in range(5):
      want = jax.random.categorical(jax.random.fold_in(row, i), logits[len(seqs[b]) - 1 + i])
      assert a.tokens[b, i] == int(want), (b, i)


@TREE_RUNS
def test_logprobs_are_the_models(tiny, tree_runs):
  """logprobs=True: each generated token's log-softmax under the full forward pass (float32),
  NaN past a row's end; the same tokens as without; one token (no decode loop) too."""
  _, model, graphdef, params = tiny
  plan, hydragen, _ = tree_runs
  seqs = plan.sequences
  eos = int(hydragen.tokens[1, 2])           # row 1 ends after 3 tokens
  greedy = None
  for kwargs in (dict(), dict(temperature=0.7, top_k=20, seed=2)):
    plain = engine.generate(model, None, plan, max_new_tokens=6, eos_id=eos, **kwargs)
    got = engine.generate(model, None, plan, max_new_tokens=6, eos_id=eos, logprobs=True,
                          **kwargs)
    assert plain.logprobs is None and got.logprobs.shape == (len(seqs), 6)
    np.testing.assert_array_equal(got.tokens, plain.tokens)
    for b in range(len(seqs)):
      n = got.lengths[b]
      full = np.concatenate([seqs[b], got.tokens[b, :n]]).astype(np.int32)
      logits = llama.apply(graphdef, params, jnp.asarray(full[None]))[0]
      at = len(seqs[b]) - 1 + np.arange(n)
      want = jax.nn.log_softmax(logits[at], axis=-1)[np.arange(n), got.tokens[b, :n]]
      np.testing.assert_allclose(got.logprobs[b, :n], want, rtol=1e-4, atol=1e-4)
      assert np.isnan(got.logprobs[b, n:]).all()
    greedy = greedy or got
  assert greedy.lengths[1] == 3 and np.all(greedy.logprobs[:, :3] <= 0)
  one = engine.generate(model, None, plan, max_new_tokens=1, logprobs=True)
  np.testing.assert_allclose(one.logprobs[:, 0], greedy.logprobs[:, 0], rtol=1e-5)


@TREE_RUNS
def test_score_is_the_models_continuation_logprob(tiny, tree_runs):
  """score: each continuation token's log-softmax under the full forward pass over prompt +
  continuation (float32), its sum, and whether greedy decoding gives it; hydragen (the plan's
  shared levels) and replicated agree; no recompile for new continuations of the same width."""
  _, model, graphdef, params = tiny
  plan, hydragen, _ = tree_runs
  seqs = plan.sequences
  rng = np.random.default_rng(3)
  conts = [rng.integers(3, 256, b % 5).tolist() for b in range(len(seqs))]
  conts[1] = hydragen.tokens[1, :4].tolist()          # the greedy continuation
  conts[4] = hydragen.tokens[4, :3].tolist()[:2] + [int(hydragen.tokens[4, 2]) ^ 1]
  got = engine.score(model, None, plan, conts)
  assert got.logprobs.shape == (len(seqs), 4)
  for b, c in enumerate(conts):
    assert got.lengths[b] == len(c)
    if not c:
      assert got.total[b] == 0.0 and got.greedy[b] and np.isnan(got.logprobs[b]).all()
      continue
    full = np.concatenate([seqs[b], c]).astype(np.int32)
    logits = llama.apply(graphdef, params, jnp.asarray(full[None]))[0]
    at = len(seqs[b]) - 1 + np.arange(len(c))
    want = np.asarray(jax.nn.log_softmax(logits[at], axis=-1))[np.arange(len(c)), c]
    np.testing.assert_allclose(got.logprobs[b, :len(c)], want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got.total[b], want.sum(), rtol=1e-4, atol=1e-4)
    assert np.isnan(got.logprobs[b, len(c):]).all()
    argmax = np.asarray(logits[at]).argmax(-1)
    assert got.greedy[b] == bool(np.all(argmax == c)), b
  assert got.greedy[1] and not got.greedy[4]
  rep = engine.score(model, None, plan, conts, attention="replicated")
  np.testing.assert_allclose(rep.logprobs, got.logprobs, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(rep.greedy, got.greedy)
  # The continuations through the decode loop: the same scores, a step a token.
  dec = engine.score(model, None, plan, conts, method="decode")
  np.testing.assert_allclose(dec.logprobs, got.logprobs, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(dec.greedy, got.greedy)
  np.testing.assert_array_equal(dec.lengths, got.lengths)
  # (the longest continuation's steps, then all stop)
  assert got.generation.decode_steps == 0 and dec.generation.decode_steps == 3
  with pytest.raises(ValueError, match="method must be one of .*, got 'fast'"):
    engine.score(model, None, plan, conts, method="fast")
  other = engine.score(model, None, plan, [list(reversed(c)) for c in conts])
  assert other.generation.compile_seconds == 0.0    # forced tokens are inputs
  for bad, match in ((dict(max_new_tokens=3), r"score sets \['max_new_tokens'\]"),
                     (dict(temperature=1.0, eos_id=2), r"\['eos_id', 'temperature'\]"),
                     (dict(forced_in="prefill"), r"\['forced_in'\]")):
    with pytest.raises(ValueError, match=match):
      engine.score(model, None, plan, conts, **bad)
  with pytest.raises(ValueError, match="continuations must be token ids"):
    engine.score(model, None, plan, ["a b"] * len(seqs))
  with pytest.raises(ValueError, match=f"continuations must give one token sequence a prompt "
                                       f"\\({len(seqs)}\\), got 1"):
    engine.score(model, None, plan, conts[:1])


@TREE_RUNS
def test_forced_tokens_then_drawn(tiny, tree_runs):
  """forced=: a row's first tokens are its forced ones, then it draws (from where they
  left it); drawn says what the sampler chose at each position; bad forced tokens."""
  _, model, _, _ = tiny
  plan, hydragen, _ = tree_runs
  seqs = plan.sequences
  forced = [[5, 6], [], [7], [8, 9, 10], [11], [12, 13]][:len(seqs)]
  got = engine.generate(model, None, plan, max_new_tokens=6, forced=forced)
  for b, f in enumerate(forced):
    assert got.tokens[b, :len(f)].tolist() == f
    want = engine.generate(model, None, [np.concatenate([seqs[b], f]).astype(np.int32)],
                           max_new_tokens=6 - len(f)).tokens[0] if len(f) < 6 else []
    assert got.tokens[b, len(f):].tolist() == list(want), b
  np.testing.assert_array_equal(got.tokens[1], hydragen.tokens[1])     # nothing forced
  # What the sampler drew at column 0 is the prompt's greedy first token, forced or not.
  np.testing.assert_array_equal(got.drawn[:, 0], hydragen.tokens[:, 0])
  for b, f in enumerate(forced):           # past the forced ones, the drawn are the taken
    np.testing.assert_array_equal(got.drawn[b, len(f):], got.tokens[b, len(f):])
  assert got.logprobs is None and hydragen.drawn is None
  # stop_after_forced: a row ends with its last forced token (one with none, with its first
  # token), and the loop with the longest.
  stop = engine.generate(model, None, plan, max_new_tokens=6, forced=forced,
                         stop_after_forced=True)
  np.testing.assert_array_equal(stop.lengths, [max(len(f), 1) for f in forced])
  assert stop.decode_steps == max(len(f) for f in forced) - 1
  for b, f in enumerate(forced):
    n = max(len(f), 1)
    np.testing.assert_array_equal(stop.tokens[b, :n], got.tokens[b, :n])
    assert (stop.tokens[b, n:] == 0).all() and (stop.drawn[b, n:] == -1).all()
  gen = lambda f, **kw: engine.generate(model, None, plan, max_new_tokens=3, forced=f, **kw)
  with pytest.raises(ValueError, match="stop_after_forced=True needs forced= tokens"):
    engine.generate(model, None, plan, max_new_tokens=3, stop_after_forced=True)
  with pytest.raises(ValueError, match=f"one token sequence a prompt \\({len(seqs)}\\), got 1"):
    gen([[1]])
  with pytest.raises(ValueError, match=r"forced\[0\] has 4 tokens, more than max_new_tokens=3"):
    gen([[1, 2, 3, 4]] + [[]] * (len(seqs) - 1))
  with pytest.raises(ValueError, match=r"forced\[1\] holds ids outside the vocabulary"):
    gen([[]] + [[256]] + [[]] * (len(seqs) - 2))
  with pytest.raises(ValueError, match=r"forced\[0\] must be a list of token ids"):
    gen([[0.5]] + [[]] * (len(seqs) - 1))


@pytest.mark.parametrize("prefill", ["padded", "packed"])
def test_forced_tokens_taken_in_the_prefill(tiny, prefill):
  """forced_in="prefill" (stop_after_forced): every column from one prefill pass over the
  suffixes with their forced tokens, equal to the decode loop's forcing: tokens, lengths,
  drawn, log-probabilities; rows whose prompt ends inside a shared node (their first column
  from the node's last token), rows with no forced token (they draw their first, with their
  own keys), a forced EOS ending its row; hydragen and replicated; bad arguments."""
  _, model, _, _ = tiny
  plan = _hand_plan()
  seqs = plan.sequences
  forced = [[5, 6, 7], [9], [], [8, 9, 10, 11], [12, 2, 13], [14, 15]][:len(seqs)]
  for attention, options in (("hydragen", dict(temperature=1.0, seed=4)),
                             ("replicated", dict(eos_id=2))):
    run = lambda where: engine.generate(
        model, None, plan, max_new_tokens=5, forced=forced, stop_after_forced=True,
        logprobs=True, forced_in=where, prefill=prefill, attention=attention, pad_id=1,
        **options)
    dec, pre = run("decode"), run("prefill")
    assert pre.prefill == prefill and pre.decode_steps == 0 and dec.decode_steps > 0
    np.testing.assert_array_equal(pre.tokens, dec.tokens)
    np.testing.assert_array_equal(pre.lengths, dec.lengths)
    np.testing.assert_array_equal(pre.drawn, dec.drawn)
    np.testing.assert_allclose(pre.logprobs, dec.logprobs, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.isnan(pre.logprobs), np.isnan(dec.logprobs))
    if "eos_id" in options:     # row 4's forced EOS ends it there
      assert pre.lengths[4] == 2 and (pre.tokens[4, 2:] == 1).all()
  with pytest.raises(ValueError, match="forced_in must be one of .*, got 'loop'"):
    engine.generate(model, None, plan, max_new_tokens=5, forced=forced, forced_in="loop")
  with pytest.raises(ValueError, match="forced_in='prefill' .* needs forced= tokens and "
                                       "stop_after_forced=True"):
    engine.generate(model, None, plan, max_new_tokens=5, forced=forced, forced_in="prefill")


def test_no_attention_mode_and_tokenizer(tiny, tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  _, model, _, _ = tiny
  vocab = {f"w{i}": i for i in range(256)}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  out = engine.generate(model, None, ["w1 w2 w3", "w4 w5"], max_new_tokens=3,
                        attention="none", tokenizer=tok)
  assert out.kv_bytes == 0 and out.tokens.shape == (2, 3)
  assert out.texts == [tok.decode(out.tokens[i].tolist()) for i in range(2)]
  assert all(t.startswith("w") for t in out.texts)
  one = engine.generate(model, [[1, 2, 3]], max_new_tokens=1, attention="none")  # shorthand
  assert one.tokens.shape == (1, 1) and one.decode_steps == 0 and one.decode_seconds == 0


@TREE_RUNS
def test_bad_inputs_raise(tiny, tree_runs):
  config, model, _, _ = tiny
  plan, _, _ = tree_runs
  gen = lambda prompts, **kw: engine.generate(model, None, prompts,
                                              **{"max_new_tokens": 2, **kw})
  with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
    gen([[1, 2], []])
  with pytest.raises(ValueError, match="prompts is empty"):
    gen([])
  with pytest.raises(ValueError, match="prompt 0 has 9 tokens.*max_len=10"):
    gen([list(range(1, 10))], max_len=10)
  with pytest.raises(ValueError, match="max_len=2048"):
    gen([[1] * 2047])
  with pytest.raises(ValueError, match="attention must be one of"):
    gen([[1]], attention="flash")
  with pytest.raises(ValueError, match="max_new_tokens"):
    gen([[1]], max_new_tokens=0)
  with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 255\]"):
    gen([[1, 256]])
  with pytest.raises(ValueError, match="is a string; pass tokenizer"):
    gen(["hello"])
  with pytest.raises(ValueError, match="eos_id=300"):
    gen([[1]], eos_id=300)
  with pytest.raises(ValueError, match="params is None"):
    engine.generate(config, None, [[1]], max_new_tokens=1)
  bad = plan._replace(suffix_tokens=plan.suffix_tokens + 1)
  with pytest.raises(ValueError, match="does not reproduce prompt"):
    gen(bad)


def test_out_of_memory_is_reported(tiny, monkeypatch):
  _, model, _, _ = tiny

  def exhausted(*args, **kwargs):
    def prefill(*a):
      raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to "
                                       "allocate 123456789 bytes.")
    return prefill
  monkeypatch.setattr(engine, "_make_prefill", exhausted)
  with pytest.raises(engine.OutOfMemoryError,
                     match=r"prefill compilation: attention=replicated, sequences=2.*kv_bytes"):
    engine.generate(model, None, [[1, 2, 3], [4]], max_new_tokens=2, attention="replicated",
                    max_len=100)


def _two_groups(rng, sizes, prefix_lengths, suffix_lengths):
  """Prompts under len(sizes) root prefixes: group g has sizes[g] prompts."""
  prompts, i = [], 0
  for size, p in zip(sizes, prefix_lengths):
    prefix = rng.integers(1, 256, p)
    for _ in range(size):
      prompts.append(np.concatenate([prefix, rng.integers(1, 256, suffix_lengths[i])]))
      i += 1
  return [x.astype(np.int32) for x in prompts]


@pytest.mark.slow
def test_new_trees_of_one_signature_reuse_the_executables(tiny):
  """The compile key is the bucketed signature: prompts of 21, 23 and 22 tokens compile once,
  and two different sharing trees of one signature compile once, with correct tokens."""
  _, model, _, _ = tiny
  rng = np.random.default_rng(11)
  engine.clear_compiled_cache()
  before = engine.compiled_cache_info()[1]
  runs = [engine.generate(model, [rng.integers(1, 256, n) for _ in range(3)], max_new_tokens=4)
          for n in (21, 23, 22)]
  assert engine.compiled_cache_info()[1] - before == 2          # one prefill, one decode
  assert runs[0].compile_seconds > 0
  assert [r.compile_seconds for r in runs[1:]] == [0.0, 0.0]
  assert runs[0].signature == runs[1].signature == runs[2].signature

  share = dict(min_shared_tokens=0, merge_cost=0)
  a = _two_groups(rng, (3, 3), (10, 12), (3, 5, 4, 2, 6, 3))
  b = _two_groups(rng, (4, 2), (13, 9), (6, 2, 5, 3, 4, 1))   # other tokens, owners, lengths
  before = engine.compiled_cache_info()[1]
  first = engine.generate(model, a, max_new_tokens=4, sharing_options=share)
  second = engine.generate(model, b, max_new_tokens=4, sharing_options=share)
  assert engine.compiled_cache_info()[1] - before == 2
  assert second.compile_seconds == 0.0 and first.signature == second.signature
  assert len(first.signature.levels) == 1
  want = engine.generate(model, b, max_new_tokens=4, attention="replicated")
  np.testing.assert_array_equal(second.tokens, want.tokens)


@pytest.mark.slow
def test_the_decode_compiles_beside_the_prefill(tiny, monkeypatch, caplog):
  """A call that compiles both programs compiles its decode loop on a thread of its own
  while it compiles the prefill; if that thread fails, it is logged once and the call
  compiles the decode itself, with the same tokens."""
  import threading
  _, model, _, _ = tiny
  rng = np.random.default_rng(5)
  prompts = [rng.integers(1, 256, n) for n in (9, 14, 11)]
  where, put_program = [], engine._EXECUTABLES.put_program

  def spy(table, key, program):
    where.append((table, threading.current_thread().name))
    return put_program(table, key, program)
  monkeypatch.setattr(engine._EXECUTABLES, "put_program", spy)
  engine.clear_compiled_cache()
  beside = engine.generate(model, prompts, max_new_tokens=5)
  assert sorted(where) == [("decodes", "hydrax-compile-decode"),
                           ("prefills", threading.current_thread().name)]
  job = engine._job

  def broken(table, *args):
    if table == "decodes" and threading.current_thread().name == "hydrax-compile-decode":
      raise RuntimeError("planted")
    return job(table, *args)
  monkeypatch.setattr(engine, "_job", broken)
  engine.clear_compiled_cache()
  where.clear()
  with caplog.at_level("WARNING", logger="hydrax"):
    itself = engine.generate(model, prompts, max_new_tokens=5)
  assert "compiling the decode beside the prefill failed (RuntimeError: planted)" in caplog.text
  assert sorted(where) == [("decodes", threading.current_thread().name),
                           ("prefills", threading.current_thread().name)]
  np.testing.assert_array_equal(itself.tokens, beside.tokens)


def test_runtime_is_a_hashable_value_in_the_key(tiny):
  from hydrax.attention import backends
  _, model, _, _ = tiny
  rt = engine.Runtime.build("xla")
  assert rt == engine.Runtime(backends.get("xla")) and hash(rt) == hash(engine.Runtime.build())
  assert rt.data == 1 and rt.mesh is None
  prompts = [[5, 6, 7, 8], [9, 10, 11]]
  one = engine.generate(model, prompts, max_new_tokens=3, runtime=rt)
  again = engine.generate(model, prompts, max_new_tokens=3, backend="xla")
  assert again.compile_seconds == 0.0
  np.testing.assert_array_equal(one.tokens, again.tokens)
  with pytest.raises(ValueError, match="checks must be one of"):
    engine.Runtime.build("xla", checks="sometimes")
  with pytest.raises(ValueError, match="backend='nope' is unknown"):
    engine.generate(model, prompts, max_new_tokens=2, backend="nope")
  with pytest.raises(ValueError, match="runtime= must be a Runtime"):
    engine.generate(model, prompts, max_new_tokens=2, runtime=rt, backend="xla")


@pytest.mark.slow
def test_runtime_checks_and_unroll(tiny):
  """checks="runtime" runs prefill and decode with their traced lengths, owners and layers
  checked (checkify-functionalized executables) and gives the tokens of the static run; a
  fully unrolled scan (unroll=True) does too, compiled under its own key."""
  _, model, _, _ = tiny
  rng = np.random.default_rng(11)
  prefix = rng.integers(1, 256, 24)
  prompts = [np.concatenate([prefix, rng.integers(1, 256, n)]) for n in (3, 5, 4)]
  share = dict(min_shared_tokens=0, merge_cost=0)
  want = engine.generate(model, prompts, max_new_tokens=4, sharing_options=share)
  checked = engine.generate(model, prompts, max_new_tokens=4, sharing_options=share,
                            checks="runtime")
  np.testing.assert_array_equal(checked.tokens, want.tokens)
  assert checked.compile_seconds > 0          # its own executables (functionalized checks)
  unrolled = engine.generate(model, prompts, max_new_tokens=4, sharing_options=share,
                             unroll=True)
  np.testing.assert_array_equal(unrolled.tokens, want.tokens)
  assert engine.Runtime.build("xla", unroll=True) != engine.Runtime.build("xla")
  with pytest.raises(ValueError, match="unroll must be"):
    engine.Runtime.build("xla", unroll=0)


def test_runtime_xla_options_reach_the_compiler(tiny, monkeypatch):
  """xla_options: "auto" is GPU_XLA_OPTIONS on GPUs and nothing elsewhere; given options are a
  sorted, hashable part of the key, and the executables are compiled with them (a spy on
  `Lowered.compile`, and an unknown option name that XLA itself rejects)."""
  _, model, _, _ = tiny
  assert engine.Runtime.build("xla").compiler_options() is None        # CPU
  rt = engine.Runtime.build("xla", xla_options={"xla_gpu_enable_triton_gemm": False,
                                               "xla_cpu_enable_fast_math": False})
  assert rt.xla_options == (("xla_cpu_enable_fast_math", False),
                            ("xla_gpu_enable_triton_gemm", False))
  assert rt != engine.Runtime.build("xla") and hash(rt)
  seen = []
  real = jax.stages.Lowered.compile
  monkeypatch.setattr(jax.stages.Lowered, "compile",
                      lambda self, compiler_options=None: seen.append(compiler_options)
                      or real(self, compiler_options=compiler_options))
  engine.generate(model, [[5, 6, 7, 8], [9, 10, 11]], max_new_tokens=3, runtime=rt)
  assert seen == [dict(rt.xla_options)] * 2                  # prefill and decode
  with pytest.raises(Exception, match="no_such_option"):
    engine.generate(model, [[5, 6, 7]], max_new_tokens=2,
                    runtime=engine.Runtime.build("xla", xla_options={"no_such_option": 1}))
  with pytest.raises(ValueError, match="xla_options must be"):
    engine.Runtime.build("xla", xla_options=["xla_gpu_enable_triton_gemm"])


@pytest.mark.parametrize("attention, check_every", [("replicated", 1), ("hydragen", 1),
                                                     ("hydragen", 3)])
def test_decode_makes_no_copy_of_the_whole_cache(tiny, attention, check_every):
  """The compiled decode loop copies or transposes no array as large as the per-sequence cache
  [L,B,S,K,D] (what remains on CPU: the XLA backend's per-layer transposes of one layer's k and
  v, 1/L of it each), also with several steps an iteration (`Runtime.check_every`)."""
  config, model, _, _ = tiny
  rng = np.random.default_rng(5)
  prefix = rng.integers(1, 256, 40)
  prompts = [np.concatenate([prefix, rng.integers(1, 256, 3 + i)]) for i in range(5)]
  engine.clear_compiled_cache()
  gen = engine.generate(model, prompts, max_new_tokens=8, attention=attention,
                        runtime=engine.Runtime.build("xla", check_every=check_every),
                        sharing_options=dict(min_shared_tokens=0, merge_cost=0))
  _, decode = list(engine._EXECUTABLES.items.values())[-1]
  rows, _, capacity, _, _ = gen.signature.main
  cache = config.num_layers * rows * capacity * config.num_kv_heads * config.head_dim
  sizes = [int(np.prod([int(x) for x in dims.split(",") if x]))
           for dims in re.findall(r"= f32\[([\d,]*)\][^ ]* (?:copy|transpose)\(",
                                  decode.as_text())]
  assert config.num_layers >= 2 and max(sizes, default=0) < cache


CHECK_EVERY_CASES = [("hydragen", False, (2, 3)), ("hydragen", True, (3,)),
                     ("replicated", False, (4,)), ("none", False, (3,))]


@pytest.mark.slow
@pytest.mark.parametrize("attention, sampled, checks_every", CHECK_EVERY_CASES)
def test_check_every_generates_the_same_tokens(tiny, attention, sampled, checks_every):
  """C decode steps between the loop's checks (`Runtime.check_every`) give the tokens and
  lengths of C = 1, with sequences stopping at eos; the loop runs whole groups of C steps,
  up to C - 1 past the last sequence's end. The hydragen cases' per-sequence cache has no
  slot to spare (a 16-token suffix + 8 new keys in capacity 24), so a step past the end must
  stay in the cache's bounds: checks="runtime" verifies every attention call's lengths."""
  config, model, _, _ = tiny
  rng = np.random.default_rng(11)
  prefix = rng.integers(1, 256, 40)
  prompts = [np.concatenate([prefix, rng.integers(1, 256, n)]) for n in (16, 3, 7, 1, 12)]
  opts = dict(max_new_tokens=9, attention=attention, pad_id=255,
              sharing_options=dict(min_shared_tokens=0, merge_cost=0))
  if sampled:
    opts.update(temperature=0.8, top_k=20, seed=3)
  runtime = functools.partial(engine.Runtime.build, "xla", checks="runtime")
  free = engine.generate(model, prompts, runtime=runtime(), **opts)
  if attention == "hydragen":
    assert free.signature.main[2] == 16 + 8
  eos = int(free.tokens[1, 3])
  want = engine.generate(model, prompts, eos_id=eos, runtime=runtime(), **opts)
  assert want.lengths.min() < 9 and want.decode_steps == 8     # some stop, one runs on
  for every in checks_every:
    for eos_id, ref in ((None, free), (eos, want)):
      got = engine.generate(model, prompts, eos_id=eos_id, runtime=runtime(check_every=every),
                            **opts)
      np.testing.assert_array_equal(got.tokens, ref.tokens)
      np.testing.assert_array_equal(got.lengths, ref.lengths)
      assert got.decode_steps % every == 0
      assert ref.decode_steps <= got.decode_steps < ref.decode_steps + every


def test_check_every_is_validated():
  assert engine.Runtime.build("xla", check_every=np.int64(4)).check_every == 4
  assert engine.Runtime.build("xla", check_every=4) != engine.Runtime.build("xla")
  for bad in (0, -2, 1.5, True, "4"):
    with pytest.raises(ValueError, match=f"check_every must be an int >= 1.*got {bad!r}"):
      engine.Runtime.build("xla", check_every=bad)


def test_kv_cache_owners_are_runtime_data():
  """Owners are pytree children: a jitted function of a KVCache traces once for two trees of
  the same shapes; bad owners are one-line ValueErrors."""
  from hydrax.cache import KVCache, empty_level
  shared = empty_level(2, 3, 8, 1, 4, jnp.float32)._replace(lengths=jnp.array([5, 2, 0]))
  suffix = empty_level(2, 4, 6, 1, 4, jnp.float32)
  traces = []

  @jax.jit
  def lengths_seen(cache):
    traces.append(1)
    return cache.shared[0].lengths[cache.owners[0]]

  a = KVCache(suffix, [shared], [np.array([0, 0, 1, 2], np.int32)])
  b = KVCache(suffix, [shared], [np.array([1, 2, 2, 0], np.int32)])
  assert any(leaf is a.owners[0] for leaf in jax.tree_util.tree_leaves(a))
  np.testing.assert_array_equal(lengths_seen(a), [5, 5, 2, 0])
  np.testing.assert_array_equal(lengths_seen(b), [2, 0, 0, 5])
  assert len(traces) == 1
  level = a.layer_levels(1)[0]
  assert level.layer == 1 and level.k.shape == (2, 3, 8, 1, 4) and level.owner is a.owners[0]
  with pytest.raises(ValueError, match=r"owners\[0\] has node indices in \[0, 3\], outside"):
    KVCache(suffix, [shared], [np.array([0, 1, 2, 3])])
  with pytest.raises(ValueError, match=r"owners\[0\] has B=3 rows"):
    KVCache(suffix, [shared], [np.array([0, 1, 2])])
  with pytest.raises(ValueError, match=r"owners\[0\] must be a 1-D integer array"):
    KVCache(suffix, [shared], [np.zeros(4)])
  with pytest.raises(ValueError, match="1 shared levels but 0 owner arrays"):
    KVCache(suffix, [shared], [])


@pytest.mark.slow
def test_pallas_grouped_levels_in_the_engine_equal_xla(tiny):
  """A root shared by all, three nodes under it (one empty; owners interleaved), the
  suffixes (one empty): the pallas backend's grouped levels (`grouped_levels`: the rows in
  the middle level's runtime order, the root and the suffixes taking it, one merge; at
  decode the root's and the suffixes' tiles found in-kernel, and with merge_in_kernel the
  merge in the suffix kernel; Pallas interpret mode here) generate the XLA backend's
  tokens. (The suffix tiles ignoring the order fail it.)"""
  _, model, _, _ = tiny
  rng = np.random.default_rng(11)
  root = PlanLevel(rng.integers(1, 256, (1, 8)).astype(np.int32), np.array([7], np.int32),
                   np.zeros(5, np.int32), np.array([-1], np.int32), np.array([0], np.int32))
  # Owners interleaved (the rows' order by node is not the identity), an empty node.
  mid = PlanLevel(rng.integers(1, 256, (3, 6)).astype(np.int32), np.array([6, 4, 0], np.int32),
                  np.array([1, 0, 1, 2, 0], np.int32), np.zeros(3, np.int32),
                  np.array([7, 7, 7], np.int32))
  plan = _plan_from((root, mid), (2, 0, 3, 1, 4), np.array([2, 0, 4, 1, 3]), rng)
  want = engine.generate(model, None, plan, max_new_tokens=4, backend="xla")
  taken = []
  real = pallas_gpu.grouped_levels

  def spy(*args, **kwargs):
    out = real(*args, **kwargs)
    taken.append(out is not None)
    return out

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(pallas_gpu, "grouped_levels", spy)
    for merge in (False, True):
      got = engine.generate(model, None, plan, max_new_tokens=4, backend=backends.get(
          "pallas", path="off", merge_in_kernel=merge))
      np.testing.assert_array_equal(got.tokens, want.tokens)
  assert taken and all(taken)

