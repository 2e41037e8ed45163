"""Muon variants: NorMuon, RMSuon and AdaRMSuon.

Each is a `scale_by_*` primitive for the matrix leaves, built from the pieces of
gn.optim's Muon core (`_muon.muon_momentum`, `newton_schulz.orthogonalize`,
`newton_schulz.muon_scale`: their maths differs from Muon's after, or before, the
Newton–Schulz step), plus an alias that routes with gn.optim's one AdamW-side router,
`_muon.with_adamw_side` (its defaults, the same for every alias; `**adamw_side` passes
its options: adam_learning_rate, adam_b1, adam_b2, adam_eps, adam_nesterov,
adam_weight_decay):

    partition({'matrix': chain(scale_by_X(...),
                               add_decayed_weights(weight_decay, weight_decay_mask),
                               scale_by_learning_rate(learning_rate)),
               'adam':   chain(scale_by_adam(adam_b1, adam_b2, adam_eps, nesterov=adam_nesterov),
                               add_decayed_weights(adam_weight_decay),
                               scale_by_learning_rate(adam_learning_rate or learning_rate))},
              labels from matrix_mask)

`matrix_mask` (pytree of bools or callable on params, chosen by path) defaults
to `default_matrix_mask`: 2-D leaves outside 'embed' / 'lm_head'.
`weight_decay_mask` (pytree of bools over the full params, or a callable;
entries of AdamW-side leaves are ignored) restricts the matrix-side decay and
defaults to every matrix leaf; `adam_weight_decay` (default 0) decays every
AdamW-side leaf. A callable `weight_decay_mask` is called, as in optax, on the
partition-masked tree (AdamW leaves replaced by `optax.MaskedNode`), so path- or
shape-based callables work.

Kernels are (in, out) (`x @ W`): a column is one output neuron, Muon's width
factor is √max(1, out/in) (`newton_schulz.muon_scale`). Leading dims beyond the
last two are treated as a batch of matrices.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from gn.optim._muon import MaskOrFn, muon_momentum, with_adamw_side
from gn.optim.newton_schulz import DEFAULT_NS_COEFFS, muon_scale, orthogonalize, safe_increment


def _check_matrix(x: jax.Array, name: str) -> None:
    if x.ndim < 2:
        raise ValueError(f"{name} applies to matrices (ndim >= 2), got a leaf of shape {x.shape}; "
                         "route it to the AdamW side with matrix_mask.")


def _fro(x: jax.Array) -> jax.Array:
    """Frobenius norm of each matrix of a (..., m, n) stack, shape (..., 1, 1)."""
    return jnp.sqrt(jnp.sum(jnp.square(x), axis=(-2, -1), keepdims=True))


def _safe_div(a: jax.Array, b: jax.Array) -> jax.Array:
    """a / b, and 0 where b == 0 (all-zero gradients give a zero update)."""
    ok = b > 0
    return jnp.where(ok, a / jnp.where(ok, b, 1), 0)


# --------------------------------------------------------------------------- NorMuon


class ScaleByNorMuonState(NamedTuple):
    """State of `scale_by_normuon`."""

    count: jax.Array  # int32 scalar
    mu: optax.Updates  # momentum, shaped like the params
    nu: optax.Updates  # per-output-neuron second moment of O, shape (..., 1, out)


def scale_by_normuon(
    beta: float = 0.95,
    b2: float = 0.95,
    eps: float = 1e-8,
    *,
    nesterov: bool = True,
    ns_coeffs: Sequence[float] = DEFAULT_NS_COEFFS,
    ns_steps: int = 5,
    rms_target: Optional[float] = None,
) -> optax.GradientTransformation:
    r"""NorMuon direction: Muon with neuron-wise second-moment normalisation.

    Li, Liu, Liang, Chen, Liang, Zhao, "NorMuon: Making Muon more efficient and
    scalable", arXiv 2510.05491 (2025), Algorithm 1. For a kernel G (in, out):

        M ← β M + (1 − β) G;   X = β M + (1 − β) G  (Nesterov) or X = M
        O = NS5(X)                                   (`orthogonalize`)
        v ← b2 v + (1 − b2) mean_in(O ⊙ O)           (v ∈ R^{1×out}, one per output neuron)
        Ô = O / (√v + ε)                             (v broadcast over the input dim)
        u = s · Ô

    Scaling s (the paper rescales so the update RMS is fixed):
      - rms_target=None (default): s = muon_scale(shape)·‖O‖_F / ‖Ô‖_F, so
        ‖u‖_F equals the Frobenius norm of Muon's update √max(1, out/in)·O and
        Muon's learning rates carry over;
      - rms_target=r: s = r·√(in·out) / ‖Ô‖_F, so RMS(u) = r (paper: r = 0.2,
        AdamW-matched learning rates).
    v is not bias-corrected: s removes any global scale of v, so a correction
    would only move ε. Momentum and its Nesterov form are Muon's (Jordan et al.
    2024): X = β M + (1 − β) G with M already updated.

    Applies to matrix leaves only (ndim >= 2); see `normuon` for the full optimizer.
    """
    coeffs = tuple(float(c) for c in ns_coeffs)

    def init_fn(params):
        def nu0(p):
            _check_matrix(p, "scale_by_normuon")
            return jnp.zeros(p.shape[:-2] + (1, p.shape[-1]), p.dtype)

        return ScaleByNorMuonState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, params),
                                   jax.tree.map(nu0, params))

    def leaf(g, m, v):
        _check_matrix(g, "scale_by_normuon")
        x, m = muon_momentum(g, m, beta, nesterov)      # Muon's momentum, as `scale_by_muon`
        o = orthogonalize(x, coeffs=coeffs, steps=ns_steps)
        v = b2 * v + (1 - b2) * jnp.mean(jnp.square(o), axis=-2, keepdims=True)
        o_hat = o / (jnp.sqrt(v) + eps)
        if rms_target is None:
            num = muon_scale(g.shape) * _fro(o)
        else:
            num = rms_target * jnp.sqrt(float(g.shape[-2] * g.shape[-1])).astype(g.dtype)
        return _safe_div(num, _fro(o_hat)) * o_hat, m, v

    def update_fn(updates, state, params=None):
        del params
        outs = jax.tree.map(leaf, updates, state.mu, state.nu)
        u, m, v = (jax.tree.map(lambda _, t, i=i: t[i], updates, outs) for i in range(3))
        return u, ScaleByNorMuonState(safe_increment(state.count), m, v)

    return optax.GradientTransformation(init_fn, update_fn)


def normuon(
    learning_rate: optax.ScalarOrSchedule,
    beta: float = 0.95,
    b2: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    nesterov: bool = True,
    ns_coeffs: Sequence[float] = DEFAULT_NS_COEFFS,
    ns_steps: int = 5,
    rms_target: Optional[float] = None,
    matrix_mask: MaskOrFn = None,
    weight_decay_mask: MaskOrFn = None,
    **adamw_side: Any,
) -> optax.GradientTransformation:
    """NorMuon (arXiv 2510.05491) on matrix leaves, AdamW on the rest.

    Matrix leaves: θ ← θ − lr·(u + weight_decay·θ) with u from `scale_by_normuon`;
    other leaves: the AdamW side of `with_adamw_side` (options in `**adamw_side`).
    See the module docstring for masks and the AdamW side.
    """
    tx = scale_by_normuon(beta, b2, eps, nesterov=nesterov, ns_coeffs=ns_coeffs, ns_steps=ns_steps,
                          rms_target=rms_target)
    return with_adamw_side(tx, learning_rate, matrix_mask=matrix_mask, weight_decay=weight_decay,
                           weight_decay_mask=weight_decay_mask, **adamw_side)


# --------------------------------------------------------------------------- RMSuon


class ScaleByRMSuonState(NamedTuple):
    """State of `scale_by_rmsuon` (Adam's moments)."""

    count: jax.Array  # int32 scalar
    mu: optax.Updates
    nu: optax.Updates


def scale_by_rmsuon(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    whiten: bool = False,
    v_penalty: float = 0.0,
    ns_coeffs: Sequence[float] = DEFAULT_NS_COEFFS,
    ns_steps: int = 5,
) -> optax.GradientTransformation:
    r"""RMSuon direction: Muon's orthogonal geometry with Adam's step length.

    Seed 003 (ADR "V-RMSuon", deprecated) and the RMSuon family notes of its
    author (dmf-archive/Tiny-ONN, `.roo/rules/RMSuon.md`). Per matrix G, count t:

        m ← b1 m + (1 − b1) G,   v ← b2 v + (1 − b2) G²
        m̂ = m / (1 − b1ᵗ),       v̂ = v / (1 − b2ᵗ)
        A = m̂ / (√v̂ + ε)                     (Adam's update)
        E = ‖A‖_F                             ("energy")
        O = NS5(m̂)          if not whiten     (RMSuon)
        O = NS5(A)          if whiten         (AdaRMSuon: orthogonalise the
                                               pre-whitened, Adam-preconditioned momentum)
        u = (E / ‖O‖_F) · O + v_penalty · √v̂ (V-RMSuon's direct penalty when v_penalty > 0)

    so that, without the penalty, ‖u‖_F = E: the update has the direction of
    the orthogonalised momentum and the length of Adam's update. The seed writes
    AdaRMSuon as η‖g_nat‖_F·NS(g_nat); we divide by ‖O‖_F in both variants so
    that the length is exactly E (NS5 leaves ‖O‖_F ≈ √min(m, n) · band).
    Applies to matrix leaves only (ndim >= 2).
    """
    coeffs = tuple(float(c) for c in ns_coeffs)

    def init_fn(params):
        jax.tree.map(lambda p: _check_matrix(p, "scale_by_rmsuon"), params)
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)
        return ScaleByRMSuonState(jnp.zeros([], jnp.int32), zeros(), zeros())

    def update_fn(updates, state, params=None):
        del params
        count = safe_increment(state.count)
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
        mu_hat = optax.tree.bias_correction(mu, b1, count)
        nu_hat = optax.tree.bias_correction(nu, b2, count)

        def leaf(g, m_hat, v_hat):
            _check_matrix(g, "scale_by_rmsuon")
            adam = m_hat / (jnp.sqrt(v_hat) + eps)
            o = orthogonalize(adam if whiten else m_hat, coeffs=coeffs, steps=ns_steps)
            u = _safe_div(_fro(adam), _fro(o)) * o
            if v_penalty:
                u = u + v_penalty * jnp.sqrt(v_hat)
            return u

        return jax.tree.map(leaf, updates, mu_hat, nu_hat), ScaleByRMSuonState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


