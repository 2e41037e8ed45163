"""The `synthetic` source: a language with an exactly known Bayes-optimal loss.

Fields read: `synthetic` (the language: `SyntheticConfig`), `seq_len`,
`val_sequences`; there is no tokenizer, path or cache (`vocab_size` is
`synthetic.vocab_size`). The stream is unbounded and never repeats.

An order-k Markov chain over V tokens. The state is the context of the last k
tokens (V**k states, index c = x_{t-k+1} V^{k-1} + ... + x_t). Each context's
next-token distribution has `support` distinct tokens with Dirichlet weights.
One support token of every context follows a de Bruijn cycle through all
contexts, which makes the chain irreducible, so its stationary distribution is
unique; it is computed by power iteration on the lazy chain (P + I) / 2, which
has the same fixed point and is aperiodic.

Sequences start in the stationary distribution, so the process is stationary and

    H(X_{t+1} | X_0..X_t) = H_{t+2} - H_{t+1}   for t + 2 <= k (H_j: entropy of j
                                                 consecutive tokens, from the
                                                 stationary marginals)
                          = sum_c pi(c) H(P(.|c))  for t >= k - 1 (entropy rate).

The loss floor is the mean of these over the seq_len predicted positions.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from gn.data.base import check_counts, check_state, split_validation
from gn.data.config import DataConfig, SyntheticConfig
from gn.errors import ConfigError

_TRAIN_STREAM, _VAL_STREAM = 0x7A11, 0x5A1D
_POWER_TOL = 1e-14
_POWER_MAX_ITERS = 100_000


def _de_bruijn(V: int, k: int) -> np.ndarray:
    """A cyclic sequence of length V**k containing every k-tuple once (FKM algorithm)."""
    a = [0] * (k + 1)
    seq: list[int] = []

    def visit(t: int, p: int) -> None:
        if t > k:
            if k % p == 0:
                seq.extend(a[1: p + 1])
            return
        a[t] = a[t - p]
        visit(t + 1, p)
        for j in range(a[t - p] + 1, V):
            a[t] = j
            visit(t + 1, t)

    visit(1, 1)
    return np.asarray(seq, dtype=np.int64)


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a counter-based hash, so draw (i, t) needs no generator state."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class SyntheticLanguage:
    """The tabulated chain: `support` [S, s] tokens, `weights` [S, s], `stationary` [S].

    S = vocab_size ** order contexts. `entropy_rate` is the per-token entropy
    given a full context and `unigram_entropy` the entropy of one token.
    """

    def __init__(self, cfg: SyntheticConfig):
        cfg.validate()
        self.cfg = cfg
        V, k, s = cfg.vocab_size, cfg.order, cfg.support
        S = V ** k
        self.num_contexts = S
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0x1A96]))
        cycle = _de_bruijn(V, k)
        ext = np.concatenate([cycle, cycle[:k]])
        ctx = np.zeros(S, dtype=np.int64)
        for j in range(k):
            ctx = ctx * V + ext[j: j + S]
        support = np.empty((S, s), dtype=np.int64)
        support[ctx, 0] = ext[k: k + S]
        # Other support tokens: distinct from those already drawn (rejection, vectorised over contexts).
        for j in range(1, s):
            todo = np.arange(S)
            while todo.size:
                cand = rng.integers(0, V, size=todo.size)
                ok = ~(support[todo, :j] == cand[:, None]).any(axis=1)
                support[todo[ok], j] = cand[ok]
                todo = todo[~ok]
        weights = rng.dirichlet(np.full(s, float(cfg.concentration)), size=S)
        if not np.all(np.isfinite(weights)):
            raise ConfigError(
                f"data.synthetic: concentration {cfg.concentration} is too small to draw finite Dirichlet "
                "weights; use a value of at least 1e-3.")
        self.support = support.astype(np.int32)
        self.weights = weights
        self._cum = np.cumsum(weights, axis=1)
        self.next_state = (np.arange(S, dtype=np.int64)[:, None] * V + support) % S
        self.stationary = self._stationary()
        self._cum_pi = np.cumsum(self.stationary)
        self.context_entropy = -(np.where(weights > 0, weights * np.log(np.where(weights > 0, weights, 1.0)), 0.0)
                                 ).sum(axis=1)
        self.entropy_rate = float(self.stationary @ self.context_entropy)
        # prefix[j] = H(X_0..X_{j-1}) for j = 0..k, from the marginals of the stationary k-window.
        joint = self.stationary.reshape((V,) * k)
        self.prefix_entropy = [0.0] + [_entropy(joint.sum(axis=tuple(range(j, k))).ravel())
                                       for j in range(1, k + 1)]
        self.unigram_entropy = self.prefix_entropy[1]

    def transition_matrix(self):
        """The S x S context transition matrix as a scipy CSR matrix (rows sum to 1)."""
        from scipy import sparse

        S, s = self.num_contexts, self.cfg.support
        rows = np.repeat(np.arange(S), s)
        return sparse.csr_matrix((self.weights.ravel(), (rows, self.next_state.ravel())), shape=(S, S))

    def _stationary(self) -> np.ndarray:
        PT = self.transition_matrix().T.tocsr()
        pi = np.full(self.num_contexts, 1.0 / self.num_contexts)
        for _ in range(_POWER_MAX_ITERS):
            new = 0.5 * (pi + PT @ pi)
            new /= new.sum()
            delta = np.abs(new - pi).sum()
            pi = new
            if delta < _POWER_TOL:
                break
        residual = np.abs(PT @ pi - pi).sum()
        if residual > 1e-10:
            raise ConfigError(
                f"data.synthetic: the chain mixes too slowly for its stationary distribution to converge "
                f"(residual {residual:.1e}); raise 'support' or 'concentration'.")
        return pi

    def conditional_entropy(self, t: int) -> float:
        """H(X_{t+1} | X_0..X_t) under the stationary start."""
        k = self.cfg.order
        if t + 2 <= k:
            return self.prefix_entropy[t + 2] - self.prefix_entropy[t + 1]
        return self.entropy_rate

    def loss_floor(self, seq_len: int) -> float:
        """Exact Bayes-optimal mean loss (nats) over the seq_len predictions of a seq_len + 1 window."""
        return float(np.mean([self.conditional_entropy(t) for t in range(seq_len)]))

    def sample(self, keys: np.ndarray, length: int) -> np.ndarray:
        """Sequences of `length` tokens, row r a deterministic function of the uint64 key keys[r]."""
        V, k, S = self.cfg.vocab_size, self.cfg.order, self.num_contexts
        m = keys.shape[0]
        t_index = np.arange(length, dtype=np.uint64) * np.uint64(0xD1B54A32D192ED03)
        u = (_mix64(keys[:, None] ^ t_index[None, :]) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
        out = np.empty((m, length), dtype=np.int32)
        c = np.minimum(np.searchsorted(self._cum_pi, u[:, 0], side="right"), S - 1)
        digits = c.copy()
        for j in range(k - 1, -1, -1):
            if j < length:
                out[:, j] = digits % V
            digits //= V
        for t in range(k, length):
            j = (u[:, t, None] >= self._cum[c, :-1]).sum(axis=1)
            out[:, t] = self.support[c, j]
            c = self.next_state[c, j]
        return out

    def nll(self, tokens: np.ndarray) -> np.ndarray:
        """-log p(x_{t+1} | x_0..x_t) under the true process, float64 [n, T - 1]."""
        tokens = np.asarray(tokens, dtype=np.int64)
        V, k, S = self.cfg.vocab_size, self.cfg.order, self.num_contexts
        n, T = tokens.shape
        out = np.empty((n, T - 1))
        joint = self.stationary.reshape((V,) * k)
        prev = joint.sum(axis=tuple(range(1, k)))[tokens[:, 0]] if k > 1 else self.stationary[tokens[:, 0]]
        for t in range(min(k, T) - 1):  # short contexts: ratio of stationary prefix marginals
            marg = joint.sum(axis=tuple(range(t + 2, k)))
            cur = marg[tuple(tokens[:, j] for j in range(t + 2))]
            out[:, t] = -np.log(cur / prev)
            prev = cur
        c = np.zeros(n, dtype=np.int64)
        for j in range(min(k, T)):
            c = c * V + tokens[:, j]
        for t in range(k - 1, T - 1):
            x = tokens[:, t + 1]
            hit = self.support[c] == x[:, None]
            p = (self.weights[c] * hit).sum(axis=1)
            with np.errstate(divide="ignore"):
                out[:, t] = -np.log(p)
            c = (c * V + x) % S
        return out


@functools.lru_cache(maxsize=8)
def language(cfg: SyntheticConfig) -> SyntheticLanguage:
    """The language of a config (cached: building a large chain takes seconds)."""
    return SyntheticLanguage(cfg)


class SyntheticSource:
    """Unbounded stream of sequences from a SyntheticLanguage.

    Training sequence i is a function of (language seed, run seed, i), so the
    position is a counter. The validation set is the first `val_sequences` of a
    separate stream that depends on the language seed only, so runs with
    different seeds are evaluated on the same sequences.
    """

    eos_id = None

    def __init__(self, cfg: DataConfig, *, seed: int):
        self.lang = language(cfg.synthetic)
        self.seq_len = cfg.seq_len
        self.vocab_size = cfg.synthetic.vocab_size
        self.seed = int(seed)
        self.loss_floor = self.lang.loss_floor(cfg.seq_len)
        self.index = 0
        self.tokens_consumed = 0
        lang_seed = cfg.synthetic.seed
        self._train_key = np.random.SeedSequence([lang_seed, self.seed, _TRAIN_STREAM]).generate_state(1, np.uint64)[0]
        self._val_key = np.random.SeedSequence([lang_seed, _VAL_STREAM]).generate_state(1, np.uint64)[0]
        self.val = self._sequences(self._val_key, 0, cfg.val_sequences)
        self._identity = {"seed": self.seed, "seq_len": self.seq_len,
                          "language": dataclasses.asdict(cfg.synthetic)}

    def _sequences(self, base: np.uint64, start: int, count: int) -> np.ndarray:
        keys = _mix64(np.uint64(base) ^ np.arange(start, start + count, dtype=np.uint64))
        return self.lang.sample(keys, self.seq_len + 1)

    def next(self, num_batches: int, batch_size: int) -> np.ndarray:
        """Return the next int32 [num_batches, batch_size, seq_len + 1] sequences."""
        check_counts(num_batches, batch_size)
        m = num_batches * batch_size
        out = self._sequences(self._train_key, self.index, m)
        self.index += m
        self.tokens_consumed += m * self.seq_len
        return out.reshape(num_batches, batch_size, self.seq_len + 1)

    def validation(self, batch_size: int) -> np.ndarray:
        """Return the fixed validation sequences as [val_sequences // batch_size, batch_size, seq_len + 1]."""
        return split_validation(self.val, batch_size)

    def state_dict(self) -> dict:
        """Return {"kind": "synthetic", index, tokens_consumed} plus the identifying config."""
        return {"kind": "synthetic", **self._identity, "index": self.index, "tokens_consumed": self.tokens_consumed}

    def load_state_dict(self, state: dict) -> None:
        """Resume at a saved sequence counter; ConfigError if the language, seed or seq_len differ."""
        check_state(state, "synthetic", self._identity)
        self.index = int(state["index"])
        self.tokens_consumed = int(state["tokens_consumed"])


def validate(cfg: DataConfig) -> None:
    """The language is well defined and small enough to tabulate (`SyntheticConfig.validate`)."""
    cfg.synthetic.validate()


def check(cfg: DataConfig) -> None:
    """Nothing to look at before compute: the language is built from its config alone."""


def build(cfg: DataConfig, *, seed: int) -> SyntheticSource:
    """The unbounded synthetic stream of this run's seed."""
    return SyntheticSource(cfg, seed=seed)
