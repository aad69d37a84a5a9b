"""The compressed prefix (radix) tree of B token sequences, built with vectorised NumPy.

Algorithm (a most-significant-digit radix sort that stops where sequences stop sharing):
sequences that agree on their first `depth` tokens form an open group, contiguous in `order`.
Each round reads the next C tokens of every member of every open group (one gather of whole
rows) and compares each member with a leader of its group (a member picked by a fixed hash,
so that no input order makes every round's leader a bad one). A member's first column that
differs from the leader, f (C if none), places it in the tree along the leader's path:

- the distinct f < C of a group are the nodes along the leader's path in this window (each
  ends at depth + f); if the leader ends inside the window, the members that agree with it
  throughout end there too (identical sequences), closing one more node;
- members that leave the leader's path at column f are sorted by their token there (left of
  the leader's token: before the leader's branch; right: after it); each run of >= 2 with the
  same token opens a new group one token deeper; runs of one, and members that end at f, are
  leaves;
- members that agree with the leader through the window continue as one group C tokens on.

Every node and every reordering is exact (token comparisons, no hashing of contents). Work is
O(tokens read) = O(total tokens + C per round per member), memory O(total tokens + one round's
window, bounded by _ROUND_ELEMENTS), Python steps O(rounds). Rounds are about max_depth / C
plus the rounds in which members branch off the leader's path: few, as a member leaves the
path only at a split where the (pseudo-random) leader went elsewhere. The order is
lexicographic (a prefix before its extensions, identical sequences in input order):
deterministic.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from hydrax.sharing._inputs import Flat, read_rows

# Tokens gathered per round (members x columns): bounds the temporaries and sets C.
_ROUND_ELEMENTS = 1 << 22
_MIN_COLUMNS, _MAX_COLUMNS = 16, 1024


class RadixTree(NamedTuple):
  """Compressed prefix tree; nodes are the prefixes shared by >= 2 sequences.

  order:  [B] int64, depth-first (lexicographic) order: order[p] is the input index of the
          sequence at position p. Every node's sequences are contiguous in it.
  lo, hi: [M] int64, node m holds the sequences order[lo[m]:hi[m]] (hi - lo >= 2).
  begin, end: [M] int64, node m's segment is tokens [begin, end) of each of its sequences;
          begin = end of its parent (0 at the top), end > begin.
  parent: [M] int64, index of the parent node, -1 under the root; parent[m] < m.
  gen:    [M] int64, a topological layer: gen[parent[m]] < gen[m].
  leaf_end: [B] int64, per position of `order`: the end of the deepest node holding that
          sequence (0 if none); its tokens from there on are its own (its leaf edge).
  leaf_node: [B] int64, per position of `order`: that deepest node (-1 if none).
  """
  order: np.ndarray
  lo: np.ndarray
  hi: np.ndarray
  begin: np.ndarray
  end: np.ndarray
  parent: np.ndarray
  gen: np.ndarray
  leaf_end: np.ndarray
  leaf_node: np.ndarray

  @property
  def num_nodes(self) -> int:
    return int(self.lo.size)


def _empty_tree(order: np.ndarray) -> RadixTree:
  z = np.zeros((0,), np.int64)
  return RadixTree(order, z, z, z, z, z, z, np.zeros(order.shape, np.int64),
                   np.full(order.shape, -1, np.int64))


def _exclusive_cumsum_by_group(values: np.ndarray, group: np.ndarray) -> np.ndarray:
  """Exclusive running sum of `values` within runs of equal `group` (group sorted)."""
  if not group.size:
    return values.copy()
  total = np.cumsum(values)
  before = total - values
  head = np.flatnonzero(np.concatenate([[True], group[1:] != group[:-1]]))
  size = np.diff(np.append(head, group.size))
  return before - np.repeat(before[head], size)


def build(flat: Flat) -> RadixTree:
  """The radix tree of the sequences in `flat` (see the module docstring)."""
  tokens, offsets, lengths = flat
  b = int(lengths.size)
  order = np.arange(b, dtype=np.int64)
  leaf_end = np.zeros((b,), np.int64)
  leaf_node = np.full((b,), -1, np.int64)
  if b < 2:
    return _empty_tree(order)
  # Open groups: positions order[g_lo : g_lo + g_n] share g_depth tokens; their enclosing
  # node is g_parent (-1: the root), whose segment ends at g_begin.
  g_lo = np.zeros((1,), np.int64)
  g_n = np.full((1,), b, np.int64)
  g_depth = np.zeros((1,), np.int64)
  g_parent = np.full((1,), -1, np.int64)
  g_begin = np.zeros((1,), np.int64)
  out = {k: [] for k in ("lo", "hi", "begin", "end", "parent", "gen")}
  num_nodes = 0
  rnd = 0
  while g_lo.size:
    n_groups = g_lo.size
    members = int(g_n.sum())
    cols = int(np.clip(_ROUND_ELEMENTS // members, _MIN_COLUMNS, _MAX_COLUMNS))
    mstart = np.cumsum(g_n) - g_n                      # each group's first row
    gidx = np.repeat(np.arange(n_groups), g_n)         # group of each row
    rows = np.arange(members)
    pos = rows + np.repeat(g_lo - mstart, g_n)         # row -> position in `order`
    seq = order[pos]
    depth = g_depth[gidx]
    tok = read_rows(tokens, offsets[seq] + depth, cols)   # [A, C] the next C tokens per row
    tok[np.arange(cols) >= (lengths[seq] - depth)[:, None]] = -1   # -1 past the end
    lead = tok[mstart + (((g_lo * 0x9E3779B1) ^ (g_depth * 0x85EBCA77)) & 0x7FFFFFFF) % g_n]
    lead_g = np.repeat(lead, g_n, axis=0)
    neq = tok != lead_g
    first = neq.argmax(axis=1)
    first[~neq[rows, first]] = cols                    # f: first column off the leader's path
    del neq
    fc = np.minimum(first, cols - 1)
    x = tok[rows, fc]                                  # the member's token at f
    lx = lead_g[rows, fc]                              # the leader's token at f
    del tok, lead_g
    lead_end = lead < 0
    e = np.where(lead_end.any(axis=1), lead_end.argmax(axis=1), cols)   # leader ends at e
    off = first < cols                                 # members leaving the leader's path
    left = off & (x < lx)
    lsize = g_n - np.bincount(gidx[off], minlength=n_groups)   # members on the path

    # Nodes along each leader's path: one per distinct (group, f) of members leaving it, plus
    # (group, e) where >= 2 members end with the leader at e (identical sequences).
    key = gidx[off] * (cols + 1) + first[off]
    ukey, inv = np.unique(key, return_inverse=True)
    n_left = np.bincount(inv, weights=left[off], minlength=ukey.size).astype(np.int64)
    n_off = np.bincount(inv, minlength=ukey.size)
    ekey = np.arange(n_groups) * (cols + 1) + e
    ident = (e < cols) & (lsize >= 2) & ~np.isin(ekey, ukey)
    ckey = np.concatenate([ukey, ekey[ident]])
    srt = np.argsort(ckey, kind="stable")
    ckey = ckey[srt]
    c_left = np.concatenate([n_left, np.zeros(int(ident.sum()), np.int64)])[srt]
    c_right = np.concatenate([n_off - n_left, np.zeros(int(ident.sum()), np.int64)])[srt]
    done = np.zeros((n_groups,), bool)
    if ckey.size:
      cg, cf = ckey // (cols + 1), ckey % (cols + 1)
      c_first = np.concatenate([[True], cg[1:] != cg[:-1]])
      c_lo = g_lo[cg] + _exclusive_cumsum_by_group(c_left, cg)
      c_hi = g_lo[cg] + g_n[cg] - _exclusive_cumsum_by_group(c_right, cg)
      prev_f = np.concatenate([[0], cf[:-1]])
      c_begin = np.where(c_first, g_begin[cg], g_depth[cg] + prev_f)
      c_end = g_depth[cg] + cf
      c_valid = c_end > c_begin                          # false only for a split at the root
      c_id = np.full(ckey.shape, -1, np.int64)
      c_id[c_valid] = num_nodes + np.arange(int(c_valid.sum()))
      num_nodes += int(c_valid.sum())
      prev_id = np.concatenate([[-1], c_id[:-1]])
      c_parent = np.where(c_first | (prev_id < 0), g_parent[cg], prev_id)
      c_node = np.where(c_valid, c_id, c_parent)         # node that children hang under
      rank = np.arange(ckey.size) - np.repeat(np.flatnonzero(c_first),
                                              np.diff(np.append(np.flatnonzero(c_first),
                                                                ckey.size)))
      out["lo"].append(c_lo[c_valid])
      out["hi"].append(c_hi[c_valid])
      out["begin"].append(c_begin[c_valid])
      out["end"].append(c_end[c_valid])
      out["parent"].append(c_parent[c_valid])
      out["gen"].append((rnd * (_MAX_COLUMNS + 2) + rank)[c_valid])

      # Groups with a node this round are done: reorder their members (left of the path by
      # (f, token), the path, right of it by (-f, token)) and open their children.
      done[cg] = True
      last = np.flatnonzero(np.append(c_first[1:], True))   # each done group's deepest entry
      last_node = np.full((n_groups,), -1, np.int64)
      last_node[cg[last]] = c_node[last]
      last_end = np.zeros((n_groups,), np.int64)
      last_end[cg[last]] = c_end[last]
      r = np.flatnonzero(done[gidx])
      rg, roff, rleft = gidx[r], off[r], left[r]
      side = np.where(roff, np.where(rleft, 0, 2), 1)
      fkey = np.where(roff, np.where(rleft, first[r], -first[r]), 0)
      xkey = np.where(roff, x[r], 0)
      perm = np.lexsort((xkey, fkey, side, rg))
      rpos = pos[r]                                      # ascending within each group
      order[rpos] = seq[r[perm]]
      rg, side, fkey, xkey, rf = rg[perm], side[perm], fkey[perm], xkey[perm], first[r][perm]
      change = np.concatenate([[True], (rg[1:] != rg[:-1]) | (side[1:] != side[:-1]) |
                               (fkey[1:] != fkey[:-1]) | (xkey[1:] != xkey[:-1])])
      head = np.flatnonzero(change)
      size = np.diff(np.append(head, rg.size))
      hg, hside, hf, hx = rg[head], side[head], rf[head], xkey[head]
      on_path = hside == 1
      hentry = np.searchsorted(ckey, hg * (cols + 1) + np.minimum(hf, cols))
      hentry = np.minimum(hentry, ckey.size - 1)
      opens = ~on_path & (size >= 2) & (hx >= 0)
      path_opens = on_path & (size >= 2) & (e[hg] == cols)
      leaf_at = np.where(on_path, last_end[hg], g_depth[hg] + hf)
      is_leaf = np.repeat(~(opens | path_opens), size)
      leaf_end[rpos[is_leaf]] = np.repeat(leaf_at, size)[is_leaf]
      leaf_node[rpos[is_leaf]] = np.repeat(np.where(on_path, last_node[hg], c_node[hentry]),
                                           size)[is_leaf]
      new = (np.concatenate([rpos[head[opens]], rpos[head[path_opens]]]),
             np.concatenate([size[opens], size[path_opens]]),
             np.concatenate([g_depth[hg[opens]] + hf[opens] + 1, g_depth[hg[path_opens]] + cols]),
             np.concatenate([c_node[hentry[opens]], last_node[hg[path_opens]]]),
             np.concatenate([c_end[hentry[opens]], last_end[hg[path_opens]]]))
    else:
      new = tuple(np.zeros((0,), np.int64) for _ in range(5))
    cont = ~done
    g_lo, g_n, g_depth, g_parent, g_begin = (
        np.concatenate([a[cont], n]) for a, n in zip(
            (g_lo, g_n, g_depth + cols, g_parent, g_begin), new))
    rnd += 1

  cat = {k: np.concatenate(v).astype(np.int64) for k, v in out.items()}
  return RadixTree(order, cat["lo"], cat["hi"], cat["begin"], cat["end"], cat["parent"],
                   cat["gen"], leaf_end, leaf_node)
