"""SOAP: Shampoo with Adam in the preconditioner's eigenbasis.

Vyas, Morwani, Zhao, Kwun, Shapira, Brandfonbrener, Janson, Kakade,
"SOAP: Improving and Stabilizing Shampoo using Adam", arXiv 2409.11321 (2024),
Algorithm 3, and the authors' reference implementation (its first-step
convention below).

For a 2-D leaf G (m, n), with t the number of updates seen so far and
k = t − 1 the number of Adam steps taken (the first update only initialises the
eigenbasis, see below):

    G'  = Q_Lᵀ G Q_R                                    (rotate into the eigenbasis)
    M   ← β1 M + (1 − β1) G                             (first moment, ORIGINAL space)
    V   ← β2 V + (1 − β2) G'²                           (second moment, rotated space)
    M'  = Q_Lᵀ M Q_R
    N'  = (M' / (1 − β1ᵏ)) / (√(V / (1 − β2ᵏ)) + ε)     (Adam, optax's bias correction)
    u   = Q_L N' Q_Rᵀ                                    (rotate back)
    L   ← β_s L + (1 − β_s) G Gᵀ,   R ← β_s R + (1 − β_s) Gᵀ G
    every `precondition_frequency` Adam steps (k % f == 0):
        Q_L, Q_R ← eigenvectors of L, R

Choices where the paper leaves room:

- First update of a preconditioned leaf: as in the reference code, it only
  accumulates L, R and sets Q_L, Q_R by `eigh`; it emits a zero update and
  leaves M, V untouched, so the gradient is never projected onto a basis built
  from itself. Adam's step count k for that leaf is therefore t − 1. Leaves
  with no eigenbasis on either side (1-D leaves, leaves with ndim > 2, leaves
  with both dims > max_precond_dim) run plain Adam from the first update with
  k = t. With max_precond_dim=0 SOAP is exactly `optax.adam`.
- M is kept in the original space and rotated each step (the reference stores
  it rotated and re-rotates it when the basis changes: the same numbers).
  V is not rotated when the basis changes (as in the reference).
- Refresh: `eigenbasis_update='eigh'` (default) recomputes the basis with
  `jnp.linalg.eigh` every refresh; 'qr' is the paper's cheaper refresh, one
  power-iteration step Q ← qr(L Q) after sorting the columns of Q by their
  estimated eigenvalues diag(Qᵀ L Q) (and permuting V's rows/columns alike).
  The first basis is always `eigh`. Columns are kept in descending eigenvalue
  order in both modes.
- A side whose dimension exceeds `max_precond_dim` (e.g. a big vocabulary) is
  left unrotated (identity); L, R and Q are stored only for rotated sides
  (`None` placeholders otherwise, so the state tree has a fixed structure).
- Bias correction is Adam's m̂ / (√v̂ + ε) (the reference folds √(1−β2ᵏ) into
  the step size, which moves ε by that factor).
- The eigendecomposition runs in float32 (`lax.cond` skips it on other steps).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from gn.optim.newton_schulz import default_matrix_mask, safe_increment

_METHODS = ("eigh", "qr")


class ScaleBySoapState(NamedTuple):
    """State of `scale_by_soap`. Per-leaf entries are None where unused."""

    count: jax.Array  # int32 scalar: number of updates seen
    mu: optax.Updates  # first moment, original space
    nu: optax.Updates  # second moment, in the eigenbasis
    gg_l: optax.Updates  # L = EMA of G Gᵀ (m, m), or None
    gg_r: optax.Updates  # R = EMA of Gᵀ G (n, n), or None
    q_l: optax.Updates  # eigenbasis of L, or None
    q_r: optax.Updates  # eigenbasis of R, or None


def _sides(shape: tuple[int, ...], max_precond_dim: int) -> tuple[bool, bool]:
    if len(shape) != 2:
        return False, False
    return shape[0] <= max_precond_dim, shape[1] <= max_precond_dim


def _eigh_basis(mat: jax.Array) -> jax.Array:
    """Eigenvectors of a symmetric PSD matrix, columns by descending eigenvalue."""
    _, vecs = jnp.linalg.eigh(mat.astype(jnp.float32))
    return vecs[:, ::-1]


def _rotate(x, q_l, q_r):
    if q_l is not None:
        x = q_l.T @ x
    if q_r is not None:
        x = x @ q_r
    return x


def _unrotate(x, q_l, q_r):
    if q_l is not None:
        x = q_l @ x
    if q_r is not None:
        x = x @ q_r.T
    return x


def _soap_init(params, max_precond_dim: int) -> "ScaleBySoapState":
    """Zero moments and statistics, identity eigenbases, on the sides a leaf preconditions."""
    leaves, treedef = jax.tree.flatten(params)
    mu, nu, gl, gr, ql, qr = [], [], [], [], [], []
    for p in leaves:
        use_l, use_r = _sides(p.shape, max_precond_dim)
        mu.append(jnp.zeros_like(p))
        nu.append(jnp.zeros_like(p))
        gl.append(jnp.zeros((p.shape[0],) * 2, jnp.float32) if use_l else None)
        gr.append(jnp.zeros((p.shape[1],) * 2, jnp.float32) if use_r else None)
        ql.append(jnp.eye(p.shape[0], dtype=jnp.float32) if use_l else None)
        qr.append(jnp.eye(p.shape[1], dtype=jnp.float32) if use_r else None)
    unflat = treedef.unflatten
    return ScaleBySoapState(jnp.zeros([], jnp.int32), unflat(mu), unflat(nu), unflat(gl),
                            unflat(gr), unflat(ql), unflat(qr))


def _eigh_refresh(operand):
    """New eigenbases of L and R by eigh (the sides a leaf has; None elsewhere); v unchanged."""
    gl_, gr_, ql_, qr_, v_ = operand
    return (_eigh_basis(gl_) if gl_ is not None else None, _eigh_basis(gr_) if gr_ is not None else None, v_)


def _qr_refresh(operand):
    """One power-iteration step per side (the authors' QR update): sort the current basis by its
    estimated eigenvalues (v permuted alike), then Q ← qr(G Q)."""
    gl_, gr_, ql_, qr_, v_ = operand
    outs = []
    for axis, (gg, q) in enumerate(((gl_, ql_), (gr_, qr_))):
        if gg is None:
            outs.append(None)
            continue
        est = jnp.diag(q.T @ gg @ q)
        order = jnp.argsort(-est)
        q = q[:, order]
        v_ = jnp.take(v_, order, axis=axis)
        outs.append(jnp.linalg.qr(gg @ q)[0])
    return outs[0], outs[1], v_


def scale_by_soap(
    b1: float = 0.95,
    b2: float = 0.95,
    eps: float = 1e-8,
    *,
    shampoo_beta: Optional[float] = None,
    precondition_frequency: int = 10,
    max_precond_dim: int = 10000,
    eigenbasis_update: str = "eigh",
) -> optax.GradientTransformation:
    """Rescale updates by Adam run in the eigenbasis of Shampoo's L and R (SOAP).

    See the module docstring for the update equations and conventions.

    Args:
      b1: Adam's first-moment decay.
      b2: Adam's second-moment decay.
      eps: added to √v̂.
      shampoo_beta: decay of the L, R statistics; None means b2.
      precondition_frequency: refresh the eigenbasis every this many Adam steps.
      max_precond_dim: sides longer than this stay unrotated.
      eigenbasis_update: 'eigh' (exact) or 'qr' (one power-iteration step).

    Returns:
      An `optax.GradientTransformation`.
    """
    if eigenbasis_update not in _METHODS:
        raise ValueError(f"eigenbasis_update must be one of {_METHODS}, got {eigenbasis_update!r}.")
    if precondition_frequency < 1:
        raise ValueError(f"precondition_frequency must be >= 1, got {precondition_frequency}.")
    beta_s = b2 if shampoo_beta is None else shampoo_beta

    def init_fn(params):
        return _soap_init(params, max_precond_dim)

    def adam_direction(m, v, k):
        kf = k.astype(jnp.float32)
        m_hat = m / (1 - b1 ** kf).astype(m.dtype)
        v_hat = v / (1 - b2 ** kf).astype(v.dtype)
        return m_hat / (jnp.sqrt(v_hat) + eps)

    def leaf_update(g, m, v, gl, gr, ql, qr, count):
        use_l, use_r = gl is not None, gr is not None
        if not (use_l or use_r):  # plain Adam, k = count
            m = optax.tree.update_moment(g, m, b1, 1)
            v = optax.tree.update_moment_per_elem_norm(g, v, b2, 2)
            m_hat = optax.tree.bias_correction(m, b1, count)
            v_hat = optax.tree.bias_correction(v, b2, count)
            return m_hat / (jnp.sqrt(v_hat) + eps), m, v, gl, gr, ql, qr

        first = count == 1
        k = count - 1  # Adam steps including this one
        g32 = g.astype(jnp.float32)
        # Adam in the current eigenbasis (skipped on the first update).
        m_new = optax.tree.update_moment(g, m, b1, 1)
        g_rot = _rotate(g32, ql, qr).astype(v.dtype)
        v_new = optax.tree.update_moment_per_elem_norm(g_rot, v, b2, 2)
        m_rot = _rotate(m_new.astype(jnp.float32), ql, qr).astype(m.dtype)
        n_rot = adam_direction(m_rot, v_new, jnp.maximum(k, 1))
        u = _unrotate(n_rot.astype(jnp.float32), ql, qr).astype(g.dtype)
        u = jnp.where(first, jnp.zeros_like(u), u)
        m = jnp.where(first, m, m_new)
        v = jnp.where(first, v, v_new)
        # Shampoo statistics, then the eigenbasis refresh.
        if use_l:
            gl = beta_s * gl + (1 - beta_s) * (g32 @ g32.T)
        if use_r:
            gr = beta_s * gr + (1 - beta_s) * (g32.T @ g32)
        refresh = first | (k % precondition_frequency == 0)

        def refresh_fn(operand):
            if eigenbasis_update == "eigh":
                return _eigh_refresh(operand)
            return jax.lax.cond(first, _eigh_refresh, _qr_refresh, operand)

        keep = lambda operand: (operand[2], operand[3], operand[4])
        ql, qr, v = jax.lax.cond(refresh, refresh_fn, keep, (gl, gr, ql, qr, v))
        return u, m, v, gl, gr, ql, qr

    def update_fn(updates, state, params=None):
        del params
        count = safe_increment(state.count)
        leaves, treedef = jax.tree.flatten(updates)
        per = [treedef.flatten_up_to(t) for t in
               (state.mu, state.nu, state.gg_l, state.gg_r, state.q_l, state.q_r)]
        outs = [leaf_update(g, *args, count) for g, *args in zip(leaves, *per)]
        cols = list(zip(*outs)) if outs else [()] * 7
        unflat = lambda xs: treedef.unflatten(list(xs))
        new_updates = unflat(cols[0])
        return new_updates, ScaleBySoapState(count, *(unflat(c) for c in cols[1:]))

    return optax.GradientTransformation(init_fn, update_fn)


def soap(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.95,
    b2: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    shampoo_beta: Optional[float] = None,
    precondition_frequency: int = 10,
    max_precond_dim: int = 10000,
    eigenbasis_update: str = "eigh",
    weight_decay_mask: Optional[Union[Any, Callable[[optax.Params], Any]]] = None,
) -> optax.GradientTransformation:
    """SOAP (Vyas et al. 2024, arXiv 2409.11321) with decoupled weight decay.

        chain(scale_by_soap(...), add_decayed_weights(weight_decay, mask),
              scale_by_learning_rate(learning_rate))

    i.e. θ ← θ − lr·(u + wd·θ) with u the SOAP direction of `scale_by_soap`.
    Every leaf goes through SOAP: 2-D leaves are rotated on each side no longer
    than `max_precond_dim` (embedding and head included), the others get plain
    Adam with the same b1, b2, eps (there is no separate AdamW side).
    `weight_decay_mask` (pytree of bools or callable on params) defaults to
    `default_matrix_mask` — hidden 2-D kernels only. Weight decay also acts on
    the first update, whose SOAP direction is zero for rotated leaves (the
    reference code skips decay there too; the difference is one lr·wd·θ).
    """
    mask = default_matrix_mask if weight_decay_mask is None else weight_decay_mask
    return optax.chain(
        scale_by_soap(b1, b2, eps, shampoo_beta=shampoo_beta,
                      precondition_frequency=precondition_frequency,
                      max_precond_dim=max_precond_dim, eigenbasis_update=eigenbasis_update),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
