"""LLaMA-style decoder in Flax linen.

Architecture: token embedding -> `layers` x [RMSNorm -> causal attention with RoPE
(optionally grouped KV heads; with `qk_norm`, LayerNorm on the query and key
projections) -> residual; RMSNorm -> MLP -> residual] -> final RMSNorm -> untied
output head. The MLP is SwiGLU (`mlp: swiglu`, three matrices) or the paper's
GELU MLP (`mlp: gelu`, two matrices). No biases in dense layers. Initialisation
follows the paper: dense kernels N(0, 1/fan_in), embedding N(0, 1), norm scales
1, QK-norm biases 0.

The paper's model (presets `45m`, `150m`) is `mlp: gelu, qk_norm: true,
norm_eps: 1e-6`. Its RoPE pairs adjacent features (complex form); this one pairs
feature i with i + head_dim/2 (rotate-half). The two differ by a fixed
permutation of each head's features, which the QK LayerNorm's per-feature
scale/bias and the i.i.d. init absorb, so the model families are the same.

Mixed precision (`compute_dtype`, e.g. bfloat16, with float32 `dtype`): parameters
stay in `dtype`; every matmul casts its inputs to `compute_dtype` and accumulates
and returns float32 (`preferred_element_type`), the embedding lookup's output is
cast to it; norms, softmax, the residual stream and the logits stay float32.
Unset (or equal to `dtype`), the model is exactly the plain one.

The residual stream is kept 2-D, (B*T, D), from the embedding to the logits: on
CPU the weight-gradient matmul of a dense layer applied to a 3-D activation is
several times slower than the same matmul on the flattened 2-D array. Only
attention reshapes to (B, T, heads, head_dim).

Depth (`scan_layers`, `remat`; `gn.model.stack`): with either set, `apply` (and
the `body` of a `logits_chunk` split, which runs the same `Llama.__call__`) runs
the blocks as a pure function of each "block_i" subtree. `scan_layers` stacks the
block subtrees along a new leading axis inside the traced function and runs one
`lax.scan`, so XLA compiles one block whatever the depth; the parameter tree
(and so gradients, optimizer states, masks, the layerwise partition, checkpoints)
keeps one entry per block. `remat` puts each block under `jax.checkpoint`, so the
backward / transpose pass keeps only each block's input and recomputes the
rest; measured on XLA CPU this lowers the peak only together with `scan_layers`
(unrolled, XLA schedules the recomputations early; docs/benchmarks.md). Both work under `jax.grad`, `jax.jvp`, `jax.linearize` and
`jax.linear_transpose`. Logits and losses are bit-identical to the unrolled
model's; gradients agree to ~5e-7 of their largest entry on CPU (float32 sums
fused in another order). Initialisation always runs the unrolled flax
submodules (they create the parameters); so does the K-FAC statistics pass
(`gn.curvature.layer_stats`, which intercepts each dense layer in the model's
own flax scope): `gn.methods.stats` builds this model for it without the flags.

Initialisation (`gn.model.init`): every random leaf is a slice of one normal draw
over all random leaves in tree order, computed leaf by leaf with one small cached
program per leaf shape, so it compiles in about the same time at any depth.

Parameter tree (a contract: optimizers and curvature code address it by path)::

    {"embed": {"embedding": (V, D)},
     "block_i": {"attn_norm": {"scale": (D,)},
                 "attn": {"wq": {"kernel": (D, H*hd)}, "wk": {"kernel": (D, KV*hd)},
                          "wv": {"kernel": (D, KV*hd)}, "wo": {"kernel": (H*hd, D)},
                          # qk_norm only:
                          "q_norm": {"scale": (H*hd,), "bias": (H*hd,)},
                          "k_norm": {"scale": (KV*hd,), "bias": (KV*hd,)}},
                 "mlp_norm": {"scale": (D,)},
                 "mlp": {"w_gate": {"kernel": (D, F)},      # swiglu only
                         "w_up": {"kernel": (D, F)},
                         "w_down": {"kernel": (F, D)}}},
     "final_norm": {"scale": (D,)},
     "lm_head": {"kernel": (D, V)}}

Kernels are (in, out): a dense layer computes y = x @ kernel.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gn.errors import ConfigError
from gn.model.attention import accum_dtype as _accum_dtype, causal_attention
from gn.model.config import ModelConfig
from gn.model.init import INITIALIZERS, draw_leaves
from gn.model.stack import run_blocks
from gn.split import SplitApply

Params = dict[str, Any]


def _dtype(cfg: ModelConfig) -> Any:
    return jnp.dtype(cfg.dtype)


def _compute_dtype(cfg: ModelConfig) -> Any:
    """The matmul input dtype under mixed precision; None for the plain model
    (`compute_dtype` unset or equal to `dtype`), whose code path is unchanged."""
    return jnp.dtype(cfg.compute_dtype) if cfg.mixed_precision else None


def matmul(x: jax.Array, w: jax.Array, compute_dtype: Any = None) -> jax.Array:
    """x @ w; with `compute_dtype`, both inputs cast to it and the product
    accumulated and returned in float32 (at least: `w`'s dtype promoted with it)."""
    if compute_dtype is None:
        return x @ w
    return jnp.matmul(x.astype(compute_dtype), w.astype(compute_dtype),
                      preferred_element_type=_accum_dtype(w.dtype))


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """x / sqrt(mean(x**2, -1) + eps) * scale, computed in at least float32."""
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return y.astype(x.dtype) * scale


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """(x - mean) / sqrt(var + eps) * scale + bias over the last axis, in at least float32."""
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    centred = xf - mean
    y = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps)
    return y.astype(x.dtype) * scale + bias


