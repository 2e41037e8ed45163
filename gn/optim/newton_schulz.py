"""Newton–Schulz orthogonalisation and the shared helpers of the Muon family.

`orthogonalize` approximates the polar factor U Vᵀ of G = U Σ Vᵀ with the
quintic Newton–Schulz iteration of Muon (Jordan et al. 2024,
https://kellerjordan.github.io/posts/muon/):

    X₀ = G / (‖G‖_F + eps)
    Xₖ₊₁ = a Xₖ + (b A + c A²) Xₖ,   A = Xₖ Xₖᵀ,   (a, b, c) = (3.4445, −4.7750, 2.0315)

Every step maps each singular value s of X through the odd scalar polynomial
p(s) = a s + b s³ + c s⁵ and keeps the singular vectors, so the output is
U p⁵(Σ/‖G‖_F) Vᵀ. For these coefficients p⁵ sends every normalised singular
value in [0.003, 1] into the band [0.68, 1.21] (in [0.01, 1] → [0.68, 1.14]):
the result is U Vᵀ only up to that band, which is what Muon relies on.
(The Gram side A is the smaller one: a tall G is transposed first.)

Two implementations of that one map, chosen by `backend` (the same arithmetic, not the
same rounding: they agree to float32 round-off, ~1e-6 of the entries, not bit for bit):

- "gn" (default): the loop below, eps 1e-7 by default; low-precision inputs iterate in
  float32. Width factor `muon_scale`, computed in float64.
- "optax": `optax.contrib.orthogonalize_via_newton_schulz` (vmapped, `fori_loop`), the
  Newton–Schulz of `optax.contrib.muon` and hence of the paper's inner optimizer (Abreu
  et al. 2025); width factor computed in float32 as `optax.contrib.muon` does.

Kernels here are stored (in, out) — `x @ W` — as in the LLaMA tree of `gn.model`.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax
from optax import contrib
from optax.contrib._muon import orthogonalize_via_newton_schulz as _optax_ns  # what contrib.muon runs

from gn.optim.masks import matrix_mask

DEFAULT_NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_BACKENDS = ("gn", "optax")

# int32 step counter that saturates instead of overflowing (named safe_increment in newer optax).
safe_increment = getattr(optax, "safe_increment", None) or optax.safe_int32_increment


def _orthogonalize_2d(x: jax.Array, coeffs: Sequence[float], steps: int, eps: float) -> jax.Array:
    a, b, c = coeffs
    transposed = x.shape[0] > x.shape[1]
    if transposed:  # make the Gram matrix A = X Xᵀ the small one
        x = x.T
    x = x / (jnp.linalg.norm(x) + eps)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x.T if transposed else x


def orthogonalize(g: jax.Array, *, coeffs: Sequence[float] = DEFAULT_NS_COEFFS, steps: int = 5,
                  eps: float = 1e-7, backend: str = "gn") -> jax.Array:
    """Quintic Newton–Schulz approximation of the polar factor of `g`.

    Args:
      g: a matrix (m, n), or a stack (..., m, n); leading dims are mapped over
        with `jax.vmap`, each matrix normalised by its own Frobenius norm.
      coeffs: (a, b, c) of X ← aX + (bA + cA²)X.
      steps: number of iterations (static).
      eps: added to the Frobenius norm before normalising.
      backend: "gn" or "optax" (module docstring).

    Returns:
      An array of g's shape and dtype, ≈ U Vᵀ with singular values in the band
      of p⁵ (see the module docstring). Low-precision inputs are iterated in
      float32 ("gn"; "optax" iterates in the input's dtype).
    """
    if g.ndim < 2:
        raise ValueError(f"orthogonalize needs an array with ndim >= 2, got shape {g.shape}.")
    if backend not in NS_BACKENDS:
        raise ValueError(f"backend must be one of {NS_BACKENDS}, got {backend!r}.")
    if backend == "optax":
        dims = contrib.MuonDimensionNumbers(reduction_axis=g.ndim - 2, output_axis=g.ndim - 1)
        return _optax_ns(g, ns_coeffs=jnp.asarray(coeffs), ns_steps=steps, eps=eps, dimension_numbers=dims)
    dtype = g.dtype
    x = g.astype(jnp.promote_types(dtype, jnp.float32))
    coeffs = tuple(float(c) for c in coeffs)
    if len(coeffs) != 3:
        raise ValueError(f"coeffs must be (a, b, c), got {coeffs}.")
    fn = lambda m: _orthogonalize_2d(m, coeffs, int(steps), eps)
    if x.ndim == 2:
        out = fn(x)
    else:
        lead = x.shape[:-2]
        out = jax.vmap(fn)(x.reshape((-1,) + x.shape[-2:])).reshape(lead + x.shape[-2:])
    return out.astype(dtype)


def muon_scale(shape: Sequence[int]) -> float:
    """Muon's width factor √max(1, out/in) for a kernel of shape (..., in, out)."""
    fan_in, fan_out = shape[-2], shape[-1]
    return math.sqrt(max(1.0, fan_out / fan_in))


def scale_width(u: jax.Array, backend: str = "gn") -> jax.Array:
    """√max(1, out/in) · u for a kernel (or stack) u of shape (..., in, out): the factor in
    float64 (`muon_scale`, "gn") or, as `optax.contrib.muon` computes it, in float32 ("optax")."""
    if backend == "optax":
        return jnp.sqrt(jnp.maximum(1, u.shape[-1] / u.shape[-2])) * u
    return muon_scale(u.shape) * u


def default_matrix_mask(params: Any) -> Any:
    """Pytree of bools: True for the 2-D leaves that the Muon family orthogonalises
    (`gn.optim.masks.matrix_mask`: hidden 2-D weights, not 'embed*' or 'lm_head*';
    those go to the AdamW side, as in optax.contrib.muon and the GN paper)."""
    return matrix_mask(params)
