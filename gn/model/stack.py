"""Running the stack of transformer blocks: unrolled, or as one `lax.scan`; optionally rematerialised.

The blocks are applied as a pure function `block(p, x) -> x` of one block's
parameters `p` (the tree under "block_i") and the residual stream x. Nothing here
changes the parameter tree: with `scan`, the per-block trees are stacked along a
new leading axis (`stack_trees`) inside the traced function, so the
caller's parameters, their gradients, optimizer states, masks, the layerwise
partition and checkpoints keep one entry per block. Stacking is linear, so
`jax.grad`, `jax.jvp`, `jax.linearize` and `jax.linear_transpose` go through it
(the gradient of the stack is the per-block slices).

Why scan: XLA compiles the scan body once, so compile time stays flat in depth;
unrolled, every block is a separate copy of the same ops. Why remat: the
backward (or transpose) pass of a block otherwise keeps all its internal
activations (attention scores, MLP hidden states); `jax.checkpoint` keeps only the
block's input and recomputes the rest, so per-block activation memory falls from
O(block internals) to O(residual stream). It recomputes the same ops, so values
are unchanged.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

BlockFn = Callable[[Any, jax.Array], jax.Array]


def stack_trees(trees: Sequence[Any]) -> Any:
    """Stack structurally identical pytrees leaf by leaf along a new leading axis.

    The same values as `jnp.stack` per leaf, built by writing each tree into its
    row with `dynamic_update_slice` at an index XLA cannot see (behind an
    optimization barrier). Why: the gradient of the stack is one slice per block
    and leaf, L x (leaves per block) small copies that survive into the compiled
    program. With `jnp.stack` their offsets are constants, so each copy is a
    distinct kernel and XLA's compile time grew with depth again (CPU, 45m widths:
    +2.4 s from 2 to 32 layers); at opaque indices all copies of one leaf are the
    same computation and compile time stays flat.
    """
    n = len(trees)
    index = jax.lax.optimization_barrier(jnp.arange(n, dtype=jnp.int32))

    def stack(*leaves):
        out = jnp.zeros((n, *leaves[0].shape), leaves[0].dtype)
        for i, leaf in enumerate(leaves):
            out = jax.lax.dynamic_update_index_in_dim(out, leaf, index[i], 0)
        return out

    return jax.tree.map(stack, *trees)


def run_blocks(block: BlockFn, block_params: Sequence[Any], x: jax.Array, *,
               scan: bool = False, remat: bool = False) -> jax.Array:
    """x -> block(p_{L-1}, ... block(p_1, block(p_0, x))) over `block_params` = [p_0, ..., p_{L-1}].

    `scan`: one `lax.scan` over the stacked parameters (one compiled copy of the
    block; a first block whose output dtype differs from its input's, as under
    mixed precision, runs before the scan). `remat`: each block under
    `jax.checkpoint` (inside the scan body when scanning). Both leave the
    computed function unchanged.
    """
    blocks = list(block_params)
    if remat:
        unrolled_block = jax.checkpoint(block, prevent_cse=True)
        # In a scan, common-subexpression elimination cannot merge the recomputation
        # with the forward pass (they sit in different loop bodies), so the
        # CSE-preventing barriers are not needed and would only hinder fusion.
        scanned_block = jax.checkpoint(block, prevent_cse=False)
    else:
        unrolled_block = scanned_block = block
    if scan and blocks and jax.eval_shape(block, blocks[0], x).dtype != x.dtype:
        # A scan's carry keeps one dtype. Under mixed precision the stream enters
        # the first block in the compute dtype and leaves it in float32; casting
        # it up front would change that block's rounding, so it runs on its own.
        x = unrolled_block(blocks[0], x)
        blocks = blocks[1:]
    if not scan or not blocks:
        for p in blocks:
            x = unrolled_block(p, x)
        return x

    def step(h, p):
        return scanned_block(p, h), None

    x, _ = jax.lax.scan(step, x, stack_trees(blocks))
    return x
