"""Parameter-path utilities: explicit, path-based masks and labels.

Masks are pytrees of bools chosen by parameter path (never by class names).
Paths are '/'-joined dict keys, e.g. 'block_0/attn/wq/kernel'. The LLaMA tree
(gn.model) has top-level keys 'embed', 'block_<i>', 'final_norm', 'lm_head'.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Callable, Sequence

import jax

from gn.curvature.partition import path_name
from gn.errors import ConfigError

EMBED_PREFIXES = ("embed", "lm_head")


def path_str(path: Sequence[Any]) -> str:
    """'/'-joined string form of a jax key path (same naming as the GN partitions)."""
    return path_name(path)


def map_with_path(fn: Callable[[str, Any], Any], tree: Any) -> Any:
    """tree_map with the '/'-joined path string as first argument."""
    return jax.tree_util.tree_map_with_path(lambda p, x: fn(path_str(p), x), tree)


def is_hidden_matrix(path: str, leaf: Any) -> bool:
    """2-D weights inside the network body: not the embedding or output head."""
    return getattr(leaf, "ndim", 0) == 2 and not path.split("/")[0].startswith(EMBED_PREFIXES)


def matrix_mask(params: Any) -> Any:
    """True for hidden 2-D weight matrices (what Muon orthogonalises)."""
    return map_with_path(is_hidden_matrix, params)


DECAY_RULES = ("matrices", "hidden_matrices", "all", "none")


def decay_mask(params: Any, rule: str | Sequence[str]) -> Any:
    """Weight-decay mask by rule.

    'matrices': every leaf with ndim >= 2 (embedding and head included, norms
    excluded); 'hidden_matrices': 2-D weights in the body only; 'all'; 'none';
    or a list of glob patterns matched against paths ('block_*/mlp/*').
    """
    if isinstance(rule, str):
        if rule == "matrices":
            return map_with_path(lambda p, x: getattr(x, "ndim", 0) >= 2, params)
        if rule == "hidden_matrices":
            return matrix_mask(params)
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
