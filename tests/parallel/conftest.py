"""8 simulated CPU devices for the parallel tests.

XLA reads --xla_force_host_platform_device_count when jax's backend starts, so the flag is set
here, at collection, before any test of this folder runs. If something started the backend
earlier in this process (with fewer devices), the tests of this folder are skipped in-process
and `test_subprocess.py` runs them all in a fresh interpreter instead.
"""

import os
import sys

FLAG = "--xla_force_host_platform_device_count=8"
DEVICES = 8


def _backend_started() -> bool:
  if "jax" not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge
    return bool(getattr(xla_bridge, "_backends", {}))
  except ImportError:
    return True


if not _backend_started() and "xla_force_host_platform_device_count" not in \
    os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FLAG).strip()


def enough_devices() -> bool:
  import jax
  return jax.device_count() >= DEVICES


def pytest_collection_modifyitems(config, items):
  import pytest
  here = os.path.dirname(os.path.abspath(__file__))
  if enough_devices():
    return
  skip = pytest.mark.skip(reason=f"jax started with fewer than {DEVICES} devices before this "
                          "folder was collected; test_subprocess.py runs these tests")
  for item in items:
    if str(item.path).startswith(here) and item.path.name != "test_subprocess.py":
      item.add_marker(skip)
