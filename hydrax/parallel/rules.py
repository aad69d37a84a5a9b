"""Sharding rules: which array axis goes to which mesh axis, and where shared nodes live.

Parameters (Megatron-style tensor parallelism over `model`, M its size); the layers' arrays
carry a leading [L] axis (stacked layers), never sharded:
  attn.qkv                kernel [E, K, G+2, D]  KV heads over model: K/M KV heads per shard,
                          each with its G query heads, key and value (query head h reads KV
                          head h // G, so a shard's query heads read only its own KV heads)
  attn.o                  kernel [H*D, E]  rows over model, then psum over model
  mlp.gate, mlp.up        kernel [E, F]    columns over model
  mlp.down                kernel [F, E]    rows over model, then psum over model
  lm_head                 kernel [E, V]    columns over model when M divides V (logits are
                          vocab-sharded: greedy takes a sharded argmax, sampling all-gathers
                          the logits); replicated otherwise
  embed, norms            replicated (a token lookup needs every row of the table)

Caches and queries: rows (sequences B, or nodes N) over `data`, KV heads K (query heads H)
over `model`: k, v [L,N,S,K,D] -> P(None, data, None, model, None); q [B,T,H,D] ->
P(data, None, model, None).

Shared nodes over `data` (`place_nodes`): the B sequences, in plan order, are cut into `data`
contiguous blocks of B/data rows. Each data shard stores the nodes its rows own, re-indexed
0..n_s-1 (padded to the largest n_s with length-0 nodes). A node whose sequences span several
shards is stored on each of them (replicated; no communication at attention time). The
sharing plan's order is depth-first, so the sequences of a node are contiguous and a node of
n sequences spans at most ceil(n / (B/data)) + 1 shards.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from hydrax.parallel.mesh import DATA, MODEL, axis_sizes

QUERY_SPEC = P(DATA, None, MODEL, None)      # q, out [B,T,H,D]
LSE_SPEC = P(DATA, None, MODEL)              # lse [B,T,H]
KV_SPEC = P(None, DATA, None, MODEL, None)   # cache k, v [L,N,S,K,D]
LEVEL_KV_SPEC = P(DATA, None, MODEL, None)   # one layer's k, v [N,S,K,D]
ROWS_SPEC = P(DATA)                          # anything with rows (B or N) first


def check_model(config, mesh) -> None:
  """Raises a ValueError when the model's heads or MLP cannot be split over `model`."""
  _, m = axis_sizes(mesh)
  name = getattr(config, "name", "custom")
  if config.num_kv_heads % m:
    raise ValueError(
        f"config {name!r} has num_kv_heads={config.num_kv_heads} (num_heads="
        f"{config.num_heads}), which the mesh's model axis of size {m} does not divide: "
        f"tensor parallelism puts num_kv_heads/model KV heads on each device. Use a model axis "
        f"size that divides {config.num_kv_heads} (and put the other devices on 'data').")
  if config.num_heads % m:
    raise ValueError(f"config {name!r} has num_heads={config.num_heads}, which the mesh's "
                     f"model axis of size {m} does not divide")
  if config.intermediate_size % m:
    raise ValueError(f"config {name!r} has intermediate_size={config.intermediate_size}, "
                     f"which the mesh's model axis of size {m} does not divide")


def vocab_sharded(config, mesh) -> bool:
  """Whether the output head is split over `model` (untied head and M divides V)."""
  _, m = axis_sizes(mesh)
  return not config.tie_word_embeddings and config.vocab_size % m == 0


def _names(path) -> tuple:
  out = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        out.append(getattr(key, attr))
        break
  return tuple(out)


