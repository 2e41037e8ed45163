"""The embedded corpus: English text shipped with CPython, no files or network needed.

`pydoc_data.topics.topics` maps ~80 help-topic names to ~465 KB of English
prose and code. Its values, in sorted key order, are the documents. The token
stream is cached under `cache_dir/embedded/<tokenizer>-v<VERSION>-<corpus hash>/`
(tokenizer.json, tokens.npy, meta.json); the corpus hash makes the cache follow
the text of the running Python.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np

from gn.data.base import TokenWindows, WindowedSource, atomic_write_bytes, cache_root, holdout_source
from gn.data.config import DataConfig
from gn.data.tokenizer import ByteTokenizer, HFTokenizer, train_bpe

# Bump when the tokenisation or packing of the cached stream changes.
VERSION = 1


def corpus_documents() -> list[str]:
    """The documents of the embedded corpus, in sorted topic order."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def _cache_dir(cfg: DataConfig, docs: list[str]) -> Path:
    digest = hashlib.sha256("\0".join(docs).encode("utf-8")).hexdigest()[:12]
    name = "byte" if cfg.tokenizer == "byte" else f"bpe{cfg.vocab_size}"
    return cache_root(cfg.cache_dir) / "embedded" / f"{name}-v{VERSION}-{digest}"


def embedded_tokenizer(cfg: DataConfig) -> ByteTokenizer | HFTokenizer:
    """The tokenizer of the embedded source (BPE trained on first use, then cached), e.g. to decode samples."""
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    docs = corpus_documents()
    path = _cache_dir(cfg, docs) / "tokenizer.json"
    if path.is_file():
        from tokenizers import Tokenizer

        return HFTokenizer(Tokenizer.from_file(str(path)), f"bpe-{cfg.vocab_size}")
    return train_bpe(docs, cfg.vocab_size, path)


def embedded_tokens(cfg: DataConfig) -> tuple[np.ndarray, dict]:
    """The whole embedded token stream (each document followed by EOS) and its meta dict.

    Meta has vocab_size, eos_id, num_tokens, num_docs, tokenizer. Tokenises on
    first use (well under a second for BPE) and loads the cache afterwards.
    """
    docs = corpus_documents()
    directory = _cache_dir(cfg, docs)
    meta_path, tokens_path = directory / "meta.json", directory / "tokens.npy"
    if meta_path.is_file() and tokens_path.is_file():
        return np.load(tokens_path), json.loads(meta_path.read_text())
    tokenizer = embedded_tokenizer(cfg)
    tokens = np.concatenate(tokenizer.encode_docs(docs))
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    tokens = tokens.astype(dtype)
    meta = {"vocab_size": int(tokenizer.vocab_size), "eos_id": int(tokenizer.eos_id),
            "num_tokens": int(tokens.shape[0]), "num_docs": len(docs), "tokenizer": tokenizer.name,
            "version": VERSION}
    buffer = io.BytesIO()
    np.save(buffer, tokens)
    # tokens first, meta last: meta.json present means the entry is complete.
    atomic_write_bytes(tokens_path, buffer.getvalue())
    atomic_write_bytes(meta_path, json.dumps(meta, indent=1).encode("utf-8"))
    return tokens, meta


def build_embedded(cfg: DataConfig, *, seed: int) -> WindowedSource:
    """The embedded corpus as shuffled windows; the last `val_sequences` windows are the validation set."""
    tokens, meta = embedded_tokens(cfg)
    windows = TokenWindows([tokens], cfg.seq_len)
    return holdout_source(windows, cfg.val_sequences, seed=seed, vocab_size=meta["vocab_size"],
                          eos_id=meta["eos_id"], name=f"embedded/{meta['tokenizer']}")
