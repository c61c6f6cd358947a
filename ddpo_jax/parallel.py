"""Device mesh and shardings.

Every phase runs under one `jax.sharding.Mesh` with a `data` axis over all devices: trajectory
arrays are split along their leading (sample) axis, parameters and optimizer state are
replicated. Batch sizes in configs are global (all devices together).
"""
from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  # Auto axes: XLA propagates shardings from the explicit in/out shardings of each jit.
  return jax.make_mesh((len(devices),), (DATA_AXIS,), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading axis split over the `data` axis, the rest replicated."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_divisible(name: str, value: int, mesh: Mesh) -> None:
  n = mesh.shape[DATA_AXIS]
  if value % n:
    raise ValueError(f"{name}={value} is not divisible by the {n} devices of the data axis; "
                     f"batch sizes are global and must split evenly over devices")