def rope_tables(seq_len: int, head_dim: int, theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin) tables of shape (seq_len, head_dim) for the rotate-half convention.

    Feature i and feature i + head_dim/2 form a pair rotated by the angle
    pos * theta**(-2i/head_dim). Computed in float64 numpy, so they are
    compile-time constants and exact enough for float64 models.
    """
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.arange(seq_len, dtype=np.float64)[:, None] * inv_freq[None, :]
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles), np.sin(angles)


def apply_rope(x: jax.Array, theta: float = 10000.0) -> jax.Array:
    """Rotary position embedding of x with shape (B, T, heads, head_dim), positions 0..T-1.

    Rotate-half convention: out = x * cos + rotate_half(x) * sin with
    rotate_half([x1, x2]) = [-x2, x1].
    """
    _, t, _, hd = x.shape
    cos, sin = rope_tables(t, hd, theta)
    cos = jnp.asarray(cos[None, :, None, :], x.dtype)
    sin = jnp.asarray(sin[None, :, None, :], x.dtype)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos + rotated * sin


class Dense2D(nn.Module):
    """Bias-free dense layer on a 2-D input (N, in) -> (N, features): y = x @ kernel.

    Its 2-D "kernel" makes it a dense layer for `gn.curvature.layer_stats`, as nn.Dense is.
    """

    features: int
    dtype: Any = jnp.float32
    compute_dtype: Any = None   # mixed precision: see `matmul`

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", INITIALIZERS["kernel"], (x.shape[-1], self.features), self.dtype)
        return matmul(x, kernel, self.compute_dtype)


class RMSNorm(nn.Module):
    """RMS normalisation over the last axis with a learned `scale` (init 1)."""

    eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", INITIALIZERS["scale"], (x.shape[-1],), self.dtype)
        return rms_norm(x, scale, self.eps)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis with learned `scale` (init 1) and `bias` (init 0)."""

    eps: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", INITIALIZERS["scale"], (x.shape[-1],), self.dtype)
        bias = self.param("bias", INITIALIZERS["bias"], (x.shape[-1],), self.dtype)
        return layer_norm(x, scale, bias, self.eps)


