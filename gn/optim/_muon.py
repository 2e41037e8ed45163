"""The Muon core, the AdamW-side router and the `muon` alias: one of each for all of gn.optim.

Muon (Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/). `scale_by_muon`,
per (in, out) kernel x (or stack (..., in, out)) at update t = 1, 2, ...:

    m ← β m + (1 − β) x
    y = β m + (1 − β) x  (nesterov)    or    y = m
    bias_correction=True (optax.contrib.muon's convention):
        y = β m / (1 − β^(t+1)) + (1 − β) x / (1 − β^t)  (nesterov),   y = m / (1 − β^t)
    O = NS(y)        Newton–Schulz, ns_steps of X ← aX + (bA + cA²)X, (a, b, c) = ns_coeffs,
                     after X₀ = y / (‖y‖_F + ns_eps)   (`newton_schulz.orthogonalize`)
    u = s · O        scaling="width": s = √max(1, out/in) (`newton_schulz.scale_width`);
                     scaling="none": s = 1

`backend` picks the implementation, not the maths: "gn" (gn.optim's Newton–Schulz loop,
s in float64) or "optax" (optax.contrib's Newton–Schulz and its float32 s, the EMA in
optax's operand order), which agree to float32 round-off (`newton_schulz` module
docstring). Every Muon-based alias composes this transformation:

    muon        θ ← θ − lr · u(g)                      (bias-corrected, optax backend: the
                                                         numbers of optax.contrib.muon)
    fog         θ ← θ − lr · u(K-FAC⁻¹ g)               (`_fog.scale_by_fog`)
    diagfog     θ ← θ − lr · u(g ⊘ (f_diag + ε))        (`_fog.scale_by_diagfog`)
    pi_muon     θ ← θ − lr · ((1 − λ) g_fisher + λ u(g))
    fog_gn      θ ← θ − lr · u(LwGN⁻¹ g)                (`_lwgn.fog_gn`)

NorMuon and RMSuon (`muon_family`) change the maths after NS; they reuse its pieces
(`muon_momentum`, `orthogonalize`, `muon_scale`).

The router, `with_adamw_side`, splits the parameters by path (`gn.paths`): the matrix
side is every hidden 2-D kernel (`masks.matrix_mask`, not 'embed*' nor 'lm_head*'), plus
lm_head's kernel with include_head=True; everything else — embedding, head, norm scales,
biases — goes to the AdamW side. Its defaults, the same for every alias that routes
(muon, normuon, rmsuon, adarmsuon, kfac, fog, diagfog, pi_muon, pi_muon_gn, fog_gn):

    ADAMW_SIDE = {adam_b1: 0.9, adam_b2: 0.95, adam_eps: 1e-8, adam_nesterov: False,
                  adam_weight_decay: 0.0 (on every AdamW-side leaf),
                  adam_learning_rate: None (= the matrix side's learning_rate)}
    matrix side: weight_decay 0.0, weight_decay_mask None (= every matrix leaf)
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import optax

from gn.optim.newton_schulz import (DEFAULT_NS_COEFFS, NS_BACKENDS, default_matrix_mask, orthogonalize,
                                    safe_increment, scale_width)
from gn.paths import param_name, top_level

MaskOrFn = Optional[Union[Any, Callable[[optax.Params], Any]]]
SCALINGS = ("width", "none")

# The AdamW side's defaults, shared by every alias that routes (module docstring).
ADAM_B1 = 0.9
ADAM_B2 = 0.95
ADAM_EPS = 1e-8
ADAM_NESTEROV = False
ADAM_WEIGHT_DECAY = 0.0
ADAMW_SIDE = {"adam_b1": ADAM_B1, "adam_b2": ADAM_B2, "adam_eps": ADAM_EPS, "adam_nesterov": ADAM_NESTEROV,
              "adam_weight_decay": ADAM_WEIGHT_DECAY, "adam_learning_rate": None}


# --------------------------------------------------------------------------- the core


class ScaleByMuonState(NamedTuple):
    """State of `scale_by_muon`."""

    count: jax.Array
    mu: optax.Updates


def muon_momentum(updates: Any, mu: Any, beta: float, nesterov: bool, count: Optional[jax.Array] = None,
                  backend: str = "gn") -> tuple[Any, Any]:
    """(y, m_new) for a tree (or one array) of updates and momenta (module docstring);
    `count` = t − 1 turns the bias correction on.

    backend="optax" writes the EMA in optax's operand order, (1 − β) x + β m, and
    bias-corrects the whole tree in one `optax.tree.bias_correction`: the same numbers,
    but under jit XLA rounds a·b + c·d (FMA contraction) and a fused division by the
    operand order and the fusion, and these are what keep `muon` bit-identical to
    optax.contrib.muon."""
    if backend == "optax":
        mu = jax.tree.map(lambda x, m: (1 - beta) * x + beta * m, updates, mu)
    else:
        mu = jax.tree.map(lambda x, m: beta * m + (1 - beta) * x, updates, mu)
    if count is None:
        y = jax.tree.map(lambda m, x: beta * m + (1 - beta) * x, mu, updates) if nesterov else mu
        return y, mu
    t = safe_increment(count)
    if nesterov:
        y = jax.tree.map(lambda m, x: beta * m + (1 - beta) * x,
                         optax.tree.bias_correction(mu, beta, safe_increment(t)),
                         optax.tree.bias_correction(updates, beta, t))
    else:
        y = optax.tree.bias_correction(mu, beta, t)
    return y, mu


def _check_leaf(path, p) -> None:
    if getattr(p, "ndim", 0) < 2:
        raise ValueError(
            f"scale_by_muon orthogonalises (in, out) kernels, but '{param_name(path)}' has shape "
            f"{getattr(p, 'shape', None)}; route non-matrix leaves elsewhere, e.g. with "
            "`with_adamw_side` (an AdamW side for embeddings, head, norms and biases).")


def scale_by_muon(beta: float = 0.95, *, nesterov: bool = True, bias_correction: bool = False, ns_steps: int = 5,
                  ns_coeffs: Sequence[float] = DEFAULT_NS_COEFFS, ns_eps: float = 1e-7, backend: str = "gn",
                  scaling: str = "width") -> optax.GradientTransformationExtraArgs:
    """Muon's direction on matrix leaves (ndim >= 2): u = s · NS(y), y the (Nesterov)
    momentum of the updates (module docstring for every option). Extra args are ignored."""
    if backend not in NS_BACKENDS:
        raise ValueError(f"backend must be one of {NS_BACKENDS}, got {backend!r}")
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")

    def init_fn(params):
        def zeros(path, p):
            _check_leaf(path, p)
            return jnp.zeros_like(p)

        return ScaleByMuonState(jnp.zeros([], jnp.int32), jax.tree_util.tree_map_with_path(zeros, params))

    def direction(y):
        o = orthogonalize(y, coeffs=ns_coeffs, steps=ns_steps, eps=ns_eps, backend=backend)
        return scale_width(o, backend) if scaling == "width" else o

    def update_fn(updates, state, params=None, **extra):
        del params, extra
        y, mu = muon_momentum(updates, state.mu, beta, nesterov, state.count if bias_correction else None, backend)
        return jax.tree.map(direction, y), ScaleByMuonState(safe_increment(state.count), mu)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------- the router


def matrix_mask_fn(include_head: bool = False) -> Callable[[Any], Any]:
    """Leaves on the matrix (Muon / statistical) side: hidden 2-D kernels, plus lm_head if asked."""
    def mask(params):
        base = default_matrix_mask(params)
        if not include_head:
            return base
        return jax.tree_util.tree_map_with_path(
            lambda p, m, x: bool(m) or (top_level(p) == "lm_head" and x.ndim == 2), base, params)

    return mask


def _decay(weight_decay, mask) -> list:
    """add_decayed_weights, left out when the decay is a plain zero (it would add 0·θ)."""
    if isinstance(weight_decay, (int, float)) and weight_decay == 0:
        return []
    return [optax.add_decayed_weights(weight_decay, mask)]


def with_adamw_side(matrix_tx: optax.GradientTransformation, learning_rate: optax.ScalarOrSchedule, *,
                    include_head: bool = False, matrix_mask: MaskOrFn = None, weight_decay: Any = 0.0,
                    weight_decay_mask: MaskOrFn = None, adam_learning_rate: Optional[optax.ScalarOrSchedule] = None,
                    adam_b1: float = ADAM_B1, adam_b2: float = ADAM_B2, adam_eps: float = ADAM_EPS,
                    adam_nesterov: bool = ADAM_NESTEROV, adam_weight_decay: Any = ADAM_WEIGHT_DECAY,
                    mask_extra_args: bool = False) -> optax.GradientTransformationExtraArgs:
    """The AdamW-side router of gn.optim (defaults in the module docstring):

        partition({'matrix': chain(matrix_tx, add_decayed_weights(weight_decay, weight_decay_mask),
                                   scale_by_learning_rate(learning_rate)),
                   'adam':   chain(scale_by_adam(adam_b1, adam_b2, adam_eps, nesterov=adam_nesterov),
                                   add_decayed_weights(adam_weight_decay),
                                   scale_by_learning_rate(adam_learning_rate or learning_rate))})

    The matrix side is `matrix_mask` (a pytree of bools or a callable on params) or, by
    default, `matrix_mask_fn(include_head)`. `weight_decay_mask` (a pytree over the full
    params or a callable; AdamW-side entries are ignored) restricts the matrix-side decay;
    a callable is called, as in optax, on the partition-masked tree. A decay of 0 is left
    out. `mask_extra_args`: extra args shaped like the params (g_fisher) are masked like
    the updates.
    """
    if matrix_mask is not None and include_head:
        raise ValueError("with_adamw_side: give either matrix_mask or include_head=True, not both")
    mask = matrix_mask_fn(include_head) if matrix_mask is None else matrix_mask

    def labels(tree):
        resolved = mask(tree) if callable(mask) else mask
        return jax.tree.map(lambda is_matrix: "matrix" if is_matrix else "adam", resolved)

    adam_lr = learning_rate if adam_learning_rate is None else adam_learning_rate
    return optax.partition(
        {"matrix": optax.chain(matrix_tx, *_decay(weight_decay, weight_decay_mask),
                               optax.scale_by_learning_rate(learning_rate)),
         "adam": optax.chain(optax.scale_by_adam(adam_b1, adam_b2, adam_eps, nesterov=adam_nesterov),
                             *_decay(adam_weight_decay, None), optax.scale_by_learning_rate(adam_lr))},
        labels, mask_compatible_extra_args=mask_extra_args)


# --------------------------------------------------------------------------- the alias


def muon(learning_rate: optax.ScalarOrSchedule, *, beta: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
         ns_coeffs: Sequence[float] = DEFAULT_NS_COEFFS, ns_eps: float = 1e-8, bias_correction: bool = True,
         backend: str = "optax", include_head: bool = False, matrix_mask: MaskOrFn = None,
         weight_decay: Any = 0.0, weight_decay_mask: MaskOrFn = None, **adamw_side: Any
         ) -> optax.GradientTransformationExtraArgs:
    """Muon: θ ← θ − lr · (u + weight_decay·θ) on the matrix side, u = `scale_by_muon(g)`;
    AdamW elsewhere (`with_adamw_side`, whose options `adamw_side` passes on).

    Its defaults (bias correction, ns_eps 1e-8, the optax backend) give the numbers of
    `optax.contrib.muon(learning_rate, beta=..., nesterov=..., ns_steps=...)` on the matrix
    side; contrib.muon's AdamW side is Nesterov Adam when Muon is Nesterov, β₂ 0.999:
    pass adam_nesterov=nesterov, adam_b2=0.999 for that side too.
    """
    core = scale_by_muon(beta, nesterov=nesterov, bias_correction=bias_correction, ns_steps=ns_steps,
                         ns_coeffs=ns_coeffs, ns_eps=ns_eps, backend=backend)
    return with_adamw_side(core, learning_rate, include_head=include_head, matrix_mask=matrix_mask,
                           weight_decay=weight_decay, weight_decay_mask=weight_decay_mask, **adamw_side)
