"""Tests of the LLaMA-style model: components against numpy, structure, counts, hooks."""

from __future__ import annotations

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gn.curvature import layer_stats as LS
from gn.errors import ConfigError
from gn.model import (
    ModelConfig,
    apply_rope,
    count_params,
    init_params,
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
    # The paper's models (GELU MLP with 2 matrices, QK LayerNorm, vocab 32000):
    # "non-embedding" = everything but the embedding and the untied head.
    for name, want_total, want_non_emb, shown in [("45m", 45_363_712, 12_595_712, ("45.36M", "12.6M")),
                                                  ("150m", 134_142_720, 84_990_720, ("134.1M", "85.0M"))]:
        cfg = model_config(name)
        assert (cfg.mlp, cfg.qk_norm, cfg.norm_eps, cfg.vocab_size) == ("gelu", True, 1e-6, 32000)
        assert count_params(cfg) == want_total
        assert count_params(cfg, non_embedding=True) == want_non_emb
        # The numbers the paper quotes, at their rounding.
        assert shown == (f"{want_total / 1e6:.{len(shown[0]) - shown[0].index('.') - 2}f}M",
                         f"{want_non_emb / 1e6:.1f}M")
        assert want_total - want_non_emb == 2 * 32000 * cfg.hidden
        # Closed form == the initialised tree (shapes only: nothing materialised).
        shapes = jax.eval_shape(lambda k, cfg=cfg: init_params(cfg, k), jax.random.key(0))
        assert _n_params(shapes) == want_total
    # The SwiGLU shapes of the same widths, under their own names (no QK-norm, vocab 32128).
    for name, (want_total, want_non_emb) in {
        "45m_swiglu": _count_formula(512, 4, 8, 8, 2048, 32128),
        "150m_swiglu": _count_formula(768, 12, 16, 16, 3072, 32128),
    }.items():
        cfg = model_config(name)
        assert (cfg.vocab_size, cfg.mlp, cfg.qk_norm, cfg.norm_eps) == (32128, "swiglu", False, 1e-5)
        assert count_params(cfg) == want_total
        assert count_params(cfg, non_embedding=True) == want_non_emb
    assert count_params(model_config("45m_swiglu"), non_embedding=True) == 16_781_824
    assert count_params(NANO) < 1_000_000
    assert 1e6 < count_params(model_config("tiny", vocab_size=4096)) < 1e7


@pytest.mark.parametrize("overrides", [dict(mlp="gelu"), dict(qk_norm=True), dict(mlp="gelu", qk_norm=True, kv_heads=2)],
                         ids=["gelu", "qk_norm", "gelu_qk_gqa"])
def test_count_params_matches_init_new_blocks(overrides):
    cfg = model_config("nano", vocab_size=100, heads=4, **overrides)
    shapes = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
    assert count_params(cfg) == _n_params(shapes)
    assert count_params(cfg, non_embedding=True) == _n_params(shapes) - 2 * 100 * cfg.hidden


# ---------------------------------------------------------------- the paper's block (gelu + QK-norm)

PAPER_TINY = model_config("nano", vocab_size=48, hidden=32, layers=2, heads=4, kv_heads=2, ffn=64,
                          mlp="gelu", qk_norm=True, norm_eps=1e-6)


def _reference_forward(cfg, p, tokens):
    """The paper's block written out with plain jnp, independently of the flax modules."""
    b, t = tokens.shape
    h, kv, hd = cfg.heads, cfg.n_kv_heads, cfg.head_dim

    def rms(x, w):
        return x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * w

    def ln(x, w, c):
        mu = x.mean(-1, keepdims=True)
        return (x - mu) / jnp.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + cfg.norm_eps) * w + c

    def rope(x):   # (b, t, n, hd), rotate-half
        inv = 10000.0 ** (-jnp.arange(0, hd, 2) / hd)
        ang = jnp.arange(t)[:, None] * inv[None]
        cos, sin = jnp.cos(ang)[None, :, None], jnp.sin(ang)[None, :, None]
        x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
        return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    x = p["embed"]["embedding"][tokens]
    for i in range(cfg.layers):
        blk = p[f"block_{i}"]
        a = blk["attn"]
        y = rms(x, blk["attn_norm"]["scale"])
        q = ln(y @ a["wq"]["kernel"], a["q_norm"]["scale"], a["q_norm"]["bias"]).reshape(b, t, h, hd)
        k = ln(y @ a["wk"]["kernel"], a["k_norm"]["scale"], a["k_norm"]["bias"]).reshape(b, t, kv, hd)
        v = (y @ a["wv"]["kernel"]).reshape(b, t, kv, hd)
        q, k = rope(q), rope(k)
        k, v = jnp.repeat(k, h // kv, axis=2), jnp.repeat(v, h // kv, axis=2)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
        s = jnp.where(np.tril(np.ones((t, t), bool)), s, -1e30)
        o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v).reshape(b, t, h * hd)
        x = x + o @ a["wo"]["kernel"]
        y = rms(x, blk["mlp_norm"]["scale"])
        u = y @ blk["mlp"]["w_up"]["kernel"]
        gelu = 0.5 * u * (1 + jnp.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u ** 3)))
        x = x + gelu @ blk["mlp"]["w_down"]["kernel"]
    return rms(x, p["final_norm"]["scale"]) @ p["lm_head"]["kernel"]


