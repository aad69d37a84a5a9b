"""hydrax.sharing.radix.build against a brute-force prefix tree."""

import numpy as np
import pytest
from hypothesis import given

from hydrax.sharing import radix
from hydrax.sharing._inputs import flatten
from tests.sharing.strategies import sequence_sets


def brute_nodes(seqs):
  """{(members, depth)}: prefixes of >= 2 sequences where one ends or two part."""
  nodes = set()
  for s in seqs:
    for d in range(1, len(s) + 1):
      members = frozenset(j for j, t in enumerate(seqs) if t[:d] == s[:d])
      if len(members) < 2:
        break
      following = {tuple(seqs[j][d:d + 1]) for j in members}
      if len(following) > 1 or () in following:
        nodes.add((members, d))
  return nodes


def check_tree(seqs):
  t = radix.build(flatten(seqs))
  assert t.order.tolist() == sorted(range(len(seqs)), key=lambda i: (seqs[i], i))
  got = set()
  for m in range(t.num_nodes):
    members = frozenset(t.order[t.lo[m]:t.hi[m]].tolist())
    got.add((members, int(t.end[m])))
    p = t.parent[m]
    assert t.begin[m] == (0 if p < 0 else t.end[p]) < t.end[m]
    if p >= 0:
      assert p < m and t.gen[p] < t.gen[m] and t.lo[p] <= t.lo[m] and t.hi[m] <= t.hi[p]
  assert got == brute_nodes(seqs)
  for q in range(len(seqs)):
    ends = [int(t.end[m]) for m in range(t.num_nodes) if t.lo[m] <= q < t.hi[m]]
    assert t.leaf_end[q] == max(ends, default=0)
  return t


@given(sequence_sets(max_b=10, max_len=60))
def test_matches_brute_force(seqs):
  check_tree(seqs)


@given(sequence_sets(max_b=10, max_len=14, big_tokens=False))
def test_matches_brute_force_with_tiny_windows(seqs):
  old = radix._ROUND_ELEMENTS, radix._MIN_COLUMNS, radix._MAX_COLUMNS
  radix._ROUND_ELEMENTS, radix._MIN_COLUMNS, radix._MAX_COLUMNS = 8, 1, 3
  try:
    check_tree(seqs)
  finally:
    radix._ROUND_ELEMENTS, radix._MIN_COLUMNS, radix._MAX_COLUMNS = old


@pytest.mark.parametrize("shuffle", [False, True])
def test_a_chain_of_prefixes_takes_few_rounds(shuffle):
  # Sequences that are prefixes of one another, shortest first: a leader chosen by input
  # order would advance one token per round; the leader's path peels them off in bulk.
  base = np.random.default_rng(0).integers(0, 100, 3000)
  lengths = np.arange(1, 3001)
  if shuffle:
    lengths = np.random.default_rng(1).permutation(lengths)
  t = radix.build(flatten([base[:n] for n in lengths]))
  assert t.num_nodes == 2999
  rounds = int(t.gen.max()) // (radix._MAX_COLUMNS + 2) + 1
  assert rounds <= 40, rounds
