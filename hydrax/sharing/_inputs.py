"""Validation and flattening of token-id sequences (the input of `plan`).

Sequences become one flat int32 array plus offsets, so that memory stays proportional to the
total number of tokens (no per-token Python objects, no [B, max_len] padding).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

_INT32_MAX = np.iinfo(np.int32).max
_CHUNK = 1 << 24


class Flat(NamedTuple):
  """B sequences as one array.

  tokens:  [total] int32, sequence i is tokens[offsets[i]:offsets[i] + lengths[i]]
           (plans make it read-only).
  offsets: [B] int64.
  lengths: [B] int64 (all >= 1).
  """
  tokens: np.ndarray
  offsets: np.ndarray
  lengths: np.ndarray

  @property
  def total(self) -> int:
    return int(self.tokens.size)


def _describe(value) -> str:
  return repr(value.item() if hasattr(value, "item") else value)


def _check_range(arr: np.ndarray, name: str) -> None:
  """Token ids of an integer array (any rank) lie in [0, int32 max]."""
  bad = None
  if arr.dtype.kind == "i" and arr.min() < 0:
    bad, why = arr < 0, "is negative; token ids must be >= 0"
  elif arr.dtype.itemsize >= 4 and arr.dtype != np.int32 and arr.max() > _INT32_MAX:
    bad, why = arr > _INT32_MAX, f"does not fit in int32 (token ids must be <= {_INT32_MAX})"
  if bad is not None:
    where = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(f"{name}{''.join(f'[{i}]' for i in where)} = {int(arr[where])} {why}")


def check_segment(seq, name: str, *, allow_empty: bool, check_range: bool = True) -> np.ndarray:
  """One token-id sequence as a 1-D integer array (int32 when range-checked); ValueError
  naming `name` otherwise. With check_range=False the values are left to `_check_chunk`."""
  if isinstance(seq, (str, bytes)):
    raise ValueError(f"{name} must be a sequence of integer token ids, got {type(seq).__name__} "
                     f"{seq[:20]!r}")
  try:
    arr = np.asarray(seq)
  except (ValueError, TypeError) as e:
    raise ValueError(f"{name} is not a sequence of integer token ids ({e})") from None
  if arr.ndim != 1:
    if arr.ndim == 0:
      raise ValueError(f"{name} must be a sequence of token ids, got the scalar {_describe(arr)}")
    raise ValueError(f"{name} must be 1-D (one sequence of token ids), got shape {arr.shape}")
  if arr.size == 0:
    if allow_empty:
      return np.zeros((0,), np.int32)
    raise ValueError(f"{name} is empty; every sequence needs at least one token")
  if arr.dtype.kind not in "iu":
    if arr.dtype.kind == "f":
      bad = np.flatnonzero(arr != np.round(arr))
      j = int(bad[0]) if bad.size else 0
      raise ValueError(f"{name}[{j}] = {_describe(arr[j])} is not an integer: token ids must "
                       f"have an integer dtype (got {arr.dtype})")
    if isinstance(seq, (list, tuple)):
      for j, x in enumerate(seq):
        if not isinstance(x, (int, np.integer)) or isinstance(x, (bool, np.bool_)):
          raise ValueError(f"{name}[{j}] = {x!r} is not an integer token id")
        if x < 0:
          raise ValueError(f"{name}[{j}] = {x} is negative; token ids must be >= 0")
        if x > _INT32_MAX:
          raise ValueError(f"{name}[{j}] = {x} does not fit in int32 (token ids must be <= "
                           f"{_INT32_MAX})")
    raise ValueError(f"{name} is not a sequence of integer token ids (dtype {arr.dtype})")
  if not check_range:
    return arr
  _check_range(arr, name)
  return arr.astype(np.int32, copy=False)


def flatten(sequences, name: str = "sequences") -> Flat:
  """Validates B token-id sequences and concatenates them.

  `sequences`: a list/tuple of sequences (lists, tuples or 1-D integer arrays), or a 2-D
  integer array [B, L] (each row one sequence; the fast path, no copy for int32 input).
  Raises ValueError naming the first bad sequence and token: empty, negative, non-integer,
  beyond int32.
  """
  if isinstance(sequences, (str, bytes, dict)):
    raise ValueError(f"{name} must be a list of token-id sequences, got "
                     f"{type(sequences).__name__}")
  if isinstance(sequences, np.ndarray) or hasattr(sequences, "__array__") and not isinstance(
      sequences, (list, tuple)):
    arr = np.asarray(sequences)
    if arr.ndim != 2:
      raise ValueError(f"{name} must be a list of token-id sequences or a 2-D array [B, L], "
                       f"got an array of shape {arr.shape}"
                       + (" (wrap a single sequence in a list)" if arr.ndim == 1 else ""))
    if arr.shape[0] == 0:
      raise ValueError(f"{name} is empty; pass at least one sequence")
    if arr.shape[1] == 0:
      raise ValueError(f"{name}[0] is empty; every sequence needs at least one token")
    if arr.dtype.kind not in "iu":
      check_segment(arr[0], f"{name}[0]", allow_empty=False)
    _check_range(arr, name)
    b, length = arr.shape
    tokens = np.array(arr, dtype=np.int32, order="C").reshape(-1)   # a copy: plans are immutable
    offsets = np.arange(b, dtype=np.int64) * length
    return Flat(tokens, offsets, np.full((b,), length, np.int64))
  if not isinstance(sequences, (list, tuple)):
    try:
      sequences = list(sequences)
    except TypeError:
      raise ValueError(f"{name} must be a list of token-id sequences, got "
                       f"{type(sequences).__name__}") from None
  if not sequences:
    raise ValueError(f"{name} is empty; pass at least one sequence")
  if all(isinstance(x, (int, np.integer)) for x in sequences[:8]):
    raise ValueError(f"{name} must be a list of token-id sequences, got a flat list of ints "
                     f"{list(sequences[:8])}... (wrap a single sequence in a list)")
  parts = []
  for i, seq in enumerate(sequences):
    if isinstance(seq, np.ndarray) and seq.ndim == 1 and seq.size and seq.dtype.kind in "iu" and (
        seq.dtype != np.uint64):
      parts.append(seq)                           # values checked below, vectorised
    else:
      parts.append(check_segment(seq, f"{name}[{i}]", allow_empty=False, check_range=False))
  lengths = np.fromiter((p.size for p in parts), np.int64, len(parts))
  offsets = np.zeros((len(parts),), np.int64)
  np.cumsum(lengths[:-1], out=offsets[1:])
  total = int(lengths.sum())
  tokens = np.empty((total,), np.int32)
  lo = 0
  while lo < len(parts):                          # chunks of about _CHUNK tokens
    hi = int(np.searchsorted(offsets, offsets[lo] + _CHUNK, side="right"))
    hi = max(hi, lo + 1)
    start = int(offsets[lo])
    stop = int(offsets[hi - 1] + lengths[hi - 1])
    if all(q.dtype == np.int32 for q in parts[lo:hi]):   # straight into place, no temporary
      np.concatenate(parts[lo:hi], out=tokens[start:stop])
      _check_chunk(tokens[start:stop], offsets[lo:hi] - start, lo, name)
    else:
      chunk = np.concatenate(parts[lo:hi])
      _check_chunk(chunk, offsets[lo:hi] - start, lo, name)
      tokens[start:stop] = chunk
    lo = hi
  return Flat(tokens, offsets, lengths)


def _check_chunk(chunk: np.ndarray, offsets: np.ndarray, first: int, name: str) -> None:
  """Range check of the concatenation of sequences first, first+1, ... (offsets into chunk)."""
  try:
    _check_range(chunk, name)
  except ValueError:
    bad = chunk < 0 if chunk.dtype.kind == "i" and chunk.min() < 0 else chunk > _INT32_MAX
    j = int(np.argmax(bad))
    i = int(np.searchsorted(offsets, j, side="right")) - 1
    _check_range(chunk[offsets[i]:offsets[i + 1] if i + 1 < offsets.size else chunk.size],
                 f"{name}[{first + i}]")
    raise


def read_rows(tokens: np.ndarray, start: np.ndarray, width: int) -> np.ndarray:
  """[R, width] fresh array: row r is tokens[start[r] : start[r] + width], each row copied
  whole from a sliding-window view; entries past the end of `tokens` are arbitrary (callers
  mask them)."""
  total = tokens.size
  start = np.asarray(start, np.int64)
  if total < width:
    return tokens[np.minimum(start[:, None] + np.arange(width), total - 1)]
  windows = np.lib.stride_tricks.sliding_window_view(tokens, width)   # [total - width + 1, W]
  near_end = start > total - width
  out = windows[np.where(near_end, 0, start)]
  if near_end.any():
    rows = np.flatnonzero(near_end)
    out[rows] = tokens[np.minimum(start[rows, None] + np.arange(width), total - 1)]
  return out
