"""Row layout of one attention level for the grouped kernels: rows sorted by node, cut in tiles.

Axis letters: B sequences, T queries per sequence, H = K*G query heads, K KV heads, D head dim,
N nodes of the level, R = B*T*G rows per KV head, M rows per tile (block_m).

For each KV head the kernel sees R rows of queries: the T*G rows (t, g) of every sequence,
sequences sorted (stably) by their node. The rows of a node are contiguous and are cut into
tiles of at most M rows, so that every tile belongs to one node; a node with no sequence has no
tile. The tiles carry (node, first row, row count); the kernel loops over the node's keys up to the
largest key limit of the tile's rows and masks keys only in blocks past the smallest.

Everything here is plain NumPy when the owners are concrete (a static layout: exactly the tiles
needed, no sort at run time) and `jnp` when they are traced: a runtime tile table (argsort,
counts per node, tile starts) whose length is the static bound (R + min(N, B) * (M - 1)) // M;
the unused tiles have count 0 and their programs exit at once. Such a table depends on the
owners' values only, so a new tree of the same shapes runs the same compiled program.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax.numpy as jnp
import numpy as np

from hydrax.attention.checks import concrete


class Layout(NamedTuple):
  """Row layout of a level (see the module docstring).

  order:    [B] int32, the sequences in row order (sorted by node), or None for the identity.
  node, start, count: [num_tiles] int32, each tile's node, first row and number of rows.
  num_tiles: static number of tiles (a bound when the owners are traced).
  block_m:  M, rows per tile.
  """
  order: Optional[object]
  node: object
  start: object
  count: object
  num_tiles: int
  block_m: int


def _tiles(xp, counts, rows_per_seq: int, block_m: int, num_tiles: int):
  """Tiles of nodes holding counts[n] sequences of rows_per_seq rows each, rows in node order."""
  rows = counts * rows_per_seq
  row_start = xp.cumsum(rows) - rows
  ntiles = (rows + block_m - 1) // block_m
  tiles_end = xp.cumsum(ntiles)
  tile = xp.arange(num_tiles)
  if xp is np:
    node = np.searchsorted(tiles_end, tile, side="right")
  else:
    # One fused comparison instead of the default binary search's loop of small launches
    # (these tables are small: num_tiles x N compares), else a sort-based search.
    method = "compare_all" if num_tiles * counts.shape[0] <= (1 << 22) else "sort"
    node = jnp.searchsorted(tiles_end, tile, side="right", method=method)
  used = node < counts.shape[0]
  node = xp.minimum(node, counts.shape[0] - 1)
  j = tile - (tiles_end[node] - ntiles[node])          # tile index within its node
  start = row_start[node] + j * block_m
  count = xp.where(used, xp.clip(rows[node] - j * block_m, 0, block_m), 0)
  start = xp.where(used, start, 0)
  return node.astype(np.int32), start.astype(np.int32), count.astype(np.int32)


def make_layout(owner, num_nodes: int, batch: int, rows_per_seq: int, block_m: int) -> Layout:
  """Layout of B sequences of rows_per_seq = T*G rows each over N nodes.

  owner: [B] int node of each sequence (NumPy, concrete or traced jax array), or None when
  N == B and sequence b owns node b. Raises ValueError for a bad static configuration.
  """
  if block_m < 1 or rows_per_seq < 1:
    raise ValueError(f"block_m ({block_m}) and rows per sequence ({rows_per_seq}) must be >= 1")
  if owner is None:
    if num_nodes != batch:
      raise ValueError(f"owner is None (one node per sequence) but N={num_nodes} != B={batch}")
    owner_np = np.arange(batch)
  else:
    owner_np = np.zeros((batch,), np.int64) if num_nodes == 1 else concrete(owner)
  if owner_np is not None:
    owner_np = np.asarray(owner_np, np.int64).reshape(batch)
    counts = np.bincount(owner_np, minlength=num_nodes)
    order = np.argsort(owner_np, kind="stable")
    is_identity = bool(np.array_equal(order, np.arange(batch)))
    rows = counts * rows_per_seq
    num_tiles = int(((rows + block_m - 1) // block_m).sum())
    node, start, count = _tiles(np, counts, rows_per_seq, block_m, num_tiles)
    return Layout(None if is_identity else order.astype(np.int32), node, start, count,
                  num_tiles, block_m)
  owner = jnp.asarray(owner).astype(jnp.int32)
  counts = jnp.zeros((num_nodes,), jnp.int32).at[owner].add(1)
  order = jnp.argsort(owner, stable=True).astype(jnp.int32)
  num_tiles = (batch * rows_per_seq + min(num_nodes, batch) * (block_m - 1)) // block_m
  node, start, count = _tiles(jnp, counts, rows_per_seq, block_m, num_tiles)
  return Layout(order, node, start, count, num_tiles, block_m)
