"""hydragen_attention over the levels of a plan equals dense attention under dense_mask()."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from hydrax.attention import KVLevel, hydragen_attention
from hydrax.sharing import Buckets, hierarchy, plan
from tests import oracle
from tests.sharing.strategies import sequence_sets

VOCAB, MAX_POS, KH, G, D = 4, 64, 2, 2, 8


def _tables(seed):
  rng = np.random.default_rng(seed)
  return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in (
      ("k_tok", (VOCAB, KH, D)), ("k_pos", (MAX_POS, KH, D)),
      ("v_tok", (VOCAB, KH, D)), ("v_pos", (MAX_POS, KH, D)))}


def _kv(tables, tokens, positions):
  """Keys and values from each token id and its position: [..., K, D] each."""
  tokens = np.asarray(tokens) % VOCAB
  positions = np.minimum(np.asarray(positions), MAX_POS - 1)   # padding may run past
  return (tables["k_tok"][tokens] + tables["k_pos"][positions],
          tables["v_tok"][tokens] + 0.5 * tables["v_pos"][positions])


def _check(p, seed, t, causal):
  tables = _tables(seed)
  b = p.num_sequences
  rng = np.random.default_rng(seed + 1)
  q_input = rng.standard_normal((b, t, KH * G, D)).astype(np.float32)
  levels = p.kv_levels(lambda tok, pos: tuple(jnp.asarray(x) for x in _kv(tables, tok, pos)))
  owners = [lv.owner for lv in levels]       # NumPy, closed over: static grouping

  @jax.jit
  def run(q, kvl):
    return hydragen_attention(q, [KVLevel(k, v, n, o) for (k, v, n), o in zip(kvl, owners)],
                              causal_last=causal, backend="xla")

  out, lse = run(jnp.asarray(p.to_plan_order(q_input)),
                 [(lv.k, lv.v, lv.lengths) for lv in levels])
  out, lse = p.to_input_order(np.asarray(out)), p.to_input_order(np.asarray(lse))
  # Reference: dense attention of each sequence over the stored tokens its mask row selects.
  layout = p.stored_layout()
  k_all, v_all = _kv(tables, layout.tokens, layout.positions)
  mask = p.dense_mask()
  ref_out, ref_lse = oracle.dense(q_input, [k_all[m] for m in mask], [v_all[m] for m in mask],
                                  causal=causal)
  np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(lse, ref_lse, atol=2e-5, rtol=2e-5)
  # The mask selects exactly what a plain per-sequence cache would hold.
  for i, s in enumerate(p.sequences):
    k_seq, _ = _kv(tables, s, np.arange(s.size))
    np.testing.assert_array_equal(k_all[mask[i]], k_seq)


@settings(max_examples=10)
@given(sequence_sets(max_b=6, max_len=24, big_tokens=False), st.integers(0, 2**16),
       st.sampled_from([1, 2]), st.booleans(),
       st.sampled_from([dict(min_shared_tokens=0, merge_cost=0),
                        dict(min_shared_tokens=6, merge_cost=1),
                        dict(min_shared_tokens=0, merge_cost=0, max_levels=1)]))
def test_plan_levels_match_dense_attention_under_the_mask(seqs, seed, t, causal, opts):
  _check(plan(seqs, buckets=Buckets(min_tokens=32, min_nodes=4), **opts), seed, t, causal)


@pytest.mark.parametrize("causal", [True, False])
def test_hierarchy_levels_match_dense_attention(causal):
  p = hierarchy(prefix=[1, 2, 3, 0, 1], problems=[[2, 2], [3], 4], samples_per_problem=[2, 1, 3],
                sample_tokens=2, vocab_size=VOCAB)
  _check(p, 3, 3, causal)
