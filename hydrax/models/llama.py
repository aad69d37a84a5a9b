"""Llama-family decoder: NNX modules that hold parameters, and a pure forward pass.

The modules (`Llama`, `Block`, `Attention`, `MLP`, `RMSNorm`, `Linear`, `Embed`) only own
parameters; they have no `__call__`. The forward pass is a set of pure functions that read a
module's parameters and take and return explicit cache pytrees (`hydrax.cache.KVCache`). Under
`jit`, split the model (`nnx.split`) outside and `nnx.merge` inside, or use `apply`.

Axis letters: B sequences, T new tokens per sequence, E hidden size, F MLP size, H query heads,
K KV heads, G = H/K, D head dim, L layers, V vocabulary, S cache capacity.

Layout and numerics follow HuggingFace `LlamaForCausalLM`: rotate-half RoPE (q, k as stored in
HF checkpoints, no permutation), Llama-3 frequency scaling, RMSNorm computed in float32 and
cast back before the weight, SwiGLU MLP, query head h reads KV head h // G. Activations are in
the parameters' dtype; attention accumulates in float32 (in `hydrax.attention`).
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from hydrax import attention as attn_lib
from hydrax.cache import KVCache, LevelKV
from hydrax.models.configs import LlamaConfig

_INIT_STDDEV = 0.02   # HF initializer_range


def _precision(dtype):
  return lax.Precision.HIGHEST if dtype == jnp.float32 else lax.Precision.DEFAULT


def _normal(rngs: nnx.Rngs, shape, dtype):
  return (_INIT_STDDEV * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


# ----------------------------------------------------------------------------- parameters


class Linear(nnx.Module):
  """kernel [in, out] (the transpose of a torch Linear weight); no bias."""

  def __init__(self, in_features: int, out_features: int, *, dtype, rngs: nnx.Rngs):
    self.kernel = nnx.Param(_normal(rngs, (in_features, out_features), dtype))


class Embed(nnx.Module):
  """embedding [V, E]."""

  def __init__(self, vocab_size: int, features: int, *, dtype, rngs: nnx.Rngs):
    self.embedding = nnx.Param(_normal(rngs, (vocab_size, features), dtype))


class RMSNorm(nnx.Module):
  """weight [E] (initialised to ones)."""

  def __init__(self, features: int, *, dtype):
    self.weight = nnx.Param(jnp.ones((features,), dtype))


class Attention(nnx.Module):
  """q [E, H*D], k and v [E, K*D], o [H*D, E]."""

  def __init__(self, config: LlamaConfig, *, dtype, rngs: nnx.Rngs):
    e, d = config.hidden_size, config.head_dim
    self.q = Linear(e, config.num_heads * d, dtype=dtype, rngs=rngs)
    self.k = Linear(e, config.num_kv_heads * d, dtype=dtype, rngs=rngs)
    self.v = Linear(e, config.num_kv_heads * d, dtype=dtype, rngs=rngs)
    self.o = Linear(config.num_heads * d, e, dtype=dtype, rngs=rngs)


class MLP(nnx.Module):
  """SwiGLU: gate and up [E, F], down [F, E]."""

  def __init__(self, config: LlamaConfig, *, dtype, rngs: nnx.Rngs):
    e, f = config.hidden_size, config.intermediate_size
    self.gate = Linear(e, f, dtype=dtype, rngs=rngs)
    self.up = Linear(e, f, dtype=dtype, rngs=rngs)
    self.down = Linear(f, e, dtype=dtype, rngs=rngs)


class Block(nnx.Module):
  """One decoder layer: attn_norm, attn, mlp_norm, mlp."""

  def __init__(self, config: LlamaConfig, *, dtype, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(config.hidden_size, dtype=dtype)
    self.attn = Attention(config, dtype=dtype, rngs=rngs)
    self.mlp_norm = RMSNorm(config.hidden_size, dtype=dtype)
    self.mlp = MLP(config, dtype=dtype, rngs=rngs)


class Llama(nnx.Module):
  """Parameters of a Llama decoder. `config` is static; `lm_head` is None when tied."""

  def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    if not isinstance(config, LlamaConfig):
      raise ValueError(f"config must be a LlamaConfig, got {type(config).__name__}")
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    self.config = config
    self.embed = Embed(config.vocab_size, config.hidden_size, dtype=dtype, rngs=rngs)
    self.layers = nnx.List([Block(config, dtype=dtype, rngs=rngs)
                            for _ in range(config.num_layers)])
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
  kind of tensor stacked over layers [L, ...] for large ones.
  """
  dtype = jnp.dtype(dtype)
  graphdef, state = nnx.split(abstract(config, dtype=dtype))
  flat = _flat_leaves(nnx.to_pure_dict(state))

  def make():
    key = jax.random.key(seed)
    groups: dict[tuple, list] = {}
    for path, leaf in flat.items():
      if path[-1] == "weight":      # RMSNorm weights
        continue
      kind = tuple("*" if isinstance(p, int) else p for p in path)
      groups.setdefault(kind, []).append(path)
    values = {path: jnp.ones(leaf.shape, dtype) for path, leaf in flat.items()
              if path[-1] == "weight"}
    total = sum(int(np.prod(flat[p].shape)) for paths in groups.values() for p in paths)
    if total <= _FLAT_INIT_LIMIT:
      draws = {None: _INIT_STDDEV * jax.random.normal(key, (total,), jnp.float32)}
    else:
      draws = {}
    offset = 0
    for g, (kind, paths) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0]))):
      shape = flat[paths[0]].shape
      size = int(np.prod(shape))
      if None in draws:
        stacked = draws[None][offset:offset + size * len(paths)]
        offset += size * len(paths)
      else:
        stacked = _INIT_STDDEV * jax.random.normal(jax.random.fold_in(key, g),
                                                   (len(paths) * size,), dtype)
      stacked = stacked.astype(dtype).reshape((len(paths),) + tuple(shape))
      for i, path in enumerate(paths):
        values[path] = stacked[i]
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
  kernel = layer.kernel[...]
  return jnp.einsum("...i,io->...o", x, kernel, precision=_precision(kernel.dtype))


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


