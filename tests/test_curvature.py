"""Dense-reference tests of gn.curvature (float64, tiny models).

Every matrix-free quantity is checked against the same quantity built from an
explicit Jacobian (`jax.jacfwd` of the flattened outputs w.r.t. the flattened
parameters) and an explicit output Hessian (`jax.hessian` of the loss).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from gn import curvature

RTOL = 1e-9

# Compile time dominates these tests; XLA's backend optimisations do not pay off
# for tiny float64 models.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


@pytest.fixture(autouse=True, scope="module")
def x64():
    # Module-scoped and undone afterwards: other test files keep jax's default float32.
    if hasattr(jax, "enable_x64"):  # public context manager in current jax
        with jax.enable_x64(True):
            yield
        return
    prev = bool(jax.config.read("jax_enable_x64"))
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", prev)


def close(a, b, rtol=RTOL):
    a, b = np.asarray(a), np.asarray(b)
    scale = max(np.abs(b).max(), 1e-12)
    assert np.abs(a - b).max() <= rtol * scale, f"max abs err {np.abs(a - b).max():.3e}, scale {scale:.3e}"


def flat(tree):
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def jit_call(fn, *args):
    # One compile per call instead of op-by-op dispatch: keeps the tests fast.
    return jit(fn)(*args)


# --------------------------------------------------------------------------- models


def _rng(seed):
    return np.random.default_rng(seed)


def mlp_problem(loss="cross_entropy", n=7, d_in=4, hidden=5, classes=3, seed=0):
    r = _rng(seed)
    params = {"l1": {"w": jnp.asarray(r.normal(size=(d_in, hidden))), "b": jnp.asarray(0.1 * r.normal(size=hidden))},
              "l2": {"w": jnp.asarray(r.normal(size=(hidden, classes)))}}

    def apply(p, x):
        return jnp.tanh(x @ p["l1"]["w"] + p["l1"]["b"]) @ p["l2"]["w"]

    x = jnp.asarray(r.normal(size=(n, d_in)))
    if loss == "cross_entropy":
        y = jnp.asarray(r.integers(0, classes, size=n))
    else:
        y = jnp.asarray(r.normal(size=(n, classes)))
    mask = jnp.asarray(np.array([1, 1, 0, 1, 1, 0, 1], np.float64)[:n])
    return apply, params, x, y, mask


def seq_problem(b=2, t=4, vocab=5, hidden=6, seed=1):
    """Embedding -> causal running mean -> tanh -> head: outputs [B, T, V]."""
    r = _rng(seed)
    params = {"embed": jnp.asarray(r.normal(size=(vocab, hidden))),
              "mix": {"w": jnp.asarray(r.normal(size=(hidden, hidden)) / np.sqrt(hidden))},
              "head": {"w": jnp.asarray(r.normal(size=(hidden, vocab))), "b": jnp.asarray(0.1 * r.normal(size=vocab))}}

    def apply(p, tokens):
        h = p["embed"][tokens]
        h = jnp.cumsum(h, axis=1) / jnp.arange(1, tokens.shape[1] + 1)[None, :, None]
        h = jnp.tanh(h @ p["mix"]["w"])
        return h @ p["head"]["w"] + p["head"]["b"]

    x = jnp.asarray(r.integers(0, vocab, size=(b, t)))
    y = r.integers(0, vocab, size=(b, t))
    y[0, 0] = -1  # padding label at a masked position must not matter
    mask = np.ones((b, t))
    mask[0, 0] = mask[1, 2] = 0
    return apply, params, x, jnp.asarray(y), jnp.asarray(mask)


def llama_problem(layers=1, seed=2):
    model = pytest.importorskip("gn.model")
    cfg = model.model_config("nano", vocab_size=32, hidden=8, heads=2, layers=layers, ffn=16,
                             max_seq_len=8, dtype="float64")
    params = model.init_params(cfg, jax.random.PRNGKey(seed))
    apply = model.make_apply(cfg)
    r = _rng(seed)
    x = jnp.asarray(r.integers(0, 32, size=(2, 4)))
    y = jnp.asarray(r.integers(0, 32, size=(2, 4)))
    mask = np.ones((2, 4))
    mask[1, 3] = 0
    return apply, params, x, y, jnp.asarray(mask)


def dense_parts(apply, params, x, y, mask, loss="cross_entropy"):
    """Explicit J (outputs x params), g_z, H_z (autodiff of the loss), z0, ℓ(z0), as numpy."""
    f0, unravel = ravel_pytree(params)
    shape = jax.eval_shape(apply, params, x).shape

    def ell(zf, m):
        return curvature.mean_loss(zf.reshape(shape), y, m, loss)

    @jit
    def parts(f, m):
        zf = apply(unravel(f), x).reshape(-1)
        J = jax.jacfwd(lambda ff: apply(unravel(ff), x).reshape(-1))(f)
        return dict(J=J, g=jax.grad(ell)(zf, m), H=jax.hessian(ell)(zf, m), z0=zf, l0=ell(zf, m))

    def numpy_parts(m):
        return {k: np.asarray(v) for k, v in parts(f0, m).items()}

    out = numpy_parts(jnp.ones(shape[:-1]) if mask is None else mask)
    # Same compiled function for another mask (e.g. all ones).
    out.update(unravel=unravel, f0=np.asarray(f0), with_mask=numpy_parts)
    return out


@functools.lru_cache(maxsize=None)
def problem(name, loss="cross_entropy"):
    """(apply, params, x, y, mask, dense parts), built once per module run: compiles are the cost."""
    apply, params, x, y, mask = {"mlp": lambda: mlp_problem(loss), "seq": seq_problem,
                                 "llama": llama_problem}[name]()
    return apply, params, x, y, mask, dense_parts(apply, params, x, y, mask, loss)


def random_like(tree, seed, scale=1.0):
    r = _rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(scale * r.normal(size=x.shape), x.dtype), tree)


def block_mask_matrix(params, partition):
    labels, blocks = curvature.make_partition(params, partition)
    index = {b: i for i, b in enumerate(blocks)}
    flat_labels = jax.tree.structure(params).flatten_up_to(labels)
    ids = np.concatenate([np.full(a.size, index[lab]) for lab, a in zip(flat_labels, jax.tree.leaves(params))])
    return ids[:, None] == ids[None, :], ids, len(blocks)


# --------------------------------------------------------------------------- losses


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_output_curvature_matches_autodiff(loss):
    r = _rng(3)
    z = jnp.asarray(r.normal(size=(2, 3, 5)))
    y = jnp.asarray(r.integers(0, 5, size=(2, 3)) if loss == "cross_entropy" else r.normal(size=(2, 3, 5)))
    mask = jnp.asarray([[1, 0, 1], [1, 1, 0]], jnp.float64)
    v = jnp.asarray(r.normal(size=z.shape))

    @jit
    def both(zz, vv, m):
        def ell(z_):
            return curvature.mean_loss(z_, y, m, loss)
        mine = curvature.loss_value_and_grad(zz, y, m, loss) + (
            curvature.output_hessian_vector_product(zz, y, vv, m, loss),)
        ref = (ell(zz), jax.grad(ell)(zz), jax.jvp(jax.grad(ell), (zz,), (vv,))[1],
               jax.hessian(ell)(zz).reshape(zz.size, zz.size) @ vv.reshape(-1))
        return mine, ref

    for m in (mask, jnp.ones(mask.shape)):
        (value, grad, hv), (rv, rg, rhv, rhv2) = both(z, v, m)
        close(value, rv)
        close(grad, rg)
        close(hv, rhv)
        close(np.asarray(hv).ravel(), rhv2)
    # mask=None means every position counts.
    close(curvature.output_hessian_vector_product(z, y, v, None, loss), both(z, v, jnp.ones(mask.shape))[0][2])


def test_x64_is_on_here_only():
    # The fixture is what makes the 1e-9 tolerances meaningful.
    assert jnp.zeros(1).dtype == jnp.float64


def test_mean_loss_definition():
    r = _rng(4)
    z = r.normal(size=(4, 6))
    y = np.array([0, 5, 2, 3])
    mask = np.array([1.0, 0.0, 1.0, 1.0])
    ce = np.log(np.exp(z).sum(-1)) - z[np.arange(4), y]
    close(curvature.mean_loss(jnp.asarray(z), jnp.asarray(y)), ce.mean())
    close(curvature.mean_loss(jnp.asarray(z), jnp.asarray(y), jnp.asarray(mask)), (ce * mask).sum() / 3)
    close(curvature.mean_loss(jnp.asarray(z), jnp.asarray(y), jnp.zeros(4)), 0.0)
    t = r.normal(size=(4, 6))
    close(curvature.mean_loss(jnp.asarray(z), jnp.asarray(t), jnp.asarray(mask), "mse"),
          (((z - t) ** 2).sum(-1) * mask).sum() / 3)


def test_bad_names_raise_value_error():
    apply, params, x, y, mask, _ = problem("mlp")
    with pytest.raises(ValueError, match="cross_entropy, mse"):
        curvature.mean_loss(apply(params, x), y, loss="hinge")
    with pytest.raises(ValueError, match="prox_linear"):
        curvature.quadratic_model(apply, params, x, y, kind="newton")
    with pytest.raises(ValueError, match="per_tensor"):
        curvature.make_partition(params, "per_layer")
    with pytest.raises(ValueError, match="sequential"):
        curvature.ggn_vector_product(apply, params, x, y, params, partition="per_tensor", block_mode="loop")
    with pytest.raises(ValueError, match="shape"):
        curvature.mean_loss(apply(params, x), y[:3])


# --------------------------------------------------------------------------- GGN products


@pytest.mark.parametrize("name,loss", [("mlp", "cross_entropy"), ("mlp", "mse"), ("seq", "cross_entropy")])
def test_ggn_matches_dense(name, loss):
    apply, params, x, y, mask, D = problem(name, loss)
    G = D["J"].T @ D["H"] @ D["J"]
    v = random_like(params, 5)
    gv, gv1 = jit_call(lambda p, vv: [curvature.ggn_vector_product(apply, p, x, y, vv, mask=m, loss=loss)
                                      for m in (mask, None)], params, v)
    assert jax.tree.structure(gv) == jax.tree.structure(params)
    close(flat(gv), G @ flat(v))
    # Without a mask every position counts.
    D1 = D["with_mask"](jnp.ones(mask.shape))
    close(flat(gv1), D1["J"].T @ D1["H"] @ D1["J"] @ flat(v))


def _check_block_diag(name, partition, expect_blocks=None, modes=curvature.BLOCK_MODES):
    apply, params, x, y, mask, D = problem(name)
    G = D["J"].T @ D["H"] @ D["J"]
    same, _, nb = block_mask_matrix(params, partition)
    if expect_blocks is not None:
        assert nb == expect_blocks
    Gb = np.where(same, G, 0.0)
    assert np.abs(G - Gb).max() > 1e-6  # the partition really drops couplings
    v = random_like(params, 6)

    @jit
    def products(p, vv):
        return [curvature.ggn_vector_product(apply, p, x, y, vv, mask=mask, partition=part, block_mode=mode)
                for part, mode in [(None, "batched")] + [(partition, m) for m in modes]]

    full, batched, *others = (flat(t) for t in products(params, v))
    close(full, G @ flat(v))
    close(batched, Gb @ flat(v))
    for other in others:  # sequential, unrolled: the same numbers
        close(other, batched, 1e-12)


def test_block_diag_per_tensor_mlp():
    _check_block_diag("mlp", "per_tensor", expect_blocks=3)


def test_block_diag_callable_seq():
    # Two blocks: the embedding with the mixer, and the head.
    _check_block_diag("seq", lambda path, leaf: curvature.path_name(path) == "embed"
                      or curvature.path_name(path).startswith("mix"), expect_blocks=2)


def _llama_labels_ok(params):
    labels, blocks = curvature.make_partition(params, "transformer_blocks")
    assert sorted(blocks) == ["block_0", "embed", "head"]
    # The paper's partition: the final norm goes with the last transformer block, the head alone.
    assert labels["final_norm"]["scale"] == "block_0" and labels["lm_head"]["kernel"] == "head"
    assert labels["block_0"]["attn"]["wq"]["kernel"] == labels["block_0"]["mlp_norm"]["scale"] == "block_0"
    labels, blocks = curvature.make_partition(params, "transformer_blocks_head_norm")
    assert sorted(blocks) == ["block_0", "embed", "head"]
    assert labels["final_norm"]["scale"] == labels["lm_head"]["kernel"] == "head"


def test_transformer_blocks_final_norm_in_last_block():
    from gn.model import init_params, model_config
    cfg = model_config("nano", vocab_size=32, hidden=16, layers=3, heads=2, ffn=32, mlp="gelu", qk_norm=True)
    shapes = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
    labels, blocks = curvature.make_partition(shapes, "transformer_blocks")
    assert blocks == ["block_0", "block_1", "block_2", "embed", "head"]
    assert labels["final_norm"]["scale"] == "block_2" != labels["block_1"]["attn"]["q_norm"]["bias"]
    assert labels["block_2"]["attn"]["k_norm"]["scale"] == "block_2" and labels["lm_head"]["kernel"] == "head"
    labels, blocks = curvature.make_partition(shapes, "transformer_blocks_head_norm")
    assert blocks == ["block_0", "block_1", "block_2", "embed", "head"]
    assert labels["final_norm"]["scale"] == "head"
    # Block indices are compared as numbers, not strings (block_10 is after block_9).
    tree = {f"block_{i}": jnp.zeros(1) for i in range(11)} | {"final_norm": jnp.zeros(1), "lm_head": jnp.zeros(1)}
    assert curvature.make_partition(tree, "transformer_blocks")[0]["final_norm"] == "block_10"
    # The layerwise GN method defaults to the paper's partition.
    from gn.methods import registry
    assert registry.resolve_entry({"name": "gn_layerwise"}).to_dict()["partition"] == "transformer_blocks"


def test_full_and_block_diag_ggn_nano_llama():
    _llama_labels_ok(problem("llama")[1])
    _check_block_diag("llama", "transformer_blocks", expect_blocks=3, modes=("batched",))


@pytest.mark.slow
def test_block_modes_agree_nano_llama():
    _check_block_diag("llama", "transformer_blocks", expect_blocks=3)


def test_make_partition_forms():
    params = {"params": {"embed": {"e": jnp.zeros(2)}, "block_0": {"w": jnp.zeros(2), "b": jnp.zeros(1)},
                         "final_norm": {"s": jnp.zeros(1)}, "lm_head": {"k": jnp.zeros(2)}, "extra": jnp.zeros(1)}}
    labels, blocks = curvature.make_partition(params, "transformer_blocks")
    assert set(blocks) == {"embed", "block_0", "head", "extra"}
    assert labels["params"]["block_0"]["w"] == labels["params"]["final_norm"]["s"] == "block_0"
    labels, blocks = curvature.make_partition({"final_norm": {"s": jnp.zeros(1)}, "lm_head": jnp.zeros(2)},
                                              "transformer_blocks")
    assert blocks == ["head"]                       # no transformer block: the norm stays with the head
    labels, blocks = curvature.make_partition(params, "per_tensor")
    assert len(blocks) == 6 and labels["params"]["block_0"]["w"] == "params/block_0/w"
    labels, blocks = curvature.make_partition(params, None)
    assert blocks == ["all"]
    # Tuple labels survive the round trip through a labels pytree.
    tl, tb = curvature.make_partition(params, lambda path, leaf: (leaf.shape[0], "x"))
    assert set(tb) == {(1, "x"), (2, "x")}
    assert curvature.make_partition(params, tl)[1] == tb


# --------------------------------------------------------------------------- quadratic models


@pytest.mark.parametrize("name", ["mlp", "seq", "mlp_mse"])
def test_quadratic_model_gn_matches_dense(name):
    loss = "mse" if name == "mlp_mse" else "cross_entropy"
    apply, params, x, y, mask, D = problem("seq" if name == "seq" else "mlp", loss)
    G = D["J"].T @ D["H"] @ D["J"]
    lam = 0.3
    dtree = random_like(params, 8, 0.2)
    theta = jax.tree.map(jnp.add, params, dtree)
    d = flat(dtree)
    gJ = D["J"].T @ D["g"]
    ref_value = D["l0"] + gJ @ d + 0.5 * d @ G @ d + 0.5 * lam * d @ d
    ref_grad = gJ + G @ d + lam * d
    # Jitted with the linearisation inside the step, as a trainer does it.
    step = jit(lambda p0, p, xx, yy, mm: curvature.quadratic_model(
        apply, p0, xx, yy, mask=mm, loss=loss, damping=lam)(p))
    value, grads = step(params, theta, x, y, mask)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    close(value, ref_value)
    close(flat(grads), ref_grad)
    close(step(params, params, x, y, mask)[0], D["l0"])
    if name == "mlp":
        # Built eagerly (linearised once), then evaluated eagerly and under jit.
        q = curvature.quadratic_model(apply, params, x, y, mask=mask, loss=loss, damping=lam)
        close(q.loss0, D["l0"])
        for v, g in (q(theta), jax.jit(q)(theta)):
            close(v, ref_value)
            close(flat(g), ref_grad)


def test_prox_linear_matches_autodiff():
    apply, params, x, y, mask, D = problem("seq")
    lam = 0.1
    d = flat(random_like(params, 9, 0.3))
    J, z0 = jnp.asarray(D["J"]), jnp.asarray(D["z0"])

    def P(dd):
        return curvature.mean_loss((z0 + J @ dd).reshape(y.shape + (-1,)), y, mask) + 0.5 * lam * dd @ dd

    ref_v, ref_g = jit_call(jax.value_and_grad(P), jnp.asarray(d))
    theta = D["unravel"](jnp.asarray(D["f0"] + d))
    value, grads = jit_call(lambda p0, p: curvature.quadratic_model(
        apply, p0, x, y, mask=mask, kind="prox_linear", damping=lam)(p), params, theta)
    close(value, ref_v)
    close(flat(grads), ref_g)


@pytest.mark.parametrize("kind", ["gn", "prox_linear"])
def test_layerwise_quadratic_models(kind):
    apply, params, x, y, mask, D = problem("mlp")
    same, ids, nb = block_mask_matrix(params, "per_tensor")
    J, g, H, z0, l0 = (jnp.asarray(D[k]) for k in ("J", "g", "H", "z0", "l0"))
    lam = 0.2
    d = flat(random_like(params, 10, 0.3))

    def model(dd):
        total = 0.5 * lam * dd @ dd
        for b in range(nb):
            jb = J @ jnp.where(ids == b, dd, 0.0)
            if kind == "gn":
                total += g @ jb + 0.5 * jb @ H @ jb
            else:
                total += curvature.mean_loss((z0 + jb).reshape(y.shape + (-1,)), y, mask)
        return total + (l0 if kind == "gn" else -(nb - 1) * l0)

    ref_v, ref_g = jit_call(jax.value_and_grad(model), jnp.asarray(d))
    if kind == "gn":  # ∇Q_lw = Jᵀg + diag(G_bb) d + λ d
        Jn = D["J"]
        close(ref_g, Jn.T @ D["g"] + np.where(same, Jn.T @ D["H"] @ Jn, 0.0) @ d + lam * d)
    theta = D["unravel"](jnp.asarray(D["f0"] + d))

    @jit
    def all_modes(p0, p):
        out = [curvature.quadratic_model(apply, p0, x, y, mask=mask, kind=kind, partition="per_tensor",
                                         damping=lam, block_mode=mode)(p) for mode in curvature.BLOCK_MODES]
        # One block reduces to the full model.
        out.append(curvature.quadratic_model(apply, p0, x, y, mask=mask, kind=kind, partition=lambda *_: 0)(p))
        out.append(curvature.quadratic_model(apply, p0, x, y, mask=mask, kind=kind)(p))
        return out

    *modes, (v3, g3), (v4, g4) = all_modes(params, theta)
    assert len(modes) == 3
    for v, gr in modes:
        close(v, ref_v)
        close(flat(gr), ref_g)
    close(v3, v4)
    close(flat(g3), flat(g4))


def test_low_precision_params_keep_dtypes():
    apply, params, x, y, mask, _ = problem("mlp")
    for dt in (jnp.float32, jnp.bfloat16):
        p = jax.tree.map(lambda a: a.astype(dt), params)
        xx = x.astype(dt)

        @jit
        def run(p0, pp):
            q = curvature.quadratic_model(apply, p0, xx, y, mask=mask, partition="per_tensor")
            return q(pp), curvature.ggn_vector_product(apply, p0, xx, y, pp, mask=mask)

        (value, grads), gv = run(p, p)
        assert all(g.dtype == dt for g in jax.tree.leaves(grads))
        assert all(g.dtype == dt for g in jax.tree.leaves(gv))
        assert value.dtype == jnp.float32 and np.isfinite(value)


# --------------------------------------------------------------------------- CG and GN steps


def _spd(n, seed, cond=50.0):
    r = _rng(seed)
    Q, _ = np.linalg.qr(r.normal(size=(n, n)))
    return (Q * np.geomspace(1.0, cond, n)) @ Q.T


def test_conjugate_gradient_matches_dense():
    tree = {"a": jnp.zeros((3, 2)), "b": jnp.zeros(4)}
    f0, unravel = ravel_pytree(tree)
    A = _spd(f0.size, 11)
    bn = _rng(12).normal(size=f0.size)
    b = unravel(jnp.asarray(bn))
    Aj = jnp.asarray(A)

    def matvec(v):
        return unravel(Aj @ ravel_pytree(v)[0])

    @jit
    def runs(bb):
        x, info = curvature.conjugate_gradient(matvec, bb, max_iters=100, tol=1e-12)
        # Warm start at the solution: no work left.
        _, info2 = curvature.conjugate_gradient(matvec, bb, x0=x, tol=1e-6)
        # max_iters caps the work.
        _, info3 = curvature.conjugate_gradient(matvec, bb, max_iters=3, tol=1e-14)
        return x, info, info2, info3

    x, info, info2, info3 = runs(b)
    close(flat(x), np.linalg.solve(A, bn), 1e-8)
    assert bool(info.converged) and int(info.iterations) <= 100
    assert int(info2.iterations) == 0
    assert int(info3.iterations) == 3 and not bool(info3.converged)


def test_block_conjugate_gradient_matches_per_block_solves():
    tree = {"u": {"w": jnp.zeros((2, 3)), "b": jnp.zeros(2)}, "v": jnp.zeros(5), "w": jnp.zeros(3)}
    labels = {"u": {"w": "U", "b": "U"}, "v": "V", "w": "W"}
    f0, unravel = ravel_pytree(tree)
    _, ids, nb = block_mask_matrix(tree, labels)
    A = np.zeros((f0.size, f0.size))
    for blk, cond in zip(range(nb), (1e3, 5.0, 1.0)):
        idx = np.where(ids == blk)[0]
        A[np.ix_(idx, idx)] = _spd(len(idx), 20 + blk, cond)
    bn = _rng(13).normal(size=f0.size)
    b = unravel(jnp.asarray(bn))
    Aj = jnp.asarray(A)

    def matvec(v):
        return unravel(Aj @ ravel_pytree(v)[0])

    @jit
    def runs(bb):
        full = curvature.block_conjugate_gradient(matvec, bb, labels, max_iters=50, tol=1e-12)
        trunc = curvature.block_conjugate_gradient(matvec, bb, labels, max_iters=3, tol=0.0)
        joint = curvature.conjugate_gradient(matvec, bb, max_iters=3, tol=0.0)
        return full, trunc, joint

    (x, info), (xk, _), (xj, _) = runs(b)
    close(flat(x), np.linalg.solve(A, bn), 1e-8)
    assert info.residual_norm.shape == (nb,) and bool(jnp.all(info.converged))
    # Truncated: each block follows exactly its own CG recursion.
    for blk in range(nb):
        idx = np.where(ids == blk)[0]
        Ab, bb = jnp.asarray(A[np.ix_(idx, idx)]), jnp.asarray(bn[idx])
        xb, _ = jit_call(lambda v: curvature.conjugate_gradient(lambda u: Ab @ u, v, max_iters=3, tol=0.0), bb)
        close(flat(xk)[idx], xb, 1e-10)
    # A joint CG on the same block-diagonal system gives different truncated iterates.
    assert np.abs(flat(xj) - flat(xk)).max() > 1e-6


def test_gauss_newton_step_solves_linear_least_squares():
    r = _rng(14)
    n, d_in, d_out = 12, 4, 3
    X, Y = jnp.asarray(r.normal(size=(n, d_in))), jnp.asarray(r.normal(size=(n, d_out)))
    params = {"w": jnp.asarray(r.normal(size=(d_in, d_out))), "b": jnp.asarray(r.normal(size=d_out))}

    def apply(p, x):
        return x @ p["w"] + p["b"]

    mask = jnp.ones(n)

    @jit
    def gn_step(p):
        grad = jax.grad(lambda pp: curvature.mean_loss(apply(pp, X), Y, mask, "mse"))(p)
        matvec = curvature.ggn_operator(apply, p, X, Y, mask=mask, loss="mse")
        step, info = curvature.conjugate_gradient(matvec, jax.tree.map(jnp.negative, grad),
                                                  max_iters=50, tol=1e-13)
        theta = jax.tree.map(jnp.add, p, step)  # α = 1
        # The GN model is exact for a linear model with squared error: Q(θ*) = ℓ(θ*).
        q_value, q_grad = curvature.quadratic_model(apply, p, X, Y, mask=mask, loss="mse")(theta)
        return theta, info, q_value, q_grad, curvature.mean_loss(apply(theta, X), Y, mask, "mse")

    theta, info, q_value, q_grad, loss_at = gn_step(params)
    assert bool(info.converged)
    sol = np.linalg.lstsq(np.c_[np.asarray(X), np.ones(n)], np.asarray(Y), rcond=None)[0]
    close(theta["w"], sol[:-1], 1e-8)
    close(theta["b"], sol[-1], 1e-8)
    close(q_value, loss_at)
    assert np.abs(flat(q_grad)).max() < 1e-8


def test_hessian_free_step_matches_dense_solve():
    apply, params, x, y, mask, D = problem("seq")
    lam = 0.05
    G = D["J"].T @ D["H"] @ D["J"] + lam * np.eye(D["f0"].size)
    grad_n = D["J"].T @ D["g"]

    @jit
    def solve(p):
        grad = jax.grad(lambda pp: curvature.mean_loss(apply(pp, x), y, mask))(p)
        matvec = curvature.ggn_operator(apply, p, x, y, mask=mask)
        damped = lambda v: jax.tree.map(lambda a, b: a + lam * b, matvec(v), v)
        return curvature.conjugate_gradient(damped, jax.tree.map(jnp.negative, grad), max_iters=200, tol=1e-12)

    step, info = solve(params)
    assert bool(info.converged)
    close(flat(step), -np.linalg.solve(G, grad_n), 1e-7)
