"""hydrax.sharing.plan: exact reconstruction, the mask, the cost model, buckets, bad input."""

import numpy as np
import pytest
from hypothesis import given, strategies as st

from hydrax.sharing import Buckets, plan
from hydrax.sharing.buckets import round_up
from tests.sharing.strategies import check_plan, distinct_prefixes, options, sequence_sets

SHARE_ALL = dict(min_shared_tokens=0, merge_cost=0, buckets=None)


@given(sequence_sets(), options)
def test_random_sets_all_invariants(seqs, opts):
  check_plan(plan(seqs, **opts), seqs, **opts)


@given(sequence_sets(max_b=12, max_len=70, big_tokens=False))
def test_share_all_stores_the_radix_tree(seqs):
  p = plan(seqs, **SHARE_ALL)
  check_plan(p, seqs, min_shared_tokens=0, merge_cost=0)
  assert p.stats.stored_tokens == distinct_prefixes(seqs)
  # Lexicographic plan order, ties in input order: deterministic.
  assert p.order.tolist() == sorted(range(len(seqs)), key=lambda i: (seqs[i], i))


@given(sequence_sets(max_b=6), st.randoms(use_true_random=False))
def test_input_permutation_gives_the_same_tree(seqs, rnd):
  perm = list(range(len(seqs)))
  rnd.shuffle(perm)
  a, b = plan(seqs, **SHARE_ALL), plan([seqs[i] for i in perm], **SHARE_ALL)
  assert [seqs[i] for i in a.order] == [seqs[perm[i]] for i in b.order]
  for la, lb in zip(a.levels, b.levels):
    for x, y in zip(la, lb):
      np.testing.assert_array_equal(x, y)
  np.testing.assert_array_equal(a.suffix_tokens, b.suffix_tokens)


def test_array_input_matches_list_input_and_is_deterministic():
  rng = np.random.default_rng(0)
  arr = rng.integers(0, 3, (50, 30)).astype(np.int64)
  arr[:20, :12] = 7
  p1, p2, p3 = plan(arr, **SHARE_ALL), plan(list(arr), **SHARE_ALL), plan(
      arr.tolist(), **SHARE_ALL)
  for q in (p2, p3):
    np.testing.assert_array_equal(p1.order, q.order)
    np.testing.assert_array_equal(p1.suffix_tokens, q.suffix_tokens)
    assert len(p1.levels) == len(q.levels)
    for la, lb in zip(p1.levels, q.levels):
      for x, y in zip(la, lb):
        np.testing.assert_array_equal(x, y)
  check_plan(p1, arr.tolist(), min_shared_tokens=0, merge_cost=0)


def test_long_sequences_several_radix_rounds():
  rng = np.random.default_rng(1)
  base = rng.integers(0, 50, 3000).tolist()
  seqs = [base[:cut] + rng.integers(0, 2, 5).tolist() for cut in (2999, 1500, 1500, 17, 3000)]
  seqs.append(base)
  p = plan(seqs, **SHARE_ALL)
  check_plan(p, seqs, min_shared_tokens=0, merge_cost=0)


# ---- edge cases -------------------------------------------------------------------------------

def test_one_sequence():
  p = plan([[5, 6, 7]])
  assert p.levels == () and p.order.tolist() == [0]
  assert p.suffix_tokens[0, :3].tolist() == [5, 6, 7] and p.suffix_lengths.tolist() == [3]
  assert p.dense_mask().tolist() == [[True] * 3] and p.stats.ratio == 1.0
  check_plan(p, [[5, 6, 7]], min_shared_tokens=1024, merge_cost=16, buckets=Buckets())


def test_identical_sequences_share_one_node_with_empty_suffixes():
  seqs = [[3, 1, 4, 1, 5]] * 4
  p = plan(seqs, **SHARE_ALL)
  (lv,) = p.levels
  assert lv.tokens.tolist() == [[3, 1, 4, 1, 5]] and lv.owner.tolist() == [0] * 4
  assert p.suffix_lengths.tolist() == [0] * 4 and p.suffix_start.tolist() == [5] * 4
  assert p.order.tolist() == [0, 1, 2, 3] and p.stats.stored_tokens == 5
  check_plan(p, seqs)


def test_no_common_prefix():
  seqs = [[1, 2], [2, 3, 4], [3], [0, 0]]
  p = plan(seqs, **SHARE_ALL)
  assert p.levels == () and p.order.tolist() == [3, 0, 1, 2]
  assert p.stats.stored_tokens == p.stats.total_tokens == 8
  check_plan(p, seqs)


def test_sequence_that_is_a_prefix_of_another():
  seqs = [[1, 2, 3, 4], [1, 2]]
  p = plan(seqs, **SHARE_ALL)
  (lv,) = p.levels
  assert p.order.tolist() == [1, 0] and lv.tokens.tolist() == [[1, 2]]
  assert p.suffix_lengths.tolist() == [0, 2] and p.suffix_start.tolist() == [2, 2]
  check_plan(p, seqs)


