"""The GN outer step against its defining equations on a tiny LLaMA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from gn import curvature
from gn.errors import ConfigError
from gn.model import init_params, make_apply
from tests.tiny_models import micro
from gn.methods import registry
from gn.methods.base import MethodContext
from gn.methods.gauss_newton import inner_lr_factor
from gn.methods.linesearch import grid_alphas, line_search
from gn.curvature.objective import lm_loss, split_batch
from tests.dense_reference import dense_ggn

CFG = micro()
APPLY = make_apply(CFG)


def _batches(seed, n, b=2, t=6):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 16, size=(n, b, t + 1)), jnp.int32)


def _method(name="gn", batch=4, steps=3, **hp):
    entry = registry.resolve_entry({"name": name, **hp})
    return registry.build(entry, MethodContext(apply_fn=APPLY, total_steps=steps, batch_size=batch,
                                               reference_batch_size=batch))


@pytest.mark.parametrize("name, kind, partition", [("gn", "gn", None), ("gn_prox_linear", "prox_linear", None),
                                                   ("gn_layerwise", "gn", "transformer_blocks")])
def test_inner_loop_is_sgd_on_the_quadratic_model(name, kind, partition):
    theta = init_params(CFG, jax.random.PRNGKey(0))
    m = _method(name, inner_steps=2, inner_optimizer="sgd", inner_learning_rate=0.5, inner_grad_clip=0.0,
                inner_weight_decay=0.0, inner_schedule="constant_inner_cosine")
    state = m.init(theta)
    batches = _batches(1, 2)
    theta_hat, _, metrics = m._inner(theta, state, batches)
    # registry default for sgd has momentum 0.9: first step of momentum SGD is plain SGD, second adds 0.9·g1.
    g_hist = []
    th = theta
    for i in range(2):
        x, y = split_batch(batches[i])
        _, g = curvature.quadratic_model(APPLY, theta, x, y, kind=kind, partition=partition)(th)
        mom = g if not g_hist else jax.tree.map(lambda a, b: a + 0.9 * b, g, g_hist[-1])
        g_hist.append(mom)
        lr = 0.5 * float(inner_lr_factor("constant_inner_cosine", jnp.asarray(0), jnp.asarray(i), 2, 3, 0.0))
        th = jax.tree.map(lambda p, u: p - lr * u, th, mom)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), theta_hat, th)
    assert float(metrics["train_loss"]) == pytest.approx(
        float(np.mean([lm_loss(APPLY, theta, batches[i]) for i in range(2)])), rel=1e-5)


def test_inner_schedules_follow_their_formulas():
    c = lambda f: 0.5 * (1 + np.cos(np.pi * f))  # noqa: E731
    assert float(inner_lr_factor("constant", 3, 5, 10, 4, 0.0)) == 1.0
    assert float(inner_lr_factor("constant_inner_cosine", 3, 5, 10, 4, 0.0)) == pytest.approx(c(0.5))
    assert float(inner_lr_factor("global_cosine", 2, 5, 10, 4, 0.0)) == pytest.approx(c(25 / 40))
    assert float(inner_lr_factor("global_inner_cosine", 2, 5, 10, 4, 0.1)) == pytest.approx(
        (0.1 + 0.9 * c(25 / 40)) * (0.1 + 0.9 * c(0.5)))


def test_warm_start_continues_and_restart_begins_at_theta():
    theta = init_params(CFG, jax.random.PRNGKey(0))
    batches, aux = _batches(2, 2), _batches(3, 2)
    for warm in (True, False):
        m = _method("gn", inner_steps=2, warm_start=warm)
        state = m.init(theta)
        new, state, _ = m.step(theta, state, batches, aux, jax.random.PRNGKey(0))
        hat2, _, _ = m._inner(new, state, batches)
        fresh = m.init(new)
        hat_fresh, _, _ = m._inner(new, fresh._replace(outer_step=state.outer_step), batches)
        same = all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(hat2), jax.tree.leaves(hat_fresh)))
        assert same == (not warm)


def test_line_search_picks_the_grid_argmin_and_rejects_nonfinite():
    theta = init_params(CFG, jax.random.PRNGKey(0))
    delta = jax.tree.map(lambda x: 0.3 * jnp.ones_like(x), theta)
    aux = _batches(4, 2)
    loss = lambda p, b: lm_loss(APPLY, p, b)  # noqa: E731
    res = line_search(loss, theta, delta, aux, grid=6)
    lossj = jax.jit(loss)
    brute = [float(np.mean([lossj(jax.tree.map(lambda p, d: p + a * d, theta, delta), b) for b in aux]))
             for a in np.asarray(grid_alphas(0, 6))]
    assert float(res.alpha) == pytest.approx(float(grid_alphas(0, 6)[int(np.argmin(brute))]))
    assert float(res.loss) == pytest.approx(min(brute), rel=1e-5)
    # A loss that is NaN for large steps: those α are rejected.
    nan_big = lambda p, b: jnp.where(p["final_norm"]["scale"][0] > 1.2, jnp.nan, loss(p, b))  # noqa: E731
    res2 = line_search(nan_big, theta, delta, aux, grid=6)
    assert float(res2.alpha) <= 0.5 and np.isfinite(float(res2.loss))
    # Extending downward: a direction that only hurts ends at the smallest α evaluated.
    up = jax.tree.map(lambda g: 5.0 * g, jax.grad(lambda p: loss(p, aux[0]))(theta))
    res3 = line_search(loss, theta, up, aux[:1], grid=2, extend=3)
    assert float(res3.alpha) == pytest.approx(2.0 ** (-7 / 2)) and int(res3.num_evals) == 9


def _dense(theta, batch, damping):
    G, g, unravel = dense_ggn(APPLY, theta, batch)
    return G + damping * jnp.eye(G.shape[0]), g, unravel


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_cg_inner_solver_is_the_damped_gauss_newton_step(wd):
    """(G + λI + wd·M) d = −(g + wd·M θ_t): the inner loop's decay (on its mask M) is part of the model."""
    from gn.optim.masks import decay_mask

    theta = init_params(CFG, jax.random.PRNGKey(5))
    batches = _batches(6, 2)
    m = _method("gn", inner_steps=2, inner_solver="cg", damping=1e-2, cg_iters=400, cg_tol=1e-10,
                inner_weight_decay=wd)
    hat, _, _ = m._inner(theta, m.init(theta), batches)
    A, g, unravel = _dense(theta, batches.reshape(1, 4, -1)[0], 1e-2)
    mask = ravel_pytree(jax.tree.map(lambda b, x: jnp.full(x.shape, float(b)), decay_mask(theta, "adam_side"),
                                     theta))[0]
    assert 0 < float(mask.sum()) < mask.size
    d = jnp.linalg.solve(A + jnp.diag(wd * mask), -(g + wd * mask * ravel_pytree(theta)[0]))
    got = ravel_pytree(jax.tree.map(jnp.subtract, hat, theta))[0]
    # float32 CG (cond(A) = 241, so about 241 · 6e-8 = 1.4e-5 is float32's limit) against a float32 dense
    # solve: measured max |got − d| / max |d| = 2.4e-6 / 4.0e-6 (wd 0 / 0.05), relative L2 5.5e-6 / 4.9e-6
    # (jax 0.10, CPU); asserted 1e-4. Entries near zero differ by up to 1e-2 of themselves, hence the scale.
    assert float(jnp.abs(got - d).max()) <= 1e-4 * float(jnp.abs(d).max())
    assert float(jnp.linalg.norm(got - d)) <= 1e-4 * float(jnp.linalg.norm(d))