def _rmsuon_alias(whiten, learning_rate, b1, b2, eps, weight_decay, *, v_penalty, ns_coeffs, ns_steps,
                  matrix_mask, weight_decay_mask, adamw_side):
    tx = scale_by_rmsuon(b1, b2, eps, whiten=whiten, v_penalty=v_penalty, ns_coeffs=ns_coeffs,
                         ns_steps=ns_steps)
    return with_adamw_side(tx, learning_rate, matrix_mask=matrix_mask, weight_decay=weight_decay,
                           weight_decay_mask=weight_decay_mask, **adamw_side)


def rmsuon(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    v_penalty: float = 0.0,
    ns_coeffs: Sequence[float] = DEFAULT_NS_COEFFS,
    ns_steps: int = 5,
    matrix_mask: MaskOrFn = None,
    weight_decay_mask: MaskOrFn = None,
    **adamw_side: Any,
) -> optax.GradientTransformation:
    """RMSuon: θ ← θ − lr·((E/‖O‖_F)·O + v_penalty·√v̂ + weight_decay·θ), O = NS5(m̂).

    E = ‖m̂/(√v̂+ε)‖_F (docs/methods.md §5). v_penalty > 0 gives V-RMSuon. Matrix leaves
    only; the rest on the AdamW side of `with_adamw_side` (options in `**adamw_side`).
    """
    return _rmsuon_alias(False, learning_rate, b1, b2, eps, weight_decay, v_penalty=v_penalty,
                         ns_coeffs=ns_coeffs, ns_steps=ns_steps, matrix_mask=matrix_mask,
                         weight_decay_mask=weight_decay_mask, adamw_side=adamw_side)


def adarmsuon(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    v_penalty: float = 0.0,
    ns_coeffs: Sequence[float] = DEFAULT_NS_COEFFS,
    ns_steps: int = 5,
    matrix_mask: MaskOrFn = None,
    weight_decay_mask: MaskOrFn = None,
    **adamw_side: Any,
) -> optax.GradientTransformation:
    """AdaRMSuon: RMSuon with O = NS5(m̂/(√v̂+ε)) (orthogonalise the pre-whitened momentum).

    θ ← θ − lr·((E/‖O‖_F)·O + v_penalty·√v̂ + weight_decay·θ), E = ‖m̂/(√v̂+ε)‖_F.
    Matrix leaves only; the rest on the AdamW side of `with_adamw_side` (`**adamw_side`).
    """
    return _rmsuon_alias(True, learning_rate, b1, b2, eps, weight_decay, v_penalty=v_penalty,
                         ns_coeffs=ns_coeffs, ns_steps=ns_steps, matrix_mask=matrix_mask,
                         weight_decay_mask=weight_decay_mask, adamw_side=adamw_side)
