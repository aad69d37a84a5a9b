"""Static plan, cost rule and run-time work list of the fused decode kernel (`fused_triton`).

Axis letters: B sequences, T queries per sequence, H = K*G query heads, K KV heads, D head dim,
N nodes of a level, S a level's key capacity, Lv levels, W work items, P key splits of a level,
NP = sum of P over levels (partial results per query), C sequences per tile, M rows per tile.

Pure functions, no Triton: everything here runs (and is tested) on CPU.

The kernel sees, per KV head, the T*G query rows (t, g) of each sequence, padded to TGp (a
power of two). A *work item* is (level, node, first sequence, sequence count, KV head, split,
key end): the rows of `count` consecutive sequences of the level's row order (all owned by `node`)
attend the keys [split * chunk, key end) of that node, key end = min((split + 1) * chunk,
the largest key limit of those rows). A shared level in "shared" mode stacks up to C sequences
of one node into a tile (M = C * TGp rows: Hydragen's inter-sequence batching, the node's keys
read once per tile); a per-sequence level (owner None), or any level in "per_sequence" mode,
has one sequence per item (its own node: the prefix is read once per sequence, as with the
prefix copied, but without the copy).

Every sequence receives exactly NP partial results per KV head (one per level and split, an
empty one as lse = -inf); the kernel merges them when the last arrives (a ticket per (b, kh)).

Work list (`work_list`): computed at run time in `jnp` from the owners and the key limits
(traced values: a new tree of the same shapes reuses the compiled program), or in NumPy when
both are concrete. Items are sorted by estimated cost, heaviest first (the long shared-prefix
tiles start first; the short per-sequence items fill the gaps at the end), items with no
sequence last. The kernel's persistent programs take items i, i + grid, i + 2*grid, ...
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Sequence

import jax.numpy as jnp
import numpy as np

from hydrax.attention.checks import concrete
from hydrax.attention.kernels import grouping

# Roofline of the H200 (the project's reference GPU): HBM 4.22 TB/s, dense bf16 805 TFLOP/s.
# Per key and query row an item does 4*D flops; per key it reads 2*D values of k and v, so a
# tile of M rows is matrix bound when M exceeds ~ (805e12 / 4.22e12) * itemsize / 2 rows.
HBM_BYTES_PER_S = 4.22e12
BF16_FLOPS_PER_S = 805e12
BALANCE_ROWS = BF16_FLOPS_PER_S / HBM_BYTES_PER_S   # ~190 rows (bf16: 4D flops vs 4D bytes)
ITEM_OVERHEAD_KEYS = 64      # fixed cost of an item (its loads, partial write, ticket), in keys

# Cost rule (see `choose_mode`): sharing a level pays when the key/value bytes it avoids
# reading (one read per node instead of one per sequence) exceed this many bytes. Measured on
# the H200 by experiments/check_fused_h200.py (fused shared vs fused per-sequence, T=1, 32/8
# heads, D=128, bf16; experiments/results/fused_h200/run1, run2): per-sequence won at a
# saving of 63 MB (1K/16: 76.9 vs 79.3 us), sharing at 264 MB (1K/64: 188.0 vs 192.6 us) and
# above (4K/256: 352 vs 1561 us). 128 MiB sits between the two (their geometric mean).
SHARING_CROSSOVER_BYTES = 128 << 20

ITEM_FIELDS = ("level", "node", "start", "count", "kv_head", "split", "key_end")
NUM_FIELDS = len(ITEM_FIELDS)
MAX_LEVELS = 4


def pow2_at_least(x: int, low: int = 1) -> int:
  return max(low, 1 << max(0, int(x) - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class LevelPlan:
  """Static plan of one level (see the module docstring)."""
  shared: bool          # tiles of several sequences of one node (else one sequence per item)
  seqs_per_tile: int    # C (1 when not shared)
  block_m: int          # M = rows per tile (>= 16, a multiple of TGp)
  num_tiles: int        # tiles of the level: exact for concrete owners, a bound for traced
  splits: int           # P
  chunk: int            # keys per split (a multiple of block_n)
  part_base: int        # index of the level's first partial result among NP


@dataclasses.dataclass(frozen=True)
class Plan:
  levels: tuple         # LevelPlan per level
  mode: str             # "shared" or "per_sequence"
  batch: int            # B
  queries: int          # T
  groups: int           # G
  kv_heads: int         # K
  tgp: int              # TGp, query rows per sequence padded to a power of two
  parts: int            # NP
  num_items: int        # W
  block_n: int          # keys per block
  grid: int             # persistent programs


class LevelShape(NamedTuple):
  """Static facts of a level for planning: N nodes, S capacity, whether it has an owner (a
  shared level), and its owner as NumPy when concrete (None otherwise)."""
  nodes: int
  capacity: int
  has_owner: bool
  static_owner: Optional[np.ndarray] = None


def sharing_saved_bytes(q_shape, shapes: Sequence[LevelShape], itemsize: int) -> int:
  """Key/value bytes that sharing avoids reading: per shared level, (B - min(N, B)) node
  reads of S keys x K heads x D x (k and v)."""
  b, _, _, d = q_shape
  saved = 0
  for s in shapes:
    if s.has_owner:
      saved += (b - min(s.nodes, b)) * s.capacity
  return saved * 2 * d * itemsize


def choose_mode(q_shape, shapes: Sequence[LevelShape], kv_heads: int, itemsize: int,
                crossover_bytes: int = SHARING_CROSSOVER_BYTES) -> str:
  """The cost rule: "shared" when the bytes sharing saves (`sharing_saved_bytes`, all KV
  heads) reach `crossover_bytes`, else "per_sequence" (every level read per sequence: no
  sorting of rows, no tile table; one item per sequence, KV head and split). A pure function
  of static shapes and the measured constant."""
  if crossover_bytes < 0:
    raise ValueError(f"crossover_bytes must be >= 0, got {crossover_bytes}")
  saved = sharing_saved_bytes(q_shape, shapes, itemsize) * kv_heads
  return "shared" if saved > 0 and saved >= crossover_bytes else "per_sequence"


def _splits(items: int, capacity: int, block_n: int, slots: int, min_blocks: int) -> tuple:
  """(P, chunk): enough splits that this level's items fill `slots` programs, each split at
  least `min_blocks` key blocks."""
  nblk = max(1, -(-capacity // block_n))
  p = max(1, min(-(-slots // max(1, items)), nblk // max(1, min_blocks)))
  bps = -(-nblk // p)
  return -(-nblk // bps), bps * block_n


def make_plan(q_shape, kv_heads: int, shapes: Sequence[LevelShape], *, mode: str,
              block_n: int = 64, max_block_m: int = 64, num_sms: int = 132,
              programs_per_sm: int = 1, min_blocks_per_split: int = 8,
              splits: Optional[int] = None) -> Plan:
  """The static plan of a call (all Python ints: part of the compile key).

  mode: "shared" or "per_sequence" (see `choose_mode`). splits: force P for every level
  (tests), else chosen so that each level alone fills num_sms * programs_per_sm programs.
  """
  b, t, h, _ = q_shape
  if mode not in ("shared", "per_sequence"):
    raise ValueError(f"mode must be 'shared' or 'per_sequence', got {mode!r}")
  for name, val in (("block_n", block_n), ("max_block_m", max_block_m)):
    if val < 16 or val & (val - 1):
      raise ValueError(f"{name} must be a power of two >= 16, got {val}")
  if not 1 <= len(shapes) <= MAX_LEVELS:
    raise ValueError(f"the fused kernel takes 1 to {MAX_LEVELS} levels, got {len(shapes)}")
  g = h // kv_heads
  tgp = pow2_at_least(t * g)
  if tgp > max_block_m:
    raise ValueError(f"T*G = {t * g} query rows per sequence exceed max_block_m={max_block_m}")
  slots = max(1, num_sms * programs_per_sm)
  levels, base, total = [], 0, 0
  for s in shapes:
    shared = mode == "shared" and s.has_owner and s.nodes < b
    if shared:
      per_node = -(-b // max(1, min(s.nodes, b)))
      m = min(max_block_m, max(16, pow2_at_least(per_node * tgp)))
      c = m // tgp
      if s.static_owner is not None:
        tiles = grouping.make_layout(s.static_owner, s.nodes, b, 1, c).num_tiles
      else:
        tiles = (b + min(s.nodes, b) * (c - 1)) // c
    else:
      m, c, tiles = max(16, tgp), 1, b
    if splits:
      nblk = max(1, -(-s.capacity // block_n))
      p = max(1, min(splits, nblk))
      bps = -(-nblk // p)
      p, chunk = -(-nblk // bps), bps * block_n
    else:
      p, chunk = _splits(tiles * kv_heads, s.capacity, block_n, slots, min_blocks_per_split)
    levels.append(LevelPlan(shared, c, m, tiles, p, chunk, base))
    base += p
    total += tiles * kv_heads * p
  return Plan(tuple(levels), mode, b, t, g, kv_heads, tgp, base, total, block_n,
              max(1, min(total, slots)))


class WorkList(NamedTuple):
  """items [W, 7] int32 (ITEM_FIELDS), heaviest first; orders [Lv, B] int32, each level's
  sequences in row order (a tile's sequences are orders[level, start:start + count]);
  cost [W] float32 of the sorted items (-1: no sequence)."""
  items: object
  orders: object
  cost: object


def _tile_table(xp, plan_level: LevelPlan, owner, nodes: int, b: int):
  """(order [B], node, start, count [tiles]) of one level, NumPy when owner is concrete."""
  if not plan_level.shared:
    node = xp.arange(b, dtype=np.int32) if owner is None else xp.asarray(owner, np.int32)
    return (xp.arange(b, dtype=np.int32), node, xp.arange(b, dtype=np.int32),
            xp.ones((b,), np.int32))
  layout = grouping.make_layout(owner, nodes, b, 1, plan_level.seqs_per_tile)
  if layout.num_tiles != plan_level.num_tiles:
    raise ValueError(f"tile count {layout.num_tiles} != planned {plan_level.num_tiles}")
  order = xp.arange(b, dtype=np.int32) if layout.order is None else layout.order
  return (xp.asarray(order, np.int32), xp.asarray(layout.node, np.int32),
          xp.asarray(layout.start, np.int32), xp.asarray(layout.count, np.int32))


def work_list(plan: Plan, owners: Sequence, nodes: Sequence[int], limits: Sequence,
              node_offsets: Optional[Sequence] = None) -> WorkList:
  """The run-time work list of a plan.

  owners: per level [B] int (NumPy, concrete or traced) or None (per-sequence level).
  nodes: per level N. limits: per level [B,T] int32, keys of its node visible to each query.
  node_offsets: per level None or an int32 scalar added to the level's nodes (a stacked
  cache [L*N,...] read in place: layer * N).
  NumPy in, NumPy out when every input is concrete NumPy; jnp otherwise.
  """
  vals = list(owners) + list(limits) + list(node_offsets or [])
  xp = np if all(v is None or isinstance(v, (np.ndarray, int, np.integer)) for v in vals) else jnp
  b = plan.batch
  kh_n = plan.kv_heads
  parts, orders = [], []
  for lvl, (lp, owner, n, lim) in enumerate(zip(plan.levels, owners, nodes, limits)):
    order, node, start, count = _tile_table(xp, lp, owner, n, b)
    if node_offsets is not None and node_offsets[lvl] is not None:
      node = node + xp.asarray(node_offsets[lvl], np.int32)
    orders.append(order)
    seq_hi = xp.max(xp.asarray(lim, np.int32), axis=1)[order]          # [B] in row order
    c = lp.seqs_per_tile
    idx = start[:, None] + xp.arange(c, dtype=np.int32)[None, :]
    inside = xp.arange(c, dtype=np.int32)[None, :] < count[:, None]
    hi = xp.max(xp.where(inside, seq_hi[xp.minimum(idx, b - 1)], 0), axis=1)  # [tiles]
    tiles = node.shape[0]
    split = xp.arange(lp.splits, dtype=np.int32)
    keys = xp.clip(hi[:, None] - split[None, :] * lp.chunk, 0, lp.chunk)    # [tiles, P]
    cost = (keys + ITEM_OVERHEAD_KEYS) * max(lp.block_m, BALANCE_ROWS) / BALANCE_ROWS
    cost = xp.where(count[:, None] > 0, cost, -1.0).astype(np.float32)
    # Items ordered (split, KV head, tile): the tiles that read the same keys are neighbours
    # in the list, so they run at the same time and share those keys through L2 (ties of
    # the cost sort keep this order).
    shape = (lp.splits, kh_n, tiles)
    per_tile = [xp.broadcast_to(x[None, None, :], shape) for x in (node, start, count)]
    # key_end: the split's last key + 1, clipped to the tile's largest limit (the kernel's key
    # loop bound, known before it loads any row: its key loads start at once).
    key_end = xp.minimum(((split + 1) * lp.chunk)[:, None], hi[None, :])    # [P, tiles]
    fields = [xp.full(shape, lvl, np.int32), *per_tile,
              xp.broadcast_to(xp.arange(kh_n, dtype=np.int32)[None, :, None], shape),
              xp.broadcast_to(split[:, None, None], shape),
              xp.broadcast_to(key_end[:, None, :], shape)]
    items = xp.stack([f.astype(np.int32) for f in fields], axis=-1).reshape(-1, NUM_FIELDS)
    parts.append((items, xp.broadcast_to(cost.T[:, None, :], shape).reshape(-1)))
  items = xp.concatenate([p[0] for p in parts])
  cost = xp.concatenate([p[1] for p in parts])
  if items.shape[0] != plan.num_items:
    raise ValueError(f"work list has {items.shape[0]} items, the plan {plan.num_items}")
  if xp is np:
    rank = np.argsort(-cost, kind="stable")
  else:
    rank = jnp.argsort(-cost, stable=True)
  return WorkList(items[rank], xp.stack(orders), cost[rank])


def static_plan_inputs(levels, b: int):
  """LevelShape per level from (k's shape [N,S,K,D] or [L,N,S,K,D], owner or None) pairs."""
  out = []
  for k_shape, owner in levels:
    n, s = k_shape[-4], k_shape[-3]
    if owner is None:
      out.append(LevelShape(n, s, False, None))
      continue
    own = np.zeros((b,), np.int32) if n == 1 else concrete(owner)
    out.append(LevelShape(n, s, True, None if own is None else
                          np.asarray(own, np.int32).reshape(b)))
  return out


def roofline_us(q_shape, kv_heads: int, level_caps: Sequence[tuple], itemsize: int) -> float:
  """Floor of one call in microseconds: every level's keys read once (level_caps: per level
  (nodes actually read, keys per node)) plus q and out, against the H200's HBM bandwidth, or
  its flops (4*D per query row and key), whichever is larger."""
  b, t, h, d = q_shape
  keys_read = sum(n * s for n, s in level_caps)
  nbytes = 2 * keys_read * kv_heads * d * itemsize + 2 * b * t * h * d * itemsize + 4 * b * t * h
  per_seq_keys = sum(s for _, s in level_caps)
  flops = 4.0 * b * t * h * d * per_seq_keys
  return 1e6 * max(nbytes / HBM_BYTES_PER_S, flops / BF16_FLOPS_PER_S)

