"""Query-chunked attention (`model.attn_chunk`) against the whole computation and a dense loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gn.config import config_from_dict
from gn.errors import ConfigError
from gn.model import init_params, make_apply, model_config
from gn.model.attention import causal_attention


def _qkv(t=12, h=4, kv=2, hd=6, b=2, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(k1, (b, t, h, hd)), jax.random.normal(k2, (b, t, kv, hd)),
            jax.random.normal(k3, (b, t, kv, hd)))


def _dense(q, k, v):
    # out[b,i,h] = sum_{j<=i} softmax_j(q_i.k_j/sqrt(hd)) v_j, key head h // (H // KV).
    b, t, h, hd = q.shape
    g = h // k.shape[2]
    out = np.zeros(q.shape)
    for hh in range(h):
        kk, vv = np.asarray(k[:, :, hh // g]), np.asarray(v[:, :, hh // g])
        for i in range(t):
            s = np.einsum("bd,bjd->bj", np.asarray(q[:, i, hh]), kk[:, : i + 1]) / np.sqrt(hd)
            p = np.exp(s - s.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            out[:, i, hh] = np.einsum("bj,bjd->bd", p, vv[:, : i + 1])
    return out


@pytest.mark.parametrize("chunk", [1, 3, 4, 12])
def test_chunked_attention_equals_dense_loop(chunk):
    q, k, v = _qkv()
    np.testing.assert_allclose(causal_attention(q, k, v, None, chunk), _dense(q, k, v), rtol=1e-5, atol=1e-6)


def test_chunked_attention_derivatives_match_whole():
    q, k, v = _qkv()
    w = jax.random.normal(jax.random.PRNGKey(3), q.shape)

    def f(chunk):
        return lambda q, k, v: jnp.sum(w * causal_attention(q, k, v, None, chunk))

    for a, b in zip(jax.grad(f(0), (0, 1, 2))(q, k, v), jax.grad(f(4), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    tangent = jax.random.normal(jax.random.PRNGKey(4), k.shape)
    ta = jax.jvp(lambda k: causal_attention(q, k, v, None, 0), (k,), (tangent,))[1]
    tb = jax.jvp(lambda k: causal_attention(q, k, v, None, 4), (k,), (tangent,))[1]
    np.testing.assert_allclose(ta, tb, rtol=1e-5, atol=1e-5)


def test_model_with_attn_chunk_matches_and_keeps_one_block_of_scores():
    base = dict(vocab_size=32, hidden=16, layers=2, heads=2, ffn=32, max_seq_len=16)
    whole, chunked = model_config("nano", **base), model_config("nano", attn_chunk=4, remat=True, **base)
    params = init_params(whole, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (3, 16), 0, 32)
    np.testing.assert_allclose(make_apply(chunked)(params, tokens), make_apply(whole)(params, tokens),
                               rtol=1e-5, atol=1e-5)
    # No (B, KV, G, T, T) score tensor in the chunked program: only (…, 4, 16) blocks.
    jaxpr = str(jax.make_jaxpr(make_apply(chunked))(params, tokens))
    assert "f32[3,2,1,16,16]" in str(jax.make_jaxpr(make_apply(whole))(params, tokens))
    assert "f32[3,2,1,16,16]" not in jaxpr and "f32[3,2,1,4,16]" in jaxpr


def test_attn_chunk_must_divide_seq_len():
    with pytest.raises(ConfigError, match="attn_chunk"):
        model_config("nano", attn_chunk=-1)
    with pytest.raises(ConfigError, match="must divide data.seq_len"):
        config_from_dict({"model": {"preset": "nano", "attn_chunk": 5}, "data": {"seq_len": 16},
                          "methods": [{"name": "adamw"}]})
