"""Explicit, path-based masks.

Masks are pytrees of bools chosen by parameter path (never by class names).
Paths are parameter names as `gn.paths` defines them ('/'-joined keys, flax's
{"params": ...} wrapper stripped), e.g. 'block_0/attn/wq/kernel'.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Sequence

import jax

from gn.errors import ConfigError
from gn.paths import is_hidden_matrix, map_with_path


def matrix_mask(params: Any) -> Any:
    """True for hidden 2-D weight matrices (what Muon orthogonalises)."""
    return map_with_path(is_hidden_matrix, params)


DECAY_RULES = ("matrices", "hidden_matrices", "adam_side", "all", "none")


def decay_mask(params: Any, rule: str | Sequence[str]) -> Any:
    """Weight-decay mask by rule.

    'matrices': every leaf with ndim >= 2 (embedding and head included, norms
    excluded); 'hidden_matrices': 2-D weights in the body only; 'adam_side': every
    leaf that is not a hidden matrix (embedding, head, norms, biases: what Muon hands
    to its AdamW side, the paper's inner weight-decay set); 'all'; 'none';
    or a list of glob patterns matched against paths ('block_*/mlp/*').
    """
    if isinstance(rule, str):
        if rule == "matrices":
            return map_with_path(lambda p, x: getattr(x, "ndim", 0) >= 2, params)
        if rule == "hidden_matrices":
            return matrix_mask(params)
        if rule == "adam_side":
            return jax.tree.map(lambda m: not m, matrix_mask(params))
        if rule == "all":
            return jax.tree.map(lambda _: True, params)
        if rule == "none":
            return jax.tree.map(lambda _: False, params)
        raise ConfigError(f"Unknown weight_decay_mask '{rule}'. Use one of {', '.join(DECAY_RULES)} "
                          "or a list of path glob patterns such as ['block_*/mlp/*'].")
    patterns = list(rule)
    return map_with_path(lambda p, _: any(fnmatch.fnmatch(p, pat) for pat in patterns), params)


def validate_decay_rule(rule: Any, where: str) -> None:
    """Raise ConfigError unless `rule` is a known rule name or a list of globs."""
    if isinstance(rule, str):
        if rule not in DECAY_RULES:
            raise ConfigError(f"'{where}' must be one of {', '.join(DECAY_RULES)} or a list of path "
                              f"glob patterns, got '{rule}'.")
    elif not (isinstance(rule, (list, tuple)) and all(isinstance(r, str) for r in rule)):
        raise ConfigError(f"'{where}' must be a rule name or a list of glob strings, got {rule!r}.")
