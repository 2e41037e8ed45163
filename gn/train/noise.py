"""Gradient noise scale B_simple = tr(Σ) / |G|² (McCandlish et al. 2018, App. A).

For a mini-batch gradient G_B of B examples, E|G_B|² = |G|² + tr(Σ)/B. With the
squared norms at two batch sizes, B_small < B_big, the unbiased estimates are

    |G|²  ≈ (B_big |G_big|² − B_small |G_small|²) / (B_big − B_small)
    tr Σ  ≈ (|G_small|² − |G_big|²) / (1/B_small − 1/B_big)

Each is noisy (|G|² can be negative on one step), so the two are smoothed
separately (an EMA over measurements) and B_simple is the ratio of the smoothed
values. The trainer measures every `train.noise_scale_every` steps from the
step's own training batches: the micro-batches of gradient accumulation, GN's
inner batches, or the two halves of a single batch.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gn.curvature.objective import lm_loss


class NoiseEstimate(NamedTuple):
    g2: float          # |G|² estimate
    trace: float       # tr(Σ) estimate (per example)


def estimate(small_sq: float, big_sq: float, b_small: float, b_big: float) -> NoiseEstimate:
    """Unbiased |G|² and tr(Σ) from E|G_B|² at two batch sizes (see the module docstring)."""
    if not b_big > b_small > 0:
        raise ValueError(f"need 0 < b_small < b_big, got {b_small}, {b_big}")
    g2 = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    trace = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
    return NoiseEstimate(float(g2), float(trace))


class NoiseScaleTracker:
    """Smooths |G|² and tr(Σ) separately (EMA with bias correction) and reports B_simple."""

    def __init__(self, decay: float = 0.9):
        self.decay = decay
        self.g2 = self.trace = 0.0
        self.count = 0

    def update(self, est: NoiseEstimate) -> dict:
        self.count += 1
        d = self.decay
        self.g2 = d * self.g2 + (1 - d) * est.g2
        self.trace = d * self.trace + (1 - d) * est.trace
        corr = 1.0 - d ** self.count
        g2, trace = self.g2 / corr, self.trace / corr
        return {"noise_g2": est.g2, "noise_trace": est.trace,
                "noise_scale": trace / g2 if g2 > 0 else float("nan")}

    def state_dict(self) -> dict:
        return {"g2": self.g2, "trace": self.trace, "count": self.count}

    def load_state_dict(self, d: dict) -> None:
        self.g2, self.trace, self.count = d["g2"], d["trace"], d["count"]


def chunked(batches: jnp.ndarray) -> jnp.ndarray:
    """[k, b, T+1] micro-batches as they are (k ≥ 2), or one batch split into two halves."""
    if batches.shape[0] >= 2:
        return batches
    b = batches.shape[1]
    if b < 2 or b % 2:
        raise ValueError(f"the noise scale needs two micro-batches or an even batch, got {b} sequences")
    return batches.reshape((2, b // 2) + batches.shape[2:])


def make_measure(apply_fn: Any):
    """jit(params, chunks [k, b, T+1]) -> (mean_i |g_i|², |mean_i g_i|²) over the k chunk gradients."""
    grad = jax.grad(lambda p, b: lm_loss(apply_fn, p, b))

    @jax.jit
    def measure(params, chunks):
        def body(acc, batch):
            g = grad(params, batch)
            sq = sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(g))
            return (jax.tree.map(jnp.add, acc[0], g), acc[1] + sq), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        (total, sq), _ = jax.lax.scan(body, (zeros, jnp.zeros(())), chunks)
        k = chunks.shape[0]
        mean_sq = sum(jnp.sum(jnp.square(x / k)) for x in jax.tree.leaves(total))
        return sq / k, mean_sq

    return measure
