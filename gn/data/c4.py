"""C4 text: local C4-format JSON-lines shards, or the `allenai/c4` "en" stream from the Hub.

Local files (`data.path`: a file, a directory or a glob of `.json`/`.jsonl`,
optionally `.gz`) are tokenised once into a shard cache under
`cache_dir/c4/<key>/` (key: the files' paths, sizes and mtimes, the tokenizer
and the text field), then served like the `shards` source: shuffled windows,
epochs, exact resume.

With `data.path: null` documents are streamed from the Hub in stream order (the
run seed does not reorder them) and packed on the fly; the position is the
`datasets` stream state at a chunk of documents plus the document and token
offset inside it, so resuming is exact without re-reading the stream. The
validation set is packed from the start of the "validation" split.
"""

from __future__ import annotations

import copy
import glob
import gzip
import zlib
import hashlib
import json
import logging
import os
from collections import deque
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from gn.data import hub
from gn.data.base import TokenWindows, cache_root, check_counts, check_state, split_validation
from gn.data.config import DataConfig
from gn.data.shards import build_cached_shards, open_shards, shards_source
from gn.data.tokenizer import check_tokenizer, load_tokenizer
from gn.errors import ConfigError, os_error

log = logging.getLogger(__name__)

HUB_DATASET, HUB_CONFIG = "allenai/c4", "en"
SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
# Bump when the cached tokenisation of local files changes.
CACHE_VERSION = 1
_CHUNK_DOCS = 256


def resolve_files(path: str, what: str = "data.path") -> list[Path]:
    """The JSON-lines files named by a file, a directory (its *.json[l][.gz]) or a glob, sorted."""
    expanded = os.path.expanduser(path)
    if any(ch in expanded for ch in "*?["):
        files = [Path(p) for p in sorted(glob.glob(expanded, recursive=True)) if os.path.isfile(p)]
        if not files:
            raise ConfigError(f"{what}: the pattern {path!r} matches no file.")
        return files
    p = Path(expanded)
    if p.is_dir():
        # A directory may also hold tokenizer.json, dataset_info.json...: keep JSON-lines files only.
        files = sorted(f for f in p.iterdir() if f.is_file() and f.name.endswith(SUFFIXES) and _is_jsonl(f))
        if not files:
            patterns = ", ".join("*" + s for s in SUFFIXES)
            raise ConfigError(f"{what}: the directory {path!r} holds no C4-format JSON-lines file ({patterns}).")
        return files
    if not p.is_file():
        raise ConfigError(
            f"{what}: the file {path!r} does not exist. Give a local C4-format JSON-lines file "
            "(e.g. c4-train.00000-of-01024.json.gz), a directory of them, or a glob.")
    return [p]


def _open_text(path: Path):
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rt", encoding="utf-8") if gzipped else open(path, "rt", encoding="utf-8")


def _is_jsonl(path: Path) -> bool:
    try:
        with _open_text(path) as f:
            return isinstance(json.loads(f.readline()), dict)
    except (OSError, EOFError, UnicodeDecodeError, ValueError, zlib.error):
        return False


def _parse(line: str, path: Path, lineno: int, text_field: str, what: str) -> str:
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise ConfigError(
            f"{what}: line {lineno} of {str(path)!r} is not valid JSON ({exc}); C4-format files hold one JSON "
            "object per line.") from None
    if not isinstance(record, dict):
        raise ConfigError(f"{what}: line {lineno} of {str(path)!r} is not a JSON object; expected one record per line.")
    if text_field not in record:
        raise ConfigError(
            f"{what}: the record on line {lineno} of {str(path)!r} has no field {text_field!r} "
            f"(data.text_field); its fields are {sorted(record)}. Set data.text_field to the field holding the text.")
    text = record[text_field]
    if not isinstance(text, str):
        raise ConfigError(
            f"{what}: field {text_field!r} on line {lineno} of {str(path)!r} is a {type(text).__name__}, not text.")
    return text


