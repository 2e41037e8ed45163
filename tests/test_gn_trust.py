"""The GN outer step's contract with the trainer: the α*·Δ update, inner weight decay (value and
leaves), AdamW-side routing, token and cost accounting, EMA cadence, schedules over the real run
length, rejected steps and loud divergence. Each test fails on a one-line bug in what it names."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gn import cli
from gn.config import config_from_dict
from gn.methods import registry
from gn.methods.base import MethodContext
from gn.methods.gauss_newton import inner_lr_factor
from gn.model import init_params, make_apply
from tests.tiny_models import TINY_RUN, micro
from gn.paths import is_hidden_matrix, map_with_path
from gn.train.trainer import prepare, setup, train

CFG = micro()
APPLY = make_apply(CFG)
TINY = {
    **TINY_RUN,
    "methods": [{"name": "gn", "inner_steps": 2, "ls_batches": 3}],
}


def _method(name="gn", batch=4, steps=3, **hp):
    hp.setdefault("inner_steps", 2)
    entry = registry.resolve_entry({"name": name, **hp})
    return entry.build(MethodContext(apply_fn=APPLY, total_steps=steps, batch_size=batch, reference_batch_size=batch))


def _batches(seed, n, b=2, t=6):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 16, size=(n, b, t + 1)), jnp.int32)


def test_outer_step_moves_by_alpha_times_delta():
    """θ_{t+1} = θ_t + α*·(θ̂ − θ_t), with α* < 1 chosen by the line search. A lookup-table model
    (logits = W[token]) keeps the GN model and the true loss in agreement at every step size."""
    apply = lambda p, tok: p["table"][tok]
    theta = {"table": jnp.zeros((16, 16))}
    m = registry.resolve_entry({"name": "gn", "inner_steps": 2, "inner_learning_rate": 0.05,
                                "inner_optimizer": "adamw"}).build(
        MethodContext(apply_fn=apply, total_steps=3, batch_size=4, reference_batch_size=4))
    hat, _, _ = m._inner(theta, m.init(theta), _batches(1, 2))
    far = jax.tree.map(lambda t, h: t + 4.0 * (h - t), theta, hat)        # 4x too far: α* = 1/4
    new, rejected, metrics = m._search(theta, far, _batches(2, 2))
    alpha = float(metrics["alpha"])
    assert not bool(rejected) and 0 < alpha < 1 and float(metrics["pred_decrease"]) > 0
    expect = jax.tree.map(lambda t, h: t + alpha * (h - t), theta, far)
    np.testing.assert_allclose(new["table"], expect["table"], rtol=1e-6, atol=1e-8)
    # the whole step returns the line search's point
    m2 = _method(inner_steps=2, inner_learning_rate=0.05)
    theta2 = init_params(CFG, jax.random.PRNGKey(0))
    new2, state2, met2 = m2.step(theta2, m2.init(theta2), _batches(1, 2), _batches(2, 2), jax.random.PRNGKey(0))
    a2 = float(met2["alpha"])
    expect2 = jax.tree.map(lambda t, h: t + a2 * (h - t), theta2, state2.inner_params)
    for a, b in zip(jax.tree.leaves(new2), jax.tree.leaves(expect2)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_inner_weight_decay_value_and_default_leaves():
    wd = 0.1
    m = _method(inner_weight_decay=wd, inner_grad_clip=0.0)
    theta = init_params(CFG, jax.random.PRNGKey(0))
    zeros = jax.tree.map(jnp.zeros_like, theta)
    updates, _ = m.tx.update(zeros, m.tx.init(theta), theta)        # zero gradient: only the decay moves θ
    decayed = map_with_path(lambda p, x: not is_hidden_matrix(p, x), theta)    # paper: AdamW side only
    for d, u, t in zip(jax.tree.leaves(decayed), jax.tree.leaves(updates), jax.tree.leaves(theta)):
        np.testing.assert_allclose(u, -wd * t if d else 0.0 * t, rtol=1e-6, atol=1e-8)
    assert any(jax.tree.leaves(decayed)) and not all(jax.tree.leaves(decayed))
    hidden = _method(inner_weight_decay=wd, inner_grad_clip=0.0, inner_weight_decay_mask="hidden_matrices")
    updates, _ = hidden.tx.update(zeros, hidden.tx.init(theta), theta)
    for d, u, t in zip(jax.tree.leaves(decayed), jax.tree.leaves(updates), jax.tree.leaves(theta)):
        np.testing.assert_allclose(u, 0.0 * t if d else -wd * t, rtol=1e-6, atol=1e-8)


def test_cg_solves_the_same_regularised_model_as_the_inner_loop():
    wd, lam = 0.3, 0.05
    m = _method(inner_solver="cg", damping=lam, inner_weight_decay=wd, cg_iters=300, cg_tol=1e-12)
    theta = init_params(CFG, jax.random.PRNGKey(0))
    batch = _batches(3, 1, b=4)[0]
    from gn.curvature.objective import split_batch
    x, y = split_batch(batch)
    q = m.local_model(theta, batch)
    d, _ = m._damped_solve(theta, x, y, q(theta)[1])
    # at the minimiser of Q + (wd/2)‖Mθ‖² the gradient vanishes
    at = jax.tree.map(jnp.add, theta, d)
    grad = jax.tree.map(jnp.add, q(at)[1], jax.grad(m.regularizer)(at))
    gnorm = float(jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grad))))
    g0 = float(jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(q(theta)[1]))))
    assert gnorm < 1e-3 * g0


def test_inner_adam_learning_rate_routes_to_the_adamw_side_only():
    theta = init_params(CFG, jax.random.PRNGKey(0))
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), theta)
    base = _method(inner_learning_rate=0.01, inner_weight_decay=0.0, inner_grad_clip=0.0)
    fast = _method(inner_learning_rate=0.01, inner_adam_learning_rate=0.04, inner_weight_decay=0.0,
                   inner_grad_clip=0.0)
    ub, _ = base.tx.update(grads, base.tx.init(theta), theta)
    uf, _ = fast.tx.update(grads, fast.tx.init(theta), theta)
    side = map_with_path(lambda p, x: not is_hidden_matrix(p, x), theta)
    for s, a, b in zip(jax.tree.leaves(side), jax.tree.leaves(ub), jax.tree.leaves(uf)):
        np.testing.assert_allclose(b, a * 4.0 if s else a, rtol=1e-5, atol=1e-9)


def test_global_cosine_spans_the_real_number_of_outer_steps():
    cfg = config_from_dict({**TINY, "train": {**TINY["train"], "steps": 7},
                            "methods": [{"name": "gn", "inner_steps": 2, "inner_schedule": "global_cosine"}]})
    run = prepare(cfg, "gn")
    assert run.method.total_steps == 7
    lrs = [run.method.lr(s) for s in range(7)]
    assert lrs[0] == pytest.approx(0.01) and all(a > b for a, b in zip(lrs, lrs[1:]))
    last = float(inner_lr_factor("global_cosine", jnp.asarray(6), jnp.asarray(1), 2, 7, 0.0))
    assert 0 < last < 0.05          # the cosine ends at the run's last inner step, not at a default horizon


def test_gn_token_and_cost_accounting(tmp_path):
    cfg = config_from_dict(TINY)
    summary = train(cfg, "gn", tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    b_inner, seq = 2, 16
    for i, r in enumerate(rows[1:], 1):
        assert r["tokens"] == i * 2 * b_inner * seq                # N inner batches of b_inner
        assert r["aux_tokens"] == i * 3 * b_inner * seq            # ls_batches, kept apart
        assert r["updates"] == i * 2
    per_step = rows[1]["grad_evals"]
    assert per_step == pytest.approx(summary["grad_evals_per_step"])
    assert summary["tokens"] == 3 * 2 * b_inner * seq and summary["aux_tokens"] == 3 * 3 * b_inner * seq


def test_ls_extend_chunks_are_counted():
    m = _method(inner_steps=2, ls_grid=2, ls_extend=3, inner_learning_rate=5.0)
    theta = init_params(CFG, jax.random.PRNGKey(0))
    _, _, metrics = m.step(theta, m.init(theta), _batches(1, 2), _batches(2, 2), jax.random.PRNGKey(0))
    assert metrics["grad_evals"] == pytest.approx(m._cost(int(metrics["ls_evals"])))
    if int(metrics["ls_evals"]) > 3:
        assert metrics["grad_evals"] > m.grad_evals_per_step


def test_ema_decays_once_per_sequential_update(tmp_path):
    cfg = config_from_dict({**TINY, "train": {**TINY["train"], "ema_decay": 0.9}})
    sess = setup(prepare(cfg, "gn"), tmp_path)
    a = {"w": jnp.zeros(())}
    b = {"w": jnp.ones(())}
    out = sess.ema_update(a, b)
    assert float(out["w"]) == pytest.approx(1 - 0.9 ** 2)           # N = 2 inner updates per outer step


def test_rejected_step_keeps_theta(monkeypatch):
    m = _method(inner_steps=2)
    theta = init_params(CFG, jax.random.PRNGKey(0))
    far = jax.tree.map(lambda x: x + 1e3, theta)     # a wild inner solution: Q predicts an increase
    new, rejected, metrics = m._search(theta, far, _batches(2, 2))
    assert bool(rejected) and float(metrics["alpha"]) == 0.0 and float(metrics["pred_decrease"]) <= 0
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(theta)):
        np.testing.assert_array_equal(a, b)


def test_divergence_is_loud(tmp_path, capsys):
    raw = {**TINY, "train": {**TINY["train"], "steps": 6},
           "methods": [{"name": "sgd", "learning_rate": 1e30, "grad_clip": 0.0}]}
    cfg_path = tmp_path / "c.yaml"
    import yaml
    cfg_path.write_text(yaml.safe_dump(raw))
    status = cli.main(["train", str(cfg_path), "--method", "sgd", "--workdir", str(tmp_path / "run")])
    assert status == cli.DIVERGED
    err = capsys.readouterr().err
    assert "diverged" in err and len(err.strip().splitlines()) == 1
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["diverged"] and summary["steps"] >= 1 and summary["tokens"] == summary["steps"] * 4 * 16
    assert not (tmp_path / "run" / "final_params").exists()


def test_validation_above_the_initial_by_the_margin_diverges(tmp_path):
    raw = {**TINY, "train": {**TINY["train"], "steps": 8, "divergence_margin": 0.5},
           "methods": [{"name": "adamw", "learning_rate": 1.0, "schedule": "constant"}]}
    summary = train(config_from_dict(raw), "adamw", tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert summary["diverged"] and "divergence_margin" in summary["divergence"]
    assert rows[-1]["diverged"] and rows[-1]["val_loss"] > rows[0]["val_loss"] + 0.5
    assert summary["steps"] == rows[-1]["step"] < 8 and summary["tokens"] == rows[-1]["tokens"] > 0
    relaxed = train(config_from_dict({**raw, "train": {**raw["train"], "divergence_margin": 0.0}}), "adamw",
                    tmp_path / "relaxed")
    assert not relaxed["diverged"] and relaxed["steps"] == 8     # 0 = only non-finite values count


def test_notes_and_summary_tell_rejected_steps_from_small_steps():
    m = _method(inner_steps=2)
    rejected = {"step_rejected": 1.0, "ls_at_edge": 1.0, "alpha": 0.0, "pred_decrease": -0.01}
    edge = {"step_rejected": 0.0, "ls_at_edge": 1.0, "alpha": 0.25, "pred_decrease": 0.01}
    first = m.notes(3, rejected)
    assert len(first) == 1 and "rejected" in first[0] and m.notes(4, rejected) == []      # once
    small = m.notes(5, edge)
    assert len(small) == 1 and "smallest line-search step" in small[0]
    summary = m.summarize([{"step": 1, **rejected}, {"step": 2, **edge}, {"step": 3, **edge, "ls_at_edge": 0.0}])
    assert summary["rejected_steps"] == 1 and summary["ls_at_edge_steps"] == 2


def test_a_step_that_raises_the_line_search_loss_is_noted_or_rejected(monkeypatch):
    """The paper's rule takes the best α even when it raises the loss on the line-search batches
    (as on the H200 check, docs/device_check.md); with ls_reject_increase the step is rejected."""
    import gn.methods.gauss_newton as gnm

    real = gnm.line_search

    def worse(*args, **kwargs):      # the same search, with every evaluated loss 1.0 higher than at θ_t
        r = real(*args, **kwargs)
        return r._replace(loss=r.loss0 + 1.0)

    monkeypatch.setattr(gnm, "line_search", worse)
    theta = init_params(CFG, jax.random.PRNGKey(0))
    for reject in (False, True):
        m = _method(inner_steps=2, inner_learning_rate=0.05, ls_reject_increase=reject)
        hat, _, _ = m._inner(theta, m.init(theta), _batches(1, 2))
        new, rejected, metrics = m._search(theta, hat, _batches(2, 2))
        metrics = {k: float(v) for k, v in metrics.items()}
        assert metrics["pred_decrease"] > 0                       # the model alone would accept it
        assert bool(rejected) is reject
        if reject:
            assert metrics["alpha"] == 0.0 and metrics["actual_decrease"] == 0.0
            for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(theta)):
                np.testing.assert_array_equal(a, b)
            assert "ls_reject_increase" in m.notes(1, metrics)[0]
        else:
            assert metrics["alpha"] > 0 and metrics["actual_decrease"] == pytest.approx(-1.0)
            (note,) = m.notes(1, metrics)
            assert "raised the line-search loss by 1" in note and m.notes(2, metrics) == []   # once
