"""Llama-family decoder: NNX modules that hold parameters, and a pure forward pass.

The modules (`Llama`, `Block`, `Attention`, `MLP`, `RMSNorm`, `Linear`, `Embed`) only own
parameters; they have no `__call__`. `Llama.layers` is one `Block` whose parameters carry a
leading [L] axis (all layers stacked), so the forward pass is a `lax.scan` over layers: one
layer is traced and compiled, not L. The forward pass is a set of pure functions that read a
module's parameters and take and return explicit cache pytrees (`hydrax.cache.KVCache`). Under
`jit`, split the model (`nnx.split`) outside and `nnx.merge` inside, or use `apply`. The same
`forward` runs per shard under `jax.shard_map` with its all-reduces injected (`reduce=`).

Axis letters: B sequences, T new tokens per sequence, E hidden size, F MLP size, H query heads,
K KV heads, G = H/K, D head dim, L layers, V vocabulary, S cache capacity.

Layout and numerics follow HuggingFace `LlamaForCausalLM`: rotate-half RoPE (q, k as stored in
HF checkpoints, no permutation), Llama-3 frequency scaling, RMSNorm computed in float32 and
cast back before the weight, SwiGLU MLP, query head h reads KV head h // G. Activations are in
the parameters' dtype; attention accumulates in float32 (in `hydrax.attention`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from hydrax import attention as attn_lib
from hydrax.cache import KVCache, LevelKV
from hydrax.models.configs import LlamaConfig
from hydrax.offline import packing

_INIT_STDDEV = 0.02   # HF initializer_range


def _precision(dtype):
  return lax.Precision.HIGHEST if dtype == jnp.float32 else lax.Precision.DEFAULT


def _normal(rngs: nnx.Rngs, shape, dtype):
  return (_INIT_STDDEV * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


# ----------------------------------------------------------------------------- parameters


class Linear(nnx.Module):
  """kernel [*stack, in, *out] (out an int or a tuple of output axes; with one output axis,
  the transpose of a torch Linear weight); no bias."""

  def __init__(self, in_features: int, out_features, *, dtype, rngs: nnx.Rngs,
               stack: tuple = ()):
    out = tuple(out_features) if isinstance(out_features, tuple) else (out_features,)
    self.kernel = nnx.Param(_normal(rngs, tuple(stack) + (in_features,) + out, dtype))


class Embed(nnx.Module):
  """embedding [V, E]."""

  def __init__(self, vocab_size: int, features: int, *, dtype, rngs: nnx.Rngs):
    self.embedding = nnx.Param(_normal(rngs, (vocab_size, features), dtype))


class RMSNorm(nnx.Module):
  """weight [*stack, E] (initialised to ones)."""

  def __init__(self, features: int, *, dtype, stack: tuple = ()):
    self.weight = nnx.Param(jnp.ones(tuple(stack) + (features,), dtype))


class Attention(nnx.Module):
  """qkv [*stack, E, K, G+2, D], o [*stack, H*D, E].

  qkv holds the q, k and v projections as one weight: for KV head k, the columns of its G
  query heads (query head k*G + g), then its key's, then its value's (`fuse_qkv`, `split_qkv`
  convert from and to HuggingFace's three). One stored weight makes q, k and v one product:
  given three, XLA's dot merger on the GPU joins their products by concatenating the weights
  anew every layer of every step (25 us a layer, 0.81 ms of a 10.5 ms llama3-8b decode step at
  B = 256 on the H200, experiments/results/fused_h200 run 16). KV heads lead so that a
  tensor-parallel shard of K holds its own query heads too.
  """

  def __init__(self, config: LlamaConfig, *, dtype, rngs: nnx.Rngs, stack: tuple = ()):
    e, d, kh = config.hidden_size, config.head_dim, config.num_kv_heads
    kw = dict(dtype=dtype, rngs=rngs, stack=stack)
    self.qkv = Linear(e, (kh, config.num_heads // kh + 2, d), **kw)
    self.o = Linear(config.num_heads * d, e, **kw)


class MLP(nnx.Module):
  """SwiGLU: gate and up [*stack, E, F], down [*stack, F, E]."""

  def __init__(self, config: LlamaConfig, *, dtype, rngs: nnx.Rngs, stack: tuple = ()):
    e, f = config.hidden_size, config.intermediate_size
    kw = dict(dtype=dtype, rngs=rngs, stack=stack)
    self.gate = Linear(e, f, **kw)
    self.up = Linear(e, f, **kw)
    self.down = Linear(f, e, **kw)


class Block(nnx.Module):
  """Decoder layer(s): attn_norm, attn, mlp_norm, mlp.

  With stack=(L,) every parameter has a leading [L] axis: the layers of a `Llama`, stacked so
  that the forward pass scans over them; a slice along that axis is one layer's Block.
  """

  def __init__(self, config: LlamaConfig, *, dtype, rngs: nnx.Rngs, stack: tuple = ()):
    self.attn_norm = RMSNorm(config.hidden_size, dtype=dtype, stack=stack)
    self.attn = Attention(config, dtype=dtype, rngs=rngs, stack=stack)
    self.mlp_norm = RMSNorm(config.hidden_size, dtype=dtype, stack=stack)
    self.mlp = MLP(config, dtype=dtype, rngs=rngs, stack=stack)


class Llama(nnx.Module):
  """Parameters of a Llama decoder. `config` is static; `lm_head` is None when tied.

  `layers` is one `Block` holding every layer's parameters stacked on a leading [L] axis
  (e.g. layers.attn.qkv.kernel [L, E, K, G+2, D]).
  """

  def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    if not isinstance(config, LlamaConfig):
      raise ValueError(f"config must be a LlamaConfig, got {type(config).__name__}")
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    self.config = config
    self.embed = Embed(config.vocab_size, config.hidden_size, dtype=dtype, rngs=rngs)
    self.layers = Block(config, dtype=dtype, rngs=rngs, stack=(config.num_layers,))
    self.norm = RMSNorm(config.hidden_size, dtype=dtype)
    self.lm_head = (None if config.tie_word_embeddings else
                    Linear(config.hidden_size, config.vocab_size, dtype=dtype, rngs=rngs))

  @property
  def dtype(self):
    """The parameters' (and activations') dtype."""
    return self.embed.embedding[...].dtype


def init(config: LlamaConfig, *, seed: int = 0, dtype=jnp.float32) -> Llama:
  """A `Llama` with random parameters (normal(0.02) weights, unit norms) in `dtype`.

  The parameters are drawn in one compiled computation with few random-number ops (XLA
  compiles each random op separately and slowly): one flat draw for small models, one draw per
  (layer-stacked) tensor for large ones.
  """
  dtype = jnp.dtype(dtype)
  graphdef, state = nnx.split(abstract(config, dtype=dtype))
  flat = _flat_leaves(nnx.to_pure_dict(state))

  def make():
    key = jax.random.key(seed)
    values = {path: jnp.ones(leaf.shape, dtype) for path, leaf in flat.items()
              if path[-1] == "weight"}   # RMSNorm weights
    drawn = sorted(path for path in flat if path[-1] != "weight")
    sizes = [int(np.prod(flat[path].shape)) for path in drawn]
    if sum(sizes) <= _FLAT_INIT_LIMIT:
      pool = _INIT_STDDEV * jax.random.normal(key, (sum(sizes),), jnp.float32)
      pieces = jnp.split(pool, np.cumsum(sizes)[:-1]) if drawn else []
    else:
      pieces = [_INIT_STDDEV * jax.random.normal(jax.random.fold_in(key, i), (size,), dtype)
                for i, size in enumerate(sizes)]
    for path, piece in zip(drawn, pieces):
      values[path] = piece.astype(dtype).reshape(flat[path].shape)
    return values

  values = jax.jit(make)()
  pure = {}
  for path, value in values.items():
    node = pure
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


_FLAT_INIT_LIMIT = 1 << 26   # elements drawn in one flat random op (256 MiB of float32)


def _flat_leaves(tree, prefix=()) -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat_leaves(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out


def abstract(config: LlamaConfig, *, dtype=jnp.float32) -> Llama:
  """A `Llama` whose parameters are `jax.ShapeDtypeStruct`s (nothing allocated)."""
  return nnx.eval_shape(lambda: Llama(config, dtype=dtype, rngs=nnx.Rngs(params=0)))


def param_count(model_or_params) -> int:
  """Number of parameter elements of a `Llama` module or a params state."""
  state = nnx.state(model_or_params) if isinstance(model_or_params, nnx.Module) \
      else model_or_params
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state))


# ----------------------------------------------------------------------------- pure functions


def _linear(layer: Linear, x):
  """x [..., in] -> [..., *out]."""
  kernel = layer.kernel[...]
  return jnp.tensordot(x, kernel, axes=1, precision=_precision(kernel.dtype))


def fuse_qkv(q, k, v, num_kv_heads: int):
  """HuggingFace-layout kernels (transposed) q [*lead, E, H*D], k and v [*lead, E, K*D] ->
  `Attention.qkv`'s kernel [*lead, E, K, G+2, D]. NumPy in, NumPy out; jax arrays otherwise."""
  xp = np if all(isinstance(a, np.ndarray) for a in (q, k, v)) else jnp
  *lead, e, kd = k.shape
  if kd % num_kv_heads or q.shape[-1] % kd or tuple(q.shape[:-1]) != (*lead, e) or \
      tuple(v.shape) != tuple(k.shape):
    raise ValueError(f"q, k, v kernels of shapes {tuple(q.shape)}, {tuple(k.shape)}, "
                     f"{tuple(v.shape)} are not [*lead,E,H*D], [*lead,E,K*D] x2 with "
                     f"K={num_kv_heads} and H a multiple of K")
  d = kd // num_kv_heads
  g = q.shape[-1] // kd
  heads = (*lead, e, num_kv_heads)
  return xp.concatenate([xp.reshape(q, heads + (g, d)), xp.reshape(k, heads + (1, d)),
                         xp.reshape(v, heads + (1, d))], axis=-2)


