"""Initialisation: per-leaf slices reproduce the single normal draw exactly, the
distributions are the paper's, and compilation does not grow with depth."""

from __future__ import annotations

import contextlib
import math

import jax
import jax.extend.random as jex_random
import jax.numpy as jnp
import numpy as np
import pytest

from gn.model import init_params, model_config
from gn.model import init as model_init
from gn.model.llama import Llama


def _specs(cfg):
    shapes = jax.eval_shape(Llama(cfg).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    leaves, _ = jax.tree_util.tree_flatten_with_path(shapes)
    return tuple((path[-1].key, tuple(leaf.shape)) for path, leaf in leaves)


@contextlib.contextmanager
def _config(name, value):
    old = getattr(jax.config, name)
    jax.config.update(name, value)
    try:
        yield
    finally:
        jax.config.update(name, old)


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x.astype(jnp.float32)), np.asarray(y.astype(jnp.float32)))


# Fan-ins 48, 96 and 192 are not powers of two, so a reassociated 1/sqrt(fan_in)
# scale would show up in the last bit.
@pytest.mark.parametrize("overrides", [
    dict(hidden=48, heads=4, ffn=96),
    dict(hidden=48, heads=4, ffn=192, mlp="gelu", qk_norm=True, layers=3),
    dict(hidden=48, heads=4, ffn=96, dtype="bfloat16"),
])
def test_sliced_draw_is_the_single_draw_bit_for_bit(overrides):
    cfg = model_config("nano", vocab_size=300, **overrides)
    specs = _specs(cfg)
    for rng in (jax.random.key(3), jax.random.PRNGKey(11)):
        _assert_same(model_init.draw_leaves(rng, specs, cfg.dtype),
                     model_init._draw_all_at_once(rng, specs, cfg.dtype))


def test_sliced_draw_float64():
    with _config("jax_enable_x64", True):
        cfg = model_config("nano", vocab_size=100, hidden=48, heads=4, ffn=96, dtype="float64")
        specs = _specs(cfg)
        rng = jax.random.key(5)
        _assert_same(model_init.draw_leaves(rng, specs, cfg.dtype),
                     model_init._draw_all_at_once(rng, specs, cfg.dtype))


def test_offset_bits_match_jax_bits_and_carry():
    key = jax.random.key(9)
    raw = jax.random.key_data(key)
    ref = jax.random.bits(key, (1000,), jnp.uint32)
    shifted = jax.random.wrap_key_data(jnp.concatenate([raw, jnp.array([0, 123], jnp.uint32)]),
                                       impl=model_init._OFFSET_THREEFRY)
    np.testing.assert_array_equal(np.asarray(jax.random.bits(shifted, (20,), jnp.uint32)),
                                  np.asarray(ref[123:143]))
    # A counter crossing 2**32 carries into the high word.
    lo0 = 2 ** 32 - 2
    near = jax.random.wrap_key_data(jnp.concatenate([raw, jnp.array([0, lo0], jnp.uint32)]),
                                    impl=model_init._OFFSET_THREEFRY)
    hi = jnp.array([0, 0, 1, 1], jnp.uint32)
    lo = jnp.array([lo0, lo0 + 1, 0, 1], jnp.uint32)
    b1, b2 = jex_random.threefry2x32_p.bind(raw[0], raw[1], hi, lo)
    np.testing.assert_array_equal(np.asarray(jax.random.bits(near, (4,), jnp.uint32)), np.asarray(b1 ^ b2))


def test_fallback_without_partitionable_threefry():
    cfg = model_config("nano", vocab_size=64)
    with _config("jax_threefry_partitionable", False):
        assert not model_init._slices_apply(jax.random.key(0))
        p = init_params(cfg, jax.random.key(0))
        specs = _specs(cfg)
        _assert_same(jax.tree.leaves(p), model_init._draw_all_at_once(jax.random.key(0), specs, cfg.dtype))


def test_init_compiles_once_per_leaf_shape_not_per_layer():
    model_init._draw_slice.clear_cache()
    init_params(model_config("nano", vocab_size=200, layers=2), jax.random.key(0))
    shallow = model_init._draw_slice._cache_size()
    init_params(model_config("nano", vocab_size=200, layers=7), jax.random.key(1))
    assert model_init._draw_slice._cache_size() == shallow
    # embedding, wq=wk=wv=wo (D, D), w_gate=w_up (D, F), w_down (F, D), lm_head.
    assert shallow == 5


def test_init_distribution_per_leaf():
    """Every kernel ~ N(0, 1/fan_in), the embedding ~ N(0, 1) (mean and std of
    each leaf within 5 standard errors); scales 1, biases 0; deterministic in the key."""
    cfg = model_config("nano", vocab_size=1024, hidden=128, heads=4, ffn=384, layers=2,
                       mlp="gelu", qk_norm=True)
    p = init_params(cfg, jax.random.key(2))
    for path, leaf in jax.tree_util.tree_flatten_with_path(p)[0]:
        name = path[-1].key
        x = np.asarray(leaf, np.float64)
        if name in ("scale", "bias"):
            np.testing.assert_array_equal(x, 1.0 if name == "scale" else 0.0)
            continue
        sigma = 1.0 if name == "embedding" else 1.0 / math.sqrt(x.shape[0])
        n = x.size
        assert abs(x.mean()) < 5 * sigma / math.sqrt(n), (path, x.mean())
        assert abs(x.std() / sigma - 1) < 5 * math.sqrt(0.5 / n), (path, x.std() / sigma)
    q = init_params(cfg, jax.random.key(2))
    _assert_same(jax.tree.leaves(p), jax.tree.leaves(q))
    r = init_params(cfg, jax.random.key(3))
    assert not np.array_equal(np.asarray(p["block_1"]["mlp"]["w_up"]["kernel"]),
                              np.asarray(r["block_1"]["mlp"]["w_up"]["kernel"]))
    # Leaves are distinct slices of the draw, not repeats of one another.
    assert not np.array_equal(np.asarray(p["block_0"]["attn"]["wq"]["kernel"]),
                              np.asarray(p["block_0"]["attn"]["wk"]["kernel"]))
