"""Hydragen attention: exact attention over keys split into shared levels, merged by LSE.

Axis letters: B sequences, T queries per sequence, S keys (a node's capacity), H query heads,
K KV heads (H = K*G), D head dim, N nodes of a level.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from hydrax._log import log_once
from hydrax.attention import backends as backends_lib
from hydrax.attention import checks
from hydrax.attention import prepared as prepared_lib
from hydrax.attention.merge import merge


class KVLevel(NamedTuple):
  """One sharing level of the key/value tree.

  k, v:    [N,S,K,D] keys and values of the level's N nodes (capacity S).
  lengths: [N] int32, valid keys per node (0 <= lengths <= S); keys past it are ignored.
  owner:   [B] int32, the node of each sequence at this level, or None when N == B and
           sequence b owns node b (a per-sequence level, such as the unique suffixes).
           A NumPy `owner` (closed over under `jit`) lets backends group statically.
  layer:   None, or an int32 scalar (may be traced): k and v are then stacked caches
           [L,N,S,K,D] and the level is layer `layer` of them. Backends that read the layer
           in place (`Backend.takes_layer`) avoid copying it out of the stack.
  """
  k: jax.Array
  v: jax.Array
  lengths: jax.Array
  owner: Optional[jax.Array] = None
  layer: Optional[jax.Array] = None

  def layer_view(self) -> "KVLevel":
    """The level with k, v of its layer alone ([N,S,K,D]; a slice, for checks and fallbacks)."""
    if self.layer is None:
      return self
    index = jnp.asarray(self.layer, jnp.int32)
    return KVLevel(jax.lax.dynamic_index_in_dim(self.k, index, 0, keepdims=False),
                   jax.lax.dynamic_index_in_dim(self.v, index, 0, keepdims=False),
                   self.lengths, self.owner)


def _check_qkv(q, k, v, *, q_name="q", k_name="k", v_name="v", kv_axes="N,S,K,D"):
  """Static checks shared by `attention` and `hydragen_attention`; returns (K, D)."""
  qs = checks.check_rank(q, 4, q_name, "B,T,H,D")
  ks = checks.check_rank(k, 4, k_name, kv_axes)
  vs = checks.check_rank(v, 4, v_name, kv_axes)
  checks.check_float(q, q_name)
  if ks != vs:
    raise ValueError(f"{k_name} and {v_name} must have the same shape, got {ks} and {vs}")
  if k.dtype != q.dtype or v.dtype != q.dtype:
    raise ValueError(f"{q_name}, {k_name}, {v_name} must share a dtype, got {q.dtype}, "
                     f"{k.dtype}, {v.dtype}")
  if ks[3] != qs[3]:
    raise ValueError(f"head dim mismatch: {q_name} has D={qs[3]} (shape {qs}) but "
                     f"{k_name} has D={ks[3]} (shape {ks})")
  if ks[2] == 0 or qs[2] % ks[2]:
    raise ValueError(f"query heads H={qs[2]} (shape of {q_name} {qs}) must be a positive "
                     f"multiple of KV heads K={ks[2]} (shape of {k_name} {ks})")
  return ks[2], ks[3]


def _check_level(i: int, level: KVLevel, q, batch: int, runtime: bool = False):
  name = f"levels[{i}]"
  if not isinstance(level, KVLevel):
    raise ValueError(f"{name} must be a KVLevel(k, v, lengths, owner), got {type(level).__name__}")
  if level.layer is not None:
    checks.check_rank(level.k, 5, f"{name}.k", "L,N,S,K,D (layer is set)")
    checks.check_rank(level.v, 5, f"{name}.v", "L,N,S,K,D (layer is set)")
    if level.k.shape[0] != level.v.shape[0]:
      raise ValueError(f"{name}.k and {name}.v must have the same shape, got "
                       f"{tuple(level.k.shape)} and {tuple(level.v.shape)}")
    if jnp.ndim(level.layer) != 0 or not jnp.issubdtype(jnp.asarray(level.layer).dtype,
                                                        jnp.integer):
      raise ValueError(f"{name}.layer must be an integer scalar, got {level.layer!r}")
    index = checks.concrete(level.layer)
    if index is not None and not 0 <= int(index) < level.k.shape[0]:
      raise ValueError(f"{name}.layer={int(index)} is outside [0, {level.k.shape[0] - 1}] "
                       f"(k has L={level.k.shape[0]} layers)")
    if index is None and runtime:
      checks.check_range_runtime(level.layer, 0, level.k.shape[0] - 1, f"{name}.layer",
                                     f"layer indices (L={level.k.shape[0]})")
    shape = tuple(level.k.shape[1:])
    view = jax.ShapeDtypeStruct(shape, level.k.dtype)
    _check_qkv(q, view, view, k_name=f"{name}.k[layer]", v_name=f"{name}.v[layer]")
  else:
    _check_qkv(q, level.k, level.v, k_name=f"{name}.k", v_name=f"{name}.v")
  n, s = level.k.shape[-4:-2]
  lengths = checks.check_int_vector(level.lengths, n, f"{name}.lengths", "N")
  what = f"valid keys per node (capacity S={s})"
  checks.check_range(lengths, 0, s, f"{name}.lengths", what)
  if lengths is None and runtime:
    checks.check_range_runtime(level.lengths, 0, s, f"{name}.lengths", what)
  if level.owner is None:
    if n != batch:
      raise ValueError(f"{name}.owner is None (one node per sequence) but the level has N={n} "
                       f"nodes for B={batch} sequences")
  else:
    owner = checks.check_int_vector(level.owner, batch, f"{name}.owner", "B")
    checks.check_range(owner, 0, n - 1, f"{name}.owner", f"node indices (N={n})")
    if owner is None and runtime:
      checks.check_range_runtime(level.owner, 0, n - 1, f"{name}.owner",
                                     f"node indices (N={n})")


def _run_level(backend, q, level, limits, scale):
  layer = None if level.layer is None else jnp.asarray(level.layer, jnp.int32)
  args = (q, level.k, level.v, level.lengths.astype(jnp.int32),
          None if level.owner is None else level.owner, limits)
  try:
    return backend.attend(*args, scale=scale, layer=layer)
  except backends_lib.Unsupported as e:
    log_once(("fallback", backend.name, str(e)),
             "hydrax: backend %r cannot take this input (%s); using the XLA backend",
             backend.name, e)
    return backends_lib.get("xla").attend(*args, scale=scale, layer=layer)


def _check_call(q, mode: str) -> bool:
  """Checks q's rank and the checks mode; True for "runtime"."""
  checks.check_rank(q, 4, "q", "B,T,H,D")
  return checks.check_mode(mode) == "runtime"


