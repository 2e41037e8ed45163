"""FOG, DiagFog and PI-Muon: statistical operators composed with Muon (docs/methods.md §1-3).

Seed 000 ("FOG/DiagFog: 算子复合的几何优化范式") replaces PI-Muon's linear
mixing of a Fisher step and a Muon step by operator composition,

    update = Structural_Op(Statistical_Op(g)),

with Muon (Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/) as the
structural operator on each hidden (in, out) kernel, gn.optim's one Muon core
(`_muon.scale_by_muon`, its defaults: no bias correction, the "gn" Newton–Schulz):

    m ← β m + (1 − β) x;   y = β m + (1 − β) x (Nesterov) or y = m
    u = √max(1, out/in) · NS5(y)                    (`newton_schulz.orthogonalize`)

- FOG:      x = K-FAC⁻¹ g  (`kfac.scale_by_kfac`, Martens & Grosse 2015)
- DiagFog:  x = g ⊘ (f_diag + ε), with f_diag either the Kronecker diagonal
            f_ij = E[a_i²]·E[δ_j²] (diag="kron", default, as the reference
            implementation; O(in + out) state per kernel) or an EMA of squared
            gradients (diag="ema_sq", O(in·out)). `scale_by_diag_fisher`.
- PI-Muon:  u = (1 − λ) g_fisher + λ Muon(g), λ = 1 − PI,
            PI = exp(−(α·H + γ·‖g‖)), H the batch's mean predictive entropy and
            ‖g‖ the global gradient norm. g_fisher comes from any transformation
            (`fisher=`, default K-FAC) or from the `g_fisher=` extra argument.
- K-FAC:    plain natural-gradient descent, lr · (momentum of) g_nat.

Embeddings, the output head and norm scales go to the AdamW side of gn.optim's one
router (`_muon.with_adamw_side`, its defaults; `**adam` passes its options), as the
seeds and the GN paper, so the head's V×V factor is never built unless
`include_head=True`. The trainer-facing method that gathers the gradient, the
layer statistics and the entropy in one forward/backward pass is
`gn.methods.stats.StatsMethod`.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from gn.optim._kfac import LayerFactors, ema_decay, resolve_factors, scale_by_kfac
from gn.optim._muon import ScaleByMuonState, matrix_mask_fn, scale_by_muon, with_adamw_side
from gn.optim.newton_schulz import safe_increment
from gn.optim.transforms import tree_norm

DIAG_MODES = ("kron", "ema_sq")
FISHER_SOURCES = ("kfac", "lwgn")


# --------------------------------------------------------------------------- DiagFog statistics


class ScaleByDiagFisherState(NamedTuple):
    """State of `scale_by_diag_fisher`: per kernel a LayerFactors of EMA diagonals
    (diag="kron": (in,), (out,)) or an EMA of g² of the kernel's shape (diag="ema_sq")."""

    count: jax.Array
    refreshes: jax.Array
    layers: Any


