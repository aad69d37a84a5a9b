"""Generation: prefill over a sharing plan, one compiled decode loop, sampling.

  generate(model, params, prompts, *, max_new_tokens, attention="hydragen", ...) -> Generation
  estimate_kv_bytes(config, prompts, *, max_new_tokens, attention, dtype) -> int
  sample(logits, key, *, temperature=0.0, top_k=None, top_p=None) -> tokens
  clear_compiled_cache()
  OutOfMemoryError, Generation

Attention modes (all three prefill each shared node of the plan once, attending to its
ancestors through `hydragen_attention`, then each sequence's unique suffix; they differ in the
cache that the suffixes and the decode loop read):
  hydragen    the nodes stay stored once, as shared levels; each sequence's suffix and its
              generated tokens go to its own preallocated cache. Attention runs over the levels
              with inter-sequence batching, merged by log-sum-exp.
  replicated  each sequence's nodes are copied into its own cache, which then holds the whole
              prompt + generated tokens: the paper's FlashAttention baseline (the prefix copied
              into every sequence); decode is ordinary attention over that cache.
  none        the attention product is skipped (each query head takes its own token's value;
              no KV cache): the paper's "no attention" upper bound. Its tokens are not the
              model's.

Axis letters: B sequences, P prompt length, N nodes, S capacity, E hidden, V vocabulary.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from hydrax import sharing
from hydrax.cache import KVCache, LevelKV, empty_level, level_bytes
from hydrax.models import llama as llama_lib
from hydrax.models.configs import LlamaConfig

_KEY_BLOCK = 128   # shared-level capacities are rounded up to this many keys

ATTENTION_MODES = ("hydragen", "replicated", "none")


class OutOfMemoryError(RuntimeError):
  """The device ran out of memory (XLA RESOURCE_EXHAUSTED) while compiling or running a
  generation. The message names the stage and the point's sizes (sequences, prompt lengths,
  max_new_tokens, attention mode, KV-cache bytes), so an experiment runner can record the point
  as out of memory and move on. The original error is its __cause__."""


@dataclasses.dataclass
class Generation:
  """Result of `generate`, rows in the caller's input order.

  tokens:  [B, max_new_tokens] int32 generated ids; after a sequence's eos (which is kept and
           counted), the remaining slots hold pad_id.
  lengths: [B] int32 generated tokens per sequence (including eos).
  prefill_seconds, decode_seconds: wall time of the compiled prefill and decode loop (device
           work waited for; compile time excluded).
  compile_seconds: time spent compiling them; 0 when executables compiled by an earlier call
           with the same shapes and plan structure were reused.
  decode_tokens_per_second: generated tokens / decode_seconds.
  tokens_per_second: generated tokens / (prefill_seconds + decode_seconds) (end to end).
  kv_bytes: bytes of key/value cache allocated (shared levels once + per-sequence caches).
  decode_steps: iterations of the decode loop that ran (it stops when all sequences are done).
  texts: decoded generations when a tokenizer was given, else None.
  """
  tokens: np.ndarray
  lengths: np.ndarray
  prefill_seconds: float
  decode_seconds: float
  compile_seconds: float
  decode_tokens_per_second: float
  tokens_per_second: float
  kv_bytes: int
  decode_steps: int
  attention: str
  texts: Optional[list] = None

  @property
  def num_generated(self) -> int:
    return int(self.lengths.sum())

  @property
  def decode_tokens_per_s(self) -> float:
    """Alias of decode_tokens_per_second."""
    return self.decode_tokens_per_second

  @property
  def tokens_per_s(self) -> float:
    """Alias of tokens_per_second."""
    return self.tokens_per_second


# ----------------------------------------------------------------------------- sampling


def sample(logits, key, *, temperature: float = 0.0, top_k: Optional[int] = None,
           top_p: Optional[float] = None):
  """Draws one token per row from logits [B,V] -> int32 [B].

  temperature 0: greedy (argmax; top_k/top_p ignored). Otherwise softmax(logits/temperature)
  restricted to the top_k most likely tokens and to the smallest set of most likely tokens whose
  probability reaches top_p (the most likely token is always kept).
  """
  _check_sampling(temperature, top_k, top_p)
  logits = jnp.asarray(logits, jnp.float32)
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  vocab = logits.shape[-1]
  if top_k is not None and top_k < vocab:
    kth = lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None and top_p < 1.0:
    ordered = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    keep = before < top_p
    keep = keep.at[..., 0].set(True)
    threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _check_sampling(temperature, top_k, top_p):
  if not isinstance(temperature, (int, float)) or temperature < 0 or math.isnan(temperature):
    raise ValueError(f"temperature must be a float >= 0 (0 = greedy), got {temperature!r}")
  if top_k is not None and (not isinstance(top_k, (int, np.integer)) or top_k < 1):
    raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
  if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
    raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")


# ----------------------------------------------------------------------------- inputs


def is_plan(obj) -> bool:
  return all(hasattr(obj, a) for a in ("levels", "suffix_tokens", "suffix_lengths", "order"))


def as_sequences(prompts, tokenizer, vocab_size: int) -> list:
  if isinstance(prompts, (str, bytes)):
    raise ValueError("prompts must be a list of prompts (token-id sequences or, with a "
                     "tokenizer, strings), got a single string")
  if isinstance(prompts, np.ndarray) and prompts.ndim == 2:
    prompts = list(prompts)
  try:
    prompts = list(prompts)
  except TypeError:
    raise ValueError(f"prompts must be a list of token-id sequences or a SharingPlan, got "
                     f"{type(prompts).__name__}") from None
  if not prompts:
    raise ValueError("prompts is empty: give at least one prompt")
  seqs = []
  for i, p in enumerate(prompts):
    if isinstance(p, str):
      if tokenizer is None:
        raise ValueError(f"prompts[{i}] is a string; pass tokenizer= (e.g. "
                         "hydrax.checkpoint.load_tokenizer(path)) or give token ids")
      p = tokenizer.encode(p).ids
    arr = np.asarray(p)
    if arr.ndim != 1:
      raise ValueError(f"prompts[{i}] must be a 1-D sequence of token ids, got shape {arr.shape}")
    if arr.size == 0:
      raise ValueError(f"prompts[{i}] is empty; every prompt needs at least one token")
    if not np.issubdtype(arr.dtype, np.integer):
      raise ValueError(f"prompts[{i}] must hold integer token ids, got dtype {arr.dtype}")
    if arr.min() < 0 or arr.max() >= vocab_size:
      raise ValueError(f"prompts[{i}] has token ids in [{arr.min()}, {arr.max()}], outside the "
                       f"vocabulary [0, {vocab_size - 1}]")
    seqs.append(arr.astype(np.int32))
  return seqs


def resolve_model(model, params):
  """(graphdef, params, config) from a Llama module, an nnx.GraphDef or a LlamaConfig."""
  if isinstance(model, llama_lib.Llama):
    graphdef, own = nnx.split(model)
    return graphdef, own if params is None else params, model.config
  if params is None:
    raise ValueError("params is None: pass the model's params (nnx.State) or a Llama module")
  if isinstance(model, LlamaConfig):
    return nnx.split(llama_lib.abstract(model))[0], params, model
  if isinstance(model, nnx.GraphDef):
    config = getattr(nnx.merge(model, params), "config", None)
    if not isinstance(config, LlamaConfig):
      raise ValueError("model graphdef is not a hydrax Llama")
    return model, params, config
  raise ValueError(f"model must be a hydrax Llama module, its nnx.GraphDef or a LlamaConfig, "
                   f"got {type(model).__name__}")


# ----------------------------------------------------------------------------- plan layout


class _Rows(NamedTuple):
  """One prefill pass: R rows of tokens written into one cache level."""
  tokens: np.ndarray     # [R, S_pad] int32
  lengths: np.ndarray    # [R] int32
  start: np.ndarray      # [R] int32 RoPE position of each row's first token
  owners: tuple          # per earlier level: [R] node of each row (static)
  capacity: int          # cache slots per row
  chunk: int             # tokens per row per prefill step (S_pad is a multiple)


class _Layout(NamedTuple):
  """How a plan is prefilled and cached, for one attention mode.

  Every mode prefills each shared node once (attending to its ancestors), then the suffixes.
  hydragen keeps the nodes as shared levels and the suffixes (+ generated tokens) in `main`;
  replicated copies each sequence's nodes into its own `main` cache (whole prompt + generated
  tokens) before the suffix pass, and decodes with that cache alone; none keeps no cache.
  """
  attention: str
  levels: tuple          # _Rows per shared level (node prefill)
  main: _Rows            # the per-sequence level (owners: the shared levels it attends to)
  seq_owners: tuple      # per shared level: [B] node of each sequence (plan order)
  last_source: np.ndarray  # [B] level holding each sequence's last prompt token (-1 = main)
  last_row: np.ndarray   # [B] its row in that level
  prompt_lengths: np.ndarray  # [B] (plan order)
  order: np.ndarray      # [B] input index of plan row i


def _chunked(tokens: np.ndarray, step_tokens: int):
  """Pads [R, S] tokens to a multiple of the per-row chunk c = step_tokens // R (>= 1, <= S),
  so that one prefill step handles at most about step_tokens query tokens."""
  width = max(int(tokens.shape[1]), 1)
  c = max(1, min(step_tokens // max(int(tokens.shape[0]), 1), width))
  padded = -(-width // c) * c
  out = np.zeros((tokens.shape[0], padded), np.int32)
  out[:, :tokens.shape[1]] = tokens
  return out, c


def check_plan_paths(plan, seqs, levels, order) -> None:
  """Every plan row i must be its path's segments followed by its suffix, at consistent
  positions, and equal prompt order[i]. levels: (tokens, lengths, owner, start) NumPy tuples
  of the plan's non-empty levels; seqs: the prompts in input order."""
  suf_tokens = np.asarray(plan.suffix_tokens)
  suf_len = np.asarray(plan.suffix_lengths, np.int64)
  suf_start = np.asarray(plan.suffix_start, np.int64)
  for i in range(len(seqs)):
    parts, pos = [], 0
    for d, (tokens, lengths, owner, start) in enumerate(levels):
      node = owner[i]
      if lengths[node]:
        if start[node] != pos:
          raise ValueError(f"plan level {d} node {node} starts at {start[node]} but sequence "
                           f"{order[i]}'s path reaches it at position {pos}")
        parts.append(tokens[node, :lengths[node]])
        pos += int(lengths[node])
    if suf_start[i] != pos:
      raise ValueError(f"plan.suffix_start[{i}] = {suf_start[i]} but its path ends at {pos}")
    parts.append(suf_tokens[i, :suf_len[i]])
    if not np.array_equal(np.concatenate(parts), seqs[order[i]]):
      raise ValueError(f"the plan does not reproduce prompt {order[i]} (plan row {i}); was it "
                       "made from these prompts?")


