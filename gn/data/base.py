"""The batch-source protocol and the windowed source over a finite token stream.

A finite corpus is one long token stream (documents joined with EOS), possibly
split over several arrays (on-disk shards). It is cut into windows of
`seq_len + 1` tokens with stride `seq_len`, so consecutive windows share one
token and every token but the first is a target exactly once per epoch. The
training windows are visited in a seeded random permutation that changes every
epoch; the position is (epoch, index), so resuming is exact.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from gn.errors import ConfigError

# Windows gathered per vectorised copy: bounds the int64 index array to a few MB.
_GATHER_CHUNK = 1024


@runtime_checkable
class BatchSource(Protocol):
    """A deterministic, resumable stream of packed token windows.

    Attributes: `vocab_size` (ids are in [0, vocab_size)), `seq_len`, `eos_id`
    (None when the source has no documents), `loss_floor` (exact Bayes-optimal
    mean loss per predicted token in nats; synthetic only, else None) and
    `tokens_consumed` (training tokens handed out so far: batch_size * seq_len
    per batch, every batch counted, line-search batches included).
    """

    vocab_size: int
    seq_len: int
    eos_id: int | None
    loss_floor: float | None
    tokens_consumed: int

    def next(self, num_batches: int, batch_size: int) -> np.ndarray:
        """Return the next int32 array [num_batches, batch_size, seq_len + 1]."""
        ...

    def validation(self, batch_size: int) -> np.ndarray:
        """Return the fixed validation set, int32 [val_sequences // batch_size, batch_size, seq_len + 1]."""
        ...

    def state_dict(self) -> dict:
        """Return the JSON-serialisable position of the stream."""
        ...

    def load_state_dict(self, state: dict) -> None:
        """Move to a position returned by `state_dict` of a source with the same config and seed."""
        ...


def check_counts(num_batches: int, batch_size: int) -> None:
    """Raise ConfigError unless both counts are positive integers."""
    for name, value in (("num_batches", num_batches), ("batch_size", batch_size)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"data: {name} must be a positive integer, got {value!r}.")


def split_validation(val: np.ndarray, batch_size: int) -> np.ndarray:
    """Reshape validation windows [n, L+1] into [n // batch_size, batch_size, L+1].

    The remainder n % batch_size is dropped so that every call returns the same
    full batches.
    """
    check_counts(1, batch_size)
    n = val.shape[0]
    if batch_size > n:
        raise ConfigError(
            f"data: validation batch size {batch_size} is larger than the validation set "
            f"({n} sequences); raise data.val_sequences or lower the evaluation batch size.")
    nb = n // batch_size
    return np.array(val[: nb * batch_size].reshape(nb, batch_size, val.shape[1]), dtype=np.int32)  # a copy


def check_state(state: dict, kind: str, expected: dict) -> None:
    """Raise ConfigError if a saved data position belongs to a differently configured source."""
    if not isinstance(state, dict) or state.get("kind") != kind:
        got = state.get("kind") if isinstance(state, dict) else type(state).__name__
        raise ConfigError(f"data: cannot resume a {kind!r} source from a data state of kind {got!r}.")
    for key, value in expected.items():
        if state.get(key) != value:
            raise ConfigError(
                f"data: the saved data position has {key}={state.get(key)!r} but this source has "
                f"{key}={value!r}; resume with the data config and seed the checkpoint was written with.")


class TokenWindows:
    """Windows of `seq_len + 1` tokens, stride `seq_len`, over 1-D token arrays.

    Each array (an in-memory array or an `np.memmap` shard) is cut on its own,
    so a window never spans two arrays; at most `seq_len` tokens per array go
    unused. Window `i` is global: arrays are numbered in order.
    """

    def __init__(self, segments: Sequence[np.ndarray], seq_len: int):
        self.segments = list(segments)
        self.seq_len = seq_len
        counts = [max(0, (len(s) - 1) // seq_len) for s in self.segments]
        self._offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def gather(self, index: np.ndarray) -> np.ndarray:
        """Return int32 [len(index), seq_len + 1]: the windows with these global indices."""
        index = np.asarray(index, dtype=np.int64)
        width = self.seq_len + 1
        out = np.empty((index.shape[0], width), dtype=np.int32)
        seg = np.searchsorted(self._offsets, index, side="right") - 1
        cols = np.arange(width, dtype=np.int64)
        for s in np.unique(seg):
            rows = np.nonzero(seg == s)[0]
            starts = (index[rows] - self._offsets[s]) * self.seq_len
            array = self.segments[s]
            for lo in range(0, rows.shape[0], _GATHER_CHUNK):
                r = rows[lo: lo + _GATHER_CHUNK]
                out[r] = array[starts[lo: lo + _GATHER_CHUNK, None] + cols]
        return out


class WindowedSource:
    """A finite corpus served as shuffled windows, epoch after epoch.

    Training windows are the global windows [0, num_train) of `windows`; the
    permutation of epoch e is drawn from (seed, e). `val` holds the fixed
    validation windows, disjoint from the training ones.
    """

    loss_floor = None

    def __init__(self, windows: TokenWindows, num_train: int, val: np.ndarray, *, seed: int,
                 vocab_size: int, eos_id: int | None, name: str):
        if num_train < 1:
            raise ConfigError(
                f"data: the {name} corpus has no training window of {windows.seq_len + 1} tokens left after "
                f"holding out {val.shape[0]} validation sequences; lower data.seq_len or data.val_sequences.")
        self.windows = windows
        self.num_train = int(num_train)
        self.val = np.ascontiguousarray(val, dtype=np.int32)
        self.seed = int(seed)
        self.vocab_size = int(vocab_size)
        self.eos_id = eos_id
        self.seq_len = windows.seq_len
        self.name = name
        self.epoch = 0
        self.index = 0
        self.tokens_consumed = 0
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch]))
            self._perm = rng.permutation(self.num_train)
            self._perm_epoch = self.epoch
        return self._perm

    def next(self, num_batches: int, batch_size: int) -> np.ndarray:
        """Return the next int32 [num_batches, batch_size, seq_len + 1] windows, wrapping epochs."""
        check_counts(num_batches, batch_size)
        m = num_batches * batch_size
        out = np.empty((m, self.seq_len + 1), dtype=np.int32)
        filled = 0
        while filled < m:
            take = min(m - filled, self.num_train - self.index)
            idx = self._permutation()[self.index: self.index + take]
            out[filled: filled + take] = self.windows.gather(idx)
            filled += take
            self.index += take
            if self.index == self.num_train:
                self.epoch += 1
                self.index = 0
        self.tokens_consumed += m * self.seq_len
        return out.reshape(num_batches, batch_size, self.seq_len + 1)

    def validation(self, batch_size: int) -> np.ndarray:
        """Return the fixed validation windows as [val_sequences // batch_size, batch_size, seq_len + 1]."""
        return split_validation(self.val, batch_size)

    def _identity(self) -> dict:
        return {"source": self.name, "seed": self.seed, "seq_len": self.seq_len, "num_train": self.num_train}

    def state_dict(self) -> dict:
        """Return {"kind", epoch, index, tokens_consumed} plus fields identifying the source."""
        return {"kind": "windowed", **self._identity(), "epoch": self.epoch, "index": self.index,
                "tokens_consumed": self.tokens_consumed}

    def load_state_dict(self, state: dict) -> None:
        """Resume at a saved (epoch, index); ConfigError if it came from another corpus, seed or seq_len."""
        check_state(state, "windowed", self._identity())
        self.epoch = int(state["epoch"])
        self.index = int(state["index"])
        self.tokens_consumed = int(state["tokens_consumed"])