def apply_rope(x, positions, inv_freq):
  """Rotate-half RoPE. x [B,T,N,D], positions [B,T] int, inv_freq [D/2] -> x's shape/dtype."""
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]       # [B,T,1,D]
  cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


def _check_inputs(config: LlamaConfig, tokens, positions, cache):
  if tokens.ndim != 2:
    raise ValueError(f"tokens must have shape [B,T], got {tuple(tokens.shape)}")
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"tokens must be integer token ids, got dtype {tokens.dtype}")
  if tuple(positions.shape) != tuple(tokens.shape):
    raise ValueError(f"positions must have the shape of tokens {tuple(tokens.shape)}, got "
                     f"{tuple(positions.shape)}")
  if cache is not None and not isinstance(cache, KVCache):
    raise ValueError(f"cache must be a hydrax.cache.KVCache or None, got {type(cache).__name__}")
  b, t = tokens.shape
  if cache is not None and cache.suffix is not None:
    suffix = cache.suffix
    want = (config.num_layers, b, None, config.num_kv_heads, config.head_dim)
    got = tuple(suffix.k.shape)
    if len(got) != 5 or any(w is not None and w != g for w, g in zip(want, got)):
      raise ValueError(f"cache.suffix.k must have shape [L,B,S,K,D] = "
                       f"{tuple('S' if w is None else w for w in want)}, got {got}")
    if t > got[2]:
      raise ValueError(f"{t} new tokens do not fit in the per-sequence cache of capacity "
                       f"S={got[2]}")
    lengths = attn_lib.checks.concrete(suffix.lengths)
    if lengths is not None and lengths.size and int(lengths.max()) + t > got[2]:
      i = int(np.argmax(lengths))
      raise ValueError(f"cache overflow: row {i} holds {int(lengths[i])} keys and {t} new "
                       f"tokens exceed the per-sequence cache capacity S={got[2]}")
  if cache is not None:
    for i, lvl in enumerate(cache.shared):
      if lvl.k.ndim != 5 or lvl.k.shape[0] != config.num_layers:
        raise ValueError(f"cache.shared[{i}].k must have shape [L,N,S,K,D] with "
                         f"L={config.num_layers}, got {tuple(lvl.k.shape)}")
    for i, owner in enumerate(cache.owners):
      if owner.shape != (b,):
        raise ValueError(f"cache owners[{i}] has shape {owner.shape} but tokens have B={b} rows")