def split_qkv(qkv):
  """`Attention.qkv`'s kernel [*lead, E, K, G+2, D] -> HuggingFace-layout kernels (transposed)
  (q [*lead, E, H*D], k [*lead, E, K*D], v [*lead, E, K*D]); the inverse of `fuse_qkv`."""
  *lead, e, kh, g2, d = qkv.shape
  g = g2 - 2
  xp = np if isinstance(qkv, np.ndarray) else jnp
  return (xp.reshape(qkv[..., :g, :], (*lead, e, kh * g * d)),
          xp.reshape(qkv[..., g, :], (*lead, e, kh * d)),
          xp.reshape(qkv[..., g + 1, :], (*lead, e, kh * d)))


def rms_norm(norm: RMSNorm, x, eps: float):
  """x [..., E] -> same shape and dtype; statistics in float32."""
  xf = x.astype(jnp.float32)
  xf = xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return norm.weight[...] * xf.astype(x.dtype)


def rope_frequencies(config: LlamaConfig) -> np.ndarray:
  """Inverse frequencies [D/2] float32 of the rotary embedding (Llama-3 scaled if configured)."""
  d = config.head_dim
  inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32)
                                          / d))
  inv_freq = inv_freq.astype(np.float32)
  scaling = config.rope_scaling
  if scaling is None:
    return inv_freq
  old_len = float(scaling.original_max_position_embeddings)
  low_wavelen = old_len / scaling.low_freq_factor
  high_wavelen = old_len / scaling.high_freq_factor
  wavelen = (2 * math.pi / inv_freq).astype(np.float32)
  scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
  smooth = (old_len / wavelen - scaling.low_freq_factor) / (
      scaling.high_freq_factor - scaling.low_freq_factor)
  smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions, inv_freq):
  """(cos, sin) float32 [B,T,1,D] of rotate-half RoPE at positions [B,T] int (inv_freq [D/2]).

  The same for every layer: `forward` computes them once, before the layer scan (XLA left
  them in the scan's body: two launches a layer; the engine's step time did not change
  beyond its spread without them, experiments/results/fused_h200 run 14)."""
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]       # [B,T,1,D]
  return jnp.cos(angles), jnp.sin(angles)