def holdout_source(windows: TokenWindows, val_sequences: int, *, seed: int, vocab_size: int,
                   eos_id: int | None, name: str, val_windows: TokenWindows | None = None) -> WindowedSource:
    """Build a WindowedSource whose validation set is `val_sequences` fixed windows.

    With `val_windows`, validation is its first windows (in order) and every
    window of `windows` trains. Otherwise the last `val_sequences` windows are
    held out, plus the one window before them, so no token is shared between
    the two sets.
    """
    if val_windows is not None:
        if len(val_windows) < val_sequences:
            raise ConfigError(
                f"data: the validation data of the {name} source has only {len(val_windows)} windows of "
                f"{windows.seq_len + 1} tokens, fewer than data.val_sequences={val_sequences}.")
        val = val_windows.gather(np.arange(val_sequences))
        num_train = len(windows)
    else:
        total = len(windows)
        if total < 2 * val_sequences + 1:
            raise ConfigError(
                f"data: the {name} corpus has only {total} windows of {windows.seq_len + 1} tokens; holding out "
                f"data.val_sequences={val_sequences} of them for validation would leave too little to train "
                "on (at least half must remain). Lower data.seq_len or data.val_sequences, or give "
                "separate validation data.")
        val = windows.gather(np.arange(total - val_sequences, total))
        num_train = total - val_sequences - 1
    return WindowedSource(windows, num_train, val, seed=seed, vocab_size=vocab_size, eos_id=eos_id, name=name)
