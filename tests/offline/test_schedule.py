"""The global schedule: every request once, sharers together, the KV budget, BatchLLM order,
few signatures as the dataset grows."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from hydrax import sharing
from hydrax.models import configs
from hydrax.offline import schedule as S

CONFIG = configs.LlamaConfig.from_preset("tiny")
SHARE_ALL = dict(min_shared_tokens=0, merge_cost=0, max_levels=2)


def _groups(sizes, *, prefix=(20, 60), own=(1, 12), seed=0, shuffle=True):
  """Requests under len(sizes) distinct prefixes; returns (seqs, group of each)."""
  rng = np.random.default_rng(seed)
  seqs, group = [], []
  for g, n in enumerate(sizes):
    head = np.concatenate([[g + 3], rng.integers(3, 256, rng.integers(*prefix))])
    for _ in range(n):
      seqs.append(np.concatenate([head, rng.integers(3, 256, rng.integers(*own))]).astype(
          np.int32))
      group.append(g)
  order = rng.permutation(len(seqs)) if shuffle else np.arange(len(seqs))
  return [seqs[i] for i in order], np.asarray(group)[order]


def _schedule(seqs, *, max_new=None, keys=None, budget=1 << 30, **kw):
  n = len(seqs)
  max_new = [8] * n if max_new is None else max_new
  keys = [()] * n if keys is None else keys
  kw.setdefault("sharing_options", SHARE_ALL)
  return S.schedule(seqs, max_new, keys, config=CONFIG, dtype=jnp.float32,
                    memory_budget=budget, **kw)


def test_every_request_once_and_batches_well_formed():
  seqs, _ = _groups([3, 9, 1, 17, 4, 2])
  rng = np.random.default_rng(1)
  max_new = rng.integers(1, 40, len(seqs)).tolist()
  keys = [("greedy",) if i % 3 else ("t=1",) for i in range(len(seqs))]
  sched = _schedule(seqs, max_new=max_new, keys=keys, max_batch=8)
  rows = sorted(r for b in sched.batches for r in b.rows)
  assert rows == list(range(len(seqs)))
  grid = S.batch_sizes(8)
  for b in sched.batches:
    assert {keys[r] for r in b.rows} == {b.key}
    assert b.size in grid and len(b.rows) <= b.size <= 8
    assert b.plan.num_sequences == b.size
    assert all(np.array_equal(b.plan.sequences[j], seqs[r]) for j, r in enumerate(b.rows))
    # padding prompts: the real rows' common prefix + one token of their own, all distinct
    pads = [np.asarray(p) for p in b.plan.sequences[len(b.rows):]]
    assert len({p.tobytes() for p in pads} | {seqs[r].tobytes() for r in b.rows}) == b.size
    assert all(np.array_equal(p[:-1], seqs[r][:p.size - 1]) for p in pads for r in b.rows)
    assert b.max_new_tokens >= max(max_new[r] for r in b.rows)
    assert b.decode_tokens == sum(max_new[r] for r in b.rows)
    assert np.array_equal(np.sort(b.plan.order), np.arange(b.size))
  # BatchLLM: decode-heavy first, by chains of batches that share a prefix across their cut
  # (kept back to back so that the shared node passes from one to the next)
  chains = []
  for b in sched.batches:
    if chains and chains[-1][-1].key == b.key and S.lcp_with_previous(
        seqs, np.array([chains[-1][-1].rows[-1], b.rows[0]]))[1] >= 1:
      chains[-1].append(b)
    else:
      chains.append([b])
  ratios = [sum(b.decode_tokens for b in c) / sum(b.prefill_tokens for b in c) for c in chains]
  assert ratios == sorted(ratios, reverse=True) and len(chains) >= 2


def test_sharers_stay_together_and_arrival_order_does_not():
  sizes = [2, 3, 4, 3, 2, 4, 3, 4, 2, 3]
  seqs, group = _groups(sizes)
  glob = _schedule(seqs, max_batch=16)
  arrival = _schedule(seqs, max_batch=16, strategy="arrival")
  for g in range(len(sizes)):           # groups of <= max_batch / 4 are never split
    assert sum(any(group[r] == g for r in b.rows) for b in glob.batches) == 1
  assert glob.reprefill_tokens == 0 < arrival.reprefill_tokens
  assert glob.prefill_tokens < arrival.prefill_tokens
  assert [r for b in arrival.batches for r in b.rows] == list(range(len(seqs)))


def test_one_document_many_questions_reprefills_once_per_extra_batch():
  seqs, _ = _groups([40], prefix=(100, 101))
  sched = _schedule(seqs, max_batch=16)
  doc = 101                             # the group id token + 100 tokens
  assert len(sched.batches) == 3
  # one chain: each batch can take the document from the one before
  assert all(S.lcp_with_previous(seqs, np.array([a.rows[-1], b.rows[0]]))[1] >= doc
             for a, b in zip(sched.batches, sched.batches[1:]))
  own = sum(s.size - doc for s in seqs)
  # questions may share a first token or two by chance (256-token vocabulary)
  assert own - 10 <= sched.tree_tokens - doc <= own
  assert 2 * doc <= sched.reprefill_tokens <= 2 * doc + 10


def test_a_prefix_cut_unevenly_is_cut_again_into_equal_parts():
  # 40 questions on one document, 16 a batch: 16 + 16 + 8 rows (batch sizes 16 and 8, two
  # signatures), cut again into 13 + 14 + 13 (all padded to 16: one signature). Nodes of at
  # least 8 tokens only, so that chance matches between questions add no level.
  seqs, _ = _groups([40], prefix=(100, 101))
  options = dict(min_shared_tokens=8, merge_cost=0, max_levels=2)
  sched = _schedule(seqs, max_batch=16, sharing_options=options)
  assert sorted(len(b.rows) for b in sched.batches) == [13, 13, 14]
  assert {b.size for b in sched.batches} == {16} and sched.signatures == 1
  arrival = _schedule(seqs, max_batch=16, sharing_options=options, strategy="arrival")
  assert sorted(len(b.rows) for b in arrival.batches) == [8, 16, 16]
  assert arrival.signatures == 2


def test_padding_rows_sit_under_the_common_prefix():
  # 5 questions on one document padded to 6 rows: the padding row shares the document, so
  # the level holds one node, as in an unpadded batch of the same document
  seqs, _ = _groups([5], prefix=(100, 101))
  batch = S.make_batch(seqs, range(5), (), [8] * 5, config=CONFIG, dtype=jnp.float32,
                       max_batch=8, attention="hydragen", sharing_options=SHARE_ALL, pad=True,
                       max_positions=CONFIG.max_position_embeddings)
  assert batch.size == 6 and batch.plan.sequences[5].size == 102
  full = S.make_batch(seqs[:4], range(4), (), [8] * 4, config=CONFIG, dtype=jnp.float32,
                      max_batch=8, attention="hydragen", sharing_options=SHARE_ALL, pad=True,
                      max_positions=CONFIG.max_position_embeddings)
  assert full.size == 4
  assert [np.count_nonzero(np.asarray(l.lengths)) for l in batch.plan.levels][:1] == [1]
  assert batch.signature[1].levels[0][0] == full.signature[1].levels[0][0]


def test_a_lone_signature_is_padded_onto_another_within_the_budget():
  # 20 unrelated prompts of 30-40 tokens, 8 a batch: 8 + 8 + 4 rows. The 4-row batch's
  # signature is its own; padded to 8 rows it lands on the others' (padded prefill: the rows
  # are what differs), so the run compiles once. With a budget that only 4 rows fit, it stays.
  rng = np.random.default_rng(4)
  seqs = [np.concatenate([[3 + i], rng.integers(3, 256, rng.integers(30, 40))]).astype(
      np.int32) for i in range(20)]
  kw = dict(max_batch=8, prefill="padded", sharing_options=dict(SHARE_ALL, max_levels=1))
  sched = _schedule(seqs, **kw)
  assert sorted(len(b.rows) for b in sched.batches) == [4, 8, 8]
  assert {b.size for b in sched.batches} == {8} and sched.signatures == 1
  four = next(b for b in sched.batches if len(b.rows) == 4)
  make = dict(config=CONFIG, dtype=jnp.float32, max_batch=8, attention="hydragen", pad=True,
              max_positions=CONFIG.max_position_embeddings, prefill="padded")
  alone = S.make_batch(seqs, four.rows, (), [8] * 20, sharing_options=kw["sharing_options"],
                       **make)
  assert alone.size == 4 and alone.kv_bytes < four.kv_bytes
  others = [b for b in sched.batches if b is not four]
  for budget, size in ((four.kv_bytes, 8), (four.kv_bytes - 1, 4)):
    got = S._share_signatures(others + [alone], seqs, [8] * 20, budget=budget,
                              sharing_options=kw["sharing_options"], **make)
    assert got[-1].size == size and got[-1].rows == four.rows


def test_budget_is_respected_by_splitting():
  seqs, _ = _groups([30, 30], prefix=(200, 201), own=(5, 30))
  big = _schedule(seqs, max_batch=64)
  budget = max(b.kv_bytes for b in big.batches) // 3
  small = _schedule(seqs, max_batch=64, budget=budget)
  assert len(small.batches) > len(big.batches)
  assert all(b.kv_bytes <= budget for b in small.batches)
  assert sorted(r for b in small.batches for r in b.rows) == list(range(len(seqs)))
  # replicated caches copy every prefix: the same budget holds fewer requests a batch
  rep = _schedule(seqs, max_batch=64, budget=budget, attention="replicated")
  assert len(rep.batches) > len(small.batches)
  assert all(b.kv_bytes <= budget for b in rep.batches)


def test_a_long_node_falls_back_to_fine_buckets_before_splitting():
  seqs, _ = _groups([8], prefix=(700, 701), own=(2, 6))
  coarse = _schedule(seqs, max_batch=8)
  (batch,) = coarse.batches
  fine = S.make_batch(seqs, batch.rows, (), np.full(len(seqs), 8), config=CONFIG,
                      dtype=jnp.float32, max_batch=8, attention="hydragen",
                      sharing_options=dict(SHARE_ALL, buckets=sharing.DEFAULT_BUCKETS),
                      pad=True, max_positions=CONFIG.max_position_embeddings)
  assert fine.kv_bytes < batch.kv_bytes / 2        # 4 nodes of 1024 vs 1 node of 768 tokens
  (tight,) = _schedule(seqs, max_batch=8, budget=fine.kv_bytes).batches
  assert tight.rows == batch.rows and tight.kv_bytes == fine.kv_bytes


def test_signatures_stay_few_as_the_dataset_grows():
  counts = {}
  for n_groups in (2, 40, 200):
    rng = np.random.default_rng(n_groups)
    seqs, _ = _groups(rng.integers(1, 12, n_groups).tolist(), seed=n_groups)
    max_new = rng.integers(4, 16, len(seqs)).tolist()
    sched = _schedule(seqs, max_new=max_new, max_batch=16,
                      sharing_options=dict(min_shared_tokens=32, merge_cost=4, max_levels=2))
    counts[len(seqs)] = (len(sched.batches), sched.signatures)
  (_, (_, few)), (_, (_, mid)), (n, (batches, many)) = sorted(counts.items())
  assert n >= 1000 and batches >= 60
  assert few <= mid <= many <= 6, counts      # 1, 2, 5 (13, 220, 1205 requests)


def _reference_lcp(a, b) -> int:
  """Leading tokens two sequences share, token by token (the definition)."""
  n = 0
  while n < min(len(a), len(b)) and a[n] == b[n]:
    n += 1
  return n


# Few distinct tokens and a shared head make long common prefixes and duplicates likely.
_prompts = st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=12), min_size=1,
                    max_size=8).flatmap(lambda tails: st.tuples(
                        st.lists(st.integers(0, 2), max_size=6), st.just(tails)))


@given(_prompts)
def test_common_prefix_is_that_of_the_sorted_neighbours(prompts):
  head, tails = prompts
  seqs = [np.asarray(head + t, np.int32) for t in tails]
  # the old `_pad_prompts` sorted the prompts and took the least lcp of neighbours
  ranked = sorted(seqs, key=lambda s: s.tolist())
  want = min((_reference_lcp(a, b) for a, b in zip(ranked, ranked[1:])), default=seqs[0].size)
  assert S._common_prefix(seqs) == want
  order = np.arange(len(seqs))
  assert S.lcp_with_previous(seqs, order).tolist() == [0] + [
      _reference_lcp(a, b) for a, b in zip(seqs, seqs[1:])]


def test_bad_arguments():
  seqs, _ = _groups([2])
  with pytest.raises(ValueError, match="strategy"):
    _schedule(seqs, strategy="random")
  with pytest.raises(ValueError, match="memory_budget"):
    _schedule(seqs, budget=0)
  with pytest.raises(ValueError, match="max_batch"):
    _schedule(seqs, max_batch=0)
  with pytest.raises(ValueError, match="one max_new_tokens"):
    S.schedule(seqs, [1], [()] * 2, config=CONFIG, dtype=jnp.float32, memory_budget=1 << 20)
