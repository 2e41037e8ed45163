"""The Gauss-Newton quadratic model and the prox-linear model, as (value, grad) functions.

With d = θ − θ0, z0 = f(θ0), J = ∂f/∂θ at θ0, g_z = ∂ℓ/∂z and H_z = ∂²ℓ/∂z² at z0:

    kind "gn":           Q(θ) = ℓ(z0) + g_zᵀ J d + ½ (J d)ᵀ H_z (J d) + (λ/2)‖d‖²
                         ∇Q   = Jᵀ (g_z + H_z J d) + λ d
    kind "prox_linear":  P(θ) = ℓ(z0 + J d) + (λ/2)‖d‖²
                         ∇P   = Jᵀ ∇ℓ(z0 + J d) + λ d

Q is the Gauss-Newton model of Schraudolph 2002 / Martens 2010 (Hessian-free
optimisation); its minimiser is d* = −(G + λI)⁻¹ Jᵀ g_z with G = Jᵀ H_z J. P keeps
the full loss on the linearised network (Abreu et al. 2025, "GN-prox-linear").
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from gn.curvature import chunked as _chunked
from gn.curvature.chunked_loss import chunkable
from gn.curvature import losses as _losses
from gn.curvature.ggn import BlockLinearization, check_block_mode
from gn.curvature.partition import block_ids
from gn.errors import ConfigError, suggest

KINDS = ("gn", "prox_linear")


def _vdot(a, b):
    return jnp.sum(a * b)


def _tree_sq_norm(tree, dtype):
    return sum((jnp.sum(jnp.square(x.astype(dtype))) for x in jax.tree.leaves(tree)),
               jnp.zeros((), dtype))


@dataclasses.dataclass(frozen=True, eq=False)     # hashed by identity: jax.jit(q) keys on the callable
class QuadraticModel:
    """The local model that `quadratic_model` builds: call it as q(θ) -> (value, ∇_θ value).

    `with_loss0(θ)` -> (value, grad, ℓ(z0)) from the same pass; `loss0` = ℓ(z0) = Q(θ0);
    `num_blocks` = the number of blocks of the partition (1 without one)."""

    with_loss0: Callable[[Any], tuple]
    loss0: Any
    num_blocks: int

    def __call__(self, params):
        return self.with_loss0(params)[:2]


def quadratic_model(apply_fn, params0, inputs, targets, *, mask=None, loss: _losses.LossSpec = "cross_entropy",
                    kind: str = "gn", partition=None, damping: float = 0.0,
                    block_mode: str = "batched") -> QuadraticModel:
    """Build the local model of the loss at θ0 = `params0`; returns q with q(θ) -> (value, ∇_θ value).

    kind="gn":           Q(θ) = ℓ(z0) + g_zᵀ J d + ½ (J d)ᵀ H_z (J d) + (λ/2)‖d‖²
    kind="prox_linear":  P(θ) = ℓ(z0 + J d) + (λ/2)‖d‖²
    with d = θ − θ0, λ = `damping`, ℓ the masked mean loss (`mean_loss`), H_z its
    closed-form output Hessian and G = Jᵀ H_z J the Gauss-Newton matrix
    (Schraudolph 2002; Martens 2010). Minimising Q with any optimizer (e.g.
    optax, on the gradients q returns) approaches the damped GN step
    d* = −(G + λI)⁻¹ ∇ℓ(θ0).

    With a `partition` into blocks b (see `make_partition`) the model is block
    separable, dropping the cross-block couplings (layerwise GN):

        Q_lw(θ) = ℓ(z0) + Σ_b [g_zᵀ J_b d_b + ½ (J_b d_b)ᵀ H_z (J_b d_b)] + (λ/2)‖d‖²,
                  ∇_b = J_bᵀ (g_z + H_z J_b d_b) + λ d_b
        P_lw(θ) = Σ_b ℓ(z0 + J_b d_b) − (B − 1) ℓ(z0) + (λ/2)‖d‖²,
                  ∇_b = J_bᵀ ∇ℓ(z0 + J_b d_b) + λ d_b

    both equal to the full models when there is one block; ∇²Q_lw = diag(G_bb) + λI.

    Cost: the linearisation (one primal pass, residuals kept) happens here, once;
    each q(θ) call is one tangent and one transpose pass (B of each with a
    partition, less in effect with block_mode="unrolled"; see
    `ggn_vector_product`). q is jit-able. When a new batch comes at every step,
    build q inside the jitted step,
    `jax.jit(lambda p0, p, x, y: quadratic_model(apply, p0, x, y)(p))`: a step then
    costs 1 primal + 1 tangent + 1 transpose pass. q.loss0 holds ℓ(z0) = Q(θ0)
    (for predicted-decrease diagnostics), q.with_loss0(θ) returns (value, grad, ℓ(z0))
    from the same pass, and q.num_blocks is the number of blocks.

    With a `gn.split.SplitApply` model and a built-in loss, everything is computed
    `chunk` tokens at a time and no (tokens × vocabulary) tensor is formed
    (`gn.curvature.chunked`; same numbers up to summation order). There q.loss0
    costs its own head pass per chunk, while q.with_loss0 gets ℓ(z0) for free.
    """
    _losses.check_loss(loss)
    check_block_mode(block_mode)
    if kind not in KINDS:
        raise ConfigError(
            f"unknown quadratic model kind {kind!r}; valid kinds are {', '.join(KINDS)}."
            + suggest(str(kind), KINDS))
    ids, blocks = block_ids(params0, partition)
    num_blocks = len(blocks)
    if chunkable(apply_fn, loss):
        # A SplitApply: the same model, evaluated `chunk` tokens at a time (gn.curvature.chunked).
        cmodel = _chunked.ChunkedLinearization(apply_fn, params0, inputs, targets, mask, loss, ids,
                                               num_blocks, block_mode)
        dt = cmodel.dt
        cterms = _chunked.gn_terms if kind == "gn" else _chunked.prox_terms(loss)
        run = lambda d: cmodel.run(d, cterms)  # noqa: E731
        loss0 = cmodel.loss0()
    else:
        model = BlockLinearization(apply_fn, params0, inputs, ids, num_blocks, block_mode)
        curv = _losses.output_curvature(model.outputs, targets, mask, loss)
        dt = curv.grad.dtype
        z0 = model.outputs.astype(dt)

        def gn_terms(jz):
            jz = jz.astype(dt)
            hjz = curv.hvp(jz)
            return _vdot(curv.grad, jz) + 0.5 * _vdot(jz, hjz), curv.grad + hjz

        def prox_terms(jz):
            return _losses.loss_value_and_grad(z0 + jz.astype(dt), targets, mask, loss)

        terms = gn_terms if kind == "gn" else prox_terms

        def run(d):
            value, grads = model.run(d, terms)
            return value, grads, curv.value
        loss0 = curv.value

    def with_loss0(params):
        d = jax.tree.map(lambda p, p0: (p - p0).astype(p0.dtype), params, params0)
        value, grads, l0 = run(d)
        # gn terms exclude ℓ(z0); each prox-linear block term includes it once.
        offset = l0 if kind == "gn" else -(num_blocks - 1) * l0
        value = value + offset
        if not (isinstance(damping, (int, float)) and damping == 0):
            value = value + 0.5 * damping * _tree_sq_norm(d, dt)
            grads = jax.tree.map(lambda g, x: g + damping * x, grads, d)
        return value, jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params), l0

    return QuadraticModel(with_loss0=with_loss0, loss0=loss0, num_blocks=num_blocks)
