"""The C4-format JSON-lines reader: one JSON object per line, the document in a text field.

Files are `.json` / `.jsonl`, optionally gzip-compressed (detected by content,
not by name); `resolve_files` accepts a file, a directory or a glob. Used by the
c4 source for local shards and by `scripts/pretokenize.py`. A malformed record
is a ConfigError naming the file and line, raised while reading (the pre-flight
`check_files` parses the first record of every file).
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import zlib
from pathlib import Path
from typing import Iterable, Iterator

from gn.errors import ConfigError

SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")


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
