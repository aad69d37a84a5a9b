"""Global planning of a whole dataset: batches that keep sharers together under a KV budget.

  schedule(sequences, max_new_tokens, keys, *, config, dtype, memory_budget, ...) -> Schedule
  lcp_with_previous(sequences, order) -> [B] int64

Axis letters: B requests (of the dataset, or of one batch), L layers, K KV heads, D head dim.

1. One radix tree over every prompt of the dataset (`hydrax.sharing.plan` with every node
   shared: its order is depth-first, so all requests under a node are contiguous). Adjacent
   requests in that order share exactly lcp[i] leading tokens (the longest common prefix of
   request i and the one before it), so a contiguous run of requests stores
   sum(len - lcp) prompt tokens once each: its radix tree's tokens.
2. Requests are split by `keys` (their sampling settings: a batch shares one sampler) and each
   key's requests are walked in tree order. A batch grows while its KV estimate, prompt tokens
   stored once (first request: all of them; the next: len - lcp) + max_new_tokens per request,
   times the bytes of one token's K and V over all layers, stays within 90% of the budget
   (with attention="replicated" every request stores its whole prompt) and it holds at most
   max_batch requests. A batch that fills up is cut, within its last quarter, where the
   prefix shared across the cut (which the next batch prefills again) plus the decode tokens
   of the requests moved to the next batch is least. A node shared by requests of several
   batches is prefilled by the first of them; the next one, run right after it (step 5),
   takes its keys and values from there (`hydrax.generate.run` passes each batch's
   `engine.KeptNodes` to the next) when the engine lays the node's level out with the same
   bucketed shape, the usual case; `Schedule.reprefill_tokens` counts the tokens such nodes
   hold beyond their first batch (what prefilling each batch on its own would repeat).
3. Each batch is planned on its own (`sharing.plan` with the run's cost model) and its exact
   KV bytes (every row gets the capacity of the longest suffix + max_new_tokens) are taken
   from `engine.estimate_kv_bytes`; rows over budget are cut where the most leading rows fit
   (bisection), at the cheapest point of their last quarter (a single request over budget
   runs alone, logged).
4. Fixed shapes: batches are padded to a batch size from a geometric grid (two steps an
   octave, at most max_batch) with distinct prompts of the real rows' common prefix + one
   token (outputs dropped; one-token prompts where the rows share nothing), and
   max_new_tokens is rounded up on the same grid (floor 16, never past the model's positions);
   each row is cut to its own max_new_tokens afterwards. The batches' plans use the coarse
   `BUCKETS` (unless sharing_options name others): node counts and capacities are powers of
   two, at least 4 nodes and 64 tokens; a batch that this padding puts over budget takes the
   finer default buckets before it is split. Consecutive batches whose rows all lie under
   one shared prefix (a document's questions), cut unevenly by the budget, are cut again into
   equal parts where every part fits (`_balance`): one signature for the run, not one per
   part. The batches of a rare signature are padded up to another signature's batch size where
   that lands them all on it within the budget (`_share_signatures`). So a dataset of any
   size falls on few compiled signatures (`Batch.signature`).
5. Order (BatchLLM): batches with more decode tokens per prefill token run first; batches
   that share a node across their cut (at least min_shared_tokens, or 1 token) are a chain,
   ordered as one by their sums and kept consecutive, so the node passes along the chain and
   is never dropped while requests that need it remain. Mixing the next batch's prefill into
   the current decode steps is not done (the engine runs one plan at a time).

strategy="arrival" is the baseline: requests in input order, cut only by max_batch and the
budget, no tree grouping, no reordering.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import time
from typing import Optional, Sequence

import numpy as np

from hydrax import engine, sharing
from hydrax._log import log_once
from hydrax.sharing.buckets import round_up
from hydrax.sharing.planning import DEFAULT_MIN_SHARED_TOKENS

STRATEGIES = ("global", "arrival")
# Coarse buckets for the batches' plans (powers of two, at least 4 nodes and 64 tokens): the
# default grid (two steps an octave) gave 27 signatures over 79 batches of a 1,205-request
# workload where this one gives 5 (tests/offline/test_schedule.py).
BUCKETS = sharing.Buckets(steps=1, min_nodes=4, min_tokens=64)
_FILL = 0.9          # fraction of the budget the first pass aims for (buckets pad the rest)


@dataclasses.dataclass(frozen=True)
class Batch:
  """One engine call: rows are indices into the scheduler's `sequences`.

  rows: the requests, tree order; size: the engine's batch size (rows + one-token padding
  prompts, whose outputs are dropped; plan rows 0..len(rows)-1 are `rows`).
  key: the shared sampling settings; max_new_tokens: the batch's (bucketed) decode length.
  kv_bytes: exact KV bytes of the padded batch (engine.footprint).
  prefill_tokens: prompt tokens the batch prefills (its plan's stored tokens, no padding rows).
  decode_tokens: sum of the rows' own max_new_tokens.
  tree_tokens: tokens of the radix tree of its rows (what it would prefill sharing every node).
  signature: what its compiled executables depend on: (sampling key, the engine's
    `Signature` of its plan: batch size, bucketed level shapes, capacities, max_new_tokens).
  """
  rows: tuple
  size: int
  key: tuple
  max_new_tokens: int
  plan: object = dataclasses.field(repr=False, compare=False)
  kv_bytes: int = 0
  prefill_tokens: int = 0
  decode_tokens: int = 0
  tree_tokens: int = 0
  signature: tuple = ()



@dataclasses.dataclass(frozen=True)
class Schedule:
  """Batches in run order, with what the plan costs and saves.

  prompt_tokens: sum of prompt lengths; tree_tokens: tokens of the whole dataset's radix
  tree (the least any plan prefills); prefill_tokens: what the batches prefill (sum over
  batches of their plans' stored tokens, padding rows excluded; nodes that do not pay under
  the cost model are prefilled per request); reprefill_tokens: prefix tokens that batches
  hold beyond the first batch that holds them, because their sharers sit in several batches
  (sum of the batches' tree_tokens minus the dataset's): prefilled again unless passed on from
  the previous batch (`RunSummary.reused_tokens` says how many were);
  seconds: planning time; signatures: distinct Batch.signature values.
  """
  batches: tuple
  prompt_tokens: int
  tree_tokens: int
  prefill_tokens: int
  reprefill_tokens: int
  seconds: float
  budget: int

  @property
  def signatures(self) -> int:
    return len({b.signature for b in self.batches})

  @property
  def shared_fraction(self) -> float:
    """Fraction of prompt tokens not prefilled thanks to sharing (BatchLLM's measure)."""
    return 1.0 - self.prefill_tokens / max(self.prompt_tokens, 1)


def lcp_with_previous(sequences: Sequence[np.ndarray], order: np.ndarray) -> np.ndarray:
  """[B] int64: tokens that sequences[order[i]] shares at its start with sequences[order[i-1]]
  (0 for i = 0)."""
  out = np.zeros((len(order),), np.int64)
  for i in range(1, len(order)):
    out[i] = _prefix_length(sequences[order[i - 1]], sequences[order[i]])
  return out


def _common_prefix(sequences: Sequence[np.ndarray]) -> int:
  """Leading tokens that all sequences share (the whole sequence if there is one): each
  one's prefix shared with the first, at its least (no sort of the sequences needed)."""
  head = sequences[0]
  common = head.size
  for s in sequences[1:]:
    common = _prefix_length(head[:common], s)
  return common


def _prefix_length(a: np.ndarray, b: np.ndarray) -> int:
  """Leading tokens that arrays a and b share."""
  n = min(a.size, b.size)
  differs = a[:n] != b[:n]
  first = int(differs.argmax()) if n else 0
  return first if n and differs[first] else n


def _shared(sequences, a: int, b: int) -> int:
  """Leading tokens that sequences[a] and sequences[b] share."""
  return _prefix_length(sequences[a], sequences[b])


def batch_sizes(max_batch: int) -> list:
  """The batch sizes batches are padded to: the geometric grid (two steps an octave) up to
  max_batch, and max_batch itself."""
  sizes = {max_batch}
  x = 1
  while x < max_batch:
    sizes.add(x)
    x = round_up(x + 1, steps=2)
  return sorted(sizes)


def _padded_size(n: int, max_batch: int) -> int:
  return min(s for s in batch_sizes(max_batch) if s >= n)


def _cut(costs: np.ndarray, lcp: np.ndarray, decode: np.ndarray, cap: float, max_batch: int,
         group_aware: bool) -> list:
  """Cuts positions 0..B-1 (tree order) into runs; costs[i] = tokens position i adds after
  position i-1 in the same run (len - lcp + max_new), lcp[i] what it shares with i-1,
  decode[i] its max_new_tokens."""
  runs, start, b = [], 0, costs.size
  while start < b:
    total = costs[start] + lcp[start]           # the first of a run stores its whole prompt
    end = start + 1
    while end < b and end - start < max_batch and total + costs[end] <= cap:
      total += costs[end]
      end += 1
    if end < b and group_aware and end - start > 1:
      end = _best_cut(lcp, decode, start + max(1, (3 * (end - start)) // 4), end)
    runs.append((start, end))
    start = end
  return runs


def schedule(sequences: Sequence[np.ndarray], max_new_tokens: Sequence[int],
             keys: Sequence[tuple], *, config, dtype, memory_budget: int, max_batch: int = 64,
             strategy: str = "global", attention: str = "hydragen",
             sharing_options: Optional[dict] = None, pad: bool = True,
             max_positions: Optional[int] = None, prefill: str = "auto",
             prefill_chunk: int = 2048) -> Schedule:
  """Batches for all `sequences` (int32 arrays, input order) with their own max_new_tokens
  and sampling `keys` (hashable; a batch holds one key). See the module docstring.

  memory_budget: KV-cache bytes a batch may take; max_batch: most requests in a batch;
  sharing_options: the per-batch `sharing.plan` cost model; pad: pad batch sizes to the grid;
  prefill, prefill_chunk: the engine's (they decide packed or padded prefill, part of each
  batch's signature).
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
  if not isinstance(max_batch, int) or max_batch < 1:
    raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
  if not memory_budget or memory_budget <= 0:
    raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}")
  n = len(sequences)
  if not n or len(max_new_tokens) != n or len(keys) != n:
    raise ValueError(f"need one max_new_tokens and one key per sequence, got {n} sequences, "
                     f"{len(max_new_tokens)} max_new_tokens, {len(keys)} keys")
  t0 = time.perf_counter()
  sharing_options = dict(sharing_options or {})
  max_positions = config.max_position_embeddings if max_positions is None else max_positions
  lengths = np.array([s.size for s in sequences], np.int64)
  max_new = np.asarray(max_new_tokens, np.int64)
  if strategy == "global":
    tree = sharing.plan(list(sequences), min_shared_tokens=0, merge_cost=0)
    order = np.asarray(tree.order, np.int64)
    tree_tokens = int(tree.stats.radix_tokens)
  else:
    order = np.arange(n, dtype=np.int64)
    tree_tokens = int(sharing.plan(list(sequences), min_shared_tokens=0,
                                   merge_cost=0).stats.radix_tokens)
  # K and V of one token over all layers
  token_bytes = 2 * config.num_layers * config.num_kv_heads * config.head_dim * \
      np.dtype(dtype).itemsize
  cap = _FILL * memory_budget / token_bytes

  key_index = {}
  for k in keys:
    key_index.setdefault(k, len(key_index))
  key_of = np.array([key_index[k] for k in keys], np.int64)
  # what every Batch of this schedule is made and checked with
  batch_kw = dict(config=config, dtype=dtype, budget=memory_budget, max_batch=max_batch,
                  attention=attention, sharing_options=sharing_options, pad=pad,
                  max_positions=max_positions, prefill=prefill, prefill_chunk=prefill_chunk)
  batches = []
  for k, kid in key_index.items():
    rows = order[key_of[order] == kid]
    lcp = lcp_with_previous(sequences, rows)
    share = lcp if attention == "hydragen" else np.zeros_like(lcp)   # replicated: copies
    costs = lengths[rows] - share + max_new[rows]
    for lo, hi in _cut(costs, share, max_new[rows], cap, max_batch, strategy == "global"):
      batches.extend(_fit(sequences, rows[lo:hi], lcp[lo:hi], max_new[rows[lo:hi]], k, max_new,
                          **batch_kw))
  if strategy == "global":
    link = max(1, int(sharing_options.get("min_shared_tokens", DEFAULT_MIN_SHARED_TOKENS)))
    batches = _balance(batches, sequences, link, max_new, **batch_kw)
    batches = _share_signatures(batches, sequences, max_new, **batch_kw)
    batches = _order(batches, sequences, link)
  return Schedule(batches=tuple(batches), prompt_tokens=int(lengths.sum()),
                  tree_tokens=tree_tokens,
                  prefill_tokens=sum(b.prefill_tokens for b in batches),
                  reprefill_tokens=sum(b.tree_tokens for b in batches) - tree_tokens,
                  seconds=time.perf_counter() - t0, budget=int(memory_budget))


def _balance(batches: list, sequences, link: int, max_new, *, budget, sharing_options,
             **kw) -> list:
  """Consecutive batches (tree order, one key) whose rows all lie under one shared prefix of
  at least `link` tokens (a document's questions, one problem's samples), cut by the budget
  into uneven parts, are cut again into parts of equal size when every part fits: equal
  padded sizes fall on one signature, so the run compiles once, not once per part."""
  out, i = [], 0
  while i < len(batches):
    j = i + 1
    while j < len(batches) and batches[j].key == batches[i].key and _shared(
        sequences, batches[i].rows[0], batches[j].rows[-1]) >= link:
      j += 1
    run = batches[i:j]
    if len({b.signature for b in run}) > 1:
      rows = [r for b in run for r in b.rows]
      bounds = np.linspace(0, len(rows), len(run) + 1).round().astype(int)
      parts = [_fitting(sequences, rows[a:b], run[0].key, max_new, budget=budget,
                        sharing_options=sharing_options, **kw)
               for a, b in zip(bounds[:-1], bounds[1:])]
      if all(p is not None for p in parts) and \
          len({p.signature for p in parts}) < len({b.signature for b in run}):
        run = parts
    out.extend(run)
    i = j
  return out


def _share_signatures(batches: list, sequences, max_new, *, budget, sharing_options,
                      **kw) -> list:
  """The batches of a signature, rarest first, padded up to a larger batch size that other
  batches' signature has, where that lands all of them on it within the budget: padding rows
  cost their KV and decode slots that are nearly free while decode reads the weights (below
  ~256 rows on an H200), and a signature costs a prefill and a decode compile."""
  if not kw.get("pad", True):
    return batches
  batches = list(batches)
  counts = collections.Counter(b.signature for b in batches)
  sizes = sorted({b.size for b in batches})
  for sig in sorted(counts, key=lambda x: counts[x]):
    mine = [i for i, b in enumerate(batches) if b.signature == sig]
    size = batches[mine[0]].size
    for target in (x for x in sizes if x > size):
      moved = {}
      for i in mine:
        moved[i] = next((new for options in _tries(sharing_options)
                         for new in [make_batch(sequences, batches[i].rows, batches[i].key,
                                                max_new, sharing_options=options,
                                                size=target, **kw)]
                         if new.kv_bytes <= budget and new.signature != sig
                         and counts[new.signature] > 0), None)
        if moved[i] is None or moved[i].signature != moved[mine[0]].signature:
          break
      else:
        for i, new in moved.items():
          batches[i] = new
        counts[moved[mine[0]].signature] += len(mine)
        counts[sig] = 0
        break
  return batches


def _order(batches: list, sequences, link: int) -> list:
  """BatchLLM's order over chains: consecutive batches (tree order) of one key whose requests
  share at least `link` prompt tokens across their cut form a chain and stay together, in
  tree order, so that the node they share can pass from one to the next (`engine.KeptNodes`)
  instead of being prefilled again; chains with more decode tokens per prefill token run
  first (stable)."""
  chains = []
  for b in batches:
    prev = chains[-1][-1] if chains else None
    if prev is not None and prev.key == b.key and \
        _shared(sequences, prev.rows[-1], b.rows[0]) >= link:
      chains[-1].append(b)
    else:
      chains.append([b])
  chains.sort(key=lambda c: -sum(b.decode_tokens for b in c) /
              max(sum(b.prefill_tokens for b in c), 1))
  return [b for c in chains for b in c]


def _pad_prompts(k: int, real: list, vocab_size: int) -> list:
  """k distinct prompts that fill a batch up to its padded size (outputs dropped): the prefix
  that all real prompts share, then one token of their own, so they add one cached token each
  and, sitting under the real rows' common nodes, no node of their own (an empty node would
  change a level's node count, and with it its shape: `engine.KeptNodes` then cannot pass
  that level on). Without such a prefix, or too few free tokens, one-token prompts."""
  common = min(_common_prefix(real), min(s.size for s in real) - 1)
  taken = {int(s[common]) for s in real if s.size > common}
  free = list(itertools.islice((t for t in range(vocab_size) if t not in taken), k)) \
      if common > 0 else []
  if len(free) < k:
    return [np.array([i], np.int32) for i in range(k)]
  head = real[0][:common]
  return [np.append(head, t).astype(np.int32) for t in free]


def make_batch(sequences, rows, key, max_new, *, config, dtype, max_batch: int,
               attention: str, sharing_options: dict, pad: bool, max_positions: int,
               prefill: str = "auto", prefill_chunk: int = 2048,
               size: Optional[int] = None) -> Batch:
  """A Batch of `rows` (indices into sequences): padded (to `size` if given), planned, its KV
  measured."""
  rows = tuple(int(r) for r in rows)
  if size is None:
    size = _padded_size(len(rows), max_batch) if pad else len(rows)
  real = [sequences[r] for r in rows]
  own = int(max(max_new[r] for r in rows))
  longest = max(s.size for s in real)
  bucket = max(own, min(round_up(own, steps=2, minimum=16), max_positions - longest))
  plan = sharing.plan(real + _pad_prompts(size - len(rows), real, config.vocab_size),
                      **{"buckets": BUCKETS, **sharing_options})
  kv, engine_signature = engine.footprint(config, plan, max_new_tokens=bucket,
                                         attention=attention, dtype=dtype,
                                         max_len=max_positions, prefill=prefill,
                                         prefill_chunk=prefill_chunk)
  # Prompt tokens the real rows prefill: the plan's stored tokens minus the padding rows'
  # suffixes (a padding token shared with a real row is counted with the real row).
  pads = np.asarray(plan.inverse_order)[len(rows):]
  prefill = int(plan.stats.stored_tokens - np.asarray(plan.suffix_lengths)[pads].sum())
  # Radix-tree tokens of the real rows: in lexicographic order, sum(len - lcp with previous).
  order = np.asarray([i for i in np.asarray(plan.order) if i < len(rows)])
  tree = int(sum(s.size for s in real) - lcp_with_previous(real, order).sum())
  signature = (key, engine_signature)       # what the engine compiles for, and the sampler
  return Batch(rows=rows, size=size, key=key, max_new_tokens=bucket, plan=plan,
               kv_bytes=int(kv), prefill_tokens=prefill,
               decode_tokens=int(sum(max_new[r] for r in rows)), tree_tokens=tree,
               signature=signature)


def _best_cut(lcp: np.ndarray, decode: np.ndarray, lo: int, hi: int) -> int:
  """The cut c in [lo, hi] (rows before c stay, rows from c move on) where the prefix shared
  across it (re-prefilled by the next batch) plus the decode tokens of rows c..hi-1 (slots
  this batch leaves empty) is least; the latest among ties. lcp[c]: what row c shares with
  row c-1; decode[i]: row i's max_new_tokens; lcp[len] counts as 0."""
  cands = np.arange(lo, hi + 1)
  tail = np.append(np.cumsum(decode[::-1])[::-1], 0)     # tail[c] = sum of decode[c:]
  cost = np.append(lcp, 0)[cands] + tail[cands] - tail[hi]
  return int(cands[::-1][np.argmin(cost[::-1])])


def _tries(sharing_options: dict) -> list:
  """The sharing options a batch is planned with, in order: the coarse buckets, then the
  finer default ones; buckets named in sharing_options are the only ones tried."""
  if "buckets" in sharing_options:
    return [sharing_options]
  return [dict(sharing_options, buckets=BUCKETS),
          dict(sharing_options, buckets=sharing.DEFAULT_BUCKETS)]


def _fitting(sequences, rows, key, max_new, *, budget, sharing_options, **kw):
  """The Batch of `rows` under the budget, planned with the first of `_tries` that fits, or
  None."""
  for options in _tries(sharing_options):
    batch = make_batch(sequences, rows, key, max_new, sharing_options=options, **kw)
    if batch.kv_bytes <= budget:
      return batch
  return None


def _fit(sequences, rows, lcp, decode, key, max_new, *, budget, sharing_options,
         **kw) -> list:
  """[Batch] for rows (tree order) under the budget (exact KV of the padded plan). A batch is
  tried with the coarse buckets, then the finer default ones (padding a long node to 4 nodes
  of a power-of-two capacity can take several times its KV); buckets named in
  sharing_options are the only ones tried. When the rows do not fit, the most leading rows
  that fit are found by bisection and cut in their last quarter where `_best_cut` says."""
  tries = _tries(sharing_options)
  fits = {}      # (lo, hi) -> fit(lo, hi): the cut often lands on a probe of the bisection

  def fit(lo, hi):
    if (lo, hi) not in fits:
      fits[lo, hi] = _fitting(sequences, rows[lo:hi], key, max_new, budget=budget,
                              sharing_options=sharing_options, **kw)
    return fits[lo, hi]

  out, start, n = [], 0, len(rows)
  while start < n:
    batch = fit(start, n)
    if batch is not None:
      out.append(batch)
      break
    good, lo, hi = start + 1, start + 2, n - 1      # rows[start:good] fits (or is one row)
    while lo <= hi:
      mid = (lo + hi) // 2
      if fit(start, mid) is not None:
        good, lo = mid, mid + 1
      else:
        hi = mid - 1
    if good - start > 1:
      good = _best_cut(lcp, decode, start + max(1, (3 * (good - start)) // 4), good)
    batch = fit(start, good)
    if batch is None:
      log_once(("offline-over-budget", int(rows[start])),
               "hydrax.generate: request %d alone needs more than the KV budget of %d bytes; "
               "it runs in a batch of its own", int(rows[start]), budget)
      batch = make_batch(sequences, rows[start:good], key, max_new,
                         sharing_options=tries[-1], **kw)
    out.append(batch)
    start = good
  return out