def test_predicted_decrease_is_the_model_decrease_at_the_chosen_step():
    theta = init_params(CFG, jax.random.PRNGKey(7))
    m = _method("gn", inner_steps=2)
    batches, aux = _batches(8, 2), _batches(9, 2)
    new, _, metrics = m.step(theta, m.init(theta), batches, aux, jax.random.PRNGKey(0))
    pred = []
    for b in aux:
        x, y = split_batch(b)
        q = curvature.quadratic_model(APPLY, theta, x, y)
        pred.append(float(q.loss0 - q(new)[0]))
    metrics = {k: float(v) for k, v in metrics.items()}
    assert metrics["pred_decrease"] == pytest.approx(np.mean(pred), rel=1e-4)
    before = np.mean([float(lm_loss(APPLY, theta, b)) for b in aux])
    after = np.mean([float(lm_loss(APPLY, new, b)) for b in aux])
    assert metrics["actual_decrease"] == pytest.approx(before - after, rel=1e-4, abs=1e-6)
    assert metrics["rho"] == pytest.approx(metrics["actual_decrease"] / metrics["pred_decrease"], rel=1e-4)


def test_gn_rejects_bad_settings():
    with pytest.raises(ConfigError, match="divisible by inner_steps"):
        _method("gn", batch=6, inner_steps=4)
    with pytest.raises(ConfigError, match="inner_optimizer"):
        registry.resolve_entry({"name": "gn", "inner_optimizer": "gn"})
    with pytest.raises(ConfigError, match="Did you mean 'inner_steps'"):
        registry.resolve_entry({"name": "gn", "inner_step": 3})


