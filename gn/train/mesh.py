"""Device mesh and batch sharding.

The trainer always runs under a `jax.sharding.Mesh` with one 'data' axis over
all devices (Auto axis types: under the Explicit default of `jax.make_mesh`,
some cross-entropy gradients raise on jax 0.12). Parameters are replicated and
batches sharded along their batch dimension; XLA inserts the gradient
all-reduce. Multi-host: call `jax.distributed.initialize()` first (the CLI's
`--distributed` flag); every host builds the same global batch from the same
seed and `make_array_from_callback` places only its addressable shards.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D data-parallel mesh over the first `num_devices` devices (default all)."""
    devices = jax.devices()
    n = num_devices or len(devices)
    return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=devices[:n])


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, batch_axis: int = 1) -> NamedSharding:
    """Sharding of a [n, batch, T+1] stack of batches along its batch axis."""
    spec = [None] * (batch_axis + 1)
    spec[batch_axis] = DATA_AXIS
    return NamedSharding(mesh, P(*spec))


def put_batches(batches: np.ndarray, mesh: Mesh) -> jax.Array:
    """Place a host [n, batch, T+1] array on the mesh, sharded along batch."""
    sharding = batch_sharding(mesh)
    return jax.make_array_from_callback(batches.shape, sharding, lambda idx: batches[idx])


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    """Replicate a pytree of arrays on every device of the mesh."""
    return jax.device_put(tree, replicated(mesh))
