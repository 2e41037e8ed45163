#!/usr/bin/env python
"""Tokenise text into packed token shards for `data.source: shards`.

    python scripts/pretokenize.py --input 'c4/c4-train.0000*-of-01024.json.gz' \
        --tokenizer t5/tokenizer.json --out data/c4-t5 [--max-docs 100000]
    python scripts/pretokenize.py --input hub:allenai/c4:en:validation --tokenizer t5-base --out data/c4-val

`--input` is a local C4-format JSON-lines file (.json/.jsonl, optionally .gz),
a directory of them or a glob; plain-text files, one document per file (a
directory, searched recursively for .txt/.rst/.md/.text/.tex, or a glob; `--format
text`, chosen by itself when a directory holds no JSON-lines file); or
`hub:DATASET[:CONFIG[:SPLIT]]` to stream a Hugging Face dataset (needs network).

    python scripts/pretokenize.py --input /usr/share/doc/python3.11/html/_sources --format text \
        --tokenizer byte --out data/pydoc-byte Then train with
`data: {source: shards, path: OUT}` (and `val_path:` a second shard directory).
"""

from __future__ import annotations

import argparse
import sys
import time

from gn.data import text as text_source
from gn.data.jsonl import check_files, iter_documents
from gn.data.hub import LOCAL_HOWTO, offline_reason
from gn.data.shards import DEFAULT_SHARD_TOKENS, write_shards
from gn.data.tokenizer import load_tokenizer
from gn.errors import ConfigError


def _hub_documents(spec: str, text_field: str):
    parts = spec[len("hub:"):].split(":")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    reason = offline_reason()
    if reason is not None:
        raise ConfigError(f"--input {spec!r} streams from the Hugging Face Hub, which is not usable ({reason}). "
                          + LOCAL_HOWTO)
    import datasets

    for record in datasets.load_dataset(name, config, split=split, streaming=True):
        if text_field not in record:
            raise ConfigError(f"--input {spec!r}: records have no field {text_field!r}; fields: {sorted(record)}.")
        yield record[text_field]


def _format(args) -> str:
    """The input's format: as given, else text for a directory that holds no JSON-lines file."""
    if args.format != "auto":
        return args.format
    from pathlib import Path

    from gn.data.jsonl import SUFFIXES

    p = Path(args.input).expanduser()
    if p.is_dir() and not any(f.name.endswith(SUFFIXES) for f in p.iterdir()):
        return "text"
    return "jsonl"


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, tokenise, write the shards; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="file, directory, glob, or hub:DATASET[:CONFIG[:SPLIT]]")
    parser.add_argument("--tokenizer", required=True, help="tokenizer.json path, directory, Hub name, or 'byte'")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--format", choices=("auto", "jsonl", "text"), default="auto",
                        help="jsonl: C4-format JSON lines; text: one document per file; auto: jsonl unless the "
                             "input is a directory without JSON-lines files")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--eos-token", default=None, help="EOS token (default: detected, else added)")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS)
    parser.add_argument("--max-docs", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        if args.input.startswith("hub:"):
            docs = _hub_documents(args.input, args.text_field)
        elif _format(args) == "text":
            files = text_source.check_files(args.input, "--input")
            docs = text_source.documents(files, "--input")
        else:
            files = check_files(args.input, args.text_field, "--input")
            docs = iter_documents(files, args.text_field, "--input")
        tokenizer = load_tokenizer(args.tokenizer, args.eos_token)
        start = time.time()

        def progress(num_docs: int, num_tokens: int) -> None:
            rate = num_tokens / max(time.time() - start, 1e-9)
            print(f"\r{num_docs} docs, {num_tokens} tokens ({rate / 1e6:.2f} M tok/s)", end="", file=sys.stderr)

        meta = write_shards(docs, tokenizer, args.out, shard_tokens=args.shard_tokens, text_field=args.text_field,
                            input_desc=args.input, max_docs=args.max_docs, progress=progress)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"\nwrote {meta['num_tokens']} tokens of {meta['num_docs']} documents in {len(meta['shards'])} "
          f"shard(s) ({meta['dtype']}, vocab {meta['vocab_size']}, eos {meta['eos_id']}) to {args.out}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
