"""Chunked evaluation (`gn.split.SplitApply`, `gn.curvature.chunked`) against the unchunked model.

A nano LLaMA in float64 with 3 sequences x 10 tokens and chunks of 7 tokens (30 = 4·7 + 2:
the last chunk is padded). Every chunked quantity must equal the unchunked one to
float64 round-off (relative error ≤ RTOL of the largest entry), since only the order
of summation differs. A further test checks that the chunked programs hold no
(tokens × vocabulary) array.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gn import curvature
from gn.curvature.objective import lm_loss, split_batch
from gn.methods import registry
from gn.methods.base import MethodContext
from gn.methods.linesearch import line_search
from gn.model import init_params, make_apply, model_config
from gn.split import SplitApply

RTOL = 1e-10
V = 32
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


@pytest.fixture(autouse=True, scope="module")
def x64():
    # As in test_curvature: float64 here only, undone afterwards.
    with jax.enable_x64(True):
        yield


def close(a, b, rtol=RTOL):
    a = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(a)])
    b = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(b)])
    scale = max(np.abs(b).max(), 1e-30)
    assert np.abs(a - b).max() <= rtol * scale, f"max abs err {np.abs(a - b).max():.3e}, scale {scale:.3e}"


@functools.lru_cache(maxsize=None)
def problem(layers=2, chunk=7, dtype="float64", compute_dtype=None):
    cfg = model_config("nano", vocab_size=V, hidden=8, heads=2, layers=layers, ffn=16, max_seq_len=16,
                       dtype=dtype, compute_dtype=compute_dtype)
    params = init_params(cfg, jax.random.PRNGKey(0))
    full = make_apply(cfg)
    split = make_apply(dataclasses.replace(cfg, logits_chunk=chunk))
    assert isinstance(split, SplitApply) and not isinstance(full, SplitApply)
    r = np.random.default_rng(0)
    batch = jnp.asarray(r.integers(0, V, size=(3, 11)), jnp.int32)
    mask = jnp.asarray((r.random((3, 10)) > 0.25).astype(np.float64))
    d = jax.tree.map(lambda p: jnp.asarray(0.1 * r.standard_normal(p.shape), p.dtype), params)
    return params, full, split, batch, mask, d


def test_loss_and_grad():
    params, full, split, batch, mask, _ = problem()
    vg = lambda f: jit(jax.value_and_grad(lambda p: lm_loss(f, p, batch)))(params)  # noqa: E731
    close(vg(split), vg(full))
    x, y = split_batch(batch)
    vgm = lambda f: jit(jax.value_and_grad(  # noqa: E731
        lambda p: curvature.model_loss(f, p, x, y, mask)))(params)
    close(vgm(split), vgm(full))
    # Forward-only (the custom VJP's primal path) and under vmap, as the line search uses it.
    scales = jnp.asarray([0.0, 0.5, 1.0])
    f = lambda ap: jit(jax.vmap(lambda a: lm_loss(ap, jax.tree.map(lambda p: a * p, params), batch)))(scales)  # noqa
    close(f(split), f(full))


CASES = [(None, "batched")] + [(p, m) for p in ("transformer_blocks", "transformer_blocks_head_norm")
                               for m in curvature.BLOCK_MODES] + [("per_tensor", "batched")]


@pytest.mark.parametrize("kind", curvature.KINDS)
@pytest.mark.parametrize("partition,mode", CASES)
def test_quadratic_model(kind, partition, mode):
    params, full, split, batch, mask, d = problem()
    x, y = split_batch(batch)
    theta = jax.tree.map(jnp.add, params, d)

    def q(ap):
        return jit(lambda th: curvature.quadratic_model(ap, params, x, y, mask=mask, kind=kind, partition=partition,
                                                        block_mode=mode, damping=0.1).with_loss0(th))(theta)

    value, grads, loss0 = q(split)
    ref = q(full)
    close(value, ref[0])
    close(grads, ref[1])
    close(loss0, ref[2])
    loss0_attr = jit(lambda p: curvature.quadratic_model(split, p, x, y, mask=mask, kind=kind).loss0)(params)
    close(loss0_attr, ref[2])


@pytest.mark.parametrize("partition", [None, "transformer_blocks"])
def test_ggn_operator(partition):
    params, full, split, batch, mask, d = problem()
    x, y = split_batch(batch)
    op = lambda ap: jit(lambda v: curvature.ggn_operator(ap, params, x, y, mask=mask, partition=partition)(v))(d)  # noqa
    close(op(split), op(full))


def test_ggn_matches_dense_jacobian():
    """G from the chunked matvec on basis vectors = Jᵀ H_z J from jax.jacfwd (micro model, 1 layer)."""
    from jax.flatten_util import ravel_pytree

    from tests.dense_reference import dense_ggn

    params, full, split, batch, _, _ = problem(layers=1, chunk=4)
    G, _, unravel = dense_ggn(full, params, batch)
    x, y = split_batch(batch)
    flat, _ = ravel_pytree(params)

    @jit
    def columns(eye):
        op = curvature.ggn_operator(split, params, x, y)
        return jax.lax.map(lambda e: ravel_pytree(op(unravel(e)))[0], eye)

    Gc = columns(jnp.eye(flat.size, dtype=flat.dtype))
    close(Gc, G, rtol=1e-9)
    np.testing.assert_allclose(np.asarray(Gc), np.asarray(Gc).T, atol=1e-12)


def test_line_search():
    params, full, split, batch, _, d = problem()
    batches = jnp.stack([batch, batch[::-1]])

    def run(ap):
        return jit(lambda p, dd: line_search(lambda th, b: lm_loss(ap, th, b), p, dd, batches, grid=4))(params, d)

    a, b = run(split), run(full)
    assert float(a.alpha) == float(b.alpha)
    close([a.loss, a.loss0], [b.loss, b.loss0])


@pytest.mark.parametrize("name,hp", [("gn", {}), ("gn_prox_linear", {}),
                                     ("gn_layerwise", {"block_mode": "sequential"}),
                                     ("gn", {"inner_solver": "cg", "cg_iters": 3})])
def test_gn_outer_step(name, hp):
    """A whole GN outer step (inner loop, line search, predicted decrease) gives the same metrics."""
    params, full, split, _, _, _ = problem()
    r = np.random.default_rng(3)
    batches = jnp.asarray(r.integers(0, V, size=(2, 2, 11)), jnp.int32)
    aux = jnp.asarray(r.integers(0, V, size=(2, 2, 11)), jnp.int32)
    out = []
    for ap in (split, full):
        entry = registry.resolve_entry({"name": name, "inner_steps": 2, "ls_batches": 2, **hp})
        m = registry.build(entry, MethodContext(apply_fn=ap, total_steps=3, batch_size=4, reference_batch_size=4))
        new, _, metrics = m.step(params, m.init(params), batches, aux, None)
        out.append((new, {k: float(v) for k, v in metrics.items() if not k.endswith("_time_s")}))
    (new_s, m_s), (new_f, m_f) = out
    assert m_s.keys() == m_f.keys()
    for k in m_s:
        assert np.isclose(m_s[k], m_f[k], rtol=1e-9, atol=1e-12), (k, m_s[k], m_f[k])
    close(new_s, new_f, rtol=1e-9)


def test_mixed_precision():
    """bfloat16 head matmuls: the chunked loss, gradient and GN model stay float32 and are as close to the
    float32 model as the unchunked ones (bfloat16 rounds each chunk's partial sums, so they are not equal)."""
    with jax.enable_x64(False):
        params, full, split, batch, mask, d = problem(dtype="float32", compute_dtype="bfloat16")
        ref_apply = problem(dtype="float32")[1]
        x, y = split_batch(batch)
        theta = jax.tree.map(jnp.add, params, d)

        def outputs(ap):
            loss, grads = jax.jit(jax.value_and_grad(lambda p: lm_loss(ap, p, batch)))(params)
            value, qgrads = jax.jit(lambda th: curvature.quadratic_model(ap, params, x, y, mask=mask)(th))(theta)
            return loss, grads, value, qgrads

        chunked, unchunked, ref = outputs(split), outputs(full), outputs(ref_apply)
        assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(chunked))
        for c, u, r in zip(chunked, unchunked, ref):
            err = lambda a: float(max(np.abs(np.asarray(x) - np.asarray(z)).max()  # noqa: E731
                                      for x, z in zip(jax.tree.leaves(a), jax.tree.leaves(r))))
            assert err(c) <= 2 * err(u) + 1e-6, (err(c), err(u))


