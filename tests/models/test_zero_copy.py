"""The compiled forward keeps the stacked caches in place: no copy of a cache inside the step;
and the writes into caches tell XLA their indices are unique (lowered StableHLO).

Inspects the optimised HLO of `jax.jit(...).lower(...).compile()` (CPU, XLA backend): every
instruction that produces an array of a cache's [L,N,S,K,D] shape must be a parameter, a
bitcast, a loop-carry element, or an in-place update (scatter / dynamic-update-slice, alone or
in a fusion). A copy, transpose or any other full-size computation is reported.

The caches are float32: XLA's CPU backend has no bfloat16 scatter, so with bfloat16 caches it
converts the whole stack to float32 and back around every write (a bare `.at[].set` in a loop
shows the same); GPUs scatter bfloat16 natively (`experiments/bench_engine.py` counts the
copies in the H200's decode HLO).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hydrax.cache import KVCache, empty_level
from hydrax.models import LlamaConfig, llama

CONFIG = LlamaConfig.from_preset("tiny").replace(num_layers=3)
B, S = 5, 40                       # shapes no other array of the step has
_IN_PLACE = ("scatter(", "dynamic-update-slice(")
_PASS_THROUGH = {"parameter", "get-tuple-element", "bitcast", "scatter", "dynamic-update-slice"}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%(\S+)\s*=\s*(\S+)\s+([\w-]+)\(")


def full_size_copies(hlo: str, shape: tuple) -> list[str]:
  """Instructions of `hlo` producing an array of `shape` other than in-place updates."""
  computations, current = {}, None
  for line in hlo.splitlines():
    head = re.match(r"^(?:ENTRY\s+)?%(\S+)\s.*\{\s*$", line)
    if head:
      current = head.group(1)
      computations[current] = []
    elif current is not None:
      computations[current].append(line)
  dims = ",".join(str(d) for d in shape)
  bad = []
  for lines in computations.values():
    for line in lines:
      m = _INSTRUCTION.match(line)
      if not m or not re.fullmatch(rf"[a-z0-9]+\[{dims}\](\{{[^}}]*\}})?", m.group(2)):
        continue
      op = m.group(3)
      if op in _PASS_THROUGH:
        continue
      if op == "fusion":
        called = re.search(r"calls=%([\w.\-]+)", line)
        body = "\n".join(computations.get(called.group(1), [])) if called else ""
        if any(p in body for p in _IN_PLACE):
          continue
      bad.append(line.strip()[:160])
  return bad


@pytest.fixture(scope="module")
def parts():
  model = llama.init(CONFIG, seed=0)
  graphdef, params = nnx.split(model)
  suffix = empty_level(CONFIG.num_layers, B, S, CONFIG.num_kv_heads, CONFIG.head_dim,
                       jnp.float32)
  shared = empty_level(CONFIG.num_layers, 2, 24, CONFIG.num_kv_heads, CONFIG.head_dim,
                       jnp.float32)
  return graphdef, params, shared, suffix


OWNER = np.array([0, 0, 1, 1, 1], np.int32)


def _forward(graphdef, params, shared, suffix, tok, pos):
  model = nnx.merge(graphdef, params)
  hidden, cache = llama.forward(model, tok, pos, KVCache(suffix, (shared,), (OWNER,)),
                                backend="xla")
  return llama.logits(model, hidden), cache.suffix


def _compiled(fn, *args, donate=(3,)):
  return jax.jit(fn, static_argnums=0, donate_argnums=donate).lower(*args).compile().as_text()


def test_decode_step_has_no_copy_of_a_cache(parts):
  graphdef, params, shared, suffix = parts
  tok = jnp.zeros((B, 1), jnp.int32)
  hlo = _compiled(_forward, graphdef, params, shared, suffix, tok, tok)
  assert "while" in hlo                               # the layers run as a loop
  assert full_size_copies(hlo, suffix.k.shape) == []
  assert full_size_copies(hlo, shared.k.shape) == []


def test_decode_loop_has_no_copy_of_a_cache(parts):
  """Several decode steps in one loop (as the engine's decode): the cache is a loop carry."""
  graphdef, params, shared, suffix = parts

  def decode(graphdef, params, shared, suffix, tok):
    def body(i, carry):
      tok, suffix = carry
      logits, suffix = _forward(graphdef, params, shared, suffix, tok[:, None],
                                suffix.lengths[:, None])
      return jnp.argmax(logits[:, 0], -1).astype(jnp.int32), suffix
    return jax.lax.fori_loop(0, 4, body, (tok, suffix))

  hlo = _compiled(decode, graphdef, params, shared, suffix, jnp.zeros((B,), jnp.int32))
  assert full_size_copies(hlo, suffix.k.shape) == []


def test_the_check_finds_a_copy(parts):
  """Control: returning the cache both before and after the write forces XLA to copy it."""
  graphdef, params, shared, suffix = parts

  def keep_old(graphdef, params, shared, suffix, tok, pos):
    logits, new = _forward(graphdef, params, shared, suffix, tok, pos)
    return logits, new, suffix

  tok = jnp.zeros((B, 1), jnp.int32)
  hlo = _compiled(keep_old, graphdef, params, shared, suffix, tok, tok)
  assert full_size_copies(hlo, suffix.k.shape)


_SCATTER = re.compile(r'"stablehlo\.scatter"\(.*?<\{(.*?)\}>.*?\}\) : \((tensor<[^>]*>)', re.S)


def _cache_scatters(text: str, shape: tuple) -> list[str]:
  """The attributes of each scatter into an array of `shape` in lowered StableHLO `text`."""
  dims = "x".join(map(str, shape))
  return [attrs for attrs, operand in _SCATTER.findall(text) if operand.startswith(
      f"tensor<{dims}x")]


def test_cache_writes_are_scatters_with_unique_indices(parts):
  """The decode step's and the packed prefill's writes into the cache say that their indices
  are unique (the decode's sorted too): XLA's GPU scatter otherwise updates each element with
  an atomic read-modify-write. Packed padding gets rows of its own past the cache."""
  graphdef, params, shared, suffix = parts
  tok = jnp.zeros((B, 1), jnp.int32)
  step = jax.jit(_forward, static_argnums=0).lower(graphdef, params, shared, suffix, tok,
                                                   tok).as_text()
  writes = _cache_scatters(step, suffix.k.shape)
  assert len(writes) == 2, writes                      # k and v, in the layers' loop
  assert all("unique_indices = true" in w and "indices_are_sorted = true" in w
             for w in writes), writes

  segments = np.array([[0, 0, 1, -1, -1], [2, 3, 3, 4, -1]], np.int32)
  packed = llama._packed(segments, B, fresh=False)
  row = np.asarray(packed.row)
  assert (row[segments >= 0] == segments[segments >= 0]).all()
  pad = row[segments < 0]
  assert (pad >= B).all() and len(set(pad.tolist())) == pad.size
  assert np.asarray(packed.count).tolist() == [2, 1, 1, 2, 1]
  k = jnp.ones(segments.shape + (CONFIG.num_kv_heads, CONFIG.head_dim), jnp.float32)
  prefill = jax.jit(lambda s, k: llama.packed_level(s, 1, k, k, packed)).lower(
      suffix, k).as_text()
  writes = _cache_scatters(prefill, suffix.k.shape)
  assert len(writes) == 2 and all("unique_indices = true" in w for w in writes), writes


def test_replicated_prefill_copies_nodes_with_unique_sorted_scatters():
  """The replicated baseline's copy of each sequence's shared nodes into its own cache
  (`engine.replicate_nodes`) writes every slot once (padding to slots of its own past the
  cache), says so to XLA, and lands each node's keys at their positions."""
  from hydrax import engine
  from hydrax.cache import LevelKV
  rng = np.random.default_rng(0)
  nodes = LevelKV(*(jnp.asarray(rng.normal(size=(3, 2, 8, 2, 4)), jnp.float32)
                    for _ in range(2)), jnp.array([5, 8], jnp.int32))
  owner = jnp.array([0, 1, 1], jnp.int32)
  full = empty_level(3, 3, 12, 2, 4, jnp.float32)
  args = ([nodes], [owner], [(None, nodes.lengths, jnp.array([0, 0], jnp.int32))], full,
          jnp.array([5, 8, 8], jnp.int32))
  text = jax.jit(engine.replicate_nodes).lower(*args).as_text()
  writes = _cache_scatters(text, full.k.shape)
  assert len(writes) == 2 and all("unique_indices = true" in w and
                                  "indices_are_sorted = true" in w for w in writes), writes
  out = engine.replicate_nodes(*args)
  for row, node in enumerate([0, 1, 1]):
    n = int(nodes.lengths[node])
    np.testing.assert_array_equal(out.k[:, row, :n], nodes.k[:, node, :n])
    np.testing.assert_array_equal(out.v[:, row, n:], 0)
  assert np.asarray(out.lengths).tolist() == [5, 8, 8]
