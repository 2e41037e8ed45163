"""The Hessian-free step of `inner_solver: cg`: the damped CG solve, its diagonal
preconditioner and Levenberg-Marquardt damping (Martens 2010, "Deep learning via
Hessian-free optimization", ICML).

One outer step at θ_t with damping λ_t (carried in `GNState.damping`):

    g = ∇ℓ(θ_t) and G (the Gauss-Newton matrix) on the whole outer batch
    Δ = CG on (G + λ_t I + wd·M) Δ = −(g + wd·M θ_t), at most cg_iters products
        (preconditioned by P = (diag(G)^ + λ_t + wd·M)^ξ with cg_precondition: diag_ggn)
    α* = the line search's best step along Δ (gauss_newton; ls_grid_up adds α > 1)
    ρ  = [ℓ(θ_t) − ℓ(θ_t + Δ)] / [Q(0) − Q(Δ)]   on the line-search batches
    λ_{t+1} = clip(λ_t·3/2 if ρ < 1/4, λ_t·2/3 if ρ > 3/4, λ_t otherwise; damping_min, damping_max)

with damping_adapt: lm (Martens 2010 §4.1); otherwise λ stays `damping`.

Choices, and why:
- ρ is measured at the full step Δ (α = 1), the solution of the system λ controls,
  as Martens computes it for the CG step p. Measured at α* instead, ρ would
  approach 1 whenever the line search shortens the step (ρ(α) → 1 as α → 0), so λ
  would fall exactly when the model overshoots. Both losses of ρ are on the
  line-search batches (fresh data; ℓ(θ_t + Δ) is the grid's α = 1 point, free),
  the model Q is the method's local model (GN quadratic or prox-linear) without
  the damping and the weight-decay terms: the decrease of the loss it predicts.
  A non-finite ρ (non-finite ℓ(θ_t + Δ), or Q(0) − Q(Δ) ≤ 0) counts as a failure.
- diag_ggn estimates diag(G) by Monte Carlo with labels sampled from the model.
  For softmax cross-entropy G equals the Fisher (Martens 2014, "New insights and
  perspectives on the natural gradient method"): per token
  J_tᵀ H_t J_t = E_{ŷ∼p_t}[J_tᵀ (p_t − e_ŷ)(p_t − e_ŷ)ᵀ J_t]. The per-sequence
  gradient of the summed loss at sampled labels, u_s = Σ_{t∈s} J_tᵀ (p_t − e_ŷt),
  has E[u_s ⊙ u_s] = diag Σ_{t∈s} J_tᵀ H_t J_t (the tokens' samples are independent
  with mean zero), so diag(G)^ = Σ_s u_s ⊙ u_s / n (n tokens) is unbiased and
  non-negative. Cost: one primal and one transpose over the outer batch (one
  gradient's FLOPs, vmapped per sequence), against ≈ 1.33 gradients per CG product.
  Not the empirical Fisher Σ_s g_s² at the data's labels (Martens 2010 §4.7): it is
  not an estimate of G (Kunstner, Hennig, Balles 2019, "Limitations of the
  empirical Fisher approximation for natural gradient descent"); not Hutchinson's
  v ⊙ Gv: one CG-sized product per probe, a variance set by G's off-diagonal, and
  negative entries. The labels' key is fold_in(key, outer step): reproducible on
  resume. ξ = cg_precondition_power (1: Jacobi; Martens 2010 §4.7 used 3/4).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from gn import curvature
from gn.curvature.objective import lm_loss, split_batch
from gn.methods.base import check_choice, check_range

DAMPING_ADAPT = ("none", "lm")
CG_PRECONDITIONERS = ("none", "diag_ggn")
# Martens 2010 §4.1: λ ← λ·3/2 if ρ < 1/4, λ ← λ·2/3 if ρ > 3/4.
LM_RHO_LOW, LM_RHO_HIGH = 0.25, 0.75
LM_UP, LM_DOWN = 1.5, 2.0 / 3.0
_LABEL_SEED = 0x6E67   # the sampled labels of diag_ggn: fold_in(PRNGKey(_LABEL_SEED), outer step)


def validate_options(cfg: Any, where: str) -> None:
    """ConfigError naming the key for a bad CG, damping or line-search-grid option."""
    check_choice(cfg.cg_precondition, CG_PRECONDITIONERS, where, "cg_precondition")
    check_range(0 < cfg.cg_precondition_power <= 1, where, "cg_precondition_power", "in (0, 1]",
                cfg.cg_precondition_power)
    check_choice(cfg.damping_adapt, DAMPING_ADAPT, where, "damping_adapt")
    check_range(cfg.damping_min > 0, where, "damping_min", "positive", cfg.damping_min)
    check_range(cfg.damping_max >= cfg.damping_min, where, "damping_max", f">= damping_min ({cfg.damping_min})",
                cfg.damping_max)
    check_range(cfg.ls_grid_up >= 0, where, "ls_grid_up", ">= 0 (0: no step above 1)", cfg.ls_grid_up)
    if cfg.damping_adapt == "lm":
        check_range(cfg.inner_solver == "cg", where, "damping_adapt",
                    "'none' unless inner_solver is 'cg' (lm adapts the λ of the CG solve)", cfg.damping_adapt)
        check_range(cfg.damping_min <= cfg.damping <= cfg.damping_max, where, "damping",
                    f"the initial λ of damping_adapt: lm, in [damping_min, damping_max] = "
                    f"[{cfg.damping_min}, {cfg.damping_max}]", cfg.damping)


def lm_damping(lam, rho, lo: float, hi: float) -> jnp.ndarray:
    """Martens' rule: λ·3/2 if ρ < 1/4 (or ρ is not finite), λ·2/3 if ρ > 3/4, else λ; clipped
    to [lo, hi]. The factors are applied in λ's dtype."""
    lam = jnp.asarray(lam)
    rho = jnp.asarray(rho)
    worse = ~(rho >= LM_RHO_LOW)             # ρ < 1/4, and NaN
    better = rho > LM_RHO_HIGH
    factor = jnp.where(worse, jnp.asarray(LM_UP, lam.dtype),
                       jnp.where(better, jnp.asarray(LM_DOWN, lam.dtype), jnp.ones((), lam.dtype)))
    return jnp.clip(lam * factor, jnp.asarray(lo, lam.dtype), jnp.asarray(hi, lam.dtype))