def iter_documents(files: Iterable[Path], text_field: str, what: str = "data.path") -> Iterator[str]:
    """Texts of every record of the files, in order; ConfigError on a malformed record."""
    for path in files:
        try:
            with _open_text(path) as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        yield _parse(line, path, lineno, text_field, what)
        except (OSError, EOFError, UnicodeDecodeError, zlib.error) as exc:
            # gzip.BadGzipFile (an OSError), zlib.error and EOFError: a damaged or truncated file.
            damaged = "" if type(exc) in (OSError, PermissionError, FileNotFoundError) else (
                " The file looks damaged or truncated; download it again.")
            raise ConfigError(f"{what}: cannot read {str(path)!r} ({exc.__class__.__name__}: {exc}).{damaged}") from None


def check_files(path: str, text_field: str, what: str = "data.path") -> list[Path]:
    """Resolve the files and parse the first record of each (cheap); return the files."""
    files = resolve_files(path, what)
    for f in files:
        for _ in iter_documents([f], text_field, what):
            break
        else:
            raise ConfigError(f"{what}: {str(f)!r} holds no record.")
    return files


def check_c4(cfg: DataConfig) -> None:
    """Pre-flight for the c4 source: tokenizer usable, local files readable, or the Hub reachable."""
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
    check_tokenizer(cfg.tokenizer_name())


def _cache_key(files: list[Path], tokenizer, text_field: str) -> str:
    ident = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    blob = json.dumps([CACHE_VERSION, ident, tokenizer.fingerprint, text_field])
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def _local_shards(cfg: DataConfig, path: str, tokenizer, what: str) -> Path:
    files = resolve_files(path, what)
    key_dir = cache_root(cfg.cache_dir) / "c4" / _cache_key(files, tokenizer, cfg.text_field)
    if not (key_dir / "meta.json").is_file():
        log.info("tokenising %d local file(s) from %s into %s (once; cached)", len(files), path, key_dir)
    try:
        build_cached_shards(key_dir, lambda: iter_documents(files, cfg.text_field, what), tokenizer,
                            text_field=cfg.text_field, input_desc=path)
    except OSError as exc:
        raise os_error(exc, f"writing the tokenised data cache {key_dir} (data.cache_dir or GN_CACHE_DIR)") from None
    return key_dir


def build_c4(cfg: DataConfig, *, seed: int):
    """The c4 source: cached local shards (`path` set) or a Hub stream (`path` None)."""
    tokenizer = load_tokenizer(cfg.tokenizer_name(), cfg.eos_token)
    if cfg.path is None:
        import datasets

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