def test_paper_block_tree_and_forward_against_reference():
    cfg = PAPER_TINY
    p = init_params(cfg, jax.random.key(3))
    blk = p["block_0"]
    assert set(blk["mlp"]) == {"w_up", "w_down"}                       # two matrices, no gate
    assert set(blk["attn"]) == {"wq", "wk", "wv", "wo", "q_norm", "k_norm"}
    assert blk["attn"]["q_norm"]["scale"].shape == (cfg.heads * cfg.head_dim,)
    assert blk["attn"]["k_norm"]["bias"].shape == (cfg.n_kv_heads * cfg.head_dim,)
    np.testing.assert_array_equal(np.asarray(blk["attn"]["k_norm"]["bias"]), 0.0)
    np.testing.assert_array_equal(np.asarray(blk["attn"]["q_norm"]["scale"]), 1.0)
    # Random QK-norm parameters, so scale and bias are exercised.
    keys = iter(jax.random.split(jax.random.key(9), 16))
    for i in range(cfg.layers):
        for name in ("q_norm", "k_norm"):
            for leaf in ("scale", "bias"):
                x = p[f"block_{i}"]["attn"][name][leaf]
                p[f"block_{i}"]["attn"][name][leaf] = x + 0.3 * jax.random.normal(next(keys), x.shape)
    tokens = _tokens(2, 10, cfg.vocab_size)
    got = jax.jit(make_apply(cfg))(p, tokens)
    want = _reference_forward(cfg, p, tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=2e-4)
    # A SwiGLU model with the same key is a different function (the options are live).
    swiglu = model_config("nano", vocab_size=48, hidden=32, layers=2, heads=4, kv_heads=2, ffn=64)
    assert "w_gate" in init_params(swiglu, jax.random.key(3))["block_0"]["mlp"]


def test_qk_norm_makes_attention_logits_scale_invariant():
    cfg = PAPER_TINY
    p = init_params(cfg, jax.random.key(4))
    tokens = _tokens(1, 8, cfg.vocab_size)
    apply = jax.jit(make_apply(cfg))
    base = apply(p, tokens)
    scaled = jax.tree.map(lambda x: x, p)
    for i in range(cfg.layers):
        for w in ("wq", "wk"):
            scaled[f"block_{i}"]["attn"][w]["kernel"] = 7.0 * p[f"block_{i}"]["attn"][w]["kernel"]
    np.testing.assert_allclose(np.asarray(apply(scaled, tokens)), np.asarray(base), rtol=1e-3, atol=1e-3)
    no_norm = dataclasses.replace(cfg, qk_norm=False)
    p2 = jax.tree.map(lambda x: x, p)
    for i in range(cfg.layers):
        del p2[f"block_{i}"]["attn"]["q_norm"], p2[f"block_{i}"]["attn"]["k_norm"]
    s2 = jax.tree.map(lambda x: x, p2)
    for i in range(cfg.layers):
        for w in ("wq", "wk"):
            s2[f"block_{i}"]["attn"][w]["kernel"] = 7.0 * p2[f"block_{i}"]["attn"][w]["kernel"]
    apply2 = jax.jit(make_apply(no_norm))
    assert float(jnp.abs(apply2(s2, tokens) - apply2(p2, tokens)).max()) > 1e-2


