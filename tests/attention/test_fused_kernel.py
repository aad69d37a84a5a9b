"""The fused Triton kernel itself, in Triton's interpreter, against the float64 oracle.

Runs tests/attention/fused_interpret_cases.py in a subprocess with TRITON_INTERPRET=1 (Triton
reads it when first imported), and once without it to compile the kernel for sm_90 (Triton's
own toolchain, no GPU needed). Skipped where triton is not installed (CI: triton and
jax-triton are optional GPU dependencies, never test dependencies) or its interpreter cannot
run here; locally: `pip install triton` (and NumPy < 2.4 for Triton 3.6's interpreter).
The same kernel on the H200 through jax-triton: experiments/check_fused_h200.py.
"""

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="triton is not installed (optional; the kernel's interpreter run)")
def test_fused_kernel_in_triton_interpreter_matches_oracle():
  env = {**os.environ, "TRITON_INTERPRET": "1", "JAX_PLATFORMS": "cpu"}
  res = subprocess.run([sys.executable, "-m", "tests.attention.fused_interpret_cases"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  if res.returncode == 3:
    pytest.skip(res.stdout.strip().splitlines()[-1])
  assert res.returncode == 0 and res.stdout.strip().endswith("ok"), (
      res.stdout[-3000:] + res.stderr[-3000:])


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="triton is not installed (optional; the kernel's sm_90 compile)")
def test_fused_kernel_compiles_for_hopper_without_spills():
  env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
  env["JAX_PLATFORMS"] = "cpu"
  res = subprocess.run([sys.executable, "-m", "tests.attention.fused_interpret_cases",
                        "--compile"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
  assert res.returncode == 0 and res.stdout.strip().endswith("ok"), (
      res.stdout[-3000:] + res.stderr[-3000:])
  for line in res.stdout.splitlines():
    # The timed configurations at their default launch settings: no register spills (Triton
    # 3.6; the shared tiles spilled 32 B with 64-bit offsets within a node).
    if "decode_bf16" in line:
      spill = int(line.split("'spill_bytes': ")[1].split(",")[0])
      assert spill == 0, line
