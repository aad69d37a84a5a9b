"""Registry of attention backends: name -> implementation of one level of attention.

A backend implements `level_attention(q, k, v, lengths, owner, limits, *, scale)` with the
contract written in `hydrax.attention.xla`. It may raise `Unsupported` for an input it cannot
take; the caller then runs the XLA backend for that level and logs the fallback once.

A `Backend` is an immutable, hashable value: its kernel configuration (`config`, a frozen
dataclass, or None) travels with it and is passed to `level_attention` as `config=`, so a
compiled program that closes over a backend is keyed by its configuration; there is no global
kernel state. `get("pallas", lowering="triton")` returns the registered backend with those
configuration fields replaced. A backend with `takes_layer=True` also accepts `layer=`: k and v
are then stacked [L,N,S,K,D] caches and the level is layer `layer` (read in place, no copy);
for other backends the caller slices the layer first.

"auto" picks, for the platform of the default device, the first registered backend that
lists that platform and reports itself available; otherwise "xla".
"""

from __future__ import annotations

import ast
import dataclasses
from typing import Any, Callable, Optional

import jax
from jax import lax

from hydrax._log import log_once
from hydrax.attention import xla


class Unsupported(Exception):
  """Raised by a backend for an input it cannot handle; the caller falls back to XLA.

  From `Backend.all_levels`, the caller runs the levels one by one instead, on the backend
  named by `fallback` (e.g. a kernel whose toolchain is missing here) or else on this one."""

  def __init__(self, reason, fallback: Optional[str] = None):
    super().__init__(reason)
    self.fallback = fallback


def _always() -> bool:
  return True


@dataclasses.dataclass(frozen=True)
class Backend:
  name: str
  level_attention: Callable
  platforms: tuple = ()              # platforms where "auto" may pick it ("gpu", "tpu", ...)
  is_available: Callable[[], bool] = _always
  config: Any = None                 # frozen kernel configuration, passed as config=
  takes_layer: bool = False          # level_attention reads k[layer], v[layer] itself
  # Optional: every level of a call at once, all_levels(q, levels, limits, *, scale[,
  # config]) -> (out [B,T,H,D] in q's dtype, lse [B,T,H] f32); levels are KVLevels (stacked
  # caches read at their layer), limits per level [B,T] int32. hydragen_attention calls it
  # instead of its level loop (a fused kernel: one launch, the merge inside). It may return
  # None: the backend's own choice to run this call level by level (not logged).
  all_levels: Optional[Callable] = None
  # Optional, with all_levels: prepare_levels(q_shape, dtype, levels, limits, *, scale[,
  # config]) -> tables (a pytree; None: nothing to prepare) that depend on the levels' lengths
  # and owners alone, computed once for the layers of a step (`hydrax.attention.prepare`) and
  # passed back to all_levels as tables=. levels' k and v may be `jax.ShapeDtypeStruct`s.
  prepare_levels: Optional[Callable] = None

  def configured(self, **changes) -> "Backend":
    """This backend with the given fields of its configuration replaced."""
    if not changes:
      return self
    if self.config is None:
      raise ValueError(f"backend {self.name!r} takes no configuration, got "
                       f"{sorted(changes)}")
    fields = {f.name for f in dataclasses.fields(self.config)}
    unknown = sorted(set(changes) - fields)
    if unknown:
      raise ValueError(f"backend {self.name!r} has no configuration field(s) {unknown}; "
                       f"known: {sorted(fields)}")
    return dataclasses.replace(self, config=dataclasses.replace(self.config, **changes))

  def attend(self, q, k, v, lengths, owner, limits, *, scale,
             layer: Optional[Any] = None):
    """One level through this backend (contract in `hydrax.attention.xla`); with `layer`,
    k and v are [L,N,S,K,D] and the level is that layer."""
    kwargs = {} if self.config is None else {"config": self.config}
    if layer is not None:
      if self.takes_layer:
        kwargs["layer"] = layer
      else:
        k = lax.dynamic_index_in_dim(k, layer, 0, keepdims=False)
        v = lax.dynamic_index_in_dim(v, layer, 0, keepdims=False)
    return self.level_attention(q, k, v, lengths, owner, limits, scale=scale, **kwargs)

  def attend_all(self, q, levels, limits, *, scale, tables=None):
    """Every level at once through `all_levels` (which this backend must have); tables: None
    or what `prepare_all` returned for these levels' lengths and owners."""
    kwargs = {} if self.config is None else {"config": self.config}
    if tables is not None:
      kwargs["tables"] = tables
    return self.all_levels(q, levels, limits, scale=scale, **kwargs)

  def prepare_all(self, q_shape, dtype, levels, limits, *, scale):
    """`prepare_levels` (which this backend must have) with this backend's configuration."""
    kwargs = {} if self.config is None else {"config": self.config}
    return self.prepare_levels(q_shape, dtype, levels, limits, scale=scale, **kwargs)


