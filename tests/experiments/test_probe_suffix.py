"""experiments/probe_transposed_suffix.py: every step its `--time` run times lowers for the GPU.

The steps are timed only on the H200; here each is exported for CUDA from the CPU (Pallas
lowers it to Mosaic GPU's module, layouts and wgmma checked; only the PTX compile waits for a
GPU), so that a change in the probe or in jax that breaks one shows here, not in a GPU call.
"""

import jax
import jax.numpy as jnp
import pytest
from jax import export

from experiments import probe_transposed_suffix as probe


@pytest.mark.parametrize("step", probe.STEPS)
def test_step_lowers_for_the_gpu(step):
  sds = jax.ShapeDtypeStruct
  d = probe.D
  args = (sds((64, d), jnp.bfloat16), sds((128, d), jnp.bfloat16), sds((128, d), jnp.bfloat16))
  exported = export.export(jax.jit(probe.step_kernel(step, 4, 2)), platforms=["cuda"])(*args)
  assert exported.out_avals[0].shape == (2, 64, d)


def test_unknown_step_raises():
  # (a name outside STEPS must not silently run one of the forms)
  with pytest.raises(ValueError, match=r"step 'cc': one of"):
    probe.step_kernel("cc", 4, 2)
