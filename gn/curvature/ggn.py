"""Matrix-free generalised Gauss-Newton products, full and block-diagonal.

G = Jᵀ H_z J (Schraudolph 2002; Martens 2010) with J = ∂f/∂θ the Jacobian of the
model outputs and H_z the closed-form output Hessian of the mean loss
(`gn.curvature.losses`). Neither J nor G is ever formed: `jax.linearize` gives
z0 = f(θ0) and the tangent map d ↦ J d from one primal pass (its residuals are
kept), and `jax.linear_transpose` of that linear map gives u ↦ Jᵀ u.

Layerwise (block-diagonal) products keep only G_bb = J_bᵀ H_z J_b. All blocks are
computed after a single primal pass: the tangent d is masked to each block
(d_b = d ⊙ 1[leaf ∈ b]); `block_mode="batched"` pushes the B masked tangents
through one vmapped tangent pass and one vmapped transpose, while
`block_mode="sequential"` runs the same per-block maths in a `lax.scan`, holding
one block's tangents at a time (memory of ~one full GN product, same numbers).
Both do B tangent and B transpose passes over the whole network.

The optional `block_mode="unrolled"` trades that guarantee for speed: it
linearises the network once per block with respect to that block's parameters
only, in one traced program, so each block's tangent starts at its own layers
and its transpose stops there (symbolic zeros) and computes only that block's
parameter cotangents. The B primal passes are traced separately; under jit XLA's
common-subexpression elimination merges the parts that trace identically (not
all: custom-JVP functions such as softmax trace differently under
linearisation). Program size and compile time grow with B; used eagerly it
really runs B primals. On the nano LLaMA (CPU) it was 1.5x (4 transformer
blocks) to 3x (21 tensors) faster than "batched".
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from gn.curvature import chunked as _chunked
from gn.curvature.chunked_loss import chunkable
from gn.curvature import losses as _losses
from gn.curvature.partition import block_ids
from gn.errors import ConfigError, suggest

BLOCK_MODES = ("batched", "sequential", "unrolled")


def check_block_mode(block_mode: str) -> str:
    """Return `block_mode` if valid, else raise ConfigError (a ValueError)."""
    if block_mode not in BLOCK_MODES:
        raise ConfigError(
            f"unknown block_mode {block_mode!r}; valid block modes are {', '.join(BLOCK_MODES)}."
            + suggest(str(block_mode), BLOCK_MODES))
    return block_mode


class Linearization(NamedTuple):
    """z0 = f(θ0), d ↦ J d and u ↦ Jᵀ u at θ0 (one primal pass, kept residuals)."""

    outputs: Any
    jvp: Callable[[Any], Any]
    vjp: Callable[[Any], Any]


def linearize(apply_fn, params, inputs) -> Linearization:
    """Linearise θ ↦ apply_fn(θ, inputs) at `params` (one primal + residuals).

    `jvp(d)` costs one tangent pass, `vjp(u)` one transpose pass; neither reruns
    the primal. The cotangent u is cast to the outputs' dtype, as the transpose
    requires.
    """
    # jit makes eager (un-jitted) use run the primal and the linear maps as compiled
    # calls; inside an outer jit it is merely inlined.
    fn = jax.jit(apply_fn)
    return _linearize_fn(lambda p: fn(p, inputs), params)


def _linearize_fn(f, params) -> Linearization:
    z0, f_jvp = jax.linearize(f, params)
    f_t = jax.linear_transpose(f_jvp, params)

    def vjp(u):
        return f_t(jax.tree.map(lambda a, z: a.astype(z.dtype), u, z0))[0]

    return Linearization(z0, f_jvp, vjp)


def tree_cast_like(tree, like):
    """Cast every leaf of `tree` to the dtype of the matching leaf of `like`."""
    return jax.tree.map(lambda a, b: a.astype(b.dtype), tree, like)


class BlockLinearization:
    """The model linearised at θ0, evaluating block-separable local models.

    `outputs` is z0. `run(d, per_block)` with `per_block(jz) -> (value, u)`:
    with one block it returns per_block's value for jz = J d and Jᵀ u; with B
    blocks it returns (Σ_b value_b, r), value_b, u_b = per_block(J_b d_b) and
    leaf ℓ of r, in block b(ℓ), equal to (J_bᵀ u_b)_ℓ. Primal passes happen here,
    at construction, never in `run`.
    """

    def __init__(self, apply_fn, params, inputs, ids: list[int], num_blocks: int,
                 block_mode: str = "batched"):
        check_block_mode(block_mode)
        self.ids, self.num_blocks, self.block_mode = list(ids), num_blocks, block_mode
        self.params = params
        leaves, self.treedef = jax.tree.flatten(params)
        if num_blocks > 1 and block_mode == "unrolled":
            fn = jax.jit(apply_fn)
            self.members = [[i for i, k in enumerate(self.ids) if k == b] for b in range(num_blocks)]
            self.block_lins = []
            for idx in self.members:
                def f(sub, idx=idx):
                    full = list(leaves)
                    for i, x in zip(idx, sub):
                        full[i] = x
                    return fn(self.treedef.unflatten(full), inputs)
                self.block_lins.append(_linearize_fn(f, [leaves[i] for i in idx]))
            self.outputs = self.block_lins[0].outputs
        else:
            self.lin = linearize(apply_fn, params, inputs)
            self.outputs = self.lin.outputs

    def run(self, d, per_block: Callable):
        d = tree_cast_like(d, self.params)
        if self.num_blocks == 1:
            value, u = per_block(self.lin.jvp(d))
            return value, tree_cast_like(self.lin.vjp(u), self.params)
        leaves = jax.tree.leaves(d)
        mode = self.block_mode
        if mode == "unrolled":
            out = [None] * len(leaves)
            total = 0.0
            for idx, lin in zip(self.members, self.block_lins):
                value, u = per_block(lin.jvp([leaves[i] for i in idx]))
                for i, ct in zip(idx, lin.vjp(u)):
                    out[i] = ct
                total = total + value
            return total, tree_cast_like(self.treedef.unflatten(out), self.params)
        ids, lin = self.ids, self.lin

        def one_block(b):
            # Each leaf sits in exactly one block: keep it in its own block's tangent.
            tangent = [jnp.where(b == k, x, jnp.zeros_like(x)) for x, k in zip(leaves, ids)]
            return per_block(lin.jvp(self.treedef.unflatten(tangent)))

        blocks = jnp.arange(self.num_blocks)
        if mode == "batched":
            values, us = jax.vmap(one_block)(blocks)
            cts = jax.tree.leaves(jax.vmap(lin.vjp)(us))
            # Select rather than sum: only block b(ℓ)'s row of leaf ℓ belongs to G_bb.
            out = [ct[k] for ct, k in zip(cts, ids)]
        else:
            def step(acc, b):
                value, u = one_block(b)
                ct = jax.tree.leaves(lin.vjp(u))
                return [jnp.where(b == k, c, a) for c, a, k in zip(ct, acc, ids)], value

            out, values = jax.lax.scan(step, [jnp.zeros_like(x) for x in leaves], blocks)
        return jnp.sum(values), tree_cast_like(self.treedef.unflatten(out), self.params)


def ggn_operator(apply_fn, params, inputs, targets, *, mask=None, loss: _losses.LossSpec = "cross_entropy",
                 partition=None, block_mode: str = "batched") -> Callable[[Any], Any]:
    """Linearise once at `params` and return the matvec v ↦ G v (or its block diagonal).

    Use this for repeated products on one batch (e.g. conjugate gradient): every
    call then costs one tangent and one transpose pass, with no new primal.
    A `gn.split.SplitApply` model (with a built-in loss) is evaluated `chunk`
    tokens at a time, never forming the (tokens × vocabulary) logits.
    Same arguments and equations as `ggn_vector_product`.
    """
    _losses.check_loss(loss)
    check_block_mode(block_mode)
    ids, blocks = block_ids(params, partition)
    if chunkable(apply_fn, loss):
        # A SplitApply: Σ_k (∂head)ᵀ H_k ż_k chunk by chunk, then the body's transpose (gn.curvature.chunked).
        return _chunked.ggn_operator(apply_fn, params, inputs, targets, mask=mask, loss=loss, ids=ids,
                                     num_blocks=len(blocks), block_mode=block_mode)
    model = BlockLinearization(apply_fn, params, inputs, ids, len(blocks), block_mode)
    curv = _losses.output_curvature(model.outputs, targets, mask, loss)
    zero = jnp.zeros((), curv.grad.dtype)

    def matvec(v):
        return model.run(v, lambda jz: (zero, curv.hvp(jz)))[1]

    return matvec


def ggn_vector_product(apply_fn, params, inputs, targets, vector, *, mask=None,
                       loss: _losses.LossSpec = "cross_entropy", partition=None, block_mode: str = "batched"):
    """Generalised Gauss-Newton vector product G v = Jᵀ H_z J v (Schraudolph 2002; Martens 2010).

    J = ∂z/∂θ at θ = `params` for z = apply_fn(θ, inputs) of shape
    targets.shape + (K,) (cross-entropy) or targets.shape (mse); H_z = ∂²ℓ/∂z² is
    the closed-form output Hessian of the masked mean loss ℓ
    (`gn.curvature.mean_loss`): for cross-entropy, per position,
    H_z v = (m/n)(p ⊙ v − p (pᵀ v)); for mse, H_z = (2m/n) I.

    With a `partition` (see `make_partition`), returns the block-diagonal part:
    (G v)_b = J_bᵀ H_z J_b v_b for every block b. `block_mode`: "batched"
    (default) pushes the B block-masked tangents through one vmapped tangent pass
    and one vmapped transpose after a single primal; "sequential" runs the same
    maths in a lax.scan over blocks (memory of about one full product);
    "unrolled" linearises once per block w.r.t. that block only, so tangents and
    transposes skip the layers a block cannot affect, while XLA merges most of
    the repeated primal work (fastest for layer blocks under jit; program size
    grows with B; see the module docstring). Same numbers in all three.

    Cost: one primal, one tangent and one transpose pass (B of the latter two
    with a partition, fewer in effect when "unrolled"). Returns a pytree like
    `params`.
    """
    return ggn_operator(apply_fn, params, inputs, targets, mask=mask, loss=loss,
                        partition=partition, block_mode=block_mode)(vector)
