"""Layerwise GN as a g_fisher backend, against dense block-diagonal solves."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from optax import contrib

from gn import curvature, optim
from gn.model import init_params, make_apply
from tests.tiny_models import micro
from gn.optim._lwgn import _restricted_partition, fog_gn, layerwise_gn_direction
from gn.optim.masks import is_hidden_matrix, map_with_path
from gn.curvature.objective import split_batch
from tests.dense_reference import block_diagonal, dense_ggn

CFG = micro()
APPLY = make_apply(CFG)


def _setup(seed=0):
    params = init_params(CFG, jax.random.PRNGKey(seed))
    batch = jnp.asarray(np.random.default_rng(seed).integers(0, 16, size=(3, 7)), jnp.int32)
    return params, batch


@pytest.mark.parametrize("partition", ["per_tensor", "transformer_blocks"])
def test_layerwise_direction_equals_dense_block_diagonal_solve(partition):
    params, batch = _setup()
    G, g, _ = dense_ggn(APPLY, params, batch)
    labels, blocks = curvature.make_partition(params, partition)
    ids = jax.tree.map(lambda lab, x: jnp.full(x.shape, blocks.index(lab), jnp.float32), labels, params)
    flat_ids = ravel_pytree(ids)[0]
    lam = 1e-2
    want = jnp.linalg.solve(block_diagonal(G, flat_ids) + lam * jnp.eye(G.shape[0]), g)
    x, y = split_batch(batch)
    grads = jax.grad(lambda p: curvature.mean_loss(APPLY(p, x), y))(params)
    got = optim.layerwise_gn_direction(APPLY, params, x, y, grads, partition=partition, damping=lam,
                                       max_iters=150, tol=1e-10)
    got = ravel_pytree(got)[0]
    # float32 CG against a float32 dense solve: measured max |got − want| / max |want| = 1.4e-6 (per_tensor),
    # 8.5e-6 (transformer_blocks), relative L2 1.1e-6 / 5.7e-6 (jax 0.10, CPU); asserted 1e-4. (Elementwise
    # relative errors reach 1e-2 on entries near zero, which is why the test reads errors against the scale.)
    err = jnp.abs(got - want)
    assert float(err.max()) <= 1e-4 * float(jnp.abs(want).max())
    assert float(jnp.linalg.norm(got - want)) <= 1e-4 * float(jnp.linalg.norm(want))
    # The full (non-block) solve is different: the test can tell the two apart.
    full = jnp.linalg.solve(G + lam * jnp.eye(G.shape[0]), g)
    assert float(jnp.abs(full - want).max()) > 10 * float(jnp.abs(got - want).max())


def test_fog_gn_is_muon_applied_to_the_layerwise_direction():
    """fog_gn = Muon(LwGN⁻¹ g): the same direction (the same restricted partition,
    the same 30-iteration float32 solve) fed to contrib.muon gives fog_gn's update.

    Both sides run the same operations eagerly; measured difference 0 (jax 0.10.2,
    CPU). The 1e-6 relative tolerance leaves room for an op-order change only: two
    *independent* unconverged float32 solves (e.g. per_tensor over all leaves, whose
    batched block product has a different vmap width) differ by up to 1e-3 after
    Newton-Schulz, which is why this test does not compare against one.
    """
    params, batch = _setup(1)
    x, y = split_batch(batch)
    grads = jax.grad(lambda p: curvature.mean_loss(APPLY(p, x), y))(params)
    tx = fog_gn(0.1, APPLY, damping=1e-2, max_iters=30, adam_nesterov=True)   # contrib.muon's AdamW side
    upd, _ = tx.update(grads, tx.init(params), params, inputs=x, targets=y)
    part = _restricted_partition(is_hidden_matrix, "per_tensor")
    nat = layerwise_gn_direction(APPLY, params, x, y, grads, partition=part, damping=1e-2, max_iters=30)
    mixed = jax.tree.map(lambda k, d, g: d if k else g, map_with_path(is_hidden_matrix, grads), nat, grads)
    dims = lambda p: map_with_path(lambda path, x: contrib.MuonDimensionNumbers() if is_hidden_matrix(path, x)
                                   else None, p)
    muon = contrib.muon(0.1, muon_weight_dimension_numbers=dims, adam_b2=0.95)
    want, _ = muon.update(mixed, muon.init(params), params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9), upd, want)


def test_restricted_partition_solves_the_hidden_blocks_like_per_tensor():
    """The restricted partition (hidden matrices per tensor, the rest one block) leaves
    each hidden matrix's block solve unchanged: converged (tol 1e-12, 200 iterations),
    it equals the per_tensor solve there. Measured: 1.3e-6 of the largest entry
    (float32 rounding); tolerance 1e-4. The rest block differs (it couples leaves)."""
    params, batch = _setup(1)
    x, y = split_batch(batch)
    grads = jax.grad(lambda p: curvature.mean_loss(APPLY(p, x), y))(params)
    kw = dict(damping=1e-2, max_iters=200, tol=1e-12)
    full = layerwise_gn_direction(APPLY, params, x, y, grads, partition="per_tensor", **kw)
    part = layerwise_gn_direction(APPLY, params, x, y, grads,
                                  partition=_restricted_partition(is_hidden_matrix, "per_tensor"), **kw)
    hidden = map_with_path(is_hidden_matrix, grads)
    assert any(jax.tree.leaves(hidden))
    for k, a, b in zip(jax.tree.leaves(hidden), jax.tree.leaves(part), jax.tree.leaves(full)):
        if k:
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * float(jnp.abs(b).max()))


def test_curvature_batch_solves_with_the_first_k_sequences_and_the_whole_gradient():
    """curvature_batch k: G from the batch's first k sequences, g from the whole batch. Against a
    dense block-diagonal solve with G of those k sequences (float32 CG, 150 iterations, tol 1e-10):
    measured max error / max |want| 2e-6; asserted 1e-4. The whole-batch G gives another direction
    (asserted 10x further away), so the test sees the slice."""
    params, _ = _setup()
    batch = jnp.asarray(np.random.default_rng(3).integers(0, 16, size=(6, 7)), jnp.int32)
    x, y = split_batch(batch)
    grads = jax.grad(lambda p: curvature.mean_loss(APPLY(p, x), y))(params)
    lam, k = 1e-2, 2
    G_k, _, _ = dense_ggn(APPLY, params, batch[:k])
    labels, blocks = curvature.make_partition(params, "per_tensor")
    ids = ravel_pytree(jax.tree.map(lambda lab, p: jnp.full(p.shape, blocks.index(lab), jnp.float32),
                                    labels, params))[0]
    g = ravel_pytree(grads)[0]
    want = jnp.linalg.solve(block_diagonal(G_k, ids) + lam * jnp.eye(g.shape[0]), g)
    tx = optim.scale_by_layerwise_gn(APPLY, damping=lam, max_iters=150, tol=1e-10, curvature_batch=k)
    got = ravel_pytree(tx.update(grads, tx.init(params), params, inputs=x, targets=y)[0])[0]
    scale = float(jnp.abs(want).max())
    assert float(jnp.abs(got - want).max()) <= 1e-4 * scale
    whole = tx_whole = optim.scale_by_layerwise_gn(APPLY, damping=lam, max_iters=150, tol=1e-10)
    whole = ravel_pytree(tx_whole.update(grads, tx_whole.init(params), params, inputs=x, targets=y)[0])[0]
    assert float(jnp.abs(whole - want).max()) > 10 * float(jnp.abs(got - want).max())
    too_big = optim.scale_by_layerwise_gn(APPLY, curvature_batch=7)
    with pytest.raises(ValueError, match="larger than the step's batch"):
        too_big.update(grads, too_big.init(params), params, inputs=x, targets=y)


def test_layerwise_gn_cost_counts_a_primal_and_a_tangent_transpose_per_block_and_iteration():
    params, _ = _setup()
    blocks = len(curvature.make_partition(params, _restricted_partition(is_hidden_matrix, "per_tensor"))[1])
    hidden = sum(map(bool, jax.tree.leaves(map_with_path(is_hidden_matrix, params))))
    assert blocks == hidden + 1                      # each hidden matrix, and the rest as one block
    assert optim.layerwise_gn_cost(params, max_iters=5, only=is_hidden_matrix) == (2 + 8 * blocks * 5) / 6
    n_leaves = len(jax.tree.leaves(params))
    assert optim.layerwise_gn_cost(params, max_iters=3) == (2 + 8 * n_leaves * 3) / 6


@pytest.mark.parametrize("method,iters_key", [("fog_gn", "max_iters"), ("lwgn", "max_iters"),
                                              ("pi_muon_gn", "lwgn_iters")])
def test_backends_count_their_solve_in_compute(method, iters_key):
    """A method with a layerwise-GN backend counts its CG products in grad_evals_per_step:
    1 (the gradient) + k/B · layerwise_gn_cost, at the step's batch; one without counts 1."""
    from gn.errors import ConfigError
    from gn.methods import registry
    from gn.methods.base import MethodContext
    from gn.optim import kernels_only
    params, _ = _setup()
    ctx = MethodContext(apply_fn=APPLY, total_steps=4, batch_size=8, model_cfg=CFG)
    entry = registry.resolve_entry({"name": method, iters_key: 3, "curvature_batch": 2})
    m = entry.build(ctx)
    m.init(params)
    only = {"fog_gn": is_hidden_matrix, "lwgn": None, "pi_muon_gn": kernels_only(False)}[method]
    part = "transformer_blocks" if method == "lwgn" else "per_tensor"
    solve = optim.layerwise_gn_cost(params, partition=part, max_iters=3, only=only)
    assert solve > 5
    assert m.grad_evals_per_step == pytest.approx(1.0 + solve * 2 / 8, rel=1e-12)
    whole = registry.resolve_entry({"name": method, iters_key: 3}).build(ctx)
    whole.init(params)
    assert whole.grad_evals_per_step == pytest.approx(1.0 + solve, rel=1e-12)
    plain = registry.resolve_entry({"name": "muon"}).build(ctx)
    plain.init(params)
    assert plain.grad_evals_per_step == 1.0
    with pytest.raises(ConfigError, match="curvature_batch.*larger than the step's batch"):
        registry.resolve_entry({"name": method, "curvature_batch": 9}).build(ctx)
    with pytest.raises(ConfigError, match="curvature_batch"):
        registry.resolve_entry({"name": method, "curvature_batch": -1})
