"""Runs this folder's tests in a fresh interpreter when this one lacks 8 devices."""

import os
import subprocess
import sys

import pytest

from tests.parallel.conftest import FLAG, enough_devices


def test_parallel_tests_in_subprocess():
  if enough_devices():
    pytest.skip("8 devices in-process: the tests of this folder ran directly")
  here = os.path.dirname(os.path.abspath(__file__))
  root = os.path.dirname(os.path.dirname(here))
  env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + FLAG).strip())
  done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                         "-p", "no:xdist", here], cwd=root, env=env, capture_output=True,
                        text=True, timeout=900)
  assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
