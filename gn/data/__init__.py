"""Token data for training: packed, shuffled, resumable batches from one table of sources.

    cfg = DataConfig(source="embedded", seq_len=128)
    check_data(cfg)                      # fast pre-flight, raises ConfigError
    src = build_source(cfg, seed=0)
    batches = src.next(num_batches, batch_size)   # int32 [n, b, seq_len + 1]
    val = src.validation(batch_size)              # fixed, disjoint from training
    state = src.state_dict()                      # JSON; load_state_dict resumes exactly

Inputs are `w[..., :-1]`, targets `w[..., 1:]`. The sources are the modules of
`gn.data.sources.SOURCES` (embedded, synthetic, c4, shards, text), each with
`validate`, `check` and `build`; `gn.data.cache` is their one cache.
"""

from __future__ import annotations

from gn.data.base import BatchSource, WindowedSource
from gn.data.cache import cache_root
from gn.data.config import DataConfig, SyntheticConfig
from gn.data.sources import SOURCES, source_module

__all__ = ["BatchSource", "DataConfig", "SyntheticConfig", "SOURCES", "WindowedSource", "build_source",
           "cache_root", "check_data", "source_module"]


def check_data(cfg: DataConfig) -> None:
    """Fast pre-flight check of a data config: no tokenising, no downloads.

    Validates the config, then runs the source's own `check` (files exist and
    parse, the tokenizer is usable, the Hub answers within ~3 s or is declared
    offline, shard directories are complete). Raises ConfigError saying what to
    change.
    """
    cfg.validate()
    source_module(cfg.source).check(cfg)


def build_source(cfg: DataConfig, *, seed: int) -> BatchSource:
    """Build the batch source of a config; `seed` fixes the training order (not the validation set).

    Runs `check_data` first. Sources that tokenise do it once and cache the
    result (`gn.data.cache`).
    """
    check_data(cfg)
    return source_module(cfg.source).build(cfg, seed=seed)
