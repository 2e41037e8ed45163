"""Text to token ids: Hugging Face `tokenizers` (local file or Hub name) or raw bytes.

Every tokenizer here encodes a document WITHOUT its own special tokens (T5's
post-processor would append "</s>", BERT's would add [CLS]/[SEP]) and then
appends exactly one EOS id, so documents are joined the same way whatever the
tokenizer.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from gn.data import hub
from gn.data.cache import atomic_write_bytes
from gn.errors import ConfigError

# Tried in order when no EOS token is configured.
EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>", "[EOS]")
DEFAULT_EOS = "<|endoftext|>"
BYTE_VOCAB = 257  # 256 byte values + EOS


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, EOS = 256."""

    name = "byte"
    vocab_size = BYTE_VOCAB
    eos_id = 256
    fingerprint = "byte-v1"

    def encode_docs(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Encode each text as its UTF-8 bytes followed by EOS."""
        out = []
        for text in texts:
            ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)
            out.append(np.append(ids, np.int32(self.eos_id)))
        return out


class HFTokenizer:
    """A `tokenizers.Tokenizer` with a resolved EOS id.

    Special tokens written in a text are encoded as plain text
    (`encode_special_tokens`), so the only special id in the output is the EOS
    appended to each document. `vocab_size` is one more than the largest id that
    `encode_docs` can emit: the T5 tokenizer's 100 `<extra_id_*>` sentinels (ids
    32000-32099) are never emitted, so its vocab_size is 32000, the paper's.
    """

    def __init__(self, tokenizer, name: str, eos_token: str | None = None):
        tokenizer.no_truncation()
        tokenizer.no_padding()
        # A literal "<extra_id_0>" in web text must not become a sentinel id the model has no row for.
        tokenizer.encode_special_tokens = True
        self.tok = tokenizer
        self.name = name
        self.eos_token, self.eos_id = _resolve_eos(tokenizer, eos_token)
        special = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        emitted = [i for i in tokenizer.get_vocab(with_added_tokens=True).values() if i not in special]
        self.vocab_size = max(emitted + [self.eos_id]) + 1
        digest = hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()[:16]
        self.fingerprint = f"hf-{digest}-eos{self.eos_id}-plainspecial"

    def encode_docs(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Encode each text (no special tokens) followed by EOS, as int32 arrays."""
        encodings = self.tok.encode_batch_fast(list(texts), add_special_tokens=False)
        eos = self.eos_id
        return [np.array(e.ids + [eos], dtype=np.int32) for e in encodings]


def _resolve_eos(tokenizer, eos_token: str | None) -> tuple[str, int]:
    candidates = (eos_token,) if eos_token else EOS_CANDIDATES
    for token in candidates:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token, int(token_id)
    # No EOS in the vocab: add one as a new special id (the vocab grows by one).
    token = eos_token or DEFAULT_EOS
    tokenizer.add_special_tokens([token])
    return token, int(tokenizer.token_to_id(token))


def _looks_like_path(name: str) -> bool:
    return (name.endswith(".json") or name.startswith((".", "/", "~")) or name.count("/") > 1
            or os.path.exists(os.path.expanduser(name)))


def _local_tokenizer_file(name: str) -> Path:
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        path = path / "tokenizer.json"
        if not path.is_file():
            raise ConfigError(
                f"data.tokenizer: the directory {name!r} has no tokenizer.json. Point data.tokenizer at a "
                "tokenizer.json file (Hugging Face `tokenizers` format); a sentencepiece-only tokenizer must "
                "first be saved as tokenizer.json, e.g. with transformers' "
                "AutoTokenizer.from_pretrained(...).save_pretrained(DIR).")
    elif not path.is_file():
        raise ConfigError(f"data.tokenizer: the file {name!r} does not exist.")
    return path


def _hub_tokenizer_file(name: str, *, download: bool) -> Path | None:
    """Local path of the Hub tokenizer's tokenizer.json, from the HF cache or (if allowed) downloaded."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "tokenizer.json")
    if isinstance(cached, str):
        return Path(cached)
    reason = hub.offline_reason()
    if reason is not None:
        raise ConfigError(
            f"data.tokenizer {name!r} is a Hugging Face Hub name, the Hub is not usable ({reason}) and it is "
            f"not in the local Hugging Face cache. {hub.LOCAL_HOWTO}")
    if not download:
        return None
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(name, "tokenizer.json"))
    except Exception as exc:  # the hub client raises many unrelated types
        raise ConfigError(
            f"data.tokenizer: could not fetch tokenizer.json of {name!r} from the Hugging Face Hub "
            f"({exc.__class__.__name__}: {exc}). Give a Hub repo that has a tokenizer.json, or a local "
            "path to one.") from None


def check_tokenizer(name: str) -> None:
    """Pre-flight: "byte", an existing local tokenizer.json, or a Hub name usable now (cached or online)."""
    if name == "byte":
        return
    if _looks_like_path(name):
        _local_tokenizer_file(name)
    else:
        _hub_tokenizer_file(name, download=False)


def load_tokenizer(name: str, eos_token: str | None = None) -> ByteTokenizer | HFTokenizer:
    """Load "byte", a local tokenizer.json (or a directory with one), or a Hub tokenizer name."""
    if name == "byte":
        return ByteTokenizer()
    from tokenizers import Tokenizer

    path = _local_tokenizer_file(name) if _looks_like_path(name) else _hub_tokenizer_file(name, download=True)
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed files
        raise ConfigError(f"data.tokenizer: {str(path)!r} is not a valid tokenizer.json ({exc}).") from None
    return HFTokenizer(tokenizer, name, eos_token)


def train_bpe(texts: Sequence[str], vocab_size: int, path: Path) -> HFTokenizer:
    """Train a byte-level BPE with `vocab_size` ids (EOS "<|endoftext|>" = id 0), save it to `path`.

    Training is deterministic for a given corpus and vocab size. A corpus too
    small to support all merges yields a smaller vocab.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[DEFAULT_EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(list(texts), trainer)
    atomic_write_bytes(path, tokenizer.to_str().encode("utf-8"))
    return HFTokenizer(tokenizer, f"bpe-{vocab_size}", DEFAULT_EOS)


def cached_bpe(path: Path, texts: Callable[[], Sequence[str]], vocab_size: int) -> HFTokenizer:
    """The byte-level BPE saved at `path`, or trained on `texts()` and saved there (`train_bpe`)."""
    if path.is_file():
        from tokenizers import Tokenizer

        return HFTokenizer(Tokenizer.from_file(str(path)), f"bpe-{vocab_size}", DEFAULT_EOS)
    return train_bpe(texts(), vocab_size, path)
