"""Tests of the LLaMA-style model: components against numpy, structure, counts, hooks."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gn.errors import ConfigError
from gn.model import (
    ModelConfig,
    apply_rope,
    apply_with_layer_stats,
    count_params,
    init_params,
    init_perturbations,
    make_apply,
    model_config,
    rms_norm,
)

NANO = model_config("nano", vocab_size=512)


@pytest.fixture(scope="module")
def nano_params():
    return init_params(NANO, jax.random.key(0))


def _tokens(batch, seq, vocab, seed=1):
    return jax.random.randint(jax.random.key(seed), (batch, seq), 0, vocab, dtype=jnp.int32)


def _n_params(params):
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))


@contextlib.contextmanager
def _x64():
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", old)


# ---------------------------------------------------------------- components

def test_rope_golden_values():
    theta = 100.0
    x = np.array([[1.0, 2.0, 3.0, 4.0],
                  [0.5, -1.0, 2.0, 0.25],
                  [-3.0, 1.5, 0.0, 2.0]], dtype=np.float64)  # (T=3, hd=4)
    want = np.empty_like(x)
    half = 2
    for pos in range(3):
        for i in range(half):
            angle = pos * theta ** (-2.0 * i / 4)
            c, s = np.cos(angle), np.sin(angle)
            a, b = x[pos, i], x[pos, i + half]
            want[pos, i] = a * c - b * s
            want[pos, i + half] = b * c + a * s
    got = apply_rope(jnp.asarray(x[None, :, None, :], jnp.float32), theta)[0, :, 0, :]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)
    # Position 0 is the identity; position 1, pair 0 is a rotation by exactly 1 radian.
    np.testing.assert_allclose(np.asarray(got[0]), x[0], atol=1e-7)
    np.testing.assert_allclose(float(got[1, 0]), 0.5 * np.cos(1) - 2.0 * np.sin(1), rtol=1e-6)


def test_rope_preserves_norm_and_is_relative():
    hd, t = 8, 12
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, t, 3, hd)), jnp.float32)
    y = apply_rope(x)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    # Same q and k vectors placed at every position: q_m . k_n depends only on m - n.
    q, k = rng.normal(size=hd), rng.normal(size=hd)
    rq = np.asarray(apply_rope(jnp.broadcast_to(jnp.asarray(q, jnp.float32), (1, t, 1, hd))))[0, :, 0]
    rk = np.asarray(apply_rope(jnp.broadcast_to(jnp.asarray(k, jnp.float32), (1, t, 1, hd))))[0, :, 0]
    dots = rq @ rk.T
    for delta in (-3, 0, 2, 5):
        diag = np.diagonal(dots, offset=-delta)  # entries with m - n == delta
        np.testing.assert_allclose(diag, diag[0], rtol=1e-4, atol=1e-5)
    assert not np.allclose(np.diagonal(dots, 0)[0], np.diagonal(dots, -2)[0])


def test_rms_norm_golden():
    x = np.array([[1.0, -2.0, 3.0, 0.5], [0.0, 0.0, 0.0, 1e-3]])
    scale = np.array([1.0, 0.5, 2.0, -1.0])
    eps = 1e-5
    want = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * scale
    got = rms_norm(jnp.asarray(x, jnp.float32), jnp.asarray(scale, jnp.float32), eps)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- model

def test_param_tree_layout(nano_params):
    p = nano_params
    assert type(p) is dict and type(p["block_0"]["attn"]) is dict
    assert set(p) == {"embed", "block_0", "block_1", "final_norm", "lm_head"}
    d, f, v = NANO.hidden, NANO.ffn, NANO.vocab_size
    assert p["embed"]["embedding"].shape == (v, d)
    assert p["lm_head"]["kernel"].shape == (d, v)
    assert p["final_norm"]["scale"].shape == (d,)
    b = p["block_1"]
    assert set(b) == {"attn_norm", "attn", "mlp_norm", "mlp"}
    assert {k: b["attn"][k]["kernel"].shape for k in b["attn"]} == {
        "wq": (d, d), "wk": (d, d), "wv": (d, d), "wo": (d, d)}
    assert {k: b["mlp"][k]["kernel"].shape for k in b["mlp"]} == {
        "w_gate": (d, f), "w_up": (d, f), "w_down": (f, d)}
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(p))


def test_forward_shape_and_causality(nano_params):
    apply = jax.jit(make_apply(NANO))
    tokens = _tokens(2, 16, NANO.vocab_size)
    logits = apply(nano_params, tokens)
    assert logits.shape == (2, 16, NANO.vocab_size) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    t = 9
    changed = tokens.at[:, t].set((tokens[:, t] + 7) % NANO.vocab_size)
    logits2 = apply(nano_params, changed)
    np.testing.assert_array_equal(np.asarray(logits[:, :t]), np.asarray(logits2[:, :t]))
    diff = jnp.abs(logits - logits2).max(axis=-1)  # (B, T)
    assert bool(jnp.all(diff[:, t:] > 1e-6))


def test_gqa_equals_mha_with_tiled_kv():
    gqa = model_config("nano", vocab_size=64, heads=4, kv_heads=2, layers=1, hidden=32, ffn=64)
    mha = model_config("nano", vocab_size=64, heads=4, layers=1, hidden=32, ffn=64)
    p = init_params(gqa, jax.random.key(3))
    hd, g = gqa.head_dim, gqa.heads // gqa.n_kv_heads
    assert p["block_0"]["attn"]["wk"]["kernel"].shape == (32, 2 * hd)

    def tile(kernel):  # (D, KV*hd) -> (D, H*hd), query head h reads kv head h // g
        d = kernel.shape[0]
        return jnp.repeat(kernel.reshape(d, -1, hd), g, axis=1).reshape(d, -1)

    p_mha = jax.tree.map(lambda a: a, p)
    for name in ("wk", "wv"):
        p_mha["block_0"]["attn"][name] = {"kernel": tile(p["block_0"]["attn"][name]["kernel"])}
    tokens = _tokens(2, 10, 64)
    out_gqa = jax.jit(make_apply(gqa))(p, tokens)
    out_mha = jax.jit(make_apply(mha))(p_mha, tokens)
    np.testing.assert_allclose(np.asarray(out_gqa), np.asarray(out_mha), rtol=1e-5, atol=1e-5)
    assert count_params(gqa) == _n_params(p) < count_params(mha)


def test_float64_model():
    with _x64():
        cfg = model_config("nano", vocab_size=32, hidden=16, layers=1, heads=2, ffn=32, dtype="float64")
        p = init_params(cfg, jax.random.key(0))
        assert all(a.dtype == jnp.float64 for a in jax.tree.leaves(p))
        logits = jax.jit(make_apply(cfg))(p, _tokens(1, 5, 32))
        assert logits.dtype == jnp.float64


def test_dense_matmuls_are_2d(nano_params):
    """Performance contract: no dense weight matmul runs on a 3-D activation."""
    apply = make_apply(NANO)
    tokens = _tokens(2, 8, NANO.vocab_size)
    jaxpr = jax.make_jaxpr(jax.grad(lambda p: apply(p, tokens).sum()))(nano_params)
    unbatched = []

    def walk(jp):
        for eqn in jp.eqns:
            if eqn.primitive.name == "dot_general":
                (_, _), (lb, _) = eqn.params["dimension_numbers"]
                if not lb:
                    unbatched.append([v.aval.ndim for v in eqn.invars])
            for val in eqn.params.values():
                for sub in val if isinstance(val, (tuple, list)) else (val,):
                    if hasattr(sub, "eqns"):
                        walk(sub)
                    elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                        walk(sub.jaxpr)

    walk(jaxpr.jaxpr)
    # 7 dense layers per block + head, forward and two gradient matmuls each.
    assert len(unbatched) >= 3 * (7 * NANO.layers + 1)
    assert all(nd == [2, 2] for nd in unbatched), unbatched


# ---------------------------------------------------------------- parameter counts

def _count_formula(d, layers, heads, kv_heads, ffn, vocab):
    hd = d // heads
    block = 2 * d * heads * hd + 2 * d * kv_heads * hd + 3 * d * ffn + 2 * d
    non_emb = layers * block + d
    return non_emb + 2 * vocab * d, non_emb


@pytest.mark.parametrize("cfg", [
    NANO,
    model_config("tiny", vocab_size=4096),
    model_config("nano", vocab_size=100, heads=8, kv_heads=2),
], ids=["nano", "tiny", "gqa"])
def test_count_params_matches_init(cfg):
    shapes = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
    n_total = _n_params(shapes)
    assert count_params(cfg) == n_total
    emb = 2 * cfg.vocab_size * cfg.hidden
    assert count_params(cfg, non_embedding=True) == n_total - emb


def test_count_params_paper_presets():
    for name, (want_total, want_non_emb) in {
        "45m": _count_formula(512, 4, 8, 8, 2048, 32128),
        "150m": _count_formula(768, 12, 16, 16, 3072, 32128),
    }.items():
        cfg = model_config(name)
        assert cfg.vocab_size == 32128
        assert count_params(cfg) == want_total
        assert count_params(cfg, non_embedding=True) == want_non_emb
        print(f"{name}: total {want_total:,}  non-embedding {want_non_emb:,}")
    assert count_params(model_config("45m"), non_embedding=True) == 16_781_824  # "16.8M"
    assert 45e6 < count_params(model_config("45m")) < 55e6
    assert 110e6 < count_params(model_config("150m"), non_embedding=True) < 120e6
    assert 155e6 < count_params(model_config("150m")) < 170e6
    assert count_params(NANO) < 1_000_000
    assert 1e6 < count_params(model_config("tiny", vocab_size=4096)) < 1e7


# ---------------------------------------------------------------- initialisation

def test_init_statistics():
    cfg = model_config("tiny", vocab_size=4096)
    p = init_params(cfg, jax.random.key(7))
    for kernel, fan_in in [(p["block_0"]["mlp"]["w_gate"]["kernel"], cfg.hidden),
                           (p["block_2"]["mlp"]["w_down"]["kernel"], cfg.ffn),
                           (p["block_1"]["attn"]["wq"]["kernel"], cfg.hidden),
                           (p["lm_head"]["kernel"], cfg.hidden)]:
        std = float(jnp.std(kernel))
        assert abs(std * np.sqrt(fan_in) - 1.0) < 0.02, (kernel.shape, std)
        assert abs(float(jnp.mean(kernel))) < 0.01 / np.sqrt(fan_in) * 10
    emb = p["embed"]["embedding"]
    assert abs(float(jnp.std(emb)) - 1.0) < 0.02 and abs(float(jnp.mean(emb))) < 0.02
    for scale in (p["block_3"]["attn_norm"]["scale"], p["final_norm"]["scale"]):
        np.testing.assert_array_equal(np.asarray(scale), 1.0)
    # Different keys give different parameters; the same key reproduces them.
    q = init_params(cfg, jax.random.key(7))
    np.testing.assert_array_equal(np.asarray(q["lm_head"]["kernel"]), np.asarray(p["lm_head"]["kernel"]))


# ---------------------------------------------------------------- layer statistics hooks

def test_apply_with_layer_stats(nano_params):
    params = nano_params
    tokens = _tokens(2, 12, NANO.vocab_size)
    n = tokens.size
    pert = init_perturbations(NANO, params, tokens)
    assert pert["lm_head"]["outputs"].shape == (n, NANO.vocab_size)
    assert pert["block_1"]["mlp"]["w_gate"]["outputs"].shape == (n, NANO.ffn)
    assert all(float(jnp.abs(a).max()) == 0.0 for a in jax.tree.leaves(pert))

    def loss(p, e):
        logits, _ = apply_with_layer_stats(NANO, p, tokens, e)
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[..., None], axis=-1))

    logits, inputs = jax.jit(lambda p, e: apply_with_layer_stats(NANO, p, tokens, e))(params, pert)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(jax.jit(make_apply(NANO))(params, tokens)),
                               rtol=1e-5, atol=1e-5)
    g_params, g_pert = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, pert)

    layers = [("lm_head",), ("block_0", "attn", "wq"), ("block_0", "attn", "wv"),
              ("block_1", "attn", "wo"), ("block_1", "mlp", "w_down"), ("block_0", "mlp", "w_up")]
    for path in layers:
        def at(tree, leaf, path=path):
            for key in path:
                tree = tree[key]
            return tree[leaf]
        a, delta = at(inputs, "inputs"), at(g_pert, "outputs")
        g_w = at(g_params, "kernel")
        assert a.shape == (n, g_w.shape[0]) and delta.shape == (n, g_w.shape[1])
        scale = float(jnp.abs(g_w).max())
        np.testing.assert_allclose(np.asarray(a.T @ delta), np.asarray(g_w), atol=1e-5 * scale + 1e-8,
                                   rtol=1e-4, err_msg="/".join(path))
    # The input of the head is the final-normed stream: unit RMS per token.
    rms = jnp.sqrt(jnp.mean(inputs["lm_head"]["inputs"] ** 2, axis=-1))
    np.testing.assert_allclose(np.asarray(rms), 1.0, rtol=1e-3)


# ---------------------------------------------------------------- configuration

def test_presets_and_overrides():
    cfg = model_config("tiny", vocab_size=1000, kv_heads=2)
    assert (cfg.preset, cfg.hidden, cfg.layers, cfg.kv_heads, cfg.n_kv_heads) == ("tiny", 256, 4, 2, 2)
    assert model_config("nano").vocab_size is None
    assert model_config("150m").rope_theta == 10000.0
    assert ModelConfig().n_kv_heads == ModelConfig().heads


@pytest.mark.parametrize("overrides, fragment", [
    (dict(hidden=0), "'hidden' must be a positive integer"),
    (dict(layers=-1), "'layers'"),
    (dict(vocab_size=0), "'vocab_size'"),
    (dict(hidden=66), "divisible by 'heads'"),
    (dict(kv_heads=3), "multiple of 'kv_heads'"),
    (dict(hidden=60, heads=4), "must be even"),
    (dict(dtype="float33"), "Did you mean 'float32'"),
    (dict(norm_eps=0.0), "'norm_eps'"),
    (dict(hiden=64), "unknown model config field"),
])
def test_config_validation_errors(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        model_config("nano", **overrides)


def test_unknown_preset_and_missing_vocab():
    with pytest.raises(ConfigError, match="valid presets are nano, tiny, 45m, 150m"):
        model_config("nan")
    cfg = model_config("nano")
    with pytest.raises(ConfigError, match="vocab_size"):
        init_params(cfg, jax.random.key(0))
    with pytest.raises(ConfigError, match="vocab_size"):
        count_params(cfg)
    assert count_params(cfg, non_embedding=True) > 0
    with pytest.raises(ConfigError):
        ModelConfig(heads=3).validate()
