"""K-FAC statistics, FOG / DiagFog / PI-Muon against their defining equations, and training runs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gn.model import init_params, make_apply, model_config
from gn.curvature.layer_stats import apply_with_layer_stats, layer_perturbations
from gn.model.llama import rms_norm
from gn.methods import registry
from gn.methods.base import MethodContext
from gn.optim.transforms import tree_norm
from gn.optim import _fog as F
from gn.optim import _kfac as K
from gn.methods.stats import loss_grads_and_stats
from gn.curvature.objective import mean_entropy
from gn.optim.newton_schulz import default_matrix_mask, muon_scale, orthogonalize
from gn.curvature.objective import lm_loss, split_batch

CFG = model_config("nano", vocab_size=32, hidden=16, layers=1, heads=2, ffn=32, max_seq_len=16)
APPLY = make_apply(CFG)


def _registered():
    assert "fog" in registry.names()


def _batch(seed, b=2, t=8, v=32):
    return jnp.asarray(np.random.default_rng(seed).integers(0, v, size=(b, t + 1)), jnp.int32)


def _ce_tokens(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits.reshape(-1, logits.shape[-1]).astype(jnp.float32),
                                                           labels.reshape(-1))


def test_kfac_factors_equal_per_token_definitions():
    """A = (1/n)Σ a_t a_tᵀ, G = (1/n)Σ δ_t δ_tᵀ with δ_t = ∂(Σ_s ℓ_s)/∂y_t from explicit per-token Jacobians,
    for the empirical Fisher (true labels) and the true Fisher (labels sampled from the model)."""
    params = init_params(CFG, jax.random.PRNGKey(0))
    batch, rng = _batch(0), jax.random.PRNGKey(7)
    inputs, targets = split_batch(batch)
    layers = K.stat_layers(params, F.matrix_mask_fn(include_head=True))
    assert ("lm_head", "kernel") in layers and ("block_0", "attn", "wq", "kernel") in layers
    perts = layer_perturbations(APPLY, params, inputs)

    @jax.jit
    def run(params, batch):
        stats = {(kind, fisher): loss_grads_and_stats(CFG, params, batch, layers=layers, kind=kind,
                                                         fisher=fisher, rng=rng)
                 for kind in ("kron", "diag") for fisher in ("empirical", "true")}
        ref = jax.value_and_grad(lambda p: lm_loss(APPLY, p, batch))(params)
        logits, acts = apply_with_layer_stats(APPLY, params, perts, inputs)
        sampled = jax.random.categorical(rng, logits.astype(jnp.float32), axis=-1)

        def deltas(labels):   # δ_t of the summed loss: Σ_s of the per-token Jacobians ∂ℓ_s/∂y_t
            per_token = lambda e: _ce_tokens(apply_with_layer_stats(APPLY, params, e, inputs)[0], labels)
            return jax.tree.map(lambda j: j.sum(0), jax.jacrev(per_token)(perts))

        return stats, ref, logits, acts, {"empirical": deltas(targets), "true": deltas(sampled)}

    stats, (ref_loss, ref_grads), logits, acts, deltas = run(params, batch)
    p = jax.nn.softmax(logits.astype(jnp.float32), -1)
    n = inputs.size
    # Independent activation check: wq's input is attn_norm(embedding[tokens]).
    x = params["embed"]["embedding"][inputs.reshape(-1)]
    np.testing.assert_allclose(acts["block_0"]["attn"]["wq"]["inputs"],
                               rms_norm(x, params["block_0"]["attn_norm"]["scale"], CFG.norm_eps), rtol=1e-5)
    for fisher in ("empirical", "true"):
        loss, grads, factors, entropy = stats[("kron", fisher)]
        diag = stats[("diag", fisher)][2]
        # The gradient is the ordinary mean-loss gradient (true labels) in both modes.
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, ref_grads)
        np.testing.assert_allclose(entropy, -np.mean(np.sum(p * np.log(p), -1)), rtol=1e-5)
        for keys in layers:
            mod = keys[:-1]
            a = np.asarray(K.lookup(acts, mod + ("inputs",)), np.float64)
            d = np.asarray(K.lookup(deltas[fisher], mod + ("outputs",)), np.float64)
            if fisher == "empirical":  # (1/n) Σ_t a_t δ_tᵀ is the kernel gradient of the mean loss
                np.testing.assert_allclose(np.einsum("ti,tj->ij", a, d) / n, K.lookup(grads, keys),
                                           rtol=2e-4, atol=1e-6)
            A = sum(np.outer(a[t], a[t]) for t in range(n)) / n
            G = sum(np.outer(d[t], d[t]) for t in range(n)) / n
            f, fd = K.lookup(factors, keys), K.lookup(diag, keys)
            np.testing.assert_allclose(f.a, A, rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(f.g, G, rtol=1e-4, atol=1e-6 * np.abs(G).max())
            np.testing.assert_allclose(fd.a, np.diag(A), rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(fd.g, np.diag(G), rtol=1e-4, atol=1e-6 * np.abs(G).max())


def _spd(rng, m, scale=1.0):
    x = rng.normal(size=(3 * m, m))
    return (scale * (x.T @ x / (3 * m) + 0.1 * np.eye(m))).astype(np.float32)


def test_kronecker_order_of_an_in_out_kernel():
    """vec = row-major ravel of the (in, out) kernel: vec(a δᵀ) vec(a δᵀ)ᵀ = (a aᵀ) ⊗ (δ δᵀ), so F ≈ A ⊗ G."""
    rng = np.random.default_rng(0)
    a, d = rng.normal(size=5), rng.normal(size=3)
    v = np.outer(a, d).ravel()
    np.testing.assert_allclose(np.outer(v, v), np.kron(np.outer(a, a), np.outer(d, d)), atol=1e-12)


@pytest.mark.parametrize("mode", ["eigen", "factored"])
def test_kfac_preconditioner_equals_dense_damped_inverse(mode):
    rng = np.random.default_rng(1)
    n_in, n_out, lam = 6, 4, 0.05
    A, G = _spd(rng, n_in), _spd(rng, n_out, scale=3.0)
    g = rng.normal(size=(n_in, n_out)).astype(np.float32)
    params = {"w": {"kernel": jnp.zeros((n_in, n_out))}}
    tx = K.scale_by_kfac(0.95, lam, damping_mode=mode)
    factors = {"w": {"kernel": K.LayerFactors(jnp.asarray(A), jnp.asarray(G))}}
    u, state = tx.update({"w": {"kernel": jnp.asarray(g)}}, tx.init(params), factors=factors)
    if mode == "eigen":
        dense = np.kron(A, G) + lam * np.eye(n_in * n_out)
    else:
        pi = math.sqrt((np.trace(A) / n_in) / (np.trace(G) / n_out))
        dense = np.kron(A + pi * math.sqrt(lam) * np.eye(n_in), G + math.sqrt(lam) / pi * np.eye(n_out))
    expected = np.linalg.solve(dense.astype(np.float64), g.ravel().astype(np.float64)).reshape(n_in, n_out)
    np.testing.assert_allclose(u["w"]["kernel"], expected, rtol=2e-4, atol=1e-5)
    # The same through the raw layer trees (stats computed inside the transform).
    a = rng.normal(size=(20, n_in)).astype(np.float32)
    d = rng.normal(size=(20, n_out)).astype(np.float32)
    u2, _ = tx.update({"w": {"kernel": jnp.asarray(g)}}, tx.init(params),
                      layer_inputs={"w": {"inputs": a}}, layer_output_grads={"w": {"outputs": d}})
    A2, G2 = a.T @ a / 20, (20 * d).T @ (20 * d) / 20
    if mode == "eigen":
        exp2 = np.linalg.solve(np.kron(A2, G2) + lam * np.eye(n_in * n_out), g.ravel()).reshape(n_in, n_out)
        np.testing.assert_allclose(u2["w"]["kernel"], exp2, rtol=2e-3, atol=1e-5)


def test_kfac_ema_refresh_cadence_and_kl_clip():
    rng = np.random.default_rng(2)
    params = {"w": {"kernel": jnp.zeros((3, 2))}}
    fs = [{"w": {"kernel": K.LayerFactors(jnp.asarray(_spd(rng, 3)), jnp.asarray(_spd(rng, 2)))}} for _ in range(3)]
    g = {"w": {"kernel": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)}}
    tx = K.scale_by_kfac(0.6, 1e-3, T_cov=2, T_inv=3, kl_clip=1e-4, learning_rate=0.5)
    s = tx.init(params)
    plain = K.scale_by_kfac(0.6, 1e-3, T_cov=2, T_inv=3)
    ps = plain.init(params)
    for f in fs:
        u, s = tx.update(g, s, factors=f)
        u0, ps = plain.update(g, ps, factors=f)
    A = lambda i: np.asarray(fs[i]["w"]["kernel"].a)
    # Refreshes at counts 0 and 2: ε_1 = 0, ε_2 = min(1/2, 0.6).
    np.testing.assert_allclose(s.layers["w"]["kernel"].a, 0.5 * A(0) + 0.5 * A(2), rtol=1e-6)
    assert int(s.refreshes) == 2 and int(s.count) == 3
    # Eigendecomposition from count 0 only (T_inv = 3): the A of the first batch.
    np.testing.assert_allclose(s.layers["w"]["kernel"].a_vals, np.linalg.eigvalsh(A(0)), rtol=1e-5)
    # KL clip: u = ν u₀ with ν = min(1, √(κ / (lr² ⟨u₀, g⟩))), here < 1.
    vg = float(jnp.sum(u0["w"]["kernel"] * g["w"]["kernel"])) * 0.5 ** 2
    assert vg > 1e-4
    np.testing.assert_allclose(u["w"]["kernel"], math.sqrt(1e-4 / vg) * u0["w"]["kernel"], rtol=1e-5)


def test_diag_fisher_step_equals_elementwise_formula():
    rng = np.random.default_rng(3)
    params = {"w": {"kernel": jnp.zeros((4, 5))}}
    eps = 1e-3
    fa = [rng.uniform(0.1, 1, size=4).astype(np.float32) for _ in range(2)]
    fg = [rng.uniform(0.1, 1, size=5).astype(np.float32) for _ in range(2)]
    gs = [rng.normal(size=(4, 5)).astype(np.float32) for _ in range(2)]
    kron, sq = F.scale_by_diag_fisher(0.95, eps), F.scale_by_diag_fisher(0.95, eps, diag="ema_sq")
    sk, ss = kron.init(params), sq.init(params)
    for i in range(2):
        f = {"w": {"kernel": K.LayerFactors(jnp.asarray(fa[i]), jnp.asarray(fg[i]))}}
        uk, sk = kron.update({"w": {"kernel": jnp.asarray(gs[i])}}, sk, factors=f)
        us, ss = sq.update({"w": {"kernel": jnp.asarray(gs[i])}}, ss)
    # Step 2: ε_2 = 1/2, so the EMA is the plain mean of the two batches.
    f_kron = np.outer((fa[0] + fa[1]) / 2, (fg[0] + fg[1]) / 2)
    np.testing.assert_allclose(uk["w"]["kernel"], gs[1] / (f_kron + eps), rtol=1e-5)
    np.testing.assert_allclose(us["w"]["kernel"], gs[1] / ((gs[0] ** 2 + gs[1] ** 2) / 2 + eps), rtol=1e-5)


def _toy_params():
    r = np.random.default_rng(4)
    return {"embed": {"embedding": jnp.asarray(r.normal(size=(7, 6)), jnp.float32)},
            "block_0": {"w": {"kernel": jnp.asarray(r.normal(size=(6, 9)), jnp.float32)},
                        "norm": {"scale": jnp.ones((6,), jnp.float32)}}}


def _muon_ref(xs, beta=0.95):
    m, out = 0.0, []
    for x in xs:
        m = beta * m + (1 - beta) * x
        out.append(muon_scale(x.shape) * orthogonalize(jnp.asarray(beta * m + (1 - beta) * x)))
    return out


@pytest.mark.parametrize("name", ["fog", "diagfog"])
def test_fog_and_diagfog_equal_muon_of_hand_natural_gradient(name):
    params, rng, lr, lam, eps = _toy_params(), np.random.default_rng(5), 0.1, 1e-2, 1e-3
    grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params) for _ in range(2)]
    if name == "fog":
        tx = F.fog(lr, damping=lam, T_inv=1, adam_b2=0.95)
        fac = [(_spd(rng, 6), _spd(rng, 9)) for _ in range(2)]
    else:
        tx = F.diagfog(lr, eps=eps, adam_b2=0.95)
        fac = [(rng.uniform(0.1, 1, size=6).astype(np.float32), rng.uniform(0.1, 1, size=9).astype(np.float32))
               for _ in range(2)]
    ref_adam = optax.adam(lr, b1=0.9, b2=0.95)
    state, rs, nats, p, rp = tx.init(params), None, [], params, params
    rs = ref_adam.init(params)
    for i in range(2):
        factors = {"block_0": {"w": {"kernel": K.LayerFactors(jnp.asarray(fac[i][0]), jnp.asarray(fac[i][1]))}}}
        u, state = tx.update(grads[i], state, p, factors=factors)
        p = optax.apply_updates(p, u)
        ra, rs = ref_adam.update(grads[i], rs, rp)
        rp = optax.apply_updates(rp, ra)
        # EMA with ε_1 = 0, ε_2 = 1/2: the first batch, then the mean of both.
        A, G = (fac[0][0], fac[0][1]) if i == 0 else ((fac[0][0] + fac[1][0]) / 2, (fac[0][1] + fac[1][1]) / 2)
        g = np.asarray(grads[i]["block_0"]["w"]["kernel"], np.float64)
        if name == "fog":
            nats.append(np.linalg.solve(np.kron(A, G) + lam * np.eye(54), g.ravel()).reshape(6, 9))
        else:
            nats.append(g / (np.outer(A, G) + eps))
    expected = params["block_0"]["w"]["kernel"] - lr * sum(_muon_ref([jnp.asarray(n, jnp.float32) for n in nats]))
    np.testing.assert_allclose(p["block_0"]["w"]["kernel"], expected, rtol=1e-4, atol=1e-5)
    for path in (("embed", "embedding"), ("block_0", "norm", "scale")):
        np.testing.assert_allclose(K.lookup(p, path), K.lookup(rp, path), rtol=1e-5, atol=1e-6)


def test_pi_muon_mixing_equals_formula():
    params, rng = _toy_params(), np.random.default_rng(6)
    w = lambda t: t["block_0"]["w"]["kernel"]
    logits = rng.normal(size=(10, 7))
    prob = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    H = float(-np.mean(np.sum(prob * np.log(prob), -1)))
    np.testing.assert_allclose(mean_entropy(jnp.asarray(logits, jnp.float32)), H, rtol=1e-5)
    alpha, gamma = 0.3, 0.2
    tx = F.scale_by_pi_muon(alpha=alpha, gamma=gamma)
    only_w = {"block_0": {"w": {"kernel": w(params)}}}
    state = tx.init(only_w)
    gs, us = [], []
    for _ in range(2):
        g = {"block_0": {"w": {"kernel": jnp.asarray(rng.normal(size=(6, 9)), jnp.float32)}}}
        gf = {"block_0": {"w": {"kernel": jnp.asarray(rng.normal(size=(6, 9)), jnp.float32)}}}
        u, state = tx.update(g, state, entropy=jnp.float32(H), g_fisher=gf)
        gs.append(w(g))
        pi = math.exp(-(alpha * H + gamma * float(np.linalg.norm(w(g)))))   # ‖g‖ defaults to the norm of g
        us.append((w(u), pi * w(gf) + (1 - pi) * _muon_ref(gs)[-1]))
        assert float(state.pi) == pytest.approx(pi, rel=1e-5)
    for got, want in us:
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # A pluggable Fisher source: with K-FAC, g_fisher is scale_by_kfac's output.
    kf = K.scale_by_kfac(damping=0.1)
    tx2 = F.scale_by_pi_muon(kf, alpha=alpha, gamma=gamma)
    fac = {"block_0": {"w": {"kernel": K.LayerFactors(jnp.asarray(_spd(rng, 6)), jnp.asarray(_spd(rng, 9)))}}}
    g = {"block_0": {"w": {"kernel": jnp.asarray(gs[0])}}}
    u2, _ = tx2.update(g, tx2.init(only_w), entropy=H, grad_norm=2.0, factors=fac)
    gf2, _ = kf.update(g, kf.init(only_w), factors=fac)
    pi = math.exp(-(alpha * H + gamma * 2.0))
    np.testing.assert_allclose(w(u2), pi * w(gf2) + (1 - pi) * _muon_ref(gs[:1])[0], rtol=1e-4, atol=1e-5)
    # The full optimizer with a Fisher source on the whole tree (as layerwise GN needs): here g_fisher = −3g.
    lr = 0.1
    tx3 = F.pi_muon(lr, alpha, gamma, fisher=optax.scale(-3.0))
    full = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    u3, _ = tx3.update(full, tx3.init(params), params, entropy=H, grad_norm=2.0)
    mix = pi * (-3.0 * w(full)) + (1 - pi) * _muon_ref([w(full)])[0]
    np.testing.assert_allclose(w(u3), -lr * mix, rtol=1e-4, atol=1e-5)
    adam, _ = optax.adam(lr, b1=0.9, b2=0.95).update(full, optax.adam(lr).init(params))
    np.testing.assert_allclose(u3["embed"]["embedding"], adam["embed"]["embedding"], rtol=1e-5)


def _find_all(tree, cls):
    found = [x for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, cls)) if isinstance(x, cls)]
    assert found
    return found


def _find(tree, cls):
    (found,) = _find_all(tree, cls)
    return found


def _find_bytes(tree, cls):
    return sum(leaf.nbytes for x in _find_all(tree, cls) for leaf in jax.tree.leaves(x))


def test_state_size_diagfog_linear_fog_quadratic():
    _registered()
    for hidden, ffn in ((16, 32), (32, 96)):
        cfg = model_config("nano", vocab_size=32, hidden=hidden, layers=2, heads=2, ffn=ffn, max_seq_len=16)
        params = init_params(cfg, jax.random.PRNGKey(0))
        ctx = MethodContext(apply_fn=make_apply(cfg), total_steps=10, batch_size=2, model_cfg=cfg)
        hidden_mask = jax.tree.leaves(default_matrix_mask(params))   # not embed (V, D) or head (D, V)
        dims = [tuple(x.shape) for x, h in zip(jax.tree.leaves(params), hidden_mask) if h]
        assert len(dims) == 2 * 7
        diag = registry.build(registry.resolve_entry({"name": "diagfog"}), ctx).init(params)
        full = registry.build(registry.resolve_entry({"name": "fog"}), ctx).init(params)
        assert _find_bytes(diag, F.ScaleByDiagFisherState) == 4 * sum(i + o for i, o in dims) + 8
        assert _find_bytes(full, K.ScaleByKFACState) == 4 * sum(2 * i * i + 2 * o * o + i + o for i, o in dims) + 8
        # Everything else in DiagFog's state is O(d): Muon momentum + Adam moments + counters.
        n_matrix = sum(i * o for i, o in dims)
        n_other = sum(x.size for x in jax.tree.leaves(params)) - n_matrix
        total = sum(x.nbytes for x in jax.tree.leaves(diag))
        assert total - _find_bytes(diag, F.ScaleByDiagFisherState) <= 4 * (n_matrix + 2 * n_other) + 64


TRAIN_CASES = [
    pytest.param("fog", {"grad_accum": 2}, id="fog-accum2"),
    pytest.param("diagfog", {"T_cov": 2}, id="diagfog-tcov2", marks=pytest.mark.slow),
    pytest.param("kfac", {"fisher": "true"}, id="kfac-truefisher", marks=pytest.mark.slow),
    pytest.param("pi_muon", {}, id="pi_muon", marks=pytest.mark.slow),
    pytest.param("pi_muon", {"fisher_source": "lwgn"}, id="pi_muon-lwgn", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name,opts", TRAIN_CASES)
def test_registered_method_trains_without_recompiling(name, opts):
    _registered()
    opts = dict(opts)
    accum = opts.pop("grad_accum", 1)
    params = params0 = init_params(CFG, jax.random.PRNGKey(1))
    method = registry.build(registry.resolve_entry({"name": name, "warmup_steps": 0, "schedule": "constant", **opts}),
                            MethodContext(apply_fn=APPLY, total_steps=6, batch_size=4, grad_accum=accum, model_cfg=CFG))
    assert method.plan.train == accum and method.plan.micro_batch == 4 // accum
    batch = _batch(2, b=4)
    state, losses = method.init(params), []
    for i in range(6):
        params, state, m = method.step(params, state, batch.reshape(accum, 4 // accum, -1), None, jax.random.PRNGKey(i))
        losses.append(float(m["train_loss"]))
        if i == 0 and name == "pi_muon":   # PI from the batch's entropy and gradient norm at θ₀
            H, gnorm = jax.jit(lambda p: (mean_entropy(APPLY(p, split_batch(batch)[0])),
                                          tree_norm(jax.grad(lambda q: lm_loss(APPLY, q, batch))(p))))(params0)
            np.testing.assert_allclose(m["pi"], np.exp(-(0.1 * H + 0.1 * gnorm)), rtol=1e-4)
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.3, losses
    assert method.traces == 1
    assert method.lr(3) == pytest.approx(registry.get(name)().learning_rate)


@pytest.mark.slow
def test_grad_accumulation_averages_statistics():
    """Micro-batch statistics averaged over the step equal the full-batch statistics."""
    _registered()
    params, batch = init_params(CFG, jax.random.PRNGKey(1)), _batch(3, b=4)
    outs = []
    for accum in (1, 2):
        m = registry.build(registry.resolve_entry({"name": "fog", "grad_clip": 0.0, "adam_eps": 1e-3}),
                           MethodContext(apply_fn=APPLY, total_steps=4, batch_size=4, grad_accum=accum, model_cfg=CFG))
        outs.append(m.step(params, m.init(params), batch.reshape(accum, 4 // accum, -1), None, jax.random.PRNGKey(0)))
    # adam_eps keeps Adam's first step (≈ sign(g)) from amplifying rounding noise where g ≈ 0.
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    jax.tree.map(close, outs[0][0], outs[1][0])
    # Statistics (not the eigenvectors: their signs are arbitrary).
    kf = [jax.tree.map(lambda l: (l.a, l.g), _find(o[1], K.ScaleByKFACState).layers,
                       is_leaf=lambda x: isinstance(x, K.KFACLayerState)) for o in outs]
    jax.tree.map(close, kf[0], kf[1])


@pytest.mark.parametrize("entry,diagonal,t_cov", [({"name": "fog"}, False, 1), ({"name": "kfac", "T_cov": 2}, False, 2),
                                                  ({"name": "diagfog"}, True, 1)])
def test_statistics_are_counted_in_compute(entry, diagonal, t_cov):
    """grad_evals_per_step = 1 + Σ 2(d_in² + d_out²) / (6N) / T_cov over the kernels with statistics
    (diagonal factors: d_in + d_out), computed here from the shapes; Muon (no statistics) counts 1."""
    params = init_params(CFG, jax.random.PRNGKey(0))
    ctx = MethodContext(apply_fn=APPLY, total_steps=4, batch_size=8, model_cfg=CFG)
    m = registry.resolve_entry(entry).build(ctx)
    m.init(params)
    n = sum(x.size for x in jax.tree.leaves(params))
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    # the hidden 2-D kernels: every matrix but the embedding and the head
    kernels = [x.shape for p, x in flat if x.ndim == 2 and str(getattr(p[0], "key", p[0])) not in ("embed", "lm_head")]
    assert kernels
    per_token = sum(2 * ((a + b) if diagonal else (a * a + b * b)) for a, b in kernels)
    assert m.grad_evals_per_step == pytest.approx(1 + per_token / (6 * n) / t_cov, rel=1e-12)
    muon = registry.resolve_entry({"name": "muon"}).build(ctx)
    muon.init(params)
    assert muon.grad_evals_per_step == 1.0


def test_a_second_init_counts_the_same_compute():
    params = init_params(CFG, jax.random.PRNGKey(0))
    ctx = MethodContext(apply_fn=APPLY, total_steps=4, batch_size=8, model_cfg=CFG)
    for entry in ({"name": "fog"}, {"name": "pi_muon_gn"}):
        m = registry.resolve_entry(entry).build(ctx)
        m.init(params)
        once = m.grad_evals_per_step
        m.init(params)
        assert once > 1.0 and m.grad_evals_per_step == once
