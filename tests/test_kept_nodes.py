"""engine.generate(keep=True) / reuse=: shared nodes passed from one call to the next.

A node found in the kept levels (same path, same level, same bucketed level shape) is not
prefilled again; the tokens are those of a call that prefills everything (greedy, float32),
with partial reuse (new nodes written beside kept ones), deeper levels, prompts that end
inside a kept node, a level of another shape (prefilled as usual), and one decode program for
both. A KeptNodes is taken once.
"""

import jax
import numpy as np
import pytest
from flax import nnx

from hydrax import engine, sharing
from hydrax.models import configs, llama
from hydrax.offline import schedule

CONFIG = configs.LlamaConfig.from_preset("tiny")
PARAMS = nnx.split(llama.init(CONFIG, seed=0))[1]
RNG = np.random.default_rng(0)
HEADS = {name: RNG.integers(3, 256, n).astype(np.int32)
         for name, n in (("doc", 40), ("x", 30), ("y", 25), ("s1", 12), ("s2", 9))}


def _group(n, *parts):
  head = np.concatenate([HEADS[p] for p in parts])
  return [np.concatenate([head, RNG.integers(3, 256, 1 + i % 5)]).astype(np.int32)
          for i in range(n)]


def _plan(seqs, **kw):
  # the offline scheduler's coarse buckets: at least 4 nodes a level, as its batches have
  return sharing.plan(seqs, buckets=schedule.BUCKETS, min_shared_tokens=0, merge_cost=0, **kw)


def _gen(seqs, **kw):
  return engine.generate(CONFIG, PARAMS, _plan(seqs, **kw.pop("plan", {})), max_new_tokens=6,
                         **kw)


def _same(a, b):
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.lengths, b.lengths)


@pytest.mark.slow
def test_partial_then_full_reuse_gives_the_same_tokens():
  first = _gen(_group(3, "doc") + _group(3, "x"), keep=True)
  assert first.kept is not None and first.reused_tokens == 0
  # doc is kept; y is new; the last two prompts end exactly at doc's and y's ends (their
  # first tokens come from the kept node's last hidden state and the new one's)
  second_prompts = _group(4, "doc") + _group(3, "y") + [HEADS["doc"].copy(),
                                                         HEADS["y"].copy()]
  reference = _gen(second_prompts)
  before = engine.compiled_cache_info()[1]
  second = _gen(second_prompts, keep=True, reuse=first.kept)
  assert engine.compiled_cache_info()[1] - before == 1     # its prefill; decode is shared
  assert first.kept.taken
  assert second.reused_tokens == HEADS["doc"].size
  level = second.signature.levels[0]
  assert len(level) == 7 and level[0] >= 1                # y's row, written beside doc
  _same(second, reference)
  third = _gen(second_prompts, keep=True, reuse=second.kept)
  assert third.reused_tokens == HEADS["doc"].size + HEADS["y"].size
  assert third.signature.levels[0][0] == 0                # nothing left to prefill
  _same(third, reference)


@pytest.mark.slow
def test_deeper_levels_reuse_their_own_nodes():
  two = dict(plan=dict(max_levels=2))
  first = _gen(_group(3, "doc", "s1") + _group(2, "doc", "s2"), keep=True, **two)
  prompts = _group(3, "doc", "s1") + _group(3, "doc", "x") + [
      np.concatenate([HEADS["doc"], HEADS["s1"]])]
  reference = _gen(prompts, **two)
  got = _gen(prompts, reuse=first.kept, **two)
  assert [len(s) for s in got.signature.levels] == [7, 7]
  # doc at level 0 and s1 at level 1 come from the kept levels; x is new
  assert got.reused_tokens == HEADS["doc"].size + HEADS["s1"].size
  _same(got, reference)


@pytest.mark.slow
def test_a_level_of_another_shape_is_prefilled_and_unused_levels_are_released():
  first = _gen(_group(3, "doc"), keep=True)
  prompts = _group(3, "doc")
  # the default buckets lay the level out with 1 node, not 4: it cannot be updated in place
  got = engine.generate(CONFIG, PARAMS, sharing.plan(prompts, min_shared_tokens=0,
                                                     merge_cost=0),
                        max_new_tokens=6, reuse=first.kept)
  assert got.reused_tokens == 0 and first.kept.taken
  assert all(len(s) == 5 for s in got.signature.levels)
  _same(got, engine.generate(CONFIG, PARAMS, sharing.plan(prompts, min_shared_tokens=0,
                                                          merge_cost=0), max_new_tokens=6))


@pytest.mark.slow
def test_precompile_follows_a_chain_before_any_program_exists():
  # The second call's prefill (laid into the first's kept levels) is compiled from the kept
  # levels' traced shapes; then both calls run without compiling.
  firsts, seconds = _group(3, "doc") + _group(3, "x"), _group(4, "doc") + _group(3, "y")
  engine.clear_compiled_cache()
  spent, kept = engine.precompile(CONFIG, PARAMS, _plan(firsts), max_new_tokens=6, keep=True)
  assert spent > 0 and all(isinstance(level.k, jax.ShapeDtypeStruct) for level in kept.levels)
  spent, _ = engine.precompile(CONFIG, PARAMS, _plan(seconds), max_new_tokens=6, keep=True,
                               reuse=kept)
  assert spent > 0 and kept.taken
  before = engine.compiled_cache_info()[1]
  first = _gen(firsts, keep=True)
  second = _gen(seconds, reuse=first.kept)
  assert engine.compiled_cache_info()[1] == before
  assert first.compile_seconds == second.compile_seconds == 0
  assert second.reused_tokens == HEADS["doc"].size


def test_bad_reuse_is_rejected():
  first = _gen(_group(2, "x"), keep=True)
  with pytest.raises(ValueError, match="only attention='hydragen'"):
    _gen(_group(2, "x"), attention="replicated", keep=True)
  with pytest.raises(ValueError, match="reuse must be the KeptNodes"):
    _gen(_group(2, "x"), reuse={"levels": ()})
  other_mesh = engine.KeptNodes(list(first.kept.levels), list(first.kept.lasts),
                                first.kept.index, first.kept.shapes, data=2)
  with pytest.raises(ValueError, match="kept over 2 data shards, this call has 1"):
    _gen(_group(2, "x"), reuse=other_mesh)
  _gen(_group(2, "x"), reuse=first.kept)
  with pytest.raises(ValueError, match="already taken"):
    _gen(_group(2, "x"), reuse=first.kept)