def rotate(x, rope):
  """x [B,T,N,D] rotated by `rope_tables`' (cos, sin) -> x's shape and dtype."""
  cos, sin = (r.astype(x.dtype) for r in rope)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


def _local_heads(model: Llama) -> tuple[int, int]:
  """(H, K) of the model's arrays: the config's, or a shard's H/M, K/M under shard_map."""
  *_, kh, g2, _ = model.layers.attn.qkv.kernel.shape
  return int(kh) * (int(g2) - 2), int(kh)


def _check_inputs(model: Llama, tokens, positions, cache, reduce, unroll, segments, valid):
  config = model.config
  if tokens.ndim != 2:
    raise ValueError(f"tokens must have shape [B,T], got {tuple(tokens.shape)}")
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"tokens must be integer token ids, got dtype {tokens.dtype}")
  if tuple(positions.shape) != tuple(tokens.shape):
    raise ValueError(f"positions must have the shape of tokens {tuple(tokens.shape)}, got "
                     f"{tuple(positions.shape)}")
  if cache is not None and not isinstance(cache, KVCache):
    raise ValueError(f"cache must be a hydrax.cache.KVCache or None, got {type(cache).__name__}")
  if reduce is not None and not isinstance(reduce, str):
    raise ValueError(f"reduce must be None or a mesh axis name, got {reduce!r}")
  if not (unroll is True or (isinstance(unroll, int) and not isinstance(unroll, bool)
                            and unroll >= 1)):
    raise ValueError(f"unroll must be a positive int or True (every layer), got {unroll!r}")
  stacked = model.layers.attn.qkv.kernel.shape
  if len(stacked) != 5 or stacked[0] != config.num_layers:
    raise ValueError(f"model.layers must hold L={config.num_layers} stacked layers "
                     f"(attn.qkv.kernel [L,E,K,G+2,D]), got attn.qkv.kernel of shape "
                     f"{tuple(stacked)}")
  b, t = tokens.shape
  if segments is not None:
    b = _check_segments(tokens, segments, cache, valid)
  _, kv_heads = _local_heads(model)
  if cache is not None and cache.suffix is not None:
    suffix = cache.suffix
    want = (config.num_layers, b, None, kv_heads, config.head_dim)
    got = tuple(suffix.k.shape)
    if len(got) != 5 or any(w is not None and w != g for w, g in zip(want, got)):
      raise ValueError(f"cache.suffix.k must have shape [L,B,S,K,D] = "
                       f"{tuple('S' if w is None else w for w in want)}, got {got}")
    if t > got[2]:
      raise ValueError(f"{t} new tokens do not fit in the per-sequence cache of capacity "
                       f"S={got[2]}")
    lengths = attn_lib.checks.concrete(suffix.lengths)
    if segments is None and lengths is not None and lengths.size and \
        int(lengths.max()) + t > got[2]:
      i = int(np.argmax(lengths))
      raise ValueError(f"cache overflow: row {i} holds {int(lengths[i])} keys and {t} new "
                       f"tokens exceed the per-sequence cache capacity S={got[2]}")
  if cache is not None:
    for i, lvl in enumerate(cache.shared):
      if lvl.k.ndim != 5 or lvl.k.shape[0] != config.num_layers:
        raise ValueError(f"cache.shared[{i}].k must have shape [L,N,S,K,D] with "
                         f"L={config.num_layers}, got {tuple(lvl.k.shape)}")
    for i, owner in enumerate(cache.owners):
      if tuple(owner.shape) != (b,):
        raise ValueError(f"cache owners[{i}] has shape {tuple(owner.shape)} but tokens have "
                         f"B={b} rows")


