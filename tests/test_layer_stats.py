"""The model-agnostic K-FAC statistics pass (gn.curvature.layer_stats) on a flax MLP and on the LLaMA model.

Tolerances were measured on CPU (jax 0.10.2): on the MLP the captured factors, their diagonals and the
kernel gradients differ from the float64 hand references by at most 2.4e-7 (float32 model) and 4.0e-16
(float64 model) of each array's largest entry; the asserted bounds are 2e-6 and 1e-14.
"""

import dataclasses
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gn.curvature import layer_stats as LS
from gn.curvature.objective import lm_loss, split_batch
from gn.curvature.losses import mean_loss
from gn.methods.stats import loss_grads_and_stats
from gn.model import init_params, make_apply, rms_norm
from gn.optim import _kfac as K
from gn.optim import batch_factors, matrix_mask_fn, stat_layers
from tests.tiny_models import micro

ROOT = Path(__file__).resolve().parents[1]


class MLP(nn.Module):
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=self.dtype, name=name)
        return dense(3, "out")(nn.tanh(dense(32, "hidden")(x)))


def _mlp_data(dtype, n=64):
    x = jax.random.normal(jax.random.PRNGKey(0), (n, 2), dtype)
    y = jax.random.randint(jax.random.PRNGKey(2), (n,), 0, 3)
    return x, y


def _hand_references(variables, x, y):
    """A, G, their diagonals and the kernel gradients of both layers, in float64 numpy."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    x, n = np.asarray(x, np.float64), x.shape[0]
    w0, b0, w1, b1 = p["hidden"]["kernel"], p["hidden"]["bias"], p["out"]["kernel"], p["out"]["bias"]
    h = np.tanh(x @ w0 + b0)
    z = h @ w1 + b1
    prob = np.exp(z - z.max(-1, keepdims=True))
    prob /= prob.sum(-1, keepdims=True)
    d1 = prob - np.eye(3)[np.asarray(y)]          # δ of the summed loss at the logits, per sample
    d0 = (d1 @ w1.T) * (1 - h * h)
    refs = {}
    for name, a, d in (("hidden", x, d0), ("out", h, d1)):
        refs[name] = dict(A=a.T @ a / n, G=d.T @ d / n, grad=a.T @ d / n)
    return refs


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


@pytest.mark.parametrize("dtype, tol", [("float32", 2e-6), ("float64", 1e-14)])
def test_mlp_factors_equal_hand_references(dtype, tol):
    """On a flax MLP (nn.Dense with biases), A = aᵀa/n and G = δᵀδ/n with δ = n·∂ℓ̄/∂y, the per-sample
    gradient of the summed loss (`batch_factors`' convention), and the kernel gradients aᵀδ/n."""
    with jax.enable_x64(dtype == "float64"):
        x, y = _mlp_data(dtype)
        model = MLP(jnp.dtype(dtype))
        variables = model.init(jax.random.PRNGKey(1), x)
        layers = stat_layers(variables, matrix_mask_fn())
        assert layers == (("params", "hidden", "kernel"), ("params", "out", "kernel"))
        assert LS.dense_layers(variables) == {("hidden",): ("params", "hidden"), ("out",): ("params", "out")}

        @jax.jit
        def run(v):
            logits, pullback, inputs = LS.layer_stats_vjp(model, v, x)
            grads, douts = pullback(jax.grad(mean_loss)(logits, y))
            return (logits, grads, inputs, douts, batch_factors(inputs, douts, layers),
                    batch_factors(inputs, douts, layers, diagonal=True))

        logits, grads, inputs, douts, kron, diag = run(variables)
        np.testing.assert_array_equal(np.asarray(logits), np.asarray(jax.jit(model.apply)(variables, x)))
        assert inputs["params"]["hidden"]["inputs"].shape == (64, 2)
        assert douts["params"]["out"]["outputs"].shape == (64, 3)
        refs = _hand_references(variables, x, y)
        for name, r in refs.items():
            f, fd = kron["params"][name]["kernel"], diag["params"][name]["kernel"]
            assert f.a.dtype == jnp.dtype(dtype)
            for got, want in ((f.a, r["A"]), (f.g, r["G"]), (fd.a, np.diag(r["A"])), (fd.g, np.diag(r["G"])),
                              (grads["params"][name]["kernel"], r["grad"])):
                assert _rel(got, want) < tol, (name, _rel(got, want))


def test_dense_on_a_3d_input_is_flattened_to_rows():
    """nn.Dense applied to (B, T, in): a is (B·T, in), the output gradient (B·T, out), aᵀ δ the kernel gradient."""
    class Seq(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4, use_bias=False)(nn.gelu(nn.Dense(6, name="up")(x)))

    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 3))
    model = Seq()
    v = model.init(jax.random.PRNGKey(1), x)
    loss = lambda out: jnp.mean(jnp.sin(out))
    out, pullback, inputs = LS.layer_stats_vjp(model, v, x)
    grads, douts = pullback(jax.grad(loss)(out))
    ref = jax.grad(lambda q: loss(model.apply(q, x)))(v)
    np.testing.assert_array_equal(np.asarray(inputs["params"]["up"]["inputs"]), np.asarray(x.reshape(10, 3)))
    for name in ("up", "Dense_0"):
        a, d = inputs["params"][name]["inputs"], douts["params"][name]["outputs"]
        assert a.shape[0] == d.shape[0] == 10
        np.testing.assert_allclose(np.asarray(a.T @ d), np.asarray(ref["params"][name]["kernel"]), rtol=1e-5,
                                   atol=1e-7)
    jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-6, atol=1e-8), grads, ref)


