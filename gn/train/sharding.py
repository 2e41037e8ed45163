"""The FSDP sharding rule: one NamedSharding per leaf, decided by its shape alone.

A leaf of at least `min_size` elements has its largest dimension divisible by
the mesh's fsdp size split over the 'fsdp' axis (the first such dimension on a
tie); every other leaf (scalars, step counters, small vectors, shapes with no
divisible dimension) is replicated. Because the rule reads only shapes, the
optimizer-state leaves that mirror a parameter (Adam moments, Muon momentum,
the GN inner iterate) get the parameter's sharding without any bookkeeping,
and the same function applies to params, optimizer state and EMA alike.

`constrainer(mesh, min_size)` gives methods a function that pins a pytree to
these shardings inside their jitted steps (`with_sharding_constraint`), so a
step's outputs keep the layout XLA might otherwise change by propagation.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gn.train.mesh import FSDP_AXIS, fsdp_size, place

# Leaves smaller than this (elements) stay replicated by default: splitting a norm
# scale or a bias buys no memory and costs a collective per use.
DEFAULT_MIN_SIZE = 1024


def leaf_spec(shape: tuple[int, ...], fsdp: int, min_size: int = DEFAULT_MIN_SIZE) -> P:
    """The PartitionSpec of a leaf of `shape` on an fsdp axis of size `fsdp`."""
    if fsdp <= 1 or len(shape) == 0 or math.prod(shape) < min_size:
        return P()
    divisible = [i for i, d in enumerate(shape) if d % fsdp == 0]
    if not divisible:
        return P()
    axis = max(divisible, key=lambda i: (shape[i], -i))   # largest; the first on a tie
    spec = [None] * len(shape)
    spec[axis] = FSDP_AXIS
    return P(*spec)


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(getattr(x, "shape", np.shape(x)))


def tree_shardings(tree: Any, mesh: Mesh, min_size: int = DEFAULT_MIN_SIZE) -> Any:
    """A pytree of NamedSharding, one per leaf of `tree` (arrays or ShapeDtypeStructs)."""
    n = fsdp_size(mesh)
    return jax.tree.map(lambda x: NamedSharding(mesh, leaf_spec(_shape(x), n, min_size)), tree)


def shard_tree(tree: Any, mesh: Mesh, min_size: int = DEFAULT_MIN_SIZE) -> Any:
    """`tree` placed on the mesh by the rule (a copy only where a leaf's layout changes)."""
    return place(tree, tree_shardings(tree, mesh, min_size))


def constrainer(mesh: Mesh, min_size: int = DEFAULT_MIN_SIZE) -> Callable[[Any], Any]:
    """A function pinning a pytree to the rule's shardings inside `jit`.

    With an fsdp axis of size 1 it is the identity: every leaf is replicated
    anyway, and the compiled steps stay exactly those of a data-parallel run.
    """
    if fsdp_size(mesh) <= 1:
        return lambda tree: tree
    return lambda tree: jax.lax.with_sharding_constraint(tree, tree_shardings(tree, mesh, min_size))


__all__ = ["DEFAULT_MIN_SIZE", "leaf_spec", "tree_shardings", "shard_tree", "constrainer"]
