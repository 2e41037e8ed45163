"""The `text` source: plain-text files, one document per file, validation on held-out documents.

Fields read: `path` (a directory, searched recursively for files ending in
`TEXT_SUFFIXES`, or a glob, every matched file taken), `val_path` (optional
validation files, given the same way), `tokenizer` ("bpe": a byte-level BPE with
`vocab_size` ids trained locally on the documents of `path`; "byte"; or a Hugging
Face tokenizer name / tokenizer.json path), `eos_token`, `seq_len`,
`val_sequences`, `val_documents`, `cache_dir`.

    data: {source: text, path: /usr/share/doc/python3.11/html/_sources, tokenizer: bpe, vocab_size: 4096}

The documents are tokenised once into the data cache (`gn.data.cache`; key: the
files' paths, sizes and mtimes and the tokenizer) in a fixed pseudo-random order
(sorted by a hash of each file's path relative to the input), so that the stream's
tail is a sample of the corpus rather than its alphabetically last directory.
Without `val_path` the validation set is held out by whole documents: the fewest
documents at the tail of that order whose windows number at least
`val_sequences`, or `val_documents` if that is more; the `val_sequences`
windows are spread evenly over them (a few long documents would otherwise make
the whole validation set); training reads only the documents before them, so no
token of a validation document is ever trained on. (The BPE's merges are learnt from every
document of `path`, as a tokenizer's usually are from its corpus; no model
parameter sees the validation text.)
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from gn.data.base import TokenWindows, WindowedSource, holdout_source
from gn.data.cache import cache_key, cache_root, entry_dir
from gn.data.config import DataConfig
from gn.data.shards import open_shards, tokenise_once
from gn.data.tokenizer import cached_bpe, check_tokenizer, load_tokenizer
from gn.errors import ConfigError

TEXT_SUFFIXES = (".txt", ".text", ".rst", ".md", ".tex")
# Bump when the tokenisation, the document order or the packing changes.
CACHE_VERSION = 1
# Bytes decoded per file by the pre-flight check (the whole file is read when it is tokenised).
_CHECK_BYTES = 1 << 16


def validate(cfg: DataConfig) -> None:
    """`path` is required; a locally trained BPE needs room for one merge."""
    if not cfg.path:
        raise ConfigError(
            "data.source 'text' needs data.path: a directory of text files (one document per file; "
            f"{', '.join(TEXT_SUFFIXES)}) or a glob naming them.")
    if cfg.tokenizer == "bpe" and cfg.vocab_size < 258:
        raise ConfigError(
            f"data.vocab_size {cfg.vocab_size} is too small for a byte-level BPE: it needs the 256 byte "
            "symbols, the EOS token and at least one merge (>= 258). Use tokenizer: byte for bytes.")


def trained_vocab(cfg: DataConfig) -> int | None:
    """The vocabulary size the source trains (BPE), or None (bytes, or a given tokenizer)."""
    return cfg.vocab_size if cfg.tokenizer == "bpe" else None


def resolve_files(path: str, what: str = "data.path") -> tuple[Path, list[Path]]:
    """(root, files): the text files a directory (recursively, by suffix) or a glob names, sorted."""
    expanded = os.path.expanduser(path)
    if any(ch in expanded for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
        if not files:
            raise ConfigError(f"{what}: the pattern {path!r} matches no file.")
        root = Path(os.path.commonpath([str(f.parent) for f in files]))
        return root, files
    root = Path(expanded)
    if root.is_file():
        return root.parent, [root]
    if not root.is_dir():
        raise ConfigError(f"{what}: {path!r} is neither a directory nor a file nor a glob that matches files.")
    files = sorted(f for f in root.rglob("*") if f.is_file() and f.name.lower().endswith(TEXT_SUFFIXES))
    if not files:
        raise ConfigError(
            f"{what}: the directory {path!r} holds no text file ({', '.join('*' + s for s in TEXT_SUFFIXES)}, "
            "searched recursively); give a glob to name other files.")
    return root, files


def _ordered(root: Path, files: list[Path]) -> list[Path]:
    """The files in the stream's order: by a hash of the path relative to the input's root."""
    def key(f: Path) -> str:
        return hashlib.sha256(str(f.relative_to(root)).encode("utf-8")).hexdigest()
    return sorted(files, key=key)


def _read(f: Path, what: str) -> str:
    try:
        return f.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what}: {str(f)!r} is not UTF-8 text ({exc}).") from None
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {str(f)!r} ({exc.__class__.__name__}: {exc}).") from None


def documents(files: list[Path], what: str = "data.path") -> Iterator[str]:
    """The text of every file that holds more than white space, in the given order."""
    for f in files:
        text = _read(f, what)
        if text.strip():
            yield text


def check_files(path: str, what: str = "data.path") -> list[Path]:
    """Pre-flight: the files exist and start as UTF-8 text (the first 64 KB of each); return them."""
    _, files = resolve_files(path, what)
    for f in files:
        try:
            with open(f, "rb") as fh:
                head = fh.read(_CHECK_BYTES)
            codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{what}: {str(f)!r} is not UTF-8 text ({exc}).") from None
        except OSError as exc:
            raise ConfigError(f"{what}: cannot read {str(f)!r} ({exc.__class__.__name__}: {exc}).") from None
    return files


def check(cfg: DataConfig) -> None:
    """Pre-flight: the files are readable text, and a named tokenizer is usable."""
    check_files(cfg.path, "data.path")
    if cfg.val_path is not None:
        check_files(cfg.val_path, "data.val_path")
    if cfg.tokenizer != "bpe":
        check_tokenizer(cfg.tokenizer)


def _identity(files: list[Path]) -> list:
    return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def _tokenizer(cfg: DataConfig, root: Path, files: list[Path]):
    if cfg.tokenizer != "bpe":
        return load_tokenizer(cfg.tokenizer, cfg.eos_token)
    key = cache_key(CACHE_VERSION, "bpe", cfg.vocab_size, _identity(files))
    path = cache_root(cfg.cache_dir) / "text" / "tokenizers" / f"bpe{cfg.vocab_size}-{key}.json"
    return cached_bpe(path, lambda: list(documents(_ordered(root, files))), cfg.vocab_size)


def _stream(cfg: DataConfig, path: str, tokenizer, what: str) -> tuple[list[np.ndarray], dict]:
    root, files = resolve_files(path, what)
    key_dir = entry_dir(cfg.cache_dir, "text", cache_key(CACHE_VERSION, _identity(files), tokenizer.fingerprint))
    ordered = _ordered(root, files)
    tokenise_once(key_dir, lambda: documents(ordered, what), tokenizer, input_desc=path)
    return open_shards(key_dir, what)


def split_documents(arrays: list[np.ndarray], eos_id: int, seq_len: int, val_sequences: int,
                    min_documents: int = 1) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    """(train segments, validation segments, validation documents): whole documents off the stream's tail.

    Documents end at their EOS. Walking back from the end, documents join the
    validation part until its windows (stride `seq_len`, never across a shard)
    number at least `val_sequences` and it holds at least `min_documents`; the
    training part is everything before them, so the two share no token.
    """
    flat_ends = []                                   # (shard, index after EOS) of every document, in order
    for s, a in enumerate(arrays):
        flat_ends += [(s, int(i) + 1) for i in np.flatnonzero(np.asarray(a) == eos_id)]
    for n_val in range(max(1, min_documents), len(flat_ends)):
        s, cut = flat_ends[-n_val - 1]               # the end of the last training document
        val = [arrays[s][cut:]] + list(arrays[s + 1:])
        if len(TokenWindows(val, seq_len)) >= val_sequences:
            train = list(arrays[:s]) + [arrays[s][:cut]]
            return [a for a in train if len(a)], [a for a in val if len(a)], n_val
    total = len(TokenWindows(arrays, seq_len))
    raise ConfigError(
        f"data: the text corpus has {len(flat_ends)} documents and {total} windows of {seq_len + 1} tokens; "
        f"holding out whole documents for data.val_sequences={val_sequences} windows (and at least "
        f"{min_documents} documents) leaves no document to train on. Lower data.val_sequences, "
        "data.val_documents or data.seq_len, or give data.val_path.")


def select_documents(arrays: list[np.ndarray], eos_id: int, share: tuple[float, float]) -> list[np.ndarray]:
    """The documents [⌊lo·n⌋, ⌊hi·n⌋) of the n in `arrays` (in order; each ends at its EOS), as
    segments: one contiguous slice of the stream, so the windows of [0, a) and [a, 1) share no token."""
    ends = [(s, int(i) + 1) for s, a in enumerate(arrays) for i in np.flatnonzero(np.asarray(a) == eos_id)]
    n = len(ends)
    first, last = int(share[0] * n), int(share[1] * n)
    if last <= first:
        raise ConfigError(f"data.train_documents {list(share)!r} selects no document of the {n} training "
                          "documents; widen the range.")
    start = (0, 0) if first == 0 else ends[first - 1]
    stop = ends[last - 1]
    if start[0] == stop[0]:
        return [arrays[start[0]][start[1]:stop[1]]]
    return [a for a in [arrays[start[0]][start[1]:], *arrays[start[0] + 1:stop[0]], arrays[stop[0]][:stop[1]]]
            if len(a)]


def build(cfg: DataConfig, *, seed: int) -> WindowedSource:
    """The text files as shuffled windows, validated on held-out documents (or on `val_path`)."""
    root, files = resolve_files(cfg.path, "data.path")
    tokenizer = _tokenizer(cfg, root, files)
    arrays, meta = _stream(cfg, cfg.path, tokenizer, "data.path")
    name = f"text/{meta['tokenizer']}"
    if cfg.val_path is not None:
        val_arrays, _ = _stream(cfg, cfg.val_path, tokenizer, "data.val_path")
        if cfg.train_documents is not None:
            arrays = select_documents(arrays, meta["eos_id"], cfg.train_documents)
        return holdout_source(TokenWindows(arrays, cfg.seq_len), cfg.val_sequences, seed=seed,
                              vocab_size=meta["vocab_size"], eos_id=meta["eos_id"], name=name,
                              val_windows=TokenWindows(val_arrays, cfg.seq_len))
    train, val, n_val = split_documents(arrays, meta["eos_id"], cfg.seq_len, cfg.val_sequences,
                                        cfg.val_documents or 1)
    if cfg.train_documents is not None:     # the validation documents are held out first, the same for every share
        train = select_documents(train, meta["eos_id"], cfg.train_documents)
    val_windows, train_windows = TokenWindows(val, cfg.seq_len), TokenWindows(train, cfg.seq_len)
    # Evenly spread over the held-out documents (distinct indices: there are at least val_sequences).
    index = np.linspace(0, len(val_windows) - 1, cfg.val_sequences).round().astype(np.int64)
    source = WindowedSource(train_windows, len(train_windows), val_windows.gather(index), seed=seed,
                            vocab_size=meta["vocab_size"], eos_id=meta["eos_id"], name=name)
    source.val_documents = n_val
    return source
