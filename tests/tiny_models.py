"""The tiny model shapes the curvature and GN tests share (one place to change them).

`MICRO`: 1 layer, width 8, vocabulary 16, 8 positions (a few thousand parameters: the dense
GGN of tests/dense_reference.py stays a small matrix).
"""

from gn.model import model_config

MICRO_SHAPE = dict(vocab_size=16, hidden=8, layers=1, heads=2, ffn=16, max_seq_len=8)


def micro(**overrides):
    """The MICRO model config (SwiGLU nano block), with field overrides such as dtype."""
    return model_config("nano", **{**MICRO_SHAPE, **overrides})


# A whole run on the synthetic language in a few seconds: the config sections without `methods`
# (tests add their own entry: {**TINY_RUN, "methods": [...]}).
TINY_RUN = {
    "model": {"preset": "nano", "hidden": 16, "layers": 1, "heads": 2, "ffn": 32, "max_seq_len": 32},
    "data": {"source": "synthetic", "seq_len": 16, "val_sequences": 8,
             "synthetic": {"vocab_size": 16, "order": 1, "support": 3}},
    "train": {"steps": 3, "batch_size": 4, "eval_every": 1, "eval_batch_size": 4, "checkpoint_every": 3,
              "progress": False},
}


# A nano run on the embedded BPE corpus, 16 sequences a step: the shape the sharding, multi-process,
# custom-model and compile-reuse tests train (tests add `methods` and their own train keys: `nano_run`).
NANO_RUN = {
    "model": {"preset": "nano", "hidden": 32, "layers": 1, "heads": 2, "ffn": 64},
    "data": {"source": "embedded", "tokenizer": "bpe", "vocab_size": 320, "seq_len": 16},
    "train": {"batch_size": 16, "eval_batch_size": 16, "eval_every": 1, "progress": False},
}


def nano_run(methods=(), *, model=None, **train) -> dict:
    """A fresh copy of NANO_RUN with `train` keys set, `model` keys added and `methods` (a list of entries)."""
    import copy

    raw = copy.deepcopy(NANO_RUN)
    raw["train"].update(train)
    raw["model"].update(model or {})
    if methods:
        raw["methods"] = list(methods)
    return raw


# A 6-step run with weight averaging, evaluated every step (the EMA's reading of targets, the stop rules).
EMA_RUN = {
    "model": {"preset": "nano", "hidden": 32, "layers": 1, "heads": 2, "ffn": 64, "max_seq_len": 64},
    "data": {"source": "synthetic", "seq_len": 16, "val_sequences": 8,
             "synthetic": {"vocab_size": 16, "order": 1, "support": 3}},
    "train": {"steps": 6, "batch_size": 4, "eval_every": 1, "eval_batch_size": 4, "checkpoint_every": 6,
              "progress": False, "ema_decay": 0.8},
}
