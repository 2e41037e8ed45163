"""The file-level pieces of gn.train.checkpoint: integrity hashes and fsync, finiteness
checks, the process/barrier helpers of multi-process saves, and the restore target.

Kept apart so that `checkpoint.py` holds only the save/restore protocol (`Checkpointer`);
`checkpoint.py` re-exports every name, and tests patch them there.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
from typing import Any, Iterator

import jax
import numpy as np

# One copy of the process helpers (gn.train.distributed); the names stay for gn.train.checkpoint.
from gn.train.distributed import barrier as _barrier, process as _process  # noqa: F401

class CheckpointWarning(UserWarning):
    """A checkpoint was refused, or found corrupted/partial and skipped."""


@contextlib.contextmanager
def _quiet_orbax() -> Iterator[None]:
    # orbax logs a dozen INFO lines per save through absl; once the trainer
    # configures logging at INFO they would flood the console.
    logger = logging.getLogger("absl")
    old = logger.level
    if logger.getEffectiveLevel() < logging.WARNING:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(old)


def _ocp():
    # Imported lazily: orbax pulls in tensorstore and friends, which costs a
    # noticeable amount of start-up time for commands that never checkpoint.
    import orbax.checkpoint as ocp

    return ocp


def _json_default(x: Any) -> Any:
    # Metadata often carries numpy/jax scalars (RNG words, metric values).
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, (np.ndarray, jax.Array)):
        return np.asarray(x).tolist()
    raise TypeError(f"meta value of type {type(x).__name__} is not JSON-serialisable")


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@jax.jit
def _finite_flags(leaves: list) -> list:
    return [jax.numpy.isfinite(x).all() for x in leaves]


def _non_finite_leaves(state: Any) -> list[str]:
    """Key paths of floating leaves of `state` that contain NaN/Inf."""
    paths, flags, arrays = [], [], []
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        if isinstance(leaf, bool) or leaf is None:
            continue
        if isinstance(leaf, float):
            if not math.isfinite(leaf):
                flags.append(False)
                paths.append(jax.tree_util.keystr(path))
            continue
        dtype = getattr(leaf, "dtype", None)
        # jnp.issubdtype, not np's: numpy does not count bfloat16/float8 as inexact.
        if dtype is None or not jax.numpy.issubdtype(dtype, jax.numpy.inexact):
            continue
        if isinstance(leaf, jax.Array):
            arrays.append((jax.tree_util.keystr(path), leaf))
        else:
            flags.append(bool(np.isfinite(np.asarray(leaf)).all()))
            paths.append(jax.tree_util.keystr(path))
    if arrays:
        # One compiled program for every device array, reduced on device and fetched in one
        # transfer. Not one program per leaf: on sharded arrays each is a collective, and many
        # collective programs in flight at once can deadlock XLA:CPU's simulated devices.
        paths += [p for p, _ in arrays]
        flags += list(jax.device_get(_finite_flags([x for _, x in arrays])))
    return [p for p, f in zip(paths, flags) if not bool(f)]


def _default_sharding() -> jax.sharding.Sharding:
    dev = getattr(jax.config, "jax_default_device", None)  # None, Device or platform
    if dev is None:
        dev = jax.devices()[0]
    elif isinstance(dev, str):
        dev = jax.devices(dev)[0]
    return jax.sharding.SingleDeviceSharding(dev)


def _restore_target(abstract_state: Any) -> Any:
    """Map the caller's abstract pytree to something orbax accepts as target."""
    default = None

    def leaf(x: Any) -> Any:
        nonlocal default
        if isinstance(x, jax.ShapeDtypeStruct):
            if x.sharding is not None:
                return x
            # Without a sharding orbax falls back to whatever was recorded at
            # save time (numpy for numpy leaves) and newer versions warn.
            default = default or _default_sharding()
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=default)
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        if isinstance(x, np.generic):
            # orbax rejects numpy scalars as restore targets (saving is fine).
            return np.zeros((), x.dtype)
        return x

    return jax.tree.map(leaf, abstract_state)


def _fix_numpy_scalars(abstract_state: Any, restored: Any) -> Any:
    return jax.tree.map(
        lambda a, r: a.dtype.type(np.asarray(r)) if isinstance(a, np.generic) else r,
        abstract_state,
        restored,
    )
