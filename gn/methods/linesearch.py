"""Backtracking grid line search along a Gauss-Newton direction.

Abreu et al. (2025) move along Δ = θ̂ − θ_t with the step α* that minimises the
true loss over the grid α ∈ {2^(−i/2) : i < grid}. `up = k > 0` adds the k
steps above 1, α ∈ {2^(i/2) : 1 ≤ i ≤ k}, for directions that are too short (a
heavily damped or under-solved CG step); the default grid is unchanged. All α
of a chunk are evaluated in one vectorised call (vmap over α). Non-finite losses
are rejected. When α* lands on the smallest α of the grid and `extend > 0`,
further chunks of `grid` smaller steps are evaluated while the loss keeps improving.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp


class LineSearchResult(NamedTuple):
    alpha: jnp.ndarray          # chosen step (0 if every candidate was non-finite)
    loss: jnp.ndarray           # line-search loss at alpha
    loss0: jnp.ndarray          # line-search loss at α = 0 (θ_t)
    at_edge: jnp.ndarray        # True when alpha is the smallest step evaluated
    num_evals: jnp.ndarray      # number of α evaluated (forward passes per line-search batch)
    loss_at_one: jnp.ndarray    # line-search loss at α = 1, the full step (inf if non-finite)
    at_top: jnp.ndarray         # True when alpha is the largest step of the grid


def grid_alphas(start: int, count: int) -> jnp.ndarray:
    """2^(−i/2) for i in [start, start + count) (a negative start gives steps above 1)."""
    return 2.0 ** (-jnp.arange(start, start + count, dtype=jnp.float32) / 2.0)


def line_search(loss_fn: Callable[[Any, Any], jnp.ndarray], params: Any, delta: Any, batches: Any, *,
                grid: int = 5, extend: int = 0, vectorize: bool = True, up: int = 0) -> LineSearchResult:
    """argmin over the α grid of mean_b loss_fn(params + α·delta, batches[b]).

    The first chunk is α ∈ {2^(−i/2) : −up ≤ i < grid} (α = 1 and `up` steps
    above it first); extension chunks continue downward `grid` at a time.
    `batches` is stacked along axis 0; `vectorize=False` evaluates the α one by
    one (lax.map) to bound memory, with the same numbers.
    """

    def mean_loss(p):
        return jax.lax.map(lambda b: loss_fn(p, b), batches).mean()

    def at(alpha):
        return mean_loss(jax.tree.map(lambda p, d: p + alpha.astype(p.dtype) * d, params, delta))

    def evaluate(alphas):
        losses = jax.vmap(at)(alphas) if vectorize else jax.lax.map(at, alphas)
        return jnp.where(jnp.isfinite(losses), losses, jnp.inf)

    def chunk(start):
        alphas = grid_alphas(0, grid) * (2.0 ** (-start.astype(jnp.float32) / 2.0))
        losses = evaluate(alphas)
        k = jnp.argmin(losses)
        return alphas[k], losses[k], k == grid - 1

    loss0 = mean_loss(params)
    first = grid_alphas(-up, grid + up)           # 2^(up/2), ..., 1, ..., 2^(−(grid−1)/2)
    first_losses = evaluate(first)
    k0 = jnp.argmin(first_losses)
    alpha, loss, edge = first[k0], first_losses[k0], k0 == grid + up - 1

    def cond(c):
        _, _, edge, n, improved = c
        return edge & improved & (n < extend)

    def body(c):
        alpha, loss, _, n, _ = c
        a2, l2, e2 = chunk((n + 1) * grid)
        better = l2 < loss
        return (jnp.where(better, a2, alpha), jnp.where(better, l2, loss), better & e2, n + 1, better)

    alpha, loss, edge, n, _ = jax.lax.while_loop(cond, body, (alpha, loss, edge, jnp.asarray(0), jnp.asarray(True)))
    ok = jnp.isfinite(loss)
    return LineSearchResult(alpha=jnp.where(ok, alpha, 0.0), loss=jnp.where(ok, loss, loss0), loss0=loss0,
                            at_edge=edge, num_evals=(n + 1) * grid + up + 1, loss_at_one=first_losses[up],
                            at_top=ok & (alpha == first[0]))
