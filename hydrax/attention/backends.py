"""Registry of attention backends: name -> implementation of one level of attention.

A backend implements `level_attention(q, k, v, lengths, owner, limits, *, scale)` with the
contract written in `hydrax.attention.xla`. It may raise `Unsupported` for an input it cannot
take; the caller then runs the XLA backend for that level and logs the fallback once.

"auto" picks, for the platform of the default device, the first registered backend that
lists that platform and reports itself available; otherwise "xla".
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax

from hydrax._log import log_once
from hydrax.attention import xla


class Unsupported(Exception):
  """Raised by a backend for an input it cannot handle; the caller falls back to XLA."""


@dataclasses.dataclass(frozen=True)
class Backend:
  name: str
  level_attention: Callable
  platforms: tuple = ()              # platforms where "auto" may pick it ("gpu", "tpu", ...)
  is_available: Callable[[], bool] = lambda: True


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


def get(name: str = "auto") -> Backend:
  """The backend called `name`; "auto" resolves per platform (see module docstring)."""
  if not isinstance(name, str):
    raise ValueError(f"backend must be a string, one of {['auto'] + names()}, got {name!r}")
  if name != "auto":
    backend = _load(name)
    if backend is None:
      raise ValueError(f"backend={name!r} is unknown; known backends: {['auto'] + names()}")
    return backend
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
