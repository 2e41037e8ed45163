"""Token data for training: packed, shuffled, resumable batches from four sources.

    cfg = DataConfig(source="embedded", seq_len=128)
    check_data(cfg)                      # fast pre-flight, raises ConfigError
    src = build_source(cfg, seed=0)
    batches = src.next(num_batches, batch_size)   # int32 [n, b, seq_len + 1]
    val = src.validation(batch_size)              # fixed, disjoint from training
    state = src.state_dict()                      # JSON; load_state_dict resumes exactly

Inputs are `w[..., :-1]`, targets `w[..., 1:]`. See `gn.data.config` for the
sources and their options.
"""

from __future__ import annotations

from gn.data.base import BatchSource, WindowedSource, cache_root
from gn.data.config import SOURCES, DataConfig, SyntheticConfig
from gn.errors import ConfigError

__all__ = ["BatchSource", "DataConfig", "SyntheticConfig", "SOURCES", "WindowedSource", "build_source",
           "cache_root", "check_data"]


def check_data(cfg: DataConfig) -> None:
    """Fast pre-flight check of a data config: no tokenising, no downloads.

    Validates the config, then per source: the embedded corpus is importable;
    c4 local files exist and their first record has `text_field`, the tokenizer
    file exists, and a Hub dataset or Hub tokenizer name is usable (with
    `HF_HUB_OFFLINE` set or the Hub unreachable within ~3 s it fails, unless
    the tokenizer is in the local Hugging Face cache); shard directories are
    complete. Raises ConfigError saying what to change.
    """
    cfg.validate()
    if cfg.source == "embedded":
        try:
            import pydoc_data.topics  # noqa: F401
        except ImportError:
            raise ConfigError(
                "data.source 'embedded' needs the pydoc_data module of the Python standard library, which this "
                "Python lacks; use data.source: synthetic, or c4/shards with local files.") from None
    elif cfg.source == "c4":
        from gn.data.c4 import check_c4

        check_c4(cfg)
    elif cfg.source == "shards":
        from gn.data.shards import read_meta

        read_meta(cfg.path, "data.path")
        if cfg.val_path is not None:
            read_meta(cfg.val_path, "data.val_path")


def build_source(cfg: DataConfig, *, seed: int) -> BatchSource:
    """Build the batch source of a config; `seed` fixes the training order (not the validation set).

    Runs `check_data` first. The embedded and c4-local sources tokenise on
    first use and cache the result under `cache_root(cfg.cache_dir)`.
    """
    check_data(cfg)
    if cfg.source == "embedded":
        from gn.data.embedded import build_embedded

        return build_embedded(cfg, seed=seed)
    if cfg.source == "synthetic":
        from gn.data.synthetic import SyntheticSource

        return SyntheticSource(cfg, seed=seed)
    if cfg.source == "c4":
        from gn.data.c4 import build_c4

        return build_c4(cfg, seed=seed)
    from gn.data.shards import shards_source

    return shards_source(cfg.path, seq_len=cfg.seq_len, val_sequences=cfg.val_sequences, seed=seed,
                         val_directory=cfg.val_path)
