"""Conjugate gradient on pytrees, for one system or for independent block systems.

Martens 2010 (Hessian-free optimisation) solves the damped Gauss-Newton system
(G + λI) d = −g with CG, using only matrix-vector products; here it is the exact
reference against which an inner optimiser's minimisation of Q is judged, and the
solver of `inner_solver: cg`. Both solvers take an optional preconditioner
`precond: r ↦ M⁻¹ r` (symmetric positive definite, e.g. a diagonal; Martens 2010
§4.7): preconditioned CG (Hestenes-Stiefel with z = M⁻¹ r, α = rᵀz / pᵀAp,
β = r'ᵀz' / rᵀz, p = z' + β p). The stopping test and `CGInfo.residual_norm`
are on the unpreconditioned residual ‖b − A x‖ either way, so runs with and
without a preconditioner report comparable residuals.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from gn.curvature.partition import block_ids


class CGInfo(NamedTuple):
    """CG diagnostics.

    iterations: matvecs done in the loop; residual_norm: ‖b − A x‖ (recursively
    updated, per block for `block_conjugate_gradient`); converged: whether the
    relative residual fell below tol (per block for the block version);
    rhs_norm: ‖b‖ (per block), so residual_norm / rhs_norm is the relative residual.
    """

    iterations: jax.Array
    residual_norm: jax.Array
    converged: jax.Array
    rhs_norm: jax.Array


def _acc_dtype(tree):
    dt = jnp.result_type(*jax.tree.leaves(tree)) if jax.tree.leaves(tree) else jnp.float32
    return jnp.promote_types(dt, jnp.float32)


def _leaf_dots(a, b, dt):
    return [jnp.sum(x.astype(dt) * y.astype(dt)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]


def _safe_div(num, den):
    # A zero (or, for a PSD operator, non-positive) curvature means that direction is
    # exhausted: take no step instead of dividing by zero.
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def _axpy(alpha_per_leaf, x, y):
    """y + alpha_ℓ x leafwise; alpha_per_leaf: list of scalars in flatten order."""
    xl, treedef = jax.tree.flatten(x)
    yl = jax.tree.leaves(y)
    return treedef.unflatten([b + a.astype(b.dtype) * u.astype(b.dtype)
                              for a, u, b in zip(alpha_per_leaf, xl, yl)])


def _run_cg(matvec, b, x0, max_iters, tol, reduce, expand, precond=None):
    """CG where `reduce(list of per-leaf dots) -> per-system dots` and `expand(s) -> per-leaf scalars`.

    With one system, reduce sums and expand repeats; with block systems both work
    per block, so each block gets its own step sizes α_b, β_b. With `precond`
    (r ↦ M⁻¹ r, block-diagonal for block systems) it is preconditioned CG.
    """
    dt = _acc_dtype(b)

    def dot(u, v):
        return reduce(_leaf_dots(u, v, dt))

    if x0 is None:
        x = jax.tree.map(jnp.zeros_like, b)
        r = b
    else:
        x = jax.tree.map(lambda a, bb: a.astype(bb.dtype), x0, b)
        r = jax.tree.map(lambda bb, ax: bb - ax.astype(bb.dtype), b, matvec(x))
    b_norm = jnp.sqrt(dot(b, b))
    threshold = tol * b_norm

    def pre(r):
        # z = M⁻¹ r and the pair (rᵀr for the stopping test, rᵀz for the recursion).
        if precond is None:
            rs = dot(r, r)
            return r, rs, rs
        z = jax.tree.map(lambda zz, rr: zz.astype(rr.dtype), precond(r), r)
        return z, dot(r, r), dot(r, z)

    def active(rs, alive):
        return alive & (jnp.sqrt(rs) > threshold)

    def cond(state):
        i, _, _, _, rs, _, alive = state
        return (i < max_iters) & jnp.any(active(rs, alive))

    def body(state):
        i, x, r, p, rs, rz, alive = state
        act = active(rs, alive)
        ap = matvec(p)
        pap = dot(p, ap)
        alive = alive & ((pap > 0) | ~act)
        alpha = jnp.where(act, _safe_div(rz, pap), 0.0)
        a_leaf = expand(alpha)
        x = _axpy(a_leaf, p, x)
        r = _axpy([-a for a in a_leaf], ap, r)
        z, rs_new, rz_new = pre(r)
        beta = jnp.where(act, _safe_div(rz_new, rz), 0.0)
        p = _axpy(expand(beta), p, z)
        return i + 1, x, r, p, jnp.where(act, rs_new, rs), jnp.where(act, rz_new, rz), alive

    z, rs, rz = pre(r)
    alive0 = jnp.ones(jnp.shape(rs), bool)
    state = (jnp.zeros((), jnp.int32), x, r, z, rs, rz, alive0)
    i, x, _, _, rs, _, _ = jax.lax.while_loop(cond, body, state)
    res = jnp.sqrt(rs)
    return x, CGInfo(i, res, res <= threshold, b_norm)


def conjugate_gradient(matvec: Callable[[Any], Any], b, *, x0=None, max_iters: int = 50,
                       tol: float = 1e-6, precond: Callable[[Any], Any] | None = None):
    """Solve A x = b by conjugate gradient for a symmetric positive (semi)definite `matvec`.

    Pytree version of Hestenes-Stiefel CG, as used by Martens 2010 (Hessian-free)
    for (G + λI) d = −∇ℓ with G the Gauss-Newton matrix: r = b − A x, p = r; each
    step α = rᵀr / pᵀAp, x += α p, r −= α A p, β = r'ᵀr' / rᵀr, p = r' + β p.
    Stops after `max_iters` matvecs or when ‖r‖ ≤ tol·‖b‖ (or on non-positive
    curvature pᵀAp ≤ 0). Jit-able (lax.while_loop). `precond` (r ↦ M⁻¹ r, M SPD)
    makes it preconditioned CG (module docstring); the number of matvecs is the
    same per iteration. Returns (x, CGInfo).
    """
    n = len(jax.tree.leaves(b))
    return _run_cg(matvec, b, x0, max_iters, tol,
                   reduce=lambda dots: sum(dots[1:], dots[0]) if dots else jnp.zeros(()),
                   expand=lambda s: [s] * n, precond=precond)


def block_conjugate_gradient(matvec: Callable[[Any], Any], b, labels, *, x0=None,
                             max_iters: int = 50, tol: float = 1e-6,
                             precond: Callable[[Any], Any] | None = None):
    """Solve independent block systems A_bb x_b = b_b at once, with per-block CG step sizes.

    `matvec` must be block-diagonal for the partition `labels` (a labels pytree
    from `make_partition`, or any partition it accepts), e.g. the layerwise
    Gauss-Newton product `ggn_vector_product(..., partition=labels)` plus λ v,
    giving x_b = (G_bb + λI)⁻¹ b_b for every block. Each block runs its own CG
    recursion (α_b, β_b from per-block segment sums of the inner products), so
    every block's iterates are exactly those of CG on that block alone; one
    matvec per iteration serves all blocks. A block stops when
    ‖r_b‖ ≤ tol·‖b_b‖; the loop ends when all have, or after `max_iters`.
    Returns (x, CGInfo) with per-block `residual_norm` and `converged` of shape
    [num_blocks] (blocks in `make_partition` order). `precond` (r ↦ M⁻¹ r) must be
    block-diagonal too (a diagonal is).
    """
    ids, blocks = block_ids(b, labels)
    nb = len(blocks)
    seg = jnp.asarray(ids, jnp.int32)

    def reduce(dots):
        return jax.ops.segment_sum(jnp.stack(dots), seg, num_segments=nb)

    def expand(s):
        return [s[k] for k in ids]

    return _run_cg(matvec, b, x0, max_iters, tol, reduce=reduce, expand=expand, precond=precond)