def _check_segments(tokens, segments, cache, valid) -> int:
  """Checks packed-mode inputs; returns B, the sequences (rows of the per-sequence cache)."""
  if tuple(np.shape(segments)) != tuple(tokens.shape) or \
      not jnp.issubdtype(jnp.asarray(segments).dtype, jnp.integer):
    raise ValueError(f"segments must be an int array of the tokens' shape [R,W] = "
                     f"{tuple(tokens.shape)}, got shape {tuple(np.shape(segments))} dtype "
                     f"{jnp.asarray(segments).dtype}")
  if valid is not None:
    raise ValueError("valid= is for rows of one sequence each; with segments= padding is "
                     "segment -1")
  if cache is None:
    return tokens.shape[0]
  if cache.suffix is None:
    raise ValueError("segments= needs cache=None or a cache with a per-sequence suffix "
                     "[L,B,S,K,D] to write the packed tokens' keys into")
  b = int(cache.suffix.k.shape[1])
  seg = attn_lib.checks.concrete(segments)
  if seg is not None and seg.size and (seg.min() < -1 or seg.max() >= b):
    raise ValueError(f"segments has ids in [{seg.min()}, {seg.max()}], outside [-1, {b - 1}] "
                     f"(the cache holds B={b} sequences; -1 is padding)")
  return b


