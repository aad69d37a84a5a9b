"""The experiment runner's generation_point on a mesh matches the single-device point."""

import numpy as np
import pytest

from experiments import points


@pytest.mark.slow
def test_generation_point_on_a_mesh_matches_one_device():
  kw = dict(batch=4, prefix=48, attention="hydragen", model="tiny", suffix=3,
            max_new_tokens=3, min_shared_tokens=0)
  one = points.generation_point(**kw)
  sharded = points.generation_point(mesh="4x2", **kw)
  assert sharded["new_tokens"] == one["new_tokens"] == 4 * 3
  assert sharded["shared_levels"] == one["shared_levels"] == 1
  assert sharded["decode_tokens_per_s"] > 0 and np.isfinite(sharded["prefill_s"])
  # The shared prefix is stored once per data shard that needs it: 4 shards here.
  assert sharded["kv_bytes"] > one["kv_bytes"]
