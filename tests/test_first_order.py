"""First-order methods against their defining equations, and a conformance run of every one."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gn.model import init_params, make_apply, model_config
from gn.methods import registry
from gn.methods.base import MethodContext
from gn.optim import matrix_mask_fn
from gn.optim.masks import decay_mask, matrix_mask
from gn.optim.schedules import make_schedule
from gn.curvature.objective import lm_loss

CFG = model_config("nano", vocab_size=64, hidden=32, layers=1, heads=2, ffn=64, max_seq_len=32)
APPLY = make_apply(CFG)


def _batch(seed, b=4, t=16):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 64, size=(b, t + 1)), jnp.int32)


def _method(name, steps=10, batch=4, accum=1, **hp):
    entry = registry.resolve_entry({"name": name, **hp})
    ctx = MethodContext(apply_fn=APPLY, total_steps=steps, batch_size=batch, grad_accum=accum, model_cfg=CFG)
    return registry.build(entry, ctx)


def test_schedules_follow_their_formulas():
    cos = make_schedule("cosine", 1.0, 110, warmup_steps=10, min_lr_ratio=0.1)
    assert float(cos(0)) == pytest.approx(0.1) and float(cos(9)) == pytest.approx(1.0)
    assert float(cos(60)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 0.5)))
    assert float(cos(110)) == pytest.approx(0.1)
    wsd = make_schedule("wsd", 2.0, 100, warmup_steps=0, min_lr_ratio=0.0, decay_fraction=0.2)
    assert float(wsd(79)) == pytest.approx(2.0) and float(wsd(90)) == pytest.approx(1.0)
    assert float(wsd(100)) == pytest.approx(0.0)
    const = make_schedule("constant", 0.5, 100, warmup_steps=4)
    assert float(const(1)) == pytest.approx(0.25) and float(const(50)) == pytest.approx(0.5)


def test_adamw_equals_decoupled_weight_decay_equation():
    """θ ← θ − lr·(adam(g) + wd·θ) on the decay mask, as optax.adamw defines it."""
    params = init_params(CFG, jax.random.PRNGKey(0))
    # eps=1e-3 keeps Adam well conditioned where g ≈ 0, so float rounding cannot flip signs.
    m = _method("adamw", learning_rate=1e-2, weight_decay=0.1, grad_clip=0.0, schedule="constant", eps=1e-3)
    ref = optax.adamw(1e-2, b1=0.9, b2=0.95, eps=1e-3, weight_decay=0.1, mask=lambda p: decay_mask(p, "matrices"))
    s, rs, p, rp = m.init(params), ref.init(params), params, params
    for i in range(3):
        batch = _batch(i)[None]
        p, s, _ = m.step(p, s, batch, None, jax.random.PRNGKey(0))
        g = jax.grad(lambda q: lm_loss(APPLY, q, batch[0]))(rp)
        u, rs = ref.update(g, rs, rp)
        rp = optax.apply_updates(rp, u)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5), p, rp)


def test_gradient_accumulation_equals_full_batch():
    params = init_params(CFG, jax.random.PRNGKey(1))
    batch = _batch(3, b=8)
    one = _method("sgd", batch=8, accum=1, learning_rate=0.1, momentum=0.0, grad_clip=0.0)
    two = _method("sgd", batch=8, accum=2, learning_rate=0.1, momentum=0.0, grad_clip=0.0)
    p1, _, m1 = one.step(params, one.init(params), batch[None], None, jax.random.PRNGKey(0))
    p2, _, m2 = two.step(params, two.init(params), batch.reshape(2, 4, -1), None, jax.random.PRNGKey(0))
    np.testing.assert_allclose(m1["train_loss"], m2["train_loss"], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), p1, p2)


def test_muon_routes_hidden_matrices_only_and_orthogonalises_them():
    params = init_params(CFG, jax.random.PRNGKey(2))
    side = matrix_mask_fn()(params)     # the router's matrix side
    assert not side["embed"]["embedding"] and not side["lm_head"]["kernel"]
    assert not side["final_norm"]["scale"]
    assert side["block_0"]["attn"]["wq"]["kernel"]
    assert matrix_mask(params)["block_0"]["mlp"]["w_up"]["kernel"]
    m = _method("muon", learning_rate=1.0, adam_learning_rate=1.0, grad_clip=0.0, schedule="constant",
                nesterov=False, beta=0.0)
    new, _, _ = m.step(params, m.init(params), _batch(0)[None], None, jax.random.PRNGKey(0))
    w = "block_0", "mlp", "w_up", "kernel"
    delta = np.asarray(new[w[0]][w[1]][w[2]][w[3]] - params[w[0]][w[1]][w[2]][w[3]])
    sv = np.linalg.svd(delta, compute_uv=False)
    # Newton-Schulz quintic maps singular values into roughly [0.7, 1.2], times sqrt(max(1, out/in)).
    scale = np.sqrt(max(1.0, delta.shape[1] / delta.shape[0]))
    assert sv.min() > 0.5 * scale and sv.max() < 1.3 * scale
    # The embedding took an Adam step: first Adam update is lr * sign-like g/|g| per element.
    e = np.asarray(new["embed"]["embedding"] - params["embed"]["embedding"])
    touched = np.abs(e) > 0
    assert np.allclose(np.abs(e[touched]), 1.0, atol=1e-2)


# Every registered method except the GN outer step (tested in test_gauss_newton / test_train).
FIRST_ORDER = [n for n in registry.names() if registry.get(n).family != "gauss_newton"]


@pytest.mark.parametrize("name", FIRST_ORDER)
def test_every_first_order_method_trains_without_recompiling(name):
    params = init_params(CFG, jax.random.PRNGKey(0))
    m = _method(name, steps=8)
    state = m.init(params)
    batch = _batch(7)[None]
    loss0 = float(lm_loss(APPLY, params, batch[0]))
    struct = jax.tree.structure(state)
    for _ in range(6):
        params, state, metrics = m.step(params, state, batch, None, jax.random.PRNGKey(0))
        assert jax.tree.structure(state) == struct
    assert m.step._cache_size() == 1, "the step recompiled"
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    assert float(lm_loss(APPLY, params, batch[0])) < loss0
