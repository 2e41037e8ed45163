"""The `embedded` source: English text shipped with CPython, no files or network needed.

Fields read: `tokenizer` ("bpe": a byte-level BPE with `vocab_size` ids,
trained locally on the corpus; or "byte": 256 bytes + EOS = 257 ids),
`vocab_size`, `seq_len`, `val_sequences`, `cache_dir`.

`pydoc_data.topics.topics` maps ~80 help-topic names to ~465 KB of English
prose and code; its values, in sorted key order, are the documents. The token
stream is tokenised once into the data cache (`gn.data.cache`: the shard format
under `embedded/<tokenizer>-v<VERSION>-<corpus hash>/`), the trained BPE under
`embedded/tokenizers/`; the corpus hash makes both follow the text of the
running Python. The last `val_sequences` windows are the validation set.
"""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path

from gn.data.base import TokenWindows, WindowedSource, holdout_source
from gn.data.cache import cache_root, entry_dir
from gn.data.config import DataConfig
from gn.data.shards import open_shards, tokenise_once
from gn.data.tokenizer import ByteTokenizer, HFTokenizer, cached_bpe
from gn.errors import ConfigError, suggest

# Bump when the tokenisation or packing of the cached stream changes (2: the shard format).
VERSION = 2


def validate(cfg: DataConfig) -> None:
    """The tokenizer is "bpe" (with room for at least one merge) or "byte"."""
    if cfg.tokenizer not in ("bpe", "byte"):
        raise ConfigError(
            f"data.tokenizer {cfg.tokenizer!r} is not available for the embedded source; "
            "use 'bpe' (byte-level BPE trained locally, data.vocab_size entries) or 'byte' (257 ids)."
            + suggest(cfg.tokenizer, ("bpe", "byte")))
    if cfg.tokenizer == "bpe" and cfg.vocab_size < 258:
        raise ConfigError(
            f"data.vocab_size {cfg.vocab_size} is too small for a byte-level BPE: it needs the "
            "256 byte symbols, the EOS token and at least one merge (>= 258). Use tokenizer: byte "
            "for a pure byte vocabulary.")


def check(cfg: DataConfig) -> None:
    """Pre-flight: this Python ships the corpus (pydoc_data)."""
    try:
        importlib.import_module("pydoc_data.topics")
    except ImportError:
        raise ConfigError(
            "data.source 'embedded' needs the pydoc_data module of the Python standard library, which this "
            "Python lacks; use data.source: synthetic, or c4/shards/text with local files.") from None


def trained_vocab(cfg: DataConfig) -> int | None:
    """The vocabulary size the source trains (BPE), or None (bytes)."""
    return cfg.vocab_size if cfg.tokenizer == "bpe" else None


def corpus_documents() -> list[str]:
    """The documents of the embedded corpus, in sorted topic order."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def _names(cfg: DataConfig, docs: list[str]) -> tuple[str, str]:
    digest = hashlib.sha256("\0".join(docs).encode("utf-8")).hexdigest()[:12]
    return ("byte" if cfg.tokenizer == "byte" else f"bpe{cfg.vocab_size}"), digest


def _tokenizer_path(cfg: DataConfig, docs: list[str]) -> Path:
    name, digest = _names(cfg, docs)
    return cache_root(cfg.cache_dir) / "embedded" / "tokenizers" / f"{name}-{digest}.json"


def embedded_tokenizer(cfg: DataConfig) -> ByteTokenizer | HFTokenizer:
    """The tokenizer of the embedded source (BPE trained on first use, then cached), e.g. to decode samples."""
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    docs = corpus_documents()
    return cached_bpe(_tokenizer_path(cfg, docs), lambda: docs, cfg.vocab_size)


def build(cfg: DataConfig, *, seed: int) -> WindowedSource:
    """The embedded corpus as shuffled windows; the last `val_sequences` windows are the validation set."""
    docs = corpus_documents()
    name, digest = _names(cfg, docs)
    key_dir = entry_dir(cfg.cache_dir, "embedded", f"{name}-v{VERSION}-{digest}")
    if not (key_dir / "meta.json").is_file():
        tokenise_once(key_dir, lambda: docs, embedded_tokenizer(cfg), input_desc="pydoc_data.topics")
    arrays, meta = open_shards(key_dir)
    return holdout_source(TokenWindows(arrays, cfg.seq_len), cfg.val_sequences, seed=seed,
                          vocab_size=meta["vocab_size"], eos_id=meta["eos_id"], name=f"embedded/{meta['tokenizer']}")
