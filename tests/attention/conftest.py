"""The `backend` fixture: every attention backend that runs on this machine, spied on.

A test that takes `backend` runs once per entry of BACKENDS. It gets a `Spied` value whose
`.backend` is a copy of the registered Backend (with its kernel configuration) whose
`level_attention` records every call; `Spied.run(...)` checks that each level went through
the named backend and that none was handed to the XLA fallback (`backends.Unsupported`).
A name that is not registered here is skipped with the reason, never failed.

Hypothesis budgets: a backend's `examples` is the share of the profile's max_examples it runs
(interpret-mode Pallas is ~10x slower than XLA on CPU), at least one.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import math
import os
from typing import Callable, Optional

import pytest
from hypothesis import HealthCheck, settings

from hydrax.attention import backends


@dataclasses.dataclass(frozen=True)
class BackendCase:
  name: str                      # the pytest id
  registered: str                # the registry name it needs
  make: Callable[[], backends.Backend]
  examples: float = 1.0          # share of the hypothesis profile's max_examples
  skip: Optional[Callable[[], Optional[str]]] = None   # why it cannot run here, or None
  # For a backend whose all_levels may decline (return None): whether it must take a call
  # (q, levels); a call it should take but declined fails the test.
  takes_all: Optional[Callable] = None


BACKENDS = [
    BackendCase("xla", "xla", lambda: backends.get("xla")),
    # The Triton-lowered kernels in Pallas interpret mode (off GPU; the real kernels on one).
    # The grouped kernel level by level (path="off": the small-shape path is its own case).
    # Calls of two or more levels with keys run through all_levels (`grouped_levels`: one
    # merge in packed rows) unless several levels each fix a row order.
    BackendCase("pallas", "pallas", lambda: backends.get("pallas", lowering="triton",
                                                         path="off"), examples=0.2,
                takes_all=lambda q, levels: _grouped_takes(q, levels)),
    # The per-sequence level merging the other levels' results in its kernel at decode
    # (Config.merge_in_kernel; other calls take the one XLA merge).
    BackendCase("pallas_merge_in_kernel", "pallas", lambda: backends.get(
        "pallas", lowering="triton", path="off", merge_in_kernel=True), examples=0.2,
                takes_all=lambda q, levels: _grouped_takes(q, levels)),
    # The same kernels with each level merged and unpacked on its own (Config.finish).
    BackendCase("pallas_per_level", "pallas", lambda: backends.get(
        "pallas", lowering="triton", path="off", finish="per_level"), examples=0.1),
    # The pallas backend's small-shape path: every level of a call in one launch of the path
    # kernel (kernels/path_gpu.py), spied through all_levels.
    BackendCase("pallas_path", "pallas", lambda: backends.get("pallas", path="always"),
                examples=0.2, takes_all=lambda q, levels: _path_takes(q, levels)),
    # The same with groups of sequences a program (Config.path_group None: up to 4 sequences
    # fill 16 rows; a node shared in a group is read once).
    BackendCase("pallas_path_grouped", "pallas", lambda: backends.get(
        "pallas", path="always", path_group=None), examples=0.2,
                takes_all=lambda q, levels: _path_takes(q, levels)),
    # TPU entry point: the Pallas TPU kernels in TPU interpret mode, once "pallas_tpu" is
    # registered (skipped until then).
    BackendCase("pallas_tpu", "pallas_tpu",
                lambda: backends.get("pallas_tpu", interpret=True), examples=0.2),
    # The fused Triton kernel in Triton's interpreter (all levels in one call, spied through
    # all_levels): only where triton and torch are installed and TRITON_INTERPRET=1 was set
    # before triton was imported (not in CI; see tests/attention/test_fused_kernel.py).
    BackendCase("fused", "fused", lambda: backends.get("fused", interpret=True), examples=0.2,
                skip=lambda: _fused_skip()),
]


def _path_takes(q, levels) -> bool:
  from hydrax.attention.kernels import path_gpu
  b, t = q.shape[:2]
  return (b > 0 and t > 0 and any(lv.k.shape[-3] > 0 for lv in levels)
          and path_gpu.unsupported_reason(q.shape, q.dtype, levels[0].k.shape[-2]) is None)


def _grouped_takes(q, levels) -> bool:
  b, t = q.shape[:2]
  live = [lv for lv in levels if lv.k.shape[-3] > 0]
  fixing = [lv for lv in live if lv.owner is not None and lv.k.shape[-4] != 1]
  return b > 0 and t > 0 and len(live) > 1 and len(fixing) <= 1


def _fused_skip() -> Optional[str]:
  from hydrax.attention.kernels import fused_triton
  return fused_triton.unavailable_reason(fused_triton.Config(interpret=True))


# The Mosaic GPU kernel in its interpret mode: bf16/fp16, D 64/128 and 3-5 s per program on
# CPU, so it runs its own small cases (tests/attention/test_core.py, `mosaic_backend`). Key
# blocks of 64 (the default is 128): capacities of 65..128 keys then run two blocks through the
# two-stage pipeline, and capacities past one block are padded (a logged copy).
MOSAIC = BackendCase("mosaic", "pallas", lambda: backends.get(
    "pallas", lowering="mosaic", mosaic={"block_kv": 64, "stages": 2}))
# The same with the per-sequence level folded into the shared level's launch (128-key
# blocks, which the fold takes; two key splits).
MOSAIC_FOLDED = BackendCase("mosaic_folded", "pallas", lambda: backends.get(
    "pallas", lowering="mosaic", mosaic={"block_kv": 128, "stages": 2, "splits": 2,
                                         "fold_suffix": True}))


class Spied:
  """A backend whose level_attention calls are recorded (k's shape, and whether it refused)."""

  def __init__(self, case: BackendCase):
    self.case = case
    self.calls: list = []
    self.declined: list = []       # calls all_levels should have taken but declined
    real = case.make()

    def spy(q, k, v, lengths, owner, limits, **kwargs):
      try:
        result = real.level_attention(q, k, v, lengths, owner, limits, **kwargs)
      except backends.Unsupported as e:
        self.calls.append((tuple(k.shape), f"Unsupported: {e}"))
        raise
      self.calls.append((tuple(k.shape), None))
      return result

    changes = {"level_attention": spy}
    if real.all_levels is not None:
      def spy_all(q, levels, limits, **kwargs):
        shapes = [tuple(lv.k.shape) for lv in levels]
        try:
          result = real.all_levels(q, levels, limits, **kwargs)
        except backends.Unsupported as e:
          self.calls.extend((shape, f"Unsupported: {e}") for shape in shapes)
          raise
        if result is not None:     # None: the levels run one by one (recorded there)
          self.calls.extend((shape, None) for shape in shapes)
        elif case.takes_all is not None and case.takes_all(q, levels):
          self.declined.append(shapes)
        return result

      changes["all_levels"] = spy_all
    self.backend = dataclasses.replace(real, **changes)

  @property
  def name(self) -> str:
    return self.case.name

  def settings(self, fn):
    """Hypothesis settings of this backend: its share of the profile's examples."""
    base = settings().max_examples
    return settings(max_examples=max(1, math.ceil(base * self.case.examples)),
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])(fn)

  def run(self, fn, kv_shapes):
    """Calls fn(backend) and asserts one call of this backend per level, in order, with the
    levels' k shapes ([N,S,K,D]; [L,N,S,K,D] levels are sliced for backends that do not take
    a layer), none refused (a refusal would silently run XLA instead)."""
    self.calls.clear()
    self.declined.clear()
    result = fn(self.backend)
    assert not self.declined, f"{self.name}: all_levels declined calls {self.declined}"
    shapes = [shape for shape, _ in self.calls]
    refused = [why for _, why in self.calls if why]
    assert not refused, f"{self.name}: fell back to XLA: {refused}"
    assert shapes == [tuple(s) for s in kv_shapes], (
        f"{self.name} ran for levels {shapes}, expected {list(kv_shapes)}")
    return result