class _Packer:
    """Packs a `datasets` IterableDataset of documents into stride-seq_len windows.

    `docs` holds [chunk_state, index_in_chunk, length, epoch] for every document
    whose tokens are (partly) in `buf`; `head_off` tokens of the first one are
    spent. A chunk's state is the stream position before its first document.
    """

    def __init__(self, open_dataset: Callable, tokenizer, text_field: str, seq_len: int):
        self.open_dataset, self.tokenizer = open_dataset, tokenizer
        self.text_field, self.seq_len = text_field, seq_len
        self.epoch = 0
        self._ds = self._it = None
        self._read_since_open = 0
        self._opened_at_start = True
        self.buf = np.empty(0, dtype=np.int32)
        self.docs: deque = deque()
        self.head_off = 0

    def _open(self, stream_state: dict | None = None) -> None:
        self._ds = self.open_dataset()
        if stream_state is not None:
            self._ds.load_state_dict(copy.deepcopy(stream_state))
        self._it = iter(self._ds)
        self._read_since_open = 0
        self._opened_at_start = stream_state is None

    def _read_chunk(self) -> None:
        if self._ds is None:
            self._open()
        state = copy.deepcopy(self._ds.state_dict())
        texts = []
        for record in self._it:
            if self.text_field not in record:
                raise ConfigError(
                    f"data: a streamed record has no field {self.text_field!r} (data.text_field); its fields "
                    f"are {sorted(record)}.")
            texts.append(record[self.text_field])
            if len(texts) == _CHUNK_DOCS:
                break
        if not texts:  # end of the stream: start the next epoch from the beginning
            if self._read_since_open == 0 and self._opened_at_start:
                raise ConfigError("data: the document stream is empty.")
            self.epoch += 1
            self._open()
            return
        self._read_since_open += len(texts)
        encoded = self.tokenizer.encode_docs(texts)
        for j, ids in enumerate(encoded):
            self.docs.append([state, j, ids.shape[0], self.epoch])
        self.buf = np.concatenate([self.buf, *encoded])

    def take(self, count: int) -> np.ndarray:
        """The next `count` windows [count, seq_len + 1]."""
        L = self.seq_len
        out = np.empty((count, L + 1), dtype=np.int32)
        for r in range(count):
            while self.buf.shape[0] < L + 1:
                self._read_chunk()
            out[r] = self.buf[: L + 1]
            self._advance(L)
        return out

    def _advance(self, n: int) -> None:
        self.buf = self.buf[n:]
        self.head_off += n
        while self.docs and self.head_off >= self.docs[0][2]:
            self.head_off -= self.docs.popleft()[2]

    def state(self) -> dict:
        if self.docs:
            chunk_state, j, _, epoch = self.docs[0]
        else:
            chunk_state = copy.deepcopy(self._ds.state_dict()) if self._ds is not None else None
            j, epoch = 0, self.epoch
        return {"epoch": epoch, "stream": chunk_state, "doc": j, "offset": self.head_off}

    def restore(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self._open(state["stream"])
        self.buf = np.empty(0, dtype=np.int32)
        self.docs.clear()
        self.head_off = 0
        skip = int(state["doc"])
        while len(self.docs) < skip + 1:
            self._read_chunk()
        skipped = sum(self.docs.popleft()[2] for _ in range(skip))
        self.buf = self.buf[skipped:]
        self._advance(int(state["offset"]))


class StreamSource:
    """Windows packed on the fly from a document stream, in stream order.

    `open_train()` / `open_val()` return fresh `datasets` IterableDatasets;
    the validation set is the first `val_sequences` windows of the validation
    stream (or of `val_windows` when given), read on first use.
    """

    loss_floor = None

    def __init__(self, open_train: Callable, open_val: Callable | None, tokenizer, cfg: DataConfig, *,
                 seed: int, name: str, val_windows=None):
        self.vocab_size, self.eos_id = int(tokenizer.vocab_size), int(tokenizer.eos_id)
        self.seq_len, self.seed, self.name = cfg.seq_len, int(seed), name
        self.val_sequences = cfg.val_sequences
        self.tokens_consumed = 0
        self._train = _Packer(open_train, tokenizer, cfg.text_field, cfg.seq_len)
        self._open_val, self._val_windows = open_val, val_windows
        self._tokenizer, self._text_field = tokenizer, cfg.text_field
        self._val: np.ndarray | None = None

    def next(self, num_batches: int, batch_size: int) -> np.ndarray:
        """Return the next int32 [num_batches, batch_size, seq_len + 1] windows of the stream."""
        check_counts(num_batches, batch_size)
        m = num_batches * batch_size
        out = self._train.take(m)
        self.tokens_consumed += m * self.seq_len
        return out.reshape(num_batches, batch_size, self.seq_len + 1)

    def validation(self, batch_size: int) -> np.ndarray:
        """Return the fixed validation windows as [val_sequences // batch_size, batch_size, seq_len + 1]."""
        if self._val is None:
            if self._val_windows is not None:
                if len(self._val_windows) < self.val_sequences:
                    raise ConfigError(
                        f"data.val_path has only {len(self._val_windows)} windows, fewer than "
                        f"data.val_sequences={self.val_sequences}.")
                self._val = self._val_windows.gather(np.arange(self.val_sequences))
            else:
                packer = _Packer(self._open_val, self._tokenizer, self._text_field, self.seq_len)
                self._val = packer.take(self.val_sequences)
                if packer.epoch:
                    raise ConfigError(
                        f"data: the validation stream holds fewer than data.val_sequences={self.val_sequences} "
                        f"windows of {self.seq_len + 1} tokens.")
        return split_validation(self._val, batch_size)

    def _identity(self) -> dict:
        return {"source": self.name, "seq_len": self.seq_len}

    def state_dict(self) -> dict:
        """Return {"kind": "stream", epoch, stream state, doc, offset, tokens_consumed}."""
        return {"kind": "stream", **self._identity(), **self._train.state(), "tokens_consumed": self.tokens_consumed}

    def load_state_dict(self, state: dict) -> None:
        """Resume the stream at a saved position (re-opens the stream there)."""
        check_state(state, "stream", self._identity())
        self._train.restore(state)
        self.tokens_consumed = int(state["tokens_consumed"])