def scale_by_diag_fisher(stat_decay: float = 0.95, eps: float = 1e-8, *, diag: str = "kron",
                         T_cov: int = 1) -> optax.GradientTransformationExtraArgs:
    """DiagFog's statistical operator: g_nat = g ⊘ (f_diag + ε) (docs/methods.md §2).

    diag="kron": f_ij = Ā_i · Ḡ_j with Ā, Ḡ EMAs of E[a_i²] and E[δ_j²] (δ the
    per-token gradient of the summed loss), i.e. the diagonal of K-FAC's A ⊗ G,
    from `factors=` (diagonal `LayerFactors`, `kfac.batch_factors(diagonal=True)`).
    diag="ema_sq": f = EMA of g ⊙ g of the (mean-loss) gradient itself; no
    statistics needed. Note g/(g² + ε) amplifies small entries up to 1/(2√ε):
    the seed's formula, literally; ε matters much more in this mode.
    EMAs refresh when count % T_cov == 0, with ε_k = min(1 − 1/k, stat_decay).
    """
    if diag not in DIAG_MODES:
        raise ValueError(f"diag must be one of {DIAG_MODES}, got {diag!r}")

    def init_fn(params):
        def layer(p):
            if p.ndim != 2:
                raise ValueError(f"scale_by_diag_fisher applies to 2-D kernels, got shape {p.shape}")
            dt = jnp.promote_types(p.dtype, jnp.float32)
            if diag == "kron":
                return LayerFactors(jnp.zeros((p.shape[0],), dt), jnp.zeros((p.shape[1],), dt))
            return jnp.zeros(p.shape, dt)

        zero = jnp.zeros([], jnp.int32)
        return ScaleByDiagFisherState(zero, zero, jax.tree.map(layer, params))

    def update_fn(updates, state, params=None, *, factors=None, layer_inputs=None,
                  layer_output_grads=None, **extra):
        del params, extra
        leaves, treedef = jax.tree.flatten(updates)
        layers = treedef.flatten_up_to(state.layers)
        refresh = state.count % T_cov == 0
        refreshes = state.refreshes + refresh.astype(jnp.int32)
        e = ema_decay(stat_decay, refreshes)
        if diag == "kron":
            fs = resolve_factors(updates, factors, layer_inputs, layer_output_grads, diagonal=True,
                                 name="scale_by_diag_fisher")
            new = [LayerFactors(e * l.a + (1 - e) * f.a, e * l.g + (1 - e) * f.g) for l, f in zip(layers, fs)]
        else:
            new = [e * l + (1 - e) * jnp.square(g.astype(l.dtype)) for l, g in zip(layers, leaves)]
        layers = [jax.tree.map(lambda n, o: jnp.where(refresh, n, o), n, o) for n, o in zip(new, layers)]

        def nat(g, l):
            f = l.a[:, None] * l.g[None, :] if diag == "kron" else l
            return (g.astype(f.dtype) / (f + eps)).astype(g.dtype)

        out = [nat(g, l) for g, l in zip(leaves, layers)]
        return treedef.unflatten(out), ScaleByDiagFisherState(safe_increment(state.count), refreshes,
                                                              treedef.unflatten(layers))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------- composed directions


def scale_by_fog(stat_decay: float = 0.95, damping: float = 1e-3, *, damping_mode: str = "eigen",
                 T_cov: int = 1, T_inv: int = 10, kl_clip: float = 0.0, learning_rate=None,
                 beta: float = 0.95, nesterov: bool = True, ns_steps: int = 5
                 ) -> optax.GradientTransformationExtraArgs:
    """FOG direction (docs/methods.md §1): u = Muon(K-FAC⁻¹ g), chain(scale_by_kfac, scale_by_muon);
    extra arg `factors=`."""
    return optax.chain(scale_by_kfac(stat_decay, damping, damping_mode=damping_mode, T_cov=T_cov,
                                     T_inv=T_inv, kl_clip=kl_clip, learning_rate=learning_rate),
                       scale_by_muon(beta, nesterov=nesterov, ns_steps=ns_steps))


def scale_by_diagfog(stat_decay: float = 0.95, eps: float = 1e-8, *, diag: str = "kron", T_cov: int = 1,
                     beta: float = 0.95, nesterov: bool = True, ns_steps: int = 5
                     ) -> optax.GradientTransformationExtraArgs:
    """DiagFog direction (docs/methods.md §2): u = Muon(g ⊘ (f_diag + ε)),
    chain(scale_by_diag_fisher, scale_by_muon)."""
    return optax.chain(scale_by_diag_fisher(stat_decay, eps, diag=diag, T_cov=T_cov),
                       scale_by_muon(beta, nesterov=nesterov, ns_steps=ns_steps))


class ScaleByPIMuonState(NamedTuple):
    """State of `scale_by_pi_muon`; `pi` is the last PI (diagnostics)."""

    count: jax.Array
    pi: jax.Array
    muon: ScaleByMuonState
    fisher: Any


def predictive_integrity(entropy: jax.Array, grad_norm: jax.Array, alpha: float, gamma: float) -> jax.Array:
    """PI = exp(−(α·H + γ·‖g‖))."""
    return jnp.exp(-(alpha * entropy + gamma * grad_norm)).astype(jnp.float32)