def test_layer_stats_and_kfac_layers_on_paper_block():
    """The statistics pass (gn.curvature.layer_stats) finds every dense layer of the gelu/QK-norm block,
    and K-FAC discovers all of them."""
    from gn.optim import _fog as F
    from gn.optim import _kfac as K

    cfg = PAPER_TINY
    params = init_params(cfg, jax.random.key(5))
    tokens = _tokens(2, 6, cfg.vocab_size)
    n = tokens.size
    apply = make_apply(cfg)
    pert = LS.layer_perturbations(apply, params, tokens)
    dense = sorted(tuple(path_keys[:-1]) for path_keys in
                   (tuple(k.key for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0])
                   if path_keys[-1] == "kernel")
    hooked = sorted(tuple(k.key for k in path)[:-1]
                    for path, _ in jax.tree_util.tree_flatten_with_path(pert)[0])
    assert hooked == dense and len(dense) == 6 * cfg.layers + 1      # wq wk wv wo w_up w_down per block, head
    layers = K.stat_layers(params, F.matrix_mask_fn(include_head=True))
    assert ("block_1", "mlp", "w_up", "kernel") in layers and ("block_0", "mlp", "w_down", "kernel") in layers
    assert ("lm_head", "kernel") in layers
    assert not any("q_norm" in lay or "k_norm" in lay for lay in layers)

    def loss(p, e):
        logits, _ = LS.apply_with_layer_stats(apply, p, e, tokens)
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[..., None], axis=-1))

    _, inputs = LS.apply_with_layer_stats(apply, params, pert, tokens)
    g_params, g_pert = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, pert)
    for path in dense:
        def at(tree, leaf, path=path):
            for key in path:
                tree = tree[key]
            return tree[leaf]
        a, delta, g_w = at(inputs, "inputs"), at(g_pert, "outputs"), at(g_params, "kernel")
        assert a.shape == (n, g_w.shape[0]) and delta.shape == (n, g_w.shape[1])
        np.testing.assert_allclose(np.asarray(a.T @ delta), np.asarray(g_w),
                                   atol=1e-5 * float(jnp.abs(g_w).max()) + 1e-8, rtol=1e-4, err_msg="/".join(path))


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


# ---------------------------------------------------------------- layer statistics (gn.curvature.layer_stats)

def test_apply_with_layer_stats(nano_params):
    params = nano_params
    tokens = _tokens(2, 12, NANO.vocab_size)
    n = tokens.size
    apply = make_apply(NANO)
    pert = LS.layer_perturbations(apply, params, tokens)
    assert pert["lm_head"]["outputs"].shape == (n, NANO.vocab_size)
    assert pert["block_1"]["mlp"]["w_gate"]["outputs"].shape == (n, NANO.ffn)
    assert all(float(jnp.abs(a).max()) == 0.0 for a in jax.tree.leaves(pert))

    def loss(p, e):
        logits, _ = LS.apply_with_layer_stats(apply, p, e, tokens)
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[..., None], axis=-1))

    logits, inputs = jax.jit(lambda p, e: LS.apply_with_layer_stats(apply, p, e, tokens))(params, pert)
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
    (dict(mlp="geglu"), "unknown mlp 'geglu'"),
    (dict(qk_norm="yes"), "'qk_norm' must be true or false"),
    (dict(compute_dtype="bfloat61"), "Did you mean 'bfloat16'"),
    (dict(compute_dtype="float64"), "unknown compute_dtype 'float64'"),
])
def test_config_validation_errors(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        model_config("nano", **overrides)


def test_unknown_preset_and_missing_vocab():
    with pytest.raises(ConfigError, match="valid presets are nano, tiny, 45m, 150m, 45m_swiglu, 150m_swiglu"):
        model_config("nan")
    cfg = model_config("nano")
    with pytest.raises(ConfigError, match="vocab_size"):
        init_params(cfg, jax.random.key(0))
    with pytest.raises(ConfigError, match="vocab_size"):
        count_params(cfg)
    assert count_params(cfg, non_embedding=True) > 0
    with pytest.raises(ConfigError):
        ModelConfig(heads=3).validate()


# ---------------------------------------------------------------- mixed precision

def _flat(tree):
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in jax.tree.leaves(tree)])