def _make(case: BackendCase) -> Spied:
  if case.registered not in backends.names():
    pytest.skip(f"backend {case.registered!r} is not registered here "
                f"(known: {backends.names()})")
  reason = case.skip() if case.skip else None
  if reason:
    pytest.skip(f"backend {case.name!r} cannot run here: {reason}")
  return Spied(case)


@pytest.fixture(params=BACKENDS, ids=[c.name for c in BACKENDS])
def backend(request) -> Spied:
  return _make(request.param)


@pytest.fixture
def mosaic_backend() -> Spied:
  return _make(MOSAIC)


@pytest.fixture
def mosaic_folded_backend() -> Spied:
  return _make(MOSAIC_FOLDED)



# An interpreted Mosaic GPU kernel whose warpgroups disagree on their steps waits on a barrier
# forever (run 11's staggered suffix steps did, on the H200 and in interpret mode): tests
# that run it take `hang_guard`, which ends the test process after this many seconds with
# every thread's traceback on stderr and exit status 1 (a failure, also for
# tests/mutation_check.py), instead of letting it run into CI's time limit.
HANG_SECONDS = float(os.environ.get("HYDRAX_TEST_HANG_SECONDS", "300"))


@pytest.fixture
def hang_guard():
  faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
  try:
    yield
  finally:
    faulthandler.cancel_dump_traceback_later()
