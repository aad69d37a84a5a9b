"""`plan`: from B token sequences to the sharing levels of `hydragen_attention`.

Pipeline: validate and concatenate the sequences (`_inputs`), build their radix tree
(`radix`: every prefix shared by >= 2 sequences where they branch or one ends), keep the nodes
that pay under the cost model below, fold the others into their children, and lay the kept
nodes out as levels (level d = kept nodes with d kept ancestors) plus one suffix per sequence.

Cost model, in key reads per decode step (one read = the K and V of one token, all KV heads):
a node shared by n sequences with L tokens, stored once instead of n times, saves (n-1)*L
reads; sharing it costs an extra attention pass (queries gathered, one product, a partial
output and LSE per sequence) and a merge term per sequence. The node pays, and is kept, iff

    n >= 2  and  L >= 1  and  (n - 1) * L >= min_shared_tokens + merge_cost * n

where L counts the node's own tokens plus those of folded ancestors above it. Defaults:
min_shared_tokens=1024 (about 4 MiB per layer with 8 KV heads of 128 dims in bf16, ~1 us of
H200 bandwidth: the order of an extra kernel pass; vLLM's cascade heuristic, >= 256 tokens
and >= 8 requests, is 1792) and merge_cost=16 (a partial output [H,D] in float32 written and
read back plus the query gathered, over one token's K and V [2,K,D] in bf16: about 2.5*H/K,
16 for H/K = 4..8). `min_shared_tokens=0, merge_cost=0` keeps every node with >= 2
sequences: the full radix tree. The rule is charged per node; a level of many small nodes
amortises its pass over all of them, so lower `min_shared_tokens` for such batches.

Decisions run top-down: a node that does not pay is folded into its children, whose segments
then start with its tokens (a child may pay with the longer segment); a leaf's folded tokens
join its suffix. `max_levels=k` keeps at most k shared levels: nodes that would sit deeper
are folded into their children, i.e. the deeper sharing ends up copied in the suffixes.

Tree nodes sit exactly where some sequence branches off or ends, so no sequence ends inside a
kept node: a sequence equal to a shared path (or to another sequence) has a length-0 suffix.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple, Optional

import numpy as np

from hydrax._log import log_once

from hydrax.sharing import buckets as buckets_lib
from hydrax.sharing import radix
from hydrax.sharing._inputs import Flat, flatten, read_rows

DEFAULT_MIN_SHARED_TOKENS = 1024
DEFAULT_MERGE_COST = 16


class PlanLevel(NamedTuple):
  """One shared level of a plan; rows are in plan order, N and S bucketed.

  tokens:  [N, S] int32 token ids of each node's segment, 0 past its length.
  lengths: [N] int32; empty and bucket-padding nodes have length 0.
  owner:   [B] int32 node of each sequence (plan order). Sequences whose path has no node at
           this depth all own one length-0 node (index = number of real nodes).
  parent:  [N] int32 index of the node's parent in the previous level; -1 at level 0 and for
           empty/padding nodes. The parent of a real node is a real node.
  start:   [N] int32 position of the node's first token in its sequences (0 for empty nodes).
  """
  tokens: np.ndarray
  lengths: np.ndarray
  owner: np.ndarray
  parent: np.ndarray
  start: np.ndarray


class StoredLayout(NamedTuple):
  """Every stored token once, in `dense_mask` column order: level 0's nodes (node order, each
  node's tokens in order), level 1's, ..., then the suffixes in plan order. [num_stored] each.

  tokens:    int32 token ids.
  positions: int32 position of the token within the sequences that attend to it.
  level:     int32 shared level, or len(plan.levels) for a suffix token.
  node:      int32 node index within its level, or the plan position for a suffix token.
  """
  tokens: np.ndarray
  positions: np.ndarray
  level: np.ndarray
  node: np.ndarray


@dataclasses.dataclass(frozen=True)
class PlanStats:
  """Summary of a plan (token counts are sums of real lengths, no padding).

  total_tokens:   tokens if every prefix were copied into every sequence (= sum of lengths).
  stored_tokens:  tokens the plan stores: its nodes once each, plus the suffixes.
  ratio:          total_tokens / stored_tokens (>= 1; x-fold saving in KV memory).
  radix_nodes, radix_tokens, radix_depth: nodes (shared by >= 2), stored tokens and most
                  nodes on one path of the full radix tree (what sharing every node gives).
  nodes_per_level: real nodes of each shared level; padded_shapes: (N, S) of each level.
  suffix_capacity: S_suffix; padded_tokens: sum of N*S over levels + B*S_suffix.
  saved_key_reads: sum over kept nodes of (n-1)*L, per decode step (per layer).
  longest_sequence: most tokens in one sequence; levels: number of shared levels.
  """
  num_sequences: int
  total_tokens: int
  stored_tokens: int
  ratio: float
  radix_nodes: int
  radix_tokens: int
  radix_depth: int
  levels: int
  nodes_per_level: tuple
  padded_shapes: tuple
  suffix_capacity: int
  padded_tokens: int
  saved_key_reads: int
  longest_sequence: int


class _Level(NamedTuple):
  """Compact form of one level (real nodes only, O(nodes)), from which PlanLevel is built."""
  seq: np.ndarray      # [n] input index of one sequence holding the node
  start: np.ndarray    # [n]
  length: np.ndarray   # [n]
  parent: np.ndarray   # [n] index into the previous level, -1 at level 0
  lo: np.ndarray       # [n] the node's sequences are plan positions lo..hi-1 (lo ascending)
  hi: np.ndarray
  num_nodes: int       # N (bucketed)
  capacity: int        # S (bucketed)

  def owner(self, b: int) -> np.ndarray:
    """[B] int32 node of each plan position; the empty node (index n) where none."""
    owner = np.full((b,), self.seq.size, np.int32)
    pos, which = _expand(self.lo, self.hi)
    owner[pos] = which
    return owner

  def node_at(self, p: int) -> int:
    """The real node holding plan position p, or -1."""
    j = int(np.searchsorted(self.lo, p, side="right")) - 1
    return j if j >= 0 and p < self.hi[j] else -1


def _frozen(*arrays):
  """Marks arrays read-only (a plan and its arrays are immutable); returns the first."""
  for a in arrays:
    a.flags.writeable = False
  return arrays[0]


def _expand(lo: np.ndarray, hi: np.ndarray):
  """Concatenated ranges lo[j]..hi[j]-1: (positions, j of each position)."""
  size = hi - lo
  which = np.repeat(np.arange(lo.size), size)
  pos = np.arange(int(size.sum()), dtype=np.int64) + np.repeat(lo - (np.cumsum(size) - size),
                                                               size)
  return pos, which


def _gather_padded(tokens: np.ndarray, base: np.ndarray, length: np.ndarray,
                   width: int) -> np.ndarray:
  """[R, width] int32: row r holds tokens[base[r] : base[r] + length[r]], then zeros."""
  rows = base.size
  out = np.zeros((rows, width), np.int32)
  if width == 0 or rows == 0 or tokens.size == 0:
    return out
  cols = np.arange(width)
  step = max(1, (1 << 20) // width)            # bounded temporaries
  for r0 in range(0, rows, step):
    r1 = min(rows, r0 + step)
    block = read_rows(tokens, base[r0:r1], width)
    block[cols >= length[r0:r1, None]] = 0
    out[r0:r1] = block
  return out


def _check_params(min_shared_tokens, merge_cost, max_levels, buckets):
  for name, value in (("min_shared_tokens", min_shared_tokens), ("merge_cost", merge_cost)):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
        or not np.isfinite(value) or value < 0:
      raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
  if max_levels is not None and (isinstance(max_levels, bool) or not isinstance(
      max_levels, (int, np.integer)) or max_levels < 0):
    raise ValueError(f"max_levels must be None or an int >= 0, got {max_levels!r}")
  if buckets is None:
    return buckets_lib.EXACT
  if not isinstance(buckets, buckets_lib.Buckets):
    raise ValueError(f"buckets must be a hydrax.sharing.Buckets or None, got "
                     f"{type(buckets).__name__}")
  return buckets


def plan(sequences, *, min_shared_tokens: float = DEFAULT_MIN_SHARED_TOKENS,
         merge_cost: float = DEFAULT_MERGE_COST, max_levels: Optional[int] = None,
         buckets: Optional[buckets_lib.Buckets] = buckets_lib.DEFAULT) -> "SharingPlan":
  """The sharing plan of B token-id sequences for `hydragen_attention`.

  sequences: a list of B token-id sequences (lists or 1-D integer arrays, ragged), or a 2-D
    integer array [B, L]. Token ids are integers in [0, 2^31); no sequence may be empty.
  min_shared_tokens, merge_cost: the cost model (module docstring): a radix-tree node of L
    tokens (its own plus those of folded ancestors) shared by n sequences is a shared level
    node iff n >= 2, L >= 1 and (n-1)*L >= min_shared_tokens + merge_cost*n; otherwise it is
    folded into its children. 0 and 0 share every node with >= 2 sequences.
  max_levels: at most this many shared levels (None: no limit; 0: suffixes only).
  buckets: padding policy of N and S (`hydrax.sharing.Buckets`); None gives exact shapes.

  Deterministic: the plan order is lexicographic order of the sequences (ties in input order).
  Time and memory are linear in the total number of tokens (see `radix`).
  """
  buckets = _check_params(min_shared_tokens, merge_cost, max_levels, buckets)
  flat = flatten(sequences)
  tree = radix.build(flat)
  return _make_plan(flat, tree, min_shared_tokens=min_shared_tokens, merge_cost=merge_cost,
                    max_levels=max_levels, buckets=buckets)


def _make_plan(flat: Flat, tree: radix.RadixTree, *, min_shared_tokens, merge_cost,
               max_levels, buckets) -> "SharingPlan":
  """Applies the cost model to `tree` and lays out the levels (see the module docstring)."""
  order = tree.order
  b = int(order.size)
  m = tree.num_nodes
  n = tree.hi - tree.lo
  lengths = flat.lengths
  cap = np.inf if max_levels is None else max_levels

  # Top-down over topological layers: nearest kept ancestor-or-self of each node.
  kept = np.zeros((m,), bool)
  level = np.full((m,), -1, np.int64)
  eff_start = np.zeros((m,), np.int64)     # start of the node's segment once folded
  up_kept = np.full((m,), -1, np.int64)    # nearest kept strict ancestor
  a_end = np.zeros((m,), np.int64)         # end / level / index of nearest kept ancestor-or-self
  a_lvl = np.full((m,), -1, np.int64)
  a_idx = np.full((m,), -1, np.int64)
  rdepth = np.zeros((m,), np.int64)
  by_gen = np.argsort(tree.gen, kind="stable")
  bounds = np.flatnonzero(np.diff(tree.gen[by_gen])) + 1
  for v in np.split(by_gen, bounds) if m else []:
    p = tree.parent[v]
    top = p < 0
    p = np.where(top, 0, p)
    base_end = np.where(top, 0, a_end[p])
    base_lvl = np.where(top, -1, a_lvl[p])
    base_idx = np.where(top, -1, a_idx[p])
    rdepth[v] = np.where(top, 1, rdepth[p] + 1)
    seg = tree.end[v] - base_end
    nv = n[v]
    lvl = base_lvl + 1
    pay = (nv >= 2) & (seg >= 1) & ((nv - 1) * seg >= min_shared_tokens + merge_cost * nv) & (
        lvl < cap)
    kept[v] = pay
    level[v] = np.where(pay, lvl, -1)
    eff_start[v] = base_end
    up_kept[v] = base_idx
    a_end[v] = np.where(pay, tree.end[v], base_end)
    a_lvl[v] = np.where(pay, lvl, base_lvl)
    a_idx[v] = np.where(pay, v, base_idx)

  num_levels = int(level.max(initial=-1)) + 1
  if num_levels == 0 and b >= 2 and cap > 0:
    _log_nothing_shared(tree.end, n, b, min_shared_tokens, merge_cost)
  index_in_level = np.full((m,), -1, np.int64)
  levels = []
  by_level = np.argsort(level, kind="stable")
  counts = np.bincount(level[level >= 0], minlength=num_levels)
  first_kept = m - int(counts.sum())
  for d, nodes in enumerate(np.split(by_level[first_kept:], np.cumsum(counts)[:-1])[:num_levels]):
    nodes = nodes[np.argsort(tree.lo[nodes], kind="stable")]
    real = nodes.size
    index_in_level[nodes] = np.arange(real)
    has_empty = int((tree.hi[nodes] - tree.lo[nodes]).sum()) < b
    seg_len = tree.end[nodes] - eff_start[nodes]
    parent = np.full((real,), -1, np.int64) if d == 0 else index_in_level[up_kept[nodes]]
    levels.append(_Level(
        seq=order[tree.lo[nodes]], start=eff_start[nodes], length=seg_len, parent=parent,
        lo=tree.lo[nodes], hi=tree.hi[nodes], num_nodes=buckets.nodes(real + has_empty),
        capacity=buckets.tokens(int(seg_len.max(initial=0)))))
  # A sequence's suffix starts at the end of the deepest kept node on its path: the nearest
  # kept ancestor-or-self of the deepest tree node holding it.
  leaf = tree.leaf_node
  suffix_start = np.where(leaf >= 0, a_end[np.maximum(leaf, 0)] if m else 0, 0)

  seq_len = lengths[order]
  suffix_lengths = seq_len - suffix_start
  suffix_capacity = buckets.tokens(int(suffix_lengths.max(initial=0)))
  kept_idx = np.flatnonzero(kept)
  seg_kept = tree.end[kept_idx] - eff_start[kept_idx]
  stored = int(seg_kept.sum() + suffix_lengths.sum())
  total = int(lengths.sum())
  radix_tokens = int((tree.end - tree.begin).sum() + (seq_len - tree.leaf_end).sum())
  stats = PlanStats(
      num_sequences=b, total_tokens=total, stored_tokens=stored, ratio=total / stored,
      radix_nodes=m, radix_tokens=radix_tokens, radix_depth=int(rdepth.max(initial=0)),
      levels=num_levels, nodes_per_level=tuple(int(lv.seq.size) for lv in levels),
      padded_shapes=tuple((lv.num_nodes, lv.capacity) for lv in levels),
      suffix_capacity=suffix_capacity,
      padded_tokens=int(sum(lv.num_nodes * lv.capacity for lv in levels) + b * suffix_capacity),
      saved_key_reads=int(((n[kept_idx] - 1) * seg_kept).sum()),
      longest_sequence=int(lengths.max()))
  _frozen(flat.tokens, flat.offsets, flat.lengths, order)
  suffix_lengths = _frozen(suffix_lengths.astype(np.int32))
  suffix_start = _frozen(suffix_start.astype(np.int32))
  for lv in levels:
    _frozen(*lv[:6])
  return SharingPlan(
      order=order, suffix_lengths=suffix_lengths, suffix_start=suffix_start, stats=stats,
      buckets=buckets, _flat=flat, _levels=tuple(levels), _suffix_capacity=suffix_capacity)


def _log_nothing_shared(end, sharers, b: int, min_shared_tokens, merge_cost) -> None:
  """Says once why a plan of several sequences has no shared level: the longest prefix that
  two or more of them share (radix node depth `end`, `sharers` sequences) against the rule."""
  common = np.flatnonzero(sharers >= 2)
  if common.size == 0:
    why = "no two sequences share a first token"
    key = ("plan-nothing-shared", 0, 0, min_shared_tokens, merge_cost)
  else:
    best = common[np.lexsort((-sharers[common], -end[common]))[0]]
    length, n = int(end[best]), int(sharers[best])
    need = min_shared_tokens + merge_cost * n
    why = (f"the longest common prefix has {length} tokens, shared by {n} of {b} sequences: "
           f"(n-1)*L = {(n - 1) * length} < min_shared_tokens + merge_cost*n = {need:g} "
           f"(min_shared_tokens={min_shared_tokens}, merge_cost={merge_cost}); lower "
           f"min_shared_tokens or merge_cost to share it")
    key = ("plan-nothing-shared", length, n, min_shared_tokens, merge_cost)
  log_once(key, "hydrax.sharing.plan: no shared level for %d sequences (hydragen attention "
           "will attend each sequence's whole prompt on its own): %s", b, why)


@dataclasses.dataclass(frozen=True, eq=False)
class SharingPlan:
  """How B sequences share their prefixes, as levels for `hydragen_attention`.

  Plan order: position i holds input sequence order[i]; sequences of a node are contiguous
  (depth-first order). Per-sequence arrays (owner, suffix_*) are in plan order; `sequences`
  and `dense_mask` rows are in input order. The keys of plan position i are, level by level,
  tokens[owner[i], :lengths[owner[i]]], then its suffix: exactly its input sequence.

  order:          [B] int64, order[i] = input index of the sequence at plan position i.
  levels:         tuple of PlanLevel, root first (empty when nothing is shared).
  suffix_tokens:  [B, S_suffix] int32 each sequence's own tokens after its last shared node,
                  0-padded (S_suffix bucketed).
  suffix_lengths: [B] int32 (0 for a sequence equal to a shared path).
  suffix_start:   [B] int32 position of the suffix's first token (sum of its shared lengths).
  stats:          PlanStats.
  buckets:        the padding policy the plan was made with (`hydrax.sharing.Buckets`); the
                  engine pads its caches and keys its compiled programs with the same one.
  `levels` and `suffix_tokens` are built on first use (they are the padded, larger arrays;
  the plan itself holds O(total tokens + nodes)). All arrays are read-only.
  """
  order: np.ndarray
  suffix_lengths: np.ndarray
  suffix_start: np.ndarray
  stats: PlanStats
  buckets: buckets_lib.Buckets
  _flat: Flat = dataclasses.field(repr=False)
  _levels: tuple = dataclasses.field(repr=False)
  _suffix_capacity: int = dataclasses.field(repr=False)

  # ---- the contract -----------------------------------------------------------------------
  @property
  def num_sequences(self) -> int:
    return int(self.order.size)

  @functools.cached_property
  def levels(self) -> tuple:
    out = []
    tokens = self._flat.tokens
    for lv in self._levels:
      real = lv.seq.size
      seg = _gather_padded(tokens, self._flat.offsets[lv.seq] + lv.start, lv.length,
                           lv.capacity)
      pad = lv.num_nodes - real
      level = PlanLevel(
          tokens=np.concatenate([seg, np.zeros((pad, lv.capacity), np.int32)]),
          lengths=np.concatenate([lv.length, np.zeros((pad,), np.int64)]).astype(np.int32),
          owner=lv.owner(self.num_sequences),
          parent=np.concatenate([lv.parent, np.full((pad,), -1, np.int64)]).astype(np.int32),
          start=np.concatenate([lv.start, np.zeros((pad,), np.int64)]).astype(np.int32))
      _frozen(*level)
      out.append(level)
    return tuple(out)

  @functools.cached_property
  def suffix_tokens(self) -> np.ndarray:
    return _frozen(_gather_padded(self._flat.tokens,
                                  self._flat.offsets[self.order] + self.suffix_start,
                                  self.suffix_lengths.astype(np.int64), self._suffix_capacity))

  @functools.cached_property
  def sequences(self) -> tuple:
    """The input sequences as int32 arrays (views), input order."""
    t, off, ln = self._flat
    return tuple(t[o:o + l] for o, l in zip(off.tolist(), ln.tolist()))

  @functools.cached_property
  def inverse_order(self) -> np.ndarray:
    """[B] int64 plan position of each input sequence: order[inverse_order[j]] == j."""
    inv = np.empty(self.order.shape, np.int64)
    inv[self.order] = np.arange(self.order.size)
    return _frozen(inv)

  def to_plan_order(self, x):
    """Rows of x (input order, leading axis B) in plan order: x[order]."""
    return x[self.order]

  def to_input_order(self, x):
    """Rows of x (plan order, leading axis B) back in input order."""
    return x[self.inverse_order]

  def node_range(self, level: int, node: int) -> tuple:
    """(lo, hi): plan positions lo..hi-1 own real node `node` of `level`."""
    lv = self._levels[level]
    return int(lv.lo[node]), int(lv.hi[node])

  # ---- the tree-shaped mask ---------------------------------------------------------------
  @property
  def num_stored_tokens(self) -> int:
    return self.stats.stored_tokens

  def stored_layout(self) -> StoredLayout:
    """Every stored token once, in `dense_mask` column order (see StoredLayout)."""
    toks, pos, lvls, nodes = [], [], [], []
    t, off, _ = self._flat
    parts = [(d, lv.seq, lv.start, lv.length) for d, lv in enumerate(self._levels)]
    parts.append((len(self._levels), self.order, self.suffix_start.astype(np.int64),
                  self.suffix_lengths.astype(np.int64)))
    for d, seq, start, length in parts:
      p, which = _expand(start, start + length)
      toks.append(t[off[seq][which] + p])
      pos.append(p)
      lvls.append(np.full(p.shape, d))
      nodes.append(which)
    cat = lambda xs: np.concatenate(xs).astype(np.int32)
    return StoredLayout(cat(toks), cat(pos), cat(lvls), cat(nodes))

  def dense_mask(self) -> np.ndarray:
    """[B, num_stored_tokens] bool, rows in INPUT order: mask[i, c] says that sequence i
    attends to stored token c (columns as in `stored_layout`). Row i selects exactly the
    tokens of sequence i, in order. Size B x stored tokens: meant for small plans."""
    layout = self.stored_layout()
    mask = np.zeros((self.num_sequences, layout.tokens.size), bool)
    inv = self.inverse_order
    for d, lv in enumerate(self._levels):
      cols = np.flatnonzero(layout.level == d)
      mask[:, cols] = lv.owner(self.num_sequences)[inv][:, None] == layout.node[cols][None, :]
    cols = np.flatnonzero(layout.level == len(self._levels))
    mask[:, cols] = inv[:, None] == layout.node[cols][None, :]
    return mask

  def kv_levels(self, kv_fn: Callable) -> list:
    """KVLevels for `hydragen_attention`: the shared levels, then the suffixes (owner=None).

    kv_fn(tokens [N,S] int32, positions [N,S] int32) -> (k, v), each [N,S,K,D]; positions
    past a node's length are extrapolated and their keys are masked by `lengths`.
    Queries passed with these levels must be in plan order (`to_plan_order`).
    """
    import jax.numpy as jnp
    from hydrax.attention import KVLevel
    out = []
    for lv in self.levels:
      s = lv.tokens.shape[1]
      k, v = kv_fn(lv.tokens, lv.start[:, None] + np.arange(s, dtype=np.int32))
      out.append(KVLevel(k, v, jnp.asarray(lv.lengths), lv.owner))
    s = self.suffix_tokens.shape[1]
    k, v = kv_fn(self.suffix_tokens, self.suffix_start[:, None] + np.arange(s, dtype=np.int32))
    out.append(KVLevel(k, v, jnp.asarray(self.suffix_lengths), None))
    return out

  # ---- text -------------------------------------------------------------------------------
  def render(self, *, max_lines: int = 60, max_tokens: int = 8, max_leaves: int = 4) -> str:
    """The kept tree as indented text: a header (counts, padded shapes), then one line per
    node (level#index, token positions, length, sharers, first tokens) and per sequence
    (input index, suffix). At most max_leaves sequences are listed under a node (then the
    last one), at most max_tokens tokens per line and about max_lines tree lines."""
    from hydrax.sharing._render import render
    return render(self, max_lines=max_lines, max_tokens=max_tokens, max_leaves=max_leaves)

  def __str__(self) -> str:
    return self.render()