def _dot_input_dtypes(fn, *args):
    """The input dtypes of every dot_general in fn's jaxpr (sub-jaxprs included)."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
            for val in eqn.params.values():
                inner = getattr(val, "jaxpr", None)
                if inner is not None and hasattr(inner, "eqns"):
                    walk(inner)
                elif hasattr(val, "eqns"):
                    walk(val)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def test_compute_dtype_unset_is_the_plain_model(nano_params):
    # compute_dtype unset or equal to dtype: the same code path, bit for bit, and no
    # low-precision dtype anywhere in the program. (Checked once against the code
    # before compute_dtype existed: identical logits and gradients on nano.)
    tokens = _tokens(2, 16, 512)
    plain = make_apply(NANO)(nano_params, tokens)
    same = make_apply(dataclasses.replace(NANO, compute_dtype="float32"))(nano_params, tokens)
    assert NANO.compute_dtype is None and not NANO.mixed_precision
    assert plain.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(same))
    text = str(jax.make_jaxpr(make_apply(NANO))(nano_params, tokens))
    assert "f16" not in text                             # neither bf16 nor f16


def test_compute_dtype_bfloat16_casts_every_matmul(nano_params):
    cfg = dataclasses.replace(NANO, compute_dtype="bfloat16")
    assert cfg.mixed_precision
    tokens = _tokens(2, 16, 512)
    dots = _dot_input_dtypes(make_apply(cfg), nano_params, tokens)
    # 7 dense layers per SwiGLU block + 2 attention einsums per block + the head.
    assert len(dots) == NANO.layers * (7 + 2) + 1, dots
    assert all(d == ("bfloat16", "bfloat16") for d in dots), dots
    logits = make_apply(cfg)(nano_params, tokens)
    assert logits.dtype == jnp.float32                  # accumulated and returned in float32
    ref = make_apply(NANO)(nano_params, tokens)
    err = float(jnp.max(jnp.abs(logits - ref)) / jnp.max(jnp.abs(ref)))
    assert 0 < err < 5e-2, err                           # bfloat16 matmuls: ~2^-8 relative


def test_mixed_precision_quadratic_model_matches_float32():
    """The GN quadratic model (value and gradient on a batch) with bfloat16 matmuls
    agrees with float32 to within bfloat16's precision (8 mantissa bits, ~4e-3 per
    rounding): relative tolerance 1e-3 on the value and 2e-2 on the gradient (norm
    of the difference over the norm); parameters and gradients stay float32."""
    from gn import curvature

    out = {}
    for cd in (None, "bfloat16"):
        cfg = model_config("nano", vocab_size=512, compute_dtype=cd, mlp="gelu", qk_norm=True)
        p0 = init_params(cfg, jax.random.key(0))
        toks = _tokens(4, 33, 512, seed=2)
        x, y = toks[:, :-1], toks[:, 1:]
        noise = init_params(cfg, jax.random.key(5))
        p = jax.tree.map(lambda a, n: a + 0.01 * n, p0, noise)
        apply = make_apply(cfg)
        value, grads = jax.jit(lambda p0, p: curvature.quadratic_model(apply, p0, x, y)(p))(p0, p)
        assert {a.dtype for a in jax.tree.leaves(p0)} == {jnp.dtype(jnp.float32)}
        assert {a.dtype for a in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
        assert value.dtype == jnp.float32
        out[cd] = (float(value), _flat(grads))
    (v32, g32), (v16, g16) = out[None], out["bfloat16"]
    assert abs(v16 - v32) / abs(v32) < 1e-3, (v16, v32)
    rel = np.linalg.norm(g16 - g32) / np.linalg.norm(g32)
    assert 0 < rel < 2e-2, rel                           # nonzero: bfloat16 was really used