def ggn_diagonal(apply_fn, params, batches, key) -> Any:
    """Unbiased Monte-Carlo estimate of diag(G) on `batches` [N, b, T+1] (module docstring):
    Σ_s u_s ⊙ u_s / n with u_s the sequence's summed-loss gradient at labels sampled from the model."""
    n_tok = batches.shape[0] * batches.shape[1] * (batches.shape[2] - 1)
    acc = jnp.promote_types(jnp.result_type(*jax.tree.leaves(params)), jnp.float32)

    def one(x, k):
        z, vjp = jax.vjp(lambda p: apply_fn(p, x[None]), params)
        zf = z.astype(jnp.promote_types(z.dtype, jnp.float32))
        y = jax.random.categorical(k, zf, axis=-1)
        cot = jax.nn.softmax(zf, axis=-1) - jax.nn.one_hot(y, zf.shape[-1], dtype=zf.dtype)
        return vjp(cot.astype(z.dtype))[0]

    def micro(total, xs):
        batch, k = xs
        inputs = split_batch(batch)[0]
        u = jax.vmap(one)(inputs, jax.random.split(k, inputs.shape[0]))
        return jax.tree.map(lambda t, uu: t + jnp.sum(jnp.square(uu.astype(acc)), axis=0), total, u), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, acc), params)
    total, _ = jax.lax.scan(micro, zeros, (batches, jax.random.split(key, batches.shape[0])))
    return jax.tree.map(lambda t: t / n_tok, total)