def test_sequences_without_a_node_own_one_empty_node():
  seqs = [[1, 1, 1, 5], [1, 1, 1, 6], [2, 2], [1, 1, 1]]
  p = plan(seqs, **SHARE_ALL)
  (lv,) = p.levels
  assert lv.lengths.tolist() == [3, 0] and lv.owner.tolist() == [0, 0, 0, 1]
  check_plan(p, seqs)


# ---- cost model, levels ------------------------------------------------------------------------

@pytest.mark.parametrize("length,shared", [(9, False), (10, True)])
def test_threshold(length, shared):
  seqs = [[7] * length + [1], [7] * length + [2]]   # n=2: pays iff L >= c + 2m = 10
  p = plan(seqs, min_shared_tokens=4, merge_cost=3, buckets=None)
  assert len(p.levels) == int(shared)


def test_unpaying_node_folds_into_its_children():
  a, b1, b2 = [9, 9], list(range(10, 20)), list(range(30, 40))
  seqs = [a + b1 + [1], a + b1 + [2], a + b2 + [3], a + b2 + [4]]
  # Root node A: n=4, L=2: 3*2 = 6 < 8 folds; B1, B2: n=2, L=10+2 = 12 >= 8 pay.
  p = plan(seqs, min_shared_tokens=8, merge_cost=0, buckets=None)
  (lv,) = p.levels
  assert lv.tokens.tolist() == [a + b1, a + b2] and lv.start.tolist() == [0, 0]
  check_plan(p, seqs, min_shared_tokens=8)
  # Sharing everything gives two levels instead.
  p = plan(seqs, **SHARE_ALL)
  assert [lv.lengths.tolist() for lv in p.levels] == [[2], [10, 10]]
  assert p.levels[1].parent.tolist() == [0, 0] and p.levels[1].start.tolist() == [2, 2]


def test_max_levels_folds_deeper_sharing_into_the_suffixes():
  seqs = [[1] * 5 + [2] * 5 + [3], [1] * 5 + [2] * 5 + [4], [1] * 5 + [5]]
  full = plan(seqs, **SHARE_ALL)
  assert len(full.levels) == 2
  one = plan(seqs, min_shared_tokens=0, merge_cost=0, max_levels=1, buckets=None)
  assert len(one.levels) == 1 and one.suffix_lengths.tolist() == [6, 6, 1]
  zero = plan(seqs, min_shared_tokens=0, merge_cost=0, max_levels=0, buckets=None)
  assert zero.levels == () and zero.stats.stored_tokens == zero.stats.total_tokens
  for p, m in ((one, 1), (zero, 0)):
    check_plan(p, seqs, max_levels=m)


def test_default_cost_model_skips_a_shared_bos_token_but_shares_a_long_prefix():
  rng = np.random.default_rng(0)
  bos = [[1] + rng.integers(2, 1000, 50).tolist() for _ in range(500)]
  assert plan(bos).levels == ()
  doc = rng.integers(2, 1000, 2000).tolist()
  qa = [doc + rng.integers(2, 1000, 20).tolist() for _ in range(8)]
  p = plan(qa)
  assert p.stats.nodes_per_level == (1,) and p.levels[0].lengths[0] == 2000


# ---- buckets ------------------------------------------------------------------------------------

def test_round_up_grid():
  assert [round_up(x, steps=2) for x in range(1, 13)] == [1, 2, 3, 4, 6, 6, 8, 8, 12, 12, 12, 12]
  assert [round_up(x, steps=1) for x in (1, 3, 5, 9, 1000)] == [1, 4, 8, 16, 1024]
  assert round_up(0, minimum=16) == 16 and round_up(1025, steps=2) == 1536
  for x in range(1, 3000):
    for steps in (1, 2, 4):
      y = round_up(x, steps=steps)
      assert x <= y < x * (1 + 1 / steps) + 1


