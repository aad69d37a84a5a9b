"""Generation: prefill over a sharing plan, one compiled decode loop, sampling; one device or a
mesh, with the sharing tree as runtime data.

  generate(model, params, prompts, *, max_new_tokens, attention="hydragen", backend="auto",
           mesh=None, prefill="auto", keep=False, reuse=None, ...) -> Generation
  Runtime(backend, mesh, checks, unroll, xla_options, check_every, nucleus)
  Runtime.build(backend="auto", mesh=None, checks="static", unroll=1, xla_options="auto",
                check_every=1, nucleus="sort")
  estimate_kv_bytes(config, prompts, *, max_new_tokens, attention, dtype, mesh=None) -> int
  footprint(config, prompts, ...) -> (kv_bytes, Signature)
  score(model, params, prompts, continuations, *, method="prefill", **generate_options)
      -> Scores
  sample(logits, key, *, temperature=0.0, top_k=None, top_p=None, nucleus="sort") -> tokens
  row_keys(seed, row_seeds) -> key data of each row's PRNG key
  precompile(model, params, prompts, *, max_new_tokens, ...) -> (seconds, kept shapes or None)
  compile_jobs(model, params, prompts, *, max_new_tokens, ...) -> CompileJobs
  clear_compiled_cache(); compiled_cache_info() -> (entries, compilations so far)
  OutOfMemoryError, Generation, KeptNodes, CompileJobs

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
              no KV cache; the projections are still computed): the paper's "no attention"
              upper bound. Its tokens are not the model's.

Sharing structure is data. Everything derived from a plan (each row's node at every shared
level, each node's ancestors, where each sequence's last prompt token is, the row order) is an
int32 input array of the compiled prefill and decode. What they are compiled for is a small
static `Signature`: rows per data shard, per shared level its node count and token width
(bucketed with `hydrax.sharing.buckets.DEFAULT`) and cache capacity, the suffix width and
capacity (bucketed), the prefill chunks, max_new_tokens, sampling, the `Runtime` (attention
backend with its kernel configuration, mesh, checks mode) and the model's structure. Executables
are cached by that key only, so nearby trees (prompts of 21, 23 or 22 tokens; other trees with
the same bucketed shapes) reuse them and report `compile_seconds == 0`.

Shared levels can outlive a call (`keep=True` -> `Generation.kept`, a `KeptNodes`) and be
handed to the next (`reuse=`): that call's plan is laid out so that its nodes found in a kept
level of the same bucketed shape (same path of tokens, same level, same data shard) keep their
place there, the kept arrays are donated to its prefill, and only the new nodes are prefilled
and written in beside them. This is how a long document shared by more requests than one batch
holds is prefilled once (`hydrax.generate.run` hands each batch's levels to the next).

Prefill of the unique suffixes (the per-sequence pass), `prefill=`: "padded" runs each
sequence as a row as wide as the longest suffix (bucketed), B x max(lengths) token slots;
"packed" (Prepacking) first-fit packs the suffixes into rows of that width
(`hydrax.offline.packing`), each token with its sequence id and its own position, so about
sum(lengths) slots run: a packed token attends to its sequence's tree path (the shared levels,
one query per token) and, block-diagonally, to the earlier tokens of its own suffix, and its
keys are scattered into its sequence's cache (`llama.forward(..., segments=)`). Prefill steps
take whole packed rows (a suffix never spans two steps), so packing needs the width <=
prefill_chunk. "auto" (the default) packs when that runs fewer slots and fits, decided on the
host from the lengths; the packed row count is bucketed and part of the `Signature`. On a mesh
each data shard packs its own sequences: their caches live on that shard, and packing across
shards would move keys between devices.

One loop for one device and a mesh. With a ("data", "model") mesh the same prefill and decode
run under `jax.shard_map`, manual over "data": the plan's rows (plan order, depth-first) are cut
into `data` contiguous blocks, each shard stores and prefills the nodes its rows own (a node
whose rows span shards is stored on each; owners are per-shard local indices, just data sharded
over "data"), and "are all rows done?" is one scalar psum over "data" per decode step. The
"model" axis is left to XLA's partitioner: parameters placed by `hydrax.parallel.rules`
(tensor parallel), so XLA inserts the all-reduces after the attention output and MLP down
projections and the (max, argmax) gather of greedy sampling; attention itself runs in a nested
shard_map manual over "model" (a shard's query heads read only its own KV heads), so kernels
see their shard's heads and nothing is communicated there. All of this is on the `Runtime`.

Axis letters: B sequences, R rows of a prefill pass, P prompt length, N nodes, S capacity,
W token width of a pass, E hidden, V vocabulary, L layers, K KV heads, D head dim.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import math
import threading
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.experimental import checkify
from jax.sharding import PartitionSpec as P

from hydrax import sharing
from hydrax._log import log_once
from hydrax.attention import backends as backends_lib
from hydrax.cache import KVCache, LevelKV, empty_level, level_bytes
from hydrax.models import llama as llama_lib
from hydrax.models.configs import LlamaConfig
from hydrax.offline import packing
from hydrax.sharing import buckets as buckets_lib

_KEY_BLOCK = 128   # shared-level capacities above this are whole blocks of this many keys
_BUCKETS = buckets_lib.DEFAULT   # for plans that carry no bucket policy of their own
_DATA = "data"     # the mesh axis of rows (hydrax.parallel.mesh.DATA; not imported: no cycle)

ATTENTION_MODES = ("hydragen", "replicated", "none")
PREFILL_MODES = ("auto", "packed", "padded")
FORCED_IN = ("decode", "prefill")
CHECKS_MODES = ("static", "runtime")
NUCLEUS_METHODS = ("sort", "search")


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
  compile_seconds: time this call waited for them to compile (on one device the decode loop
           compiles on a thread of its own beside the prefill); 0 when executables compiled
           by an earlier call with the same signature (not the same tree) were reused.
  decode_tokens_per_second: tokens produced by the decode loop / decode_seconds, i.e.
           sum(lengths - 1) / decode_seconds: each sequence's first token comes from prefill
           (it is sampled from the last prompt token's logits) and is not counted. NaN when
           the loop did not run (max_new_tokens == 1).
  tokens_per_second: all generated tokens / (prefill_seconds + decode_seconds) (end to end).
  kv_bytes: bytes of key/value cache that decode holds (shared levels once per data shard
           that stores them + per-sequence caches), as allocated (capacity, not valid keys).
  decode_steps: iterations of the decode loop that ran (it stops when all sequences are done).
  attention: the mode. texts: decoded generations when a tokenizer was given, else None.
  signature: the static `Signature` the executables were compiled for (requests with equal
           signatures share them).
  prefill: how the per-sequence pass ran, "packed" or "padded"; prefill_slots: the token
           slots it ran (all shards); padded_slots: what the padded pass would run.
  kept:    with keep=True, the shared levels for the next call's `reuse=` (`KeptNodes`).
  reused_tokens: node tokens taken from `reuse=` instead of prefilled (all shards).
  logprobs: with logprobs=True, float32 [B, max_new_tokens]: each generated token's log
           probability under the model's own distribution (the logits' log-softmax, before
           temperature, top_k and top_p); NaN past a sequence's length. Else None.
  drawn:   with forced=, int32 [B, max_new_tokens]: the token the sampler drew at each
           position (where a forced token was taken instead too); -1 past a sequence's
           length. Else None.
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
  signature: Optional[tuple] = None
  prefill: Optional[str] = None
  prefill_slots: int = 0
  padded_slots: int = 0
  kept: Optional["KeptNodes"] = None
  reused_tokens: int = 0
  logprobs: Optional[np.ndarray] = None
  drawn: Optional[np.ndarray] = None

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


@dataclasses.dataclass
class KeptNodes:
  """The shared levels of a finished `generate(..., keep=True)` (hydragen), for the next
  call's `reuse=`: a node of the next plan whose path (the prompt tokens from position 0 to
  its end) equals a kept node's at the same level, in the same data shard, is not prefilled
  again; its keys, values and last hidden state are taken from here. A level is reused in
  place (its arrays donated to that call, so no second copy is ever held) when the next plan
  lays it out with the same node count and capacity, the usual case under bucketed shapes;
  otherwise that level is prefilled as usual. Used once: the call that reuses it takes it.

  levels: per shared level, LevelKV [L, data*N, S, K, D] (None once taken); lasts: per level
  [data*N, E] the hidden state of each node's last token; index: per level, per data shard,
  {path key: local node}; shapes: per level (N, S); data: data shards.
  """
  levels: list
  lasts: list
  index: tuple
  shapes: tuple
  data: int
  taken: bool = False

  def take(self, used: tuple) -> tuple:
    """((LevelKV, lasts) of the levels in `used`, in order); drops every reference here, so
    the levels that are not used are freed."""
    out = tuple((self.levels[d], self.lasts[d]) for d in used)
    self.levels = [None] * len(self.levels)
    self.lasts = [None] * len(self.lasts)
    self.taken = True
    return out


def path_key(tokens: np.ndarray) -> bytes:
  """Identity of a node across plans: a digest of its path's tokens (int32)."""
  return hashlib.blake2b(np.ascontiguousarray(tokens, np.int32).tobytes(),
                         digest_size=16).digest()


# ----------------------------------------------------------------------------- runtime


def _mesh_lib():
  # Imported when a mesh is used: hydrax.parallel imports this module (its generate is ours).
  from hydrax.parallel import mesh as mesh_lib, rules
  return mesh_lib, rules


# XLA options for GPU executables. Under `lax.scan` over stacked [L, ...] weights, XLA's GPU
# backend by default copies each layer's weight slice out of the stack before its matrix
# products, every step (~16 GB per llama3-8b decode step). Dynamic-slice fusion lets cuBLAS
# read the slice in place; it applies to cuBLAS calls only, hence Triton GEMM fusions off
# (cuBLAS is as fast on these shapes). Measured on an H200, llama3-8b bf16 no-attention decode
# step (experiments/bench_layers.py, experiments/results/engine/layers/): B=256 12.52 ->
# 6.68 ms, B=1024 27.55 -> 22.23 ms, the same as per-layer weight buffers (6.86, 22.35 ms);
# dynamic-slice fusion alone changed nothing.
GPU_XLA_OPTIONS = (("xla_gpu_enable_dynamic_slice_fusion", True),
                   ("xla_gpu_enable_triton_gemm", False))


