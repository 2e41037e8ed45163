"""`scan_layers` and `remat`: the same function as the unrolled model (forward,
gradient, jvp, linearize + transpose, the GN quadratic model), with the blocks
really scanned (one compiled copy) and the parameter tree unchanged.

Measured on CPU (jax 0.10.2): logits and losses are bit-identical with scan and/or
remat; gradients differ by at most ~5e-7 of the largest gradient entry (float32
sums fused in a different order), hence the tolerance `_GRAD_TOL` below.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gn import curvature
from gn.curvature import layer_stats as LS
from gn.methods.stats import loss_grads_and_stats
from gn.model import init_params, make_apply, model_config
from gn.optim import _fog as F
from gn.optim import _kfac as K
from gn.split import SplitApply

FLAGS = {"scan": dict(scan_layers=True), "remat": dict(remat=True),
         "scan_remat": dict(scan_layers=True, remat=True)}
BLOCKS = {"swiglu": dict(), "gelu_qknorm": dict(mlp="gelu", qk_norm=True),
          "bf16": dict(compute_dtype="bfloat16")}
_slow = pytest.mark.slow


def _grid(fast):
    """(block, flags) pairs: those in `fast` run by default, the rest are marked slow."""
    return [pytest.param(BLOCKS[b], FLAGS[f], id=f"{b}-{f}", marks=() if (b, f) in fast else _slow)
            for b in BLOCKS for f in FLAGS]
_GRAD_TOL = 2e-6     # max |g - g_ref| / max |g_ref|
_FWD_TOL = 1e-6


def _flat(tree):
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in jax.tree.leaves(tree)])


def _close(a, b, tol, what):
    a, b = _flat(a), _flat(b)
    err = np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)
    assert err <= tol, (what, err)


def _setup(layers=3, **overrides):
    cfg = model_config("nano", vocab_size=256, layers=layers, hidden=32, heads=2, ffn=64, **overrides)
    p0 = init_params(cfg, jax.random.key(0))
    toks = jax.random.randint(jax.random.key(1), (2, 13), 0, 256, dtype=jnp.int32)
    return cfg, p0, toks[:, :-1], toks[:, 1:]


def _primitives(fn, *args):
    """Names of all primitives in fn's jaxpr, sub-jaxprs (scan/jit/remat bodies) once each."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            found.append(eqn.primitive.name)
            for val in eqn.params.values():
                for v in (val if isinstance(val, (tuple, list)) else (val,)):
                    inner = getattr(v, "jaxpr", None)
                    if inner is not None and hasattr(inner, "eqns"):
                        walk(inner)
                    elif hasattr(v, "eqns"):
                        walk(v)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


@pytest.mark.parametrize("block, flags", _grid({("swiglu", "scan"), ("swiglu", "remat"),
                                                 ("gelu_qknorm", "scan_remat"), ("bf16", "scan_remat")}))
def test_forward_and_gradient_match_unrolled(block, flags):
    cfg, p, x, y = _setup(**block)
    ref_apply, apply = make_apply(cfg), make_apply(dataclasses.replace(cfg, **flags))

    def loss(ap):
        return jax.jit(jax.value_and_grad(lambda q: curvature.mean_loss(ap(q, x), y)))

    np.testing.assert_allclose(np.asarray(jax.jit(apply)(p, x)), np.asarray(jax.jit(ref_apply)(p, x)),
                               rtol=0, atol=_FWD_TOL * 10)
    (v, g), (v_ref, g_ref) = loss(apply)(p), loss(ref_apply)(p)
    assert abs(float(v) - float(v_ref)) <= _FWD_TOL * abs(float(v_ref))
    _close(g, g_ref, _GRAD_TOL, "grad")
    assert jax.tree.structure(g) == jax.tree.structure(p)       # one entry per block


@pytest.mark.parametrize("flags", [pytest.param(FLAGS["scan_remat"], id="scan_remat"),
                                   pytest.param(FLAGS["scan"], id="scan", marks=_slow),
                                   pytest.param(FLAGS["remat"], id="remat", marks=_slow)])
def test_jvp_linearize_transpose_match_unrolled(flags):
    cfg, p, x, _ = _setup(mlp="gelu", qk_norm=True)
    ref_apply, apply = make_apply(cfg), make_apply(dataclasses.replace(cfg, **flags))
    t = init_params(cfg, jax.random.key(7))
    cot = jax.random.normal(jax.random.key(8), (*x.shape, cfg.vocab_size))

    @jax.jit
    def products(p, t, cot, ap=None):
        f = lambda q: ap(q, x)  # noqa: E731
        _, jvp = jax.jvp(f, (p,), (t,))
        z, lin = jax.linearize(f, p)
        (vjp,) = jax.linear_transpose(lin, p)(cot)
        return z, jvp, lin(t), vjp

    got = jax.jit(lambda p, t, c: products.__wrapped__(p, t, c, apply))(p, t, cot)
    ref = jax.jit(lambda p, t, c: products.__wrapped__(p, t, c, ref_apply))(p, t, cot)
    for a, b, what in zip(got, ref, ("z", "jvp", "linearize", "transpose")):
        _close(a, b, _GRAD_TOL, what)


