"""Prepacking in the model and the engine: packed prefill == padded prefill.

llama.forward with segments= (packed tokens appended to their sequences' caches) gives the
hidden states and caches of the padded forward; engine.generate(prefill="packed") gives the
greedy tokens of prefill="padded" (float32, tiny model) on ragged suffixes, zero-length ones
included, with and without shared levels; the packed pass runs fewer token slots; a second
batch of the same signature does not compile; bad input raises one-line ValueErrors.
(The mesh case is in tests/parallel/test_parallel.py.)
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

from hydrax import engine, sharing
from hydrax.cache import KVCache, empty_level
from hydrax.models import LlamaConfig, llama
from hydrax.offline import packing
from tests.models.test_zero_copy import full_size_copies

CONFIG = LlamaConfig.from_preset("tiny")
MODEL = llama.init(CONFIG, seed=0)
GRAPHDEF, PARAMS = nnx.split(MODEL)
B, W, PRIOR, S = 5, 12, 3, 16        # sequences, new tokens (<= W each), held keys, capacity


# ----------------------------------------------------------------------------- llama.forward


@functools.partial(jax.jit, static_argnums=(5,))
def _forward(params, tokens, positions, cache, rows, fresh):
  """rows: valid [B] (padded rows) when fresh is None, else segments [R,W] (packed)."""
  model = nnx.merge(GRAPHDEF, params)
  if fresh is None:
    return llama.forward(model, tokens, positions, cache, valid=rows, backend="xla")
  return llama.forward(model, tokens, positions, cache, segments=rows, fresh=fresh,
                       backend="xla")


def _suffix():
  return empty_level(CONFIG.num_layers, B, S, CONFIG.num_kv_heads, CONFIG.head_dim,
                     jnp.float32)


@functools.lru_cache(maxsize=1)
def _shared_nodes():
  """Two prefilled nodes of 6 and 4 tokens (one shared level)."""
  rng = np.random.default_rng(0)
  tokens = np.zeros((2, 6), np.int32)
  tokens[0], tokens[1, :4] = rng.integers(3, 256, 6), rng.integers(3, 256, 4)
  nodes = empty_level(CONFIG.num_layers, 2, 6, CONFIG.num_kv_heads, CONFIG.head_dim,
                      jnp.float32)
  model = MODEL
  _, cache = llama.forward(model, tokens, np.broadcast_to(np.arange(6), (2, 6)).astype(
      np.int32), KVCache(nodes), valid=np.array([6, 4], np.int32))
  return cache.suffix


@settings(max_examples=12)
@given(st.lists(st.integers(0, W), min_size=B, max_size=B), st.booleans(), st.booleans(),
       st.integers(0, 2**16))
def test_packed_forward_equals_padded_forward(lengths, shared, prior, seed):
  """Ragged runs (zero-length too) packed side by side, each attending its sequence's shared
  node, its keys already cached (prior: fresh=False) and its own earlier tokens."""
  rng = np.random.default_rng(seed)
  lengths = np.asarray(lengths)
  owner = rng.integers(0, 2, B).astype(np.int32)
  node_len = np.array([6, 4])[owner] if shared else np.zeros(B, np.int64)
  levels, owners = ([_shared_nodes()], [owner]) if shared else ([], [])
  cache = KVCache(_suffix(), levels, owners)
  held = np.zeros(B, np.int64)
  if prior:                                    # 0..PRIOR keys already in each cache
    held = rng.integers(0, PRIOR + 1, B)
    pos = (node_len[:, None] + np.arange(W)).astype(np.int32)
    _, cache = _forward(PARAMS, rng.integers(3, 256, (B, W)).astype(np.int32), pos, cache,
                        held.astype(np.int32), None)
  start = node_len + held
  tokens = rng.integers(3, 256, (B, W)).astype(np.int32)
  want, want_cache = _forward(PARAMS, tokens, (start[:, None] + np.arange(W)).astype(np.int32),
                              cache, lengths.astype(np.int32), None)
  pk = packing.pack(lengths, width=W)
  ptok, seg, ppos = (np.zeros((B, W), np.int32) for _ in range(3))   # B rows: one shape
  seg[:] = -1
  ptok[:pk.rows], seg[:pk.rows], ppos[:pk.rows] = packing.pack_tokens(tokens, lengths, start,
                                                                      pk)
  got, got_cache = _forward(PARAMS, ptok, ppos, cache, seg, not prior)
  want, got = np.asarray(want), np.asarray(got)
  for b, n in enumerate(lengths):
    np.testing.assert_allclose(got[pk.row[b], pk.offset[b]:pk.offset[b] + n], want[b, :n],
                               atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(got_cache.suffix.lengths, held + lengths)
  for b, n in enumerate(held + lengths):
    for new, old in ((got_cache.suffix.k, want_cache.suffix.k),
                     (got_cache.suffix.v, want_cache.suffix.v)):
      np.testing.assert_allclose(np.asarray(new)[:, b, :n], np.asarray(old)[:, b, :n],
                                 atol=1e-5, rtol=1e-5)


def test_packed_forward_without_cache_attends_within_segments():
  """cache=None: each packed run is a sequence of its own (a full forward per segment)."""
  lengths = np.array([4, 7, 0, 2])
  rng = np.random.default_rng(1)
  tokens = rng.integers(3, 256, (4, 7)).astype(np.int32)
  pk = packing.pack(lengths, width=8)
  ptok, seg, ppos = packing.pack_tokens(tokens, lengths, np.zeros(4), pk)
  got, none = llama.forward(MODEL, ptok, ppos, None, segments=seg)
  assert none is None and pk.rows == 2
  for b, n in enumerate(lengths):
    if n:
      want, _ = llama.forward(MODEL, tokens[b:b + 1, :n], np.arange(n)[None].astype(np.int32))
      np.testing.assert_allclose(np.asarray(got)[pk.row[b], pk.offset[b]:pk.offset[b] + n],
                                 np.asarray(want)[0], atol=1e-5, rtol=1e-5)


def test_packed_forward_writes_the_cache_in_place():
  """The packed step's scatter updates the donated [L,B,S,K,D] stacks in place: no copy of a
  cache in the compiled program (the check of tests/models/test_zero_copy.py)."""
  suffix = _suffix()
  shape = tuple(suffix.k.shape)
  seg = np.array([[0, 0, 0, 1, 1, -1], [2, 3, 3, 3, 4, -1]], np.int32)
  tok = np.ones(seg.shape, np.int32)

  def step(params, cache, seg):
    model = nnx.merge(GRAPHDEF, params)
    return llama.forward(model, tok, tok, cache, segments=seg, backend="xla")[1].suffix

  hlo = jax.jit(step, donate_argnums=(1,)).lower(PARAMS, KVCache(suffix), seg).compile()
  assert full_size_copies(hlo.as_text(), shape) == []


def test_packed_forward_bad_inputs():
  cache = KVCache(_suffix())
  tok = jnp.zeros((2, 4), jnp.int32)
  seg = np.zeros((2, 4), np.int32)
  with pytest.raises(ValueError, match=r"segments must be an int array of the tokens' shape"):
    llama.forward(MODEL, tok, tok, cache, segments=seg[:, :3])
  with pytest.raises(ValueError, match="segments must be an int array"):
    llama.forward(MODEL, tok, tok, cache, segments=seg.astype(np.float32))
  with pytest.raises(ValueError, match=r"segments has ids in \[-1, 5\], outside \[-1, 4\]"):
    llama.forward(MODEL, tok, tok, cache, segments=np.array([[0, 1, 5, -1]] * 2, np.int32))
  with pytest.raises(ValueError, match="valid= is for rows of one sequence each"):
    llama.forward(MODEL, tok, tok, cache, segments=seg, valid=np.ones(2, np.int32))
  nodes = _shared_nodes()
  with pytest.raises(ValueError, match="segments= needs cache=None or a cache with a "
                     "per-sequence suffix"):
    llama.forward(MODEL, tok, tok, KVCache(None, [nodes], [np.zeros(2, np.int32)]),
                  segments=seg)


# ----------------------------------------------------------------------------- the engine


SHARE = dict(min_shared_tokens=0, merge_cost=0, max_levels=1)


def _prompts(lengths, shared: bool, seed: int):
  """Suffixes of `lengths` after one 20-token prefix shared by all (shared) or after a
  distinct first token each (no sharing: every length >= 1 then)."""
  rng = np.random.default_rng(seed)
  prefix = rng.integers(3, 256, 20)
  out = []
  for i, n in enumerate(lengths):
    head = prefix if shared else [3 + i]
    out.append(np.concatenate([head, rng.integers(3, 256, n)]).astype(np.int32))
  return out


@settings(max_examples=10)
@given(st.lists(st.integers(0, 15), min_size=6, max_size=6), st.booleans(),
       st.integers(0, 2**16))
def test_packed_engine_prefill_equals_padded(lengths, shared, seed):
  """Greedy tokens of packed and padded prefill are identical (float32) on ragged suffixes
  (16-token bucket: one padded signature; packed rows 1..6 on their own grid)."""
  if not shared:
    lengths = [max(n, 1) for n in lengths]
  prompts = _prompts(lengths, shared, seed)
  options = SHARE if shared else None
  run = functools.partial(engine.generate, MODEL, prompts, max_new_tokens=3,
                          sharing_options=options, backend="xla")
  padded, packed, auto = run(prefill="padded"), run(prefill="packed"), run()
  np.testing.assert_array_equal(packed.tokens, padded.tokens)
  np.testing.assert_array_equal(packed.lengths, padded.lengths)
  assert (padded.prefill, packed.prefill) == ("padded", "packed")
  assert len(packed.signature.levels) == int(shared)
  assert packed.prefill_slots >= sum(lengths) and padded.prefill_slots == 6 * 16
  assert auto.prefill == ("packed" if packed.prefill_slots < padded.prefill_slots
                          else "padded")
  np.testing.assert_array_equal(auto.tokens, padded.tokens)


def test_packed_prefill_shrinks_the_slots():
  """Seven one-token suffixes and one of 30: padded runs 8 rows x 32 slots; packed, the short
  ones fill the long one's row and one more (2 rows x 32), counted from the layout."""
  lengths = [1] * 7 + [30]
  prompts = _prompts(lengths, True, 0)
  plan = sharing.plan(prompts, **SHARE)
  padded = engine.layout(plan, prompts, max_new_tokens=2, prefill="padded")
  packed = engine.layout(plan, prompts, max_new_tokens=2, prefill="packed")
  auto = engine.layout(plan, prompts, max_new_tokens=2)
  assert padded.main.slots == 8 * 32 and packed.main.slots == 2 * 32
  assert packed.padded_slots == padded.main.slots
  assert auto.prefill == "packed" and auto.signature() == packed.signature()
  assert packed.signature().packed_rows == 2 and padded.signature().packed_rows == 0
  assert packed.kv_bytes(CONFIG, jnp.float32) == padded.kv_bytes(CONFIG, jnp.float32)
  # Every real token sits once in the packed tokens, at its own position.
  seg = packed.main.segments
  assert (seg >= 0).sum() == sum(lengths)
  long = int(np.flatnonzero(np.asarray(plan.suffix_lengths) == 30)[0])     # its plan row
  assert sorted(packed.main.positions[seg == long].tolist()) == list(range(20, 50))
  # Equal lengths that do not pack closer than one a row: auto stays padded.
  same = _prompts([9] * 4, True, 1)
  assert engine.layout(sharing.plan(same, **SHARE), same, max_new_tokens=2).prefill == "padded"
  gen = engine.generate(MODEL, prompts, max_new_tokens=2, sharing_options=SHARE)
  assert gen.prefill == "packed" and (gen.prefill_slots, gen.padded_slots) == (64, 256)


