"""What a parameter path is: the one rule every mask, partition and router asks.

A path is the key path of a leaf from `jax.tree_util.tree_flatten_with_path`.
Flax wraps variables as {"params": {...}}; that wrapper is not part of a
parameter's name, so `param_keys` strips it. The LLaMA tree of `gn.model` has
top-level keys 'embed', 'block_<i>', 'final_norm', 'lm_head'; the same names
under a {"params": ...} wrapper mean the same parameters.

    param_name(path)        'block_0/attn/wq/kernel'
    is_hidden_matrix(p, x)  2-D weights in the body (not embeddings, not the head)
    is_embedding_or_head(p) the token embedding or the output head
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax

# Top-level modules whose 2-D weights are not "hidden" matrices (Muon sends them to AdamW).
EMBED_PREFIXES = ("embed", "lm_head")
FLAX_WRAPPER = "params"


def key_name(entry: Any) -> str:
    """The string of one key-path entry (dict key, attribute name or index)."""
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def path_keys(path: Sequence[Any]) -> tuple[str, ...]:
    """A key path as strings, exactly as in the tree (wrapper kept): for lookups."""
    return tuple(key_name(e) for e in path)


def param_keys(path: Sequence[Any] | str) -> tuple[str, ...]:
    """A parameter's name as strings, flax's {"params": ...} wrapper stripped."""
    keys = tuple(path.split("/")) if isinstance(path, str) else path_keys(path)
    if len(keys) > 1 and keys[0] == FLAX_WRAPPER:
        keys = keys[1:]
    return keys


def path_name(path: Sequence[Any]) -> str:
    """'a/b/0/c' for a key path, as in the tree (wrapper kept)."""
    return "/".join(path_keys(path))


def param_name(path: Sequence[Any] | str) -> str:
    """'/'-joined parameter name, wrapper stripped: 'block_0/attn/wq/kernel'."""
    return "/".join(param_keys(path))


def top_level(path: Sequence[Any] | str) -> str:
    """The top-level module of a parameter ('' for a bare array)."""
    keys = param_keys(path)
    return keys[0] if keys else ""


def is_embedding_or_head(path: Sequence[Any] | str) -> bool:
    """The token embedding or the output head (top-level 'embed*' or 'lm_head*')."""
    return top_level(path).startswith(EMBED_PREFIXES)


def is_hidden_matrix(path: Sequence[Any] | str, leaf: Any) -> bool:
    """2-D weights inside the network body: not the embedding or the output head."""
    return getattr(leaf, "ndim", 0) == 2 and not is_embedding_or_head(path)


def map_with_path(fn: Callable[[str, Any], Any], tree: Any) -> Any:
    """tree_map with the parameter name (wrapper stripped) as first argument."""
    return jax.tree_util.tree_map_with_path(lambda p, x: fn(param_name(p), x), tree)
