"""Gauss-Newton products of a `SplitApply` model, `chunk` tokens at a time.

z = head(θ, h), h = body(θ, x); rows, chunks, their weights and the chunked loss
are in `gn.curvature.chunked_loss` (its docstring has the notation).

Gauss-Newton models (`ChunkedLinearization`): the body alone is linearised at
θ0 (h0 and ḣ = J_body d, one primal pass, residuals kept). Per chunk, with the
head linearised at (θ0, h0_k) (one matmul for z0_k, recomputed per call instead
of being stored):

    ż_k = ∂head/∂θ · d + ∂head/∂h · ḣ_k
    "gn":           value_k = g_kᵀ ż_k + ½ ż_kᵀ H_k ż_k,     u_k = g_k + H_k ż_k
    "prox_linear":  value_k = ℓ_k(z0_k + ż_k),               u_k = ∇ℓ_k(z0_k + ż_k)
    (θ̄_k, h̄_k) = (∂head/∂(θ, h))ᵀ u_k,    ∇ = Σ_k θ̄_k + J_bodyᵀ h̄

with g_k, H_k the closed-form gradient and output Hessian of the chunk's share
of ℓ (`losses.weighted_curvature`), and ℓ(z0) = Σ_k ℓ_k(z0_k) from the same scan.
For a partition into blocks b, every block gets its own tangent (d_b, ḣ_b) and
the block-diagonal result takes leaf ℓ from its own block: the body's tangents
are formed before the chunk scan (one vmapped pass for block_mode "batched", a
`lax.map` for "sequential", one body linearisation per block for "unrolled"),
the blocks share each chunk's z0_k and curvature, and the body's transposes run
after it. Memory: B × (n × D) for the body tangents/cotangents and B × (c × V)
per chunk ("batched", "unrolled") or 1 × (c × V) ("sequential").

Mixed precision: the head's own matmul keeps its compute dtype; curvature,
reductions and the head-leaf cotangent sums are in at least float32.

Not chunked (full logits): custom losses (`CustomLoss` or a callable) on a
SplitApply fall back to `apply(params, inputs)`; so do callers that ask the
model for logits themselves (K-FAC's `layer_stats` pass, entropy
diagnostics).
"""


from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from gn.curvature import losses as _losses
from gn.split import SplitApply
from gn.curvature.chunked_loss import (Head, check_hidden, chunk_rows, make_rows, out_dtype, tree_add, unchunk_rows,
                                       used_leaves, zeros_acc)


# --------------------------------------------------------------------------- Gauss-Newton models

def gn_terms(curv, z0, jz, rows_c):
    """Per-chunk terms of Q: (g_kᵀ ż + ½ żᵀ H_k ż, g_k + H_k ż)."""
    hjz = curv.hvp(jz)
    return jnp.sum(curv.grad * jz) + 0.5 * jnp.sum(jz * hjz), curv.grad + hjz


def ggn_terms(curv, z0, jz, rows_c):
    """Per-chunk terms of the GGN product: (0, H_k ż)."""
    return jnp.zeros((), curv.grad.dtype), curv.hvp(jz)


def prox_terms(loss: str) -> Callable:
    """Per-chunk terms of P: (ℓ_k(z0 + ż), ∇ℓ_k(z0 + ż)), ℓ_k with the batch's weights of the chunk's rows."""
    def terms(curv, z0, jz, rows_c):
        c = _losses.weighted_curvature(z0 + jz, *rows_c, loss)
        return c.value, c.grad
    return terms


def _linearize(f, primals):
    z0, f_jvp = jax.linearize(f, primals)
    f_t = jax.linear_transpose(f_jvp, primals)
    return z0, f_jvp, lambda u: f_t(u.astype(z0.dtype))[0]