def test_llama_dense_layers_found_by_path_and_checked():
    """Every 2-D kernel of the LLaMA model (Dense2D in the blocks and lm_head) is found as nn.Dense is, with
    the (n, out) perturbation shapes; the scanned model and a layer called twice are refused with a reason."""
    cfg = micro(layers=2)
    params = init_params(cfg, jax.random.PRNGKey(0))
    tokens = jnp.zeros((3, 8), jnp.int32)
    kernels = sorted(K.keys_of(p)[:-1] for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
                     if K.keys_of(p)[-1] == "kernel")
    assert len(kernels) == 7 * 2 + 1 and sorted(LS.dense_layers(params)) == kernels
    perts = LS.layer_perturbations(make_apply(cfg), params, tokens)
    got = sorted(K.keys_of(p)[:-1] for p, _ in jax.tree_util.tree_flatten_with_path(perts)[0])
    assert got == kernels
    assert perts["lm_head"]["outputs"].shape == (24, cfg.vocab_size)
    assert perts["block_1"]["mlp"]["w_down"]["outputs"].shape == (24, cfg.hidden)
    only = LS.layer_perturbations(make_apply(cfg), params, tokens, layers=[("lm_head", "kernel")])
    assert list(only) == ["lm_head"]
    with pytest.raises(ValueError, match="nested flax apply"):
        LS.layer_perturbations(make_apply(dataclasses.replace(cfg, scan_layers=True)), params, tokens)
    with pytest.raises(ValueError, match="SplitApply"):
        LS.layer_perturbations(make_apply(dataclasses.replace(cfg, logits_chunk=8)), params, tokens)

    class Twice(nn.Module):
        @nn.compact
        def __call__(self, x):
            d = nn.Dense(2)
            return d(d(x))

    v = Twice().init(jax.random.PRNGKey(0), jnp.ones((1, 2)))
    with pytest.raises(ValueError, match="more than once"):
        LS.layer_perturbations(Twice(), v, jnp.ones((1, 2)))


@pytest.mark.parametrize("over", [dict(), dict(mlp="gelu", qk_norm=True, norm_eps=1e-6),
                                  dict(compute_dtype="bfloat16")], ids=["swiglu", "paper_block", "bf16"])
