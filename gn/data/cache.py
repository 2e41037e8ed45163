"""The data cache: one root, atomic writes, and one tokenise-once format for every source.

Every source that tokenises text (embedded, c4 local files, text) writes its
token stream once, in the `shards` format (`gn.data.shards`: raw uint16/uint32
ids plus `meta.json`), under

    cache_root(data.cache_dir) / <source> / <key>/

where the key hashes what the stream depends on (the input, the tokenizer, the
format version), so a changed input gets a new entry and an old entry is never
read for new text. An entry is built in a private temporary directory and
renamed into place (`gn.data.shards.tokenise_once`), so a reader (a second
process of the same sweep, say) sees either nothing or a complete entry. Trained tokenizers live beside the
entries, under `<source>/tokenizers/`.

The root is `data.cache_dir` if set, else the toolkit's cache (`gn.runtime.cache_root`:
$GN_CACHE_DIR, then $XDG_CACHE_HOME/gn, then ~/.cache/gn), the one that also holds
the compiled-program cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any



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