@dataclasses.dataclass(frozen=True)
class Runtime:
  """Where and how a generation runs; hashable, part of every compile key.

  backend: the attention backend, a `hydrax.attention.backends.Backend` value carrying its
           kernel configuration (`backends.get("pallas", lowering="triton")`).
  mesh:    None (one device) or a ("data", "model") `jax.sharding.Mesh`.
  checks:  "static" (the attention core's shape and concrete-value checks) or "runtime"
           (values checked under jit too, passed to the attention core as checks=).
  unroll:  layers per iteration of the model's `lax.scan` (True, stored as "all": every
           layer). 1 compiles fastest and, with the GPU's default `xla_options`, runs as fast
           as per-layer weight buffers (see `llama.forward`'s docstring).
  xla_options: XLA compiler options of the prefill and decode executables, as sorted
           (name, value) pairs (a dict is accepted), or "auto": `GPU_XLA_OPTIONS` on GPUs
           (so that the layer scan reads each layer's weights in place), none elsewhere.
  check_every: decode steps between the loop's checks whether every sequence is done. XLA
           runs the decode `while_loop` by copying its condition to the host after every
           iteration and waiting for it before it launches the next, so the device idles
           while the next step's first kernels are launched; an inner loop of a known trip
           count needs no such copy. With check_every = C the loop runs C steps an iteration:
           the same tokens, up to C - 1 steps run past the end and discarded (`_make_decode`).
  nucleus: how sampling finds top_p's cutoff, "sort" or "search" (`sample`'s nucleus=): the
           same tokens up to the float rounding of the probability sums at the cutoff.
  Build it with `Runtime.build(backend="auto", mesh=None, checks="static", unroll=1,
  xla_options="auto", check_every=1, nucleus="sort")`, which resolves a backend name ("auto"
  per platform) and a mesh spec ("2x4", (2, 4), ...).
  """
  backend: backends_lib.Backend
  mesh: Any = None
  checks: str = "static"
  unroll: Any = 1
  xla_options: Any = "auto"
  check_every: int = 1
  nucleus: str = "sort"

  def __post_init__(self):
    if not isinstance(self.backend, backends_lib.Backend):
      raise ValueError(f"Runtime.backend must be a backends.Backend (use Runtime.build for a "
                       f"name), got {self.backend!r}")
    if self.checks not in CHECKS_MODES:
      raise ValueError(f"checks must be one of {list(CHECKS_MODES)}, got {self.checks!r}")
    if self.unroll is True:      # True == 1 in Python: keep full unrolling apart in the key
      object.__setattr__(self, "unroll", "all")
    if not (self.unroll == "all" or (isinstance(self.unroll, int)
                                     and not isinstance(self.unroll, bool) and self.unroll >= 1)):
      raise ValueError(f"unroll must be a positive int or True (every layer), got "
                       f"{self.unroll!r}")
    if self.mesh is not None:
      _mesh_lib()[0].check_mesh(self.mesh)
    if isinstance(self.xla_options, dict):
      object.__setattr__(self, "xla_options", tuple(sorted(self.xla_options.items())))
    if self.xla_options != "auto" and not (
        isinstance(self.xla_options, tuple) and
        all(isinstance(o, tuple) and len(o) == 2 and isinstance(o[0], str)
            for o in self.xla_options)):
      raise ValueError(f"xla_options must be 'auto', a dict or (name, value) pairs, got "
                       f"{self.xla_options!r}")
    if not (isinstance(self.check_every, (int, np.integer)) and
            not isinstance(self.check_every, bool) and self.check_every >= 1):
      raise ValueError(f"check_every must be an int >= 1 (decode steps between the loop's "
                       f"checks), got {self.check_every!r}")
    object.__setattr__(self, "check_every", int(self.check_every))
    _check_nucleus(self.nucleus)

  @classmethod
  def build(cls, backend="auto", mesh=None, checks: str = "static", unroll=1,
            xla_options="auto", check_every: int = 1, nucleus: str = "sort") -> "Runtime":
    if mesh is not None:
      mesh = _mesh_lib()[0].make_mesh(mesh)
    return cls(backends_lib.get(backend), mesh, checks, unroll, xla_options, check_every,
               nucleus)

  def compiler_options(self) -> Optional[dict]:
    """The XLA options the executables are compiled with (None: XLA's defaults)."""
    if self.xla_options != "auto":
      return dict(self.xla_options) or None
    devices = jax.devices() if self.mesh is None else self.mesh.devices.flat
    platform = next(iter(devices)).platform
    return dict(GPU_XLA_OPTIONS) if platform == "gpu" else None

  @property
  def data(self) -> int:
    """Data shards (1 without a mesh)."""
    return 1 if self.mesh is None else _mesh_lib()[0].axis_sizes(self.mesh)[0]

  def describe(self) -> str:
    where = "one device" if self.mesh is None else \
        "mesh data={} model={}".format(*_mesh_lib()[0].axis_sizes(self.mesh))
    return f"backend={self.backend.name}, {where}"

  def forward_kwargs(self) -> dict:
    kwargs = {"backend": self._attention_backend(),
              "unroll": True if self.unroll == "all" else self.unroll}
    if self.checks != "static":
      kwargs["checks"] = self.checks
    return kwargs

  def _attention_backend(self) -> backends_lib.Backend:
    """The backend as the forward pass gets it: itself, or with a model axis > 1 run per model
    shard (a nested shard_map manual over "model": each shard's query heads read only its own
    KV heads, so attention needs no communication and kernels, custom calls that XLA's
    partitioner cannot split, see their shard's heads)."""
    if self.mesh is None or _mesh_lib()[0].axis_sizes(self.mesh)[1] == 1:
      return self.backend
    # (level by level: a backend's all-levels launch would see every head, not its shard's)
    return dataclasses.replace(self.backend, config=None, takes_layer=True,
                               level_attention=_per_model_shard(self.backend),
                               all_levels=None, prepare_levels=None)

  # What differs between one device and a mesh; the loop calls these and nothing else.

  def wrap(self, fn, in_specs, out_specs):
    """fn as run per data shard: itself without a mesh, else under shard_map manual over
    "data" (the "model" axis is left to XLA's partitioner)."""
    if self.mesh is None:
      return fn
    return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs,
                         axis_names=frozenset({_DATA}), check_vma=False)

  def all_done(self, done):
    """Whether every row of every data shard is done (one scalar psum over "data")."""
    if self.mesh is None:
      return jnp.all(done)
    return lax.psum(jnp.sum((~done).astype(jnp.int32)), _DATA) == 0

  def place(self, tree, spec):
    """Host or device arrays placed with PartitionSpec `spec` (every leaf); as is without a
    mesh."""
    if self.mesh is None:
      return jax.tree_util.tree_map(jnp.asarray, tree)
    from jax.sharding import NamedSharding
    rules = _mesh_lib()[1]
    sharding = NamedSharding(self.mesh, spec)
    return jax.tree_util.tree_map(lambda x: rules.put(x, sharding), tree)

  def place_params(self, params, config):
    if self.mesh is None:
      return params
    rules = _mesh_lib()[1]
    return rules.shard_tree(params, rules.param_specs(params, config, self.mesh), self.mesh)

  def to_host(self, x) -> np.ndarray:
    return np.asarray(x) if self.mesh is None else _mesh_lib()[1].to_host(x)


def _per_model_shard(backend: backends_lib.Backend):
  """level_attention of `backend` under a shard_map manual over "model" (nested in the
  engine's shard_map over "data"): q [B,T,H,D] split on H, k, v [(L,)N,S,K,D] on K; lengths,
  owner, limits and layer replicated."""
  model = _mesh_lib()[0].MODEL
  xla = backends_lib.get("xla")

  def level_attention(q, k, v, lengths, owner, limits, *, scale, layer=None):
    def body(q, k, v, lengths, limits, owner, layer):
      try:
        return backend.attend(q, k, v, lengths, owner, limits, scale=scale, layer=layer)
      except backends_lib.Unsupported as e:
        log_once(("fallback", backend.name, str(e)), "hydrax: backend %r cannot take this "
                 "input (%s); using the XLA backend", backend.name, e)
        return xla.attend(q, k, v, lengths, owner, limits, scale=scale, layer=layer)

    heads = P(None, None, model, None)
    kv = P(*([None] * (k.ndim - 2)), model, None)
    args = (q, k, v, lengths, limits, owner, layer)
    specs = (heads, kv, kv, P(), P(), None if owner is None else P(),
             None if layer is None else P())
    # mesh=None: the context's mesh, i.e. `mesh` with "data" already manual (the engine's
    # shard_map encloses every forward pass).
    return jax.shard_map(body, mesh=None, in_specs=specs,
                         out_specs=(heads, P(None, None, model)),
                         axis_names=frozenset({model}), check_vma=False)(*args)

  return level_attention


# ----------------------------------------------------------------------------- sampling


def sample(logits, key, *, temperature: float = 0.0, top_k: Optional[int] = None,
           top_p: Optional[float] = None, nucleus: str = "sort"):
  """Draws one token per row from logits [B,V] -> int32 [B].

  key: one PRNG key for all rows, or typed keys [B] (`jax.random.key`), one a row, so that a
  row's draw depends on its own key alone (what `generate` passes).
  temperature 0: greedy (argmax; top_k/top_p ignored). Otherwise softmax(logits/temperature)
  restricted to the top_k most likely tokens and to the smallest set of most likely tokens whose
  probability reaches top_p (the most likely token is always kept; tokens tied with the
  least likely kept one are kept too).
  nucleus: how top_p's cutoff is found, the same set either way (up to the float rounding of
  the probability sums at the boundary): "sort" sorts every row's vocabulary (on an H100,
  2.2 ms a decode step at B = 256 and V = 128,256: fused_h200 run 20, call 4); "search"
  finds the cutoff in 8 passes over the logits without sorting (`_nucleus_cutoff`).
  """
  _check_sampling(temperature, top_k, top_p)
  _check_nucleus(nucleus)
  logits = jnp.asarray(logits, jnp.float32)
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  vocab = logits.shape[-1]
  if top_k is not None and top_k < vocab:
    kth = lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None and top_p < 1.0:
    logits = jnp.where(_nucleus_kept(logits, top_p, nucleus), logits, -jnp.inf)
  if _is_row_keys(key, logits.shape[0]):
    return jax.vmap(jax.random.categorical)(key, logits).astype(jnp.int32)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _nucleus_kept(logits, top_p: float, nucleus: str):
  """bool [B,V]: the tokens top_p keeps of logits [B,V] float32, its cutoff found by
  `nucleus` ("sort" or "search": `sample`)."""
  if nucleus == "search":
    keys = _float_order(logits)
    return keys >= _nucleus_cutoff(keys, logits, top_p)
  ordered = -jnp.sort(-logits, axis=-1)
  probs = jax.nn.softmax(ordered, axis=-1)
  keep = (jnp.cumsum(probs, axis=-1) - probs < top_p).at[..., 0].set(True)
  return logits >= jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)


def _float_order(x):
  """float32 -> int32 keys in the floats' order (-0.0 as +0.0): a float's bits as an int
  order non-negative floats; a negative one's magnitude bits are flipped to order them."""
  bits = lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x), jnp.int32)
  return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def _nucleus_cutoff(keys, logits, top_p: float, ways: int = 16):
  """top_p's cutoff without a sort: int32 [B,1], the `_float_order` key of each row's least
  likely kept logit (keep the logits whose key is at least it); keys: `_float_order(logits)`.

  A token is kept when the probability of the tokens strictly more likely than it is below
  top_p, as the sorted cumulative sum has it: mass(k) = the probability of the keys above k
  falls as k rises, so the cutoff is the least key k with mass(k) < top_p, a key some logit
  has. A search of the keys' integer range [min - 1, max] (mass(min - 1) = 1 >= top_p,
  mass(max) = 0) keeps lo with mass(lo) >= top_p and hi with mass(hi) < top_p and splits
  (lo, hi] `ways` ways a pass, each pass one masked sum over the logits for all its probes:
  a width below 2**32 takes ceil(32 / log2(ways)) passes (8 at 16) to reach hi = lo + 1."""
  weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))     # -inf -> 0
  need = top_p * jnp.sum(weights, axis=-1, keepdims=True)
  # The range's ends as uint32 bits: hi - lo < 2**32 is exact there, lo + offset wraps back
  # to the int32 key's bits.
  unsigned = lambda k: lax.bitcast_convert_type(k, jnp.uint32)
  lo = unsigned(jnp.min(keys, axis=-1, keepdims=True) - 1)
  hi = unsigned(jnp.max(keys, axis=-1, keepdims=True))
  steps = jnp.arange(1, ways, dtype=jnp.uint32)
  bits = int(np.log2(ways))
  assert 1 << bits == ways, ways
  for _ in range(-(-32 // bits)):
    width = hi - lo
    # floor(width * i / ways) without overflowing 32 bits.
    offsets = (width >> bits) * steps + (((width & (ways - 1)) * steps) >> bits)
    probes = lax.bitcast_convert_type(lo + offsets, jnp.int32)            # [B, ways - 1]
    mass = jnp.sum(jnp.where(keys[:, None, :] > probes[:, :, None], weights[:, None, :], 0.0),
                   axis=-1)
    below = mass < need                          # rises with the probe: False.., then True..
    last_above = jnp.max(jnp.where(below, 0, offsets), axis=-1, keepdims=True)
    first_below = jnp.min(jnp.where(below, offsets, width), axis=-1, keepdims=True)
    lo, hi = lo + last_above, lo + first_below
  return lax.bitcast_convert_type(hi, jnp.int32)


def _is_row_keys(key, rows: int) -> bool:
  """Whether `key` is typed keys [rows] (one a row) rather than one key."""
  dtype = getattr(key, "dtype", None)
  if dtype is None or not jnp.issubdtype(dtype, jax.dtypes.prng_key) or key.ndim == 0:
    return False
  if key.shape != (rows,):
    raise ValueError(f"key must be one PRNG key or one a row ({rows}), got keys of shape "
                     f"{key.shape}")
  return True


def _draw_keys(keys, position):
  """Each row's key for its token at `position` (0: the prefill's draw): keys [B] typed
  keys, folded with the position, so a row's draws depend on its key and the position only
  (not on its row, its batch, its data shard or how the loop is cut into checks)."""
  return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, position)


def token_logprobs(logits, tokens):
  """log p(token) of each row under the model's own distribution: logits [B,V] (as the model
  gives them: before temperature, top_k or top_p) and tokens [B] -> float32 [B]."""
  logits = jnp.asarray(logits, jnp.float32)
  chosen = jnp.take_along_axis(logits, tokens[:, None].astype(jnp.int32), axis=-1)[:, 0]
  return chosen - jax.nn.logsumexp(logits, axis=-1)


def _split_sampling(sampling: dict):
  """(sample()'s keywords, whether the programs return the tokens' log-probabilities, what
  follows forced tokens: None (no forced tokens), "draw", "stop", or "prefill" (taken in the
  prefill, then stop; sampling["window"]: the forced tokens' width))."""
  return ({k: v for k, v in sampling.items() if k not in ("logprobs", "forced", "window")},
          bool(sampling.get("logprobs", False)), sampling.get("forced"))


def _ends(tok, position, eos, forced, then):
  """Whether each row ends with `tok` at column `position`: an EOS, or (then "stop" or
  "prefill") its last forced token (a row without forced tokens ends with its first, drawn,
  token)."""
  done = tok == eos
  if then in ("stop", "prefill"):
    done = done | (position + 1 >= forced[1])
  return done


# The per-token outputs beside the tokens, their dtype and the value of a column that holds no
# token (past a row's end): `Generation.logprobs`, `Generation.drawn`.
_EXTRAS = {"logprobs": (jnp.float32, np.nan), "drawn": (jnp.int32, -1)}


def _choose(logits, keys, position, forced, draw: dict, logprobs: bool):
  """(the token each row takes at column `position`, extras): drawn from logits [B,V] with
  keys, or its forced token where it has one there (forced: (tokens [B,F], lengths [B]) or
  None). extras: "logprobs" (of the token taken, under the model's own logits) and, with
  forced tokens, "drawn" (what the sampler drew, forced or not)."""
  drawn = sample(logits, keys, **draw)
  tok, extras = drawn, {}
  if forced is not None:
    tokens, lengths = forced
    at = lax.dynamic_index_in_dim(tokens, jnp.minimum(position, tokens.shape[1] - 1), axis=1,
                                  keepdims=False)
    tok = jnp.where(position < lengths, at, drawn)
    extras["drawn"] = drawn
  if logprobs:
    extras["logprobs"] = token_logprobs(logits, tok)
  return tok, extras


def _taken(tok, now: dict, real, done, count, position, eos, pad, forced, then):
  """One column's bookkeeping, the decode loop's and the prefill's forcing alike: the token
  and extras `_choose` gave, kept where the row is still running (real; else pad and
  `_EXTRAS`' empty value), and the rows' counts and done after the column."""
  now = {k: jnp.where(real, v, _EXTRAS[k][1]) for k, v in now.items()}
  tok = jnp.where(real, tok, pad)
  return (tok, now, count + real.astype(jnp.int32),
          done | _ends(tok, position, eos, forced, then))


def _take_forced(model, hidden, keys, forced, eos, draw: dict, logprobs: bool):
  """The forced tokens taken in the prefill (`generate(forced_in="prefill")`): hidden [R,F,E]
  the hidden state before each column (the prompt's last token's, then each forced token's);
  keys [R] typed. Column j is chosen as the decode loop would (`_choose`, keys folded with j),
  a row ending after its forced tokens (with its first, drawn, token when it has none) or an
  EOS. Returns ((tokens [R,F] (0 past a row's end), count [R]), extras [R,F] each (`_EXTRAS`'
  empty value past the end), done [R])."""
  r, width = hidden.shape[:2]

  def column(carry, xs):
    done, count = carry
    j, h = xs
    tok, now = _choose(llama_lib.logits(model, h), _draw_keys(keys, j), j, forced, draw,
                       logprobs)
    tok, now, count, done = _taken(tok, now, ~done, done, count, j, eos, 0, forced, "prefill")
    return (done, count), (tok, now)

  (done, count), (tokens, extras) = lax.scan(
      column, (jnp.zeros((r,), bool), jnp.zeros((r,), jnp.int32)),
      (jnp.arange(width, dtype=jnp.int32), hidden.transpose(1, 0, 2)))
  return (tokens.T, count), {k: v.T for k, v in extras.items()}, done


def row_keys(seed: int, row_seeds) -> np.ndarray:
  """Key data [B, ...] (uint32) of each row's PRNG key: key(seed) folded with each word of its
  row seed in turn. row_seeds: ints in [0, 2**32), [B] or [B, W] (W words a row, e.g. a
  request's hash and its sample index). Threefry is integer arithmetic: the same keys on
  every device."""
  words = np.asarray(row_seeds)
  if words.ndim == 1:
    words = words[:, None]
  if words.ndim != 2 or words.shape[1] < 1 or words.dtype.kind not in "iu" or (
      words.size and (words.min() < 0 or words.max() >= 1 << 32)):
    raise ValueError(f"row_seeds must be ints in [0, 2**32) of shape [B] or [B, W], got "
                     f"{np.asarray(row_seeds).dtype} {np.asarray(row_seeds).shape}"
                     + (f" in [{words.min()}, {words.max()}]"
                        if words.dtype.kind in "iu" and words.size else ""))
  keys = _fold_words(jax.random.key(int(seed)), jnp.asarray(words.astype(np.uint32)))
  return np.asarray(jax.random.key_data(keys))


# The shape and dtype of one PRNG key's data (threefry: 2 x uint32), without computing one.
_KEY_DATA = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))


