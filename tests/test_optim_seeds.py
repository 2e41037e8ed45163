"""Tests for Newton–Schulz, SOAP and the Muon family (NorMuon, RMSuon, AdaRMSuon)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gn.optim.muon_family import adarmsuon, normuon, rmsuon, scale_by_rmsuon
from gn.optim.newton_schulz import DEFAULT_NS_COEFFS, default_matrix_mask, muon_scale, orthogonalize
from gn.optim._soap import scale_by_soap, soap

A, B, C = DEFAULT_NS_COEFFS


def _quintic5(s):
    for _ in range(5):
        s = A * s + B * s**3 + C * s**5
    return s


def _np_ns(g):
    """Reference quintic Newton–Schulz in float64 numpy."""
    x = np.asarray(g, np.float64)
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / (np.linalg.norm(x) + 1e-7)
    for _ in range(5):
        gram = x @ x.T
        x = A * x + (B * gram + C * gram @ gram) @ x
    return x.T if tall else x


def _randn(seed, shape, scale=1.0):
    # numpy RNG: no per-shape XLA compilations in the tests.
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


# --------------------------------------------------------------------------- Newton–Schulz


@pytest.mark.parametrize("shape", [(32, 64), (64, 32), (3, 16, 24)])
def test_orthogonalize_band_and_singular_vectors(shape):
    g = _randn(0, shape)
    out = np.asarray(jax.jit(orthogonalize)(g), np.float64)
    g64 = np.asarray(g, np.float64).reshape((-1,) + shape[-2:])
    out = out.reshape(g64.shape)
    for gi, oi in zip(g64, out):
        u, s, vt = np.linalg.svd(gi, full_matrices=False)
        s_norm = s / (np.linalg.norm(gi) + 1e-7)
        # Band of the scalar iteration p⁵ over [s_lo, 1], s_lo = smallest normalised singular value.
        grid = np.linspace(s_norm.min(), 1.0, 200_001)
        f = _quintic5(grid)
        lo, hi = f.min(), f.max()
        assert 0.6 < lo and hi < 1.25  # the known band of these coefficients, ≈ [0.68, 1.2]
        sv_out = np.linalg.svd(oi, compute_uv=False)
        assert sv_out.min() >= lo - 1e-3 and sv_out.max() <= hi + 1e-3
        # Same singular vectors: Uᵀ O V = diag(p⁵(s)), i.e. O = U p⁵(Σ) Vᵀ.
        core = u.T @ oi @ vt.T
        np.testing.assert_allclose(np.diag(core), _quintic5(s_norm), atol=2e-4)
        np.testing.assert_allclose(core - np.diag(np.diag(core)), 0.0, atol=2e-4)
        # ... hence O is the polar factor U Vᵀ up to the band.
        assert np.linalg.norm(oi - u @ vt, 2) <= max(1 - lo, hi - 1) + 1e-3


def test_orthogonalize_dtype_and_zero():
    g = _randn(1, (8, 12)).astype(jnp.bfloat16)
    ortho = jax.jit(orthogonalize)
    assert ortho(g).dtype == jnp.bfloat16
    assert np.all(np.asarray(ortho(jnp.zeros((4, 6)))) == 0)


def test_muon_scale_and_matrix_mask():
    assert muon_scale((64, 256)) == 2.0 and muon_scale((256, 64)) == 1.0
    params = {
        "embed": {"embedding": jnp.zeros((50, 8))},
        "block_0": {"attn_norm": {"scale": jnp.zeros(8)},
                    "attn": {"wq": {"kernel": jnp.zeros((8, 8))}},
                    "mlp": {"w_up": {"kernel": jnp.zeros((8, 16))}}},
        "final_norm": {"scale": jnp.zeros(8)},
        "lm_head": {"kernel": jnp.zeros((8, 50))},
    }
    mask = default_matrix_mask(params)
    assert mask == {"embed": {"embedding": False},
                    "block_0": {"attn_norm": {"scale": False}, "attn": {"wq": {"kernel": True}},
                                "mlp": {"w_up": {"kernel": True}}},
                    "final_norm": {"scale": False}, "lm_head": {"kernel": False}}


# --------------------------------------------------------------------------- SOAP


def _tree_params():
    return {"w": _randn(1, (5, 7)), "b": _randn(2, (7,)), "embed": {"embedding": _randn(3, (6, 4))}}


def _grads(step, params):
    return jax.tree.map(lambda p: _randn(100 + step, p.shape, 1.0 + step), params)


def test_soap_without_rotation_is_adam():
    params = _tree_params()
    tx_soap = soap(1e-2, b1=0.9, b2=0.99, eps=1e-8, max_precond_dim=0)
    tx_adam = optax.adam(1e-2, b1=0.9, b2=0.99, eps=1e-8)
    s_soap, s_adam = tx_soap.init(params), tx_adam.init(params)
    up_soap, up_adam = jax.jit(tx_soap.update), jax.jit(tx_adam.update)
    for t in range(4):
        g = _grads(t, params)
        u_soap, s_soap = up_soap(g, s_soap, params)
        u_adam, s_adam = up_adam(g, s_adam, params)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=0), u_soap, u_adam)
        params = optax.apply_updates(params, u_soap)


def _assert_eigenbasis(q, mat):
    q, mat = np.asarray(q, np.float64), np.asarray(mat, np.float64)
    np.testing.assert_allclose(q.T @ q, np.eye(len(q)), atol=1e-5)
    d = q.T @ mat @ q
    scale = np.abs(mat).max()
    np.testing.assert_allclose(d - np.diag(np.diag(d)), 0.0, atol=1e-5 * scale)
    np.testing.assert_allclose(np.diag(d), np.sort(np.linalg.eigvalsh(mat))[::-1], atol=1e-5 * scale)


def test_soap_eigenbasis_schedule_and_rotated_adam_step():
    b1, b2, bs, eps, f = 0.9, 0.95, 0.8, 1e-8, 2
    params = {"w": _randn(0, (4, 6)), "b": _randn(1, (6,))}
    tx = scale_by_soap(b1, b2, eps, shampoo_beta=bs, precondition_frequency=f)
    state = tx.init(params)
    gs = [_grads(t, params) for t in range(3)]

    # Update 1: only initialises the basis (zero update) for 'w'; 'b' is plain Adam.
    u, state = jax.jit(tx.update)(gs[0], state)
    g1 = np.asarray(gs[0]["w"], np.float64)
    L1, R1 = (1 - bs) * g1 @ g1.T, (1 - bs) * g1.T @ g1
    assert np.all(np.asarray(u["w"]) == 0) and np.all(np.asarray(state.mu["w"]) == 0)
    assert np.abs(np.asarray(u["b"])).min() > 0
    _assert_eigenbasis(state.q_l["w"], L1)
    np.testing.assert_allclose(state.gg_l["w"], L1, rtol=1e-5)
    np.testing.assert_allclose(state.gg_r["w"], R1, rtol=1e-5, atol=1e-6)
    ql1, qr1 = np.asarray(state.q_l["w"], np.float64), np.asarray(state.q_r["w"], np.float64)

    # Update 2 = first Adam step (k = 1) in the basis of update 1; no refresh (1 % 2 != 0).
    u, state = jax.jit(tx.update)(gs[1], state)
    g2 = np.asarray(gs[1]["w"], np.float64)
    m = (1 - b1) * g2
    v = (1 - b2) * (ql1.T @ g2 @ qr1) ** 2
    n_rot = (ql1.T @ m @ qr1 / (1 - b1)) / (np.sqrt(v / (1 - b2)) + eps)
    np.testing.assert_allclose(u["w"], ql1 @ n_rot @ qr1.T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(state.q_l["w"], ql1, atol=0)
    L2, R2 = bs * L1 + (1 - bs) * g2 @ g2.T, bs * R1 + (1 - bs) * g2.T @ g2

    # Update 3: k = 2, refresh from the accumulated L, R (which include g3).
    _, state = jax.jit(tx.update)(gs[2], state)
    g3 = np.asarray(gs[2]["w"], np.float64)
    L3, R3 = bs * L2 + (1 - bs) * g3 @ g3.T, bs * R2 + (1 - bs) * g3.T @ g3
    _assert_eigenbasis(state.q_l["w"], L3)
    _assert_eigenbasis(state.q_r["w"], R3)


def test_soap_state_is_static_and_big_dims_unrotated():
    params = {"w": _randn(0, (4, 6)), "b": _randn(1, (6,))}
    tx = scale_by_soap(max_precond_dim=5, precondition_frequency=1, eigenbasis_update="qr")
    state = tx.init(params)
    assert state.q_r["w"] is None and state.q_l["w"].shape == (4, 4) and state.q_l["b"] is None
    spec = jax.tree.map(lambda x: (x.shape, x.dtype), state)
    update = jax.jit(tx.update)
    for t in range(4):
        _, state = update(_grads(t, params), state)
        assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == spec
    q = np.asarray(state.q_l["w"], np.float64)
    np.testing.assert_allclose(q.T @ q, np.eye(4), atol=1e-5)


# --------------------------------------------------------------------------- NorMuon


@pytest.mark.parametrize("rms_target", [None, 0.2])
def test_normuon_matches_hand_reference(rms_target):
    lr, beta, b2, eps = 0.1, 0.95, 0.95, 1e-8
    w = _randn(0, (6, 10))
    gs = [_randn(1, (6, 10)), _randn(2, (6, 10))]
    tx = normuon(lr, beta=beta, b2=b2, eps=eps, rms_target=rms_target)
    params, state = {"w": w}, tx.init({"w": w})
    update = jax.jit(tx.update)
    m, v = np.zeros((6, 10)), np.zeros((1, 10))
    for g in gs:
        u, state = update({"w": g}, state, params)
        g = np.asarray(g, np.float64)
        m = beta * m + (1 - beta) * g
        o = _np_ns(beta * m + (1 - beta) * g)
        v = b2 * v + (1 - b2) * (o**2).mean(axis=0, keepdims=True)  # mean over the input dim
        o_hat = o / (np.sqrt(v) + eps)
        if rms_target is None:
            expected = np.sqrt(10 / 6) * np.linalg.norm(o) / np.linalg.norm(o_hat) * o_hat
        else:
            expected = rms_target * np.sqrt(60) / np.linalg.norm(o_hat) * o_hat
        np.testing.assert_allclose(u["w"], -lr * expected, rtol=2e-4, atol=1e-6)
        if rms_target is not None:
            np.testing.assert_allclose(np.sqrt(np.mean(np.asarray(u["w"]) ** 2)), lr * rms_target, rtol=1e-5)
        params = optax.apply_updates(params, u)


# --------------------------------------------------------------------------- RMSuon / AdaRMSuon


@pytest.mark.parametrize("alias,whiten", [(rmsuon, False), (adarmsuon, True)])
def test_rmsuon_matches_hand_reference(alias, whiten):
    lr, b1, b2, eps = 0.05, 0.9, 0.999, 1e-8
    w = _randn(0, (8, 5))
    gs = [_randn(1, (8, 5)), _randn(2, (8, 5), 3.0)]
    tx = alias(lr, b1=b1, b2=b2, eps=eps)
    params, state = {"w": w}, tx.init({"w": w})
    update = jax.jit(tx.update)
    m, v = np.zeros((8, 5)), np.zeros((8, 5))
    for t, g in enumerate(gs, start=1):
        u, state = update({"w": g}, state, params)
        g = np.asarray(g, np.float64)
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g**2
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        adam = m_hat / (np.sqrt(v_hat) + eps)
        energy = np.linalg.norm(adam)
        o = _np_ns(adam if whiten else m_hat)
        np.testing.assert_allclose(u["w"], -lr * energy / np.linalg.norm(o) * o, rtol=2e-4, atol=1e-6)
        # ‖update‖_F = lr·E, E from the optimizer's own (float32) moments.
        inner = state.inner_states["matrix"].inner_state[0]
        m32, v32 = (np.asarray(x["w"], np.float64) for x in (inner.mu, inner.nu))
        bc1, bc2 = (float(np.float32(1) - np.float32(b) ** np.float32(t)) for b in (b1, b2))  # f32, as optax
        e32 = np.linalg.norm(m32 / bc1 / (np.sqrt(v32 / bc2) + eps))
        np.testing.assert_allclose(np.linalg.norm(np.asarray(u["w"], np.float64)), lr * e32, rtol=3e-6)
        params = optax.apply_updates(params, u)


def test_v_rmsuon_penalty():
    lam = 0.3
    g = {"w": _randn(1, (4, 6))}
    plain, pen = scale_by_rmsuon(), scale_by_rmsuon(v_penalty=lam)
    u0, _ = jax.jit(plain.update)(g, plain.init(g))
    u1, s1 = jax.jit(pen.update)(g, pen.init(g))
    v_hat = np.asarray(s1.nu["w"]) / (1 - 0.999)
    np.testing.assert_allclose(np.asarray(u1["w"]) - np.asarray(u0["w"]), lam * np.sqrt(v_hat), rtol=1e-5, atol=1e-7)


def test_weight_decay_masks_and_zero_gradient():
    params = {"block_0": {"w": _randn(0, (4, 6)), "b": _randn(1, (6,))}, "embed": {"embedding": _randn(2, (5, 6))}}
    zeros = jax.tree.map(jnp.zeros_like, params)
    lr, wd = 0.1, 0.5
    masks = (None, lambda p: jax.tree.map(lambda x: x.ndim == 2, p),
             {"block_0": {"w": False, "b": True}, "embed": {"embedding": True}})
    cases = [(normuon, masks[0]), (rmsuon, masks[1]), (adarmsuon, masks[2])]
    for make, mask in cases:
        tx = make(lr, weight_decay=wd, weight_decay_mask=mask)
        u, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
        decayed = not isinstance(mask, dict)
        expected_w = -lr * wd * np.asarray(params["block_0"]["w"]) if decayed else 0.0
        np.testing.assert_allclose(u["block_0"]["w"], expected_w, rtol=1e-6)
        assert np.all(np.asarray(u["block_0"]["b"]) == 0)  # AdamW side: zero grad, no adam decay
        assert np.all(np.asarray(u["embed"]["embedding"]) == 0)


# --------------------------------------------------------------------------- conformance


ALIASES = {
    "soap": lambda: soap(optax.linear_schedule(0.05, 0.01, 5), precondition_frequency=2),
    "normuon": lambda: normuon(0.05, weight_decay=0.01),
    "rmsuon": lambda: rmsuon(0.05, adam_learning_rate=0.05),
    "adarmsuon": lambda: adarmsuon(optax.constant_schedule(0.05), v_penalty=1e-3),
}


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_alias_conformance(name):
    tx = ALIASES[name]()
    params = {"block_0": {"w": _randn(0, (8, 6)), "b": _randn(1, (6,))},
              "embed": {"embedding": _randn(2, (10, 6))}}
    target = jax.tree.map(lambda p: 0.1 * jnp.ones_like(p), params)

    def loss_fn(p):
        return sum(0.5 * jnp.sum((x - y) ** 2) for x, y in zip(jax.tree.leaves(p), jax.tree.leaves(target)))

    traces = []

    @jax.jit
    def step(p, s):
        traces.append(1)
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    state = tx.init(params)
    spec = lambda s: (jax.tree.structure(s), [(x.shape, x.dtype) for x in jax.tree.leaves(s)])
    spec0 = spec(state)
    losses = []
    for _ in range(5):
        params, state, loss = step(params, state)
        losses.append(float(loss))
        assert spec(state) == spec0
    assert len(traces) == 1
    assert losses[-1] < losses[0] and np.isfinite(losses).all()
