"""LLaMA-style decoder: config, presets, parameters, and the pure apply function.

The rest of the toolkit sees the model only as `apply(params, tokens) -> logits`
(`make_apply`) and its parameter tree (documented in `gn.model.llama`).
"""

from gn.model.config import DTYPES, PRESETS, ModelConfig, model_config
from gn.model.llama import (
    Llama,
    apply_rope,
    count_params,
    init_params,
    make_apply,
    rms_norm,
)

__all__ = [
    "DTYPES",
    "PRESETS",
    "Llama",
    "ModelConfig",
    "apply_rope",
    "count_params",
    "init_params",
    "make_apply",
    "model_config",
    "rms_norm",
]