def damped_solve(method, theta, inputs, targets, grads, damping=None, diag=None):
    """(G + λI + wd·M) d = −(g + wd·M θ_t) by CG (block CG with a partition), M the inner
    weight-decay mask; λ = `damping` (default: the config's). With `diag` (an estimate of
    diag(G)), preconditioned by P = (diag + λ + wd·M)^ξ. Returns (d, CGInfo)."""
    hp = method.hp
    lam = hp.damping if damping is None else damping
    matvec0 = curvature.ggn_operator(method._apply, theta, inputs, targets, partition=method.partition,
                                     block_mode=hp.block_mode)

    def matvec(v):
        out = jax.tree.map(lambda gv, x: gv + jnp.asarray(lam, x.dtype) * x, matvec0(v), v)
        return jax.tree.map(jnp.add, out, method._decay(v)) if hp.inner_weight_decay else out

    if hp.inner_weight_decay:
        grads = jax.tree.map(jnp.add, grads, method._decay(theta))
    rhs = jax.tree.map(jnp.negative, grads)
    precond = None
    if diag is not None:
        extra = method._decay(jax.tree.map(jnp.ones_like, theta)) if hp.inner_weight_decay else None
        scale = jax.tree.map(lambda dg, x: dg + jnp.asarray(lam, dg.dtype), diag, theta)
        if extra is not None:
            scale = jax.tree.map(lambda s, e: s + e.astype(s.dtype), scale, extra)
        scale = jax.tree.map(lambda s: s ** hp.cg_precondition_power, scale)
        precond = lambda r: jax.tree.map(lambda ri, si: ri / si.astype(ri.dtype), r, scale)  # noqa: E731
    if method.partition is None:
        return curvature.conjugate_gradient(matvec, rhs, max_iters=hp.cg_iters, tol=hp.cg_tol, precond=precond)
    labels = curvature.make_partition(theta, method.partition)[0]
    return curvature.block_conjugate_gradient(matvec, rhs, labels, max_iters=hp.cg_iters, tol=hp.cg_tol,
                                              precond=precond)


def cg_solve(method, theta, state, batches):
    """The Hessian-free inner solve over the whole outer batch: (θ̂, inner state, metrics) with
    the CG relative residual ‖r‖/‖b‖ (the largest over blocks), the products done and λ."""
    hp = method.hp
    flat = batches.reshape((-1,) + batches.shape[2:])
    inputs, targets = split_batch(flat)
    loss0, grads = jax.value_and_grad(lambda p: lm_loss(method._apply, p, flat))(theta)
    diag = None
    if hp.cg_precondition == "diag_ggn":
        key = jax.random.fold_in(jax.random.PRNGKey(_LABEL_SEED), state.outer_step)
        diag = ggn_diagonal(method._apply, theta, batches, key)
    d, info = damped_solve(method, theta, inputs, targets, grads, state.damping, diag)
    theta_hat = method._constrain(jax.tree.map(jnp.add, theta, d))
    rel = info.residual_norm / jnp.where(info.rhs_norm > 0, info.rhs_norm, 1.0)
    metrics = {"train_loss": loss0, "cg_iters_used": info.iterations, "cg_residual": jnp.max(rel),
               "damping": state.damping}
    return theta_hat, method._constrain(state.inner_opt), metrics


def lm_update(method, theta, theta_hat, aux, damping, loss0, loss_full):
    """(λ_{t+1}, metrics): ρ at the full step Δ = θ̂ − θ_t on the line-search batches `aux`, from
    the line search's ℓ(θ_t) = `loss0` and ℓ(θ_t + Δ) = `loss_full` and the undamped local model."""
    hp = method.hp

    def predicted(batch):
        x, y = split_batch(batch)
        q = curvature.quadratic_model(method._apply, theta, x, y, kind=method.kind, partition=method.partition,
                                      block_mode=hp.block_mode)
        value, _, l0 = q.with_loss0(theta_hat)       # the gradient is unused (removed under jit)
        return l0 - value

    pred = jax.lax.map(predicted, aux).mean()
    actual = loss0 - loss_full
    ok = jnp.isfinite(pred) & (pred > 0) & jnp.isfinite(actual)
    rho = jnp.where(ok, actual / jnp.where(ok, pred, 1.0), jnp.nan)
    new = lm_damping(damping, rho, hp.damping_min, hp.damping_max)
    return new, {"lm_rho": rho, "lm_pred_decrease": pred, "lm_actual_decrease": actual}


def cost(hp, num_blocks: int, cg_iters_used=None) -> tuple[float, float]:
    """(inner, per line-search batch) value_and_grad equivalents at the outer batch of the CG
    step: the gradient, one primal and `cg_iters_used` (default cg_iters) tangent/transpose pairs,
    the diag_ggn estimate (one primal + transpose); with lm, one primal + tangent per line-search batch."""
    iters = hp.cg_iters if cg_iters_used is None else int(cg_iters_used)
    inner = 1.0 + (2.0 + 8.0 * num_blocks * iters) / 6.0 + (1.0 if hp.cg_precondition == "diag_ggn" else 0.0)
    search = (2.0 + 4.0 * num_blocks) / 6.0 if hp.damping_adapt == "lm" else 0.0
    return inner, search


__all__ = ["CG_PRECONDITIONERS", "DAMPING_ADAPT", "cg_solve", "cost", "damped_solve", "ggn_diagonal",
           "lm_damping", "lm_update", "validate_options"]
