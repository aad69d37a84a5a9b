"""The `fused` backend: all levels of a decode attention in one persistent native-Triton launch.

Axis letters: B sequences, T queries per sequence, H = K*G query heads, K KV heads, D head dim,
N nodes of a level, S a level's key capacity, L layers of a stacked cache, Lv levels.

`hydragen_attention(q, levels, backend="fused")` hands every level to `all_levels` at once:
a static plan and a run-time work list (`fused_worklist`: shared-level tiles heaviest first,
per-sequence items filling in), then ONE launch of `fused_triton_kernel.fused_decode_kernel`
through `jax_triton.triton_call`, which attends every item, merges each query's partial
results in-kernel (a ticket per sequence and KV head: the last arrival merges) and writes out
[B,T,H,D] and lse [B,T,H]. Owners and lengths are run-time arrays (no recompile per tree);
stacked caches [L,N,S,K,D] are read at `KVLevel.layer` in place (the layer offset is added to
the work list's nodes). No packing, padding or unpacking pass runs around the kernel: q and
out are addressed in their [B,T,H,D] layout.

Cost rule (`Config.mode="auto"`, `fused_worklist.choose_mode`): when sharing saves fewer key
and value bytes than `Config.crossover_bytes` (short prefixes, few sequences), every level is
read per sequence (one item per sequence, KV head and split: the prefix-copied attention
without the copy, and no row sort or tile table); otherwise the shared levels are tiled.

Optional toolchain: `triton` and `jax_triton` are imported here, lazily (this module is
registered with `backends.register_lazy`: `import hydrax` never imports it, nor Triton). When
they are missing (CPU installs; `import jax_triton` raises ImportError on a CPU jaxlib) the
backend reports itself unavailable and each call runs the fallback backend (`Config.fallback`:
"pallas" on a GPU, "xla" elsewhere), logged once. `Config.interpret=True` runs the same kernel
in Triton's interpreter through `jax.pure_callback` (tests on CPU: needs `triton`, CPU `torch`
and TRITON_INTERPRET=1 in the environment before triton is imported; Triton 3.6's interpreter
also needs NumPy < 2.4, whose int() of a 1-element array it relies on).

Not picked by backend="auto" (registered for no platform) until the H200 measurement
(experiments/check_fused_h200.py) shows it faster than the `pallas` backend; ask for it by
name. Gradients recompute every level with the XLA backend.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from hydrax._log import log_once
from hydrax.attention import backends, xla
from hydrax.attention.kernels import fused_worklist as wl

LOG2E = 1.4426950408889634
_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


@dataclasses.dataclass(frozen=True)
class Config:
  """Kernel configuration (frozen, hashable: part of every compile key)."""
  mode: str = "auto"                 # "auto" (cost rule), "shared" or "per_sequence"
  crossover_bytes: int = wl.SHARING_CROSSOVER_BYTES   # measured on the H200, see wl
  block_n: int = 64                  # keys per block
  max_block_m: int = 64              # rows of a shared tile (C sequences x T*G padded)
  # Launch settings; None picks by dtype (`launch_settings`). For 16-bit inputs 4 warps, 3
  # stages, 2 programs per SM: the fastest of 9 settings on the H200 (device time at 4K/256
  # 270 us vs 352 us for 8 warps, 2 stages, 1 program per SM; at 16K/256 427 vs 729 us;
  # experiments/results/fused_h200/run2). Two programs per SM hide one program's load
  # latency behind the other's work across item boundaries. Compiled for sm_90 with the
  # pointer alignment jax-triton declares (tests/attention/fused_interpret_cases.py), the key
  # loop is pipelined (asynchronous copies) and ptxas spills 32 B (shared tiles, 112 KB of
  # shared memory at 3 stages: one such program per SM) or nothing (per-sequence items).
  # float32 keeps 8 warps, 2 stages, 1 program per SM: at 4 warps its IEEE tiles spill 2.3 KB
  # (128 B at 8).
  num_warps: Optional[int] = None
  num_stages: Optional[int] = None
  # Persistent grid = min(items, SMs x this). Key splits fill that many programs; each split
  # adds a partial result per query (scratch traffic), so a split keeps >= 8 key blocks.
  programs_per_sm: Optional[int] = None
  min_blocks_per_split: int = 8
  splits: Optional[int] = None       # force P key splits on every level (tests)
  num_sms: Optional[int] = None      # None: the device's (132 when unknown)
  interpret: Optional[bool] = None   # True: Triton's interpreter (CPU tests); None: GPU only
  fallback: Optional[str] = None     # backend when the toolchain is missing; None: auto

  def __post_init__(self):
    if self.mode not in ("auto", "shared", "per_sequence"):
      raise ValueError(f"mode must be 'auto', 'shared' or 'per_sequence', got {self.mode!r}")
    for name in ("block_n", "max_block_m"):
      val = getattr(self, name)
      if val < 16 or val & (val - 1):
        raise ValueError(f"{name} must be a power of two >= 16, got {val}")
    for name in ("num_warps", "num_stages", "programs_per_sm", "min_blocks_per_split"):
      if getattr(self, name) is not None and getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.fallback == "fused":
      raise ValueError("fallback must be another backend than 'fused'")


LAUNCH_16BIT = dict(num_warps=4, num_stages=3, programs_per_sm=2)
LAUNCH_FLOAT32 = dict(num_warps=8, num_stages=2, programs_per_sm=1)


def launch_settings(cfg: Config, dtype) -> dict:
  """num_warps, num_stages, programs_per_sm of a launch: the Config's, where set, else the
  measured defaults of the dtype (see Config)."""
  base = LAUNCH_FLOAT32 if jnp.dtype(dtype).itemsize == 4 else LAUNCH_16BIT
  return {k: getattr(cfg, k) if getattr(cfg, k) is not None else v for k, v in base.items()}


# --- toolchain -------------------------------------------------------------------------------

def _on_gpu() -> bool:
  return jax.default_backend() in ("gpu", "cuda", "rocm")


@functools.lru_cache(maxsize=None)
def _import_reason(interpret: bool) -> Optional[str]:
  """None when the toolchain of this mode imports, else why not (one line)."""
  names = ("triton", "torch") if interpret else ("triton", "jax_triton")
  for name in names:
    try:
      importlib.import_module(name)
    except Exception as e:  # ImportError, or jax_triton's error on a CPU jaxlib
      return f"cannot import {name}: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
  import triton
  # Triton's interpreter runs only functions decorated while it was on, its own library
  # (tl.max, ...) included: the switch must be set before triton is first imported.
  if interpret and not triton.knobs.runtime.interpret:
    return "Triton's interpreter needs TRITON_INTERPRET=1 set before triton is imported"
  if not interpret and triton.knobs.runtime.interpret:
    return "triton was imported with TRITON_INTERPRET=1 (interpreter only)"
  return None


def unavailable_reason(config: Optional[Config] = None) -> Optional[str]:
  """Why the fused kernel cannot run here with this configuration, or None."""
  cfg = config or Config()
  if not cfg.interpret and not _on_gpu():
    return (f"no GPU (default backend {jax.default_backend()!r}); Config.interpret=True runs "
            "Triton's interpreter")
  return _import_reason(bool(cfg.interpret))


def available(config: Optional[Config] = None) -> bool:
  return unavailable_reason(config) is None


def _kernel_module():
  """The kernel module: Triton-compiled, or interpreted when Triton was imported with
  TRITON_INTERPRET=1 (then every @triton.jit function, Triton's own included, is one)."""
  return importlib.import_module("hydrax.attention.kernels.fused_triton_kernel")


def _fallback(cfg: Config) -> backends.Backend:
  return backends.get(cfg.fallback or ("pallas" if _on_gpu() else "xla"))


def _num_sms(cfg: Config) -> int:
  if cfg.num_sms:
    return int(cfg.num_sms)
  try:
    return int(getattr(jax.devices()[0], "core_count", 0)) or 132
  except Exception:  # pragma: no cover - no device
    return 132


# --- launch ----------------------------------------------------------------------------------

def _to_torch(a):
  import torch
  a = np.ascontiguousarray(a)
  if a.dtype == jnp.bfloat16:
    return torch.from_numpy(a.view(np.uint16).copy()).view(torch.bfloat16)
  return torch.from_numpy(a.copy())


def _from_torch(t, dtype):
  import torch
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(jnp.bfloat16)
  return t.numpy().astype(dtype, copy=False)


def _torch_dtype(dtype):
  import torch
  return {jnp.dtype(jnp.bfloat16): torch.bfloat16, jnp.dtype(jnp.float16): torch.float16,
          jnp.dtype(jnp.float32): torch.float32, jnp.dtype(jnp.int32): torch.int32}[
              jnp.dtype(dtype)]


def _interpret_call(kernel, grid, scalars, out_shapes, constexprs, *arrays):
  """Runs the kernel in Triton's interpreter on host copies (a `jax.pure_callback`). Outputs
  start as NaN (rows the kernel never writes show), the tickets at zero."""
  import torch

  def host(*args):
    ins = [_to_torch(a) for a in args]
    outs = []
    for i, s in enumerate(out_shapes):
      if jnp.issubdtype(s.dtype, jnp.integer):
        outs.append(torch.zeros(s.shape, dtype=_torch_dtype(s.dtype)))
      else:
        outs.append(torch.full(s.shape, float("nan"), dtype=_torch_dtype(s.dtype)))
    kernel[grid](*ins, *scalars, *outs, **constexprs)
    return tuple(_from_torch(o, s.dtype) for o, s in zip(outs, out_shapes))

  return jax.pure_callback(host, tuple(out_shapes), *arrays)


def _launch(cfg: Config, plan: wl.Plan, arrays, scalars, out_shapes, constexprs, dtype):
  """One launch: arrays, then the run-time int scalars, then the outputs (the kernel's
  argument order), constexprs by name."""
  kernel = _kernel_module().fused_decode_kernel
  if cfg.interpret:
    return _interpret_call(kernel, (plan.grid,), scalars, out_shapes, constexprs, *arrays)
  import jax_triton as jt
  launch = launch_settings(cfg, dtype)
  return jt.triton_call(*arrays, *scalars, kernel=kernel, out_shape=list(out_shapes),
                        grid=(plan.grid,),
                        num_warps=launch["num_warps"], num_stages=launch["num_stages"],
                        zeroed_outputs=(len(out_shapes) - 1,), name="hydrax_fused_decode",
                        **constexprs)


def _plan_for(q_shape, kv_heads, dtype, shapes, cfg: Config) -> wl.Plan:
  mode = cfg.mode
  itemsize = jnp.dtype(dtype).itemsize
  if mode == "auto":
    mode = wl.choose_mode(q_shape, shapes, kv_heads, itemsize, cfg.crossover_bytes)
  # float32 tiles hold twice the bytes (and IEEE products): half the rows and keys, so that
  # registers and shared memory stay as for 16-bit types (ptxas spilled 63 KB at 64 x 64).
  shrink = 2 if itemsize == 4 else 1
  return wl.make_plan(q_shape, kv_heads, shapes, mode=mode,
                      block_n=max(16, cfg.block_n // shrink),
                      max_block_m=max(16, cfg.max_block_m // shrink), num_sms=_num_sms(cfg),
                      programs_per_sm=launch_settings(cfg, dtype)["programs_per_sm"],
                      min_blocks_per_split=cfg.min_blocks_per_split, splits=cfg.splits)


def kernel_params(plan: wl.Plan, shapes, q_shape, dtype, scale: float, cfg: Config):
  """(run-time int scalars, constexprs by name) of a launch, in the kernel's argument order;
  unused level slots repeat level 0 (never read)."""
  b, t, h, d = q_shape
  lv = [plan.levels[i if i < len(plan.levels) else 0] for i in range(wl.MAX_LEVELS)]
  caps = [shapes[i if i < len(shapes) else 0].capacity for i in range(wl.MAX_LEVELS)]
  scalars = ([plan.num_items, plan.grid, b, plan.parts] + caps + [x.chunk for x in lv]
             + [x.part_base for x in lv])
  consts = dict(NUM_LEVELS=len(plan.levels), T=t, H=h, K=plan.kv_heads, G=plan.groups, D=d,
                DP=wl.pow2_at_least(d, 16), TGP=plan.tgp, BN=plan.block_n,
                SCALE_LOG2=float(scale) * LOG2E, EXACT=jnp.dtype(dtype) == jnp.float32,
                DOT_UPCAST=bool(cfg.interpret) and jnp.dtype(dtype) != jnp.float32,
                OFF64=max(caps) * plan.kv_heads * d >= 2 ** 31 or
                jnp.dtype(dtype) == jnp.float32,
                **{f"M{i}": x.block_m for i, x in enumerate(lv)})
  return [int(x) for x in scalars], consts


def _forward(q, kvs, limits, owners, layers, *, shapes, scale, cfg: Config, out_dtype):
  """out [B,T,H,D] (out_dtype), lse [B,T,H] f32 of all levels: kvs [(k, v)] (k [N,S,K,D] or
  stacked [L,N,S,K,D] with layers[i] an int32 scalar), limits [[B,T]], owners [[B] or None]."""
  b, t, h, d = q.shape
  kh = kvs[0][0].shape[-2]
  plan = _plan_for(q.shape, kh, q.dtype, shapes, cfg)
  nodes = [s.nodes for s in shapes]
  offsets = [None if layer is None else layer * n for layer, n in zip(layers, nodes)]
  work = wl.work_list(plan, owners, nodes, limits, offsets)
  scratch_rows = b * kh * plan.parts * plan.tgp if plan.parts > 1 else 1
  out_shapes = (jax.ShapeDtypeStruct((b, t, h, d), out_dtype),
                jax.ShapeDtypeStruct((b, t, h), jnp.float32),
                jax.ShapeDtypeStruct((scratch_rows, wl.pow2_at_least(d, 16)), jnp.float32),
                jax.ShapeDtypeStruct((scratch_rows,), jnp.float32),
                jax.ShapeDtypeStruct((b * kh,), jnp.int32))
  kv_args = []
  for i in range(wl.MAX_LEVELS):
    kv_args += list(kvs[i if i < len(kvs) else 0])
  scalars, consts = kernel_params(plan, shapes, q.shape, q.dtype, scale, cfg)
  arrays = [jnp.asarray(work.items, jnp.int32).reshape(-1),
            jnp.asarray(work.orders, jnp.int32).reshape(-1),
            jnp.stack([jnp.asarray(x, jnp.int32) for x in limits]).reshape(-1), q] + kv_args
  out, lse, *_ = _launch(cfg, plan, arrays, scalars, out_shapes, consts, q.dtype)
  return out, lse


def _owner_key(static_owner):
  return None if static_owner is None else tuple(int(x) for x in static_owner)


@functools.partial(jax.jit, static_argnames=("shapes_key", "scale", "cfg", "out_dtype"))
def _forward_jit(q, kvs, limits, owners_dyn, layers, *, shapes_key, scale, cfg, out_dtype):
  shapes = [wl.LevelShape(n, s, has, None if key is None else np.asarray(key, np.int32))
            for n, s, has, key in shapes_key]
  owners = [od if od is not None else (None if not has else np.asarray(key, np.int32))
            for od, (_, _, has, key) in zip(owners_dyn, shapes_key)]
  return _forward(q, kvs, limits, owners, layers, shapes=shapes, scale=scale, cfg=cfg,
                  out_dtype=out_dtype)


def _unsupported_reason(q, kvs) -> Optional[str]:
  if q.dtype not in _DTYPES:
    return f"dtype {q.dtype} (the fused kernel takes bfloat16, float16, float32)"
  if len(kvs) > wl.MAX_LEVELS:
    return f"{len(kvs)} levels (the fused kernel takes at most {wl.MAX_LEVELS} in one launch)"
  return None


def _run(q, kvs, lengths, owners, limits, layers, *, scale, cfg: Config, out_dtype):
  """The fused forward with an XLA-recomputed backward (custom_vjp)."""
  b = q.shape[0]
  shapes = wl.static_plan_inputs([(k.shape, o) for (k, _), o in zip(kvs, owners)], b)
  shapes_key = tuple((s.nodes, s.capacity, s.has_owner, _owner_key(s.static_owner))
                     for s in shapes)
  dyn = [o if (o is not None and s.static_owner is None) else None
         for o, s in zip(owners, shapes)]
  if layers is not None:
    layers = [None if x is None else jnp.asarray(x, jnp.int32) for x in layers]

  def impl(q, kvs, lengths, limits, dyn, layers):
    return _forward_jit(q, kvs, limits, dyn, layers, shapes_key=shapes_key,
                        scale=float(scale), cfg=cfg, out_dtype=out_dtype)

  f = jax.custom_vjp(impl)

  def fwd(*args):
    return impl(*args), args

  def bwd(res, cts):
    q, kvs, lengths, limits, dyn_, layers_ = res
    own = [d if d is not None else o for d, o in zip(dyn_, owners)]

    def ref(q, kvs):
      out, lse = xla.levels_attention(q, kvs, lengths, own, limits, layers_, scale=scale)
      return out.astype(out_dtype), lse

    _, vjp = jax.vjp(ref, q, kvs)
    dq, dkvs = vjp(cts)
    return (dq, dkvs, [None] * len(lengths), [None] * len(limits), [None] * len(dyn_),
            [None] * len(layers_))

  f.defvjp(fwd, bwd)
  lengths = [jnp.asarray(n, jnp.int32) for n in lengths]
  limits = [jnp.asarray(x, jnp.int32) for x in limits]
  return f(q, [tuple(kv) for kv in kvs], lengths, limits, dyn, layers)


def _empty(q):
  b, t, h, _ = q.shape
  return jnp.zeros(q.shape, jnp.float32), jnp.full((b, t, h), -jnp.inf, jnp.float32)


def all_levels(q, levels, limits, *, scale, config: Optional[Config] = None):
  """Every level of `hydragen_attention` in one launch: levels are KVLevels (stacked caches
  read at their layer), limits per level [B,T] int32 (causality folded in). Returns out
  [B,T,H,D] in q's dtype and lse [B,T,H] f32. Raises `backends.Unsupported` for inputs the
  kernel cannot take (the caller runs the levels one by one), with `fallback` set when the
  toolchain is missing here."""
  cfg = config or Config()
  reason = unavailable_reason(cfg)
  if reason is not None:
    raise backends.Unsupported(f"backend 'fused' is unavailable: {reason}",
                               fallback=_fallback(cfg).name)
  kvs = [(lv.k, lv.v) for lv in levels]
  bad = _unsupported_reason(q, kvs)
  if bad is not None:
    raise backends.Unsupported(bad)
  b, t, h, _ = q.shape
  if b == 0 or t == 0:
    out, lse = _empty(q)
    return out.astype(q.dtype), lse
  layers = [lv.layer for lv in levels]
  return _run(q, kvs, [lv.lengths for lv in levels], [lv.owner for lv in levels], limits,
              layers, scale=scale, cfg=cfg, out_dtype=q.dtype)


def level_attention(q, k, v, lengths, owner, limits, *, scale, config: Optional[Config] = None,
                    layer=None):
  """One level through the fused kernel (contract in `hydrax.attention.xla`): out f32. With
  the toolchain missing, the fallback backend runs it (logged once)."""
  cfg = config or Config()
  reason = unavailable_reason(cfg)
  if reason is not None:
    fb = _fallback(cfg)
    log_once(("fused-unavailable", reason, fb.name),
             "hydrax: backend 'fused' is unavailable (%s); using backend %r", reason, fb.name)
    return fb.attend(q, k, v, lengths, owner, limits, scale=scale, layer=layer)
  bad = _unsupported_reason(q, [(k, v)])
  if bad is not None:
    raise backends.Unsupported(bad)
  b, t, _, _ = q.shape
  if b == 0 or t == 0 or k.shape[-3] == 0:
    return _empty(q)
  return _run(q, [(k, v)], [lengths], [owner], [limits], [layer], scale=scale, cfg=cfg,
              out_dtype=jnp.float32)


def configure(**changes) -> backends.Backend:
  """The `fused` backend with these configuration fields replaced (a hashable value)."""
  return backends.get("fused", **changes)


def _available() -> bool:
  return available(Config())


backends.register(backends.Backend("fused", level_attention, platforms=(),
                                   is_available=_available, config=Config(), takes_layer=True,
                                   all_levels=all_levels))
