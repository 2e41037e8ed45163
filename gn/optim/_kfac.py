"""K-FAC: Kronecker-factored curvature statistics and preconditioner for dense kernels.

Martens & Grosse, "Optimizing Neural Networks with Kronecker-factored Approximate
Curvature", ICML 2015. Used on its own (`fog.kfac`) and as the statistical
operator of FOG (docs/methods.md §1: FOG = Muon ∘ K-FAC⁻¹, `gn.optim._fog`).

Conventions (kernels are (in, out): a dense layer computes y = a W)
-------------------------------------------------------------------
A batch has n = B·T token rows. ℓ̄ = (1/n) Σ_t ℓ_t is the mean loss the trainer
differentiates, L = Σ_t ℓ_t the summed loss. For one dense layer, token t has
input a_t ∈ R^in and output y_t ∈ R^out, and

    δ_t = ∂L/∂y_t = n · ∂ℓ̄/∂y_t          (per-token gradient of the SUMMED loss)
    ∇_W ℓ̄ = (1/n) Σ_t a_t δ_tᵀ             (in, out)
    A = (1/n) Σ_t a_t a_tᵀ   (in × in),     G = (1/n) Σ_t δ_t δ_tᵀ   (out × out)

The perturbation gradients of `gn.curvature.layer_stats` are ∂ℓ̄/∂y_t, so
they are multiplied by n here (without it G is n² too small: the known defect
of the PyTorch reference code of Abreu et al. 2025). With vec the row-major (C-order)
flattening of an (in, out) kernel, vec(a δᵀ) = a ⊗ δ, so the per-token Fisher
F = (1/n) Σ_t vec(a_t δ_tᵀ) vec(a_t δ_tᵀ)ᵀ ≈ A ⊗ G, and (A ⊗ G) vec(X) = vec(A X G).

Fisher: "empirical" (default, as the seeds) uses the true labels, so δ comes
from the gradient's own backward pass. "true" samples labels y ~ softmax(z)
with the step's rng and backpropagates that sampled loss through the same
forward pass (`jax.vjp` keeps its residuals) for the statistics only; the
gradient stays the true-label one. That costs one extra backward pass on
refresh steps.

Preconditioner, with A = U_A diag(s_A) U_Aᵀ and G = U_G diag(s_G) U_Gᵀ (`eigh`):

    damping_mode="eigen" (default): the exact (A ⊗ G + λI)⁻¹ vec(∇W):
        g_nat = U_A [ (U_Aᵀ ∇W U_G) ⊘ (s_A s_Gᵀ + λ) ] U_Gᵀ
    damping_mode="factored": Martens & Grosse §6.3's factored Tikhonov damping,
        g_nat = (A + λ_A I)⁻¹ ∇W (G + λ_G I)⁻¹ = ((A + λ_A I) ⊗ (G + λ_G I))⁻¹ vec(∇W),
        λ_A = π √λ, λ_G = √λ / π, π = √((tr A / in) / (tr G / out)).

Statistics are exponential moving averages refreshed every `T_cov` steps, with
Martens & Grosse §5's warm-up ε_k = min(1 − 1/k, stat_decay) at the k-th refresh
(the first refresh takes the batch estimate as is); eigendecompositions are
recomputed every `T_inv` steps, from the statistics of the same step.
Optional KL clip (kfac-pytorch): g_nat ← ν g_nat, ν = min(1, √(κ / (lr² Σ⟨g_nat, g⟩)))
with the sum over all preconditioned kernels; `kl_clip=0` disables it.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import optax


from gn.optim.newton_schulz import safe_increment
from gn.paths import path_keys

FISHER_TYPES = ("empirical", "true")
DAMPING_MODES = ("eigen", "factored")

Path = tuple[str, ...]


class LayerFactors(NamedTuple):
    """Statistics of one dense layer from one batch.

    Full (K-FAC): a = A (in, in), g = G (out, out).
    Diagonal (DiagFog): a = diag(A) = E[a_i²] (in,), g = diag(G) = E[δ_j²] (out,).
    """

    a: jax.Array
    g: jax.Array


def keys_of(path: Sequence[Any]) -> Path:
    """A jax key path as a tuple of strings, e.g. ('block_0', 'attn', 'wq', 'kernel')."""
    return path_keys(path)


def lookup(tree: Any, keys: Path) -> Any:
    """tree[k0][k1]...; None when a key is missing."""
    for k in keys:
        if not isinstance(tree, dict) or k not in tree:
            return None
        tree = tree[k]
    return tree


def _insert(tree: dict, keys: Path, value: Any) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def stat_layers(params: Any, mask: Any | Callable[[Any], Any]) -> tuple[Path, ...]:
    """Paths of the kernels selected by `mask` (pytree of bools or callable on params).

    Each must be a 2-D leaf named 'kernel' (a dense layer: flax's nn.Dense, gn.model's
    Dense2D), since its statistics are read at the module path (the path without 'kernel').
    """
    resolved = mask(params) if callable(mask) else mask
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    chosen = jax.tree.leaves(resolved)
    if len(chosen) != len(flat):
        raise ValueError("the layer mask must have the structure of the params")
    out = []
    for (path, leaf), use in zip(flat, chosen):
        if not use:
            continue
        keys = keys_of(path)
        if keys[-1] != "kernel" or getattr(leaf, "ndim", 0) != 2:
            raise ValueError(f"K-FAC statistics exist only for 2-D dense kernels, not for "
                             f"'{'/'.join(keys)}' of shape {getattr(leaf, 'shape', None)}; "
                             "route it to the AdamW side with the matrix mask.")
        out.append(keys)
    return tuple(out)


def kron_stats_cost(params: Any, mask: Any | Callable[[Any], Any], *, diagonal: bool = False) -> float:
    """value_and_grad equivalents of gathering a step's Kronecker statistics (a FLOP estimate):
    per token, A = a aᵀ and G = δ δᵀ of each selected (d_in, d_out) kernel cost 2(d_in² + d_out²)
    multiply-adds, against the gradient's 6N for N parameters (the GN methods' convention);
    `diagonal` factors (E[a²], E[δ²]) cost 2(d_in + d_out). Eigendecompositions (O(d³) every
    T_inv steps, independent of the batch) are not included."""
    resolved = mask(params) if callable(mask) else mask
    n = sum(int(x.size) for x in jax.tree.leaves(params))
    flops = 0.0
    for leaf, use in zip(jax.tree.leaves(params), jax.tree.leaves(resolved)):
        if use:
            d_in, d_out = leaf.shape
            flops += 2.0 * ((d_in + d_out) if diagonal else (d_in ** 2 + d_out ** 2))
    return flops / (6.0 * n)


def batch_factors(layer_inputs: Any, layer_output_grads: Any, layers: Sequence[Path], *,
                  diagonal: bool = False, loss_scale: Optional[float] = None) -> dict:
    """Per-batch factors of each layer in `layers` (kernel paths).

    Args:
      layer_inputs: tree of `gn.curvature.layer_stats` ({...: {"inputs": a (n, in)}}).
      layer_output_grads: gradient of the MEAN loss w.r.t. the perturbations
        ({...: {"outputs": ∂ℓ̄/∂y (n, out)}}).
      layers: kernel paths (from `stat_layers`).
      diagonal: return the diagonals E[a_i²], E[δ_j²] instead of A, G.
      loss_scale: factor from ∂ℓ̄/∂y to δ; default n (the number of rows),
        which makes δ the per-token gradient of the summed loss.

    Returns:
      A nested dict mirroring the params, with a `LayerFactors` (float32 or
      wider) at each kernel path.
    """
    out: dict = {}
    for keys in layers:
        a = lookup(layer_inputs, keys[:-1] + ("inputs",))
        d = lookup(layer_output_grads, keys[:-1] + ("outputs",))
        if a is None or d is None:
            raise ValueError(f"no layer statistics recorded for '{'/'.join(keys)}'")
        dt = jnp.promote_types(a.dtype, jnp.float32)
        a, d = a.astype(dt), d.astype(dt)
        n = a.shape[0]
        d = d * (n if loss_scale is None else loss_scale)
        if diagonal:
            f = LayerFactors(jnp.mean(a * a, axis=0), jnp.mean(d * d, axis=0))
        else:
            f = LayerFactors(a.T @ a / n, d.T @ d / n)
        _insert(out, keys, f)
    return out


# --------------------------------------------------------------------------- preconditioner


class KFACLayerState(NamedTuple):
    """Per-kernel K-FAC state: EMA factors and their (lagged) eigendecompositions."""

    a: jax.Array        # EMA of A, (in, in)
    g: jax.Array        # EMA of G, (out, out)
    a_vecs: jax.Array   # U_A (in, in)
    a_vals: jax.Array   # s_A (in,), clipped at 0
    g_vecs: jax.Array   # U_G (out, out)
    g_vals: jax.Array   # s_G (out,)


class ScaleByKFACState(NamedTuple):
    """State of `scale_by_kfac`."""

    count: jax.Array      # int32: updates done
    refreshes: jax.Array  # int32: statistics refreshes done (k of the EMA warm-up)
    layers: Any           # params-shaped tree with a KFACLayerState at each kernel


def ema_decay(stat_decay: float, k: jax.Array) -> jax.Array:
    """ε_k = min(1 − 1/k, stat_decay) at the k-th refresh (Martens & Grosse 2015 §5)."""
    return jnp.minimum(1.0 - 1.0 / jnp.maximum(k, 1).astype(jnp.float32), stat_decay)


def _eigh(m: jax.Array) -> tuple[jax.Array, jax.Array]:
    vals, vecs = jnp.linalg.eigh((m + m.T) / 2)
    return jnp.maximum(vals, 0.0), vecs


def precondition(grad: jax.Array, layer: KFACLayerState, damping: float,
                 damping_mode: str = "eigen") -> jax.Array:
    """g_nat for one (in, out) kernel gradient from the stored eigendecompositions.

    "eigen": (A ⊗ G + λI)⁻¹ vec(∇W); "factored": ((A + λ_A I) ⊗ (G + λ_G I))⁻¹ vec(∇W)
    (see the module docstring for π, λ_A, λ_G).
    """
    dt = layer.a_vecs.dtype
    g = grad.astype(dt)
    rot = layer.a_vecs.T @ g @ layer.g_vecs
    sa, sg = layer.a_vals, layer.g_vals
    if damping_mode == "eigen":
        denom = sa[:, None] * sg[None, :] + damping
    elif damping_mode == "factored":
        mean_a, mean_g = jnp.mean(sa), jnp.mean(sg)
        ok = (mean_a > 0) & (mean_g > 0)
        pi = jnp.where(ok, jnp.sqrt(mean_a / jnp.where(ok, mean_g, 1.0)), 1.0)
        root = jnp.sqrt(damping)
        denom = (sa + pi * root)[:, None] * (sg + root / pi)[None, :]
    else:
        raise ValueError(f"damping_mode must be one of {DAMPING_MODES}, got {damping_mode!r}")
    return (layer.a_vecs @ (rot / denom) @ layer.g_vecs.T).astype(grad.dtype)


def kl_clip_factor(nat: Sequence[jax.Array], grads: Sequence[jax.Array], lr: Any,
                   kl_clip: float) -> jax.Array:
    """ν = min(1, √(κ / (lr² Σ⟨g_nat, g⟩))); 1 when the sum is not positive."""
    vg = sum(jnp.sum(u.astype(jnp.float32) * g.astype(jnp.float32)) for u, g in zip(nat, grads))
    vg = vg * jnp.asarray(lr, jnp.float32) ** 2
    return jnp.where(vg > 0, jnp.minimum(1.0, jnp.sqrt(kl_clip / jnp.where(vg > 0, vg, 1.0))), 1.0)


def _lr_at(learning_rate: Any, count: jax.Array) -> Any:
    return learning_rate(count) if callable(learning_rate) else learning_rate


def _factor_list(updates_paths: Sequence[Path], factors: Any, name: str) -> list:
    out = []
    for keys in updates_paths:
        f = lookup(factors, keys)
        if not isinstance(f, LayerFactors):
            raise ValueError(f"{name}: no statistics (a LayerFactors) for '{'/'.join(keys)}' in the "
                             "factors extra argument")
        out.append(f)
    return out


def resolve_factors(updates: Any, factors: Any, layer_inputs: Any, layer_output_grads: Any, *,
                    diagonal: bool, name: str) -> list:
    """Per-leaf LayerFactors in flatten order of `updates`, from `factors` or the raw layer trees."""
    flat = jax.tree_util.tree_flatten_with_path(updates)[0]
    paths = [keys_of(p) for p, _ in flat]
    if factors is None:
        if layer_inputs is None or layer_output_grads is None:
            raise ValueError(f"{name}.update needs the extra argument `factors=` (or both "
                             "`layer_inputs=` and `layer_output_grads=`)")
        factors = batch_factors(layer_inputs, layer_output_grads, paths, diagonal=diagonal)
    return _factor_list(paths, factors, name)


def scale_by_kfac(stat_decay: float = 0.95, damping: float = 1e-3, *, damping_mode: str = "eigen",
                  T_cov: int = 1, T_inv: int = 10, kl_clip: float = 0.0,
                  learning_rate: Optional[optax.ScalarOrSchedule] = None
                  ) -> optax.GradientTransformationExtraArgs:
    """K-FAC natural gradient of each (in, out) kernel (Martens & Grosse 2015).

    update(grads, state, params=None, *, factors=..., **ignored) returns, per kernel,

        g_nat = (A ⊗ G + λI)⁻¹ vec(∇W)  = U_A [(U_Aᵀ ∇W U_G) ⊘ (s_A s_Gᵀ + λ)] U_Gᵀ   (eigen)
              = (A + λ_A I)⁻¹ ∇W (G + λ_G I)⁻¹                                        (factored)

    scaled by the KL clip ν when `kl_clip > 0` (needs `learning_rate`, the
    schedule the update will be multiplied by). A and G are EMAs of the batch
    factors passed as `factors=` (a nested dict with a `LayerFactors` at each
    kernel path, see `batch_factors`; or pass `layer_inputs=` and
    `layer_output_grads=` to have them computed here), refreshed when
    count % T_cov == 0; the eigendecompositions are recomputed when
    count % T_inv == 0. Every leaf it sees must be a 2-D kernel with statistics:
    use it on the matrix side of an `optax.partition`.
    """
    if damping_mode not in DAMPING_MODES:
        raise ValueError(f"damping_mode must be one of {DAMPING_MODES}, got {damping_mode!r}")
    if T_cov < 1 or T_inv < 1:
        raise ValueError(f"T_cov and T_inv must be >= 1, got {T_cov}, {T_inv}")
    if kl_clip > 0 and learning_rate is None:
        raise ValueError("kl_clip > 0 needs the learning_rate (the KL bound depends on it)")

    def init_fn(params):
        def layer(p):
            if p.ndim != 2:
                raise ValueError(f"scale_by_kfac applies to 2-D kernels, got a leaf of shape {p.shape}")
            dt = jnp.promote_types(p.dtype, jnp.float32)
            n_in, n_out = p.shape
            return KFACLayerState(jnp.zeros((n_in, n_in), dt), jnp.zeros((n_out, n_out), dt),
                                  jnp.eye(n_in, dtype=dt), jnp.zeros((n_in,), dt),
                                  jnp.eye(n_out, dtype=dt), jnp.zeros((n_out,), dt))

        zero = jnp.zeros([], jnp.int32)
        return ScaleByKFACState(zero, zero, jax.tree.map(layer, params))

    def update_fn(updates, state, params=None, *, factors=None, layer_inputs=None,
                  layer_output_grads=None, **extra):
        del params, extra
        leaves, treedef = jax.tree.flatten(updates)
        layers = treedef.flatten_up_to(state.layers)
        fs = resolve_factors(updates, factors, layer_inputs, layer_output_grads, diagonal=False,
                             name="scale_by_kfac")
        refresh = state.count % T_cov == 0
        refreshes = state.refreshes + refresh.astype(jnp.int32)
        eps = ema_decay(stat_decay, refreshes)

        def ema(ls):
            return [l._replace(a=eps * l.a + (1 - eps) * f.a.astype(l.a.dtype),
                               g=eps * l.g + (1 - eps) * f.g.astype(l.g.dtype)) for l, f in zip(ls, fs)]

        def decompose(ls):
            out = []
            for l in ls:
                sa, ua = _eigh(l.a)
                sg, ug = _eigh(l.g)
                out.append(l._replace(a_vecs=ua, a_vals=sa, g_vecs=ug, g_vals=sg))
            return out

        layers = jax.lax.cond(refresh, ema, lambda ls: list(ls), layers)
        layers = jax.lax.cond(state.count % T_inv == 0, decompose, lambda ls: list(ls), layers)
        nat = [precondition(g, l, damping, damping_mode) for g, l in zip(leaves, layers)]
        if kl_clip > 0:
            nu = kl_clip_factor(nat, leaves, _lr_at(learning_rate, state.count), kl_clip)
            nat = [(nu * u).astype(u.dtype) for u in nat]
        new_state = ScaleByKFACState(safe_increment(state.count), refreshes,
                                     treedef.unflatten(layers))
        return treedef.unflatten(nat), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