def own_level(suffix: Optional[LevelKV], index: int, k, v):
  """The per-sequence level of layer `index` for this chunk's keys and values k, v [B,T,K,D].

  suffix None (no cache): the chunk alone. Otherwise the chunk is written into layer `index` of
  suffix [L,B,S,K,D] after each row's valid keys (slots past S are dropped) and the level is
  that layer with lengths + T. Returns (suffix, KVLevel); suffix.lengths are left as they were
  (the caller advances them once for all layers)."""
  b, t = k.shape[:2]
  if suffix is None:
    return None, attn_lib.KVLevel(k, v, jnp.full((b,), t, jnp.int32), None)
  start = suffix.lengths.astype(jnp.int32)
  rows = jnp.arange(b)[:, None]
  slots = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
  new_k = suffix.k.at[index, rows, slots].set(k.astype(suffix.k.dtype), mode="drop")
  new_v = suffix.v.at[index, rows, slots].set(v.astype(suffix.v.dtype), mode="drop")
  return (LevelKV(new_k, new_v, suffix.lengths),
          attn_lib.KVLevel(new_k[index], new_v[index], start + t, None))


def _attention_layer(config: LlamaConfig, layer: Attention, x, positions, inv_freq,
                     cache: Optional[KVCache], index: int, *, skip_attention: bool,
                     backend: str):
  """x [B,T,E] -> (out [B,T,E], suffix LevelKV or None with this layer's new keys written)."""
  b, t, _ = x.shape
  h, kh, d = config.num_heads, config.num_kv_heads, config.head_dim
  q = _linear(layer.q, x).reshape(b, t, h, d)
  k = _linear(layer.k, x).reshape(b, t, kh, d)
  v = _linear(layer.v, x).reshape(b, t, kh, d)
  suffix = None if cache is None else cache.suffix
  if skip_attention:
    # The paper's "no attention" upper bound: each query head takes its own token's value.
    out = jnp.repeat(v, config.num_groups, axis=2)
    return _linear(layer.o, out.reshape(b, t, h * d)), suffix
  q = apply_rope(q, positions, inv_freq)
  k = apply_rope(k, positions, inv_freq)
  levels = [] if cache is None else cache.layer_levels(index)
  suffix, own = own_level(suffix, index, k, v)
  levels.append(own)
  out, _ = attn_lib.hydragen_attention(q, levels, causal_last=True, backend=backend)
  return _linear(layer.o, out.reshape(b, t, h * d)), suffix


def _mlp(mlp: MLP, x):
  return _linear(mlp.down, jax.nn.silu(_linear(mlp.gate, x)) * _linear(mlp.up, x))


def forward(model: Llama, tokens, positions, cache: Optional[KVCache] = None, *,
            valid=None, skip_attention: bool = False, backend: str = "auto"):
  """Runs the decoder over T new tokens per row; pure (the model is only read).

  tokens, positions: [B,T] int32 (positions are the RoPE positions of the new tokens).
  cache: None, the tokens attend causally to themselves only (a full forward pass); or a
    KVCache: each row attends to its nodes of `cache.shared` (per `cache.owners`), then to its
    own keys `cache.suffix` (if not None), into which the new tokens' keys and values are
    written at slots lengths[b] .. lengths[b]+T-1 (causal, bottom-right aligned).
  valid: [B] int32 number of real (non-padding) new tokens per row (default T); the suffix
    lengths grow by it. Padding tokens must come last in a row.
  skip_attention: skip the attention product (the "no attention" upper bound): caches are
    passed through untouched.
  Returns (hidden [B,T,E] after the final norm, in the model dtype; the cache with its suffix
  updated, or None if `cache` was None).
  """
  config = model.config
  tokens = jnp.asarray(tokens)
  positions = jnp.asarray(positions)
  _check_inputs(config, tokens, positions, cache)
  b, t = tokens.shape
  inv_freq = rope_frequencies(config)
  x = jnp.take(model.embed.embedding[...], tokens.astype(jnp.int32), axis=0)
  suffix = None if cache is None else cache.suffix
  for index, block in enumerate(model.layers):
    layer_cache = None if cache is None else cache.replace_suffix(suffix)
    a, suffix = _attention_layer(config, block.attn, rms_norm(block.attn_norm, x,
                                                              config.rms_norm_eps),
                                 positions, inv_freq, layer_cache, index,
                                 skip_attention=skip_attention, backend=backend)
    x = x + a
    x = x + _mlp(block.mlp, rms_norm(block.mlp_norm, x, config.rms_norm_eps))
  hidden = rms_norm(model.norm, x, config.rms_norm_eps)
  if cache is None:
    return hidden, None
  if suffix is not None and not skip_attention:
    grow = jnp.full((b,), t, jnp.int32) if valid is None else jnp.asarray(valid, jnp.int32)
    suffix = LevelKV(suffix.k, suffix.v, suffix.lengths + grow)
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