@jax.jit
def _fold_words(base, words):
  def fold(row):
    key = base
    for w in range(row.shape[0]):
      key = jax.random.fold_in(key, row[w])
    return key
  return jax.vmap(fold)(words)


def _check_nucleus(nucleus) -> None:
  if nucleus not in NUCLEUS_METHODS:
    raise ValueError(f"nucleus must be one of {list(NUCLEUS_METHODS)}, got {nucleus!r}")


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


class _Pass(NamedTuple):
  """One prefill pass, R rows per data shard, stacked over shards: arrays have data*R rows.

  tokens [data*R, W] int32 (W a multiple of chunk); lengths, start [data*R] int32 (start: the
  RoPE position of each row's first token); anc: per earlier shared level, [data*R] int32 the
  shard-local node each row attends to there (runtime data).
  """
  tokens: np.ndarray
  lengths: np.ndarray
  start: np.ndarray
  anc: tuple
  rows: int        # R, rows per data shard
  capacity: int    # cache slots per row
  chunk: int       # tokens per row per prefill step
  # A shared level laid into a kept one (`KeptNodes`): storage (N, S) of the kept level; the
  # pass runs only the level's new nodes, dest [data*R] their local node there (N + i for
  # padding row i: past the level, dropped, each its own), storage_lengths [data*N] every
  # node's length in this plan (0: unused).
  storage: tuple = ()
  dest: Optional[np.ndarray] = None
  storage_lengths: Optional[np.ndarray] = None

  def static(self) -> tuple:
    return (self.rows, int(self.tokens.shape[1]), self.capacity, self.chunk,
            len(self.anc)) + tuple(self.storage)

  def arrays(self) -> tuple:
    base = (self.tokens, self.lengths, self.start, self.anc)
    return base + ((self.dest, self.storage_lengths) if self.storage else ())

  @property
  def slots(self) -> int:
    """Token slots the pass runs (all shards): the prefill's cost in the model's products."""
    return int(self.tokens.size)


class _PackedPass(NamedTuple):
  """The per-sequence pass packed (Prepacking): each data shard's suffixes first-fit into P
  rows of W slots (`hydrax.offline.packing.pack`) instead of one padded row each.

  tokens, segments, positions [data*P, W] int32: segments the shard-local sequence of each
  slot (-1: padding), positions each token's own (restarting per sequence); start [data*R]
  int32 each sequence's first suffix position; last_row, last_col [data*R] int32 the packed
  row (in its shard) and column of each sequence's last suffix token (-1: no suffix); anc:
  per earlier shared level, [data*R] the node of each sequence (as `_Pass`).
  """
  tokens: np.ndarray
  segments: np.ndarray
  positions: np.ndarray
  start: np.ndarray
  last_row: np.ndarray
  last_col: np.ndarray
  anc: tuple
  rows: int         # R, sequences per data shard (the cache's rows)
  packed_rows: int  # P, packed rows per data shard
  capacity: int     # cache slots per sequence
  chunk: int        # packed rows per prefill step (P is a multiple)

  def static(self) -> tuple:
    return (self.rows, int(self.tokens.shape[1]), self.capacity, self.chunk, len(self.anc))

  def arrays(self) -> tuple:
    return (self.tokens, self.segments, self.positions, self.start, self.last_row,
            self.last_col, self.anc)

  @property
  def slots(self) -> int:
    return int(self.tokens.size)


class Signature(NamedTuple):
  """What compiled prefill and decode depend on besides the runtime and the model: nearby
  sharing trees have equal signatures. levels and main: per pass (rows per shard, token width,
  capacity, chunk, attended shared levels). packed_rows: 0 for a padded per-sequence pass;
  else it is packed into that many rows per shard (main's chunk: packed rows per step)."""
  attention: str
  data: int
  rows: int
  levels: tuple
  main: tuple
  max_new_tokens: int
  packed_rows: int = 0


class Layout(NamedTuple):
  """A plan laid out for prefill and decode over `data` shards (1 without a mesh).

  levels: a `_Pass` per non-empty shared level (its rows are each shard's local nodes);
  main: the per-sequence pass (suffixes; whole prompts' caches in the replicated mode), a
  `_Pass` (padded) or a `_PackedPass`; padded_slots: the token slots a padded main pass runs.
  seq_owner: per shared level, [data*B_l] local node of each row; last_source, last_row
  [data*B_l]: where each row's last prompt token's hidden state is (-1: the main pass's row;
  d: local node last_row of shared level d); prompt_lengths [data*B_l];
  plan_row [data, B_l] plan row of each local row, real [data, B_l] False for repeated rows (a
  short last block repeats its last row); order [B] input index of each plan row;
  replication: per shared level, stored nodes / distinct nodes.
  index (with keep): per shared level, per shard, {path key: local node} of its non-empty
  nodes; reused: the shared levels laid into the kept ones of `reuse` (their passes run only
  the new nodes); reused_tokens: node tokens taken from there.
  window_col (with `layout(window=)`): [data*B_l] the main pass's column of each row's last
  prompt token, its forced tokens after it (-1, or a neighbour's in a packed row, where the
  prompt ends in a shared node: last_source says so).
  """
  attention: str
  levels: tuple
  main: _Pass
  seq_owner: tuple
  last_source: np.ndarray
  last_row: np.ndarray
  prompt_lengths: np.ndarray
  plan_row: np.ndarray
  real: np.ndarray
  order: np.ndarray
  replication: tuple
  max_new_tokens: int
  padded_slots: int = 0
  index: tuple = ()
  reused: tuple = ()
  reused_tokens: int = 0
  window_col: Optional[np.ndarray] = None

  @property
  def data(self) -> int:
    return int(self.plan_row.shape[0])

  @property
  def prefill(self) -> str:
    """How the per-sequence pass runs: "packed" or "padded"."""
    return "packed" if isinstance(self.main, _PackedPass) else "padded"

  def signature(self) -> Signature:
    # With no shared level, hydragen and replicated are the same computation.
    mode = self.attention if self.levels or self.attention == "none" else "replicated"
    return Signature(mode, self.data, int(self.plan_row.shape[1]),
                     tuple(p.static() for p in self.levels), self.main.static(),
                     self.max_new_tokens,
                     self.main.packed_rows if self.prefill == "packed" else 0)

  def inputs(self) -> dict:
    """The runtime arrays of prefill (all rows-first, sharded over "data")."""
    out = {"levels": [p.arrays() for p in self.levels], "main": self.main.arrays(),
           "seq_owner": tuple(self.seq_owner), "last_source": self.last_source,
           "last_row": self.last_row}
    if self.window_col is not None:
      out["window_col"] = self.window_col
    return out

  def kv_bytes(self, config: LlamaConfig, dtype) -> int:
    """Bytes of the cache that decode holds (the shared levels only with hydragen)."""
    held = {"none": (), "replicated": (self.main,),
            "hydragen": self.levels + (self.main,)}[self.attention]
    return sum(level_bytes(config.num_layers, self.data * p.rows, p.capacity,
                           config.num_kv_heads, config.head_dim, dtype) for p in held)


