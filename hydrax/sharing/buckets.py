"""Bucket policy: the static shapes of a plan's arrays, so that `jit` compiles a few times.

A plan pads each level's node count N, each level's segment capacity S and the suffix capacity
S_suffix up to a bucket; the batch B is never padded (it is the caller's). Buckets are a
geometric grid with `steps` values per octave, the multiples of 2^k / steps in [2^k, 2^(k+1)]:

  steps=1: 1, 2, 4, 8, 16, ...                     (padding < 100%)
  steps=2: 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, ...  (padding < 50%; the default)
  steps=4: ..., 16, 20, 24, 28, 32, 40, 48, 56, 64, ...  (padding < 25%)

and nothing below a minimum (`min_nodes`, `min_tokens`; a size of 0 becomes the minimum).
Every bucket >= 2*steps is a multiple of a power of two >= its value / (2*steps), so token
buckets from 256 up are multiples of 64 (steps=2), which suits kernel block sizes. A sweep
over batch sizes 1..2^k therefore gives at most `steps` distinct values per octave of node
count or segment length, typically one or two shapes per level in all.
"""

from __future__ import annotations

import dataclasses


def round_up(x: int, *, steps: int = 2, minimum: int = 1) -> int:
  """The smallest bucket >= x: a multiple of 2^floor(log2 x) / steps, and >= minimum."""
  x = int(x)
  if x < 0:
    raise ValueError(f"round_up: x = {x} is negative")
  if x <= minimum:
    return int(minimum)
  granule = max(1, (1 << (x.bit_length() - 1)) // steps)
  return -(-x // granule) * granule


@dataclasses.dataclass(frozen=True)
class Buckets:
  """Static-shape policy for plans (see the module docstring).

  steps:      bucket values per octave (1: powers of two); 0 disables padding (exact shapes).
  min_nodes:  smallest N of a shared level.
  min_tokens: smallest S of a shared level and of the suffixes.
  """
  steps: int = 2
  min_nodes: int = 1
  min_tokens: int = 16

  def __post_init__(self):
    for field in ("steps", "min_nodes", "min_tokens"):
      value = getattr(self, field)
      if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"Buckets.{field} must be an int >= 0, got {value!r}")
    if self.steps and self.steps & (self.steps - 1):
      raise ValueError(f"Buckets.steps must be 0 or a power of two, got {self.steps}")

  def nodes(self, n: int) -> int:
    """N for a level with n nodes (real ones plus the empty node)."""
    return max(int(n), 1) if not self.steps else round_up(n, steps=self.steps,
                                                          minimum=max(self.min_nodes, 1))

  def tokens(self, s: int) -> int:
    """S for segments of at most s tokens."""
    return int(s) if not self.steps else round_up(s, steps=self.steps, minimum=self.min_tokens)


DEFAULT = Buckets()
EXACT = Buckets(steps=0)
