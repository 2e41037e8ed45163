"""gn: matrix-free Gauss-Newton and second-order optimization for language models."""

__version__ = "0.1.0"