def test_llama_statistics_against_jax_grad(over):
    """The generic pass on the LLaMA model: its gradient equals jax.grad of the LM loss, every layer's
    aᵀ ∂ℓ̄/∂y equals that kernel's gradient, wq's input is attn_norm(embedding), and the logits are the
    model's; `loss_grads_and_stats` is bit-identical with scan_layers/remat/logits_chunk set (it runs
    the model unrolled and unchunked for its statistics)."""
    cfg = micro(layers=2, **over)
    params = init_params(cfg, jax.random.PRNGKey(3))
    batch = jnp.asarray(np.random.default_rng(0).integers(0, 16, size=(3, 9)), jnp.int32)
    inputs, targets = split_batch(batch)
    apply = make_apply(cfg)

    @jax.jit
    def run(p):
        logits, pullback, acts = LS.layer_stats_vjp(apply, p, inputs)
        grads, douts = pullback(jax.grad(mean_loss)(logits, targets))
        return logits, grads, acts, douts, jax.grad(lambda q: lm_loss(apply, q, batch))(p)

    logits, grads, acts, douts, ref = run(params)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(jax.jit(apply)(params, inputs)), rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6 * float(jnp.abs(r).max())),
                 grads, ref)
    tol = 2e-2 if cfg.mixed_precision else 2e-5    # bf16 matmuls in the model's own kernel gradient
    for keys in LS.dense_layers(params).values():
        a, d = K.lookup(acts, keys + ("inputs",)), K.lookup(douts, keys + ("outputs",))
        g = K.lookup(ref, keys + ("kernel",))
        np.testing.assert_allclose(np.asarray(a.astype(jnp.float32).T @ d.astype(jnp.float32)), np.asarray(g),
                                   rtol=tol, atol=tol * float(jnp.abs(g).max()), err_msg="/".join(keys))
    x = params["embed"]["embedding"][inputs.reshape(-1)]
    x = x.astype(cfg.compute_dtype) if cfg.mixed_precision else x    # the embedding's output dtype
    np.testing.assert_allclose(np.asarray(acts["block_0"]["attn"]["wq"]["inputs"]),
                               np.asarray(rms_norm(x, params["block_0"]["attn_norm"]["scale"], cfg.norm_eps)),
                               rtol=1e-6, atol=1e-6)

    layers = stat_layers(params, matrix_mask_fn(include_head=True))
    stats = lambda c: jax.jit(lambda p: loss_grads_and_stats(c, p, batch, layers=layers))(params)
    flagged = dataclasses.replace(cfg, scan_layers=True, remat=True, logits_chunk=8)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), stats(flagged), stats(cfg))


def test_loss_grads_and_stats_on_a_flax_module():
    """loss_grads_and_stats takes a flax Module (or apply function) as well as a ModelConfig: a token MLP."""
    class TokenMLP(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            h = nn.Embed(16, 8)(tokens)
            return nn.Dense(16, name="head")(nn.relu(nn.Dense(12)(h)))

    batch = jnp.asarray(np.random.default_rng(1).integers(0, 16, size=(2, 7)), jnp.int32)
    model = TokenMLP()
    v = model.init(jax.random.PRNGKey(0), batch[:, :-1])
    layers = stat_layers(v, lambda p: jax.tree_util.tree_map_with_path(
        lambda path, x: K.keys_of(path)[-1] == "kernel", p))
    loss, grads, factors, entropy = loss_grads_and_stats(model, v, batch, layers=layers)
    ref_loss, ref = jax.value_and_grad(lambda q: lm_loss(model.apply, q, batch))(v)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7), grads, ref)
    assert factors["params"]["head"]["kernel"].g.shape == (16, 16)
    assert factors["params"]["Dense_0"]["kernel"].a.shape == (8, 8)
    assert float(entropy) > 0


def test_fog_mlp_example_lowers_the_loss():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import fog_mlp
    finally:
        sys.path.pop(0)
    first, last = fog_mlp.main(steps=20)    # measured: 2.176 -> 0.398
    assert last < 0.3 * first
