"""Dense Gauss-Newton references for tests: explicit Jacobians via jax.jacfwd."""

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from gn.curvature.objective import lm_loss, split_batch


def dense_ggn(apply_fn, params, batch):
    """(G, g, unravel) for the mean next-token cross-entropy of a [B, T+1] batch:
    G = Σ_t J_tᵀ (diag p_t − p_t p_tᵀ) J_t / n built from the explicit Jacobian, g the gradient."""
    flat, unravel = ravel_pytree(params)

    @jax.jit
    def parts(fl):
        x, _ = split_batch(batch)
        f = lambda v: apply_fn(unravel(v), x)  # noqa: E731
        z = f(fl)
        k = z.shape[-1]
        jac = jax.jacfwd(lambda v: f(v).reshape(-1, k))(fl)          # [n, K, P]
        p = jax.nn.softmax(z.reshape(-1, k))
        n = p.shape[0]
        pj = jnp.einsum("tk,tkm->tm", p, jac)
        G = (jnp.einsum("tk,tkm,tkn->mn", p, jac, jac) - pj.T @ pj) / n
        g = jax.grad(lambda v: lm_loss(apply_fn, unravel(v), batch))(fl)
        return G, g

    G, g = parts(flat)
    return G, g, unravel


def block_diagonal(G, labels_flat):
    """Zero the entries of G coupling different blocks (labels per flat coordinate)."""
    same = labels_flat[:, None] == labels_flat[None, :]
    return jnp.where(same, G, 0.0)
