"""The `text` source (plain-text files, held-out documents) and the table of sources."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from gn.data import SOURCES, DataConfig, build_source, check_data, source_module
from gn.data.tokenizer import ByteTokenizer
from gn.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
WORDS = "gauss newton curvature batch step token layer muon adam search damping window".split()


def _corpus(d: Path, n: int = 40, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        # a marker every few words: any window of a document names it
        words = list(rng.choice(WORDS, size=int(rng.integers(20, 120))))
        text = " ".join(f"D{i:03d} {w}" if k % 3 == 0 else w for k, w in enumerate(words)) + ".\n"
        sub = d / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"doc{i:03d}.rst").write_text(text, encoding="utf-8")
        docs.append(text)
    (d / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")     # not a text suffix: never read
    (d / "empty.txt").write_text("  \n")                            # white space only: no document
    return docs


def _cfg(d: Path, cache: Path, **kw) -> DataConfig:
    base = dict(source="text", path=str(d), tokenizer="byte", seq_len=16, val_sequences=8, cache_dir=str(cache))
    return DataConfig(**{**base, **kw})


def test_every_source_module_has_the_interface():
    for name in SOURCES:
        module = source_module(name)
        for fn in ("validate", "check", "build"):
            assert callable(getattr(module, fn)), (name, fn)
    with pytest.raises(ConfigError, match="not known.*text"):
        DataConfig(source="txt").validate()


def test_validation_is_whole_held_out_documents(tmp_path):
    docs = _corpus(tmp_path / "corpus")
    src = build_source(_cfg(tmp_path / "corpus", tmp_path / "cache"), seed=0)
    eos = ByteTokenizer.eos_id
    train_ids = np.concatenate([np.asarray(a) for a in src.windows.segments])
    assert train_ids[-1] == eos                       # training ends at a document's end
    train_docs = [bytes(d[:-1].astype(np.uint8)).decode() for d in np.split(train_ids, np.flatnonzero(train_ids == eos) + 1)
                  if len(d)]
    assert set(train_docs) <= set(docs) and len(set(train_docs)) == len(train_docs)
    held_out = [d for d in docs if d not in set(train_docs)]
    assert len(held_out) == src.val_documents >= 1
    assert len(train_docs) + len(held_out) == len(docs)           # the empty file is no document
    # Every piece of every validation window lies inside a held-out document (none in a training one).
    for w in src.validation(8).reshape(-1, 17):
        for piece in np.split(w, np.flatnonzero(w == eos)):
            text = bytes(piece[piece != eos].astype(np.uint8)).decode()
            if text:
                assert any(text in h for h in held_out), text
    import re
    markers = lambda texts: set(re.findall(r"D\d{3}", " ".join(texts)))
    val_text = " ".join(bytes(w[w != eos].astype(np.uint8)).decode() for w in src.validation(8).reshape(-1, 17))
    assert markers([val_text]) and markers([val_text]) <= markers(held_out)
    assert not markers([val_text]) & markers(train_docs)


def test_order_is_by_path_hash_and_the_cache_is_reused(tmp_path):
    _corpus(tmp_path / "corpus")
    cfg = _cfg(tmp_path / "corpus", tmp_path / "cache")
    a = build_source(cfg, seed=3)
    entries = sorted((tmp_path / "cache" / "text").iterdir())
    b = build_source(cfg, seed=3)
    assert sorted((tmp_path / "cache" / "text").iterdir()) == entries       # tokenised once
    assert np.array_equal(a.next(2, 4), b.next(2, 4))
    assert np.array_equal(a.validation(4), b.validation(4))
    c = build_source(cfg, seed=4)
    assert np.array_equal(a.validation(4), c.validation(4))                # the seed orders training only
    # Resume is exact.
    state = json.loads(json.dumps(a.state_dict()))
    d = build_source(cfg, seed=3)
    d.load_state_dict(state)
    assert np.array_equal(a.next(3, 4), d.next(3, 4))


def test_bpe_and_val_path(tmp_path):
    _corpus(tmp_path / "train", n=30, seed=1)
    _corpus(tmp_path / "val", n=10, seed=2)
    cfg = _cfg(tmp_path / "train", tmp_path / "cache", tokenizer="bpe", vocab_size=300, val_path=str(tmp_path / "val"))
    src = build_source(cfg, seed=0)
    assert src.vocab_size <= 300
    assert not hasattr(src, "val_documents")                       # every training document trains
    assert src.validation(4).max() < src.vocab_size
    assert (tmp_path / "cache" / "text" / "tokenizers").is_dir()


def test_bad_text_inputs_fail_before_compute(tmp_path):
    with pytest.raises(ConfigError, match="needs data.path"):
        DataConfig(source="text").validate()
    with pytest.raises(ConfigError, match="neither a directory"):
        check_data(_cfg(tmp_path / "missing", tmp_path / "cache"))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match="not UTF-8"):
        check_data(_cfg(tmp_path / "bin", tmp_path / "cache"))
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "x.json").write_text("{}")
    with pytest.raises(ConfigError, match="holds no text file"):
        check_data(_cfg(tmp_path / "none", tmp_path / "cache"))
    _corpus(tmp_path / "small", n=3)
    with pytest.raises(ConfigError, match="leaves no document to train on"):
        build_source(_cfg(tmp_path / "small", tmp_path / "cache", val_sequences=10_000), seed=0)
    with pytest.raises(ConfigError, match="too small for a byte-level BPE"):
        DataConfig(source="text", path="x", tokenizer="bpe", vocab_size=100).validate()


def test_pretokenize_reads_text_files(tmp_path):
    docs = _corpus(tmp_path / "corpus", n=12)
    spec = importlib.util.spec_from_file_location("pretokenize", ROOT / "scripts" / "pretokenize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--input", str(tmp_path / "corpus"), "--tokenizer", "byte", "--out", str(tmp_path / "out")]) == 0
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["num_docs"] == len(docs)
    assert meta["num_tokens"] == sum(len(d.encode()) + 1 for d in docs)
    src = build_source(DataConfig(source="shards", path=str(tmp_path / "out"), seq_len=16, val_sequences=4), seed=0)
    assert src.vocab_size == 257


def test_split_takes_the_fewest_tail_documents():
    from gn.data.text import split_documents

    eos, L = 9, 4
    lengths = [10, 7, 5, 13, 6]                 # tokens per document, EOS included
    stream = np.concatenate([np.r_[np.zeros(n - 1, np.int32), eos] for n in lengths])
    for val_sequences, expect in ((1, 1), (2, 2), (4, 2), (5, 3), (7, 4)):
        train, val, n_val = split_documents([stream], eos, L, val_sequences)
        tail = sum(lengths[-n_val:])
        assert n_val == expect, (val_sequences, n_val)
        assert sum(map(len, val)) == tail and sum(map(len, train)) == len(stream) - tail
        assert (tail - 1) // L >= val_sequences > (sum(lengths[-n_val + 1:]) - 1) // L if n_val > 1 else True
    # Across shards: a document split over two shards stays whole on one side.
    train, val, n_val = split_documents([stream[:20], stream[20:]], eos, L, 2)
    assert n_val == 2 and sum(map(len, val)) == 19 and sum(map(len, train)) == len(stream) - 19
    with pytest.raises(ConfigError, match="leaves no document"):
        split_documents([stream], eos, L, 8)


def test_val_documents_holds_out_more_and_spreads_the_windows(tmp_path):
    import re

    _corpus(tmp_path / "corpus")
    few = build_source(_cfg(tmp_path / "corpus", tmp_path / "cache"), seed=0)
    many = build_source(_cfg(tmp_path / "corpus", tmp_path / "cache", val_documents=10), seed=0)
    assert many.val_documents == 10 > few.val_documents
    assert many.num_train < few.num_train
    def docs_seen(src):
        texts = [bytes(w[w != ByteTokenizer.eos_id].astype(np.uint8)).decode() for w in src.validation(8).reshape(-1, 17)]
        return set(re.findall(r"D\d{3}", " ".join(texts)))
    assert len(docs_seen(many)) >= 4 > len(docs_seen(few))             # windows spread over many documents
    with pytest.raises(ConfigError, match="val_documents must be a positive integer"):
        DataConfig(source="text", path="x", val_documents=0).validate()


def test_summary_counts_passes_over_the_training_data(tmp_path, capsys):
    from gn.config import config_from_dict
    from gn.train.trainer import train
    from tests.tiny_models import TINY_RUN

    _corpus(tmp_path / "corpus", n=12)
    raw = json.loads(json.dumps(TINY_RUN))
    raw["data"] = {"source": "text", "path": str(tmp_path / "corpus"), "tokenizer": "byte", "seq_len": 16,
                   "val_sequences": 8, "cache_dir": str(tmp_path / "cache")}
    raw["train"].update(steps=60, batch_size=8, eval_every=30, checkpoint_every=60)
    raw["methods"] = [{"name": "adamw"}]
    cfg = config_from_dict(raw)
    src = build_source(cfg.data, seed=cfg.train.seed)
    s = train(cfg, "adamw", tmp_path / "run")
    assert s["data_passes"] == pytest.approx(60 * 8 / src.num_train) and s["data_passes"] > 1
    assert "read its training data" in capsys.readouterr().out                # and says so
    syn = json.loads(json.dumps(TINY_RUN))
    syn["methods"] = [{"name": "adamw"}]
    assert train(config_from_dict(syn), "adamw", tmp_path / "syn")["data_passes"] is None   # unbounded


def _docs_of(src) -> list[str]:
    eos = ByteTokenizer.eos_id
    ids = np.concatenate([np.asarray(a) for a in src.windows.segments])
    return [bytes(d[:-1].astype(np.uint8)).decode() for d in np.split(ids, np.flatnonzero(ids == eos) + 1) if len(d)]


def test_train_documents_splits_the_training_documents_disjointly(tmp_path):
    """[0, a) and [a, 1) of the training documents: disjoint, together all of them, the same validation."""
    _corpus(tmp_path / "corpus")
    cfg = lambda share: _cfg(tmp_path / "corpus", tmp_path / "cache", train_documents=share)
    whole, head, tail = (build_source(cfg(s), seed=0) for s in (None, (0.0, 0.25), (0.25, 1.0)))
    d_whole, d_head, d_tail = _docs_of(whole), _docs_of(head), _docs_of(tail)
    n = len(d_whole)
    assert d_head == d_whole[: n // 4] and d_tail == d_whole[n // 4:]        # in order, disjoint, complete
    assert not set(d_head) & set(d_tail)
    np.testing.assert_array_equal(head.validation(8), whole.validation(8))
    np.testing.assert_array_equal(tail.validation(8), whole.validation(8))
    assert head.num_train < tail.num_train < whole.num_train
    with pytest.raises(ConfigError, match="selects no document"):
        build_source(cfg((0.0, 0.001)), seed=0)
    for bad in ((0.5, 0.5), (-0.1, 0.5), (0.2, 1.5)):
        with pytest.raises(ConfigError, match="train_documents"):
            cfg(bad).validate()
    with pytest.raises(ConfigError, match="'text' source"):
        DataConfig(source="synthetic", train_documents=(0.0, 0.5)).validate()


def test_max_epochs_refuses_a_run_that_would_repeat_data_before_compute(tmp_path):
    from gn.config import config_from_dict
    from gn.train.run import prepare
    from tests.tiny_models import TINY_RUN

    _corpus(tmp_path / "corpus", n=12)
    raw = json.loads(json.dumps(TINY_RUN))
    raw["data"] = {"source": "text", "path": str(tmp_path / "corpus"), "tokenizer": "byte", "seq_len": 16,
                   "val_sequences": 8, "cache_dir": str(tmp_path / "cache"), "max_epochs": 1}
    raw["methods"] = [{"name": "adamw"}]
    src = build_source(config_from_dict(raw).data, seed=0)
    fits = src.num_train // 8                                      # steps of 8 windows within one pass
    raw["train"].update(steps=fits, batch_size=8)
    prepare(config_from_dict(raw), "adamw")
    raw["train"].update(steps=fits + 1)
    with pytest.raises(ConfigError, match=r"max_epochs 1: method 'adamw' would read .* passes over"):
        prepare(config_from_dict(raw), "adamw")