class ChunkedLinearization:
    """The SplitApply model linearised at θ0 (body only), evaluating block-separable local models by chunks.

    `run(d, terms) -> (Σ values, grads, ℓ(z0))`, terms(curv_k, z0_k, ż_k[, rows_k]) -> (value, u_k):
    with one block, grads = Jᵀ u for ż = J d; with B blocks, leaf ℓ of grads is
    (J_bᵀ u_b)_ℓ for its block b, u_b from ż_b = J_b d_b (see the module docstring).
    """

    def __init__(self, split: SplitApply, params, inputs, targets, mask, loss: str, ids: list[int],
                 num_blocks: int, block_mode: str = "batched"):
        self.ids, self.num_blocks, self.loss = list(ids), num_blocks, loss
        self.mode = block_mode if num_blocks > 1 else "full"
        self.params = params
        self.leaves, self.treedef = jax.tree.flatten(params)
        body = jax.jit(split.body)
        if self.mode == "unrolled":
            body_read = set(used_leaves(split.body, self.leaves, self.treedef, inputs))
            self.members = [[i for i, k in enumerate(self.ids) if k == b] for b in range(num_blocks)]
            self.body_lins = []
            for idx in self.members:
                bidx = [i for i in idx if i in body_read]

                def f(sub, bidx=bidx):
                    full = list(self.leaves)
                    for i, x in zip(bidx, sub):
                        full[i] = x
                    return body(self.treedef.unflatten(full), inputs)
                # A block the body does not read (the LM head) has no body tangent: ḣ_b = 0 is skipped.
                self.body_lins.append((bidx, _linearize(f, [self.leaves[i] for i in bidx]) if bidx else None))
            lins = [lin for _, lin in self.body_lins if lin is not None]
            h0 = lins[0][0] if lins else body(params, inputs)
        else:
            h0, self.body_jvp, self.body_vjp = _linearize(lambda p: body(p, inputs), params)
        check_hidden(h0, targets, loss)
        self.lead = tuple(h0.shape[:-1])
        h2 = h0.reshape(-1, h0.shape[-1])
        self.head = Head(split.head, params, h2[:1])
        zdt = out_dtype(self.head, h2)
        self.dt = _losses._compute_dtype(zdt)
        self.rows = make_rows(targets, mask, loss, split.chunk, self.dt)
        self.h0c = chunk_rows(h2, self.rows.n, self.rows.chunk)
        self.sub0 = self.head.sub(self.leaves)

    # -- helpers
    def _chunk_rows(self, h):
        """(..., *lead, D) with leading block axes → chunks first: (n_c, ..., c, D)."""
        extra = h.ndim - len(self.lead) - 1
        h = h.reshape(h.shape[:extra] + (self.rows.n, h.shape[-1]))
        h = jnp.moveaxis(h, extra, 0)                      # (n, ..., D)
        hc = chunk_rows(h, self.rows.n, self.rows.chunk)       # (n_c, c, ..., D)
        return jnp.moveaxis(hc, 1, -2)                     # (n_c, ..., c, D)

    def _unchunk_rows(self, hc):
        """Inverse of _chunk_rows."""
        hc = jnp.moveaxis(hc, -2, 1)                       # (n_c, c, ..., D)
        h = unchunk_rows(hc, self.rows.n)                         # (n, ..., D)
        h = jnp.moveaxis(h, 0, -2)                         # (..., n, D)
        return h.reshape(h.shape[:-2] + self.lead + h.shape[-1:])

    def _rows_xs(self):
        return (self.rows.targets, self.rows.scale, self.rows.keep)

    def loss0(self):
        """ℓ(z0) alone (one head pass per chunk)."""
        dt, loss, head, sub0 = self.dt, self.loss, self.head, self.sub0

        def step(acc, xs):
            h_c, t_c, s_c, k_c = xs
            return acc + _losses.weighted_loss(head.fn(sub0, h_c).astype(dt), t_c, s_c, k_c, loss), None
        return jax.lax.scan(step, jnp.zeros((), dt), (self.h0c, *self._rows_xs()))[0]

    def _tangents(self, d_leaves):
        """Per block: (d_b restricted to the head's leaves, ḣ_b) with a leading block axis (or a list, unrolled)."""
        mode, ids = self.mode, self.ids
        if mode == "full":
            return self.head.sub(d_leaves), self.body_jvp(self.treedef.unflatten(d_leaves))
        if mode == "unrolled":
            return [(self.head.sub([x if ids[i] == b else None for i, x in enumerate(d_leaves)]),
                     lin[1]([d_leaves[i] for i in bidx]) if lin is not None else None)
                    for b, (bidx, lin) in enumerate(self.body_lins)]

        def one(b):
            # Each leaf sits in exactly one block: keep it in its own block's tangent.
            masked = [jnp.where(b == k, x, jnp.zeros_like(x)) for x, k in zip(d_leaves, ids)]
            return self.head.sub(masked), self.body_jvp(self.treedef.unflatten(masked))

        blocks = jnp.arange(self.num_blocks)
        return jax.vmap(one)(blocks) if mode == "batched" else jax.lax.map(one, blocks)

    def run(self, d, terms: Callable):
        d_leaves = [x.astype(p.dtype) for x, p in zip(jax.tree.leaves(d), self.leaves)]
        mode, dt, head, sub0 = self.mode, self.dt, self.head, self.sub0
        tang = self._tangents(d_leaves)
        if mode == "unrolled":
            hd = [self._chunk_rows(h) if h is not None else None for _, h in tang]
            xs_t = [x for x in hd if x is not None]
        else:
            xs_t = [self._chunk_rows(tang[1])]
        head_ids = [self.ids[i] for i in head.idx]

        def step(carry, xs):
            acc_v, acc_l0, acc_g = carry
            h_c, t_c, s_c, k_c, tchunks = xs
            rows_c = (t_c, s_c, k_c)
            z0, f_jvp, f_vjp = _linearize(lambda a: head.fn(a[0], a[1]), (sub0, h_c))
            curv = _losses.weighted_curvature(z0.astype(dt), t_c, s_c, k_c, self.loss)
            z0d = z0.astype(dt)

            def one(ds, hd):
                jz = f_jvp((ds, hd)).astype(dt)
                v, u = terms(curv, z0d, jz, rows_c)
                gs, gh = f_vjp(u)
                return v, gs, gh

            if mode == "full":
                v, gs, gh = one(tang[0], tchunks[0])
            elif mode == "unrolled":
                v, gs, gh = [], [], []
                it = iter(tchunks)
                for b, (ds_b, _) in enumerate(tang):
                    hd_b = next(it) if hd[b] is not None else None
                    vb, gsb, ghb = self._one_unrolled(b, ds_b, hd_b, h_c, terms, curv, z0d, rows_c, head_ids)
                    v.append(vb), gs.append(gsb), gh.append(ghb)
                v = sum(v)
                gs = [sum(g[j] for g in gs) for j in range(len(sub0))]  # disjoint blocks: select = sum
            else:
                bmap = jax.vmap if mode == "batched" else (lambda f: lambda *a: jax.lax.map(lambda t: f(*t), a))
                v, gs, gh = bmap(one)(tang[0], tchunks[0])
                v = jnp.sum(v)
            return (acc_v + v, acc_l0 + curv.value, tree_add(acc_g, gs)), gh

        g0 = zeros_acc(tang[0]) if mode in ("batched", "sequential") else zeros_acc(sub0)
        init = (jnp.zeros((), dt), jnp.zeros((), dt), g0)
        (value, loss0, gsub), hbar = jax.lax.scan(step, init, (self.h0c, *self._rows_xs(), xs_t))
        return value, self._transpose(hbar, gsub, head_ids), loss0

    def _one_unrolled(self, b, ds_b, hd_b, h_c, terms, curv, z0d, rows_c, head_ids):
        """Block b alone: tangents only in its own head leaves (and ḣ_b if the body reads the block)."""
        head, sub0, dt = self.head, self.sub0, self.dt
        mine = [j for j, k in enumerate(head_ids) if k == b]

        def f(a):
            sub = list(sub0)
            for j, x in zip(mine, a[0]):
                sub[j] = x
            return head.fn(sub, a[1] if hd_b is not None else h_c)

        prim = ([sub0[j] for j in mine], h_c if hd_b is not None else None)
        _, f_jvp, f_vjp = _linearize(f, prim)
        jz = f_jvp(([ds_b[j] for j in mine], hd_b)).astype(dt)
        v, u = terms(curv, z0d, jz, rows_c)
        gs_mine, gh = f_vjp(u)
        gs = [jnp.zeros_like(s) for s in sub0]
        for j, g in zip(mine, gs_mine):
            gs[j] = g
        return v, gs, gh

    def _transpose(self, hbar, gsub, head_ids):
        """Body transposes of h̄ (per block), plus the head-leaf cotangents, each leaf from its own block."""
        mode, ids, head = self.mode, self.ids, self.head
        pos = {i: j for j, i in enumerate(head.idx)}

        def add_head(cts, gs):
            return [c + gs[pos[i]].astype(c.dtype) if i in pos else c for i, c in enumerate(cts)]

        if mode == "full":
            cts = add_head(jax.tree.leaves(self.body_vjp(self._unchunk_rows(hbar))), gsub)
        elif mode == "unrolled":
            cts = [jnp.zeros_like(x) for x in self.leaves]
            it = iter(hbar)
            for bidx, lin in self.body_lins:
                hb = next(it)
                if lin is not None:
                    for i, c in zip(bidx, lin[2](self._unchunk_rows(hb))):
                        cts[i] = c
            cts = add_head(cts, gsub)
        elif mode == "batched":
            h = self._unchunk_rows(hbar)
            cts = add_head(jax.tree.leaves(jax.vmap(self.body_vjp)(h)), gsub)
            cts = [c[k] for c, k in zip(cts, ids)]
        else:
            h = self._unchunk_rows(hbar)

            def step(acc, b):
                ct = add_head(jax.tree.leaves(self.body_vjp(h[b])), [g[b] for g in gsub])
                return [jnp.where(b == k, c, a) for c, a, k in zip(ct, acc, ids)], None

            cts, _ = jax.lax.scan(step, [jnp.zeros_like(x) for x in self.leaves], jnp.arange(self.num_blocks))
        return self.treedef.unflatten([c.astype(p.dtype) for c, p in zip(cts, self.leaves)])


def ggn_operator(split: SplitApply, params, inputs, targets, *, mask=None, loss: str = "cross_entropy",
                 ids: list[int], num_blocks: int, block_mode: str = "batched") -> Callable[[Any], Any]:
    """v ↦ G v (or its block diagonal) chunk by chunk: Σ_k (∂head)ᵀ H_k ż_k pulled back through the body."""
    model = ChunkedLinearization(split, params, inputs, targets, mask, loss, ids, num_blocks, block_mode)
    return lambda v: model.run(v, ggn_terms)[1]
