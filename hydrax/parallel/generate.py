"""Sharded generation: `hydrax.engine.generate` with a mesh (one loop serves both).

  generate(model, params, prompts, *, mesh, **engine_kwargs) -> hydrax.engine.Generation

The engine runs its prefill and decode per data shard under `jax.shard_map` (see
`hydrax.engine`'s module docstring for the layout over "data" and "model").
"""

from __future__ import annotations

from hydrax import engine

clear_compiled_cache = engine.clear_compiled_cache


def generate(model, params=None, prompts=None, *, mesh, **kwargs) -> engine.Generation:
  """`hydrax.engine.generate(model, params, prompts, mesh=mesh, **kwargs)`; mesh: a Mesh from
  `hydrax.parallel.make_mesh` or a spec it takes ("2x4", (2, 4), ...)."""
  if mesh is None:
    raise ValueError("mesh is None: hydrax.parallel.generate needs a mesh (or call "
                     "hydrax.engine.generate for one device)")
  return engine.generate(model, params, prompts, mesh=mesh, **kwargs)