def scale_by_pi_muon(fisher: Optional[optax.GradientTransformation] = None, *, alpha: float = 0.1,
                     gamma: float = 0.1, beta: float = 0.95, nesterov: bool = True, ns_steps: int = 5
                     ) -> optax.GradientTransformationExtraArgs:
    """PI-Muon (superseded by FOG; docs/methods.md §3): u = (1 − λ) g_fisher + λ Muon(g),
    Muon = `scale_by_muon(beta, nesterov=..., ns_steps=...)`,

        λ = 1 − PI,  PI = exp(−(α·H + γ·‖g‖)).

    Extra args: `entropy=` H (required), `grad_norm=` ‖g‖ (default: the norm of
    the updates this transform sees), and either `g_fisher=` (a tree like the
    updates) or, when `fisher` is a transformation (e.g. `scale_by_kfac`, or a
    layerwise Gauss-Newton solve), g_fisher = fisher.update(g, ...) with all
    extra args passed on. Muon keeps its own momentum on g; g_fisher has none.
    """
    muon = scale_by_muon(beta, nesterov=nesterov, ns_steps=ns_steps)
    fisher_tx = None if fisher is None else optax.with_extra_args_support(fisher)

    def init_fn(params):
        fs = None if fisher_tx is None else fisher_tx.init(params)
        return ScaleByPIMuonState(jnp.zeros([], jnp.int32), jnp.zeros([], jnp.float32), muon.init(params), fs)

    def update_fn(updates, state, params=None, *, entropy=None, grad_norm=None, g_fisher=None, **extra):
        if entropy is None:
            raise ValueError("scale_by_pi_muon.update needs the extra argument `entropy=`")
        fs = state.fisher
        if g_fisher is None:
            if fisher_tx is None:
                raise ValueError("scale_by_pi_muon: pass `g_fisher=` or build it with a `fisher` transformation")
            g_fisher, fs = fisher_tx.update(updates, fs, params, entropy=entropy, grad_norm=grad_norm, **extra)
        m, ms = muon.update(updates, state.muon, params)
        norm = tree_norm(updates) if grad_norm is None else grad_norm
        pi = predictive_integrity(entropy, norm, alpha, gamma)
        lam = 1.0 - pi
        u = jax.tree.map(lambda f, x: ((1 - lam) * f + lam * x).astype(x.dtype), g_fisher, m)
        return u, ScaleByPIMuonState(safe_increment(state.count), pi, ms, fs)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------- full optimizers


def kfac(learning_rate, stat_decay=0.95, damping=1e-3, *, damping_mode="eigen", T_cov=1, T_inv=10,
         kl_clip=1e-3, momentum=0.9, nesterov=False, include_head=False, **adam):
    """K-FAC natural-gradient descent (Martens & Grosse 2015) on the kernels:

        m ← momentum·m + ν g_nat (heavy ball; `momentum=0` disables),  θ ← θ − lr · m,

    g_nat = K-FAC⁻¹ g (`scale_by_kfac`, KL clip ν); the rest on the AdamW side
    (`with_adamw_side`, options in `**adam`)."""
    parts = [scale_by_kfac(stat_decay, damping, damping_mode=damping_mode, T_cov=T_cov, T_inv=T_inv,
                           kl_clip=kl_clip, learning_rate=learning_rate)]
    if momentum:
        parts.append(optax.trace(momentum, nesterov=nesterov))
    return with_adamw_side(optax.chain(*parts), learning_rate, include_head=include_head, **adam)


def fog(learning_rate, stat_decay=0.95, damping=1e-3, *, damping_mode="eigen", T_cov=1, T_inv=10,
        kl_clip=0.0, beta=0.95, nesterov=True, ns_steps=5, include_head=False, **adam):
    """FOG (docs/methods.md §1): θ ← θ − lr · u on the kernels, u = Muon(K-FAC⁻¹ g) with
    Muon = `scale_by_muon(beta, nesterov=..., ns_steps=...)`; the rest on the AdamW side
    (`with_adamw_side`, options in `**adam`)."""
    tx = scale_by_fog(stat_decay, damping, damping_mode=damping_mode, T_cov=T_cov, T_inv=T_inv,
                      kl_clip=kl_clip, learning_rate=learning_rate, beta=beta, nesterov=nesterov,
                      ns_steps=ns_steps)
    return with_adamw_side(tx, learning_rate, include_head=include_head, **adam)


