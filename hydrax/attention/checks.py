"""Input validation for the attention entry points: clear ValueErrors, never bare asserts.

Shape checks are static (they run under `jit` too). Value checks (lengths within capacity,
owners in range) run when the values are concrete, i.e. outside a trace or closed over as
constants. Traced values are checked only in the runtime mode (`check_range_runtime`, through
`jax.experimental.checkify`), which the caller's function must be functionalized for:
`err, out = checkify.checkify(jax.jit(f))(...); err.throw()`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

MODES = ("static", "runtime")


def concrete(x):
  """`x` as a NumPy array if its value is known now, else None (a tracer)."""
  if x is None:
    return None
  if isinstance(x, jax.core.Tracer):
    return None
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def shape_of(x, name: str):
  try:
    return tuple(x.shape)
  except AttributeError:
    raise ValueError(f"{name} must be an array, got {type(x).__name__}") from None


def check_rank(x, rank: int, name: str, axes: str) -> tuple:
  shape = shape_of(x, name)
  if len(shape) != rank:
    raise ValueError(f"{name} must have rank {rank} [{axes}], got shape {shape}")
  return shape


def check_float(x, name: str) -> None:
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must be a floating-point array, got dtype {x.dtype}")


def check_int_vector(x, length: int, name: str, axis: str):
  """Checks an integer vector of shape [length]; returns its concrete value or None."""
  shape = shape_of(x, name)
  if shape != (length,):
    raise ValueError(f"{name} must have shape [{axis}] = ({length},), got {shape}")
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f"{name} must be an integer array, got dtype {x.dtype}")
  return concrete(x)


def check_range(value, low: int, high: int, name: str, what: str) -> None:
  """Checks low <= value <= high elementwise for a concrete array (no-op for None)."""
  if value is None or value.size == 0:
    return
  bad = np.flatnonzero((value < low) | (value > high))
  if bad.size:
    i = int(bad[0])
    raise ValueError(
        f"{name}[{i}] = {int(value.flat[i])} is out of range: {what} must lie in "
        f"[{low}, {high}] ({bad.size} bad entr{'y' if bad.size == 1 else 'ies'})")


def check_mode(mode) -> str:
  if mode not in MODES:
    raise ValueError(f"checks must be one of {MODES}, got {mode!r}")
  return mode


def check_range_runtime(x, low: int, high: int, name: str, what: str) -> None:
  """checkify.check that low <= x <= high elementwise (x traced or concrete; scalar or vector).

  Under `jit` this needs the caller's function functionalized by `checkify.checkify`; without
  it, jax raises "Cannot abstractly evaluate a checkify.check which was not functionalized"
  when the program is lowered."""
  x = jnp.asarray(x)
  where = name if x.ndim == 0 else f"{name}[{{i}}]"
  x = jnp.ravel(x)
  if x.size == 0:
    return
  bad = (x < low) | (x > high)
  i = jnp.argmax(bad)
  message = f"{where} = {{value}} is out of range: {what} must lie in [{low}, {high}]"
  checkify.check(~jnp.any(bad), message, i=i, value=x[i])