def _check_kv_lengths(kv_lengths, b: int, s: int) -> None:
  value = checks.check_int_vector(kv_lengths, b, "kv_lengths", "B")
  checks.check_range(value, 0, s, "kv_lengths", f"valid keys per row (capacity S={s})")


def _default_scale(scale, d):
  return float(d) ** -0.5 if scale is None else scale


def _limits(levels: Sequence[KVLevel], b: int, t: int, causal_last: bool) -> list:
  """Per level, limits [B,T] int32: the keys of its node that each query sees."""
  per_seq = [lvl.lengths.astype(jnp.int32) if lvl.owner is None
             else lvl.lengths.astype(jnp.int32)[lvl.owner] for lvl in levels]
  total = sum(per_seq)
  offset = jnp.zeros((b,), jnp.int32)
  out = []
  for seq_len in per_seq:
    if causal_last:
      # Keys of this level visible to query t: positions up to total - T + t, shifted.
      tt = jnp.arange(t, dtype=jnp.int32)[None, :]
      out.append(jnp.clip((total - t - offset)[:, None] + tt + 1, 0, seq_len[:, None]))
    else:
      out.append(jnp.broadcast_to(seq_len[:, None], (b, t)))
    offset = offset + seq_len
  return out


def _check_levels(q, levels, runtime: bool) -> None:
  if isinstance(levels, KVLevel) or not isinstance(levels, (list, tuple)) or not levels:
    raise ValueError("levels must be a non-empty list of KVLevel, got "
                     f"{type(levels).__name__}" + (" (wrap a single level in a list)"
                                                   if isinstance(levels, KVLevel) else ""))
  for i, level in enumerate(levels):
    _check_level(i, level, q, q.shape[0], runtime)