# --------------------------------------------------------------------------- no (tokens × vocabulary) array

def _avals(jaxpr):
    """Shapes of every value a jaxpr (and the jaxprs nested in its equations) defines."""
    out = []
    for eqn in jaxpr.eqns:
        out += [tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")]
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (list, tuple)) else [p]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    out += _avals(inner)
    return out


def _largest_logits(fn, *args):
    """Largest number of logit rows (size / V over arrays whose last axis is V) any array of fn holds."""
    shapes = _avals(jax.make_jaxpr(fn)(*args).jaxpr)
    return max((int(np.prod(s[:-1])) for s in shapes if s and s[-1] == V), default=0)


@pytest.mark.parametrize("partition", [None, "transformer_blocks"])
def test_full_logits_are_never_formed(partition):
    # 1 layer: transformer_blocks has 3 blocks; with chunks of 4 tokens a batched layerwise
    # step holds 3 x 4 = 12 rows of logits at a time, fewer than the 30 tokens.
    params, full, split, batch, mask, d = problem(layers=1, chunk=4)
    x, y = split_batch(batch)
    n = x.size
    theta = jax.tree.map(jnp.add, params, d)
    for kind in curvature.KINDS:
        def gn(ap):
            return lambda th: curvature.quadratic_model(ap, params, x, y, kind=kind, partition=partition)(th)

        assert _largest_logits(gn(full), theta) >= n      # the detector sees the unchunked logits
        assert _largest_logits(gn(split), theta) < n
    vg = lambda ap: jax.value_and_grad(lambda p: lm_loss(ap, p, batch))  # noqa: E731
    assert _largest_logits(vg(full), params) >= n
    assert _largest_logits(vg(split), params) < n
    op = lambda ap: lambda v: curvature.ggn_operator(ap, params, x, y, partition=partition)(v)  # noqa: E731
    assert _largest_logits(op(split), d) < n


