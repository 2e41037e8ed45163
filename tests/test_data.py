"""Batch sources: embedded corpus, local C4 files, pre-tokenised shards, streaming, pre-flight checks."""

from __future__ import annotations

import gzip
import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import pytest

from gn.data import BatchSource, DataConfig, build_source, check_data
from gn.data.tokenizer import load_tokenizer
from gn.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the model loss step batch token curvature gauss newton muon adam layer norm head embedding "
         "matrix vector line search damping outer inner warm start validation shard window epoch").split()


def _docs(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 40)))) + "." for _ in range(n)]


def _write_jsonl(path: Path, docs: list[str], **extra) -> Path:
    lines = "".join(json.dumps({"text": d, "timestamp": "2019-04-25T12:57:54Z", "url": "u", **extra}) + "\n"
                    for d in docs)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(lines)
    else:
        path.write_text(lines, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Tiny C4-format files and a T5-like tokenizer.json ("</s>" appended by its post-processor)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    d = tmp_path_factory.mktemp("c4")
    train_docs, val_docs = _docs(120, 0), _docs(40, 1)
    _write_jsonl(d / "c4-train.00000-of-00002.json.gz", train_docs[:70])
    _write_jsonl(d / "c4-train.00001-of-00002.json", train_docs[70:])
    _write_jsonl(d / "c4-validation.00000-of-00001.json.gz", val_docs)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(train_docs, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.save(str(d / "tokenizer.json"))
    return {"dir": d, "train": train_docs, "val": val_docs, "tokenizer": str(d / "tokenizer.json"),
            "cache": str(tmp_path_factory.mktemp("cache"))}


def _stream(tokenizer_path: str, docs: list[str]) -> np.ndarray:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_path)
    return np.concatenate([tok.encode(d, add_special_tokens=False).ids + [1] for d in docs])


def _pretokenize():
    spec = importlib.util.spec_from_file_location("pretokenize", ROOT / "scripts" / "pretokenize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _assert_resume(cfg: DataConfig, seed: int = 5, first=(3, 4), then=(7, 4)):
    a = build_source(cfg, seed=seed)
    a.next(*first)
    state = json.loads(json.dumps(a.state_dict()))
    b = build_source(cfg, seed=seed)
    b.load_state_dict(state)
    for _ in range(2):
        assert np.array_equal(a.next(*then), b.next(*then))
    assert a.tokens_consumed == b.tokens_consumed == (first[0] * first[1] + 2 * then[0] * then[1]) * cfg.seq_len


# ---------------------------------------------------------------- embedded


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("gn-cache"))


def test_embedded_bpe_batches(cache):
    cfg = DataConfig(seq_len=64, cache_dir=cache)
    src = build_source(cfg, seed=0)
    assert isinstance(src, BatchSource)
    assert (src.vocab_size, src.eos_id, src.loss_floor) == (512, 0, None)
    batch = src.next(3, 4)
    assert batch.shape == (3, 4, 65) and batch.dtype == np.int32
    assert batch.min() >= 0 and batch.max() < 512
    assert src.tokens_consumed == 3 * 4 * 64
    val = src.validation(16)
    assert val.shape == (4, 16, 65) and np.array_equal(val, src.validation(16))
    # cached: the same stream comes back, and the tokenizer decodes windows into corpus text
    again = build_source(cfg, seed=0)
    assert np.array_equal(again.next(3, 4), batch)
    from gn.data.embedded import corpus_documents, embedded_tokenizer

    text = embedded_tokenizer(cfg).tok.decode([int(t) for t in batch[0, 0] if t != 0])
    assert any(text[:20] in doc for doc in corpus_documents())


def test_embedded_byte_epochs_and_holdout(cache):
    cfg = DataConfig(tokenizer="byte", seq_len=256, val_sequences=32, cache_dir=cache)
    src = build_source(cfg, seed=1)
    assert (src.vocab_size, src.eos_id) == (257, 256)
    n = src.num_train
    assert n + 1 + 32 == len(src.windows)  # one window of gap between training and validation
    epoch = src.next(1, n)[0]
    assert sorted(map(bytes, epoch)) == sorted(map(bytes, src.windows.gather(np.arange(n))))
    assert src.state_dict()["epoch"] == 1 and src.state_dict()["index"] == 0
    second = src.next(1, n)[0]
    assert not np.array_equal(epoch, second)
    assert sorted(map(bytes, epoch)) == sorted(map(bytes, second))  # same windows, new order
    # validation windows are the tail of the stream, none of them trains
    val = src.validation(8).reshape(-1, 257)
    assert np.array_equal(val, src.windows.gather(np.arange(len(src.windows) - 32, len(src.windows))))
    # the last training window ends before the first validation window starts
    assert (n - 1) * 256 + 256 < (len(src.windows) - 32) * 256


@pytest.mark.parametrize("tokenizer", ["bpe", "byte"])
def test_embedded_resume_across_epochs(cache, tokenizer):
    cfg = DataConfig(tokenizer=tokenizer, seq_len=512, val_sequences=8, cache_dir=cache)
    _assert_resume(cfg, first=(5, 50), then=(3, 100))  # crosses epoch boundaries for bpe


def test_seed_changes_order_not_validation(cache):
    a = build_source(DataConfig(cache_dir=cache), seed=0)
    b = build_source(DataConfig(cache_dir=cache), seed=1)
    assert not np.array_equal(a.next(1, 8), b.next(1, 8))
    assert np.array_equal(a.validation(8), b.validation(8))


def test_bad_configs(cache):
    with pytest.raises(ConfigError, match="Did you mean 'synthetic'"):
        check_data(DataConfig(source="synthtic"))
    with pytest.raises(ConfigError, match="seq_len"):
        check_data(DataConfig(seq_len=0))
    with pytest.raises(ConfigError, match="'bpe'"):
        check_data(DataConfig(tokenizer="t5-base"))
    with pytest.raises(ConfigError, match="too small"):
        check_data(DataConfig(vocab_size=100))
    with pytest.raises(ConfigError, match="validation set"):
        build_source(DataConfig(source="synthetic", val_sequences=4), seed=0).validation(8)
    with pytest.raises(ConfigError, match="too little"):
        build_source(DataConfig(tokenizer="byte", seq_len=100_000, cache_dir=cache), seed=0)


# ---------------------------------------------------------------- c4 (local files)


def test_c4_local_files(corpus):
    cfg = DataConfig(source="c4", path=str(corpus["dir"] / "c4-train.*"), tokenizer=corpus["tokenizer"],
                     val_path=str(corpus["dir"] / "c4-validation.00000-of-00001.json.gz"),
                     seq_len=16, val_sequences=8, cache_dir=corpus["cache"])
    check_data(cfg)
    src = build_source(cfg, seed=0)
    assert src.eos_id == 1 and src.vocab_size == 300
    expected = _stream(corpus["tokenizer"], corpus["train"])
    windows = {bytes(expected[i * 16: i * 16 + 17].astype(np.int32)) for i in range((len(expected) - 1) // 16)}
    batch = src.next(2, 8).reshape(-1, 17)
    assert all(bytes(w) in windows for w in batch)
    val_expected = _stream(corpus["tokenizer"], corpus["val"])[: 8 * 16 + 1]
    val = src.validation(8)[0]
    assert np.array_equal(val[0], val_expected[:17]) and np.array_equal(val[-1], val_expected[7 * 16: 8 * 16 + 1])
    _assert_resume(cfg)


def test_c4_missing_file_and_field(corpus, tmp_path):
    with pytest.raises(ConfigError, match="nope.json.gz"):
        check_data(DataConfig(source="c4", path=str(tmp_path / "nope.json.gz"), tokenizer=corpus["tokenizer"]))
    bad = _write_jsonl(tmp_path / "bad.json.gz", ["x"], content="y")
    with pytest.raises(ConfigError) as err:
        check_data(DataConfig(source="c4", path=str(bad), text_field="content2", tokenizer=corpus["tokenizer"]))
    assert "bad.json.gz" in str(err.value) and "'content2'" in str(err.value) and "'content'" in str(err.value)
    with pytest.raises(ConfigError, match="tokenizer.json"):
        check_data(DataConfig(source="c4", path=str(bad), tokenizer=str(tmp_path)))


def test_c4_hub_fails_fast_offline(monkeypatch, corpus):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="pretokenize.py") as err:
        check_data(DataConfig(source="c4"))
    assert "HF_HUB_OFFLINE" in str(err.value) and "tokenizer.json" in str(err.value)
    with pytest.raises(ConfigError, match="not in the local Hugging Face cache"):
        check_data(DataConfig(source="c4", path=str(corpus["dir"]), tokenizer="gn-test/no-such-tokenizer"))
    with pytest.raises(ConfigError, match="Hub"):
        build_source(DataConfig(source="c4", tokenizer=corpus["tokenizer"]), seed=0)
    assert time.perf_counter() - start < 3.0


def test_tokenizer_eos_is_added_when_missing(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(_docs(20, 2), trainers.BpeTrainer(vocab_size=80, show_progress=False))
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.eos_token == "<|endoftext|>" and loaded.eos_id == loaded.vocab_size - 1
    assert list(loaded.encode_docs(["the model"])[0][-1:]) == [loaded.eos_id]


# ---------------------------------------------------------------- shards


def test_pretokenize_and_shards_source(corpus, tmp_path):
    out = tmp_path / "shards"
    rc = _pretokenize()(["--input", str(corpus["dir"] / "c4-train.*"), "--tokenizer", corpus["tokenizer"],
                         "--out", str(out), "--shard-tokens", "700"])
    assert rc == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["eos_id"] == 1 and meta["vocab_size"] == 300
    assert len(meta["shards"]) > 2 and meta["num_docs"] == 120
    expected = _stream(corpus["tokenizer"], corpus["train"])
    on_disk = np.concatenate([np.fromfile(out / s["file"], dtype="<u2") for s in meta["shards"]])
    assert np.array_equal(on_disk, expected) and meta["num_tokens"] == len(expected)

    cfg = DataConfig(source="shards", path=str(out), seq_len=16, val_sequences=4)
    check_data(cfg)
    src = build_source(cfg, seed=3)
    assert isinstance(src.windows.segments[0], np.memmap)
    windows, offset = set(), 0
    for s in meta["shards"]:  # windows never span two shards
        n = s["num_tokens"]
        windows |= {bytes(expected[offset + i * 16: offset + i * 16 + 17].astype(np.int32))
                    for i in range((n - 1) // 16)}
        offset += n
    epoch = src.next(1, src.num_train)[0]
    assert len({bytes(w) for w in epoch}) == src.num_train == len(windows) - 5
    assert all(bytes(w) in windows for w in epoch)
    assert all(bytes(w) in windows for w in src.validation(4)[0])
    _assert_resume(cfg)

    # --max-docs, and a damaged directory
    rc = _pretokenize()(["--input", str(corpus["dir"]), "--tokenizer", "byte", "--out", str(tmp_path / "b"),
                         "--max-docs", "10"])
    assert rc == 0 and json.loads((tmp_path / "b" / "meta.json").read_text())["num_docs"] == 10
    shard = out / meta["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(ConfigError, match="incomplete"):
        check_data(cfg)
    (out / "meta.json").unlink()
    with pytest.raises(ConfigError, match="no meta.json"):
        check_data(cfg)


# ---------------------------------------------------------------- streaming (the Hub code path, on local files)


def test_stream_source_resume(corpus, monkeypatch):
    import datasets

    from gn.data import stream

    monkeypatch.setattr(stream, "_CHUNK_DOCS", 7)
    files = [str(p) for p in sorted(corpus["dir"].glob("c4-train.*"))]

    def open_train():
        return datasets.load_dataset("json", data_files=files, split="train", streaming=True)

    cfg = DataConfig(source="c4", seq_len=16, val_sequences=4)
    tokenizer = load_tokenizer(corpus["tokenizer"])

    def make():
        return stream.StreamSource(open_train, open_train, tokenizer, cfg, seed=0, name="test")

    a = make()
    expected = _stream(corpus["tokenizer"], corpus["train"])
    first = a.next(3, 5).reshape(-1, 17)
    for i, w in enumerate(first):
        assert np.array_equal(w, expected[i * 16: i * 16 + 17])
    state = json.loads(json.dumps(a.state_dict()))
    b = make()
    b.load_state_dict(state)
    n_epoch = (len(expected) - 1) // 16
    for _ in range(3):  # past the end of the stream: the next epoch starts over
        assert np.array_equal(a.next(2, n_epoch // 3), b.next(2, n_epoch // 3))
    assert np.array_equal(a.validation(4)[0], expected[: 4 * 16 + 1][np.arange(4)[:, None] * 16 + np.arange(17)])


def test_unreachable_hub_is_detected(monkeypatch):
    from gn.data import hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.gn-test.invalid")
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="gn-test.invalid"):
        check_data(DataConfig(source="c4"))
    assert time.perf_counter() - start < hub.PROBE_TIMEOUT_S + 1.5


def test_t5_sentinels_are_never_emitted(corpus, tmp_path):
    """Like the T5 tokenizer: special sentinels after the pieces. vocab_size counts only emitted
    ids, and a sentinel written in the text is encoded as plain text, not as its id."""
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(corpus["tokenizer"])
    pieces = tok.get_vocab_size(with_added_tokens=True)
    tok.add_special_tokens([AddedToken(f"<extra_id_{i}>", special=True) for i in range(100)])
    assert tok.get_vocab_size(with_added_tokens=True) == pieces + 100
    tok.save(str(tmp_path / "t5like.json"))
    loaded = load_tokenizer(str(tmp_path / "t5like.json"))
    assert loaded.vocab_size == pieces
    (ids,) = loaded.encode_docs(["a text with <extra_id_0> and <extra_id_99> written in it"])
    assert ids.max() < pieces and ids[-1] == loaded.eos_id
    raw = Tokenizer.from_file(str(tmp_path / "t5like.json")).encode("<extra_id_0>").ids
    assert max(raw) >= pieces   # the raw tokenizer would have emitted the sentinel
