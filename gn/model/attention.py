"""Causal softmax attention, whole or in chunks of queries.

Whole: one (B, heads, T, T) score tensor per layer, 1 GiB in float32 at batch
32 × seq 1024 × 8 heads, and its softmax as much again; a backward, tangent or
transpose pass keeps both. With `q_chunk` = c the queries are processed c rows
at a time in a `lax.map` whose body is rematerialised (`jax.checkpoint`), so one
(B, heads, c, T) block is alive at a time, in the forward pass and in every
derivative pass alike (Rabe & Staats 2021, "Self-attention does not need O(n²)
memory", without the online softmax: each chunk still sees all keys, so every
row's softmax is the whole row's and the forward values equal the whole
computation's). The gradients of k and v sum over chunks, so they agree with the
whole computation to rounding.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gn.errors import ConfigError


def accum_dtype(dtype: Any) -> Any:
    """The accumulation dtype of a matmul on `dtype` inputs: float32 at least."""
    return jnp.promote_types(dtype, jnp.float32)


def _attend(q, k, v, mask, compute_dtype):
    # q: (B, c, KV, G, hd); k, v: (B, T, KV, hd); mask: (c, T) bool, True = may attend.
    hd = q.shape[-1]
    if compute_dtype is not None:
        acc = accum_dtype(q.dtype)
        scores = jnp.einsum("bqkgd,bskd->bkgqs", q.astype(compute_dtype), k.astype(compute_dtype),
                            preferred_element_type=acc) / math.sqrt(hd)
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(compute_dtype)
        return jnp.einsum("bkgqs,bskd->bqkgd", weights, v.astype(compute_dtype), preferred_element_type=acc)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k) / math.sqrt(hd)
    # Softmax in at least float32: bf16 logits lose the small differences.
    scores = scores.astype(jnp.promote_types(scores.dtype, jnp.float32))
    scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgqs,bskd->bqkgd", weights, v)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, compute_dtype: Any = None,
                     q_chunk: int = 0) -> jax.Array:
    """Causal softmax attention. q: (B, T, H, hd); k, v: (B, T, KV, hd) with H % KV == 0.

    out[b, i, h] = Σ_{j ≤ i} softmax_j(q_i · k_j / √hd) v_j, query head h reading
    key/value head h // (H // KV) (the usual repeat-interleave grouping). Returns
    (B, T, H, hd). With `compute_dtype` (mixed precision) the inputs of both
    einsums are cast to it and the scores and output accumulate in float32 (at
    least); the output is then float32. `q_chunk` > 0 (dividing T) processes
    that many queries at a time with rematerialisation (see the module docstring);
    a sequence no longer than `q_chunk` is computed whole.
    """
    b, t, h, hd = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, t, kv, h // kv, hd)
    if not q_chunk or q_chunk >= t:
        out = _attend(qg, k, v, np.tril(np.ones((t, t), dtype=bool)), compute_dtype)
        return out.reshape(b, t, h, hd)
    if t % q_chunk:
        raise ConfigError(f"model.attn_chunk ({q_chunk}) must divide the sequence length ({t}) when it "
                          "is shorter than the sequence.")
    n = t // q_chunk
    chunks = jnp.moveaxis(qg.reshape(b, n, q_chunk, kv, h // kv, hd), 1, 0)
    key_pos = jnp.arange(t)

    @jax.checkpoint
    def one(args):
        qc, start = args
        mask = (start + jnp.arange(q_chunk))[:, None] >= key_pos[None, :]
        return _attend(qc, k, v, mask, compute_dtype)

    out = jax.lax.map(one, (chunks, jnp.arange(n) * q_chunk))
    return jnp.moveaxis(out, 0, 1).reshape(b, t, h, hd)
