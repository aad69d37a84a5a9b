"""Sharded generation: the engine's prefill and decode loop, run per shard under `jax.shard_map`.

Same algorithm and semantics as `hydrax.engine.generate` (prefill each shared node once,
attending to its ancestors; then each sequence's suffix; then one compiled decode loop), with:

  data   the plan's sequences (plan order, depth-first) cut into `data` contiguous blocks of
         ceil(B/data) rows (a short block repeats its last row; the copies' outputs are
         dropped). Each data shard stores and prefills the nodes its rows own, re-indexed
         locally; a node whose sequences span several shards is stored and prefilled on each
         of them (see `hydrax.parallel.rules`). No communication over data except one scalar
         all-reduce per decode step (are all sequences done?).
  model  tensor parallelism (`hydrax.parallel.step`): two all-reduces of [B_l,1,E] per layer
         per decode step; greedy decoding gathers one (max, argmax) pair per row and shard.

Axis letters: B sequences, R rows of a prefill pass, N nodes, S capacity, E hidden, V vocab.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from hydrax import engine
from hydrax.cache import LevelKV, empty_level, level_bytes
from hydrax.models import llama as llama_lib
from hydrax.parallel import rules
from hydrax.parallel.mesh import DATA, axis_sizes, make_mesh
from hydrax.parallel.step import OwnerTable, forward_shard, next_token_shard

ATTENTION_MODES = ("hydragen", "replicated", "none")


resolve_model = engine.resolve_model   # (graphdef, params, config) of a model argument


# ----------------------------------------------------------------------------- plan over data


class ShardedPass(NamedTuple):
  """One prefill pass, R rows per data shard, stacked: arrays have data*R rows.

  tokens [data*R, W] int32 (W a multiple of chunk), lengths, start [data*R] int32;
  table: the owners, per shard, of the rows at the earlier shared levels (static).
  """
  tokens: np.ndarray
  lengths: np.ndarray
  start: np.ndarray
  table: OwnerTable
  rows: int
  capacity: int
  chunk: int


class ShardedPlan(NamedTuple):
  """A sharing plan laid out over the data axis (see the module docstring).

  levels: one ShardedPass per non-empty shared level (its rows are the shard's local nodes);
  main: the per-sequence pass (suffixes, or whole prompts); its table holds each row's local
    node at every shared level (what decode attends with).
  plan_row [data, B_l]: plan row of each local row; real [data, B_l]: False for repeated rows.
  last_source, last_row [data*B_l]: where each row's last prompt token's hidden state is (-1:
    the main pass, row itself; d: shared level d, local node last_row).
  prompt_lengths [data*B_l]; order [B]: input index of each plan row.
  replication: per shared level, stored nodes / distinct nodes (1.0: no node spans shards).
  seq_owner: per shared level, [data*B_l] local node of each row (the data twin of
    main.table, used to copy nodes into the rows' caches in the replicated mode).
  attention: the generation mode the layout is for.
  """
  levels: tuple
  main: ShardedPass
  plan_row: np.ndarray
  real: np.ndarray
  last_source: np.ndarray
  last_row: np.ndarray
  prompt_lengths: np.ndarray
  order: np.ndarray
  replication: tuple
  seq_owner: tuple
  attention: str


def _chunked(tokens: np.ndarray, step_tokens: int, rows: int):
  """Pads [R, S] tokens to a multiple of the per-row chunk c = step_tokens // rows (>= 1,
  <= S; rows: a shard's rows), so that one prefill step of a device handles at most about
  step_tokens query tokens (the engine's rule, per device)."""
  width = max(int(tokens.shape[1]), 1)
  c = max(1, min(step_tokens // max(rows, 1), width))
  out = np.zeros((tokens.shape[0], -(-width // c) * c), np.int32)
  out[:, :tokens.shape[1]] = tokens
  return out, c


def _split_rows(b: int, data: int):
  if b < data:
    raise ValueError(f"{b} sequences cannot fill a data axis of size {data}: use at most {b} "
                     "data shards (put the other devices on 'model')")
  per = -(-b // data)
  sizes = [b // data + (s < b % data) for s in range(data)]
  plan_row = np.zeros((data, per), np.int64)
  real = np.zeros((data, per), bool)
  first = 0
  for s, n in enumerate(sizes):
    plan_row[s, :n] = np.arange(first, first + n)
    plan_row[s, n:] = first + n - 1
    real[s, :n] = True
    first += n
  return plan_row, real


def _check_plan(plan, seqs, levels, order):
  """The plan must reproduce every prompt and form a tree (as the engine checks)."""
  b = len(seqs)
  if order.shape != (b,) or sorted(order.tolist()) != list(range(b)):
    raise ValueError(f"plan.order must be a permutation of range({b})")
  engine.check_plan_paths(plan, seqs, levels, order)
  for d, (_, lengths, owner, _) in enumerate(levels):
    for j in range(d):
      pairs = np.unique(np.stack([owner, levels[j][2]]), axis=1)
      nodes, counts = np.unique(pairs[0], return_counts=True)
      bad = [n for n, c in zip(nodes, counts) if c > 1 and lengths[n]]
      if bad:
        raise ValueError(f"plan level {d} node {bad[0]} has sequences under different "
                         f"level-{j} nodes: not a tree")


def shard_plan(plan, seqs, data: int, *, max_new_tokens: int, prefill_chunk: int = 2048,
               attention: str = "hydragen", check: bool = True) -> ShardedPlan:
  """Lays a SharingPlan (fields order, levels, suffix_tokens, suffix_lengths, suffix_start)
  out over `data` shards. seqs: the prompts (input order) it was made from. attention: the
  generation mode ("replicated": the per-sequence cache holds the whole prompt, and the
  suffix pass attends to no shared level)."""
  order = np.asarray(plan.order, np.int64)
  b = len(seqs)
  levels = []
  for lvl in plan.levels:
    lengths = np.asarray(lvl.lengths, np.int64)
    if lengths.size and lengths.max() > 0:
      levels.append((np.asarray(lvl.tokens), lengths, np.asarray(lvl.owner, np.int64),
                     np.asarray(lvl.start, np.int64)))
  if check:
    _check_plan(plan, seqs, levels, order)
  plan_row, real = _split_rows(b, data)
  per = plan_row.shape[1]
  local_owner = []       # per level: [data, per] local node of each local row
  passes = []
  replication = []
  for d, (tokens, lengths, owner, start) in enumerate(levels):
    nodes = [np.unique(owner[plan_row[s]]) for s in range(data)]
    n_loc = max(len(u) for u in nodes)
    glob = np.zeros((data, n_loc), np.int64)
    used = np.zeros((data, n_loc), bool)
    mine = np.zeros((data, per), np.int64)
    for s, u in enumerate(nodes):
      glob[s, :len(u)] = u
      used[s, :len(u)] = True
      mine[s] = np.searchsorted(u, owner[plan_row[s]])
    anc = []          # per shard: tuple over earlier levels of [n_loc] ancestor local index
    for s in range(data):
      first_row = np.zeros((n_loc,), np.int64)
      first_row[:len(nodes[s])] = np.unique(mine[s], return_index=True)[1]
      anc.append(tuple(np.where(used[s], local_owner[j][s][first_row], 0).astype(np.int32)
                       for j in range(d)))
    local_owner.append(mine)
    padded, c = _chunked(tokens, prefill_chunk, n_loc)
    flat = glob.reshape(-1)
    ok = used.reshape(-1)
    passes.append(ShardedPass(
        tokens=np.where(ok[:, None], padded[flat], 0).astype(np.int32),
        lengths=np.where(ok, lengths[flat], 0).astype(np.int32),
        start=np.where(ok, start[flat], 0).astype(np.int32),
        table=OwnerTable.build(anc), rows=n_loc, capacity=padded.shape[1], chunk=c))
    distinct = len(np.unique(owner))
    replication.append(sum(len(u) for u in nodes) / max(distinct, 1))
  rows = plan_row.reshape(-1)
  suf_tokens = np.asarray(plan.suffix_tokens)
  suf_len = np.asarray(plan.suffix_lengths, np.int64)
  padded, c = _chunked(suf_tokens, prefill_chunk, per)
  prompt_lengths = np.array([len(seqs[order[i]]) for i in rows], np.int32)
  if attention == "replicated":    # whole prompt + new tokens in each sequence's cache
    capacity = max(padded.shape[1], int(prompt_lengths.max()) + max_new_tokens - 1, 1)
    table = OwnerTable.uniform((), data)
  else:
    capacity = max(padded.shape[1], int(suf_len.max(initial=0)) + max_new_tokens - 1, 1)
    table = OwnerTable.build([tuple(lo[s].astype(np.int32) for lo in local_owner)
                              for s in range(data)])
  main = ShardedPass(padded[rows], suf_len[rows].astype(np.int32),
                     np.asarray(plan.suffix_start, np.int64)[rows].astype(np.int32), table,
                     per, capacity, c)
  last_source = np.full((data, per), -1, np.int32)
  last_row = np.tile(np.arange(per, dtype=np.int32), (data, 1))
  for s in range(data):
    for p in range(per):
      i = plan_row[s, p]
      if suf_len[i] == 0:        # the prompt ends inside its deepest non-empty node
        for d in reversed(range(len(levels))):
          if levels[d][1][levels[d][2][i]] > 0:
            last_source[s, p], last_row[s, p] = d, local_owner[d][s, p]
            break
  return ShardedPlan(tuple(passes), main, plan_row, real, last_source.reshape(-1),
                     last_row.reshape(-1), prompt_lengths, order, tuple(replication),
                     tuple(lo.reshape(-1).astype(np.int32) for lo in local_owner), attention)


# ----------------------------------------------------------------------------- per-shard passes

_LEVEL_SPEC = LevelKV(rules.KV_SPEC, rules.KV_SPEC, rules.ROWS_SPEC)


def _prefill_pass(model, pas: ShardedPass, tokens, lengths, start, shared, own, *,
                  skip: bool, backend: str):
  """One prefill pass of this shard in chunks, appending to `own` (LevelKV [L,R,S,K_l,D], or
  None with skip). Returns (own, last hidden [R,E] of each row's last real token)."""

  def forward_chunk(tok, positions, own, valid):
    return forward_shard(model, tok, positions, shared=shared, table=pas.table, suffix=own,
                         valid=valid, skip_attention=skip, backend=backend)

  return engine.chunked_prefill(forward_chunk, tokens, lengths, start, own, chunk=pas.chunk,
                                hidden_size=model.config.hidden_size, dtype=model.dtype)


def _all_done(done):
  return lax.psum(jnp.sum(~done).astype(jnp.int32), DATA) == 0     # scalar all-reduce


def _make_prefill(graphdef, sp: ShardedPlan, *, kv_heads, backend, sampling, shard_vocab):
  skip = sp.attention == "none"

  def prefill(params, inputs, key_data, eos):
    model = nnx.merge(graphdef, params)
    config = model.config
    key = jax.random.wrap_key_data(key_data)

    def fresh(pas):
      return None if skip else empty_level(config.num_layers, pas.rows, pas.capacity, kv_heads,
                                           config.head_dim, model.dtype)

    shared, lasts = [], []
    for d, pas in enumerate(sp.levels):
      tok, lengths, start = inputs["levels"][d]
      own, last = _prefill_pass(model, pas, tok, lengths, start, tuple(shared), fresh(pas),
                                skip=skip, backend=backend)
      shared.append(own)
      lasts.append(last)
    tok, lengths, start = inputs["main"]
    main = fresh(sp.main)
    if sp.attention == "replicated":
      main = engine.replicate_nodes(shared, inputs["seq_owner"], inputs["levels"], main, start)
      shared = []
    main, last = _prefill_pass(model, sp.main, tok, lengths, start, tuple(shared), main,
                               skip=skip, backend=backend)
    source, row = inputs["last_source"], inputs["last_row"]
    for d, node_last in enumerate(lasts):
      picked = node_last[jnp.clip(row, 0, node_last.shape[0] - 1)]
      last = jnp.where((source == d)[:, None], picked, last)
    first = next_token_shard(model, last, key, sampling, shard_vocab)
    held = tuple(shared) if sp.attention == "hydragen" else ()   # what decode attends to
    return held, main, first, first == eos

  return prefill


def _make_decode(graphdef, sp: ShardedPlan, *, backend, sampling, max_new, shard_vocab):
  skip = sp.attention == "none"

  def decode(params, shared, suffix, first, done, key_data, plen, eos, pad):
    model = nnx.merge(graphdef, params)
    key = jax.random.wrap_key_data(key_data)
    b = first.shape[0]
    out = jnp.full((b, max_new), pad, jnp.int32).at[:, 0].set(first)
    count = jnp.ones((b,), jnp.int32)

    def cond(carry):
      return (carry[0] < max_new) & ~carry[-1]

    def body(carry):
      i, out, last, done, count, suffix, key, _ = carry
      key, sub = jax.random.split(key)
      positions = (plen + i - 1)[:, None]
      hidden, suffix = forward_shard(model, last[:, None], positions, shared=shared,
                                     table=sp.main.table, suffix=suffix, skip_attention=skip,
                                     backend=backend)
      tok = next_token_shard(model, hidden[:, 0], sub, sampling, shard_vocab)
      tok = jnp.where(done, pad, tok)
      out = lax.dynamic_update_slice(out, tok[:, None], (0, i))
      count = count + (~done).astype(jnp.int32)
      done = done | (tok == eos)
      return i + 1, out, tok, done, count, suffix, key, _all_done(done)

    carry = (jnp.int32(1), out, first, done, count, suffix, key, _all_done(done))
    steps, out, _, _, count, suffix, _, _ = lax.while_loop(cond, body, carry)
    return out, count, steps - 1, suffix

  return decode


# ----------------------------------------------------------------------------- generate


def _is_oom(error: BaseException) -> bool:
  text = str(error)
  return isinstance(error, MemoryError) or "RESOURCE_EXHAUSTED" in text or \
      "out of memory" in text.lower()


_COMPILED: "collections.OrderedDict" = collections.OrderedDict()
_COMPILED_SIZE = 8


def clear_compiled_cache() -> None:
  """Drops the compiled executables that `generate` keeps for reuse."""
  _COMPILED.clear()


def _compiled_key(mesh, graphdef, params, sp: ShardedPlan, **static):
  leaves, treedef = jax.tree_util.tree_flatten(params)

  def table(t):
    return (t.index.tobytes(), tuple(tuple(None if o is None else o.tobytes() for o in v)
                                     for v in t.variants))
  passes = tuple((p.tokens.shape, p.capacity, p.chunk, table(p.table))
                 for p in sp.levels + (sp.main,))
  return (tuple(d.id for d in mesh.devices.flat), mesh.devices.shape, sp.attention, graphdef,
          treedef, tuple((x.shape, str(x.dtype)) for x in leaves), passes,
          tuple(sorted((k, str(v)) for k, v in static.items())))


def generate(model, params, prompts=None, *, mesh, max_new_tokens: int,
             attention: str = "hydragen",
             temperature: float = 0.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, eos_id: Optional[int] = None, pad_id: int = 0,
             seed: int = 0, max_len: Optional[int] = None, prefill_chunk: int = 2048,
             backend: str = "auto", tokenizer: Any = None,
             sharing_options: Optional[dict] = None):
  """`hydrax.engine.generate` over a ("data", "model") mesh; same arguments plus `mesh`.

  mesh: a Mesh from `hydrax.parallel.make_mesh`, or a spec it takes ("2x4", (2, 4), ...).
  `generate(module, prompts, mesh=...)` is short for `generate(module, None, prompts, ...)`.
  prefill_chunk: query tokens per prefill step per device (a shard's rows x tokens).
  prompts: a SharingPlan, or token-id sequences (strings with `tokenizer`), planned by
    `hydrax.sharing.plan(prompts, **sharing_options)` in every mode (as the engine does).
  Greedy results equal the single-device engine's up to float rounding of the all-reduces;
  sampled ones (temperature > 0) draw per data shard with the seed folded with the shard index.
  Returns `hydrax.engine.Generation` (rows in input order); its kv_bytes counts the KV cache
  that decode holds on the whole mesh, a node stored on several data shards once per copy.
  Raises ValueError for bad inputs (a model that the model axis cannot split included) and
  `hydrax.engine.OutOfMemoryError` when a device runs out of memory.
  """
  from hydrax import engine
  if prompts is None:
    if not isinstance(model, llama_lib.Llama):
      raise ValueError("generate(model, prompts, mesh=...) without params needs a Llama module; "
                       "pass generate(model, params, prompts, mesh=...)")
    params, prompts = None, params
  mesh = make_mesh(mesh)
  data, m = axis_sizes(mesh)
  graphdef, params, config = resolve_model(model, params)
  rules.check_model(config, mesh)
  if attention not in ATTENTION_MODES:
    raise ValueError(f"attention must be one of {list(ATTENTION_MODES)}, got {attention!r}")
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
  if not isinstance(prefill_chunk, (int, np.integer)) or prefill_chunk < 1:
    raise ValueError(f"prefill_chunk must be an int >= 1, got {prefill_chunk!r}")
  max_new_tokens = int(max_new_tokens)
  engine._check_sampling(temperature, top_k, top_p)
  for name, value in (("eos_id", eos_id), ("pad_id", pad_id)):
    if value is not None and not 0 <= int(value) < config.vocab_size:
      raise ValueError(f"{name}={value} is outside the vocabulary [0, {config.vocab_size - 1}]")
  plan = prompts if engine.is_plan(prompts) else None
  seqs = engine.as_sequences(plan.sequences if plan is not None else prompts, tokenizer,
                    config.vocab_size)
  max_len = config.max_position_embeddings if max_len is None else int(max_len)
  for i, s in enumerate(seqs):
    if len(s) + max_new_tokens > max_len:
      raise ValueError(f"prompt {i} has {len(s)} tokens; with max_new_tokens={max_new_tokens} "
                       f"it needs {len(s) + max_new_tokens} positions, more than max_len="
                       f"{max_len}")
  if plan is None:
    from hydrax import sharing
    plan = sharing.plan(seqs, **(sharing_options or {}))
  sp = shard_plan(plan, seqs, data, max_new_tokens=max_new_tokens, prefill_chunk=prefill_chunk,
                  attention=attention)

  dtype = jax.tree_util.tree_leaves(params)[0].dtype
  held = {"none": (), "replicated": (sp.main,), "hydragen": sp.levels + (sp.main,)}[attention]
  kv = sum(level_bytes(config.num_layers, data * p.rows, p.capacity, config.num_kv_heads,
                       config.head_dim, dtype) for p in held)
  point = (f"mesh data={data} model={m}, attention={attention}, sequences={len(seqs)}, "
           f"max_new_tokens={max_new_tokens}, shared levels={len(sp.levels)} (replication "
           f"{[round(r, 2) for r in sp.replication]}), kv_bytes={kv:,}, dtype={dtype}")
  specs = rules.param_specs(params, config, mesh)
  shard_vocab = rules.vocab_sharded(config, mesh)
  sampling = dict(temperature=float(temperature), top_k=top_k, top_p=top_p)
  rows = NamedSharding(mesh, rules.ROWS_SPEC)
  host_inputs = {"levels": [(p.tokens, p.lengths, p.start) for p in sp.levels],
                 "main": (sp.main.tokens, sp.main.lengths, sp.main.start),
                 "seq_owner": list(sp.seq_owner),
                 "last_source": sp.last_source, "last_row": sp.last_row}
  input_specs = jax.tree_util.tree_map(lambda _: rules.ROWS_SPEC, host_inputs)
  level_spec = None if attention == "none" else _LEVEL_SPEC
  shared_specs = tuple(level_spec for _ in sp.levels) if attention == "hydragen" else ()
  # Scalars and keys as host data placed replicated, so that they are global arrays on
  # several hosts too (keys travel as their raw data).
  key_first, key_loop = (np.asarray(jax.random.key_data(k))
                         for k in jax.random.split(jax.random.key(seed)))
  eos, pad = np.int32(-1 if eos_id is None else int(eos_id)), np.int32(pad_id)
  key = _compiled_key(mesh, graphdef, params, sp, max_new=max_new_tokens, backend=backend,
                      **sampling)
  prefill, decode = _COMPILED.pop(key, (None, None))
  stage = "placement"
  compile_s = decode_s = 0.0
  steps = 0
  try:
    params = rules.shard_tree(params, specs, mesh)
    inputs = jax.tree_util.tree_map(lambda x: rules.put(x, rows), host_inputs)
    plen = rules.put(sp.prompt_lengths, rows)
    everywhere = NamedSharding(mesh, P())
    key_first, key_loop, eos, pad = (rules.put(x, everywhere)
                                     for x in (key_first, key_loop, eos, pad))
    if prefill is None:
      stage = "prefill compilation"
      t0 = time.perf_counter()
      fn = jax.shard_map(
          _make_prefill(graphdef, sp, kv_heads=config.num_kv_heads // m, backend=backend,
                        sampling=sampling, shard_vocab=shard_vocab),
          mesh=mesh, in_specs=(specs, input_specs, P(), P()),
          out_specs=(shared_specs, level_spec, rules.ROWS_SPEC, rules.ROWS_SPEC),
          check_vma=False)
      prefill = jax.jit(fn).lower(params, inputs, key_first, eos).compile()
      compile_s += time.perf_counter() - t0
    stage = "prefill"
    t0 = time.perf_counter()
    shared, suffix, first, done = jax.block_until_ready(prefill(params, inputs, key_first, eos))
    prefill_s = time.perf_counter() - t0
    if max_new_tokens > 1:
      if decode is None:
        stage = "decode compilation"
        t0 = time.perf_counter()
        fn = jax.shard_map(
            _make_decode(graphdef, sp, backend=backend, sampling=sampling,
                         max_new=max_new_tokens, shard_vocab=shard_vocab),
            mesh=mesh,
            in_specs=(specs, shared_specs, level_spec, rules.ROWS_SPEC, rules.ROWS_SPEC, P(),
                      rules.ROWS_SPEC, P(), P()),
            out_specs=(P(DATA, None), rules.ROWS_SPEC, P(), level_spec), check_vma=False)
        decode = jax.jit(fn, donate_argnums=(2,)).lower(
            params, shared, suffix, first, done, key_loop, plen, eos, pad).compile()
        compile_s += time.perf_counter() - t0
      stage = "decode"
      t0 = time.perf_counter()
      out, count, steps, suffix = jax.block_until_ready(
          decode(params, shared, suffix, first, done, key_loop, plen, eos, pad))
      decode_s = time.perf_counter() - t0
      steps = int(rules.to_host(steps))
    else:
      out, count = first[:, None], jnp.ones_like(first)
    _COMPILED[key] = (prefill, decode)
    while len(_COMPILED) > _COMPILED_SIZE:
      _COMPILED.popitem(last=False)
    out, count = rules.to_host(out), rules.to_host(count)
  except (ValueError, engine.OutOfMemoryError):
    raise
  except Exception as error:  # pylint: disable=broad-except
    if _is_oom(error):
      raise engine.OutOfMemoryError(f"out of device memory during {stage}: {point}. XLA said: "
                                    f"{str(error).splitlines()[0][:300]}") from error
    raise
  real = sp.real.reshape(-1)
  b = len(seqs)
  where = sp.plan_row.reshape(-1)[real]
  plan_tokens = np.empty((b, out.shape[1]), np.int32)
  plan_count = np.empty((b,), np.int32)
  plan_tokens[where] = out[real]
  plan_count[where] = count[real]
  tokens = np.empty_like(plan_tokens)
  lengths = np.empty_like(plan_count)
  tokens[sp.order] = plan_tokens
  lengths[sp.order] = plan_count
  generated = int(lengths.sum())
  texts = None
  if tokenizer is not None:
    texts = [tokenizer.decode(tokens[i, :lengths[i]].tolist()) for i in range(b)]
  values = dict(
      tokens=tokens, lengths=lengths, prefill_seconds=prefill_s, decode_seconds=decode_s,
      compile_seconds=compile_s,
      decode_tokens_per_second=generated / decode_s if decode_s > 0 else float("nan"),
      tokens_per_second=generated / (prefill_s + decode_s) if prefill_s + decode_s > 0
      else float("nan"),
      kv_bytes=kv, decode_steps=steps, attention=attention, texts=texts)
  names = {f.name for f in dataclasses.fields(engine.Generation)}
  return engine.Generation(**{k: v for k, v in values.items() if k in names})
