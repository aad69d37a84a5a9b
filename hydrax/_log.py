"""Logging helpers: hydrax logs through the standard `logging` module under "hydrax"."""

import logging

logger = logging.getLogger("hydrax")
_seen: set = set()


def log_once(key, message: str, *args, level: int = logging.WARNING) -> None:
  """Logs `message` the first time `key` is seen in this process, never again."""
  if key in _seen:
    return
  _seen.add(key)
  logger.log(level, message, *args)
