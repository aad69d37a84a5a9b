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


def _exported_shape(kernel):
  """The kernel exported for CUDA on f(q [64,D], k, v [128,D]) bf16: its output's shape."""
  sds, d = jax.ShapeDtypeStruct, probe.D
  args = (sds((64, d), jnp.bfloat16), sds((128, d), jnp.bfloat16), sds((128, d), jnp.bfloat16))
  return export.export(jax.jit(kernel), platforms=["cuda"])(*args).out_avals[0].shape


@pytest.mark.parametrize("step", probe.STEPS)
def test_step_lowers_for_the_gpu(step):
  assert _exported_shape(probe.step_kernel(step, 4, 2)) == (2, 64, probe.D)


@pytest.mark.parametrize("mapping", probe.THREAD_MAPPINGS)
def test_thread_step_lowers_for_the_gpu(mapping):
  assert _exported_shape(probe.thread_step_kernel(4, 2, mapping)) == (2, 64, probe.D)


def test_thread_step_merge_matches_the_reference():
  # (the host-side merge of the 4 warps' parts, on parts built in NumPy the kernel's way)
  import numpy as np
  rng = np.random.default_rng(0)
  d = probe.D
  q, k, v = (rng.standard_normal(s) for s in ((64, d), (128, d), (128, d)))
  s = q[:4] @ k.T * d ** -0.5 * probe.LOG2E                # base 2, [4 rows, 128 keys]
  out = np.zeros((64, d))
  for w in range(4):                                      # warp w: keys 16w.. of each half
    ks = [h * 64 + w * 16 + j for h in (0, 1) for j in range(16)]
    m = s[:, ks].max(axis=1)
    p = np.exp2(s[:, ks] - m[:, None])
    out[4 * w:4 * w + 4] = p @ v[ks]
    out[16 + 4 * w:20 + 4 * w, 0], out[16 + 4 * w:20 + 4 * w, 1] = m, p.sum(axis=1)
  np.testing.assert_allclose(probe.thread_step_merge(out), probe.thread_step_reference(q, k, v),
                             rtol=1e-5, atol=1e-6)


def test_unknown_step_raises():
  # (a name outside STEPS or THREAD_MAPPINGS must not silently run one of the forms)
  with pytest.raises(ValueError, match=r"step 'cc': one of"):
    probe.step_kernel("cc", 4, 2)
  with pytest.raises(ValueError, match=r"mapping 'keys': one of"):
    probe.thread_step_kernel(4, 2, "keys")