def test_compiled_temp_bytes_shrink():
    """XLA's temp buffer of value_and_grad and of a GN model evaluation, chunked vs not, at vocab 4096."""
    with jax.enable_x64(False):
        cfg = model_config("nano", vocab_size=4096, hidden=16, heads=2, layers=1, ffn=32, max_seq_len=256)
        params = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
        batch = jax.ShapeDtypeStruct((16, 65), jnp.int32)   # 1024 tokens: logits are 16 MiB
        logits_bytes = 1024 * 4096 * 4

        def temp(chunk):
            ap = make_apply(dataclasses.replace(cfg, logits_chunk=chunk))

            def gn(p, th, b):
                x, y = split_batch(b)
                return curvature.quadratic_model(ap, p, x, y)(th)

            vg = jax.value_and_grad(lambda p, b: lm_loss(ap, p, b))
            return [jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes
                    for f, args in ((vg, (params, batch)), (gn, (params, params, batch)))]

        unchunked, chunked = temp(0), temp(64)
        # Unchunked: several logits-sized buffers; chunked: less than one.
        for a, b in zip(chunked, unchunked):
            assert a < logits_bytes and b > 2 * logits_bytes and a * 5 < b, (chunked, unchunked)


def test_layerwise_gn_direction():
    """gn.optim's layerwise-GN g_fisher (block CG on the GGN operator) is the same for a SplitApply."""
    from gn.optim._lwgn import layerwise_gn_direction

    params, full, split, batch, mask, d = problem()
    x, y = split_batch(batch)
    run = lambda ap: jit(lambda g: layerwise_gn_direction(ap, params, x, y, g, mask=mask, max_iters=5))(d)  # noqa
    close(run(split), run(full), rtol=1e-8)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy", "custom"])
