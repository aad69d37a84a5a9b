"""Multi-device hydrax over JAX's own machinery: a `Mesh`, `jax.shard_map`, explicit collectives.

  make_mesh(spec=None, *, devices=None) -> Mesh          axes ("data", "model")
  axis_sizes(mesh) -> (data, model); check_mesh(mesh); DATA, MODEL
  check_model(config, mesh)                               ValueError if heads/MLP do not split
  param_specs(params, config, mesh) -> PartitionSpec tree; shard_params(params, config, mesh)
  init(config, mesh, *, seed=0, dtype=None) -> Llama       random params created sharded
  place_nodes(owner, data) -> NodePlacement                shared nodes over data shards
  QUERY_SPEC, LSE_SPEC, KV_SPEC, LEVEL_KV_SPEC, ROWS_SPEC  cache and query shardings
  hydragen_attention(q, levels, *, mesh, causal_last=True, scale=None, backend="auto")
  apply(model, params, tokens, positions=None, *, mesh)   sharded forward -> logits [B,T,V]
  generate(model, params, prompts, *, mesh, max_new_tokens, ...)  = engine.generate(mesh=...)
  forward_shard, attend_shard, OwnerTable                 per-shard building blocks

Layout: sequences (and the shared nodes they own) over `data`; attention heads, KV heads, MLP
columns and the vocabulary over `model` (tensor parallel, two psums per layer). The rules are
in `hydrax.parallel.rules`, the step in `hydrax.parallel.step`; generation is
`hydrax.engine.generate(..., mesh=...)` (one loop for one device and a mesh). Several hosts:
call `jax.distributed.initialize()` first (the experiment runner's --distributed flag);
`make_mesh()` then spans every process's devices.
"""

from hydrax.parallel.generate import generate
from hydrax.parallel.mesh import AXES, DATA, MODEL, axis_sizes, check_mesh, make_mesh
from hydrax.parallel.rules import (KV_SPEC, LEVEL_KV_SPEC, LSE_SPEC, QUERY_SPEC, ROWS_SPEC,
                                   NodePlacement, check_model, init, param_specs,
                                   place_nodes, shard_params, vocab_sharded)
from hydrax.parallel.step import (OwnerTable, apply, attend_shard, forward_shard,
                                  hydragen_attention)

__all__ = ["make_mesh", "axis_sizes", "check_mesh", "AXES", "DATA", "MODEL", "check_model",
           "init", "param_specs", "shard_params", "vocab_sharded", "place_nodes", "NodePlacement",
           "QUERY_SPEC", "LSE_SPEC", "KV_SPEC", "LEVEL_KV_SPEC", "ROWS_SPEC",
           "hydragen_attention", "apply", "generate",
           "forward_shard", "attend_shard", "OwnerTable"]