def _param_spec(names: tuple, ndim: int, shard_vocab: bool):
  lead = (None,) if "layers" in names else ()     # the stacked layers' [L] axis: unsharded
  if "kernel" in names and "qkv" in names and ndim == len(lead) + 4:
    return P(*lead, None, MODEL, None, None)
  if ndim != len(lead) + 2 or "kernel" not in names:
    return P()
  if "attn" in names:
    return P(*lead, MODEL, None) if "o" in names else P(*lead, None, MODEL)
  if "mlp" in names:
    return P(*lead, MODEL, None) if "down" in names else P(*lead, None, MODEL)
  if "lm_head" in names:
    return P(None, MODEL) if shard_vocab else P()
  return P()


def param_specs(params, config, mesh):
  """PartitionSpecs for a Llama's params (an `nnx.State`), same tree structure.

  Checks the model against the mesh first (`check_model`).
  """
  check_model(config, mesh)
  shard_vocab = vocab_sharded(config, mesh)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: _param_spec(_names(path), len(x.shape), shard_vocab), params)


def put(x, sharding: NamedSharding):
  """`x` (host or device array) placed with `sharding`; works across processes too (every
  process must hold the same full value)."""
  if sharding.is_fully_addressable:
    return jax.device_put(x, sharding)
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_tree(tree, specs, mesh):
  """Places every array of `tree` with the PartitionSpec at the same place in `specs`."""
  return jax.tree_util.tree_map(lambda x, s: put(x, NamedSharding(mesh, s)), tree, specs)


def shard_params(params, config, mesh):
  """Llama params placed on the mesh per `param_specs`."""
  return shard_tree(params, param_specs(params, config, mesh), mesh)


def to_host(x) -> np.ndarray:
  """A global array as a full NumPy array on every process."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(x)
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class NodePlacement(NamedTuple):
  """Where the nodes of one shared level live over `data` (see the module docstring).

  nodes: [data, N_local] int, global node index of each local node; -1 for padding.
  owner: [data, B/data] int, each local row's local node index.
  count: [data] int, real local nodes per shard.
  """
  nodes: np.ndarray
  owner: np.ndarray
  count: np.ndarray

  @property
  def replication(self) -> float:
    """Stored nodes over distinct nodes (1.0: no node spans two shards)."""
    real = self.nodes[self.nodes >= 0]
    return real.size / max(np.unique(real).size, 1)


def place_nodes(owner, data: int) -> NodePlacement:
  """Local node sets for `data` contiguous blocks of rows. owner: [B] int, B % data == 0."""
  owner = np.asarray(owner)
  if owner.ndim != 1 or not np.issubdtype(owner.dtype, np.integer):
    raise ValueError(f"owner must be a 1-D integer array [B], got shape {owner.shape} dtype "
                     f"{owner.dtype}")
  b = owner.shape[0]
  if data < 1 or b % data:
    raise ValueError(f"B={b} sequences cannot be split evenly over a data axis of size {data}; "
                     "use a batch that the data axis divides")
  rows = owner.reshape(data, b // data)
  local = [np.unique(r) for r in rows]
  width = max(max(len(u) for u in local), 1)
  nodes = np.full((data, width), -1, np.int64)
  local_owner = np.zeros(rows.shape, np.int64)
  for s, u in enumerate(local):
    nodes[s, :len(u)] = u
    local_owner[s] = np.searchsorted(u, rows[s])
  return NodePlacement(nodes, local_owner, np.array([len(u) for u in local], np.int64))


def init(config, mesh, *, seed: int = 0, dtype=None):
  """`hydrax.models.llama.init(config, seed=seed, dtype=dtype)` with its parameters created
  already sharded per `param_specs` (no device ever holds the whole model): the same values,
  for models that do not fit on one device and for several hosts."""
  import jax.numpy as jnp
  from flax import nnx

  from hydrax.models import llama
  dtype = jnp.float32 if dtype is None else dtype
  graphdef, abstract_params = nnx.split(llama.abstract(config, dtype=dtype))
  specs = param_specs(abstract_params, config, mesh)
  shardings = jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs)
  params = jax.jit(lambda: nnx.state(llama.init(config, seed=seed, dtype=dtype)),
                   out_shardings=shardings)()
  return nnx.merge(graphdef, params)
