"""Appending completions to a JSONL file, one fsync per batch, and resuming from it.

  ResultWriter(path)      .done ((id, sample) pairs already in the file), .write(records)

A record is written as one JSON line. `write` appends the lines of a whole batch, flushes and
fsyncs, so after a crash the file holds every batch that `write` returned from. Only a batch
whose write was cut short can leave a partial last line: opening the file again removes that
line (logged), and its completions, not being in the file, are run again. A completion is
named by its request's `id` and its `sample` (0 .. n - 1; a record without one is sample 0).
"""

from __future__ import annotations

import json
import logging
import os

from hydrax._log import logger


class ResultWriter:
  """Appends records to `path` (created with its directory if missing); see the module."""

  def __init__(self, path: str):
    self.path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(self.path))
    os.makedirs(folder, exist_ok=True)
    self.done = self._recover()

  def _recover(self) -> set:
    if not os.path.exists(self.path):
      return set()
    done, good = set(), 0                 # good: bytes up to the last complete line
    with open(self.path, "rb") as f:
      for number, raw in enumerate(f, start=1):
        if not raw.endswith(b"\n"):
          break                             # a partial last line
        good += len(raw)
        if not raw.strip():
          continue
        try:
          done.add(_name(json.loads(raw)))
        except (ValueError, KeyError, TypeError, AttributeError):
          raise ValueError(f"{self.path}: line {number} is not a completion record "
                           f"({raw[:80]!r}); is this the output of hydrax.generate?") from None
    size = os.path.getsize(self.path)
    if good < size:
      logger.log(logging.WARNING, "hydrax.generate: %s ends with a partial line (%d bytes, an "
                 "interrupted write); removing it, its completions run again", self.path,
                 size - good)
      with open(self.path, "r+b") as f:
        f.truncate(good)
        f.flush()
        os.fsync(f.fileno())
    return done

  def write(self, records) -> None:
    """Appends records (dicts with an "id", and a "sample" where n > 1) as JSON lines; durable
    when this returns."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    self.done.update(_name(r) for r in records)


def _name(record: dict) -> tuple:
  """(id, sample) of a completion record; raises (KeyError, ValueError, ...) if it has none."""
  sample = record.get("sample", 0)
  if not isinstance(sample, int) or isinstance(sample, bool) or sample < 0:
    raise ValueError(f"sample {sample!r}")
  return str(record["id"]), sample