def diagfog(learning_rate, stat_decay=0.95, eps=1e-8, *, diag="kron", T_cov=1, beta=0.95, nesterov=True,
            ns_steps=5, include_head=False, **adam):
    """DiagFog (docs/methods.md §2): θ ← θ − lr · u on the kernels, u = Muon(g ⊘ (f_diag + ε))
    with Muon = `scale_by_muon(beta, nesterov=..., ns_steps=...)`; the rest on the AdamW
    side (`with_adamw_side`, options in `**adam`)."""
    tx = scale_by_diagfog(stat_decay, eps, diag=diag, T_cov=T_cov, beta=beta, nesterov=nesterov,
                          ns_steps=ns_steps)
    return with_adamw_side(tx, learning_rate, include_head=include_head, **adam)


class WithFisherState(NamedTuple):
    """State of `with_fisher_direction`."""

    fisher: Any
    inner: Any


def with_fisher_direction(fisher: optax.GradientTransformation, inner: optax.GradientTransformation
                          ) -> optax.GradientTransformationExtraArgs:
    """g_fisher = fisher.update(g, params) on the FULL parameter tree (all extra args
    passed on), then inner.update(g, ..., g_fisher=g_fisher). Lets a Fisher source that
    needs the whole model (e.g. `gn.optim._lwgn.scale_by_layerwise_gn`) feed a
    partitioned optimizer such as PI-Muon."""
    fisher, inner = optax.with_extra_args_support(fisher), optax.with_extra_args_support(inner)

    def init_fn(params):
        return WithFisherState(fisher.init(params), inner.init(params))

    def update_fn(updates, state, params=None, **extra):
        extra.pop("g_fisher", None)
        g_fisher, fs = fisher.update(updates, state.fisher, params, **extra)
        u, ins = inner.update(updates, state.inner, params, g_fisher=g_fisher, **extra)
        return u, WithFisherState(fs, ins)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def pi_muon(learning_rate, alpha=0.1, gamma=0.1, *, fisher=None, stat_decay=0.95, damping=1e-3,
            damping_mode="eigen", T_cov=1, T_inv=10, kl_clip=1e-3, beta=0.95, nesterov=True, ns_steps=5,
            include_head=False, **adam):
    """PI-Muon: θ ← θ − lr · (PI · g_fisher + (1 − PI) · Muon(g)) on the kernels, with
    Muon = `scale_by_muon(beta, nesterov=..., ns_steps=...)` and PI = exp(−(α·H + γ·‖g‖));
    the rest on the AdamW side (`with_adamw_side`, options in `**adam`).

    g_fisher = fisher.update(g, params, **extra) on the full tree: by default K-FAC
    with these options (masked to the kernels; extra arg `factors=`); any other
    transformation can be plugged in, e.g. `lwgn.scale_by_layerwise_gn(apply_fn,
    only=...)` (extra args `inputs=`, `targets=`). Extra args: `entropy=`, `grad_norm=`.
    """
    if fisher is None:
        fisher = optax.masked(scale_by_kfac(stat_decay, damping, damping_mode=damping_mode, T_cov=T_cov,
                                            T_inv=T_inv, kl_clip=kl_clip, learning_rate=learning_rate),
                              matrix_mask_fn(include_head))
    tx = scale_by_pi_muon(alpha=alpha, gamma=gamma, beta=beta, nesterov=nesterov, ns_steps=ns_steps)
    return with_fisher_direction(fisher, with_adamw_side(tx, learning_rate, include_head=include_head,
                                                         mask_extra_args=True, **adam))


__all__ = ["DIAG_MODES", "FISHER_SOURCES", "ScaleByDiagFisherState", "ScaleByMuonState", "ScaleByPIMuonState",
           "diagfog", "fog", "kfac", "matrix_mask_fn", "pi_muon", "predictive_integrity", "scale_by_diag_fisher",
           "scale_by_diagfog", "scale_by_fog", "scale_by_muon", "scale_by_pi_muon", "with_adamw_side",
           "with_fisher_direction"]
