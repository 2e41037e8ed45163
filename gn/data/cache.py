"""The data cache: one root, atomic writes, and one tokenise-once format for every source.

Every source that tokenises text (embedded, c4 local files, text) writes its
token stream once, in the `shards` format (`gn.data.shards`: raw uint16/uint32
ids plus `meta.json`), under

    cache_root(data.cache_dir) / <source> / <key>/

where the key hashes what the stream depends on (the input, the tokenizer, the
format version), so a changed input gets a new entry and an old entry is never
read for new text. An entry is built in a private temporary directory and
renamed into place, so a reader (a second process of the same sweep, say)
sees either nothing or a complete entry. Trained tokenizers live beside the
entries, under `<source>/tokenizers/`.

The root is `data.cache_dir` if set, else the toolkit's cache (`gn.runtime.cache_root`:
$GN_CACHE_DIR, then $XDG_CACHE_HOME/gn, then ~/.cache/gn), the one that also holds
the compiled-program cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable

from gn.errors import os_error

log = logging.getLogger(__name__)


def cache_root(cache_dir: str | None) -> Path:
    """Directory for trained tokenizers and tokenised corpora: `cache_dir` if given, else
    the toolkit's cache root (`gn.runtime.cache_root`)."""
    from gn.runtime import cache_root as default_root

    return Path(os.path.expanduser(cache_dir)) if cache_dir else default_root()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that concurrent readers see either nothing or the whole file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def cache_key(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts (the identity of a cache entry)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:20]


def entry_dir(cache_dir: str | None, source: str, key: str) -> Path:
    """The directory of one tokenised stream: `cache_root / source / key`."""
    return cache_root(cache_dir) / source / key


def tokenise_once(key_dir: Path, docs_factory: Callable[[], Iterable[str]], tokenizer, **kwargs) -> dict:
    """The shard directory `key_dir`, written from `docs_factory()` unless already complete; its meta.

    Safe against concurrent writers: each writes into a private temporary
    directory and renames it into place; the loser of the race drops its copy.
    `kwargs` go to `gn.data.shards.write_shards` (text_field, input_desc, ...).
    An OS refusal (full disk, read-only cache) is a RunError naming the cache.
    """
    from gn.data.shards import read_meta, write_shards

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
