"""The `c4` source: local C4-format JSON-lines shards, or the `allenai/c4` "en" stream from the Hub.

Fields read: `path` (a local `.json`/`.jsonl[.gz]` file, a directory of them
or a glob; None streams the Hub), `val_path` (validation files like `path`;
without it the held-out tail of the stream), `tokenizer` (a Hugging Face
tokenizer name, a tokenizer.json or a directory holding one, or "byte";
"bpe", the field's default, means the paper's "t5-base"), `eos_token`,
`text_field`, `seq_len`, `val_sequences`, `cache_dir`.

Local files are tokenised once into the data cache (`gn.data.cache`, key: the
files' paths, sizes and mtimes, the tokenizer and the text field) and then
served like the `shards` source: shuffled windows, epochs, exact resume. The
Hub stream is packed on the fly (`gn.data.stream`); its validation set is
packed from the start of the "validation" split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from gn.data import hub
from gn.data.base import TokenWindows
from gn.data.cache import cache_key, entry_dir
from gn.data.config import DataConfig
from gn.data.jsonl import check_files, iter_documents, resolve_files
from gn.data.shards import open_shards, shards_source, tokenise_once
from gn.data.tokenizer import check_tokenizer, load_tokenizer
from gn.errors import ConfigError

HUB_DATASET, HUB_CONFIG = "allenai/c4", "en"
# The paper's tokenizer; used when `tokenizer` is left at "bpe".
DEFAULT_TOKENIZER = "t5-base"
# Bump when the cached tokenisation of local files changes.
CACHE_VERSION = 1


def tokenizer_name(cfg: DataConfig) -> str:
    """The tokenizer actually used: "t5-base" when `tokenizer` is left at "bpe"."""
    return DEFAULT_TOKENIZER if cfg.tokenizer == "bpe" else cfg.tokenizer


def validate(cfg: DataConfig) -> None:
    """Nothing beyond DataConfig's own checks: every c4 field is checked against files in `check`."""


def check(cfg: DataConfig) -> None:
    """Pre-flight: the tokenizer is usable, local files readable, or the Hub reachable (~3 s at most)."""
    if cfg.path is None:
        reason = hub.offline_reason()
        if reason is not None:
            raise ConfigError(
                f"data.source 'c4' with data.path: null streams {HUB_DATASET} '{HUB_CONFIG}' from the Hugging Face "
                f"Hub, which is not usable ({reason}). {hub.LOCAL_HOWTO}")
    else:
        check_files(cfg.path, cfg.text_field, "data.path")
    if cfg.val_path is not None:
        check_files(cfg.val_path, cfg.text_field, "data.val_path")
    check_tokenizer(tokenizer_name(cfg))


def _local_shards(cfg: DataConfig, path: str, tokenizer, what: str) -> Path:
    files = resolve_files(path, what)
    ident = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    key_dir = entry_dir(cfg.cache_dir, "c4", cache_key(CACHE_VERSION, ident, tokenizer.fingerprint, cfg.text_field))
    tokenise_once(key_dir, lambda: iter_documents(files, cfg.text_field, what), tokenizer,
                  text_field=cfg.text_field, input_desc=path)
    return key_dir


def build(cfg: DataConfig, *, seed: int):
    """The c4 source: cached local shards (`path` set) or a Hub stream (`path` None)."""
    tokenizer = load_tokenizer(tokenizer_name(cfg), cfg.eos_token)
    if cfg.path is None:
        import datasets

        from gn.data.stream import StreamSource

        def open_split(split: str) -> Callable:
            return lambda: datasets.load_dataset(HUB_DATASET, HUB_CONFIG, split=split, streaming=True)

        val = None
        if cfg.val_path is not None:
            arrays, _ = open_shards(_local_shards(cfg, cfg.val_path, tokenizer, "data.val_path"), "data.val_path")
            val = TokenWindows(arrays, cfg.seq_len)
        return StreamSource(open_split("train"), open_split("validation"), tokenizer, cfg, seed=seed,
                            name=f"{HUB_DATASET}/{HUB_CONFIG}", val_windows=val)
    train_dir = _local_shards(cfg, cfg.path, tokenizer, "data.path")
    val_dir = _local_shards(cfg, cfg.val_path, tokenizer, "data.val_path") if cfg.val_path else None
    return shards_source(train_dir, seq_len=cfg.seq_len, val_sequences=cfg.val_sequences, seed=seed,
                         val_directory=val_dir, name=f"c4/{tokenizer.name}")
