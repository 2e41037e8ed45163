"""Model configuration: a frozen dataclass, named presets, and validation.

Presets `45m` and `150m` are the full Gauss-Newton paper's models exactly (Abreu
et al. 2025; its public code natalieabreu/full-gauss-newton, an EasyLM fork):
GELU MLP with two matrices, LayerNorm on queries and keys, RMSNorm eps 1e-6,
vocab 32000. `45m_swiglu` and `150m_swiglu` keep the same widths and depths with
this toolkit's earlier SwiGLU block (no QK-norm, eps 1e-5, vocab 32128): they are
NOT the paper's models. `nano` and `tiny` are for tests and CPU runs (SwiGLU);
their vocab size is taken from the data source.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from gn.errors import ConfigError, suggest

# Names accepted in `ModelConfig.dtype`: the dtype of the parameters, and of the
# computation unless `compute_dtype` says otherwise (float64 needs `jax_enable_x64`).
DTYPES = ("float32", "float64", "bfloat16", "float16")

# Names accepted in `ModelConfig.compute_dtype` (None: the same as `dtype`).
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")

# Size of the T5 tokenizer's embedding matrix (32100 tokens padded to 32128).
T5_VOCAB = 32128

# The paper's vocabulary: the 32000 SentencePiece pieces of the T5 tokenizer
# (EasyLM's LLaMA default); the 100 <extra_id_*> sentinels (ids 32000..32099) never
# occur in the tokenized C4 text.
PAPER_VOCAB = 32000

# Names accepted in `ModelConfig.mlp`.
MLPS = ("swiglu", "gelu")

# The paper's block (llama_model.py of its code): w2(gelu(w1 x)) with flax's
# default tanh-approximate GELU, flax LayerNorm (scale and bias) on the whole
# query and key projections before the head split, RMSNorm eps 1e-6.
_PAPER_BLOCK = dict(mlp="gelu", qk_norm=True, norm_eps=1e-6, vocab_size=PAPER_VOCAB)

# The four fields that change memory and speed but not the function computed (see
# ModelConfig), and `ModelConfig.memory`'s two settings of them: `plain` keeps every
# activation (presumed the faster while it fits: remat recomputes every block; the one GPU
# measurement, docs/device_check.md, is 11.6 s for a 45m GN outer step plain float32 against
# 13.6 s lean with bf16 matmuls, not one option apart; `gn bench candidates` times each
# option alone), `lean` chunks the logits and attention, recomputes
# each block and scans the layers (docs/benchmarks.md has the memory it saves).
MEMORY_FIELDS = ("logits_chunk", "attn_chunk", "remat", "scan_layers")
MEMORY_MODES = ("auto", "plain", "lean")
PLAIN = dict(logits_chunk=0, attn_chunk=0, remat=False, scan_layers=False)
LEAN = dict(logits_chunk=4096, attn_chunk=256, remat=True, scan_layers=True)
# Paper scale is memory-bound (a GN step keeps tangents and cotangents of every
# activation): the paper presets choose plain or lean by what fits the device
# (`memory: auto`, resolved by gn.train.memory when a run is prepared).
_AUTO = dict(memory="auto")

PRESETS: dict[str, dict[str, Any]] = {
    # Tests and CPU quickstart: ~0.2M params with a 512-token vocab.
    "nano": dict(hidden=64, layers=2, heads=4, ffn=256, max_seq_len=256),
    # A few million params with a few-thousand-token vocab.
    "tiny": dict(hidden=256, layers=4, heads=4, ffn=1024, max_seq_len=512),
    # The paper's LLaMA-45M (45.36M params, 12.6M non-embedding) and LLaMA-150M
    # (134.1M, 85.0M non-embedding); "non-embedding" excludes the embedding and the head.
    "45m": dict(hidden=512, layers=4, heads=8, ffn=2048, max_seq_len=1024, **_PAPER_BLOCK, **_AUTO),
    "150m": dict(hidden=768, layers=12, heads=16, ffn=3072, max_seq_len=1024, **_PAPER_BLOCK, **_AUTO),
    # The same widths with the SwiGLU block (not the paper's; what `45m`/`150m` meant
    # before): 49.7M / 162.6M params, 16.8M / 113.3M non-embedding.
    "45m_swiglu": dict(hidden=512, layers=4, heads=8, ffn=2048, max_seq_len=1024, vocab_size=T5_VOCAB),
    "150m_swiglu": dict(hidden=768, layers=12, heads=16, ffn=3072, max_seq_len=1024, vocab_size=T5_VOCAB),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape of a LLaMA-style decoder.

    `vocab_size=None` means "take it from the data source when the run config is
    resolved"; `init_params` and `count_params` need it set. `kv_heads=None` means
    no grouping (every query head has its own key/value head).

    `mlp`: "swiglu" (w_down(silu(w_gate x) * w_up x), three matrices) or "gelu"
    (the paper's w_down(gelu(w_up x)), two matrices). `qk_norm`: LayerNorm (scale
    and bias, eps `norm_eps`) on the query and key projections before RoPE, as in
    the paper. `norm_eps` is the epsilon of every norm (RMSNorm and QK LayerNorm).

    `dtype` is the dtype of the parameters (and so of the gradients and optimizer
    state). `compute_dtype` (None: the same as `dtype`, the model exactly as without
    it) is mixed precision: the inputs of every matmul (activations and weights of
    the dense layers, queries/keys and attention weights/values, the embedding
    lookup's output) are cast to it, with float32 (at least) accumulation and
    outputs; softmax, norms, residual stream, logits and the loss stay in float32.

    Memory and compile time (none of them changes the function computed):
    `logits_chunk` (0: off) evaluates the output head and everything that consumes
    logits (loss, its gradient, g_z, H_z v, the line search) in chunks of this many
    tokens, so no (tokens × vocabulary) tensor is alive at once (`gn.split`).
    `remat` recomputes each transformer block's activations in the backward (and
    transpose) pass instead of keeping them (`jax.checkpoint`). `scan_layers` runs
    the blocks as one `lax.scan` over stacked block parameters, so compile time
    does not grow with depth; the parameter tree stays one entry per block.
    `attn_chunk` (0: off; must divide a longer sequence length) computes attention
    this many queries at a time, rematerialised, so one (batch, heads, attn_chunk,
    seq) score block is alive instead of the whole (seq × seq) one
    (`gn.model.attention`).
    `remat` and `scan_layers` leave logits and losses bit-identical (gradients to
    float32 summation order); the K-FAC statistics pass (`gn.methods.stats`,
    `gn.curvature.layer_stats`) ignores them and runs the model unrolled.

    `memory` sets those four fields as one choice: None (the default) leaves them
    as given; `plain` is all off; `lean` is `LEAN` (attention chunked only where
    its chunk divides a longer sequence); `auto` (the paper presets) takes plain
    when XLA's compiled memory of the run's step fits the device, else lean
    (`gn.train.memory`, when a run is prepared). With a mode set the four fields
    stay at their plain values in the config; stating one of them in a config
    without stating `memory` means memory None. `memory_limit_gb` (None: the
    device's free memory; on CPU the host's available memory) is the budget
    `auto` compares with.
    """

    preset: str | None = "nano"
    vocab_size: int | None = None
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int | None = None
    ffn: int = 256
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dtype: str = "float32"
    mlp: str = "swiglu"
    qk_norm: bool = False
    compute_dtype: str | None = None
    logits_chunk: int = 0
    remat: bool = False
    scan_layers: bool = False
    attn_chunk: int = 0
    memory: str | None = None
    memory_limit_gb: float | None = None

    @property
    def n_kv_heads(self) -> int:
        """Number of key/value heads (`heads` when `kv_heads` is None)."""
        return self.heads if self.kv_heads is None else self.kv_heads

    @property
    def head_dim(self) -> int:
        """Width of one attention head, `hidden // heads`."""
        return self.hidden // self.heads

    def validate(self) -> None:
        """Raise ConfigError unless every size is consistent.

        Checks positive sizes, `hidden % heads == 0`, `heads % kv_heads == 0`, an
        even head dimension (RoPE rotates pairs), positive `rope_theta` and
        `norm_eps`, and a known dtype and compute dtype.
        """
        where = f"model config (preset {self.preset!r})"
        sizes = dict(hidden=self.hidden, layers=self.layers, heads=self.heads,
                     ffn=self.ffn, max_seq_len=self.max_seq_len)
        if self.vocab_size is not None:
            sizes["vocab_size"] = self.vocab_size
        if self.kv_heads is not None:
            sizes["kv_heads"] = self.kv_heads
        for name, value in sizes.items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{where}: '{name}' must be a positive integer, got {value!r}.")
        if self.hidden % self.heads:
            raise ConfigError(
                f"{where}: 'hidden' ({self.hidden}) must be divisible by 'heads' ({self.heads}) "
                "so that every attention head has the same width.")
        if self.heads % self.n_kv_heads:
            raise ConfigError(
                f"{where}: 'heads' ({self.heads}) must be a multiple of 'kv_heads' "
                f"({self.n_kv_heads}); each key/value head serves a whole group of query heads.")
        if self.head_dim % 2:
            raise ConfigError(
                f"{where}: the head dimension hidden/heads = {self.head_dim} must be even, "
                "because rotary position embeddings rotate pairs of features.")
        if not self.rope_theta > 0:
            raise ConfigError(f"{where}: 'rope_theta' must be positive, got {self.rope_theta!r}.")
        if not self.norm_eps > 0:
            raise ConfigError(f"{where}: 'norm_eps' must be positive, got {self.norm_eps!r}.")
        if self.mlp not in MLPS:
            raise ConfigError(
                f"{where}: unknown mlp {self.mlp!r}; valid values are {', '.join(MLPS)}."
                + suggest(str(self.mlp), MLPS))
        if not isinstance(self.qk_norm, bool):
            raise ConfigError(f"{where}: 'qk_norm' must be true or false, got {self.qk_norm!r}.")
        for name in ("logits_chunk", "attn_chunk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(
                    f"{where}: '{name}' must be a non-negative integer (0 = no chunking), got {value!r}.")
        for flag in ("remat", "scan_layers"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"{where}: '{flag}' must be true or false, got {getattr(self, flag)!r}.")
        if self.memory is not None:
            if self.memory not in MEMORY_MODES:
                raise ConfigError(
                    f"{where}: unknown memory {self.memory!r}; valid values are {', '.join(MEMORY_MODES)}, "
                    "or null to set logits_chunk, attn_chunk, remat and scan_layers yourself."
                    + suggest(str(self.memory), MEMORY_MODES))
            stated = [k for k in MEMORY_FIELDS if getattr(self, k) != PLAIN[k]]
            if stated:
                raise ConfigError(
                    f"{where}: memory {self.memory!r} chooses {', '.join(MEMORY_FIELDS)} itself, but "
                    f"{', '.join(stated)} is also set; set model.memory: null to choose them yourself.")
        if self.memory_limit_gb is not None and not (
                isinstance(self.memory_limit_gb, (int, float)) and not isinstance(self.memory_limit_gb, bool)
                and self.memory_limit_gb > 0):
            raise ConfigError(f"{where}: 'memory_limit_gb' must be a positive number of GB (or null for the "
                              f"device's free memory), got {self.memory_limit_gb!r}.")
        if self.dtype not in DTYPES:
            raise ConfigError(
                f"{where}: unknown dtype {self.dtype!r}; valid dtypes are {', '.join(DTYPES)}."
                + suggest(str(self.dtype), DTYPES))
        if self.compute_dtype is not None and self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(
                f"{where}: unknown compute_dtype {self.compute_dtype!r}; valid values are "
                f"{', '.join(COMPUTE_DTYPES)}, or null for the parameters' dtype."
                + suggest(str(self.compute_dtype), COMPUTE_DTYPES))

    @property
    def mixed_precision(self) -> bool:
        """True when `compute_dtype` is set and differs from the parameters' `dtype`."""
        return self.compute_dtype is not None and self.compute_dtype != self.dtype