def test_cg_probe_reports_the_decrease_of_q_on_the_probe_batch():
    theta = init_params(CFG, jax.random.PRNGKey(3))
    m = _method("gn", inner_steps=2, probe_every=1, damping=1e-2, cg_iters=200, cg_tol=1e-10,
                inner_weight_decay=0.0)
    batches, aux = _batches(10, 2), _batches(11, 2)
    state = m.init(theta)
    hat, _, _ = m._inner(theta, state, batches)
    _, _, metrics = m.step(theta, state, batches, aux, jax.random.PRNGKey(0))
    x, y = split_batch(batches[0])
    q = curvature.quadratic_model(APPLY, theta, x, y, damping=1e-2)
    assert float(metrics["probe_inner_decrease"]) == pytest.approx(float(q.loss0 - q(hat)[0]), rel=1e-4)
    # CG reaches the exact minimiser of the damped model: Q0 − Q* = ½ gᵀ(G + λI)⁻¹g.
    A, g, _ = _dense(theta, batches[0], 1e-2)
    best = 0.5 * float(g @ jnp.linalg.solve(A, g))
    assert float(metrics["probe_cg_decrease"]) == pytest.approx(best, rel=1e-3)
    assert 0 < float(metrics["probe_fraction"]) <= 1.0 + 1e-6


def test_inner_options_reach_the_inner_optimizer_and_are_validated():
    """The paper's inner Muon has β₂ 0.999 on its AdamW side: `inner_options` sets it, typed and checked."""
    from gn.methods.gauss_newton import inner_optimizer_config

    e = registry.resolve_entry({"name": "gn", "inner_options": {"adam_b2": 0.999, "ns_steps": 6}})
    inner = inner_optimizer_config(e.hparams)
    assert (inner.adam_b2, inner.ns_steps, inner.learning_rate, inner.weight_decay) == (0.999, 6, 0.01, 0.001)
    assert inner_optimizer_config(registry.resolve_entry({"name": "gn"}).hparams).adam_b2 == 0.95
    for bad, msg in [({"adam_b3": 0.9}, "Did you mean 'adam_b2'"), ({"learning_rate": 1.0}, "inner_learning_rate"),
                     ({"adam_b2": "high"}, "must be a number"), ({"warmup_steps": 3}, "inner_schedule"),
                     ([0.999], "must be a mapping")]:
        with pytest.raises(ConfigError, match=msg):
            registry.resolve_entry({"name": "gn", "inner_options": bad})
    # β₂ changes the inner AdamW-side update (here on the embedding after two steps).
    theta = init_params(CFG, jax.random.PRNGKey(0))
    batches = _batches(3, 2)
    outs = []
    for b2 in (0.95, 0.999):
        m = _method("gn", inner_steps=2, inner_options={"adam_b2": b2})
        theta_hat, _, _ = m._inner(theta, m.init(theta), batches)
        outs.append(np.asarray(theta_hat["embed"]["embedding"]))
    assert not np.allclose(outs[0], outs[1])


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_cg_inner_solver_is_the_damped_gauss_newton_step_in_float64(wd):
    """The float32 check above, rerun in float64 so the tolerance measures the solver, not rounding:
    400 CG iterations at cg_tol 1e-10 on cond(A) = 241 against the dense float64 solve. Measured
    (jax 0.10, CPU): max |got − d| / max |d| = 1.3e-14 / 2.8e-14 (wd 0 / 0.05); asserted 1e-9."""
    from gn.optim.masks import decay_mask

    with jax.enable_x64(True):
        cfg = micro(dtype="float64")
        apply = make_apply(cfg)
        theta = init_params(cfg, jax.random.PRNGKey(5))
        batches = _batches(6, 2)
        entry = registry.resolve_entry({"name": "gn", "inner_steps": 2, "inner_solver": "cg", "damping": 1e-2,
                                        "cg_iters": 400, "cg_tol": 1e-14, "inner_weight_decay": wd})
        m = registry.build(entry, MethodContext(apply_fn=apply, total_steps=3, batch_size=4, reference_batch_size=4))
        hat, _, _ = m._inner(theta, m.init(theta), batches)
        G, g, _ = dense_ggn(apply, theta, batches.reshape(1, 4, -1)[0])
        A = G + 1e-2 * jnp.eye(G.shape[0])
        mask = ravel_pytree(jax.tree.map(lambda b, x: jnp.full(x.shape, float(b)),
                                         decay_mask(theta, "adam_side"), theta))[0]
        d = jnp.linalg.solve(A + jnp.diag(wd * mask), -(g + wd * mask * ravel_pytree(theta)[0]))
        got = ravel_pytree(jax.tree.map(jnp.subtract, hat, theta))[0]
        assert got.dtype == jnp.float64
        err = float(jnp.abs(got - d).max()) / float(jnp.abs(d).max())
        print(f"float64 CG vs dense solve, wd {wd}: max relative error {err:.2e}")
        assert err <= 1e-9