@functools.lru_cache(maxsize=None)
def _quadratic(flag_name, partition):
    cfg, p0, x, y = _setup(mlp="gelu", qk_norm=True)
    noise = init_params(cfg, jax.random.key(5))
    p = jax.tree.map(lambda a, n: a + 0.01 * n, p0, noise)
    ap = make_apply(dataclasses.replace(cfg, **FLAGS.get(flag_name, {})))
    return jax.jit(lambda p0, p: curvature.quadratic_model(ap, p0, x, y, partition=partition, damping=0.1)(p))(p0, p)


@pytest.mark.parametrize("flag_name, partition", [
    ("remat", None), ("scan_remat", "transformer_blocks"),
    pytest.param("scan_remat", None, marks=_slow), pytest.param("remat", "transformer_blocks", marks=_slow),
    pytest.param("scan", None, marks=_slow)])
def test_gn_quadratic_model_matches_unrolled(flag_name, partition):
    """The GN quadratic model (jax.linearize + jax.linear_transpose inside) gives
    the same value and gradient with scan / remat, full and layerwise."""
    (v, g), (v_ref, g_ref) = _quadratic(flag_name, partition), _quadratic("none", partition)
    assert abs(float(v) - float(v_ref)) <= _FWD_TOL * abs(float(v_ref)), (v, v_ref)
    _close(g, g_ref, _GRAD_TOL, partition)


def test_scan_is_used_once_and_does_not_grow_with_depth():
    counts = {}
    for layers in (2, 5):
        cfg, p, x, _ = _setup(layers=layers)
        for scan in (False, True):
            prims = _primitives(make_apply(dataclasses.replace(cfg, scan_layers=scan)), p, x)
            counts[layers, scan] = (prims.count("scan"), prims.count("dot_general"))
    assert counts[2, True][0] == counts[5, True][0] == 1
    assert counts[2, False][0] == counts[5, False][0] == 0
    assert counts[2, True][1] == counts[5, True][1]          # one block body + the head
    assert counts[5, False][1] > counts[2, False][1]          # unrolled: grows with depth


def test_remat_appears_in_the_jaxpr():
    cfg, p, x, _ = _setup()
    for scan in (False, True):
        prims = _primitives(make_apply(dataclasses.replace(cfg, remat=True, scan_layers=scan)), p, x)
        assert prims.count("remat2") == (1 if scan else cfg.layers), prims


def test_split_body_goes_through_the_scan():
    cfg, p, x, _ = _setup()
    split = make_apply(dataclasses.replace(cfg, scan_layers=True, remat=True, logits_chunk=8))
    assert isinstance(split, SplitApply)
    assert _primitives(split.body, p, x).count("scan") == 1
    np.testing.assert_allclose(np.asarray(jax.jit(split)(p, x)), np.asarray(jax.jit(make_apply(cfg))(p, x)),
                               rtol=0, atol=_FWD_TOL * 10)


def test_layer_stats_stay_unrolled_and_agree():
    """The K-FAC statistics (`loss_grads_and_stats`) run the unrolled blocks whatever the
    flags say, with the same loss, gradient, factors and entropy; the generic pass refuses
    the scanned / rematerialised model (its blocks run in a nested flax apply)."""
    cfg, p, x, y = _setup()
    flagged = dataclasses.replace(cfg, scan_layers=True, remat=True)
    batch = jnp.concatenate([x, y[:, -1:]], axis=1)
    layers = K.stat_layers(p, F.matrix_mask_fn(include_head=True))
    run = lambda c: loss_grads_and_stats(c, p, batch, layers=layers)
    out, ref = jax.jit(lambda: run(flagged))(), jax.jit(lambda: run(cfg))()
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), out, ref)
    assert "scan" not in _primitives(lambda p: loss_grads_and_stats(flagged, p, batch, layers=layers), p)
    for flags in FLAGS.values():
        with pytest.raises(ValueError, match="nested flax apply"):
            LS.layer_perturbations(make_apply(dataclasses.replace(cfg, **flags)), p, x)


def test_single_layer_and_float64():
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        for layers, dtype in ((1, "float32"), (2, "float64")):
            cfg, p, x, y = _setup(layers=layers, dtype=dtype)
            ref = jax.jit(jax.grad(lambda q: curvature.mean_loss(make_apply(cfg)(q, x), y)))(p)
            ap = make_apply(dataclasses.replace(cfg, scan_layers=True, remat=True))
            g = jax.jit(jax.grad(lambda q: curvature.mean_loss(ap(q, x), y)))(p)
            _close(g, ref, 1e-12 if dtype == "float64" else _GRAD_TOL, (layers, dtype))
    finally:
        jax.config.update("jax_enable_x64", old)
