"""The mean loss of a `SplitApply` model and its gradient, `chunk` tokens at a time.

A `gn.split.SplitApply` writes the model as z = head(θ, h), h = body(θ, x), with
h of shape P + (D,) for P the token positions and a head acting row by row
(the LM head matmul, (n, D) → (n, V)). The n = |P| rows are padded to n_c·c
(c = min(chunk, n)) and split into chunks R_1..R_{n_c}; a padded row has weight
0. With s_i = m_i / max(Σ m, 1) the whole batch's loss weights (1/n unmasked),
the mean loss is a sum of chunk terms,

    ℓ(θ) = Σ_k Σ_{i∈R_k} s_i l_i(head(θ, h_i)),

so only one (c × V) block of logits is alive at a time (`lax.scan` over chunks).

Loss and gradient (`model_loss`, a custom VJP): the forward scan also forms, per
chunk, g_k = s (softmax(z_k) − e_y) and its pullback through the head,
(θ̄_k, h̄_k) = (∂head/∂(θ, h))ᵀ g_k; then ∇ℓ = Σ_k θ̄_k + J_bodyᵀ h̄. Three head
matmuls per chunk, as without chunking, and nothing (c × V) is kept for the
backward pass (the residuals are h̄, of h's size, and θ̄ of the head's leaves).

Rows are the flattened positions (batch × sequence, row-major); chunk k takes
every n_c-th row from row k on (`chunk_rows`), so under a batch-sharded mesh each
chunk is spread over all devices and needs no data movement. The Gauss-Newton
models built on these pieces are in `gn.curvature.chunked`.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from gn.curvature import losses as _losses
from gn.split import SplitApply

def chunkable(apply_fn, loss) -> bool:
    """Whether `apply_fn` and `loss` take the chunked path (a SplitApply with a built-in loss)."""
    return isinstance(apply_fn, SplitApply) and isinstance(loss, str) and loss in _losses.LOSSES


# --------------------------------------------------------------------------- rows and chunks

class Rows(NamedTuple):
    """Per-row targets, weights s_i and kept flags, chunked to (n_c, c, ...); padding has s = 0, keep False."""

    targets: jax.Array
    scale: jax.Array
    keep: jax.Array
    n: int
    chunk: int


def chunk_rows(x, n: int, c: int):
    """(n, ...) → (n_c, c, ...), zero-padded; chunk k holds rows k, k + n_c, k + 2 n_c, ...

    Strided rather than contiguous: a batch-sharded row axis splits the major
    factor c of (c, n_c), so every chunk has rows on every device and slicing
    chunk k is local to each device (contiguous chunks would live on one device).
    """
    nc = -(-n // c)
    pad = nc * c - n
    if pad:
        x = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)])
    return jnp.swapaxes(x.reshape((c, nc) + x.shape[1:]), 0, 1)


def unchunk_rows(xc, n: int):
    """Inverse of `chunk_rows`: (n_c, c, ...) → (n, ...), dropping the padding."""
    return jnp.swapaxes(xc, 0, 1).reshape((-1,) + xc.shape[2:])[:n]


def make_rows(targets, mask, loss: str, chunk: int, dtype) -> Rows:
    """Flatten the positions, give every row its weight s_i = m_i / max(Σ m, 1) and chunk them."""
    pos = tuple(targets.shape if loss == "cross_entropy" else targets.shape[:-1])
    if mask is not None and tuple(mask.shape) != pos:
        raise ValueError(f"mask must have shape {pos}, got {tuple(mask.shape)}.")
    n = math.prod(pos)
    c = max(min(chunk, n), 1)
    t = targets.reshape((n,) + tuple(targets.shape[len(pos):]))
    if mask is None:
        scale = jnp.full((n,), 1.0 / max(n, 1), dtype)
        keep = jnp.ones((n,), bool)
    else:
        m = mask.reshape(n).astype(dtype)
        scale = m / jnp.maximum(jnp.sum(m), 1.0)
        keep = mask.reshape(n) > 0
    return Rows(chunk_rows(t, n, c), chunk_rows(scale, n, c), chunk_rows(keep, n, c), n, c)


def check_hidden(h, targets, loss):
    pos = tuple(targets.shape if loss == "cross_entropy" else targets.shape[:-1])
    if tuple(h.shape[:-1]) != pos:
        raise ValueError(f"the body's output {tuple(h.shape)} must be the target positions {pos} + (D,).")


# --------------------------------------------------------------------------- the head as a function of its leaves

def used_leaves(fn: Callable, leaves: list, treedef, x) -> list[int]:
    """Indices of the parameter leaves that fn(params, x) reads, from its jaxpr (abstract trace).

    A leaf counts as read when any equation takes it as input, so the answer is
    conservative. Restricting the head's tangents and cotangents to these leaves
    keeps (e.g.) the embedding table out of every chunk's carry.
    """
    structs = [jax.ShapeDtypeStruct(jnp.shape(v), jnp.result_type(v)) for v in leaves]
    xs = jax.ShapeDtypeStruct(x.shape, x.dtype)
    jaxpr = jax.make_jaxpr(lambda ls, xx: fn(treedef.unflatten(ls), xx))(structs, xs).jaxpr
    read = {id(v) for eqn in jaxpr.eqns for v in eqn.invars} | {id(v) for v in jaxpr.outvars}
    return [i for i, v in enumerate(jaxpr.invars[:len(leaves)]) if id(v) in read]


class Head:
    """head(θ, h) as a function of the leaves it reads: `fn(sub, h)`, sub = [θ_i for i in idx]."""

    def __init__(self, head: Callable, params, h_row):
        self.head = head
        self.leaves, self.treedef = jax.tree.flatten(params)
        self.idx = used_leaves(head, self.leaves, self.treedef, h_row)

    def sub(self, leaves: list) -> list:
        return [leaves[i] for i in self.idx]

    def fn(self, sub: list, h):
        # The other leaves are passed but, by construction of idx, never read (nor traced).
        full = list(self.leaves)
        for i, x in zip(self.idx, sub):
            full[i] = x
        return self.head(self.treedef.unflatten(full), h)


def acc_dtype(x):
    return jnp.promote_types(x.dtype, jnp.float32)


def zeros_acc(tree):
    return jax.tree.map(lambda x: jnp.zeros(x.shape, acc_dtype(x)), tree)


def tree_add(acc, x):
    return jax.tree.map(lambda a, b: a + b.astype(a.dtype), acc, x)


def out_dtype(head: Head, h):
    return jax.eval_shape(head.fn, head.sub(head.leaves), jax.ShapeDtypeStruct((1, h.shape[-1]), h.dtype)).dtype


# --------------------------------------------------------------------------- loss and gradient

def head_loss(split: SplitApply, params, h, targets, mask=None, loss: str = "cross_entropy"):
    """ℓ = Σ_k Σ_{i∈R_k} s_i l_i(head(θ, h_i)) chunk by chunk, differentiable in params and h (custom VJP)."""
    check_hidden(h, targets, loss)
    h2 = h.reshape(-1, h.shape[-1])
    head = Head(split.head, params, h2[:1])
    zdt = out_dtype(head, h2)
    dt = _losses._compute_dtype(zdt)
    rows = make_rows(targets, mask, loss, split.chunk, dt)
    xs_rows = (rows.targets, rows.scale, rows.keep)
    sub0 = head.sub(head.leaves)

    @jax.custom_vjp
    def value(sub, hc):
        def step(acc, xs):
            h_c, t_c, s_c, k_c = xs
            return acc + _losses.weighted_loss(head.fn(sub, h_c).astype(dt), t_c, s_c, k_c, loss), None
        return jax.lax.scan(step, jnp.zeros((), dt), (hc, *xs_rows))[0]

    def fwd(sub, hc):
        def step(carry, xs):
            acc, gsub = carry
            h_c, t_c, s_c, k_c = xs
            z, pull = jax.vjp(head.fn, sub, h_c)
            curv = _losses.weighted_curvature(z.astype(dt), t_c, s_c, k_c, loss)
            gs, gh = pull(curv.grad.astype(z.dtype))
            return (acc + curv.value, tree_add(gsub, gs)), gh
        (val, gsub), gh = jax.lax.scan(step, (jnp.zeros((), dt), zeros_acc(sub)), (hc, *xs_rows))
        return val, (gsub, gh)

    def bwd(res, ct):
        gsub, gh = res
        return ([(ct * g).astype(s.dtype) for g, s in zip(gsub, sub0)], (ct * gh).astype(gh.dtype))

    value.defvjp(fwd, bwd)
    return value(sub0, chunk_rows(h2, rows.n, rows.chunk))


def model_loss(apply_fn, params, inputs, targets, mask=None, loss: _losses.LossSpec = "cross_entropy"):
    """ℓ(apply_fn(params, inputs)) with `losses.mean_loss`; chunked (never forming the logits) for a SplitApply."""
    if chunkable(apply_fn, loss):
        return head_loss(apply_fn, params, apply_fn.body(params, inputs), targets, mask, loss)
    return _losses.mean_loss(apply_fn(params, inputs), targets, mask, loss)
