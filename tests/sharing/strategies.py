"""Hypothesis strategies and a brute-force checker for sharing plans (pure Python, no hydrax
internals): random sequence sets with heavy sharing, and every invariant of a SharingPlan."""

import numpy as np
from hypothesis import strategies as st

from hydrax.sharing import Buckets


@st.composite
def sequence_sets(draw, max_b=8, max_len=40, big_tokens=True):
  """1..max_b sequences over a tiny vocabulary, many cut from earlier ones and extended, some
  duplicated: shared prefixes, prefixes of other sequences and identical sequences abound."""
  vocab = draw(st.integers(1, 4))
  shift = draw(st.sampled_from([0, 0, 0, 2**31 - 5])) if big_tokens else 0
  tok = st.integers(0, vocab - 1).map(lambda x: x + shift)
  b = draw(st.integers(1, max_b))
  seqs = []
  for _ in range(b):
    kind = draw(st.integers(0, 3)) if seqs else 0
    if kind == 0:
      s = draw(st.lists(tok, min_size=1, max_size=max_len))
    elif kind == 3:
      s = list(draw(st.sampled_from(seqs)))
    else:
      parent = draw(st.sampled_from(seqs))
      cut = draw(st.integers(1, len(parent)))
      s = parent[:cut] + draw(st.lists(tok, max_size=max_len // 2))
    seqs.append(s)
  return seqs


options = st.fixed_dictionaries({
    "min_shared_tokens": st.sampled_from([0, 0, 1, 4, 12, 40]),
    "merge_cost": st.sampled_from([0, 0, 1, 3]),
    "max_levels": st.sampled_from([None, None, 0, 1, 2]),
    "buckets": st.sampled_from([None, Buckets(), Buckets(steps=1, min_tokens=1),
                                Buckets(steps=4, min_nodes=4, min_tokens=8)]),
})


def distinct_prefixes(seqs) -> int:
  """Tokens of the full radix tree = number of distinct non-empty prefixes."""
  return len({tuple(s[:k]) for s in seqs for k in range(1, len(s) + 1)})


def check_plan(p, seqs, *, min_shared_tokens=0, merge_cost=0, max_levels=None, buckets=None,
               explicit=False):
  """Asserts every documented invariant of plan `p` of `seqs` (`explicit`: made by from_tree,
  whose tree need not be the radix tree of the sequences)."""
  b = len(seqs)
  seqs = [list(map(int, s)) for s in seqs]
  order = p.order
  assert order.dtype == np.int64 and sorted(order.tolist()) == list(range(b))
  assert p.num_sequences == b
  x = np.arange(b) * 10
  np.testing.assert_array_equal(p.to_input_order(p.to_plan_order(x)), x)
  np.testing.assert_array_equal(order[p.inverse_order], np.arange(b))
  assert [s.tolist() for s in p.sequences] == seqs
  assert all(s.dtype == np.int32 for s in p.sequences)
  if max_levels is not None:
    assert len(p.levels) <= max_levels

  # Shapes, dtypes, padding, parents, starts.
  offset = np.zeros(b, np.int64)
  for d, lv in enumerate(p.levels):
    n, s = lv.tokens.shape
    for a in lv:
      assert a.dtype == np.int32
    assert lv.lengths.shape == (n,) and lv.parent.shape == (n,) and lv.start.shape == (n,)
    assert lv.owner.shape == (b,) and lv.owner.min() >= 0 and lv.owner.max() < n
    assert (lv.lengths >= 0).all() and (lv.lengths <= s).all()
    cols = np.arange(s)[None, :]
    assert (lv.tokens[cols >= lv.lengths[:, None]] == 0).all()
    real = np.flatnonzero(lv.lengths > 0)
    assert real.tolist() == list(range(real.size)), "real nodes come first"
    owned = set(lv.owner.tolist())
    assert len(owned - set(real.tolist())) <= 1, "at most one empty node is owned"
    for j in range(n):
      rows = np.flatnonzero(lv.owner == j)
      if lv.lengths[j] == 0:
        assert lv.parent[j] == -1 and lv.start[j] == 0
        continue
      assert rows.size >= 2 and rows.max() - rows.min() + 1 == rows.size, "contiguous sharers"
      assert p.node_range(d, j) == (rows.min(), rows.max() + 1)
      length = int(lv.lengths[j])
      assert (rows.size - 1) * length >= min_shared_tokens + merge_cost * rows.size
      assert (offset[rows] == lv.start[j]).all()
      if d == 0:
        assert lv.parent[j] == -1
      else:
        up = p.levels[d - 1]
        assert 0 <= lv.parent[j] and up.lengths[lv.parent[j]] > 0
        assert (up.owner[rows] == lv.parent[j]).all()
    offset += lv.lengths[lv.owner]
  np.testing.assert_array_equal(p.suffix_start, offset)
  assert p.suffix_tokens.dtype == np.int32 and p.suffix_tokens.shape[0] == b
  assert (p.suffix_tokens[np.arange(p.suffix_tokens.shape[1])[None, :]
                          >= p.suffix_lengths[:, None]] == 0).all()
  if buckets is None:
    for lv in p.levels:
      assert lv.tokens.shape[1] == lv.lengths.max()
    assert p.suffix_tokens.shape[1] == p.suffix_lengths.max()

  # Every sequence reconstructs exactly from its path through the plan.
  for i in range(b):
    keys = []
    for lv in p.levels:
      j = lv.owner[i]
      keys += lv.tokens[j, :lv.lengths[j]].tolist()
    keys += p.suffix_tokens[i, :p.suffix_lengths[i]].tolist()
    assert keys == seqs[order[i]], (i, keys, seqs[order[i]])

  # dense_mask against the brute-force relation, column by column.
  layout = p.stored_layout()
  mask = p.dense_mask()
  assert mask.dtype == bool and mask.shape == (b, p.stats.stored_tokens) == (b, layout.tokens.size)
  nl = len(p.levels)
  col = 0
  expect = np.zeros_like(mask)
  for d, lv in enumerate(p.levels):
    for j in range(lv.lengths.size):
      for t in range(lv.lengths[j]):
        for i in range(b):                       # input i sits at plan position inverse[i]
          expect[i, col] = lv.owner[p.inverse_order[i]] == j
        assert (layout.level[col], layout.node[col], layout.tokens[col],
                layout.positions[col]) == (d, j, lv.tokens[j, t], lv.start[j] + t)
        col += 1
  for q in range(b):
    for t in range(p.suffix_lengths[q]):
      expect[order[q], col] = True
      assert (layout.level[col], layout.node[col], layout.tokens[col],
              layout.positions[col]) == (nl, q, p.suffix_tokens[q, t], p.suffix_start[q] + t)
      col += 1
  assert col == mask.shape[1]
  np.testing.assert_array_equal(mask, expect)
  for i in range(b):
    assert layout.tokens[mask[i]].tolist() == seqs[i]
    assert layout.positions[mask[i]].tolist() == list(range(len(seqs[i])))

  # The prefix relation: a stored token lies on sequence i's path => its whole prefix (path
  # from the root, via parents) is a prefix of sequence i.
  prefix_of_col = []
  for d, lv in enumerate(p.levels):
    for j in range(lv.lengths.size):
      chain, node = [], j
      for e in range(d, -1, -1):
        chain = p.levels[e].tokens[node, :p.levels[e].lengths[node]].tolist() + chain
        node = p.levels[e].parent[node]
      before = len(chain) - int(lv.lengths[j])
      prefix_of_col += [tuple(chain[:before + t + 1]) for t in range(lv.lengths[j])]
  for q in range(b):
    s = seqs[order[q]]
    prefix_of_col += [tuple(s[:p.suffix_start[q] + t + 1]) for t in range(p.suffix_lengths[q])]
  for c, pre in enumerate(prefix_of_col):
    for i in range(b):
      if mask[i, c]:
        assert tuple(seqs[i][:len(pre)]) == pre

  # Stats.
  st_ = p.stats
  assert st_.num_sequences == b and st_.total_tokens == sum(map(len, seqs))
  assert explicit or st_.radix_tokens == distinct_prefixes(seqs)
  assert st_.radix_tokens <= st_.stored_tokens <= st_.total_tokens
  assert abs(st_.ratio - st_.total_tokens / st_.stored_tokens) < 1e-12
  assert st_.levels == nl and st_.nodes_per_level == tuple(
      int((lv.lengths > 0).sum()) for lv in p.levels)
  assert st_.padded_shapes == tuple(lv.tokens.shape for lv in p.levels)
  assert st_.longest_sequence == max(map(len, seqs))
  if min_shared_tokens == 0 and merge_cost == 0 and max_levels is None:
    # Every node with >= 2 sequences is shared: the full radix tree, and in the share-all
    # setting a stored token lies on i's path iff its prefix is a prefix of sequence i.
    assert st_.stored_tokens == st_.radix_tokens
  if min_shared_tokens == 0 and merge_cost == 0 and max_levels is None and not explicit:
    assert len(set(prefix_of_col)) == len(prefix_of_col)
    for c, pre in enumerate(prefix_of_col):
      for i in range(b):
        assert mask[i, c] == (tuple(seqs[i][:len(pre)]) == pre)
  text = p.render()
  assert str(p) == text and f"{b} sequence" in text
