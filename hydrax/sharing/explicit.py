"""Explicit sharing hierarchies: plans from a tree the caller states, no radix search.

The paper's experiments share by construction: one few-shot prefix, then problem statements,
then n samples per problem. `hierarchy` builds that plan directly; `from_tree` takes any tree.
A segment is either token ids (a list or 1-D integer array) or an int: that many synthetic
token ids (uniform in [0, vocab_size), deterministic for a given `seed`), so no tokeniser is
needed for benchmarks.

    >>> from hydrax.sharing import Node, from_tree, hierarchy
    >>> p = hierarchy(prefix=1024, problems=[256] * 8, samples_per_problem=16)
    >>> p.num_sequences, p.stats.nodes_per_level, int(p.suffix_lengths.max())
    (128, (1, 8), 0)
    >>> q = from_tree(Node([1, 2, 3], [Node(40, [[7], [8, 9]]), [5], 6]))
    >>> [len(s) for s in q.sequences]
    [44, 45, 4, 9]

The tree is honoured as given: sequences are numbered depth-first (leaf order), so `order` is
the identity, and a node is a shared level iff it passes the cost model, whose defaults here
keep every node with >= 2 sequences and >= 1 token (min_shared_tokens=0, merge_cost=0).
Nodes of one sequence or of no tokens fold into their children as in `plan`. Identical token
segments in sibling nodes are not merged (use `plan` on `q.sequences` for that).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import numpy as np

from hydrax.sharing import buckets as buckets_lib
from hydrax.sharing import planning as plan_lib
from hydrax.sharing import radix
from hydrax.sharing._inputs import Flat, check_segment

Segment = Union[int, Sequence[int], np.ndarray]


class Node(NamedTuple):
  """A shared segment and what follows it: child Nodes, or leaves (one sequence each, whose
  own tokens after this node are the leaf's segment, possibly empty)."""
  segment: Segment
  children: Sequence


def _segment(seg, name: str, rng: np.random.Generator, vocab_size: int) -> np.ndarray:
  if isinstance(seg, (int, np.integer)) and not isinstance(seg, (bool, np.bool_)):
    if seg < 0:
      raise ValueError(f"{name} = {int(seg)} is negative; an int segment is a number of "
                       "synthetic tokens (>= 0)")
    return rng.integers(0, vocab_size, size=int(seg), dtype=np.int32)
  return check_segment(seg, name, allow_empty=True)


def _walk(root, rng, vocab_size):
  """Depth-first: per leaf its token pieces, the end of and the node it hangs under; per node
  [lo, hi, begin, end, parent, depth]."""
  pieces, leaf_end, leaf_node = [], [], []
  nodes = []                                   # [lo, hi, begin, end, parent, depth]
  if isinstance(root, Node):
    stack = [(root, "tree", -1, 0, (), 0)]
  elif isinstance(root, (list, tuple)):
    if not root:
      raise ValueError("tree is an empty list; pass a Node or a non-empty list of Nodes/leaves")
    stack = [(c, f"tree[{i}]", -1, 0, (), 0) for i, c in enumerate(root)][::-1]
  else:
    raise ValueError(f"tree must be a Node or a list of Nodes and leaves, got "
                     f"{type(root).__name__}")
  # A ("close", node) marker follows each node's subtree on the stack: then its hi is known.
  while stack:
    item = stack.pop()
    if item[0] == "close":
      nodes[item[1]][1] = len(pieces)
      continue
    x, name, parent, begin, path, depth = item
    if isinstance(x, Node):
      seg = _segment(x.segment, f"{name}.segment", rng, vocab_size)
      children = x.children
      if isinstance(children, (Node, str, bytes)) or not isinstance(children, (list, tuple)):
        raise ValueError(f"{name}.children must be a list of Nodes and leaves, got "
                         f"{type(children).__name__}")
      if not children:
        raise ValueError(f"{name}.children is empty; a Node needs at least one child (a leaf "
                         "[] ends a sequence at the node)")
      me = len(nodes)
      end = begin + seg.size
      nodes.append([len(pieces), -1, begin, end, parent, depth])
      stack.append(("close", me))
      sub = path + (seg,)
      for i in range(len(children) - 1, -1, -1):
        stack.append((children[i], f"{name}.children[{i}]", me, end, sub, depth + 1))
    else:
      seg = _segment(x, name, rng, vocab_size)
      if begin + seg.size == 0:
        raise ValueError(f"{name}: this sequence is empty (no tokens on its path)")
      pieces.append(path + (seg,))
      leaf_end.append(begin)
      leaf_node.append(parent)
  return pieces, nodes, leaf_end, leaf_node


def from_tree(tree, *, min_shared_tokens: float = 0, merge_cost: float = 0,
              max_levels: Optional[int] = None,
              buckets: Optional[buckets_lib.Buckets] = buckets_lib.DEFAULT,
              vocab_size: int = 32000, seed: int = 0) -> plan_lib.SharingPlan:
  """The plan of an explicit tree (see the module docstring).

  tree: a Node, or a list of Nodes and leaves (under an empty root). Node(segment, children);
    a leaf is a segment; a segment is token ids or an int (that many synthetic tokens).
  Sequence i is the i-th leaf depth-first: the concatenation of the segments on its path.
  Other options as in `plan`.
  """
  buckets = plan_lib._check_params(min_shared_tokens, merge_cost, max_levels, buckets)
  if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or not (
      1 <= vocab_size <= 2**31):
    raise ValueError(f"vocab_size must be an int in [1, 2^31], got {vocab_size!r}")
  rng = np.random.default_rng(seed)
  pieces, nodes, leaf_end, leaf_node = _walk(tree, rng, int(vocab_size))
  b = len(pieces)
  lengths = np.fromiter((sum(p.size for p in ps) for ps in pieces), np.int64, b)
  offsets = np.zeros((b,), np.int64)
  np.cumsum(lengths[:-1], out=offsets[1:])
  tokens = np.concatenate([p for ps in pieces for p in ps]).astype(np.int32, copy=False)
  flat = Flat(tokens, offsets, lengths)
  cols = np.asarray(nodes, np.int64).reshape(-1, 6)
  tr = radix.RadixTree(order=np.arange(b, dtype=np.int64), lo=cols[:, 0], hi=cols[:, 1],
                       begin=cols[:, 2], end=cols[:, 3], parent=cols[:, 4], gen=cols[:, 5],
                       leaf_end=np.asarray(leaf_end, np.int64),
                       leaf_node=np.asarray(leaf_node, np.int64))
  return plan_lib._make_plan(flat, tr, min_shared_tokens=min_shared_tokens,
                             merge_cost=merge_cost, max_levels=max_levels, buckets=buckets)


def hierarchy(prefix: Segment, problems: Sequence[Segment],
              samples_per_problem: Union[int, Sequence[int]], *, sample_tokens: Segment = 0,
              **options) -> plan_lib.SharingPlan:
  """Few-shot prefix -> problems -> samples: Node(prefix, [Node(problem, [sample] * n)]).

  prefix: the segment every sequence starts with; problems: one segment per problem;
  samples_per_problem: n (or one n per problem), the sequences under each problem;
  sample_tokens: each sample's own prompt tokens after its problem: token ids (the same for
  every sample), or an int (that many synthetic tokens, drawn afresh for each sample). The
  default 0: the samples of a problem are identical prompts, told apart only by what they
  generate. Sequences are numbered problem
  by problem. `options` go to `from_tree` (cost model, max_levels, buckets, vocab_size, seed).
  """
  if isinstance(problems, (int, np.integer)) or not isinstance(problems, (list, tuple)):
    raise ValueError(f"problems must be a list of segments (token ids or lengths), got "
                     f"{problems!r}")
  if not problems:
    raise ValueError("problems is empty; pass at least one problem")
  scalar = not isinstance(samples_per_problem, (list, tuple, np.ndarray))
  counts = [samples_per_problem] * len(problems) if scalar else list(samples_per_problem)
  if len(counts) != len(problems):
    raise ValueError(f"samples_per_problem has {len(counts)} entries for {len(problems)} "
                     "problems")
  for i, c in enumerate(counts):
    if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 1:
      raise ValueError(f"samples_per_problem{'' if scalar else f'[{i}]'} must be an int >= 1, "
                       f"got {c!r}")
  return from_tree(Node(prefix, [Node(pr, [sample_tokens] * int(c))
                                 for pr, c in zip(problems, counts)]), **options)