def test_buckets_keep_the_number_of_shapes_small_across_a_batch_sweep():
  from hydrax.sharing import hierarchy
  shapes = set()
  for batch in (32, 64, 128, 256, 512, 1024, 2048):
    p = hierarchy(prefix=1000, problems=[100 + batch % 7] * (batch // 16), samples_per_problem=16,
                  sample_tokens=5)
    shapes.add((tuple(lv.tokens.shape for lv in p.levels), p.suffix_tokens.shape[1]))
  assert p.levels[0].tokens.shape == (1, 1024) and p.suffix_tokens.shape[1] == 16
  assert len({s[0][1] for s in shapes}) <= 7 and len({s[0][1][1] for s in shapes}) == 1


def test_bad_bucket_and_option_values():
  with pytest.raises(ValueError, match="steps"):
    Buckets(steps=3)
  with pytest.raises(ValueError, match="min_tokens"):
    Buckets(min_tokens=-1)
  for kw, pat in [({"min_shared_tokens": -1}, "min_shared_tokens"),
                  ({"merge_cost": float("nan")}, "merge_cost"),
                  ({"max_levels": -1}, "max_levels"), ({"max_levels": 1.5}, "max_levels"),
                  ({"buckets": 16}, "buckets")]:
    with pytest.raises(ValueError, match=pat):
      plan([[1]], **kw)


# ---- bad input ---------------------------------------------------------------------------

@pytest.mark.parametrize("bad,message", [
    ([], r"sequences is empty"),
    ([[1, 2], [], [3]], r"sequences\[1\] is empty"),
    ([[1, 2], [3, 4, 5, -1]], r"sequences\[1\]\[3\] = -1 is negative"),
    ([[1], [2], [1, 2.5]], r"sequences\[2\]\[1\] = 2.5 is not an integer"),
    ([[1.0, 2.0]], r"sequences\[0\]\[0\] = 1.0 is not an integer"),
    ([[1, "a"]], r"sequences\[0\]\[1\] = 'a' is not an integer"),
    ([[1, None]], r"sequences\[0\]\[1\] = None is not an integer"),
    ([[True, False]], r"sequences\[0\]\[0\] = True is not an integer"),
    ([[0, 2**31]], r"sequences\[0\]\[1\] = 2147483648 does not fit in int32"),
    ([[0, 2**80]], r"sequences\[0\]\[1\] = \d+ does not fit in int32"),
    ([np.array([1, 2]), np.array([3, -7], np.int64)], r"sequences\[1\]\[1\] = -7 is negative"),
    ([np.array([1, 2], np.uint64), np.array([2**40], np.uint64)],
     r"sequences\[1\]\[0\] = 1099511627776 does not fit"),
    ([np.zeros((2, 2), np.int32)], r"sequences\[0\] must be 1-D"),
    ([[1, 2], 3], r"sequences\[1\] must be a sequence of token ids, got the scalar 3"),
    ([1, 2, 3], r"flat list of ints"),
    (np.array([1, 2, 3]), r"wrap a single sequence in a list"),
    (np.array([[1, 2], [3, -4]]), r"sequences\[1\]\[1\] = -4 is negative"),
    (np.zeros((2, 0), np.int32), r"sequences\[0\] is empty"),
    (np.array([[0.5, 1.0]]), r"sequences\[0\]\[0\] = 0.5 is not an integer"),
    ("hello", r"got str"),
    (7, r"got int"),
])
def test_bad_input_raises_a_clear_error(bad, message):
  with pytest.raises(ValueError, match=message):
    plan(bad)


def test_bad_token_in_a_later_chunk_is_located():
  from hydrax.sharing import _inputs
  seqs = [np.full(1000, 3, np.int64) for _ in range(40)]
  seqs[37] = seqs[37].copy()
  seqs[37][999] = -2
  old = _inputs._CHUNK
  _inputs._CHUNK = 4096
  try:
    with pytest.raises(ValueError, match=r"sequences\[37\]\[999\] = -2 is negative"):
      plan(seqs)
  finally:
    _inputs._CHUNK = old


def test_plan_that_shares_nothing_says_why_once(monkeypatch, caplog):
  import logging
  from hydrax import _log
  monkeypatch.setattr(_log, "_seen", set())
  prompts = [[1, 2, 3, 4, 5], [1, 2, 3, 9], [1, 2, 7], [8]]
  with caplog.at_level(logging.WARNING, logger="hydrax"):
    for _ in range(2):
      assert plan(prompts).levels == ()
    assert plan(prompts, min_shared_tokens=0, merge_cost=0).levels != ()     # shares: silent
    assert plan(prompts, max_levels=0).levels == ()                         # asked for: silent
  [record] = caplog.records
  message = record.getMessage()
  assert "no shared level for 4 sequences" in message
  assert "longest common prefix has 3 tokens, shared by 2 of 4 sequences" in message
  assert "min_shared_tokens=1024, merge_cost=16" in message and "= 1056" in message
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="hydrax"):
    plan([[1, 2], [3, 4]])
  assert "no two sequences share a first token" in caplog.records[0].getMessage()


@pytest.mark.slow
def test_readme_use_examples_run(monkeypatch, caplog):
  """README.md's "Use" code blocks run as written; the plan they build shares its prefix."""
  import logging
  import os
  import re
  from hydrax import _log
  monkeypatch.setattr(_log, "_seen", set())
  readme = open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md")).read()
  use = readme[readme.index("## Use\n"):]
  use = use[:use.index("\n## ", 1)] if "\n## " in use[1:] else use
  blocks = re.findall(r"```python\n(.*?)```", use, re.S)
  assert len(blocks) == 2
  scope = {"print": lambda *a, **k: None}
  with caplog.at_level(logging.WARNING, logger="hydrax"):
    for block in blocks:
      exec(compile(block, "README.md", "exec"), scope)
  assert scope["out"].shape == scope["q"].shape
  assert len(scope["plan"].levels) == 1 and scope["gen"].tokens.shape == (4, 4)
  assert not any("no shared level" in r.getMessage() for r in caplog.records)