def test_handmade_split_mlp(loss):
    """A SplitApply written by hand (tanh body, affine head with a bias), positions (5, 3), chunks of 4:
    mse and cross-entropy are chunked; a custom loss falls back to the full outputs. Same numbers."""
    r = np.random.default_rng(5)
    params = {"w1": jnp.asarray(r.standard_normal((4, 6))), "b": jnp.asarray(r.standard_normal(3)),
              "w2": jnp.asarray(r.standard_normal((6, 3)))}
    body = lambda p, x: jnp.tanh(x @ p["w1"])  # noqa: E731
    head = lambda p, h: h @ p["w2"] + p["b"]  # noqa: E731
    split = SplitApply(body, head, 4)
    plain = lambda p, x: head(p, body(p, x))  # noqa: E731
    x = jnp.asarray(r.standard_normal((5, 3, 4)))
    mask = jnp.asarray((r.random((5, 3)) > 0.3).astype(np.float64))
    if loss == "mse":
        y, spec = jnp.asarray(r.standard_normal((5, 3, 3))), "mse"
    else:
        y = jnp.asarray(r.integers(0, 3, size=(5, 3)))
        spec = curvature.CustomLoss(lambda z, t, m: curvature.mean_loss(z, t, m)) if loss == "custom" else loss
    d = jax.tree.map(lambda p: 0.3 * jnp.ones_like(p), params)
    theta = jax.tree.map(jnp.add, params, d)
    for kind in curvature.KINDS:
        q = lambda ap: jit(lambda th: curvature.quadratic_model(  # noqa: E731
            ap, params, x, y, mask=mask, loss=spec, kind=kind, partition="per_tensor",
            block_mode="unrolled").with_loss0(th))(theta)
        close(q(split), q(plain))
    op = lambda ap: jit(lambda v: curvature.ggn_operator(ap, params, x, y, mask=mask, loss=spec)(v))(d)  # noqa
    close(op(split), op(plain))
    vg = lambda ap: jit(jax.value_and_grad(lambda p: curvature.model_loss(ap, p, x, y, mask, spec)))(params)  # noqa
    close(vg(split), vg(plain))


def test_chunks_stay_local_under_batch_sharding():
    """On 8 simulated devices with the batch sharded, the chunked loss and gradient need no
    all-gather (chunks are strided across the rows); contiguous chunks needed 6."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import re
        import jax, jax.numpy as jnp
        from jax.sharding import NamedSharding, PartitionSpec as P
        from gn.model import model_config, make_apply, init_params
        from gn.curvature.objective import lm_loss
        cfg = model_config("nano", vocab_size=512, logits_chunk=256)
        apply = make_apply(cfg)
        mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
        params = jax.device_put(init_params(cfg, jax.random.PRNGKey(0)), NamedSharding(mesh, P()))
        batch = jax.device_put(jnp.zeros((16, 65), jnp.int32), NamedSharding(mesh, P("data")))
        hlo = jax.jit(jax.value_and_grad(lambda p, b: lm_loss(apply, p, b))).lower(params, batch).compile().as_text()
        print(len(re.findall(r"all-gather[-(.]", hlo)), len(re.findall(r"all-reduce[-(.]", hlo)))
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    gathers, reduces = map(int, out.stdout.split())
    assert gathers == 0 and reduces > 0   # the gradient's all-reduce is there: the check sees collectives
