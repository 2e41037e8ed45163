"""Data configuration: which token stream feeds training, and how it is cut.

`DataConfig.source` picks one of the sources of `gn.data.sources.SOURCES`:

- ``embedded`` (default): the English text shipped with CPython
  (`pydoc_data.topics`), ~465 KB, tokenised by a byte-level BPE trained locally
  or by raw bytes. Needs no network and no files; good for tests and CPU runs.
- ``synthetic``: an order-k sparse Markov language with an exactly known
  Bayes-optimal loss (`SyntheticConfig`), unbounded.
- ``c4``: C4 text, either local C4-format JSON-lines shards (`path`) or the
  `allenai/c4` "en" stream from the Hugging Face Hub (`path: null`).
- ``shards``: packed token shards written by `scripts/pretokenize.py`.
- ``text``: plain-text files, one document per file, validated on held-out documents.

Each source's module (`gn.data.<source>`) validates, checks and builds it, and
says which of these fields it reads.
"""

from __future__ import annotations

import dataclasses

from gn.errors import ConfigError

# A synthetic chain is stored as a table over all V**order contexts.
MAX_SYNTHETIC_CONTEXTS = 1 << 20


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """A sparse order-k Markov language whose Bayes-optimal loss is known exactly.

    Each context of the previous `order` tokens has a next-token distribution on
    `support` distinct tokens, with weights drawn from a symmetric
    Dirichlet(`concentration`); everything is drawn from `seed` (the language's
    seed, independent of the run's sampling seed). Difficulty knobs:

    - `support` and `concentration` set the entropy rate (the loss floor): more
      support tokens or a larger concentration (flatter weights) raise it; the
      floor is about psi(support*c + 1) - psi(c + 1) nats per token.
    - `order` sets how much context a model must use to reach the floor; the
      number of contexts to memorise is `vocab_size ** order`.
    - `vocab_size` sets the unigram entropy (about log V), the loss a model
      without any context use stays at.
    """

    vocab_size: int = 64
    order: int = 2
    support: int = 4
    concentration: float = 0.5
    seed: int = 1234

    def validate(self) -> None:
        """Raise ConfigError unless the language is well defined and small enough to tabulate."""
        where = "data.synthetic"
        for name in ("vocab_size", "order", "support"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{where}: '{name}' must be a positive integer, got {value!r}.")
        if self.vocab_size < 2:
            raise ConfigError(f"{where}: 'vocab_size' must be at least 2, got {self.vocab_size}.")
        if self.support > self.vocab_size:
            raise ConfigError(
                f"{where}: 'support' ({self.support}) cannot exceed 'vocab_size' ({self.vocab_size}): "
                "each context draws its support tokens without replacement.")
        if not isinstance(self.concentration, (int, float)) or not self.concentration > 0:
            raise ConfigError(f"{where}: 'concentration' must be > 0, got {self.concentration!r}.")
        if self.vocab_size ** self.order > MAX_SYNTHETIC_CONTEXTS:
            raise ConfigError(
                f"{where}: vocab_size**order = {self.vocab_size}**{self.order} contexts is more than "
                f"{MAX_SYNTHETIC_CONTEXTS}; the chain is tabulated over all contexts to compute its exact "
                "loss floor. Lower 'vocab_size' or 'order'.")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ConfigError(f"{where}: 'seed' must be a non-negative integer, got {self.seed!r}.")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where training tokens come from and how they are packed.

    Documents are joined with an EOS token and cut into windows of `seq_len + 1`
    tokens (inputs `w[:-1]`, targets `w[1:]`).

    - `tokenizer`: for `embedded`, "bpe" (byte-level BPE with `vocab_size`
      entries, trained locally) or "byte" (256 bytes + EOS = 257 ids). For `c4`,
      a Hugging Face tokenizer name (hub), a path to a `tokenizer.json` or a
      directory holding one, or "byte"; "bpe" there means the paper's "t5-base".
    - `path`: for `c4`, a local C4-format `.json`/`.json.gz` JSON-lines file, a
      directory of them, or a glob (None streams `allenai/c4` "en" from the Hub);
      for `shards`, the directory written by `scripts/pretokenize.py`.
    - `val_path`: optional separate validation data (c4: files like `path`;
      shards: a second shard directory). Without it the last part of the
      training stream is held out.
    - `eos_token`: the tokenizer's end-of-document token; None picks "</s>",
      "<|endoftext|>", "<eos>" or "<|end_of_text|>" if the vocab has one, else
      adds "<|endoftext|>" as a new id.
    - `val_documents`: for `text`, at least this many documents are held out for
      validation (None: the fewest that hold `val_sequences` windows); the
      `val_sequences` windows are spread evenly over them.
    - `train_documents`: for `text`, the share [lo, hi) of the training documents
      (those left after the validation hold-out, in the source's fixed document
      order) this run trains on, e.g. [0, 0.1] for a warm start and [0.1, 1] for
      the runs after it, so no run reads its warm start's data; None: all.
    - `max_epochs`: a finite source's bound on the passes over its training
      windows: a run whose planned steps (training and line-search batches)
      would read more is a ConfigError before any compute (1: no window is read
      twice); None: no bound (passes above 1 are still reported, `data_passes`).
    - `cache_dir`: trained tokenizers and tokenised corpora (default
      `$GN_CACHE_DIR` or `~/.cache/gn`).
    """

    source: str = "embedded"
    seq_len: int = 128
    tokenizer: str = "bpe"
    vocab_size: int = 512
    path: str | None = None
    val_path: str | None = None
    text_field: str = "text"
    eos_token: str | None = None
    val_sequences: int = 64
    cache_dir: str | None = None
    val_documents: int | None = None
    train_documents: tuple[float, float] | None = None
    max_epochs: float | None = None
    synthetic: SyntheticConfig = SyntheticConfig()

    def validate(self) -> None:
        """Cheap consistency checks (no file or network access); raise ConfigError."""
        from gn.data.sources import source_module

        module = source_module(self.source)        # ConfigError for an unknown source
        for name in ("seq_len", "vocab_size", "val_sequences"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"data.{name} must be a positive integer, got {value!r}.")
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            raise ConfigError(f"data.tokenizer must be a non-empty string, got {self.tokenizer!r}.")
        if not isinstance(self.text_field, str) or not self.text_field:
            raise ConfigError(f"data.text_field must be a non-empty string, got {self.text_field!r}.")
        if self.val_documents is not None and (not isinstance(self.val_documents, int)
                                               or isinstance(self.val_documents, bool) or self.val_documents < 1):
            raise ConfigError(f"data.val_documents must be a positive integer or null, got {self.val_documents!r}.")
        if self.train_documents is not None:
            lo, hi = self.train_documents
            if not 0.0 <= lo < hi <= 1.0:
                raise ConfigError(f"data.train_documents must be [lo, hi] with 0 <= lo < hi <= 1 (shares of the "
                                  f"training documents), got {list(self.train_documents)!r}.")
            if self.source != "text":
                raise ConfigError(f"data.train_documents splits the documents of the 'text' source; data.source is "
                                  f"'{self.source}'.")
        if self.max_epochs is not None and not self.max_epochs > 0:
            raise ConfigError(f"data.max_epochs must be positive or null, got {self.max_epochs!r}.")
        module.validate(self)