def _signature(impl, q, levels, causal_last: bool, scale: float) -> prepared_lib.Signature:
  return prepared_lib.Signature(
      impl, (tuple(q.shape), jnp.dtype(q.dtype).name),
      tuple((tuple(lv.k.shape), jnp.dtype(lv.k.dtype).name, lv.owner is not None,
             lv.layer is not None) for lv in levels),
      bool(causal_last), float(scale))


def prepare(q, levels: Sequence[KVLevel], *, causal_last: bool = True,
            scale: Optional[float] = None, backend="auto",
            checks: str = "static") -> prepared_lib.Prepared:
  """The part of `hydragen_attention(q, levels, ...)` that depends on the levels' lengths and
  owners alone (see `hydrax.attention.prepared`): computed once, passed to every call that
  shares them (the layers of one decode step) as `prepared=`.

  q: an array or a `jax.ShapeDtypeStruct` [B,T,H,D] (only its shape and dtype are read).
  levels: as for `hydragen_attention`; their k and v may be `jax.ShapeDtypeStruct`s (only
  shapes and dtypes are read), their lengths and owners are the call's, their layer any
  value (None or not, as in the calls: a stacked cache's layer may differ from call to call).
  The other arguments as for `hydragen_attention`; a call that takes the result must have the
  same shapes, dtypes, backend, causal_last and scale (else ValueError), and the same lengths
  and owners (checked under checks="runtime" only: traced values cannot be compared here).
  """
  runtime = _check_call(q, checks)
  _check_levels(q, levels, runtime)
  impl = backends_lib.get(backend)
  b, t, h, d = q.shape
  scale = _default_scale(scale, d)
  limits = _limits(levels, b, t, causal_last)
  tables = None
  if impl.prepare_levels is not None:
    tables = impl.prepare_all(tuple(q.shape), q.dtype, list(levels), limits, scale=scale)
  return prepared_lib.Prepared(limits, tables, _signature(impl, q, levels, causal_last, scale))


def _check_prepared(prepared, impl, q, levels, causal_last, scale, runtime: bool) -> None:
  if not isinstance(prepared, prepared_lib.Prepared):
    raise ValueError("prepared must be a hydrax.attention.Prepared (from "
                     f"hydrax.attention.prepare), got {type(prepared).__name__}")
  why = prepared.signature.mismatch(_signature(impl, q, levels, causal_last, scale))
  if why is not None:
    raise ValueError(f"prepared does not fit this call: {why}")
  if runtime:
    b, t = q.shape[:2]
    for i, (mine, theirs) in enumerate(zip(_limits(levels, b, t, causal_last),
                                           prepared.limits)):
      checkify.check(jnp.all(mine == theirs), f"prepared.limits[{i}] differ from the limits "
                     f"of levels[{i}]'s lengths and owners: prepared for other levels")


