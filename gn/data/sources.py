"""The table of data sources: a source is one module with `validate`, `check` and `build`.

    validate(cfg)          cheap consistency of the source's own fields; no file or network access
    check(cfg)             the pre-flight: files, tokenizer, Hub; before any compute, ConfigError
    build(cfg, *, seed)    the BatchSource (gn.data.base), `seed` fixing the training order
    trained_vocab(cfg)     optional: the vocabulary size the source trains itself (a local BPE)

Adding a source is one module with these functions and one line here. Modules
are imported on first use, so a source's dependencies (the `datasets` client, a
tokenizer) cost nothing to runs that do not read it. Each module's docstring
says which DataConfig fields it reads and what they mean there.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from gn.errors import ConfigError, suggest

SOURCES: dict[str, str] = {
    "embedded": "gn.data.embedded",    # CPython's own English text; no files, no network
    "synthetic": "gn.data.synthetic",  # a Markov language with a known loss floor
    "c4": "gn.data.c4",                # C4-format JSON-lines files, or the Hub stream
    "shards": "gn.data.shards",        # packed token shards (scripts/pretokenize.py)
    "text": "gn.data.text",            # plain-text files, one document per file
}


def source_module(name: str) -> ModuleType:
    """The module of a source by its `data.source` name (ConfigError for an unknown one)."""
    if name not in SOURCES:
        raise ConfigError(f"data.source {name!r} is not known; choose one of {', '.join(SOURCES)}."
                          + suggest(str(name), tuple(SOURCES)))
    return importlib.import_module(SOURCES[name])


def trained_vocab(cfg) -> int | None:
    """The vocabulary size the configured source trains (None when the vocabulary comes with the data)."""
    fn = getattr(source_module(cfg.source), "trained_vocab", None)
    return fn(cfg) if fn is not None else None
