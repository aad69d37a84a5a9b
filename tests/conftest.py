"""Shared test settings: hypothesis profiles sized for a 2-core CI machine, 8 simulated CPU
devices for tests/parallel (set here, before any test module can start jax's backend;
otherwise tests/parallel falls back to rerunning itself in a subprocess, ~2 minutes more), and
a cheaper XLA CPU code generator.

XLA compilation dominates the suite on CPU (tiny models, interpret-mode kernels: most tests
compile far longer than they run). `--xla_backend_optimization_level=0` lowers LLVM's
optimisation of the generated machine code only: the HLO, its fusions and every HLO pass are
unchanged (the tests that read compiled HLO see the same program), and XLA emits no fast-math
flags, so float results do not change. It cut the CPU time of compile-bound tests by 25-40%
on the 2-core machine. `--xla_cpu_use_fusion_emitters=false` emits the CPU fusions with XLA's
older elemental emitters instead of its MLIR fusion pipeline, which compiles far faster
at -O0: a tiny-model generation's compiles 2.2 -> 0.9-1.1 s, an attention compile 2.1-2.3 ->
0.9-1.2 s (jax 0.10.2 here; without -O0 the old emitters are slower, so only both together).
Unlike -O0 alone, the old emitters can round a transcendental function 1 ulp differently in two
programs that compute the same thing with different shapes or shardings (seen in the sharded
parameter init, whose test compares to float32 rounding). Together they took the suite from
889-1055 s to 556 s on the 2-core machine (WORKSPACE.md, Tests). Both are set only when jax
will run on CPU alone (no accelerator plugin, or JAX_PLATFORMS=cpu), and never over a value the
caller chose. Subprocesses (the notebooks' kernel, `python -m ...` runs) inherit the flags
through the environment.
"""

import gc
import importlib.util
import os

from hypothesis import HealthCheck, settings


def _cpu_only() -> bool:
  """Whether jax can only run on CPU here (decided before jax is imported)."""
  platforms = [p for p in os.environ.get("JAX_PLATFORMS", "").split(",") if p]
  if platforms:
    return set(platforms) == {"cpu"}
  return not any(importlib.util.find_spec(m) for m in ("jax_plugins", "libtpu"))


def _add_xla_flag(name: str, value) -> None:
  flags = os.environ.get("XLA_FLAGS", "")
  if name not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --{name}={value}".strip()


_add_xla_flag("xla_force_host_platform_device_count", 8)
if _cpu_only():
  _add_xla_flag("xla_backend_optimization_level", 0)
  _add_xla_flag("xla_cpu_use_fusion_emitters", "false")


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: takes 10 s or more on the 2-core CI machine; collected first (below)")


def pytest_collection_modifyitems(items):
  """Slow tests first, otherwise in file order: under `-n 2` a long test that starts last
  leaves the other worker idle while it runs. (pyproject.toml's `--dist=loadgroup` sends
  each xdist_group, largest first, then the other tests one by one in this order.)"""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_sessionfinish():
  """After the last test: one full collection (garbage found now still reports its __del__
  errors), then the session's heap is frozen. pytest's unconfigure then runs five more
  collections; over a worker's heap (~0.5M objects: jax, torch, compiled programs) they took
  over 5 s on the loaded 2-core machine, and execnet SIGINTs an xdist worker whose shutdown
  takes longer than 5 s (a KeyboardInterrupt printed in hypothesis' gc callback)."""
  gc.collect()
  gc.freeze()


settings.register_profile(
    "ci", max_examples=int(os.environ.get("HYDRAX_EXAMPLES", "15")), deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True, print_blob=True)
settings.register_profile("thorough", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