def hydragen_attention(q, levels: Sequence[KVLevel], *, causal_last: bool = True,
                       scale: Optional[float] = None, backend="auto", checks: str = "static",
                       prepared: Optional[prepared_lib.Prepared] = None):
  """Exact attention of q over each sequence's keys, split into sharing levels.

  q: [B,T,H,D], the last T tokens of B sequences. The keys of sequence b are the
  concatenation, in level order, of the first lengths[owner[b]] keys of its node at each level.
  Shared levels attend with the queries of all sequences of a node (and all query heads of a KV
  head) stacked into one product; the parts are merged through their log-sum-exps.

  causal_last: the queries are the last T positions of each sequence, so query t of sequence b
  sees keys up to position L_b - T + t of the concatenation (L_b its total length):
  bottom-right causal. When T <= the last level's length, only the last level is masked.
  With causal_last=False every query sees every valid key.

  backend: a name ("auto", "xla", "pallas", ...) or a `backends.Backend` value (with its
  kernel configuration, e.g. `backends.get("pallas", lowering="triton")`).

  checks: "static" (default): shapes, dtypes and every concrete value (lengths in [0, S],
  owners in [0, N), layer in [0, L)) raise ValueError; traced values cannot be inspected, and
  out-of-range ones give clamped or zero results. "runtime": the traced values are checked too,
  with `jax.experimental.checkify`. Eagerly that raises at once; under `jit`, functionalize
  the caller's function and throw its error:

      err, out = checkify.checkify(jax.jit(f))(q, levels)   # f calls hydragen_attention(...,
      err.throw()                                           #   checks="runtime")

  (a ValueError naming the argument, index and value). A jitted `f` not wrapped in
  `checkify.checkify` fails to compile with jax's ValueError "Cannot abstractly evaluate a
  checkify.check which was not functionalized".

  prepared: None, or `prepare(q, levels, ...)` of the same shapes, lengths and owners
  (computed once for the layers of a decode step): its key limits and backend tables are used
  instead of being computed again here.

  Returns out [B,T,H,D] in q's dtype (float32 accumulation) and lse [B,T,H] float32
  (natural log; -inf for a query that sees no key, whose out is 0).
  """
  runtime = _check_call(q, checks)
  _check_levels(q, levels, runtime)
  b, t, h, d = q.shape
  impl = backends_lib.get(backend)
  scale = _default_scale(scale, d)
  tables = None
  if prepared is None:
    all_limits = _limits(levels, b, t, causal_last)
  else:
    _check_prepared(prepared, impl, q, levels, causal_last, scale, runtime)
    all_limits, tables = list(prepared.limits), prepared.tables
  if impl.all_levels is not None:
    try:
      result = impl.attend_all(q, list(levels), all_limits, scale=scale, tables=tables)
      if result is not None:       # None: the backend chose its level-by-level path
        out, lse = result
        return out.astype(q.dtype), lse
    except backends_lib.Unsupported as e:
      if e.fallback is not None:
        fallback = backends_lib.get(e.fallback)
        if fallback.all_levels is not None:
          raise ValueError(f"fallback {e.fallback!r} of backend {impl.name!r} must run "
                           "level by level") from e
      else:
        fallback = impl
      log_once(("fallback-all", impl.name, str(e)),
               "hydrax: backend %r cannot take this call (%s); its levels run one by one on "
               "backend %r", impl.name, e, fallback.name)
      impl = fallback
  parts = [_run_level(impl, q, level, limits, scale)
           for level, limits in zip(levels, all_limits)]
  out, lse = merge(parts)
  return out.astype(q.dtype), lse


def attention(q, k, v, *, kv_lengths=None, causal: bool = False,
              scale: Optional[float] = None, backend="auto", checks: str = "static"):
  """Dense attention with its log-sum-exp.

  q: [B,T,H,D]; k, v: [B,S,K,D] with H a multiple of K (MHA, GQA, MQA).
  kv_lengths: [B] int, valid keys per row (default S); keys past it are ignored.
  causal: bottom-right aligned: query t sees keys s <= kv_lengths - T + t, so a chunk of T new
  tokens at the end of a longer cache is masked correctly.
  checks: "static" or "runtime", as for `hydragen_attention`.
  Returns out [B,T,H,D] in q's dtype (float32 accumulation), lse [B,T,H] float32 natural log
  (-inf and out = 0 for a query that sees no key).
  """
  _check_qkv(q, k, v, kv_axes="B,S,K,D")
  b, t, h, d = q.shape
  if k.shape[0] != b:
    raise ValueError(f"batch mismatch: q has B={b} (shape {tuple(q.shape)}) but k has "
                     f"B={k.shape[0]} (shape {tuple(k.shape)})")
  s = k.shape[1]
  if kv_lengths is None:
    kv_lengths = jnp.full((b,), s, jnp.int32)
  else:
    _check_kv_lengths(kv_lengths, b, s)
  return hydragen_attention(q, [KVLevel(k, v, jnp.asarray(kv_lengths), None)],
                            causal_last=causal, scale=scale, backend=backend, checks=checks)
