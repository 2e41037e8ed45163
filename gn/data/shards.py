"""The `shards` source and the shard format: pre-tokenised token shards on disk, read with np.memmap.

Fields read: `path` (the shard directory, written by `scripts/pretokenize.py`
or by any source's tokenise-once cache), `val_path` (a second shard directory
for validation; without it the held-out tail), `seq_len`, `val_sequences`.
The tokenizer is the one recorded in `meta.json`; `tokenizer` and
`vocab_size` are not read.

A shard directory holds `shard_00000.bin`, `shard_00001.bin`, ... (raw
little-endian uint16 ids when the vocab fits in 16 bits, else uint32), the
tokenizer's `tokenizer.json` when it has one, and `meta.json`:

    {"format": "gn-shards", "version": 1, "dtype": "uint16", "vocab_size": V,
     "eos_id": E, "eos_token": "</s>", "tokenizer": NAME, "tokenizer_fingerprint": ...,
     "text_field": "text", "input": DESCRIPTION, "num_docs": D, "num_tokens": N,
     "shards": [{"file": "shard_00000.bin", "num_tokens": n0}, ...]}

The shards are one continuous stream (each document followed by EOS) cut at
`shard_tokens`. `meta.json` is written last, so a directory without it is an
interrupted write.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from gn.data.base import TokenWindows, WindowedSource, holdout_source
from gn.data.cache import atomic_write_bytes
from gn.errors import ConfigError, os_error

log = logging.getLogger(__name__)

FORMAT, VERSION = "gn-shards", 1
DEFAULT_SHARD_TOKENS = 100_000_000
_BATCH_DOCS = 512


def shard_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in 16 bits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def write_shards(docs: Iterable[str], tokenizer, out_dir: str | os.PathLike, *,
                 shard_tokens: int = DEFAULT_SHARD_TOKENS, text_field: str = "text", input_desc: str = "",
                 max_docs: int | None = None, progress: Callable[[int, int], None] | None = None) -> dict:
    """Tokenise `docs` into shards under `out_dir` and return the meta dict.

    `tokenizer` is a gn.data.tokenizer ByteTokenizer or HFTokenizer. Stops after
    `max_docs` documents if given. `progress(num_docs, num_tokens)` is called
    after every batch of documents. Existing shards in `out_dir` are replaced.
    """
    if shard_tokens < 1:
        raise ConfigError(f"pretokenize: --shard-tokens must be positive, got {shard_tokens}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)
    for old in out.glob("shard_*.bin"):
        old.unlink()
    dtype = shard_dtype(tokenizer.vocab_size)
    shards: list[dict] = []
    state = {"file": None, "count": 0}
    num_docs = num_tokens = 0

    def close_shard() -> None:
        if state["file"] is not None:
            state["file"].close()
            shards[-1]["num_tokens"] = state["count"]
            state["file"], state["count"] = None, 0

    def write(tokens: np.ndarray) -> None:
        pos = 0
        while pos < tokens.shape[0]:
            if state["file"] is None:
                name = f"shard_{len(shards):05d}.bin"
                shards.append({"file": name, "num_tokens": 0})
                state["file"] = open(out / name, "wb")
            take = min(shard_tokens - state["count"], tokens.shape[0] - pos)
            state["file"].write(tokens[pos: pos + take].astype(dtype.newbyteorder("<")).tobytes())
            state["count"] += take
            pos += take
            if state["count"] == shard_tokens:
                close_shard()

    batch: list[str] = []
    try:
        for doc in docs:
            if max_docs is not None and num_docs + len(batch) >= max_docs:
                break
            batch.append(doc)
            if len(batch) == _BATCH_DOCS:
                num_tokens += _write_batch(tokenizer, batch, write)
                num_docs += len(batch)
                batch = []
                if progress:
                    progress(num_docs, num_tokens)
        if batch:
            num_tokens += _write_batch(tokenizer, batch, write)
            num_docs += len(batch)
            if progress:
                progress(num_docs, num_tokens)
    finally:
        close_shard()
    if num_tokens == 0:
        raise ConfigError(f"pretokenize: no documents were read from {input_desc or 'the input'}.")
    if hasattr(tokenizer, "tok"):
        atomic_write_bytes(out / "tokenizer.json", tokenizer.tok.to_str().encode("utf-8"))
    meta = {"format": FORMAT, "version": VERSION, "dtype": dtype.name, "vocab_size": int(tokenizer.vocab_size),
            "eos_id": int(tokenizer.eos_id), "eos_token": getattr(tokenizer, "eos_token", None),
            "tokenizer": tokenizer.name, "tokenizer_fingerprint": tokenizer.fingerprint,
            "text_field": text_field, "input": input_desc, "num_docs": num_docs, "num_tokens": num_tokens,
            "shards": shards}
    atomic_write_bytes(out / "meta.json", json.dumps(meta, indent=1).encode("utf-8"))
    return meta


def _write_batch(tokenizer, batch: list[str], write: Callable[[np.ndarray], None]) -> int:
    tokens = np.concatenate(tokenizer.encode_docs(batch))
    write(tokens)
    return int(tokens.shape[0])


def read_meta(directory: str | os.PathLike, what: str = "data.path") -> dict:
    """Load and check `meta.json` of a shard directory; ConfigError naming what is wrong."""
    d = Path(os.path.expanduser(str(directory)))
    howto = "write one with `python scripts/pretokenize.py --input FILES --tokenizer TOKENIZER --out DIR`."
    if not d.is_dir():
        raise ConfigError(f"{what}: the shard directory {str(d)!r} does not exist; {howto}")
    meta_path = d / "meta.json"
    if not meta_path.is_file():
        raise ConfigError(f"{what}: {str(d)!r} has no meta.json, so it is not a (complete) shard directory; {howto}")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{what}: cannot read {str(meta_path)!r} ({exc}).") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ConfigError(f"{what}: {str(meta_path)!r} is not a {FORMAT} meta file; {howto}")
    itemsize = np.dtype(meta["dtype"]).itemsize
    for shard in meta["shards"]:
        path = d / shard["file"]
        expected = shard["num_tokens"] * itemsize
        if not path.is_file() or path.stat().st_size != expected:
            size = path.stat().st_size if path.is_file() else "missing"
            raise ConfigError(
                f"{what}: shard {str(path)!r} should hold {expected} bytes but is {size}; the directory is "
                f"incomplete or was modified. Re-run scripts/pretokenize.py.")
    return meta


def open_shards(directory: str | os.PathLike, what: str = "data.path") -> tuple[list[np.ndarray], dict]:
    """Memory-map every shard of a directory (nothing is read yet); return (arrays, meta)."""
    meta = read_meta(directory, what)
    d = Path(os.path.expanduser(str(directory)))
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    arrays = [np.memmap(d / s["file"], dtype=dtype, mode="r", shape=(s["num_tokens"],))
              for s in meta["shards"] if s["num_tokens"] > 0]
    return arrays, meta


def shards_source(directory: str | os.PathLike, *, seq_len: int, val_sequences: int, seed: int,
                  val_directory: str | os.PathLike | None = None, name: str | None = None) -> WindowedSource:
    """A WindowedSource over a shard directory (validation: `val_directory` or the held-out tail)."""
    arrays, meta = open_shards(directory)
    val_windows = None
    if val_directory is not None:
        val_arrays, val_meta = open_shards(val_directory, "data.val_path")
        if val_meta["tokenizer_fingerprint"] != meta["tokenizer_fingerprint"]:
            raise ConfigError(
                f"data.val_path: the validation shards in {str(val_directory)!r} were tokenised with "
                f"{val_meta['tokenizer']!r}, the training shards with {meta['tokenizer']!r}; use the same tokenizer.")
        val_windows = TokenWindows(val_arrays, seq_len)
    return holdout_source(TokenWindows(arrays, seq_len), val_sequences, seed=seed, vocab_size=meta["vocab_size"],
                          eos_id=meta["eos_id"], name=name or f"shards/{meta['tokenizer']}", val_windows=val_windows)


def validate(cfg) -> None:
    """`path` is required (no file access here)."""
    if not cfg.path:
        raise ConfigError(
            "data.source 'shards' needs data.path: the directory written by scripts/pretokenize.py --out DIR.")


def check(cfg) -> None:
    """Pre-flight: the shard directories are complete (meta.json present, every shard of its size)."""
    read_meta(cfg.path, "data.path")
    if cfg.val_path is not None:
        read_meta(cfg.val_path, "data.val_path")


def build(cfg, *, seed: int) -> WindowedSource:
    """The shard directory as shuffled windows (validation: `val_path` or the held-out tail)."""
    return shards_source(cfg.path, seq_len=cfg.seq_len, val_sequences=cfg.val_sequences, seed=seed,
                         val_directory=cfg.val_path)


def tokenise_once(key_dir: Path, docs_factory: Callable[[], Iterable[str]], tokenizer, **kwargs) -> dict:
    """The shard directory `key_dir`, written from `docs_factory()` unless already complete; its meta.

    Safe against concurrent writers: each writes into a private temporary
    directory and renames it into place; the loser of the race drops its copy.
    `kwargs` go to `gn.data.shards.write_shards` (text_field, input_desc, ...).
    An OS refusal (full disk, read-only cache) is a RunError naming the cache.
    """
    if (key_dir / "meta.json").is_file():
        return read_meta(key_dir)
    log.info("tokenising %s into %s (once; cached)", kwargs.get("input_desc") or "the corpus", key_dir)
    tmp = key_dir.with_name(f".{key_dir.name}.{os.getpid()}.tmp")
    try:
        key_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            write_shards(docs_factory(), tokenizer, tmp, **kwargs)
            try:
                os.rename(tmp, key_dir)
            except OSError:
                if not (key_dir / "meta.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        raise os_error(exc, f"writing the tokenised data cache {key_dir} (data.cache_dir or GN_CACHE_DIR)") from None
    return read_meta(key_dir)
