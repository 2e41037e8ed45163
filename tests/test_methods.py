"""The method layer: typed hyperparameters, the registry, path rules and the public optax API."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gn import curvature, optim
from gn.config import load_config
from gn.errors import ConfigError
from gn.methods import registry
from gn.paths import is_hidden_matrix, param_name
from gn.optim.masks import decay_mask, matrix_mask

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("entry, key", [
    ({"name": "muon", "adam_learning_rate": "fast"}, "adam_learning_rate"),
    ({"name": "rprop", "schedule": "cosine"}, "schedule"),
    ({"name": "rprop", "warmup_steps": 3}, "warmup_steps"),
    ({"name": "gn", "inner_solver": "cg", "inner_optimizer": "adamw"}, "inner_optimizer"),
    ({"name": "gn", "inner_solver": "cg", "warm_start": False}, "warm_start"),
    ({"name": "gn", "inner_solver": "cg", "inner_schedule": "constant"}, "inner_schedule"),
    ({"name": "gn", "inner_optimizer": "sophia"}, "inner_optimizer"),
    ({"name": "gn", "inner_optimizer": "fog"}, "inner_optimizer"),
    ({"name": "gn", "inner_adam_learning_rate": 0}, "inner_adam_learning_rate"),
    ({"name": "pi_muon_gn", "T_inv": 3}, "T_inv"),
    ({"name": "soap", "eigenbasis_update": "svd"}, "eigenbasis_update"),
    ({"name": "adamw", "b1": True}, "b1"),
    ({"name": "lwgn", "partition": "per_layer"}, "partition"),
])
def test_rejected_options_name_the_key(entry, key):
    with pytest.raises(ConfigError, match=rf"methods\.{entry['name']}\.{key}"):
        registry.resolve_entry(entry)


def test_entry_holds_the_typed_config_and_round_trips():
    entry = registry.resolve_entry({"name": "g", "method": "gn", "inner_steps": 4, "inner_solver": "cg"})
    assert isinstance(entry.hparams, registry.get("gn")) and entry.hparams.inner_steps == 4
    dumped = entry.to_dict()
    assert "inner_optimizer" not in dumped and dumped["inner_solver"] == "cg"   # unused keys left out
    assert registry.resolve_entry(dumped) == entry
    with pytest.raises(dataclasses.FrozenInstanceError):
        entry.hparams.inner_steps = 3


def test_every_registered_method_has_documented_typed_options():
    for name in registry.names():
        cls = registry.get(name)
        assert cls.name == name and cls.description and cls.family
        for key, tp, _, doc in cls.options():
            assert doc, f"{name}.{key} has no documentation"
        text = registry.describe_options(name)
        assert all(k in text for k, *_ in cls.options())


def test_set_overrides_a_method_option():
    cfg = load_config(ROOT / "configs/quickstart.yaml",
                      overrides=["methods.gn.inner_steps=4", "methods.muon_small_batch.batch_size=4",
                                 "methods.sgd.momentum=0.5"])
    assert cfg.method("gn").hparams.inner_steps == 4
    assert cfg.method("muon_small_batch").batch_size == 4
    assert cfg.method("sgd").hparams.momentum == 0.5      # a registered method not listed: entry added
    with pytest.raises(ConfigError, match="no method 'gnn'"):
        load_config(ROOT / "configs/quickstart.yaml", overrides=["methods.gnn.inner_steps=4"])
    with pytest.raises(ConfigError, match="inner_step'"):
        load_config(ROOT / "configs/quickstart.yaml", overrides=["methods.gn.inner_step=4"])


def test_paths_strip_the_flax_wrapper():
    tree = {"embed": {"embedding": jnp.zeros((8, 4))}, "block_0": {"mlp": {"kernel": jnp.zeros((4, 4)),
                                                                             "bias": jnp.zeros((4,))}},
            "lm_head": {"kernel": jnp.zeros((4, 8))}}
    bare, wrapped = matrix_mask(tree), matrix_mask({"params": tree})
    assert bare == wrapped["params"]
    assert bare == {"embed": {"embedding": False}, "block_0": {"mlp": {"kernel": True, "bias": False}},
                 "lm_head": {"kernel": False}}
    assert decay_mask({"params": tree}, ["block_*/mlp/*"])["params"]["block_0"]["mlp"]["bias"]
    assert not is_hidden_matrix("params/lm_head/kernel", jnp.zeros((4, 8)))
    path = jax.tree_util.tree_flatten_with_path({"params": tree})[0][0][0]
    assert not param_name(path).startswith("params/")
    labels, blocks = curvature.make_partition({"params": tree}, "top_level")
    assert blocks == ["block_0", "embed", "lm_head"]


def test_muon_refuses_non_matrix_leaves_with_a_clear_error():
    tx = optim.scale_by_muon()
    with pytest.raises(ValueError, match="Dense_0/bias"):
        tx.init({"Dense_0": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros((4,))}})
    routed = optim.with_adamw_side(tx, 0.1)   # biases go to the AdamW side
    params = {"block": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones((4,))}}
    state = routed.init(params)
    updates, _ = routed.update(jax.tree.map(jnp.ones_like, params), state, params)
    assert jnp.all(jnp.isfinite(updates["block"]["bias"]))


def test_custom_loss_matches_the_closed_form_ones():
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.normal(size=(5, 7)))
    y = jnp.asarray(rng.integers(0, 7, size=5))
    v = jnp.asarray(rng.normal(size=(5, 7)))
    ce = lambda out, t, m: jnp.mean(jax.nn.logsumexp(out, -1) - jnp.take_along_axis(out, t[:, None], -1)[:, 0])
    auto = curvature.output_curvature(z, y, None, ce)
    ref = curvature.output_curvature(z, y, None, "cross_entropy")
    np.testing.assert_allclose(auto.value, ref.value, rtol=1e-6)          # float32: autodiff vs closed form
    np.testing.assert_allclose(auto.grad, ref.grad, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(auto.hvp(v), ref.hvp(v), rtol=1e-5, atol=1e-7)
    given = curvature.CustomLoss(ce, hvp=lambda out, t, m, vec: 2.0 * vec)   # the user's H_z is used as given
    np.testing.assert_allclose(curvature.output_curvature(z, y, None, given).hvp(v), 2.0 * v)


def test_masked_non_finite_logits_stay_out_of_gz_and_hz():
    z = jnp.array([[0.0, 1.0, 2.0], [jnp.nan, jnp.inf, 0.0]])
    y = jnp.array([1, 0])
    mask = jnp.array([1.0, 0.0])
    c = curvature.output_curvature(z, y, mask)
    clean = curvature.output_curvature(z[:1], y[:1], mask[:1])
    assert jnp.all(jnp.isfinite(c.grad)) and jnp.all(jnp.isfinite(c.hvp(jnp.ones_like(z))))
    np.testing.assert_allclose(c.grad[0], clean.grad[0], rtol=1e-6)
    np.testing.assert_allclose(c.hvp(jnp.ones_like(z))[0], clean.hvp(jnp.ones((1, 3)))[0], rtol=1e-6)


def test_gn_methods_cli_prints_options():
    out = subprocess.run([sys.executable, "-m", "gn.cli", "methods", "gn_layerwise"], capture_output=True,
                         text=True, cwd=ROOT, check=True).stdout
    assert "inner_steps" in out and "'transformer_blocks'" in out and "ls_grid" in out


def test_example_trains_with_layerwise_gn_in_an_optax_chain():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import lwgn_mlp
    finally:
        sys.path.pop(0)
    first, last = lwgn_mlp.main(steps=5)
    assert last < 0.3 * first


def test_optim_imports_no_trainer_model_or_registry():
    code = ("import sys, gn.optim; bad = [m for m in sys.modules if m.startswith(('gn.train', 'gn.model', "
            "'gn.methods', 'gn.config', 'orbax'))]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"