def level_capacity(width: int) -> int:
  """Cache slots of a shared level whose prefill pass is `width` tokens wide: whole blocks of
  128 keys above 128 (the Mosaic GPU kernel of the pallas backend otherwise copies the level
  padded on every call)."""
  return width if width <= _KEY_BLOCK else -(-width // _KEY_BLOCK) * _KEY_BLOCK


def _chunked(tokens: np.ndarray, width: int, step_tokens: int, rows: int):
  """tokens [R', >= their longest] cut or zero-padded to `width`, then to n chunks of c tokens
  per row: the fewest chunks of at most step_tokens // rows tokens (rows: a shard's rows), cut
  evenly, so that one prefill step of a device handles at most about step_tokens query tokens
  and the padding is under n tokens. Returns (tokens [R', n*c], c)."""
  width = max(int(width), 1)
  n = -(-width // max(1, min(step_tokens // max(rows, 1), width)))
  c = -(-width // n)
  out = np.zeros((tokens.shape[0], n * c), np.int32)
  w = min(width, tokens.shape[1])
  out[:, :w] = tokens[:, :w]
  return out, c


def _split_rows(b: int, data: int):
  """[data, ceil(B/data)] plan rows of each shard's contiguous block; a short block repeats
  its last row (real False)."""
  if b < data:
    raise ValueError(f"{b} sequences cannot fill a data axis of size {data}: use at most {b} "
                     "data shards (put the other devices on 'model')")
  per = -(-b // data)
  plan_row = np.zeros((data, per), np.int64)
  real = np.zeros((data, per), bool)
  first = 0
  for s in range(data):
    n = b // data + (s < b % data)
    plan_row[s, :n] = np.arange(first, first + n)
    plan_row[s, n:] = first + n - 1
    real[s, :n] = True
    first += n
  return plan_row, real


def _plan_levels(plan, b: int) -> list:
  """(tokens, lengths, owner, start) NumPy tuples of the plan's non-empty shared levels,
  checked for shapes and ranges."""
  levels = []
  for d, lvl in enumerate(plan.levels):
    tokens, lengths = np.asarray(lvl.tokens), np.asarray(lvl.lengths, np.int64)
    owner, start = np.asarray(lvl.owner, np.int64), np.asarray(lvl.start, np.int64)
    n = tokens.shape[0] if tokens.ndim == 2 else -1
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
  return levels


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



def _check_tree(levels) -> None:
  """Every non-empty node's sequences share one node at each earlier level."""
  for d, (_, lengths, owner, _) in enumerate(levels):
    for j in range(d):
      pairs = np.unique(np.stack([owner, levels[j][2]]), axis=1)
      nodes, counts = np.unique(pairs[0], return_counts=True)
      bad = [int(n) for n, c in zip(nodes, counts) if c > 1 and lengths[n]]
      if bad:
        parents = np.unique(levels[j][2][owner == bad[0]]).tolist()
        raise ValueError(f"plan level {d} node {bad[0]} has sequences under different "
                         f"level-{j} nodes {parents}: not a tree")


def _packed_pass(tokens, lengths, start, plan_row, width: int, capacity: int, anc: tuple,
                 step_tokens: int, bk) -> _PackedPass:
  """The per-sequence pass packed: each shard's suffixes (tokens [B, >= lengths], lengths,
  start [B] by plan row) first-fit into rows of `width` slots; the shards' row count is
  bucketed (the policy's grid) and cut into equal steps of at most step_tokens // width rows
  (at least one). A sequence's suffix lies in one row, so no step depends on another."""
  data, per = plan_row.shape
  packs = [packing.pack(lengths[plan_row[s]], width=width) for s in range(data)]
  rows = max(pk.rows for pk in packs)
  # Bucketed like a level's node count (the policy's floor, min_nodes), with at least two
  # steps an octave: the packed rows stand in for the batch's rows, whose sizes the offline
  # scheduler pads on that grid (a coarser one would waste up to half the rows).
  rows = rows if not bk.steps else buckets_lib.round_up(rows, steps=max(bk.steps, 2),
                                                        minimum=max(bk.min_nodes, 1))
  steps = -(-rows // max(1, min(step_tokens // width, rows)))
  chunk = -(-rows // steps)
  rows = steps * chunk
  tok = np.zeros((data, rows, width), np.int32)
  seg = np.full((data, rows, width), -1, np.int32)
  pos = np.zeros((data, rows, width), np.int32)
  last_row = np.full((data, per), -1, np.int32)
  last_col = np.zeros((data, per), np.int32)
  for s, pk in enumerate(packs):
    mine = plan_row[s]
    n = lengths[mine]
    t, g, p = packing.pack_tokens(tokens[mine], n, start[mine], pk)
    tok[s, :pk.rows], seg[s, :pk.rows], pos[s, :pk.rows] = t, g, p
    last_row[s] = np.where(n > 0, pk.row, -1)
    last_col[s] = np.maximum(pk.offset + n - 1, 0)
  flat = lambda x: x.reshape((data * x.shape[1],) + x.shape[2:])
  return _PackedPass(flat(tok), flat(seg), flat(pos), start[plan_row.reshape(-1)].astype(
      np.int32), flat(last_row), flat(last_col), anc, per, rows, capacity, chunk)


def layout(plan, seqs, *, data: int = 1, max_new_tokens: int, prefill_chunk: int = 2048,
           attention: str = "hydragen", prefill: str = "auto", keep: bool = False,
           reuse: Optional[KeptNodes] = None, window=None) -> Layout:
  """Checks a SharingPlan against the prompts (input order) and lays it out over `data`
  shards: each shard's rows, its local nodes per shared level (count bucketed), token widths
  and capacities bucketed, and the runtime tables (owners, ancestors, last-token sources).

  prefill: how the per-sequence pass (the unique suffixes) runs: "padded" (each sequence a
  row as wide as the longest suffix, bucketed), "packed" (each shard's suffixes first-fit
  into rows of that width: about sum(lengths) slots instead of B x max(lengths); it needs the
  width <= prefill_chunk, since a row is never cut), or "auto": packed when that runs fewer
  token slots and fits, padded otherwise (decided here from the lengths, so it is part of the
  Signature).

  keep: also index the shared levels' nodes by path (`Layout.index`, for `KeptNodes`);
  reuse: a `KeptNodes` whose levels of the same (node count, capacity) this plan's levels are
  laid into: found nodes keep their local node, the rest take free ones, and only they are
  prefilled (`Layout.reused`; a reused level's pass has the new nodes as rows).

  window: [B] (input order) how many of each sequence's last tokens are forced ones, taken
  in the prefill (`generate(forced_in="prefill")`): they are in its suffix, after its
  prompt; the prompt's last token is then where `last_source` / `last_row` point (for the
  main pass, at `Layout.window_col`)."""
  if prefill not in PREFILL_MODES:
    raise ValueError(f"prefill must be one of {list(PREFILL_MODES)}, got {prefill!r}")
  b = len(seqs)
  bk = getattr(plan, "buckets", None) or _BUCKETS     # the plan's padding policy flows here
  order = np.asarray(plan.order, np.int64)
  if order.shape != (b,) or sorted(order.tolist()) != list(range(b)):
    raise ValueError(f"plan.order must be a permutation of range({b}), got {order.tolist()}")
  levels = _plan_levels(plan, b)
  check_plan_paths(plan, seqs, levels, order)
  _check_tree(levels)
  plan_row, real = _split_rows(b, data)
  per = plan_row.shape[1]
  local_owner = []       # per level: [data, per] local node of each local row
  passes, replication = [], []
  index, reused, reused_tokens = [], [], 0
  for d, (tokens, lengths, owner, start) in enumerate(levels):
    nodes = [np.unique(owner[plan_row[s]]) for s in range(data)]
    n_loc = bk.nodes(max(len(u) for u in nodes))
    union = np.unique(np.concatenate(nodes))
    width = bk.tokens(int(lengths[union].max(initial=0)))
    keys = {}
    if keep or reuse is not None:
      first_row = dict(zip(*np.unique(owner, return_index=True)))
      keys = {int(u): path_key(seqs[order[first_row[u]]][:start[u] + lengths[u]])
              for u in union if lengths[u]}
    # Local node positions: in node order, except that nodes found in a kept level of the
    # same shape keep their place there (the level is then updated in place).
    pos = [np.arange(len(u)) for u in nodes]
    hits = [np.zeros(len(u), bool) for u in nodes]
    cap = level_capacity(_chunked(tokens[union[:1]], width, prefill_chunk, n_loc)[0].shape[1])
    if reuse is not None and d < len(reuse.shapes) and reuse.levels[d] is not None \
        and tuple(reuse.shapes[d]) == (n_loc, cap):
      for s, u in enumerate(nodes):
        found = [reuse.index[d][s].get(keys.get(int(x))) for x in u]
        hits[s] = np.array([f is not None for f in found], bool)
        free = iter(sorted(set(range(n_loc)) - {f for f in found if f is not None}))
        pos[s] = np.array([f if f is not None else next(free) for f in found], np.int64)
    reuse_level = any(h.any() for h in hits)
    glob = np.zeros((data, n_loc), np.int64)
    used = np.zeros((data, n_loc), bool)
    mine = np.zeros((data, per), np.int64)
    anc = np.zeros((d, data, n_loc), np.int32)
    for s, u in enumerate(nodes):
      glob[s, pos[s]] = u
      used[s, pos[s]] = True
      mine[s] = pos[s][np.searchsorted(u, owner[plan_row[s]])]
      local, first_row = np.unique(mine[s], return_index=True)   # one row of each node
      for j in range(d):
        anc[j, s, local] = local_owner[j][s][first_row]
    local_owner.append(mine)
    if keep:
      index.append(tuple({keys[int(glob[s, p])]: int(p) for p in range(n_loc)
                          if used[s, p] and int(glob[s, p]) in keys} for s in range(data)))
    if not reuse_level:
      flat, ok = glob.reshape(-1), used.reshape(-1)
      padded, c = _chunked(tokens[flat], width, prefill_chunk, n_loc)
      passes.append(_Pass(
          np.where(ok[:, None], padded, 0).astype(np.int32),
          np.where(ok, lengths[flat], 0).astype(np.int32),
          np.where(ok, start[flat], 0).astype(np.int32),
          tuple(a.reshape(-1) for a in anc), n_loc, level_capacity(padded.shape[1]), c))
    else:
      # Only the level's new non-empty nodes are prefilled, into rows of their own.
      reused.append(d)
      reused_tokens += int(sum(lengths[u[h]].sum() for u, h in zip(nodes, hits)))
      new = [[(int(x), int(p)) for x, p, h in zip(u, pos[s], hits[s]) if not h and lengths[x]]
             for s, u in enumerate(nodes)]
      most = max(len(n) for n in new)
      r = min(n_loc, bk.nodes(most)) if most else 0
      node = np.zeros((data, r), np.int64)
      # Padding rows get destinations of their own past the level (dropped), so that the
      # scatters writing the new nodes have unique indices (`_make_prefill`).
      dest = np.broadcast_to(n_loc + np.arange(r, dtype=np.int32), (data, r)).copy()
      real_row = np.zeros((data, r), bool)
      for s, n in enumerate(new):
        for i, (x, p) in enumerate(n):
          node[s, i], dest[s, i], real_row[s, i] = x, p, True
      flat, ok = node.reshape(-1), real_row.reshape(-1)
      new_width = bk.tokens(int(lengths[flat[ok]].max(initial=1)))
      padded, c = (_chunked(tokens[flat], new_width, prefill_chunk, r) if r
                   else (np.zeros((0, 1), np.int32), 1))
      rows_anc = tuple(np.take_along_axis(a, np.minimum(dest, n_loc - 1), axis=1).reshape(-1)
                       for a in anc)
      passes.append(_Pass(
          np.where(ok[:, None], padded, 0).astype(np.int32),
          np.where(ok, lengths[flat], 0).astype(np.int32),
          np.where(ok, start[flat], 0).astype(np.int32),
          rows_anc, r, max(cap, padded.shape[1]), c, storage=(n_loc, cap),
          dest=dest.reshape(-1),
          storage_lengths=np.where(used, lengths[glob], 0).reshape(-1).astype(np.int32)))
    replication.append(sum(len(u) for u in nodes) / max(len(np.unique(owner)), 1))
  rows = plan_row.reshape(-1)
  suf_tokens = np.asarray(plan.suffix_tokens)
  suf_len = np.asarray(plan.suffix_lengths, np.int64)
  suf_start = np.asarray(plan.suffix_start, np.int64)
  prompt_lengths = np.array([len(seqs[order[i]]) for i in rows], np.int32)
  padded, c = _chunked(suf_tokens[rows], bk.tokens(int(suf_len.max(initial=0))),
                       prefill_chunk, per)
  seq_owner = tuple(lo.reshape(-1).astype(np.int32) for lo in local_owner)
  # Capacity from the bucketed prompt part, so that it adds no signatures of its own.
  if attention == "replicated":    # whole prompt + new tokens in each sequence's cache
    held, anc = bk.tokens(int(prompt_lengths.max())), ()
  else:
    held, anc = bk.tokens(int(suf_len.max(initial=0))), seq_owner
  capacity = max(padded.shape[1], bk.tokens(held + max_new_tokens - 1))
  main = _Pass(padded, suf_len[rows].astype(np.int32), suf_start[rows].astype(np.int32), anc,
               per, capacity, c)
  padded_slots = main.slots
  if prefill != "padded":
    width = bk.tokens(int(suf_len.max(initial=0)))
    if width > prefill_chunk and prefill == "packed":
      raise ValueError(f"prefill='packed' runs whole packed rows of W={width} tokens (the "
                       f"longest suffix, bucketed) per step, more than prefill_chunk="
                       f"{prefill_chunk}: raise prefill_chunk or use prefill='padded'")
    if width <= prefill_chunk:
      packed = _packed_pass(suf_tokens, suf_len, suf_start, plan_row, width,
                            capacity, anc, prefill_chunk, bk)
      if prefill == "packed" or packed.slots < main.slots:
        main = packed
  # The prompt's own suffix: all of it, or what precedes the forced tokens taken in prefill.
  forced = np.zeros((b,), np.int64) if window is None else \
      np.asarray(window, np.int64)[order]
  if forced.shape != (b,) or (forced < 0).any() or (forced > suf_len).any():
    raise ValueError(f"window must give each sequence's forced tokens, at most its suffix "
                     f"({suf_len.tolist()}), got {np.asarray(window).tolist()}")
  prompt_suf = suf_len - forced
  window_col = None
  if window is not None:   # the main pass's column of each row's last prompt token
    window_col = ((main.last_col - forced[rows]) if isinstance(main, _PackedPass)
                  else prompt_suf[rows] - 1).astype(np.int32)
  last_source = np.full((data * per,), -1, np.int32)
  last_row = np.zeros((data * per,), np.int32)
  for i, r in enumerate(rows):
    if prompt_suf[r] == 0:   # the prompt ends inside its deepest non-empty node
      for d in reversed(range(len(levels))):
        if levels[d][1][levels[d][2][r]] > 0:
          last_source[i], last_row[i] = d, seq_owner[d][i]
          break
  return Layout(attention, tuple(passes), main, seq_owner, last_source, last_row,
                prompt_lengths, plan_row, real, order, tuple(replication), int(max_new_tokens),
                padded_slots, tuple(index), tuple(reused), reused_tokens, window_col)


# ----------------------------------------------------------------------------- prefill / decode


def chunked_prefill(forward_chunk, tokens, lengths, start, own, *, chunk: int, hidden_size: int,
                    dtype, window_col=None, window: int = 0):
  """Runs a prefill pass over tokens [R, W] (W a multiple of `chunk`) in chunks of `chunk`
  tokens per row, under `lax.scan` when there is more than one chunk.

  forward_chunk(tok [R,c], positions [R,c], own, valid [R]) -> (hidden [R,c,E], own): the
  model on one chunk, appending its keys to `own` (or None). lengths [R]: real tokens per row;
  start [R]: the position of each row's first token. Returns (own, last hidden [R,E] of each
  row's last real token); with window = F > 0, (own, hidden [R,F,E] of each row's columns
  window_col [R] + 0..F-1 instead, zeros where a column is outside the row).
  """
  r, width = tokens.shape
  c = chunk
  steps = width // c
  arange_r = jnp.arange(r)
  first = lengths - 1 if not window else window_col
  cols = first[:, None] + jnp.arange(max(window, 1), dtype=jnp.int32)[None, :]   # [R, F]

  def step(carry, xs):
    own, last = carry
    index, tok = xs
    offset = index * c
    positions = start[:, None] + offset + jnp.arange(c, dtype=jnp.int32)[None, :]
    valid = jnp.clip(lengths - offset, 0, c)
    hidden, own = forward_chunk(tok, positions, own, valid)
    idx = cols - offset
    here = (idx >= 0) & (idx < c)
    picked = hidden[arange_r[:, None], jnp.clip(idx, 0, c - 1)]
    return (own, jnp.where(here[..., None], picked, last)), None

  last = jnp.zeros((r, max(window, 1), hidden_size), dtype)
  chunks = tokens.reshape(r, steps, c).transpose(1, 0, 2)
  own, last = _steps(step, (own, last), chunks)
  return own, (last if window else last[:, 0])


def _steps(step, carry, xs):
  """step(carry, (index, xs[i])) -> (carry, None) over the leading axis of xs (a pytree):
  under `lax.scan` when there is more than one step. Returns the final carry."""
  n = jax.tree_util.tree_leaves(xs)[0].shape[0]
  if n == 1:
    return step(carry, (jnp.int32(0), jax.tree_util.tree_map(lambda x: x[0], xs)))[0]
  return lax.scan(step, carry, (jnp.arange(n, dtype=jnp.int32), xs))[0]


def packed_prefill(forward_step, tokens, segments, positions, last_row, last_col, own, *,
                   rows_per_step: int, hidden_size: int, dtype, window_col=None,
                   window: int = 0):
  """Runs a packed pass over tokens, segments, positions [P, W] in steps of rows_per_step
  whole rows (a sequence's suffix lies in one row, so no step reads another's keys).

  forward_step(tok, seg, pos [c,W], own) -> (hidden [c,W,E], own). last_row, last_col [R]: the
  packed row and column of each sequence's last suffix token (row -1: none). Returns (own,
  last hidden [R,E], zeros where a sequence has no suffix); with window = F > 0, (own, hidden
  [R,F,E] of the columns window_col [R] + 0..F-1 of each sequence's packed row instead (zeros
  outside the row; columns before the sequence's own are its neighbour's: the caller masks).
  """
  p, w = tokens.shape
  c = rows_per_step
  first = last_col if not window else window_col
  cols = first[:, None] + jnp.arange(max(window, 1), dtype=jnp.int32)[None, :]   # [R, F]

  def step(carry, xs):
    own, last = carry
    index, (tok, seg, pos) = xs
    hidden, own = forward_step(tok, seg, pos, own)
    here = (last_row >= 0)[:, None] & (last_row // c == index)[:, None] & (cols >= 0) & \
        (cols < w)
    picked = hidden[jnp.clip(last_row - index * c, 0, c - 1)[:, None], jnp.clip(cols, 0, w - 1)]
    return (own, jnp.where(here[..., None], picked, last)), None

  split = lambda x: x.reshape(p // c, c, w)
  last = jnp.zeros((last_row.shape[0], max(window, 1), hidden_size), dtype)
  own, last = _steps(step, (own, last), (split(tokens), split(segments), split(positions)))
  return own, (last if window else last[:, 0])



def _prefill_pass(model, spec: tuple, arrays, shared, own, *, skip: bool, runtime: Runtime,
                  window_col=None, window: int = 0):
  """Runs one prefill pass in chunks, appending to `own` (a LevelKV, or None with skip).

  Row r attends to its nodes of the first len(anc) `shared` levels (anc: per level [R] local
  node, runtime data) and to `own`. Returns (own, last hidden [R,E] of each row's last real
  token), or with window = F > 0 the hidden [R,F,E] of its columns window_col + 0..F-1.
  """
  tokens, lengths, start, anc = arrays[:4]
  levels = tuple(shared[:len(anc)])

  def forward_chunk(tok, positions, own, valid):
    cache = None if skip else KVCache(own, levels, anc)
    hidden, cache = llama_lib.forward(model, tok, positions, cache, valid=valid,
                                      skip_attention=skip, **runtime.forward_kwargs())
    return hidden, None if cache is None else cache.suffix

  return chunked_prefill(forward_chunk, tokens, lengths, start, own, chunk=spec[3],
                         hidden_size=model.config.hidden_size, dtype=model.dtype,
                         window_col=window_col, window=window)


def _packed_prefill_pass(model, spec: tuple, arrays, shared, own, *, skip: bool, fresh: bool,
                         runtime: Runtime, window_col=None, window: int = 0):
  """`_prefill_pass` of a `_PackedPass`: the packed tokens attend to their sequence's nodes
  of the first len(anc) `shared` levels, the keys `own` already holds for them (unless
  fresh: it holds none) and the earlier tokens of their own suffix; their keys are appended
  to `own` by sequence. Returns (own, last hidden [R,E] of each sequence's last suffix
  token), or with window = F > 0 the hidden [R,F,E] of its packed row's columns window_col +
  0..F-1."""
  tokens, segments, positions, _, last_row, last_col, anc = arrays
  levels = tuple(shared[:len(anc)])

  def forward_step(tok, seg, pos, own):
    cache = None if skip else KVCache(own, levels, anc)
    hidden, cache = llama_lib.forward(model, tok, pos, cache, segments=seg, fresh=fresh,
                                      skip_attention=skip, **runtime.forward_kwargs())
    return hidden, None if cache is None else cache.suffix

  return packed_prefill(forward_step, tokens, segments, positions, last_row, last_col, own,
                        rows_per_step=spec[3], hidden_size=model.config.hidden_size,
                        dtype=model.dtype, window_col=window_col, window=window)


def _make_prefill(graphdef, sig: Signature, runtime: Runtime, sampling: dict):
  """prefill(params, inputs, key_data, eos, kept, forced) -> (shared levels held by decode,
  main LevelKV, first tokens, their extras (`_choose`: a dict of [B] arrays, empty unless
  sampling asks for log-probabilities or forced tokens), done, lasts), per data shard;
  key_data [B,...]: each row's PRNG key (`row_keys`); eos is an int32 scalar (-1: none);
  forced: (tokens [B,F], lengths [B]) with sampling["forced"], else None;
  kept: (LevelKV, last hidden [N,E]) of each level laid into a kept one (`KeptNodes`), which
  its new nodes are written into (donated); lasts: per shared level (hydragen) [N,E] the
  hidden state of each node's last token. With sampling["forced"] == "prefill" (the forced
  tokens are in the suffixes, `layout(window=)`), the first tokens are every column's,
  (tokens [B,F], count [B]), and their extras [B,F] (`_take_forced`): nothing is left to
  decode."""
  skip = sig.attention == "none"
  draw, logprobs, then = _split_sampling(sampling)
  window = int(sampling["window"]) if then == "prefill" else 0

  def prefill(params, inputs, key_data, eos, kept, forced):
    model = nnx.merge(graphdef, params)
    config = model.config

    def fresh(spec):
      if skip:
        return None
      return empty_level(config.num_layers, spec[0], spec[2], config.num_kv_heads,
                         config.head_dim, model.dtype)

    shared, lasts = [], []
    kept = iter(kept)
    for spec, arrays in zip(sig.levels, inputs["levels"]):
      if len(spec) > 5:      # a kept level (node count spec[5], capacity spec[6]) updated
        stored, last = next(kept)
        k, v = stored.k, stored.v
        if spec[0]:          # new nodes: prefilled in rows of their own, written in place
          own, new_last = _prefill_pass(model, spec, arrays, shared, fresh(spec), skip=skip,
                                        runtime=runtime)
          dest, cap = arrays[4], spec[6]
          # (unique destinations: XLA's GPU scatter otherwise updates element by element
          # with atomics)
          k = k.at[:, dest].set(own.k[:, :, :cap], mode="drop", unique_indices=True)
          v = v.at[:, dest].set(own.v[:, :, :cap], mode="drop", unique_indices=True)
          last = last.at[dest].set(new_last, mode="drop", unique_indices=True)
        shared.append(LevelKV(k, v, arrays[5]))
        lasts.append(last)
        continue
      own, last = _prefill_pass(model, spec, arrays, shared, fresh(spec), skip=skip,
                                runtime=runtime)
      shared.append(own)
      lasts.append(last)
    main = fresh(sig.main)
    if sig.attention == "replicated" and shared:
      nodes = [(a[0], a[1], a[2]) for a in inputs["levels"]]
      start = inputs["main"][3 if sig.packed_rows else 2]
      main = replicate_nodes(shared, inputs["seq_owner"], nodes, main, start)
    held = tuple(shared) if sig.attention == "hydragen" else ()
    at = dict(window_col=inputs.get("window_col"), window=window)
    if sig.packed_rows:
      # Fresh unless the replicated mode copied each sequence's nodes into its cache first.
      main, last = _packed_prefill_pass(
          model, sig.main, inputs["main"], held, main, skip=skip, runtime=runtime,
          fresh=not (sig.attention == "replicated" and shared), **at)
    else:
      main, last = _prefill_pass(model, sig.main, inputs["main"], held, main, skip=skip,
                                 runtime=runtime, **at)
    hidden, last = (last, last[:, 0]) if window else (None, last)
    source, row = inputs["last_source"], inputs["last_row"]
    for d, node_last in enumerate(lasts):
      picked = node_last[jnp.clip(row, 0, node_last.shape[0] - 1)]
      last = jnp.where((source == d)[:, None], picked, last)
    keys = jax.random.wrap_key_data(key_data)
    lasts = tuple(lasts) if held else ()
    if window:
      first, extras, done = _take_forced(model, hidden.at[:, 0].set(last), keys, forced, eos,
                                         draw, logprobs)
      return held, main, first, extras, done, lasts
    first, extras = _choose(llama_lib.logits(model, last), _draw_keys(keys, 0), 0, forced,
                            draw, logprobs)
    return held, main, first, extras, _ends(first, 0, eos, forced, then), lasts

  return prefill


def _make_decode(graphdef, sig: Signature, runtime: Runtime, sampling: dict):
  """decode(params, shared, suffix, owners, first, done, key_data, prompt_lengths, eos, pad,
  forced) -> (tokens [B,max_new], extras (as the prefill's, each [B,max_new]: column 0 and
  columns past a row's end hold `_EXTRAS`' empty value), n [B], steps, suffix), per data
  shard; one lax.while_loop, stopping when every row of every shard is done. eos (-1: none)
  and pad are int32 scalars; key_data, forced: as the prefill's (the token at column i is
  drawn with the row's key folded with i, or forced).

  Each iteration runs C = `runtime.check_every` steps (an inner loop of a known trip count,
  which XLA runs without a host round trip) and then checks. Steps past max_new_tokens (at
  most C - 1, in the last iteration) are run and discarded: their tokens land in columns past
  max_new (cut off), they count nothing, and their keys go to the per-sequence cache's last
  slot at most (its lengths are capped at S - 1 before each step, which a real step never
  reaches: the cache holds its keys and max_new - 1 more), so they read and write in bounds.
  The returned suffix then holds those discarded steps' keys too; steps counts every step run.
  """
  skip = sig.attention == "none"
  max_new = sig.max_new_tokens
  every = runtime.check_every
  draw, logprobs, then = _split_sampling(sampling)
  names = [k for k, on in (("logprobs", logprobs), ("drawn", then is not None)) if on]

  def decode(params, shared, suffix, owners, first, done, key_data, plen, eos, pad, forced):
    model = nnx.merge(graphdef, params)
    keys = jax.random.wrap_key_data(key_data)
    b = first.shape[0]
    out = jnp.full((b, max_new + every - 1), pad, jnp.int32).at[:, 0].set(first)
    extras = {k: jnp.full((b, max_new + every - 1), _EXTRAS[k][1], _EXTRAS[k][0])
              for k in names}
    count = jnp.ones((b,), jnp.int32)

    def cond(carry):
      return (carry[0] < max_new) & ~carry[-1]

    def step(carry):
      i, out, extras, last, done, count, suffix = carry
      positions = (plen + i - 1)[:, None]
      if suffix is not None and every > 1:
        suffix = LevelKV(suffix.k, suffix.v,
                         jnp.minimum(suffix.lengths, suffix.k.shape[2] - 1))
      cache = None if skip else KVCache(suffix, shared, owners)
      hidden, cache = llama_lib.forward(model, last[:, None], positions, cache,
                                        skip_attention=skip, **runtime.forward_kwargs())
      tok, now = _choose(llama_lib.logits(model, hidden[:, 0]), _draw_keys(keys, i), i,
                         forced, draw, logprobs)
      tok, now, count, done = _taken(tok, now, ~done & (i < max_new), done, count, i, eos,
                                     pad, forced, then)
      extras = {k: lax.dynamic_update_slice(extras[k], now[k][:, None], (0, i)) for k in names}
      out = lax.dynamic_update_slice(out, tok[:, None], (0, i))
      suffix = None if cache is None else cache.suffix
      return i + 1, out, extras, tok, done, count, suffix

    def body(carry):
      state = carry[:-1]
      state = step(state) if every == 1 else \
          lax.fori_loop(0, every, lambda _, s: step(s), state)
      return state + (runtime.all_done(state[4]),)

    carry = (jnp.int32(1), out, extras, first, done, count, suffix, runtime.all_done(done))
    steps, out, extras, _, _, count, suffix, _ = lax.while_loop(cond, body, carry)
    return (out[:, :max_new], {k: v[:, :max_new] for k, v in extras.items()}, count,
            steps - 1, suffix)

  return decode


def replicate_nodes(shared, owners, level_inputs, full: LevelKV, prefix_lengths) -> LevelKV:
  """Copies each sequence's shared nodes into its own cache `full` [L,B,S,K,D] at their
  positions (the replicated baseline's layout); lengths become prefix_lengths [B]. owners: per
  shared level, [B] node of each row (concrete or traced: a gather needs no static grouping).
"""
  b = full.k.shape[1]
  rows = jnp.arange(b)[:, None]
  k, v = full.k, full.v
  for lvl, owner, (_, node_lengths, node_start) in zip(shared, owners, level_inputs):
    t = jnp.arange(lvl.capacity, dtype=jnp.int32)[None, :]
    # Slots of the node's valid keys; padding goes out of range, a slot of its own, and is
    # dropped: the indices stay unique and sorted, which the scatters are told (XLA's GPU
    # scatter otherwise updates element by element with atomics).
    slots = jnp.where(t < node_lengths[owner][:, None], node_start[owner][:, None] + t,
                      full.capacity + t)

    def copy(layer, kv, lvl=lvl, owner=owner, slots=slots):
      k, v = kv
      src_k = lax.dynamic_index_in_dim(lvl.k, layer, keepdims=False)[owner]
      src_v = lax.dynamic_index_in_dim(lvl.v, layer, keepdims=False)[owner]
      hints = dict(mode="drop", unique_indices=True, indices_are_sorted=True)
      return (k.at[layer, rows, slots].set(src_k, **hints),
              v.at[layer, rows, slots].set(src_v, **hints))
    k, v = lax.fori_loop(0, k.shape[0], copy, (k, v))
  return LevelKV(k, v, prefix_lengths.astype(jnp.int32))



def _specs(sig: Signature):
  """shard_map specs (manual axis "data" only) of prefill's and decode's arguments and
  results: rows first everywhere, caches [L,N,S,K,D] with N over data."""
  rows, one = P(_DATA), P()
  level = None if sig.attention == "none" else LevelKV(P(None, _DATA), P(None, _DATA), rows)
  held = tuple(level for _ in sig.levels) if sig.attention == "hydragen" else ()
  owners = tuple(rows for _ in sig.levels) if sig.attention == "hydragen" else ()
  return rows, one, level, held, owners


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


class _Compiled:
  """A small least-recently-used cache of compiled (prefill, decode) executables, keyed by the
  signature, the runtime and the model's structure; counts compilations. Each program is also
  found on its own (`program`): prefills by that key, decode loops by their own key
  (`_decode_signature`), so plans that differ only in how they prefill (a level laid into a
  kept one, packed or padded suffixes) share one. Thread-safe: compile jobs
  (`compile_jobs`) may fill it from other threads while `generate` runs; a program is
  compiled by one thread at a time (`lock`, see `_program`), never twice."""

  def __init__(self, size: int):
    self.size = size
    self.items: "collections.OrderedDict" = collections.OrderedDict()   # completed calls
    self.prefills: "collections.OrderedDict" = collections.OrderedDict()
    self.decodes: "collections.OrderedDict" = collections.OrderedDict()
    self.compilations = 0
    self._guard = threading.Lock()
    self._locks: dict = {}

  def lock(self, table: str, key) -> threading.Lock:
    """The lock held while the program of `key` in `table` is looked up and, if missing,
    compiled."""
    with self._guard:
      return self._locks.setdefault((table, key), threading.Lock())

  def program(self, table: str, key):
    """The program of `key` in `table` ("prefills" by key, completed calls' included;
    "decodes" by decode key), or None."""
    with self._guard:
      if table == "prefills" and key in self.items:
        self.items.move_to_end(key)
        return self.items[key][0]
      return getattr(self, table).get(key)

  def get(self, key, decode_key=None):
    with self._guard:
      if key in self.items:
        self.items.move_to_end(key)
        return list(self.items[key])
      return [self.prefills.get(key), self.decodes.get(decode_key)]

  def _bounded(self, table, key, value):
    table[key] = value
    table.move_to_end(key)
    while len(table) > self.size:
      table.popitem(last=False)

  def put(self, key, value, decode_key=None):
    with self._guard:
      self._bounded(self.items, key, value)
      if value[0] is not None:
        self._bounded(self.prefills, key, value[0])
      if decode_key is not None and value[1] is not None:
        self._bounded(self.decodes, decode_key, value[1])

  def put_program(self, table: str, key, program):
    """Records one program ("prefills" by key, "decodes" by decode key) as soon as it exists."""
    with self._guard:
      self._bounded(getattr(self, table), key, program)

  def compile(self, stage, *args, options: Optional[dict] = None):
    """stage.lower(*args) compiled: a jitted function with its arguments (arrays or their
    shapes), or a traced one (`jax.stages.Traced`) without."""
    with self._guard:
      self.compilations += 1
    return stage.lower(*args).compile(compiler_options=options)

  def clear(self):
    with self._guard:
      self.items.clear()
      self.prefills.clear()
      self.decodes.clear()
      self._locks.clear()


_EXECUTABLES = _Compiled(8)


def clear_compiled_cache() -> None:
  """Drops the compiled executables that `generate` keeps for reuse."""
  _EXECUTABLES.clear()


def compiled_cache_info() -> tuple:
  """(executable pairs held, compilations since the process started)."""
  return len(_EXECUTABLES.items), _EXECUTABLES.compilations


def _executable_key(graphdef, params, sig: Signature, runtime: Runtime, sampling: dict):
  leaves, treedef = jax.tree_util.tree_flatten(params)
  return (sig, runtime, graphdef, treedef, tuple((x.shape, str(x.dtype)) for x in leaves),
          tuple(sorted((k, str(v)) for k, v in sampling.items())))


def _prefill_jit(graphdef, sig: Signature, runtime: Runtime, sampling: dict, inputs, kept):
  """The prefill of `sig`, jitted (its kept levels donated); inputs and kept: its arguments
  (arrays or their shapes), for their specs."""
  rows_spec, one, level_spec, held_spec, _ = _specs(sig)
  kept_spec = tuple((level_spec, rows_spec) for _ in kept)
  lasts_spec = tuple(rows_spec for _ in held_spec)
  fn = runtime.wrap(_make_prefill(graphdef, sig, runtime, sampling),
                    in_specs=(one, jax.tree_util.tree_map(lambda _: rows_spec, inputs),
                              rows_spec, one, kept_spec, rows_spec),
                    out_specs=(held_spec, level_spec, rows_spec, rows_spec, rows_spec,
                               lasts_spec))
  return jax.jit(_checked(runtime, fn), donate_argnums=(4,))


def _decode_jit(graphdef, sig: Signature, runtime: Runtime, sampling: dict):
  """The decode loop of `sig`, jitted (its suffix cache donated)."""
  rows_spec, one, level_spec, held_spec, owner_spec = _specs(sig)
  fn = runtime.wrap(_make_decode(graphdef, sig, runtime, sampling),
                    in_specs=(one, held_spec, level_spec, owner_spec, rows_spec,
                              rows_spec, rows_spec, rows_spec, one, one, rows_spec),
                    out_specs=(rows_spec, rows_spec, rows_spec, one, level_spec))
  return jax.jit(_checked(runtime, fn), donate_argnums=(2,))


def _program(table: str, key, stage, args: tuple, runtime: Runtime, *,
             wait: bool = True) -> tuple:
  """(The compiled program of `key` in `table`, seconds spent compiling it here): cached, or
  compiled here from `stage.lower(*args)` (`_Compiled.compile`) while this thread holds its
  lock. A thread that finds another compiling it waits for that program (wait=True, what a
  call that is about to run it needs) or gets (None, 0.0) at once (wait=False: a compile job
  (`compile_jobs`), which has other work to get on with)."""
  lock = _EXECUTABLES.lock(table, key)
  if not lock.acquire(blocking=wait):
    return None, 0.0
  try:
    program = _EXECUTABLES.program(table, key)
    if program is not None:
      return program, 0.0
    t0 = time.perf_counter()
    program = _EXECUTABLES.compile(stage, *args, options=runtime.compiler_options())
    _EXECUTABLES.put_program(table, key, program)
    return program, time.perf_counter() - t0
  finally:
    lock.release()


def _job(table: str, key, stage, args: tuple, runtime: Runtime) -> float:
  """A `CompileJobs` job: the seconds this thread compiled the program of `key` in `table`."""
  return _program(table, key, stage, args, runtime, wait=False)[1]


def _decode_job(graphdef, sig: Signature, runtime: Runtime, sampling: dict, decode_key,
                prefill_out, params, owners, key, prompt_lengths, eos, pad, forced=None):
  """A `_job` that compiles the decode loop of `decode_key` from the prefill's output shapes
  (`out_info` of the traced or compiled prefill) and the decode's other arguments (arrays or
  their shapes), without running the prefill."""
  if runtime.checks == "runtime":
    prefill_out = prefill_out[1]      # checkify's (error, outputs)
  held, suffix, first, _, done, _ = prefill_out
  return functools.partial(_job, "decodes", decode_key,
                           _decode_jit(graphdef, sig, runtime, sampling),
                           (params, held, suffix, owners, first, done, key, prompt_lengths,
                            eos, pad, forced), runtime)


def _compile_beside(job: Callable[[], float]) -> None:
  """Runs the decode's compile `job` on a thread of its own while the caller goes on
  (`generate` compiles its prefill meanwhile, then waits for this program under its lock, or
  compiles it itself if this thread has not begun). A failure here is logged once; the
  caller then compiles the program itself and meets the error where it is handled."""
  def work():
    try:
      job()
    except Exception as e:      # noqa: BLE001 (the caller compiles it again and raises)
      log_once(("compile-beside", type(e).__name__), "hydrax.engine: compiling the decode "
               "beside the prefill failed (%s: %s); generate compiles it itself",
               type(e).__name__, str(e)[:200])
  threading.Thread(target=work, name="hydrax-compile-decode", daemon=True).start()


class CompileJobs(NamedTuple):
  """What `compile_jobs` returns. prefill / decode: a job that compiles that program into the
  cache `generate` reads, a callable without arguments returning the seconds it compiled
  (0.0 when the program is there by then, or when another thread is compiling it right then:
  that is left to that thread, not waited for); None when the program is cached already or
  not needed (no decode for max_new_tokens=1). kept: with keep=True the shapes of the levels
  `generate` would keep, a `KeptNodes` of abstract arrays to pass as the next call's reuse=;
  else None."""
  prefill: Optional[Callable[[], float]]
  decode: Optional[Callable[[], float]]
  kept: Optional[KeptNodes]


def _runtime_of(runtime, backend="auto", mesh=None, checks="static", unroll=1) -> Runtime:
  """The Runtime a call runs with: `runtime` given whole, or one built from the arguments it
  stands for (which must then be left at their defaults)."""
  if runtime is None:
    return Runtime.build(backend, mesh, checks, unroll)
  if not isinstance(runtime, Runtime) or (backend, mesh, checks, unroll) != \
      ("auto", None, "static", 1):
    raise ValueError(f"runtime= must be a Runtime, given instead of backend=, mesh=, checks= "
                     f"and unroll=; got runtime={runtime!r} with backend={backend!r}, "
                     f"mesh={mesh!r}, checks={checks!r}, unroll={unroll!r}")
  return runtime


def compile_jobs(model, params, prompts=None, *, max_new_tokens: int,
                 attention: str = "hydragen", temperature: float = 0.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None,
                 max_len: Optional[int] = None, prefill_chunk: int = 2048, backend="auto",
                 sharing_options: Optional[dict] = None, prefill: str = "auto",
                 keep: bool = False, reuse: Optional[KeptNodes] = None,
                 runtime: Optional[Runtime] = None, logprobs: bool = False,
                 forced=None, stop_after_forced: bool = False,
                 forced_in: str = "decode") -> CompileJobs:
  """The prefill and decode programs that `generate` with the same arguments would run (one
  device, static checks), as jobs that compile one program each, on any thread and in any
  order; nothing is compiled or run here. The shapes the decode is compiled for and those of
  the kept levels are traced from the prefill (`jax.jit(...).trace`), not read from its
  compiled program, so the decode can compile beside the prefill, and a chain of calls that
  hand their levels on (reuse= this call's kept) can be followed before any of its programs
  exists. `hydrax.generate.run(compile_ahead=True)` runs later batches' jobs on compiling
  threads while earlier batches run; `precompile` runs them in turn. runtime: as `generate`'s
  (given whole instead of backend=; one device); logprobs, forced, stop_after_forced,
  forced_in: as `generate`'s."""
  runtime = _runtime_of(runtime, backend)
  graphdef, params, config = resolve_model(model, params)
  _check_forced_in(forced_in, forced, stop_after_forced)
  if runtime.data != 1:
    raise ValueError("compiling ahead runs on one device (generate compiles on a mesh itself)")
  seqs, lay = _prepare(config, prompts, max_new_tokens=max_new_tokens, attention=attention,
                       max_len=max_len, prefill_chunk=prefill_chunk, tokenizer=None,
                       sharing_options=sharing_options, prefill=prefill, keep=keep,
                       reuse=reuse, forced=forced, forced_in=forced_in)
  kept_in = reuse.take(lay.reused) if reuse is not None else ()
  sig = lay.signature()
  sampling = dict(temperature=float(temperature), top_k=top_k, top_p=top_p,
                  nucleus=runtime.nucleus,
                  logprobs=bool(logprobs))
  forced = _forced_inputs(forced, stop_after_forced, lay, max_new_tokens, config, sampling,
                         forced_in)
  key = _executable_key(graphdef, params, sig, runtime, sampling)
  decode_key = ("decode", _decode_signature(sig)) + key[1:]
  inputs = lay.inputs()
  keys = np.zeros((lay.plan_row.size,) + _KEY_DATA.shape, _KEY_DATA.dtype)   # shape only
  scalar = np.int32(0)
  compiled = _EXECUTABLES.get(key, decode_key)
  prefill_job = decode_job = None
  if compiled[0] is None:
    traced = _prefill_jit(graphdef, sig, runtime, sampling, inputs, kept_in).trace(
        params, inputs, keys, scalar, kept_in, forced)
    prefill_job = functools.partial(_job, "prefills", key, traced, (), runtime)
    prefill_out = traced.out_info
  else:
    prefill_out = compiled[0].out_info
  if sig.max_new_tokens > 1 and compiled[1] is None:
    owners = inputs["seq_owner"] if sig.attention == "hydragen" else ()
    decode_job = _decode_job(graphdef, sig, runtime, sampling, decode_key, prefill_out,
                             params, owners, keys, lay.prompt_lengths, scalar, scalar,
                             forced)
  held, _, _, _, _, lasts = prefill_out
  kept = None
  if keep:
    kept = KeptNodes(levels=list(held), lasts=list(lasts), index=lay.index,
                     shapes=tuple((p.storage or (p.rows, p.capacity))[:2] for p in lay.levels),
                     data=1)
  return CompileJobs(prefill_job, decode_job, kept)


def precompile(model, params, prompts=None, **options) -> tuple:
  """Compiles the prefill and decode programs that `generate` with the same arguments
  (`options`: `compile_jobs`' keywords) would run, without running them, into the cache that
  `generate` reads: the jobs of `compile_jobs`, run here in turn (a program another thread is
  compiling right then is left to it, not waited for). With keep=True it also returns the
  shapes of the levels `generate` would keep, as a `KeptNodes` of abstract arrays, to pass as
  the next call's reuse= (a chain of batches that hand their levels on).

  Returns (seconds spent compiling here, 0 when everything was cached; that KeptNodes or
  None)."""
  jobs = compile_jobs(model, params, prompts, **options)
  return sum(job() for job in (jobs.prefill, jobs.decode) if job is not None), jobs.kept


def _decode_signature(sig: Signature) -> tuple:
  """What the decode loop's program depends on in a Signature: the shared levels' stored
  shapes (nodes, capacity per shard), the rows and the suffix capacity, max_new_tokens."""
  stored = tuple((s[5], s[6]) if len(s) > 5 else (s[0], s[2]) for s in sig.levels)
  return (sig.attention, sig.data, sig.rows, stored, sig.main[0], sig.main[2],
          sig.max_new_tokens)


class _ForcedSuffixes(NamedTuple):
  """A plan whose suffixes end with forced tokens (`generate(forced_in="prefill")`): the
  prompts' shared levels, each suffix followed by its forced tokens."""
  order: np.ndarray
  levels: tuple
  suffix_tokens: np.ndarray
  suffix_lengths: np.ndarray
  suffix_start: np.ndarray
  buckets: Any


def _with_forced(plan, tokens: np.ndarray, lengths: np.ndarray) -> _ForcedSuffixes:
  """`plan` with forced tokens (tokens [B,F], lengths [B], input order) after each suffix."""
  order = np.asarray(plan.order, np.int64)
  old_len = np.asarray(plan.suffix_lengths, np.int64)
  add = lengths[order].astype(np.int64)
  new_len = old_len + add
  old = np.asarray(plan.suffix_tokens)
  out = np.zeros((order.size, max(int(new_len.max(initial=0)), 1)), np.int32)
  for i, b in enumerate(order):
    out[i, :old_len[i]] = old[i, :old_len[i]]
    out[i, old_len[i]:new_len[i]] = tokens[b, :add[i]]
  return _ForcedSuffixes(order, plan.levels, out, new_len.astype(np.int32),
                         np.asarray(plan.suffix_start), getattr(plan, "buckets", None))


def _prepare(config: LlamaConfig, prompts, *, max_new_tokens, attention, max_len,
             prefill_chunk, tokenizer, sharing_options, data: int = 1, prefill: str = "auto",
             keep: bool = False, reuse: Optional[KeptNodes] = None, forced=None,
             forced_in: str = "decode"):
  """Validates the request and lays it out: (sequences in input order, Layout). With
  forced_in="prefill", the prompts are planned and each suffix laid out with its forced
  tokens after it (`layout(window=)`), and nothing is left to decode."""
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
  full, window = seqs, None
  if forced_in == "prefill":
    tokens, window = _forced_arrays(forced, len(seqs), max_new_tokens, config.vocab_size)
    plan = _with_forced(plan, tokens, window)
    full = [np.concatenate([s, tokens[b, :window[b]]]) for b, s in enumerate(seqs)]
    max_new_tokens = 1
  return seqs, layout(plan, full, data=data, max_new_tokens=max_new_tokens,
                      prefill_chunk=int(prefill_chunk), attention=attention, prefill=prefill,
                      keep=keep, reuse=reuse, window=window)


def footprint(config: LlamaConfig, prompts, *, max_new_tokens: int,
              attention: str = "hydragen", dtype=jnp.bfloat16, max_len: Optional[int] = None,
              prefill_chunk: int = 2048, sharing_options: Optional[dict] = None,
              mesh=None, prefill: str = "auto") -> tuple:
  """(kv_bytes, Signature) that `generate` would allocate and compile for this request,
  computed without running anything (same validation and layout; prompts as for `generate`,
  token ids or a plan). Requests of one Signature (and one Runtime) share compiled programs."""
  if not isinstance(config, LlamaConfig):
    raise ValueError(f"config must be a LlamaConfig, got {type(config).__name__}")
  data = 1 if mesh is None else Runtime.build("xla", mesh).data
  _, lay = _prepare(config, prompts, max_new_tokens=max_new_tokens, attention=attention,
                    max_len=max_len, prefill_chunk=prefill_chunk, tokenizer=None,
                    sharing_options=sharing_options, data=data, prefill=prefill)
  return lay.kv_bytes(config, jnp.dtype(dtype)), lay.signature()


def estimate_kv_bytes(config: LlamaConfig, prompts, *, max_new_tokens: int,
                      attention: str = "hydragen", dtype=jnp.bfloat16,
                      max_len: Optional[int] = None, prefill_chunk: int = 2048,
                      sharing_options: Optional[dict] = None, mesh=None) -> int:
  """The `kv_bytes` that `generate` would allocate for this request (`footprint`'s first
  part)."""
  return footprint(config, prompts, max_new_tokens=max_new_tokens, attention=attention,
                   dtype=dtype, max_len=max_len, prefill_chunk=prefill_chunk,
                   sharing_options=sharing_options, mesh=mesh)[0]


def _check_forced_in(forced_in: str, forced, stop_after_forced: bool) -> None:
  if forced_in not in FORCED_IN:
    raise ValueError(f"forced_in must be one of {list(FORCED_IN)}, got {forced_in!r}")
  if forced_in == "prefill" and (forced is None or not stop_after_forced):
    raise ValueError("forced_in='prefill' takes the forced tokens in the prefill and stops "
                     "there: it needs forced= tokens and stop_after_forced=True")


def _forced_width(forced, forced_in: str, max_new_tokens: int) -> int:
  """The forced input's columns: max_new_tokens, or in the prefill (its window: a column of
  logits each) the longest forced sequence rounded up to a power of two (a few programs
  for all lengths), at most max_new_tokens."""
  if forced_in != "prefill" or isinstance(forced, (str, bytes)):
    return int(max_new_tokens)
  longest = max([len(f) for f in forced] + [1])
  return min(int(max_new_tokens), 1 << (longest - 1).bit_length())


def _forced_inputs(forced, stop_after_forced: bool, lay: Layout, max_new_tokens: int,
                   config: LlamaConfig, sampling: dict, forced_in: str = "decode"):
  """The programs' forced input of `forced=` ((tokens [B, width], lengths) in the layout's
  row order; width `_forced_width`), or None without; marks `sampling` (the programs' key)
  with what follows the forced tokens, and where they are taken."""
  if forced is None:
    if stop_after_forced:
      raise ValueError("stop_after_forced=True needs forced= tokens")
    return None
  width = _forced_width(forced, forced_in, max_new_tokens)
  sampling["forced"] = "prefill" if forced_in == "prefill" else \
      "stop" if stop_after_forced else "draw"
  if forced_in == "prefill":
    sampling["window"] = int(width)
  arrays = _forced_arrays(forced, len(lay.order), width, config.vocab_size)
  return tuple(_in_layout_order(lay, a) for a in arrays)


def _forced_arrays(forced, rows: int, width: int, vocab: int):
  """(tokens [B, width] int32, lengths [B] int32) of forced= (a token sequence a prompt, in
  input order, each of at most `width` ids in [0, vocab)); ValueError naming what is wrong."""
  given = type(forced).__name__ if isinstance(forced, (str, bytes)) else len(forced)
  if given != rows:
    raise ValueError(f"forced must give one token sequence a prompt ({rows}), got {given}")
  tokens = np.zeros((rows, width), np.int32)
  lengths = np.zeros((rows,), np.int32)
  for b, seq in enumerate(forced):
    seq = np.asarray(seq)
    if seq.ndim != 1 or (seq.size and seq.dtype.kind not in "iu"):
      raise ValueError(f"forced[{b}] must be a list of token ids, got {seq.dtype} of shape "
                       f"{seq.shape}")
    if seq.size > width:
      raise ValueError(f"forced[{b}] has {seq.size} tokens, more than max_new_tokens={width}")
    if seq.size and not (0 <= seq.min() and seq.max() < vocab):
      raise ValueError(f"forced[{b}] holds ids outside the vocabulary [0, {vocab - 1}]: "
                       f"{seq.min()}..{seq.max()}")
    tokens[b, :seq.size], lengths[b] = seq, seq.size
  return tokens, lengths


def _in_layout_order(lay: Layout, x: np.ndarray) -> np.ndarray:
  """Rows of x [B, ...] (the caller's input order) as the shards' local rows [data*B_l, ...];
  padding rows zero. The inverse of `_in_input_order`."""
  rows, real = lay.plan_row.reshape(-1), lay.real.reshape(-1)
  out = np.zeros((rows.size,) + x.shape[1:], x.dtype)
  out[real] = x[lay.order[rows[real]]]
  return out


def _in_input_order(lay: Layout, x: np.ndarray) -> np.ndarray:
  """Rows of x [data*B_l, ...] (the shards' local rows) in the caller's input order."""
  real = lay.real.reshape(-1)
  plan_order = np.empty((len(lay.order),) + x.shape[1:], x.dtype)
  plan_order[lay.plan_row.reshape(-1)[real]] = x[real]
  out = np.empty_like(plan_order)
  out[lay.order] = plan_order
  return out


def _checked(runtime: Runtime, fn):
  """fn, functionalized by checkify when the runtime checks traced values (checks="runtime"):
  it then returns (error, outputs), which `_run_checked` unpacks."""
  return checkify.checkify(fn) if runtime.checks == "runtime" else fn


def _run_checked(runtime: Runtime, executable, *args):
  """Runs a compiled prefill/decode; with checks="runtime" raises the first failed check
  (a lengths, owner or layer index out of range) after the run."""
  out = executable(*args)
  if runtime.checks == "runtime":
    error, out = out
    error.throw()
  return out


def generate(model, params, prompts=None, *, max_new_tokens: int, attention: str = "hydragen",
             temperature: float = 0.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, eos_id: Optional[int] = None, pad_id: int = 0,
             seed: int = 0, row_seeds=None, max_len: Optional[int] = None,
             prefill_chunk: int = 2048, backend="auto", tokenizer: Any = None,
             sharing_options: Optional[dict] = None,
             mesh=None, checks: str = "static", unroll=1,
             runtime: Optional[Runtime] = None, prefill: str = "auto", keep: bool = False,
             reuse: Optional[KeptNodes] = None, logprobs: bool = False,
             forced=None, stop_after_forced: bool = False,
             forced_in: str = "decode") -> Generation:
  """Generates up to max_new_tokens tokens for each prompt.

  model: a hydrax `Llama` module, its `nnx.GraphDef`, or its `LlamaConfig`; params: its
    nnx.State (None: the module's own parameters). `generate(module, prompts, ...)` is short
    for `generate(module, None, prompts, ...)`.
  prompts: a `hydrax.sharing.SharingPlan`, or a list of token-id sequences (or of strings, with
    `tokenizer`), which are planned by `hydrax.sharing.plan(prompts, **sharing_options)`.
    In every mode the prefill computes each shared node once; the modes differ in the cache
    that decode reads (see the module docstring).
  attention: "hydragen" | "replicated" | "none" (see the module docstring).
  temperature / top_k / top_p: sampling (temperature 0 = greedy). seed, row_seeds: each row
    draws from its own PRNG key, key(seed) folded with its row seed (`row_keys`; row_seeds:
    ints in [0, 2**32), [B] or [B, W] words a prompt, in input order; default its index), and
    its token at column i from that key folded with i. So a row's sampled tokens depend on its
    prompt, seed and row seed only, not on the other rows, the plan's row order, the mesh or
    check_every (up to the float rounding of the logits, which batch shapes and kernels move
    a little: a draw near a tie between two tokens can change with them).
  eos_id: a sequence stops after generating it (None: all generate max_new_tokens); later slots
    hold pad_id. max_len: positions a sequence may reach (prompt + new tokens; default the
    config's max_position_embeddings). prefill_chunk: query tokens (rows x tokens) per
    prefill step per device; bounds the attention scores' memory (~ prefill_chunk * H * keys *
    4 bytes with the XLA backend) at the price of more steps.
  prefill: "auto" | "packed" | "padded": how the unique suffixes are prefilled (Prepacking,
    see `layout`): packed into rows by first-fit bin packing, or padded to the longest each;
    "auto" packs when that runs fewer token slots. Greedy tokens are the same either way; the
    choice is part of the `Signature` (`Generation.prefill` says which ran). On a mesh each
    data shard packs its own sequences (their caches live there).
  backend: attention backend, a name ("auto", "xla", "pallas", ...) or a `Backend` value with
    its kernel configuration (`backends.get("pallas", lowering="triton")`).
  mesh: None (one device), or a ("data", "model") mesh or a spec `hydrax.parallel.make_mesh`
    takes ("2x4", (2, 4), ...): the same loop runs sharded (module docstring). Greedy tokens
    equal the single-device ones up to the float rounding of the all-reduces, and so do
    sampled ones (each row's keys are its own, see seed). K, H and the MLP size must be
    divisible by the model axis.
  checks: "static" or "runtime"; unroll: layers per scan iteration (see `Runtime`).
    runtime: a `Runtime` given whole (then backend, mesh, checks and unroll must be left at
    their defaults).
  sharing_options: keyword arguments of `hydrax.sharing.plan` for plain prompts.
  keep: return the shared levels as `Generation.kept` (hydragen) for a later call's reuse=;
    reuse: a `KeptNodes` from an earlier call (same model, runtime): this plan's nodes found
    there are not prefilled again (`KeptNodes`; `Generation.reused_tokens` counts them). It is
    taken by this call (its arrays are donated), whether or not a level matched.
  logprobs: also return each generated token's log-probability (`Generation.logprobs`; one
    log-sum-exp over the vocabulary a step more; part of the compiled programs' key).
  forced: teacher forcing, a token sequence a prompt (input order; each at most
    max_new_tokens, may be empty): row b takes forced[b] as its first generated tokens
    instead of drawing them (an EOS among them ends it as a drawn one would), then draws as
    usual. `Generation.drawn` says what the sampler drew at every position, so that with
    temperature 0 a forced token is the greedy one where they agree; with logprobs=True, the
    forced tokens' log-probabilities are those of the prompt's continuation (`score`). The
    forced tokens are inputs (new ones compile nothing); forcing is part of the programs' key.
    stop_after_forced: a row ends with its last forced token instead of drawing on (one
    without forced tokens with its first, drawn, token); the loop then stops once every row's
    forced tokens are in, however long max_new_tokens is.
    forced_in: where the forced tokens are taken: "decode" (one a decode step, as above) or,
    with stop_after_forced=True, "prefill": each prompt's suffix is laid out with its forced
    tokens after it (the prompts' shared levels as planned without them) and one prefill
    pass gives every column (the same tokens, drawn and log-probabilities, up to float
    rounding); no decode step runs. A pass over the forced tokens instead of a step a token:
    it suits long forced sequences (`score`'s method).
  Returns a `Generation` (rows in input order). Raises ValueError for bad inputs and
  `OutOfMemoryError` when the device runs out of memory.
  """
  if prompts is None:
    if not isinstance(model, llama_lib.Llama):
      raise ValueError("generate(model, prompts) without params needs a Llama module; pass "
                       "generate(model, params, prompts)")
    params, prompts = None, params
  runtime = _runtime_of(runtime, backend, mesh, checks, unroll)
  graphdef, params, config = resolve_model(model, params)
  if runtime.mesh is not None:
    _mesh_lib()[1].check_model(config, runtime.mesh)
  _check_sampling(temperature, top_k, top_p)
  _check_forced_in(forced_in, forced, stop_after_forced)
  for name, value in (("eos_id", eos_id), ("pad_id", pad_id)):
    if value is not None and not 0 <= int(value) < config.vocab_size:
      raise ValueError(f"{name}={value} is outside the vocabulary [0, {config.vocab_size - 1}]")
  if (keep or reuse is not None) and attention != "hydragen":
    raise ValueError(f"keep= and reuse= keep shared levels, which only attention='hydragen' "
                     f"holds; got attention={attention!r}")
  if reuse is not None:
    if not isinstance(reuse, KeptNodes):
      raise ValueError(f"reuse must be the KeptNodes of an earlier generate(..., keep=True), "
                       f"got {type(reuse).__name__}")
    if reuse.taken:
      raise ValueError("reuse= was already taken by an earlier generate call (its arrays were "
                       "donated to it); pass that call's Generation.kept instead")
    if reuse.data != runtime.data:
      raise ValueError(f"reuse= was kept over {reuse.data} data shards, this call has "
                       f"{runtime.data}")
  seqs, lay = _prepare(config, prompts, max_new_tokens=max_new_tokens, attention=attention,
                       max_len=max_len, prefill_chunk=prefill_chunk, tokenizer=tokenizer,
                       sharing_options=sharing_options, data=runtime.data, prefill=prefill,
                       keep=keep, reuse=reuse, forced=forced, forced_in=forced_in)
  kept_in = reuse.take(lay.reused) if reuse is not None else ()
  sig = lay.signature()
  dtype = jax.tree_util.tree_leaves(params)[0].dtype
  kv = lay.kv_bytes(config, dtype)
  point = (f"attention={attention}, sequences={len(seqs)}, prompt tokens "
           f"{min(map(len, seqs))}..{max(map(len, seqs))}, max_new_tokens={sig.max_new_tokens}, "
           f"shared levels={len(lay.levels)} (replication "
           f"{[round(r, 2) for r in lay.replication]}), kv_bytes={kv:,}, "
           f"dtype={jnp.dtype(dtype)}, prefill={lay.prefill} ({lay.main.slots} slots), "
           f"{runtime.describe()}")
  sampling = dict(temperature=float(temperature), top_k=top_k, top_p=top_p,
                  nucleus=runtime.nucleus,
                  logprobs=bool(logprobs))
  forced = _forced_inputs(forced, stop_after_forced, lay, max_new_tokens, config, sampling,
                         forced_in)
  key = _executable_key(graphdef, params, sig, runtime, sampling)
  decode_key = ("decode", _decode_signature(sig)) + key[1:]
  compiled = _EXECUTABLES.get(key, decode_key)
  rows_spec, one = _specs(sig)[:2]
  # Keys travel as raw data (a row each, sharded with the rows) and scalars as host values
  # placed replicated: global arrays on several hosts too.
  if row_seeds is None:
    row_seeds = np.arange(len(seqs))
  elif len(row_seeds) != len(seqs):
    raise ValueError(f"row_seeds must give one seed a prompt ({len(seqs)}), got "
                     f"{len(row_seeds)}")
  keys = _in_layout_order(lay, row_keys(seed, row_seeds))
  compile_s = decode_s = 0.0
  steps = 0
  with _OOMGuard(point) as guard:
    guard.stage = "placement"
    params = runtime.place_params(params, config)
    host_inputs = lay.inputs()
    inputs = runtime.place(host_inputs, rows_spec)
    plen = runtime.place(lay.prompt_lengths, rows_spec)
    keys = runtime.place(keys, rows_spec)
    forced = None if forced is None else runtime.place(forced, rows_spec)
    eos, pad = runtime.place(
        (np.int32(-1 if eos_id is None else int(eos_id)),
         np.int32(pad_id)), one)
    prefill, decode = compiled
    owners = inputs["seq_owner"] if sig.attention == "hydragen" else ()
    if prefill is None:
      guard.stage = "prefill compilation"
      t0 = time.perf_counter()
      traced = _prefill_jit(graphdef, sig, runtime, sampling, inputs, kept_in).trace(
          params, inputs, keys, eos, kept_in, forced)
      if decode is None and sig.max_new_tokens > 1 and runtime.mesh is None:
        # The decode loop compiles beside the prefill, from the prefill's traced output
        # shapes (on one device; a mesh's placed outputs are known only once it runs).
        _compile_beside(_decode_job(graphdef, sig, runtime, sampling, decode_key,
                                    traced.out_info, params, owners, keys, plen, eos, pad,
                                    forced))
      prefill = _program("prefills", key, traced, (), runtime)[0]
      compile_s += time.perf_counter() - t0
    guard.stage = "prefill"
    t0 = time.perf_counter()
    shared, suffix, first, first_extras, done, lasts = jax.block_until_ready(
        _run_checked(runtime, prefill, params, inputs, keys, eos, kept_in, forced))
    del kept_in
    prefill_s = time.perf_counter() - t0
    if forced_in == "prefill":
      (out, count), extras = first, first_extras
      first_extras = {}
    elif sig.max_new_tokens > 1:
      if decode is None:
        guard.stage = "decode compilation"
        t0 = time.perf_counter()
        decode = _program("decodes", decode_key, _decode_jit(graphdef, sig, runtime, sampling),
                          (params, shared, suffix, owners, first, done, keys, plen, eos,
                           pad, forced), runtime)[0]
        compile_s += time.perf_counter() - t0
      guard.stage = "decode"
      t0 = time.perf_counter()
      out, extras, count, steps, suffix = jax.block_until_ready(_run_checked(
          runtime, decode, params, shared, suffix, owners, first, done, keys, plen, eos,
          pad, forced))
      decode_s = time.perf_counter() - t0
      steps = int(runtime.to_host(steps))
    else:
      out, count = first[:, None], jnp.ones_like(first)
      extras = {k: v[:, None] for k, v in first_extras.items()}
    _EXECUTABLES.put(key, [prefill, decode], decode_key)
    out, count = runtime.to_host(out), runtime.to_host(count)
    extras = {k: np.array(runtime.to_host(v)) for k, v in extras.items()}
    for k, v in first_extras.items():      # column 0: the prefill's
      extras[k][:, 0] = runtime.to_host(v)
    if forced_in == "prefill":     # the window's columns, then max_new_tokens' empty ones
      out = np.where(np.arange(out.shape[1])[None, :] < np.asarray(count)[:, None], out, pad_id)
      wide = lambda x, fill: np.pad(x, ((0, 0), (0, max_new_tokens - x.shape[1])),
                                    constant_values=fill)
      out = wide(out, pad_id)
      extras = {k: wide(v, _EXTRAS[k][1]) for k, v in extras.items()}
  kept = None
  if keep:
    kept = KeptNodes(levels=list(shared), lasts=list(lasts), index=lay.index,
                     shapes=tuple((p.storage or (p.rows, p.capacity))[:2] for p in lay.levels),
                     data=lay.data)
  tokens = _in_input_order(lay, out).astype(np.int32)
  lengths = _in_input_order(lay, count).astype(np.int32)
  extras = {k: _in_input_order(lay, v) for k, v in extras.items()}
  generated = int(lengths.sum())
  texts = None
  if tokenizer is not None:
    texts = [tokenizer.decode(tokens[i, :lengths[i]].tolist()) for i in range(len(seqs))]
  return Generation(
      tokens=tokens, lengths=lengths, prefill_seconds=prefill_s, decode_seconds=decode_s,
      compile_seconds=compile_s,
      decode_tokens_per_second=(generated - len(seqs)) / decode_s if decode_s > 0
      else float("nan"),
      tokens_per_second=generated / (prefill_s + decode_s) if prefill_s + decode_s > 0
      else float("nan"),
      kv_bytes=kv, decode_steps=steps, attention=attention, texts=texts, signature=sig,
      prefill=lay.prefill, prefill_slots=lay.main.slots, padded_slots=lay.padded_slots,
      kept=kept, reused_tokens=lay.reused_tokens, logprobs=extras.get("logprobs"),
      drawn=extras.get("drawn"))


@dataclasses.dataclass
class Scores:
  """Result of `score`, rows in input order.

  logprobs: float32 [B, C] each continuation token's log-probability given its prompt and the
            continuation's tokens before it (NaN past the continuation's length); C is the
            longest continuation.
  lengths:  [B] int32 continuation lengths. total: [B] float the sum of each row's logprobs
            (0.0 for an empty continuation): log p(continuation | prompt).
  greedy:   [B] bool, whether greedy decoding from the prompt produces the continuation (its
            every token the most likely one; ties count as greedy only where argmax picks it).
  generation: the `Generation` of the forced run (timings, signature, drawn tokens).
  """
  logprobs: np.ndarray
  lengths: np.ndarray
  total: np.ndarray
  greedy: np.ndarray
  generation: Generation

  @classmethod
  def of(cls, gen: Generation, lengths) -> "Scores":
    """The scores of a forced generation (`generate(forced=, logprobs=True)` with the
    sampler greedy): lengths [B] the forced tokens of each row, which its first tokens are."""
    lengths = np.asarray(lengths, np.int32)
    inside = np.arange(gen.tokens.shape[1])[None, :] < lengths[:, None]
    logprobs = np.where(inside, gen.logprobs, np.nan).astype(np.float32)
    return cls(logprobs=logprobs, lengths=lengths,
               total=np.where(inside, logprobs, 0.0).sum(axis=1),
               greedy=np.all(~inside | (gen.drawn == gen.tokens), axis=1), generation=gen)


# How `score` takes the continuations (`generate`'s forced_in), the default first.
SCORE_METHODS = ("prefill", "decode")


def score(model, params, prompts=None, continuations=None, *, method: str = "prefill",
          **options) -> Scores:
  """log p(continuation | prompt) of each (prompt, continuation) pair, exactly, with the
  prompts' shared prefixes planned and attended as `generate` does (a few-shot header shared
  by every question, a question shared by its answer choices).

  model, params, prompts: as `generate`'s (`score(module, prompts, continuations)` is short
  for `score(module, None, prompts, continuations)`); continuations: a token-id sequence a
  prompt (may be empty). options: `generate`'s keywords (attention, backend, mesh, runtime,
  sharing_options, prefill, ...) except those `score` sets: max_new_tokens (the longest
  continuation), forced, stop_after_forced, forced_in, logprobs, temperature, top_k, top_p,
  eos_id.

  The continuations are forced tokens (`generate(forced=)`), taken by `method`:
  - "prefill" (the default): after each prompt's suffix in the prefill's per-sequence pass
    (the prompts' shared levels planned as without them), every token scored from that one
    pass, no decode step;
  - "decode": through the decode loop, one token a step for every row at once, each step
    attending its prompt's shared levels in place.
  Both give the same scores up to float rounding. The prefill was faster on an H100 at
  every length measured: 1.10-1.25x with answer choices of 1-4 tokens, 1.66x with 1-32
  (llama3-8b, bf16, random weights; experiments/results/fused_h200/README.md, run 20).
  """
  if continuations is None:
    if not isinstance(model, llama_lib.Llama):
      raise ValueError("score(model, prompts, continuations) without params needs a Llama "
                       "module; pass score(model, params, prompts, continuations)")
    params, prompts, continuations = None, params, prompts
  fixed = sorted(set(options) & {"max_new_tokens", "forced", "stop_after_forced", "forced_in",
                                 "logprobs", "temperature", "top_k", "top_p", "eos_id"})
  if fixed:
    raise ValueError(f"score sets {fixed} itself; leave them out")
  if isinstance(continuations, (str, bytes)) or any(
      isinstance(c, (str, bytes)) for c in continuations):
    raise ValueError("continuations must be token ids (tokenize the prompt and continuation "
                     "together and split them: a continuation's first token may depend on "
                     "the prompt's last)")
  rows = len(prompts.sequences) if is_plan(prompts) else len(prompts)
  if len(continuations) != rows:
    raise ValueError(f"continuations must give one token sequence a prompt ({rows}), got "
                     f"{len(continuations)}")
  if method not in SCORE_METHODS:
    raise ValueError(f"method must be one of {list(SCORE_METHODS)}, got {method!r}")
  lengths = np.array([len(c) for c in continuations], np.int32)
  width = max(1, int(lengths.max(initial=0)))
  gen = generate(model, params, prompts, max_new_tokens=width, forced=continuations,
                 stop_after_forced=True, forced_in=method, logprobs=True, eos_id=None,
                 **options)
  return Scores.of(gen, lengths)
