"""The tiny model shapes the curvature and GN tests share (one place to change them).

`MICRO`: 1 layer, width 8, vocabulary 16, 8 positions (a few thousand parameters: the dense
GGN of tests/dense_reference.py stays a small matrix).
"""

from gn.model import model_config

MICRO_SHAPE = dict(vocab_size=16, hidden=8, layers=1, heads=2, ffn=16, max_seq_len=8)


def micro(**overrides):
    """The MICRO model config (SwiGLU nano block), with field overrides such as dtype."""
    return model_config("nano", **{**MICRO_SHAPE, **overrides})
