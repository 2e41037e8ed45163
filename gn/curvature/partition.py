"""Partitions of a parameter tree into blocks, for layerwise (block-diagonal) curvature.

A partition gives every leaf of the parameter tree a hashable label; leaves with
the same label form one block b, and layerwise Gauss-Newton keeps only the
diagonal blocks G_bb of G = Jᵀ H_z J (Abreu et al. 2025, layerwise GN).

Accepted `partition` values:

- None: one block holding every parameter (full Gauss-Newton), label "all".
- "per_tensor": every leaf is its own block, labelled by its path, e.g.
  "block_0/attn/wq/kernel".
- "top_level": one block per top-level module of any tree (flax's {"params": ...}
  wrapper stripped), e.g. "Dense_0", "Dense_1" of a flax MLP.
- "transformer_blocks": the paper's partition of the LLaMA tree (`gn.model`): a
  leaf is labelled by its top-level key ("embed", "block_0", ..., "block_{L-1}"),
  except that "final_norm" belongs to the LAST transformer block (label
  "block_{L-1}", L-1 the largest block index in the tree) and "lm_head" is
  labelled "head". This follows the paper's code
  (`llama_train_gn_layerwise.py` of natalieabreu/full-gauss-newton: the final
  `ln_f` is updated with the last block, the head alone). A tree without any
  "block_i" key puts "final_norm" with the head. Any other top-level key is a
  block of its own, labelled by that key. A tree wrapped as {"params": {...}}
  (flax variables) is labelled by the key below "params". A bare array (no
  top-level key) is one block, "all".
- "transformer_blocks_head_norm": as "transformer_blocks" but "final_norm"
  shares the label "head" with "lm_head" (this toolkit's partition before the
  paper's was adopted; gn_layerwise numbers differ between the two).
- a callable `(path, leaf) -> label`, with `path` the key path from
  `jax.tree_util.tree_flatten_with_path` and any hashable label.
- a labels pytree (the first output of `make_partition`), used as is.
"""

from __future__ import annotations

from typing import Any, Hashable

import jax
from jax import tree_util

from gn.errors import ConfigError, suggest
from gn.paths import param_keys, path_name

PARTITIONS = ("per_tensor", "top_level", "transformer_blocks", "transformer_blocks_head_norm")

# Top-level keys of the LLaMA tree labelled "head" by "transformer_blocks_head_norm".
_HEAD_KEYS = ("final_norm", "lm_head")


def _block_index(name: str) -> int | None:
    prefix, _, index = name.partition("_")
    return int(index) if prefix == "block" and index.isdigit() else None


def _transformer_block_labels(flat, *, norm_in_last_block: bool) -> list[str]:
    tops = [(param_keys(p) or (None,))[0] for p, _ in flat]
    indices = [i for i in (_block_index(t) for t in tops if t is not None) if i is not None]
    norm_label = f"block_{max(indices)}" if norm_in_last_block and indices else "head"
    labels = []
    for top in tops:
        if top is None:
            labels.append("all")
        elif top == "final_norm":
            labels.append(norm_label)
        elif top == "lm_head":
            labels.append("head")
        else:
            labels.append(top)
    return labels


def make_partition(params, partition=None) -> tuple[Any, list[Hashable]]:
    """Label every leaf of `params` with its block.

    Returns `(labels, blocks)`: `labels` is a pytree with the structure of
    `params` whose leaves are hashable labels, `blocks` the distinct labels in
    the order of their first leaf (tree-flatten order). Leaves that share a label
    form one block of the block-diagonal Gauss-Newton matrix
    diag(G_11, ..., G_BB). See the module docstring for the accepted values;
    anything else raises ConfigError (a ValueError) listing the valid options.
    """
    flat, treedef = tree_util.tree_flatten_with_path(params)
    if partition is None:
        labels = ["all"] * len(flat)
    elif isinstance(partition, str):
        if partition == "per_tensor":
            labels = [path_name(p) or "all" for p, _ in flat]
        elif partition == "top_level":
            labels = [(param_keys(p) or ("all",))[0] for p, _ in flat]
        elif partition in ("transformer_blocks", "transformer_blocks_head_norm"):
            labels = _transformer_block_labels(flat, norm_in_last_block=partition == "transformer_blocks")
        else:
            raise ConfigError(
                f"unknown partition {partition!r}; valid partitions are None, "
                f"{', '.join(map(repr, PARTITIONS))}, a callable (path, leaf) -> label, "
                "or a labels pytree." + suggest(partition, PARTITIONS))
    elif callable(partition):
        labels = [partition(p, x) for p, x in flat]
    else:
        try:
            labels = treedef.flatten_up_to(partition)
        except (ValueError, TypeError) as err:
            raise ConfigError(
                "partition must be None, 'per_tensor', 'top_level', 'transformer_blocks', "
                "'transformer_blocks_head_norm', a callable "
                f"(path, leaf) -> label, or a labels pytree shaped like params ({err}).") from None
    for lab in labels:
        try:
            hash(lab)
        except TypeError:
            raise ConfigError(f"partition labels must be hashable, got {lab!r}.") from None
    blocks = list(dict.fromkeys(labels))
    return treedef.unflatten(labels), blocks


def block_ids(params, partition=None) -> tuple[list[int], list[Hashable]]:
    """Per-leaf block index (flatten order of `params`) and the block labels."""
    labels, blocks = make_partition(params, partition)
    index = {lab: i for i, lab in enumerate(blocks)}
    flat = jax.tree.structure(params).flatten_up_to(labels)
    return [index[lab] for lab in flat], blocks