_REGISTRY: dict[str, Backend] = {}
_LAZY: dict[str, tuple] = {}   # name -> (module that registers it, platforms)


def register(backend: Backend) -> None:
  _REGISTRY[backend.name] = backend


def register_lazy(name: str, module: str, platforms: tuple) -> None:
  """Declares a backend whose module is imported only when it is asked for by name, or by
  "auto" on one of `platforms`."""
  _LAZY[name] = (module, tuple(platforms))


def names() -> list[str]:
  return sorted(set(_REGISTRY) | set(_LAZY))


def _load(name: str) -> Backend | None:
  if name not in _REGISTRY and name in _LAZY:
    import importlib
    importlib.import_module(_LAZY[name][0])
  return _REGISTRY.get(name)


def parse_spec(spec: str) -> tuple:
  """(name, {field: value}) of a backend spec string "name" or "name:field=value,..." (what a
  gin grid or a command line can carry: "pallas:path=off,block_n=32"). Values are Python
  literals where they parse as one (32, 1e6, None, (64, 3)), else strings (off)."""
  name, _, rest = spec.partition(":")
  fields = {}
  for item in filter(None, (x.strip() for x in _split_top_level(rest))):
    field, eq, value = item.partition("=")
    if not eq or not field.strip():
      raise ValueError(f"backend spec {spec!r}: expected field=value, got {item!r}")
    try:
      fields[field.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      fields[field.strip()] = value.strip()
  return name.strip(), fields


def _split_top_level(text: str) -> list:
  """Splits at commas outside brackets (a tuple value keeps its commas)."""
  parts, depth, start = [], 0, 0
  for i, ch in enumerate(text):
    depth += ch in "([{"
    depth -= ch in ")]}"
    if ch == "," and depth == 0:
      parts.append(text[start:i])
      start = i + 1
  return parts + [text[start:]]


def get(name="auto", **config) -> Backend:
  """The backend called `name` ("auto" resolves per platform, see module docstring), with the
  given configuration fields replaced. A `Backend` value is returned as it is (configured).
  `name` may carry configuration as a spec string, "pallas:path=off" (`parse_spec`)."""
  if isinstance(name, Backend):
    return name.configured(**config)
  if not isinstance(name, str):
    raise ValueError(f"backend must be a Backend or a string, one of {['auto'] + names()}, "
                     f"got {name!r}")
  if ":" in name:
    name, fields = parse_spec(name)
    return get(name, **{**fields, **config})
  if name != "auto":
    backend = _load(name)
    if backend is None:
      raise ValueError(f"backend={name!r} is unknown; known backends: {['auto'] + names()}")
    return backend.configured(**config)
  return _auto().configured(**config)


def _auto() -> Backend:
  platform = jax.default_backend()
  for candidate in names():
    if candidate == "xla" or (candidate in _LAZY and platform not in _LAZY[candidate][1]):
      continue
    try:
      backend = _load(candidate)
    except ImportError as e:  # a kernel module whose toolchain is missing on this machine
      log_once(("auto-import", candidate), "hydrax: backend %r unavailable (%s); not used by "
               "backend='auto'", candidate, e)
      continue
    if backend is not None and platform in backend.platforms and backend.is_available():
      return backend
  if platform != "cpu":
    log_once(("auto-xla", platform), "hydrax: no kernel backend for platform %r; "
             "backend='auto' uses the XLA backend", platform)
  return _REGISTRY["xla"]


register(Backend("xla", xla.level_attention, platforms=("cpu", "gpu", "tpu")))
