"""Reading a prompts file: JSONL or plain text -> validated `Request`s, bad lines reported.

  read_requests(path, *, on_bad_line="error") -> (requests, bad_lines)
  tokenize(requests, tokenizer, *, vocab_size, max_positions, default_max_new_tokens,
           add_special_tokens=True) -> (token arrays, bad_lines)
  tokenize_continuations(requests, prompts, tokenizer, *, vocab_size, max_positions,
                         add_special_tokens=True) -> (token arrays or None, bad_lines)
  Request, BadLine, BadInput

JSONL (one object a line; blank lines are ignored): `id` (string or int; default: the line
number), exactly one of `prompt` (text) or `tokens` (token ids), and optional `max_new_tokens`
(int >= 1), `temperature` (>= 0; 0 = greedy), `top_k` (int >= 1), `top_p` (in (0, 1]), `stop`
(a string, an int, or a list of strings and ints: strings end the text where they first occur,
ints are stop token ids), `n` (int >= 1: completions drawn for the prompt, each its own
sample), `seed` (an int in [0, 2**32): the request's random stream in place of its id's; see
`hydrax.generate`). Or, instead of generating, `continuation` (text, or token ids): the
request is scored, log p(continuation | prompt) (it then takes none of the generation keys).
Unknown keys are errors (a typo must not be silently ignored).
Plain text: every non-blank line is one prompt, its id is its line number. A file is JSONL when
its name ends in .jsonl / .json or its first non-blank character is `{`.

Every bad line is reported as a `BadLine(line, id, message)` with its 1-based line number;
`on_bad_line="error"` raises `BadInput` listing them, "skip" returns them beside the good ones.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Optional

import numpy as np

ON_BAD_LINE = ("error", "skip")
_KEYS = ("id", "prompt", "tokens", "max_new_tokens", "temperature", "top_k", "top_p", "stop",
         "n", "seed", "continuation")
_GENERATION_KEYS = ("max_new_tokens", "temperature", "top_k", "top_p", "stop", "n", "seed")


@dataclasses.dataclass(frozen=True)
class Request:
  """One prompt and its settings; None means "the run's default"."""
  id: str
  line: int
  prompt: Optional[str] = None
  tokens: Optional[tuple] = None
  max_new_tokens: Optional[int] = None
  temperature: Optional[float] = None
  top_k: Optional[int] = None
  top_p: Optional[float] = None
  stop: tuple = ()          # stop strings
  stop_ids: tuple = ()      # stop token ids
  n: Optional[int] = None   # completions to draw
  seed: Optional[int] = None    # its random stream (default: its id's hash)
  continuation: Optional[object] = None    # scored instead: text, or a tuple of token ids

  @property
  def scored(self) -> bool:
    return self.continuation is not None


@dataclasses.dataclass(frozen=True)
class BadLine:
  line: int
  id: Optional[str]
  message: str

  def __str__(self) -> str:
    name = "" if self.id is None else f" (id {self.id!r})"
    return f"line {self.line}{name}: {self.message}"


class BadInput(ValueError):
  """The prompts file has bad lines and on_bad_line="error"; `.bad_lines` lists them."""

  def __init__(self, path: str, bad_lines: list):
    self.bad_lines = list(bad_lines)
    shown = "\n  ".join(str(b) for b in self.bad_lines[:20])
    more = f"\n  ... and {len(self.bad_lines) - 20} more" if len(self.bad_lines) > 20 else ""
    super().__init__(f"{path}: {len(self.bad_lines)} bad line(s) (pass on_bad_line='skip' / "
                     f"--on_bad_line=skip to skip them):\n  {shown}{more}")


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
  return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(x)


def _parse_object(obj, line: int) -> Request:
  """A Request from one decoded JSON object; ValueError with a short message if invalid."""
  if not isinstance(obj, dict):
    raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
  unknown = sorted(set(obj) - set(_KEYS))
  if unknown:
    raise ValueError(f"unknown key(s) {unknown}; known keys: {list(_KEYS)}")
  rid = obj.get("id", line)
  if not (isinstance(rid, str) or _is_int(rid)) or rid == "":
    raise ValueError(f"id must be a non-empty string or an int, got {rid!r}")
  has_prompt, has_tokens = "prompt" in obj, "tokens" in obj
  if has_prompt == has_tokens:
    raise ValueError("give exactly one of 'prompt' (text) or 'tokens' (token ids)")
  prompt = tokens = None
  if has_prompt:
    prompt = obj["prompt"]
    if not isinstance(prompt, str) or not prompt:
      raise ValueError(f"prompt must be a non-empty string, got {prompt!r:.60}")
  else:
    tokens = obj["tokens"]
    if not isinstance(tokens, list) or not tokens or not all(_is_int(t) for t in tokens):
      raise ValueError(f"tokens must be a non-empty list of ints, got {tokens!r:.60}")
    if min(tokens) < 0:
      raise ValueError(f"tokens has a negative id {min(tokens)}")
    tokens = tuple(tokens)
  max_new = obj.get("max_new_tokens")
  if max_new is not None and (not _is_int(max_new) or max_new < 1):
    raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new!r}")
  temperature = obj.get("temperature")
  if temperature is not None and (not _is_number(temperature) or temperature < 0):
    raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
  top_k = obj.get("top_k")
  if top_k is not None and (not _is_int(top_k) or top_k < 1):
    raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
  top_p = obj.get("top_p")
  if top_p is not None and (not _is_number(top_p) or not 0 < top_p <= 1):
    raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
  continuation = obj.get("continuation")
  if continuation is not None:
    given = [k for k in _GENERATION_KEYS if k in obj]
    if given:
      raise ValueError(f"a scored request (continuation) takes none of {given}")
    if isinstance(continuation, list) and continuation and all(_is_int(t) and t >= 0
                                                               for t in continuation):
      continuation = tuple(continuation)
    elif not (isinstance(continuation, str) and continuation):
      raise ValueError(f"continuation must be non-empty text or a non-empty list of token "
                       f"ids >= 0, got {continuation!r:.60}")
  n = obj.get("n")
  if n is not None and (not _is_int(n) or n < 1):
    raise ValueError(f"n must be an int >= 1 (completions of the prompt), got {n!r}")
  seed = obj.get("seed")
  if seed is not None and (not _is_int(seed) or not 0 <= seed < 2 ** 32):
    raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
  stop = obj.get("stop", [])
  stop = stop if isinstance(stop, list) else [stop]
  strings, ids = [], []
  for s in stop:
    if isinstance(s, str) and s:
      strings.append(s)
    elif _is_int(s) and s >= 0:
      ids.append(s)
    else:
      raise ValueError(f"stop entries must be non-empty strings or token ids >= 0, got {s!r}")
  return Request(id=str(rid), line=line, prompt=prompt, tokens=tokens, max_new_tokens=max_new,
                 temperature=None if temperature is None else float(temperature),
                 top_k=top_k, top_p=None if top_p is None else float(top_p),
                 stop=tuple(strings), stop_ids=tuple(ids), n=n, seed=seed,
                 continuation=continuation)


def is_jsonl(path: str, head: str) -> bool:
  return path.endswith((".jsonl", ".json")) or head.lstrip().startswith("{")


def read_requests(path: str, *, on_bad_line: str = "error"):
  """(requests, bad_lines) from a prompts file (see the module docstring). Duplicate ids are
  bad lines (the first one wins). Raises BadInput when on_bad_line="error" and any line is
  bad, ValueError for a missing or empty file."""
  if on_bad_line not in ON_BAD_LINE:
    raise ValueError(f"on_bad_line must be one of {list(ON_BAD_LINE)}, got {on_bad_line!r}")
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ValueError(f"prompts file {path!r} not found")
  with open(path, encoding="utf-8", errors="strict") as f:
    try:
      text = f.read()
    except UnicodeDecodeError as e:
      raise ValueError(f"prompts file {path!r} is not UTF-8: {e}") from None
  lines = text.split("\n")
  jsonl = is_jsonl(path, text[:4096])
  requests, bad, seen = [], [], set()
  for number, raw in enumerate(lines, start=1):
    if not raw.strip():
      continue
    if jsonl:
      try:
        request = _parse_object(json.loads(raw), number)
      except json.JSONDecodeError as e:
        bad.append(BadLine(number, None, f"invalid JSON: {e.msg} at column {e.colno}"))
        continue
      except ValueError as e:
        bad.append(BadLine(number, None, str(e)))
        continue
    else:
      request = Request(id=str(number), line=number, prompt=raw.rstrip("\r"))
    if request.id in seen:
      bad.append(BadLine(number, request.id, "duplicate id (an earlier line has it)"))
      continue
    seen.add(request.id)
    requests.append(request)
  if not requests and not bad:
    raise ValueError(f"prompts file {path!r} holds no prompts")
  if bad and on_bad_line == "error":
    raise BadInput(path, bad)
  return requests, bad


def tokenize(requests, tokenizer, *, vocab_size: int, max_positions: int,
             default_max_new_tokens: int, add_special_tokens: bool = True):
  """Token ids of each request: (list of int32 arrays or None per request, bad_lines).

  Text prompts go through `tokenizer.encode(text, add_special_tokens=...)`: with True the
  tokenizer's own template adds BOS as its checkpoint says; given `tokens` are used as they
  are. A request is bad when it has
  text but no tokenizer, encodes to nothing, holds ids outside [0, vocab_size), or needs more
  than max_positions positions (prompt + max_new_tokens)."""
  def one(i, r):
    if r.tokens is not None:
      ids = np.asarray(r.tokens, np.int64)
    else:
      if tokenizer is None:
        raise ValueError("text prompt but no tokenizer (give one, or 'tokens')")
      ids = np.asarray(tokenizer.encode(r.prompt, add_special_tokens=add_special_tokens).ids,
                       np.int64)
    if ids.size == 0:
      raise ValueError("the prompt encodes to no tokens")
    _check_vocab(ids, vocab_size, "token")
    new = r.max_new_tokens or default_max_new_tokens
    if not r.scored and ids.size + new > max_positions:   # scored: by its continuation
      raise ValueError(f"{ids.size} prompt tokens + max_new_tokens {new} exceed the model's "
                       f"{max_positions} positions")
    return ids.astype(np.int32)

  return _each(requests, one)


def _each(requests, fn):
  """(fn(i, request) for each request, or None where it raised ValueError, the BadLines of
  those)."""
  out, bad = [], []
  for i, r in enumerate(requests):
    try:
      out.append(fn(i, r))
    except ValueError as e:
      bad.append(BadLine(r.line, r.id, str(e)))
      out.append(None)
  return out, bad


def _check_vocab(ids: np.ndarray, vocab_size: int, what: str) -> None:
  if ids.max() >= vocab_size:
    raise ValueError(f"{what} id {int(ids.max())} is outside the vocabulary [0, "
                     f"{vocab_size - 1}]")


def tokenize_continuations(requests, prompts, tokenizer, *, vocab_size: int,
                           max_positions: int, add_special_tokens: bool = True):
  """The continuation ids of each scored request: (int32 arrays, or None for a request that
  generates or whose prompt is bad (prompts[i] None), bad_lines).

  Token ids are used as they are. Text is tokenized with its prompt, as one text, and the
  continuation is what follows the prompt's own tokens: a tokenizer may merge the prompt's
  last characters with the continuation's first, which splitting the text in two would
  hide; a request whose joint tokens do not begin with its prompt's is bad (give ids). Also
  bad: a text continuation after a `tokens` prompt (no text to join), ids outside the
  vocabulary, prompt + continuation over max_positions."""
  def one(i, r):
    ids = prompts[i]
    if not r.scored or ids is None:
      return None
    if isinstance(r.continuation, tuple):
      cont = np.asarray(r.continuation, np.int64)
    else:
      if r.prompt is None:
        raise ValueError("a text continuation needs a text prompt (give token ids)")
      joint = np.asarray(tokenizer.encode(r.prompt + r.continuation,
                                          add_special_tokens=add_special_tokens).ids)
      if joint.size <= ids.size or not np.array_equal(joint[:ids.size], ids):
        raise ValueError("prompt + continuation do not tokenize as the prompt's tokens and "
                         "more (the tokenizer merges across the boundary); give token ids")
      cont = joint[ids.size:]
    _check_vocab(cont, vocab_size, "continuation token")
    if ids.size + cont.size > max_positions:
      raise ValueError(f"{ids.size} prompt tokens + {cont.size} continuation tokens exceed "
                       f"the model's {max_positions} positions")
    return cont.astype(np.int32)

  return _each(requests, one)