def model_config(preset: str = "nano", **overrides: Any) -> ModelConfig:
    """Build and validate a ModelConfig from a named preset plus field overrides.

    Unknown presets or field names raise ConfigError listing the valid ones.
    """
    if preset not in PRESETS:
        raise ConfigError(
            f"unknown model preset {preset!r}; valid presets are {', '.join(PRESETS)}."
            + suggest(str(preset), PRESETS))
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(
            f"unknown model config field(s) {', '.join(map(repr, unknown))}; valid fields are "
            f"{', '.join(sorted(fields))}." + suggest(unknown[0], fields))
    values = preset_values(preset, overrides)
    values.setdefault("preset", preset)
    cfg = ModelConfig(**values)
    cfg.validate()
    return cfg


def preset_values(preset: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """A preset's fields updated by `overrides`; an override of one of `MEMORY_FIELDS`
    without a `memory` of its own turns the preset's memory mode off (the fields are the
    user's to set)."""
    values = {**PRESETS[preset], **overrides}
    if "memory" not in overrides and any(k in overrides for k in MEMORY_FIELDS):
        values["memory"] = None
    return values


def apply_memory(cfg: ModelConfig, mode: str, seq_len: int) -> ModelConfig:
    """`cfg` with `mode`'s (plain or lean) four memory fields; attention is chunked only
    where LEAN's chunk divides a longer `seq_len` (shorter sequences are one chunk)."""
    if mode not in ("plain", "lean"):
        raise ConfigError(f"apply_memory: mode must be plain or lean, got {mode!r}.")
    fields = dict(PLAIN if mode == "plain" else LEAN)
    if mode == "lean" and not (seq_len > fields["attn_chunk"] and seq_len % fields["attn_chunk"] == 0):
        fields["attn_chunk"] = 0
    return dataclasses.replace(cfg, memory=None, **fields)
