"""hydrax.sharing.from_tree / hierarchy (explicit.py): explicit trees give the same plans."""

import pytest
from hypothesis import given, strategies as st

from hydrax.sharing import Node, from_tree, hierarchy, plan
from tests.sharing.strategies import check_plan


def test_paper_hierarchy_shapes_and_sharing():
  p = hierarchy(prefix=1024, problems=[200, 300, 250], samples_per_problem=4)
  assert p.num_sequences == 12 and p.order.tolist() == list(range(12))
  assert p.stats.nodes_per_level == (1, 3)
  assert p.levels[0].tokens.shape == (1, 1024) and p.levels[1].tokens.shape == (3, 384)
  assert p.levels[1].lengths.tolist() == [200, 300, 250]
  assert p.levels[1].start.tolist() == [1024] * 3 and p.levels[1].parent.tolist() == [0] * 3
  assert p.levels[1].owner.tolist() == [0] * 4 + [1] * 4 + [2] * 4
  assert p.suffix_lengths.tolist() == [0] * 12
  assert p.stats.stored_tokens == 1024 + 750
  seqs = [s.tolist() for s in p.sequences]
  assert seqs[0] == seqs[3] != seqs[4]
  check_plan(p, seqs, buckets=True, explicit=True)
  # The radix search finds the same tree from the token ids alone.
  q = plan(seqs, min_shared_tokens=0, merge_cost=0)
  assert q.stats.stored_tokens == p.stats.stored_tokens


def test_token_segments_and_deterministic_synthetic_tokens():
  tree = Node([1, 2, 3], [Node(5, [[7], [8, 9]]), [5], 6, []])
  p = from_tree(tree, buckets=None)
  seqs = [s.tolist() for s in p.sequences]
  assert [len(s) for s in seqs] == [9, 10, 4, 9, 3]
  assert all(s[:3] == [1, 2, 3] for s in seqs) and seqs[4] == [1, 2, 3]
  assert seqs[0][3:8] == seqs[1][3:8]
  again = from_tree(tree, buckets=None)
  assert [s.tolist() for s in again.sequences] == seqs
  other = from_tree(tree, buckets=None, seed=1)
  assert [s.tolist() for s in other.sequences] != seqs
  check_plan(p, seqs, explicit=True)


def test_forest_single_sequence_nodes_and_empty_nodes_fold():
  tree = [Node([4, 4], [[1], [2]]), Node([5], [Node([], [[6], [7]])]), Node([8, 8], [[9]])]
  p = from_tree(tree, buckets=None)
  seqs = [[4, 4, 1], [4, 4, 2], [5, 6], [5, 7], [8, 8, 9]]
  assert [s.tolist() for s in p.sequences] == seqs
  (lv,) = p.levels          # [5] is shared by two; its empty child node and [8, 8] (one) fold
  assert lv.tokens[:2, :2].tolist() == [[4, 4], [5, 0]] and lv.lengths.tolist() == [2, 1, 0]
  assert p.suffix_lengths.tolist() == [1, 1, 1, 1, 3]
  check_plan(p, seqs, explicit=True)


def test_cost_model_and_max_levels_apply_to_explicit_trees():
  p = hierarchy(prefix=64, problems=[8, 8], samples_per_problem=3, min_shared_tokens=20,
                buckets=None)
  assert p.stats.nodes_per_level == (1,)            # problems: 2*8 = 16 < 20 fold
  assert p.suffix_lengths.tolist() == [8] * 6
  q = hierarchy(prefix=64, problems=[8, 8], samples_per_problem=3, max_levels=1, buckets=None)
  assert q.stats.nodes_per_level == (1,)
  check_plan(p, [s.tolist() for s in p.sequences], min_shared_tokens=20, explicit=True)


@given(st.data())
def test_random_explicit_trees(data):
  counter = [0]

  def tree(depth):
    kids = []
    for _ in range(data.draw(st.integers(1, 3))):
      if depth < 3 and data.draw(st.booleans()):
        kids.append(tree(depth + 1))
      else:
        counter[0] += 1
        kids.append(data.draw(st.sampled_from([0, 1, 3, [1, 2], []])))
    return Node(data.draw(st.sampled_from([0, 1, 2, 5, [0, 0], [3]])), kids)

  root = tree(0)
  try:
    p = from_tree(root, vocab_size=3, buckets=None)
  except ValueError as e:
    assert "sequence is empty" in str(e)
    return
  seqs = [s.tolist() for s in p.sequences]
  assert len(seqs) == counter[0]
  check_plan(p, seqs, explicit=True)


@pytest.mark.parametrize("tree,message", [
    (Node([1], []), r"tree.children is empty"),
    (Node([1], [[2], [-3]]), r"tree.children\[1\]\[0\] = -3 is negative"),
    (Node(-4, [[1]]), r"tree.segment = -4 is negative"),
    (Node([1], [Node([2.5], [[1]])]), r"tree.children\[0\].segment\[0\] = 2.5 is not an integer"),
    (Node([], [[1], []]), r"tree.children\[1\]: this sequence is empty"),
    (Node([1], 5), r"tree.children must be a list"),
    ([], r"tree is an empty list"),
    ("abc", r"tree must be a Node"),
])
def test_bad_trees(tree, message):
  with pytest.raises(ValueError, match=message):
    from_tree(tree)


def test_bad_hierarchy_arguments():
  with pytest.raises(ValueError, match="problems is empty"):
    hierarchy(10, [], 2)
  with pytest.raises(ValueError, match="problems must be a list"):
    hierarchy(10, 3, 2)
  with pytest.raises(ValueError, match=r"samples_per_problem must be an int >= 1, got 0"):
    hierarchy(10, [5], 0)
  with pytest.raises(ValueError, match=r"samples_per_problem\[1\] must be an int >= 1"):
    hierarchy(10, [5, 5], [2, -1])
  with pytest.raises(ValueError, match="2 entries for 3 problems"):
    hierarchy(10, [5, 5, 5], [2, 2])
  with pytest.raises(ValueError, match="vocab_size"):
    hierarchy(10, [5], 2, vocab_size=0)


def test_docstring_example():
  import doctest
  from hydrax.sharing import explicit as module
  assert doctest.testmod(module, raise_on_error=True).attempted >= 3