def test_second_batch_of_one_signature_does_not_compile():
  """Other suffix lengths and tokens, same buckets (width 16, 2 packed rows): reused."""
  engine.clear_compiled_cache()
  before = engine.compiled_cache_info()[1]
  a = engine.generate(MODEL, _prompts([3, 9, 0, 5, 12, 1], True, 2), max_new_tokens=3,
                      sharing_options=SHARE)
  b_prompts = _prompts([8, 2, 14, 4, 0, 2], True, 3)
  b = engine.generate(MODEL, b_prompts, max_new_tokens=3, sharing_options=SHARE)
  assert (a.prefill, b.prefill) == ("packed", "packed")
  assert a.signature == b.signature and a.signature.packed_rows == 2
  assert engine.compiled_cache_info()[1] - before == 2          # one prefill, one decode
  assert b.compile_seconds == 0.0
  want = engine.generate(MODEL, b_prompts, max_new_tokens=3, sharing_options=SHARE,
                         prefill="padded")
  np.testing.assert_array_equal(b.tokens, want.tokens)


def test_prefill_bad_inputs():
  prompts = _prompts([3, 30], True, 4)
  with pytest.raises(ValueError, match=r"prefill must be one of \['auto', 'packed', "
                     r"'padded'\], got 'fast'"):
    engine.generate(MODEL, prompts, max_new_tokens=2, prefill="fast")
  with pytest.raises(ValueError, match=r"prefill='packed' runs whole packed rows of W=32 "
                     r"tokens .* more than prefill_chunk=16"):
    engine.generate(MODEL, prompts, max_new_tokens=2, prefill="packed", prefill_chunk=16,
                    sharing_options=SHARE)
  # auto falls back to padded where a packed row would not fit one prefill step
  plan = sharing.plan(prompts, **SHARE)
  assert engine.layout(plan, prompts, max_new_tokens=2, prefill_chunk=16).prefill == "padded"
  with pytest.raises(ValueError, match="prefill must be one of"):
    engine.footprint(CONFIG, prompts, max_new_tokens=2, prefill="packd")