class Packed(NamedTuple):
  """Where packed tokens [R,W] go (built once per forward pass, `_packed`).

  segments: [R,W] int32 each token's sequence, -1 for padding.
  row:      [R,W] int32 its cache row for the scatter: the sequence; for padding B + its
            position in [R,W], a row past the cache (dropped) and its own, so that the
            scatter's indices are unique.
  rank:     [R,W] int32 its index among its sequence's tokens of this call.
  count:    [B] int32 tokens of each sequence in this call.
  fresh:    static: the sequences that have tokens here start their caches anew.
  """
  segments: jax.Array
  row: jax.Array
  rank: jax.Array
  count: jax.Array
  fresh: bool


def _packed(segments, b: int, fresh: bool) -> Packed:
  seg = jnp.asarray(segments, jnp.int32)
  col = jnp.arange(seg.shape[1], dtype=jnp.int32)[None, :]
  # A sequence's tokens are one contiguous run of its row: rank = column - the run's first.
  starts = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], 1)
  rank = col - lax.cummax(jnp.where(starts, col, 0), axis=1)
  position = jnp.arange(seg.size, dtype=jnp.int32).reshape(seg.shape)
  row = jnp.where(seg >= 0, seg, b + position)
  count = jnp.zeros((b,), jnp.int32).at[row].add(1, mode="drop")
  return Packed(seg, row, rank, count, bool(fresh))


def packed_level(suffix: LevelKV, index, k, v, packed: Packed):
  """own_level for packed tokens k, v [R,W,K,D]: one scatter per stack into layer `index` at
  (sequence, its cache length + rank; rank alone when fresh), padding and slots past S
  dropped. Returns (suffix with lengths as they were, the levels of keys the sequences held
  before this call: [] when fresh, else the stack with the old lengths, one node per
  sequence). Every (row, slot) is written once (a sequence's tokens have distinct ranks,
  padding rows are distinct), which the scatters are told: XLA's GPU scatter otherwise
  updates each element with an atomic read-modify-write."""
  b = suffix.k.shape[1]
  base = 0 if packed.fresh else \
      suffix.lengths.astype(jnp.int32)[jnp.minimum(packed.row, b - 1)]   # padding: any row
  slots = base + packed.rank
  new_k = suffix.k.at[index, packed.row, slots].set(k.astype(suffix.k.dtype), mode="drop",
                                                     unique_indices=True)
  new_v = suffix.v.at[index, packed.row, slots].set(v.astype(suffix.v.dtype), mode="drop",
                                                     unique_indices=True)
  held = [] if packed.fresh else [attn_lib.KVLevel(new_k, new_v, suffix.lengths, None, index)]
  return LevelKV(new_k, new_v, suffix.lengths), held


def own_level(suffix: Optional[LevelKV], index, k, v):
  """The per-sequence level of layer `index` for this chunk's keys and values k, v [B,T,K,D].

  suffix None (no cache): the chunk alone. Otherwise the chunk is written into layer `index`
  (an int, or an int32 scalar that may be traced) of the stacked suffix [L,B,S,K,D] after each
  row's valid keys (slots past S are dropped): one scatter of B*T*K*D elements into the stack,
  in place when the stack is a loop carry or donated. Its indices are unique and sorted (row
  by row, slot by slot), which it is told: XLA's GPU scatter otherwise updates each element
  with an atomic read-modify-write. The level reads that layer of the stack in place
  (`KVLevel.layer`) with lengths + T. Returns (suffix, KVLevel); suffix.lengths are left as
  they were (the caller advances them once for all layers).
  """
  b, t = k.shape[:2]
  if suffix is None:
    return None, attn_lib.KVLevel(k, v, jnp.full((b,), t, jnp.int32), None)
  start = suffix.lengths.astype(jnp.int32)
  rows = jnp.arange(b)[:, None]
  slots = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
  new_k = suffix.k.at[index, rows, slots].set(k.astype(suffix.k.dtype), mode="drop",
                                               unique_indices=True, indices_are_sorted=True)
  new_v = suffix.v.at[index, rows, slots].set(v.astype(suffix.v.dtype), mode="drop",
                                               unique_indices=True, indices_are_sorted=True)
  return (LevelKV(new_k, new_v, suffix.lengths),
          attn_lib.KVLevel(new_k, new_v, start + t, None, index))


