"""The synthetic Markov language: exact stationarity, exact loss floor, deterministic sampling."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from gn.data import DataConfig, SyntheticConfig, build_source
from gn.data.synthetic import SyntheticLanguage, _de_bruijn, language
from gn.errors import ConfigError


def _cfg(seq_len=32, **syn):
    return DataConfig(source="synthetic", seq_len=seq_len, val_sequences=16, synthetic=SyntheticConfig(**syn))


def test_de_bruijn_visits_every_context_once():
    for V, k in [(2, 3), (3, 2), (5, 1), (4, 3)]:
        seq = _de_bruijn(V, k)
        ext = np.concatenate([seq, seq[:k - 1]])
        tuples = {tuple(ext[i: i + k]) for i in range(V ** k)}
        assert len(seq) == V ** k and len(tuples) == V ** k


@pytest.mark.parametrize("syn", [dict(), dict(vocab_size=8, order=3, support=3, concentration=1.0),
                                 dict(vocab_size=16, order=1, support=16, concentration=0.2)])
def test_stationary_distribution_is_exact(syn):
    lang = SyntheticLanguage(SyntheticConfig(**syn))
    P = lang.transition_matrix()
    pi = lang.stationary
    assert np.allclose(np.asarray(P.sum(axis=1)).ravel(), 1.0)
    assert pi.min() >= 0 and abs(pi.sum() - 1) < 1e-12
    assert np.abs(P.T @ pi - pi).sum() < 1e-10


@pytest.mark.parametrize("syn", [dict(), dict(vocab_size=32, order=1), dict(vocab_size=8, order=3, support=3)])
def test_empirical_loss_matches_floor(syn):
    src = build_source(_cfg(**syn), seed=3)
    lang = src.lang
    tokens = src.next(40, 64).reshape(-1, src.seq_len + 1)
    nll = lang.nll(tokens)
    assert np.isfinite(nll).all()
    per_seq = nll.mean(axis=1)
    se = per_seq.std(ddof=1) / np.sqrt(per_seq.size)
    assert abs(per_seq.mean() - src.loss_floor) < 4 * se
    # per-position check of the short-context terms too
    for t in range(syn.get("order", 2)):
        col = nll[:, t]
        assert abs(col.mean() - lang.conditional_entropy(t)) < 5 * col.std(ddof=1) / np.sqrt(col.size)
    assert src.loss_floor < lang.unigram_entropy < np.log(lang.cfg.vocab_size) + 1e-9


def test_floor_formula():
    lang = language(SyntheticConfig(vocab_size=8, order=3, support=2))
    H = lang.prefix_entropy
    L = 10
    expected = (H[3] - H[1] + (L - 2) * lang.entropy_rate) / L
    assert lang.loss_floor(L) == pytest.approx(expected, rel=1e-12)
    assert lang.loss_floor(1) == pytest.approx(H[2] - H[1])
    # deterministic chain (support 1): zero entropy rate, uniform stationary distribution
    det = SyntheticLanguage(SyntheticConfig(vocab_size=5, order=2, support=1))
    assert abs(det.entropy_rate) < 1e-12 and np.allclose(det.stationary, 1 / 25)


def test_sampling_is_counter_based_and_fast():
    a = build_source(_cfg(seq_len=128), seed=0)
    b = build_source(_cfg(seq_len=128), seed=0)
    first = a.next(1, 4)
    second = a.next(2, 4)
    both = b.next(3, 4)
    assert np.array_equal(np.concatenate([first, second]), both)
    assert a.tokens_consumed == 12 * 128
    c = build_source(_cfg(seq_len=128), seed=1)
    assert not np.array_equal(c.next(1, 4), first)
    # validation depends on the language only, and is not part of the training stream
    assert np.array_equal(c.validation(8), a.validation(8))
    assert not np.array_equal(a.validation(4)[0], first[0])
    start = time.perf_counter()
    for _ in range(5):
        a.next(1, 64)
    assert (time.perf_counter() - start) / 5 < 0.05


def test_resume_and_state_checks():
    a = build_source(_cfg(), seed=7)
    a.next(3, 5)
    state = json.loads(json.dumps(a.state_dict()))
    b = build_source(_cfg(), seed=7)
    b.load_state_dict(state)
    assert np.array_equal(a.next(2, 5), b.next(2, 5))
    assert a.tokens_consumed == b.tokens_consumed
    with pytest.raises(ConfigError, match="seed"):
        build_source(_cfg(), seed=8).load_state_dict(state)
    with pytest.raises(ConfigError, match="language"):
        build_source(_cfg(support=3), seed=7).load_state_dict(state)


@pytest.mark.parametrize("syn, match", [(dict(support=100), "support"), (dict(order=0), "order"),
                                        (dict(concentration=0.0), "concentration"),
                                        (dict(vocab_size=1024, order=3), "contexts")])
def test_bad_synthetic_config(syn, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(**syn).validate()
