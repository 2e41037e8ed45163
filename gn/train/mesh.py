"""Device mesh, batch sharding and parameter sharding (FSDP).

The trainer runs under a 2-D `jax.sharding.Mesh` with axes ('data', 'fsdp')
over all devices, of shape (devices / train.fsdp, train.fsdp). Both axes have
Auto types: under the Explicit default of `jax.make_mesh` some cross-entropy
gradients raise on jax 0.12, and Auto lets XLA's sharding propagation insert
the collectives (gradient all-reduce, parameter all-gathers).

* Batches: a [n, batch, T+1] stack is sharded along its batch dimension over
  both axes (data × fsdp), so every device reads batch / devices sequences.
* Parameters, optimizer state and EMA: sharded by a pure rule of each leaf's
  shape (gn.train.sharding): the largest dimension divisible by the fsdp size
  is split over 'fsdp'; small leaves (fewer than train.fsdp_min_size elements),
  scalars and leaves with no divisible dimension are replicated. With
  train.fsdp = 1 (the default) everything is replicated: data parallelism only,
  numerically identical to the 1-D data mesh this replaced.
* Checkpoints hold global arrays; they restore onto the *current* mesh's
  shardings, so a run saved on 8 devices with fsdp = 8 resumes on 1 device or
  on 4 devices with fsdp = 4 (gn.train.checkpoint).

Several processes: start `jax.distributed` first (the CLI's `--distributed`,
gn.train.distributed); every process builds the same global batch from the same
seed and `make_array_from_callback` places only its addressable shards (`place`
does the same for states made on one host).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gn.errors import require

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)   # the batch dimension is split over both


def check_mesh(num_devices: int, fsdp: int) -> None:
    """ConfigError unless an fsdp axis of size `fsdp` fits `num_devices` devices."""
    require(fsdp >= 1, f"train.fsdp must be a positive integer (1 = no parameter sharding), got {fsdp}.")
    require(num_devices % fsdp == 0,
            f"train.fsdp = {fsdp} does not divide the {num_devices} devices: the mesh is "
            f"(data = devices / fsdp, fsdp); choose a divisor of {num_devices}.")


def make_mesh(num_devices: int | None = None, fsdp: int = 1) -> Mesh:
    """A (data, fsdp) mesh over the first `num_devices` devices (default all), fsdp of size `fsdp`."""
    devices = jax.devices()
    n = num_devices or len(devices)
    require(n <= len(devices), f"A mesh of {n} devices was asked for, but only {len(devices)} are visible.")
    check_mesh(n, fsdp)
    auto = jax.sharding.AxisType.Auto
    return jax.make_mesh((n // fsdp, fsdp), BATCH_AXES, axis_types=(auto, auto), devices=devices[:n])


def fsdp_size(mesh: Mesh) -> int:
    """Size of the mesh's fsdp axis (1 for a mesh without one)."""
    return int(mesh.shape.get(FSDP_AXIS, 1))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, batch_axis: int = 1) -> NamedSharding:
    """Sharding of a [n, batch, T+1] stack of batches along its batch axis, over every mesh axis."""
    spec = [None] * (batch_axis + 1)
    spec[batch_axis] = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    return NamedSharding(mesh, P(*spec))


def put_batches(batches: np.ndarray, mesh: Mesh) -> jax.Array:
    """Place a host [n, batch, T+1] array on the mesh, sharded along batch."""
    sharding = batch_sharding(mesh)
    return jax.make_array_from_callback(batches.shape, sharding, lambda idx: batches[idx])


def place(tree: Any, shardings: Any) -> Any:
    """`jax.device_put(tree, shardings)`, also for shardings that span several processes.

    With several processes, a process-local jax.Array (one made by `jnp` on this host's
    device) is copied to the host and placed shard by shard: jax 0.10's `device_put` of such
    an array onto a multi-process NamedSharding returns an array whose shards cannot be
    listed, which orbax's save then rejects. With one process it is `device_put` itself."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def one(x, sharding):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.device_put(x, sharding)      # already global: a reshard
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: one(x, shardings), tree)
    return jax.tree.map(one, tree, shardings)


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    """Replicate a pytree of arrays on every device of the mesh."""
    return place(tree, replicated(mesh))