def _all_reduce(x, reduce: Optional[str]):
  """x summed over the mesh axis `reduce` (its shards hold partial sums), or x itself."""
  return x if reduce is None else lax.psum(x, reduce)


@dataclasses.dataclass(frozen=True)
class HydragenAttend:
  """The default `attend=` hook of `forward`: `hydragen_attention(..., causal_last=True)`.
  Its `prepare` computes what the layers of one forward pass share (the levels' key limits
  and the backend's tile tables: `hydrax.attention.prepare`) once, before the layer scan;
  each layer's call takes it as `prepared=`. checks: "static" or "runtime"."""
  checks: str = "static"

  def __call__(self, q, levels, *, backend, prepared=None):
    return attn_lib.hydragen_attention(q, levels, causal_last=True, backend=backend,
                                       checks=self.checks, prepared=prepared)

  def prepare(self, q, levels, *, backend):
    return attn_lib.prepare(q, levels, causal_last=True, backend=backend, checks=self.checks)


def _prepare_attention(model, attend, backend, shared, suffix, b: int, t: int):
  """`attend.prepare` of the levels every layer attends to (`_attention_layer`'s, at layer 0;
  their layer, a traced index in the scan, is not part of what is prepared), or None when
  `attend` has no `prepare`."""
  prepare = getattr(attend, "prepare", None)
  if prepare is None:
    return None
  config = model.config
  d = config.head_dim
  h, kh = _local_heads(model)
  dtype = jnp.result_type(model.embed.embedding.dtype, model.layers.attn.qkv.kernel.dtype)
  q = jax.ShapeDtypeStruct((b, t, h, d), dtype)
  levels = [attn_lib.KVLevel(lvl.k, lvl.v, lvl.lengths, owner, 0) for lvl, owner in shared]
  if suffix is None:
    kv = jax.ShapeDtypeStruct((b, t, kh, d), dtype)
    levels.append(attn_lib.KVLevel(kv, kv, jnp.full((b,), t, jnp.int32), None))
  else:      # (as `own_level`: the suffix's lengths are those before this call, + T)
    levels.append(attn_lib.KVLevel(suffix.k, suffix.v, suffix.lengths.astype(jnp.int32) + t,
                                   None, 0))
  return prepare(q, levels, backend=backend)