class Attention(nn.Module):
    """Multi-head causal self-attention with RoPE on a flattened (B*T, D) stream."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, batch: int, seq: int) -> jax.Array:
        cfg, dt, cd = self.cfg, _dtype(self.cfg), _compute_dtype(self.cfg)
        h, kv, hd = cfg.heads, cfg.n_kv_heads, cfg.head_dim
        q = Dense2D(h * hd, dt, cd, name="wq")(x)
        k = Dense2D(kv * hd, dt, cd, name="wk")(x)
        if cfg.qk_norm:
            # The paper's QK-norm: over the whole projection (all heads), before RoPE.
            q = LayerNorm(cfg.norm_eps, dt, name="q_norm")(q)
            k = LayerNorm(cfg.norm_eps, dt, name="k_norm")(k)
        q = q.reshape(batch, seq, h, hd)
        k = k.reshape(batch, seq, kv, hd)
        v = Dense2D(kv * hd, dt, cd, name="wv")(x).reshape(batch, seq, kv, hd)
        q, k = apply_rope(q, cfg.rope_theta), apply_rope(k, cfg.rope_theta)
        out = causal_attention(q, k, v, cd, cfg.attn_chunk).reshape(batch * seq, h * hd)
        return Dense2D(cfg.hidden, dt, cd, name="wo")(out)


class MLP(nn.Module):
    """Feed-forward: SwiGLU w_down(silu(w_gate x) * w_up x), or (`mlp: gelu`, the
    paper's) w_down(gelu(w_up x)) with the tanh-approximate GELU (flax's default)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dt, cd = _dtype(self.cfg), _compute_dtype(self.cfg)
        if self.cfg.mlp == "gelu":
            up = Dense2D(self.cfg.ffn, dt, cd, name="w_up")(x)
            return Dense2D(self.cfg.hidden, dt, cd, name="w_down")(jax.nn.gelu(up, approximate=True))
        gate = Dense2D(self.cfg.ffn, dt, cd, name="w_gate")(x)
        up = Dense2D(self.cfg.ffn, dt, cd, name="w_up")(x)
        return Dense2D(self.cfg.hidden, dt, cd, name="w_down")(jax.nn.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, batch: int, seq: int) -> jax.Array:
        cfg, dt = self.cfg, _dtype(self.cfg)
        x = x + Attention(cfg, name="attn")(RMSNorm(cfg.norm_eps, dt, name="attn_norm")(x), batch, seq)
        return x + MLP(cfg, name="mlp")(RMSNorm(cfg.norm_eps, dt, name="mlp_norm")(x))


class Embed(nn.Module):
    """Token embedding table `embedding` (V, D), init N(0, 1); returns (B*T, D)."""

    vocab_size: int
    features: int
    dtype: Any = jnp.float32
    compute_dtype: Any = None   # mixed precision: the looked-up rows are cast to it

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        table = self.param("embedding", INITIALIZERS["embedding"],
                           (self.vocab_size, self.features), self.dtype)
        x = jnp.take(table, tokens.reshape(-1), axis=0)
        return x if self.compute_dtype is None else x.astype(self.compute_dtype)


