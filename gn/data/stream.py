"""Windows packed on the fly from a document stream (a Hugging Face `datasets` IterableDataset).

Documents are read in stream order (the run seed does not reorder them) in
chunks of `_CHUNK_DOCS`, tokenised, joined with EOS and cut into windows of
`seq_len + 1` tokens with stride `seq_len`. The position is the stream's own
state at a chunk of documents plus the document and token offset inside it,
so resuming is exact without re-reading the stream. Used by the c4 source with
`data.path: null`.
"""

from __future__ import annotations

import copy
from collections import deque
from typing import Callable

import numpy as np

from gn.data.base import check_counts, check_state, split_validation
from gn.data.config import DataConfig
from gn.errors import ConfigError

_CHUNK_DOCS = 256


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