def _attention_layer(config: LlamaConfig, layer: Attention, x, rope, shared,
                     suffix: Optional[LevelKV], index, *, skip_attention: bool, backend,
                     reduce: Optional[str], attend, packed: Optional[Packed] = None,
                     prepared=None):
  """x [B,T,E] -> (out [B,T,E], suffix LevelKV or None with this layer's new keys written).

  rope: `rope_tables` of the tokens' positions (None with skip_attention).

  shared: ((LevelKV [L,N,S,K,D], owner [B]), ...) read at layer `index` in place.
  packed: None, or x is [R,W,E] packed tokens of the sequences (`Packed`; owners per sequence).
  prepared: None, or `attend.prepare` of these levels (`_prepare_attention`), passed on.
  """
  b, t, _ = x.shape
  d = config.head_dim
  qkv = _linear(layer.qkv, x)                    # [B,T,K,G+2,D], one product
  kh, g = qkv.shape[-3], qkv.shape[-2] - 2       # a shard's KV heads under shard_map
  h = kh * g
  q = qkv[..., :g, :].reshape(b, t, h, d)        # query head k*G + g reads KV head k
  k, v = qkv[..., g, :], qkv[..., g + 1, :]
  if skip_attention:
    # The paper's "no attention" upper bound: each query head takes its own token's value.
    out = jnp.repeat(v, h // kh, axis=2)
  else:
    q, k = rotate(q, rope), rotate(k, rope)
    levels = [attn_lib.KVLevel(lvl.k, lvl.v, lvl.lengths, owner, index)
              for lvl, owner in shared]
    if packed is None:
      suffix, own = own_level(suffix, index, k, v)
      levels.append(own)
      if prepared is None:
        out, _ = attend(q, levels, backend=backend)
      else:
        out, _ = attend(q, levels, backend=backend, prepared=prepared)
    else:
      if suffix is not None:
        suffix, held = packed_level(suffix, index, k, v, packed)
        levels += held
      out, _ = packing.packed_attention(q, k, v, packed.segments, levels,
                                        attend=functools.partial(attend, backend=backend))
  return _all_reduce(_linear(layer.o, out.reshape(b, t, h * d)), reduce), suffix


def _mlp(mlp: MLP, x, reduce: Optional[str]):
  out = _linear(mlp.down, jax.nn.silu(_linear(mlp.gate, x)) * _linear(mlp.up, x))
  return _all_reduce(out, reduce)


def forward(model: Llama, tokens, positions, cache: Optional[KVCache] = None, *,
            valid=None, skip_attention: bool = False, backend="auto",
            reduce: Optional[str] = None, attend: Optional[Callable] = None, unroll=1,
            checks: str = "static", segments=None, fresh: bool = False):
  """Runs the decoder over T new tokens per row; pure (the model is only read).

  tokens, positions: [B,T] int32 (positions are the RoPE positions of the new tokens).
  cache: None, the tokens attend causally to themselves only (a full forward pass); or a
    KVCache: each row attends to its nodes of `cache.shared` (per `cache.owners`), then to its
    own keys `cache.suffix` (if not None), into which the new tokens' keys and values are
    written at slots lengths[b] .. lengths[b]+T-1 (causal, bottom-right aligned).
  valid: [B] int32 number of real (non-padding) new tokens per row (default T); the suffix
    lengths grow by it. Padding tokens must come last in a row.
  skip_attention: skip the attention product (the "no attention" upper bound): caches are
    passed through untouched. The q, k and v projection (one product, `Attention`) is still
    computed whole, as the model with attention computes it.
  backend: attention backend name or `hydrax.attention.backends.Backend` value.

  The layers run under `lax.scan` over the stacked parameters (`unroll` layers per loop
  iteration; True unrolls all). The scan carries the hidden state and the stacked suffix
  cache: layer l writes its new keys into the stack at [l, b, slot] and attends to layer l of
  the stacked shared and suffix caches in place (`KVLevel(..., layer=l)`), so no per-layer
  copy of a cache is made (under `jit`, donate the cache). On GPUs, compile with XLA's
  dynamic-slice fusion on and Triton GEMMs off (`hydrax.engine.GPU_XLA_OPTIONS`, what the
  engine does): XLA's defaults copy each layer's weight slice out of the stack every step.
  Measured on the H200 (jax 0.11.2, llama3-8b bf16, a no-attention decode step,
  experiments/bench_layers.py): B=256 12.52 ms with the defaults, 6.68 ms with those options,
  6.86 ms with per-layer weight buffers; B=1024 27.55 / 22.23 / 22.35 ms; the scan compiles in
  0.4-2.4 s, fully unrolled 4.7-41 s (unroll=True brings nothing once the weights are read in
  place).
  checks: "static" or "runtime", passed to `hydragen_attention` (the default attend only).

  Packed tokens (Prepacking, `hydrax.offline.packing`): with segments [R,W] int32 the tokens
  [R,W] are not rows of one sequence each but runs of the B sequences of the cache, packed
  side by side: segments holds each token's sequence (-1: padding), and each sequence's tokens
  of one call are one contiguous run, in order, within one row (positions: their own RoPE
  positions, restarting per run). A token attends to its sequence's nodes of `cache.shared`
  (owners [B] per sequence), its keys already in `cache.suffix` [L,B,S,K,D], and the earlier
  tokens of its run; its keys and values are appended to its sequence's cache (one scatter per
  layer at (sequence, lengths + index in the run), in place under donation; padding dropped),
  whose lengths grow by its tokens here. fresh=True (static): the sequences that have tokens
  here start their caches anew (keys written from slot 0, lengths = their tokens here, old keys
  not read: the first prefill of a sequence, which then skips reading an empty cache).
  cache=None: each token attends to its run alone. attend= gets one query per packed token
  ([R*W,1,H,D], owners per token) for the levels; the in-row part is
  `packing.packed_attention`'s. valid= does not apply (padding is segment -1).

  For the same model written per shard under `jax.shard_map` (tensor parallel; see
  `hydrax.parallel.step`), two hashable hooks say what differs:
  reduce: None, or the mesh axis over which the o projection's and the MLP down projection's
    outputs are summed (`lax.psum`): their input rows are split over it, so each shard holds
    a partial sum. The model's arrays are then the shard's slices (H/M query heads, K/M KV
    heads, F/M MLP columns); head counts are read from the arrays.
  attend: None (`HydragenAttend(checks)`: `hydragen_attention(q, levels, causal_last=True,
    backend=backend)`), or a callable with that signature `attend(q, levels, *, backend) ->
    (out, lse)`; levels are the shared levels (owners from `cache.owners`) then the per-row
    level, each at layer l. An `attend` with a method `prepare(q, levels, *, backend)` (as
    `HydragenAttend`) is asked once per call, before the layer scan, for what the layers share
    (q a `jax.ShapeDtypeStruct`, the levels at layer 0), and each layer's call then gets
    `prepared=` its result (not for packed tokens).

  Returns (hidden [B,T,E] after the final norm, in the model dtype; the cache with its suffix
  updated, or None if `cache` was None).
  """
  config = model.config
  tokens = jnp.asarray(tokens)
  positions = jnp.asarray(positions)
  _check_inputs(model, tokens, positions, cache, reduce, unroll, segments, valid)
  b, t = tokens.shape
  packed = None
  if segments is not None:
    b = b if cache is None or cache.suffix is None else int(cache.suffix.k.shape[1])
    packed = _packed(segments, b, fresh)
  rope = None if skip_attention else rope_tables(positions, rope_frequencies(config))
  eps = config.rms_norm_eps
  if attend is None:
    attend = HydragenAttend(checks)
  elif checks != "static":
    raise ValueError(f"checks={checks!r} applies to the default attention; a custom attend= "
                     "checks its own inputs")
  x = jnp.take(model.embed.embedding[...], tokens.astype(jnp.int32), axis=0)
  suffix = None if cache is None else cache.suffix
  shared = () if cache is None or skip_attention else tuple(zip(cache.shared, cache.owners))
  carried = None if skip_attention else suffix
  layer_def, stacked = nnx.split(model.layers)
  prepared = None
  if packed is None and cache is not None and not skip_attention:
    prepared = _prepare_attention(model, attend, backend, shared, suffix, b, t)

  def layer(carry, xs):
    x, carried = carry
    params, index = xs
    block = nnx.merge(layer_def, params)
    a, carried = _attention_layer(config, block.attn, rms_norm(block.attn_norm, x, eps),
                                  rope, shared, carried, index,
                                  skip_attention=skip_attention, backend=backend,
                                  reduce=reduce, attend=attend, packed=packed,
                                  prepared=prepared)
    x = x + a
    x = x + _mlp(block.mlp, rms_norm(block.mlp_norm, x, eps), reduce)
    return (x, carried), None

  layers = jnp.arange(config.num_layers, dtype=jnp.int32)
  (x, carried), _ = lax.scan(layer, (x, carried), (stacked, layers),
                             unroll=config.num_layers if unroll is True else unroll)
  hidden = rms_norm(model.norm, x, eps)
  if cache is None:
    return hidden, None
  if carried is not None and packed is not None:
    lengths = carried.lengths + packed.count if not fresh else \
        jnp.where(packed.count > 0, packed.count, carried.lengths)
    suffix = LevelKV(carried.k, carried.v, lengths.astype(carried.lengths.dtype))
  elif carried is not None:
    grow = jnp.full((b,), t, jnp.int32) if valid is None else jnp.asarray(valid, jnp.int32)
    suffix = LevelKV(carried.k, carried.v, carried.lengths + grow)
  return hidden, cache.replace_suffix(suffix)


def logits(model: Llama, hidden):
  """hidden [..., E] (after the final norm) -> float32 logits [..., V] (tied or untied head)."""
  if model.lm_head is None:
    table = model.embed.embedding[...]
    out = jnp.einsum("...e,ve->...v", hidden, table, precision=_precision(table.dtype))
  else:
    out = _linear(model.lm_head, hidden)
  return out.astype(jnp.float32)


def apply(graphdef, params, tokens, positions=None, *, backend: str = "auto"):
  """Full forward pass (no cache) of a split model: logits [B,T,V] float32.

  positions default to 0..T-1 for every row. Jit-friendly: `jax.jit(apply, static_argnums=0)`
  or close over graphdef.
  """
  model = nnx.merge(graphdef, params)
  tokens = jnp.asarray(tokens)
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[-1], dtype=jnp.int32), tokens.shape)
  hidden, _ = forward(model, tokens, positions, None, backend=backend)
  return logits(model, hidden)