class Llama(nn.Module):
    """LLaMA-style decoder: tokens int32 (B, T) -> logits (B, T, V) in cfg.dtype
    (mixed precision: in cfg.dtype promoted with float32)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, hidden_only: bool = False) -> jax.Array:
        # hidden_only: stop after the final norm and return (B, T, D) (see `make_apply`).
        cfg, dt, cd = self.cfg, _dtype(self.cfg), _compute_dtype(self.cfg)
        if cfg.vocab_size is None:
            raise ConfigError("the model needs 'vocab_size'; set it or resolve it from the data source.")
        batch, seq = tokens.shape
        x = Embed(cfg.vocab_size, cfg.hidden, dt, cd, name="embed")(tokens)
        # Initialising runs the Block submodules unrolled: they create the parameters.
        if (cfg.scan_layers or cfg.remat) and not self.is_initializing():
            # Pure-function blocks on this module's "block_i" parameters (gn.model.stack):
            # the same Block, applied outside flax's module tree so jax.lax.scan and
            # jax.checkpoint see plain functions of arrays.
            def block(p, h):
                return Block(cfg, parent=None).apply({"params": p}, h, batch, seq)

            params = self.variables["params"]
            x = run_blocks(block, [params[f"block_{i}"] for i in range(cfg.layers)], x,
                           scan=cfg.scan_layers, remat=cfg.remat)
        else:
            for i in range(cfg.layers):
                x = Block(cfg, name=f"block_{i}")(x, batch, seq)
        x = RMSNorm(cfg.norm_eps, dt, name="final_norm")(x)
        if hidden_only:
            return x.reshape(batch, seq, cfg.hidden)
        logits = Dense2D(cfg.vocab_size, dt, cd, name="lm_head")(x)
        return logits.reshape(batch, seq, cfg.vocab_size)


def _checked(cfg: ModelConfig) -> ModelConfig:
    cfg.validate()
    if cfg.vocab_size is None:
        raise ConfigError(
            f"model config (preset {cfg.preset!r}) has no 'vocab_size'; it must be set, "
            "or resolved from the data source's tokenizer, before building parameters.")
    return cfg


def init_params(cfg: ModelConfig, rng: jax.Array) -> Params:
    """Initialise parameters: a plain nested dict of arrays (see the module docstring).

    Requires `cfg.vocab_size`. Dense kernels ~ N(0, 1/fan_in), embedding ~ N(0, 1),
    norm scales = 1, QK-norm biases = 0, all in cfg.dtype. Deterministic in `rng`.
    """
    model = Llama(_checked(cfg))
    # Only the shapes come from flax (abstract trace): running `model.init` would
    # compile the whole forward pass just to throw it away, seconds on CPU.
    shapes = jax.eval_shape(model.init, rng, jnp.zeros((1, 1), jnp.int32))["params"]
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    specs = tuple((path[-1].key, tuple(leaf.shape)) for path, leaf in leaves)
    assert {name for name, _ in specs} <= set(INITIALIZERS), specs
    return _to_dict(jax.tree_util.tree_unflatten(treedef, draw_leaves(rng, specs, cfg.dtype)))


def _to_dict(tree: Any) -> Any:
    # Flax may hand back FrozenDicts; callers get plain, mutable dicts.
    if hasattr(tree, "items"):
        return {k: _to_dict(v) for k, v in tree.items()}
    return tree


def make_apply(cfg: ModelConfig) -> Callable[[Params, jax.Array], jax.Array]:
    """Return the pure function `apply(params, tokens) -> logits` (jit-able).

    tokens: int32 (B, T); logits: (B, T, V) in cfg.dtype (with `cfg.compute_dtype`
    set, mixed precision: float32 at least, see ModelConfig). `cfg.max_seq_len` is
    informational here: RoPE has no table to overflow, so longer inputs run.

    With `cfg.logits_chunk` > 0 the result is a `gn.split.SplitApply`: body =
    everything up to the final norm, (B, T, D); head = the LM head matmul. Called,
    it returns the same logits; losses and curvature products evaluate it in
    chunks of `logits_chunk` tokens.
    """
    model = Llama(_checked(cfg))

    def apply(params: Params, tokens: jax.Array) -> jax.Array:
        return model.apply({"params": params}, tokens)

    if not cfg.logits_chunk:
        return apply

    def body(params: Params, tokens: jax.Array) -> jax.Array:
        return model.apply({"params": params}, tokens, hidden_only=True)

    def head(params: Params, h: jax.Array) -> jax.Array:
        return matmul(h, params["lm_head"]["kernel"], _compute_dtype(cfg))

    return SplitApply(body, head, cfg.logits_chunk)


def count_params(cfg: ModelConfig, *, non_embedding: bool = False) -> int:
    """Number of parameters, in closed form from the config (no arrays built).

    `non_embedding=True` excludes both the token embedding and the (untied)
    output head: everything else (attention, MLP, every norm, QK-norm included).
    This is the paper's convention: LLaMA-45M (preset `45m`) has 45.36M
    parameters, 12.6M of them non-embedding; 150m 134.1M and 85.0M. It does not
    need `vocab_size`.
    """
    cfg.validate()
    d, f, hd = cfg.hidden, cfg.ffn, cfg.head_dim
    attn = d * cfg.heads * hd * 2 + d * cfg.n_kv_heads * hd * 2  # wq, wo; wk, wv
    if cfg.qk_norm:
        attn += 2 * cfg.heads * hd + 2 * cfg.n_kv_heads * hd     # scale and bias of q_norm, k_norm
    mlp = (2 if cfg.mlp == "gelu" else 3) * d * f
    per_block = attn + mlp + 2 * d
    body = cfg.layers * per_block + d
    if non_embedding:
        return body
    if cfg.vocab_size is None:
        raise ConfigError(
            f"model config (preset {cfg.preset!r}) has no 'vocab_size', so the embedding size is "
            "unknown; set it or pass non_embedding=True.")
    return body + 2 * cfg.vocab_size * d
