"""LLaMA-style decoder: config, presets, parameters, and the pure apply function.

The rest of the toolkit sees the model only as `apply(params, tokens) -> logits`
(`make_apply`) and its parameter tree (documented in `gn.model.llama`); a flax Module
of one's own enters the trainer the same way (`FlaxLM`, gn.model.custom).
"""

from gn.model import llama as _llama
from gn.model.config import DTYPES, PRESETS, ModelConfig, model_config
from gn.model.custom import FlaxLM
from gn.model.llama import Llama, apply_rope, rms_norm


def init_params(cfg, rng):
    """The parameters of the LLaMA model `cfg` (gn.model.llama.init_params) or of a FlaxLM."""
    return cfg.init(rng) if isinstance(cfg, FlaxLM) else _llama.init_params(cfg, rng)


def make_apply(cfg):
    """`apply(params, tokens) -> logits` of the LLaMA model `cfg` (gn.model.llama.make_apply) or of a FlaxLM."""
    return cfg.apply if isinstance(cfg, FlaxLM) else _llama.make_apply(cfg)


def count_params(cfg, *, non_embedding: bool = False) -> int:
    """Parameters of the LLaMA model `cfg` (gn.model.llama.count_params) or of a FlaxLM (all of them)."""
    if isinstance(cfg, FlaxLM):
        return cfg.num_params()
    return _llama.count_params(cfg, non_embedding=non_embedding)


__all__ = [
    "DTYPES",
    "FlaxLM",
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