def _plan_layout(plan, seqs, max_new: int, chunk: int, attention: str) -> _Layout:
  """Checks a SharingPlan against the prompts and lays out its prefill passes."""
  order = np.asarray(plan.order, np.int64)
  b = len(seqs)
  if order.shape != (b,) or sorted(order.tolist()) != list(range(b)):
    raise ValueError(f"plan.order must be a permutation of range({b}), got {order.tolist()}")
  levels = []
  for d, lvl in enumerate(plan.levels):
    tokens, lengths = np.asarray(lvl.tokens), np.asarray(lvl.lengths, np.int32)
    owner, start = np.asarray(lvl.owner, np.int64), np.asarray(lvl.start, np.int32)
    n = tokens.shape[0]
    if tokens.ndim != 2 or lengths.shape != (n,) or start.shape != (n,) or owner.shape != (b,):
      raise ValueError(f"plan.levels[{d}] has inconsistent shapes: tokens {tokens.shape}, "
                       f"lengths {lengths.shape}, start {start.shape}, owner {owner.shape} "
                       f"(B={b})")
    if owner.size and (owner.min() < 0 or owner.max() >= n):
      raise ValueError(f"plan.levels[{d}].owner has nodes outside [0, {n - 1}]")
    if lengths.size and (lengths.min() < 0 or lengths.max() > tokens.shape[1]):
      raise ValueError(f"plan.levels[{d}].lengths outside [0, {tokens.shape[1]}]")
    if lengths.size and lengths.max() > 0:
      levels.append((tokens, lengths, owner, start))
  check_plan_paths(plan, seqs, levels, order)
  suf_tokens = np.asarray(plan.suffix_tokens)
  suf_len = np.asarray(plan.suffix_lengths, np.int32)
  suf_start = np.asarray(plan.suffix_start, np.int32)
  rows = []
  for d, (tokens, lengths, owner, start) in enumerate(levels):
    n = tokens.shape[0]
    anc = []
    for j in range(d):
      a = np.zeros((n,), np.int32)
      for node in range(n):
        members = np.flatnonzero(owner == node)
        if members.size and lengths[node]:
          parents = np.unique(levels[j][2][members])
          if parents.size != 1:
            raise ValueError(f"plan level {d} node {node} has sequences under different "
                             f"level-{j} nodes {parents.tolist()}: not a tree")
          a[node] = parents[0]
      anc.append(a)
    padded, c = _chunked(tokens, chunk)
    # Capacity in whole blocks of 128 keys: the Mosaic GPU kernel (pallas backend on Hopper)
    # otherwise copies the level padded on every call.
    cap = padded.shape[1]
    cap = cap if cap <= _KEY_BLOCK else -(-cap // _KEY_BLOCK) * _KEY_BLOCK
    rows.append(_Rows(padded, lengths, start, tuple(anc), cap, c))
  padded, c = _chunked(suf_tokens, chunk)
  seq_owners = tuple(lvl[2].astype(np.int32) for lvl in levels)
  prompt_lengths = np.array([len(seqs[o]) for o in order], np.int32)
  if attention == "replicated":   # the whole prompt + new tokens in each sequence's cache
    capacity = max(padded.shape[1], int(prompt_lengths.max()) + max_new - 1, 1)
    main = _Rows(padded, suf_len, suf_start, (), capacity, c)
  else:
    capacity = max(padded.shape[1], int(suf_len.max(initial=0)) + max_new - 1, 1)
    main = _Rows(padded, suf_len, suf_start, seq_owners, capacity, c)
  last_source = np.full((b,), -1, np.int32)
  last_row = np.arange(b, dtype=np.int32)
  for i in range(b):
    if suf_len[i] == 0:   # the prompt ends inside its deepest non-empty node
      for d in reversed(range(len(levels))):
        node = levels[d][2][i]
        if levels[d][1][node] > 0:
          last_source[i], last_row[i] = d, node
          break
  return _Layout(attention, tuple(rows), main, seq_owners, last_source, last_row,
                 prompt_lengths, order)


def _layout_kv_bytes(layout: _Layout, config: LlamaConfig, dtype) -> int:
  """Bytes of the cache that decode holds (the shared levels only with hydragen)."""
  if layout.attention == "none":
    return 0
  sizes = [(r.tokens.shape[0], r.capacity) for r in layout.levels
           if layout.attention == "hydragen"]
  sizes.append((layout.main.tokens.shape[0], layout.main.capacity))
  return sum(level_bytes(config.num_layers, n, s, config.num_kv_heads, config.head_dim, dtype)
             for n, s in sizes)


# ----------------------------------------------------------------------------- prefill / decode


def chunked_prefill(forward_chunk, tokens, lengths, start, own, *, chunk: int, hidden_size: int,
                    dtype):
  """Runs a prefill pass over tokens [R, W] (W a multiple of `chunk`) in chunks of `chunk`
  tokens per row, under `lax.scan` when there is more than one chunk.

  forward_chunk(tok [R,c], positions [R,c], own, valid [R]) -> (hidden [R,c,E], own): the
  model on one chunk, appending its keys to `own` (or None). lengths [R]: real tokens per row;
  start [R]: the position of each row's first token. Returns (own, last hidden [R,E] of each
  row's last real token).
  """
  r, width = tokens.shape
  c = chunk
  steps = width // c
  arange_r = jnp.arange(r)

  def step(carry, xs):
    own, last = carry
    index, tok = xs
    offset = index * c
    positions = start[:, None] + offset + jnp.arange(c, dtype=jnp.int32)[None, :]
    valid = jnp.clip(lengths - offset, 0, c)
    hidden, own = forward_chunk(tok, positions, own, valid)
    idx = lengths - 1 - offset
    here = (idx >= 0) & (idx < c)
    picked = hidden[arange_r, jnp.clip(idx, 0, c - 1)]
    return (own, jnp.where(here[:, None], picked, last)), None

  last = jnp.zeros((r, hidden_size), dtype)
  chunks = tokens.reshape(r, steps, c).transpose(1, 0, 2)
  if steps == 1:
    (own, last), _ = step((own, last), (jnp.int32(0), chunks[0]))
  else:
    (own, last), _ = lax.scan(step, (own, last),
                              (jnp.arange(steps, dtype=jnp.int32), chunks))
  return own, last


def _prefill_rows(model, rows: _Rows, tokens, lengths, start, shared, own, *, skip: bool,
                  backend: str):
  """Runs one prefill pass in chunks, appending to `own` (a LevelKV, or None with skip).

  Row r attends to its nodes of `shared` (per rows.owners) and to `own`. Returns (own, last
  hidden [R,E] of each row's last real token).
  """
  shared_levels = tuple(shared[:len(rows.owners)])

  def forward_chunk(tok, positions, own, valid):
    cache = None if skip else KVCache(own, shared_levels, rows.owners)
    hidden, cache = llama_lib.forward(model, tok, positions, cache, valid=valid,
                                      skip_attention=skip, backend=backend)
    return hidden, None if cache is None else cache.suffix

  return chunked_prefill(forward_chunk, tokens, lengths, start, own, chunk=rows.chunk,
                         hidden_size=model.config.hidden_size, dtype=model.dtype)


def replicate_nodes(shared, owners, level_inputs, full: LevelKV, prefix_lengths) -> LevelKV:
  """Copies each sequence's shared nodes into its own cache `full` [L,B,S,K,D] at their
  positions (the replicated baseline's layout); lengths become prefix_lengths [B]. owners: per
  shared level, [B] node of each row (concrete or traced: a gather needs no static grouping).
  Also used per data shard by `hydrax.parallel.generate`."""
  b = full.k.shape[1]
  rows = jnp.arange(b)[:, None]
  k, v = full.k, full.v
  for lvl, owner, (_, node_lengths, node_start) in zip(shared, owners, level_inputs):
    t = jnp.arange(lvl.capacity, dtype=jnp.int32)[None, :]
    # Slots of the node's valid keys; padding goes out of range and is dropped.
    slots = jnp.where(t < node_lengths[owner][:, None], node_start[owner][:, None] + t,
                      full.capacity)

    def copy(layer, kv, lvl=lvl, owner=owner, slots=slots):
      k, v = kv
      src_k = lax.dynamic_index_in_dim(lvl.k, layer, keepdims=False)[owner]
      src_v = lax.dynamic_index_in_dim(lvl.v, layer, keepdims=False)[owner]
      return (k.at[layer, rows, slots].set(src_k, mode="drop"),
              v.at[layer, rows, slots].set(src_v, mode="drop"))
    k, v = lax.fori_loop(0, k.shape[0], copy, (k, v))
  return LevelKV(k, v, prefix_lengths.astype(jnp.int32))


def _make_prefill(graphdef, layout: _Layout, *, backend: str, sampling: dict):
  """prefill(params, inputs, key, eos) -> (shared levels, main LevelKV, first tokens, done);
  eos is an int32 scalar (-1: none)."""
  skip = layout.attention == "none"

  def prefill(params, inputs, key, eos):
    model = nnx.merge(graphdef, params)
    config = model.config

    def fresh(rows):
      if skip:
        return None
      return empty_level(config.num_layers, rows.tokens.shape[0], rows.capacity,
                         config.num_kv_heads, config.head_dim, model.dtype)

    shared, lasts = [], []
    for d, rows in enumerate(layout.levels):
      tok, lengths, start = inputs["levels"][d]
      own, last = _prefill_rows(model, rows, tok, lengths, start, shared, fresh(rows),
                                skip=skip, backend=backend)
      shared.append(own)
      lasts.append(last)
    tok, lengths, start = inputs["main"]
    main = fresh(layout.main)
    if layout.attention == "replicated":
      main = replicate_nodes(shared, layout.seq_owners, inputs["levels"], main, start)
      shared = []
    main, last = _prefill_rows(model, layout.main, tok, lengths, start, shared, main,
                               skip=skip, backend=backend)
    for d, node_last in enumerate(lasts):
      rows_here = np.flatnonzero(layout.last_source == d)
      if rows_here.size:
        last = last.at[rows_here].set(node_last[layout.last_row[rows_here]])
    first = sample(llama_lib.logits(model, last), key, **sampling)
    done = first == eos
    return tuple(shared), main, first, done

  return prefill


def _make_decode(graphdef, layout: _Layout, *, backend: str, sampling: dict, max_new: int):
  """decode(params, shared, suffix, first, done, key, prompt_lengths, eos, pad) ->
  (tokens [B,max_new], n [B], steps, suffix); one lax.while_loop, stopping when every sequence
  is done. eos (-1: none) and pad are int32 scalars."""
  skip = layout.attention == "none"
  owners = layout.seq_owners if layout.attention == "hydragen" else ()

  def decode(params, shared, suffix, first, done, key, plen, eos, pad):
    model = nnx.merge(graphdef, params)
    b = first.shape[0]
    out = jnp.full((b, max_new), pad, jnp.int32).at[:, 0].set(first)
    count = jnp.ones((b,), jnp.int32)

    def cond(carry):
      i, _, _, done, _, _, _ = carry
      return (i < max_new) & ~jnp.all(done)

    def body(carry):
      i, out, last, done, count, suffix, key = carry
      key, sub = jax.random.split(key)
      positions = (plen + i - 1)[:, None]
      cache = None if skip else KVCache(suffix, shared, owners)
      hidden, cache = llama_lib.forward(model, last[:, None], positions, cache,
                                        skip_attention=skip, backend=backend)
      tok = sample(llama_lib.logits(model, hidden[:, 0]), sub, **sampling)
      tok = jnp.where(done, pad, tok)
      out = lax.dynamic_update_slice(out, tok[:, None], (0, i))
      count = count + (~done).astype(jnp.int32)
      done = done | (tok == eos)
      return (i + 1, out, tok, done, count, None if cache is None else cache.suffix, key)

    carry = (jnp.int32(1), out, first, done, count, suffix, key)
    steps, out, _, _, count, suffix, _ = lax.while_loop(cond, body, carry)
    return out, count, steps - 1, suffix

  return decode


# ----------------------------------------------------------------------------- generate


def _is_oom(error: BaseException) -> bool:
  if isinstance(error, MemoryError):
    return True
  text = str(error)
  return ("RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()
          or "Out of memory" in text)


class _OOMGuard:
  def __init__(self, point: str):
    self.point = point
    self.stage = "setup"

  def __enter__(self):
    return self

  def __exit__(self, kind, error, tb):
    if error is not None and not isinstance(error, (ValueError, OutOfMemoryError)) \
        and _is_oom(error):
      raise OutOfMemoryError(f"out of device memory during {self.stage}: {self.point}. "
                             f"XLA said: {str(error).splitlines()[0][:300]}") from error
    return False


class _LRU:
  """A small least-recently-used cache of compiled (prefill, decode) executables."""

  def __init__(self, size: int):
    self.size = size
    self.items: "collections.OrderedDict" = collections.OrderedDict()

  def get(self, key):
    if key in self.items:
      self.items.move_to_end(key)
      return self.items[key]
    return None

  def put(self, key, value):
    self.items[key] = value
    self.items.move_to_end(key)
    while len(self.items) > self.size:
      self.items.popitem(last=False)

  def clear(self):
    self.items.clear()


_EXECUTABLES = _LRU(8)


def clear_compiled_cache() -> None:
  """Drops the compiled executables that `generate` keeps for reuse."""
  _EXECUTABLES.clear()


def _executable_key(graphdef, params, layout: _Layout, **static):
  """Everything the compiled prefill/decode depend on besides their array inputs."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  rows = tuple((r.tokens.shape, r.capacity, r.chunk, tuple(o.tobytes() for o in r.owners))
               for r in layout.levels + (layout.main,))
  # With no shared level, hydragen and replicated are the same computation.
  mode = layout.attention if layout.levels or layout.attention == "none" else "replicated"
  return (mode, graphdef, treedef, tuple((x.shape, str(x.dtype)) for x in leaves), rows,
          tuple(o.tobytes() for o in layout.seq_owners), layout.last_source.tobytes(),
          layout.last_row.tobytes(), tuple(sorted((k, str(v)) for k, v in static.items())))


def _prepare(config: LlamaConfig, prompts, *, max_new_tokens, attention, max_len,
             prefill_chunk, tokenizer, sharing_options):
  """Validates the request and lays it out: (sequences in input order, _Layout)."""
  if attention not in ATTENTION_MODES:
    raise ValueError(f"attention must be one of {list(ATTENTION_MODES)}, got {attention!r}")
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
  max_new_tokens = int(max_new_tokens)
  if not isinstance(prefill_chunk, (int, np.integer)) or prefill_chunk < 1:
    raise ValueError(f"prefill_chunk must be an int >= 1, got {prefill_chunk!r}")
  plan = prompts if is_plan(prompts) else None
  if plan is not None:
    seqs = as_sequences(plan.sequences, None, config.vocab_size)
  else:
    seqs = as_sequences(prompts, tokenizer, config.vocab_size)
  max_len = config.max_position_embeddings if max_len is None else int(max_len)
  for i, s in enumerate(seqs):
    if len(s) + max_new_tokens > max_len:
      raise ValueError(f"prompt {i} has {len(s)} tokens; with max_new_tokens={max_new_tokens} "
                       f"it needs {len(s) + max_new_tokens} positions, more than the cache "
                       f"length max_len={max_len}")
  if plan is None:
    plan = sharing.plan(seqs, **(sharing_options or {}))
  return seqs, _plan_layout(plan, seqs, max_new_tokens, int(prefill_chunk), attention)


def estimate_kv_bytes(config: LlamaConfig, prompts, *, max_new_tokens: int,
                      attention: str = "hydragen", dtype=jnp.bfloat16,
                      max_len: Optional[int] = None, prefill_chunk: int = 2048,
                      sharing_options: Optional[dict] = None) -> int:
  """The `kv_bytes` that `generate` would allocate for this request, computed without running
  anything (same validation and layout; prompts as for `generate`, token ids or a plan)."""
  if not isinstance(config, LlamaConfig):
    raise ValueError(f"config must be a LlamaConfig, got {type(config).__name__}")
  _, layout = _prepare(config, prompts, max_new_tokens=max_new_tokens, attention=attention,
                       max_len=max_len, prefill_chunk=prefill_chunk, tokenizer=None,
                       sharing_options=sharing_options)
  return _layout_kv_bytes(layout, config, jnp.dtype(dtype))


def generate(model, params, prompts=None, *, max_new_tokens: int, attention: str = "hydragen",
             temperature: float = 0.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, eos_id: Optional[int] = None, pad_id: int = 0,
             seed: int = 0, max_len: Optional[int] = None, prefill_chunk: int = 2048,
             backend: str = "auto", tokenizer: Any = None,
             sharing_options: Optional[dict] = None) -> Generation:
  """Generates up to max_new_tokens tokens for each prompt.

  model: a hydrax `Llama` module, its `nnx.GraphDef`, or its `LlamaConfig`; params: its
    nnx.State (None: the module's own parameters). `generate(module, prompts, ...)` is short
    for `generate(module, None, prompts, ...)`.
  prompts: a `hydrax.sharing.SharingPlan`, or a list of token-id sequences (or of strings, with
    `tokenizer`), which are planned by `hydrax.sharing.plan(prompts, **sharing_options)`.
    In every mode the prefill computes each shared node once; the modes differ in the cache
    that decode reads (see the module docstring).
  attention: "hydragen" | "replicated" | "none" (see the module docstring).
  temperature / top_k / top_p: sampling (temperature 0 = greedy); seed: PRNG seed.
  eos_id: a sequence stops after generating it (None: all generate max_new_tokens); later slots
    hold pad_id. max_len: positions a sequence may reach (prompt + new tokens; default the
    config's max_position_embeddings). prefill_chunk: query tokens (rows x tokens) per
    prefill step; bounds the attention scores' memory (~ prefill_chunk * H * keys * 4 bytes
    with the XLA backend) at the price of more steps. backend: attention backend name.
  sharing_options: keyword arguments of `hydrax.sharing.plan` for plain prompts.
  Returns a `Generation` (rows in input order). Raises ValueError for bad inputs and
  `OutOfMemoryError` when the device runs out of memory.
  """
  if prompts is None:
    if not isinstance(model, llama_lib.Llama):
      raise ValueError("generate(model, prompts) without params needs a Llama module; pass "
                       "generate(model, params, prompts)")
    params, prompts = None, params
  graphdef, params, config = resolve_model(model, params)
  _check_sampling(temperature, top_k, top_p)
  for name, value in (("eos_id", eos_id), ("pad_id", pad_id)):
    if value is not None and not 0 <= int(value) < config.vocab_size:
      raise ValueError(f"{name}={value} is outside the vocabulary [0, {config.vocab_size - 1}]")
  seqs, layout = _prepare(config, prompts, max_new_tokens=max_new_tokens, attention=attention,
                          max_len=max_len, prefill_chunk=prefill_chunk, tokenizer=tokenizer,
                          sharing_options=sharing_options)
  max_new_tokens = int(max_new_tokens)
  dtype = jax.tree_util.tree_leaves(params)[0].dtype
  kv = _layout_kv_bytes(layout, config, dtype)
  point = (f"attention={attention}, sequences={len(seqs)}, prompt tokens "
           f"{min(map(len, seqs))}..{max(map(len, seqs))}, max_new_tokens={max_new_tokens}, "
           f"shared levels={len(layout.levels)}, kv_bytes={kv:,}, dtype={jnp.dtype(dtype)}")
  sampling = dict(temperature=float(temperature), top_k=top_k, top_p=top_p)
  eos = jnp.int32(-1 if eos_id is None else int(eos_id))
  pad = jnp.int32(pad_id)
  inputs = {"levels": [(jnp.asarray(r.tokens), jnp.asarray(r.lengths), jnp.asarray(r.start))
                       for r in layout.levels],
            "main": (jnp.asarray(layout.main.tokens), jnp.asarray(layout.main.lengths),
                     jnp.asarray(layout.main.start))}
  key_first, key_loop = jax.random.split(jax.random.key(seed))
  compile_s = decode_s = 0.0
  steps = 0
  plen = jnp.asarray(layout.prompt_lengths)
  cache_key = _executable_key(graphdef, params, layout, max_new=max_new_tokens,
                              backend=backend, **sampling)
  compiled = _EXECUTABLES.get(cache_key) or [None, None]
  with _OOMGuard(point) as guard:
    prefill, decode = compiled
    if prefill is None:
      guard.stage = "prefill compilation"
      t0 = time.perf_counter()
      prefill = jax.jit(_make_prefill(graphdef, layout, backend=backend, sampling=sampling))
      prefill = prefill.lower(params, inputs, key_first, eos).compile()
      compile_s += time.perf_counter() - t0
    guard.stage = "prefill"
    t0 = time.perf_counter()
    shared, suffix, first, done = jax.block_until_ready(
        prefill(params, inputs, key_first, eos))
    prefill_s = time.perf_counter() - t0
    if max_new_tokens > 1:
      if decode is None:
        guard.stage = "decode compilation"
        t0 = time.perf_counter()
        decode = jax.jit(_make_decode(graphdef, layout, backend=backend, sampling=sampling,
                                      max_new=max_new_tokens), donate_argnums=(2,))
        decode = decode.lower(params, shared, suffix, first, done, key_loop, plen, eos,
                              pad).compile()
        compile_s += time.perf_counter() - t0
      guard.stage = "decode"
      t0 = time.perf_counter()
      out, count, steps, suffix = jax.block_until_ready(
          decode(params, shared, suffix, first, done, key_loop, plen, eos, pad))
      decode_s = time.perf_counter() - t0
      steps = int(steps)
    else:
      out = first[:, None]
      count = jnp.ones_like(first)
    _EXECUTABLES.put(cache_key, [prefill, decode])
    out, count = np.asarray(out), np.asarray(count)
  tokens = np.empty_like(out)
  lengths = np.empty_like(count)
  tokens[layout.order] = out
  lengths[layout.order] = count
  generated = int(lengths.sum())
  texts = None
  if tokenizer is not None:
    texts = [tokenizer.decode(tokens[i, :lengths[i]].tolist()) for i in range(len(seqs))]
  return Generation(
      tokens=tokens.astype(np.int32), lengths=lengths.astype(np.int32),
      prefill_seconds=prefill_s, decode_seconds=decode_s, compile_seconds=compile_s,
      decode_tokens_per_second=generated / decode_s if decode_s > 0 else float("nan"),
      tokens_per_second=generated / (prefill_s + decode_s) if prefill_s + decode_s > 0
      else float("nan"),
      kv_bytes=kv, decode_steps=steps, attention=attention, texts=texts)
