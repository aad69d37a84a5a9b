"""The device mesh: two named axes, `data` (sequences) and `model` (heads, MLP columns).

A mesh is JAX's own `jax.sharding.Mesh`; hydrax only fixes the axis names and their meaning:

  data   sequences B (and the shared nodes they need) are split over it; no communication.
  model  tensor parallelism: attention heads H, KV heads K, MLP columns F and the vocabulary V
         are split over it; two all-reduces (psum) per layer.

Both axes are `AxisType.Auto` (jax 0.10 defaults `jax.make_mesh` to Explicit axes, under which
arrays carry their sharding in their types); hydrax's sharded functions run under
`jax.shard_map`, where every collective is written out.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import jax
import numpy as np
from jax.sharding import Mesh

DATA = "data"
MODEL = "model"
AXES = (DATA, MODEL)

MeshSpec = Union[None, str, Sequence[int], Mapping[str, int], Mesh]


def _parse(spec, count: int) -> tuple:
  """(data, model) sizes from a spec (see `make_mesh`), with -1 resolved."""
  if spec is None:
    # Tensor parallel inside a process (fast links), data parallel across processes.
    local = jax.local_device_count()
    if count % local:
      return 1, count
    return count // local, local
  if isinstance(spec, str):
    parts = spec.lower().replace(",", "x").split("x")
    try:
      spec = tuple(int(p) for p in parts)
    except ValueError:
      raise ValueError(f"mesh spec {spec!r} must look like 'DATAxMODEL', e.g. '2x4'") from None
  if isinstance(spec, Mapping):
    unknown = sorted(set(spec) - set(AXES))
    if unknown:
      raise ValueError(f"mesh spec has unknown axes {unknown}; hydrax's axes are {list(AXES)}")
    spec = (spec.get(DATA, -1 if MODEL in spec else 1), spec.get(MODEL, -1))
  try:
    sizes = [int(s) for s in spec]
  except (TypeError, ValueError):
    raise ValueError(f"mesh spec must be None, 'DATAxMODEL', (data, model) or "
                     f"{{'data': d, 'model': m}}, got {spec!r}") from None
  if len(sizes) != 2:
    raise ValueError(f"mesh spec must give two sizes (data, model), got {spec!r}")
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh sizes must be positive (at most one -1 = the rest), got {spec!r}")
  if -1 in sizes:
    known = int(np.prod([s for s in sizes if s != -1]))
    if count % known:
      raise ValueError(f"mesh spec {spec!r}: {count} devices are not divisible by {known}")
    sizes[sizes.index(-1)] = count // known
  if sizes[0] * sizes[1] != count:
    raise ValueError(f"mesh spec {tuple(sizes)} needs {sizes[0] * sizes[1]} devices, but "
                     f"{count} are given (jax.devices() or devices=)")
  return sizes[0], sizes[1]


def make_mesh(spec: MeshSpec = None, *, devices: Optional[Sequence] = None) -> Mesh:
  """A `Mesh` with axes ("data", "model") over `devices` (default: all of `jax.devices()`).

  spec: (data, model) sizes, one of them may be -1 ("the rest"); a dict
    {"data": d, "model": m}; a string "2x4"; an existing Mesh (checked and returned); or None:
    model = the devices of one process (tensor parallel over the fast intra-host links),
    data = the number of processes.
  The product of the sizes must equal the number of devices. Axis types are Auto.
  """
  if isinstance(spec, Mesh):
    return check_mesh(spec)
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError("make_mesh: no devices")
  shape = _parse(spec, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * 2
  try:
    return jax.make_mesh(shape, AXES, axis_types=auto, devices=devices)
  except TypeError:  # a jax whose make_mesh has no devices= / axis_types=
    from jax.experimental import mesh_utils
    return Mesh(mesh_utils.create_device_mesh(shape, devices), AXES, axis_types=auto)


def check_mesh(mesh) -> Mesh:
  """Checks that `mesh` is a Mesh with exactly the axes "data" and "model"; returns it."""
  if not isinstance(mesh, Mesh):
    raise ValueError(f"mesh must be a jax.sharding.Mesh (see hydrax.parallel.make_mesh), got "
                     f"{type(mesh).__name__}")
  if set(mesh.axis_names) != set(AXES):
    raise ValueError(f"mesh axes must be {list(AXES)}, got {list(mesh.axis_names)}; build it "
                     "with hydrax.parallel.make_mesh")
  return mesh


def axis_sizes(mesh: Mesh) -> tuple:
  """(data, model) sizes of a hydrax mesh."""
  check_mesh(mesh)
  return int(mesh.shape[DATA]), int(mesh.shape[MODEL])
