"""The GN inner loop's optimizer: gn's routing or the paper's, one global clip or one per group.

Abreu et al. (2025) compose their inner optimizer in `build_optimizer`
(natalieabreu/full-gauss-newton, EasyLM/models/llama/llama_train_gn.py, lines 316-374) as

    optax.multi_transform({
        "adamw": chain(clip_by_global_norm(c), adamw(lr, b1, b2, weight_decay=wd)),      # embedding, head
        "muon":  chain(clip_by_global_norm(c), contrib.muon(lr, adam_b1=b1, adam_b2=b2,
                                                             adam_weight_decay=wd)),   # everything else
    }, selector)

with one learning-rate schedule `lr` for all of it. So: the embedding and the head get
plain Adam (no Nesterov) on their own state; the hidden matrices get Muon (β 0.95,
Nesterov, 5 Newton-Schulz steps); the norms go to contrib.muon's AdamW side, which
uses Nesterov (contrib.muon passes its `nesterov` flag to that side); eps 1e-8
everywhere; the decay wd on embedding, head and norms (Muon's own weight_decay is 0),
scaled by the schedule; and each of the two groups is clipped by its own global norm.

The options of the GN methods (gn.methods.gn_config.GNConfig):

- `inner_routing: gn` (default): embedding, head and norms all on the inner Muon's AdamW
  side (`gn.optim.muon`, routed by `gn.optim.with_adamw_side`; contrib.muon's numbers),
  i.e. NAdam on embedding and head when Muon uses Nesterov (MuonConfig passes adam_nesterov). `paper`: the composition above (needs `inner_optimizer: muon`);
  Muon's options still come from `inner_options`, the embedding/head AdamW's from
  `inner_embed_head_options` (default: Muon's AdamW-side rate, adam_b1, adam_b2, eps 1e-8,
  no Nesterov: the paper shares inner_b1/inner_b2 and the schedule between the groups).
- `inner_clip_per_group: false` (default): one clip by the global norm of all leaves.
  `true`: {embedding, head} and {the rest} each clipped by its own global norm
  `inner_grad_clip` (llama_train_gn.py lines 317, 328); with a layerwise `partition`, each
  block of the partition by its own (llama_train_gn_layerwise.py builds one optimizer per
  block, each clipping its own leaves).

Weight decay stays gn's decoupled decay on `inner_weight_decay_mask` (`adam_side` is the
paper's set), so the CG solve and the probe keep solving the same model. The paper's
`inner_clip_gradient: 0` zeroes every update (`clip_by_global_norm(0)`); here 0 means no
clipping.
"""

from __future__ import annotations

from typing import Any, Mapping

import optax

from gn import curvature
from gn.errors import ConfigError, suggest
from gn.methods.base import check_choice, check_range
from gn.optim import clip_and_decay, clip_by_group_norm, embed_head_labels, embed_head_split
from gn.structs import coerce

INNER_ROUTINGS = ("gn", "paper")
# Inner-loop keys of this module (ignored, hence refused, with inner_solver: cg).
PAPER_INNER_KEYS = ("inner_routing", "inner_embed_head_options", "inner_clip_per_group")
_EMBED_HEAD_TYPES = {"learning_rate": float, "b1": float, "b2": float, "eps": float, "nesterov": bool}


def embed_head_options(hp: Any, inner: Any, where: str) -> dict:
    """The embedding/head AdamW's hyperparameters under `inner_routing: paper` (validated)."""
    adam_lr = hp.inner_adam_learning_rate
    out = {"learning_rate": hp.inner_learning_rate if adam_lr is None else adam_lr,
           "b1": inner.adam_b1, "b2": inner.adam_b2, "eps": 1e-8, "nesterov": False}
    given = hp.inner_embed_head_options
    if given is None:
        return out
    key_where = f"{where}.inner_embed_head_options"
    if not isinstance(given, Mapping):
        raise ConfigError(f"'{key_where}' must be a mapping of {', '.join(_EMBED_HEAD_TYPES)}, got {given!r}.")
    for key, value in given.items():
        if key not in _EMBED_HEAD_TYPES:
            raise ConfigError(f"'{key_where}.{key}' is not an option of the embedding/head AdamW."
                              f"{suggest(str(key), list(_EMBED_HEAD_TYPES))} Valid: {', '.join(_EMBED_HEAD_TYPES)}.")
        out[key] = coerce(_EMBED_HEAD_TYPES[key], value, f"{key_where}.{key}")
    check_range(out["learning_rate"] > 0, key_where, "learning_rate", "positive", out["learning_rate"])
    for key in ("b1", "b2"):
        check_range(0.0 <= out[key] < 1.0, key_where, key, "in [0, 1)", out[key])
    check_range(out["eps"] > 0, key_where, "eps", "positive", out["eps"])
    return out


def validate(hp: Any, inner: Any, where: str) -> None:
    """ConfigError naming the key for an invalid routing or clipping option."""
    check_choice(hp.inner_routing, INNER_ROUTINGS, where, "inner_routing")
    if hp.inner_routing == "paper":
        if hp.inner_optimizer != "muon":
            raise ConfigError(f"'{where}.inner_routing: paper' is the paper's Muon + AdamW composition: it needs "
                              f"inner_optimizer: muon, got '{hp.inner_optimizer}' (or use inner_routing: gn).")
        embed_head_options(hp, inner, where)
    elif hp.inner_embed_head_options is not None:
        raise ConfigError(f"'{where}.inner_embed_head_options' applies only with inner_routing: paper (with "
                          "inner_routing: gn the embedding and head are on the inner optimizer's own AdamW side).")
    if not isinstance(hp.inner_clip_per_group, bool):
        raise ConfigError(f"'{where}.inner_clip_per_group' must be true or false, got {hp.inner_clip_per_group!r}.")


def clip_groups(partition: Any):
    """Group labels of per-group clipping: {embedding, head} / the rest, or the partition's blocks."""
    if partition is None:
        return embed_head_labels
    return lambda tree: curvature.make_partition(tree, partition)[0]


def inner_transform(hp: Any, inner: Any) -> optax.GradientTransformation:
    """The inner optimizer at unit learning rate (the GN inner loop applies its own schedule).

    `inner` is the inner optimizer's typed config (`inner_optimizer_config`)."""
    unit = lambda step: 1.0  # noqa: E731
    per_group = hp.inner_clip_per_group and hp.inner_grad_clip > 0
    if hp.inner_routing == "gn" and not per_group:
        return inner.transform(unit)
    core = inner.core(unit, None)
    if hp.inner_routing == "paper":
        eh = embed_head_options(hp, inner, hp.name)
        # The AdamW-side rate relative to Muon's, as contrib.muon's AdamW side gets it (MuonConfig.adam_side_lr).
        adam = optax.chain(optax.scale_by_adam(b1=eh["b1"], b2=eh["b2"], eps=eh["eps"], nesterov=eh["nesterov"]),
                           optax.scale_by_learning_rate(eh["learning_rate"] / inner.learning_rate))
        core = embed_head_split(adam, core)
    tx = clip_and_decay(core, unit, grad_clip=0.0 if per_group else inner.grad_clip,
                        weight_decay=inner.weight_decay, weight_decay_mask=inner.weight_decay_mask)
    if per_group:
        tx = optax.chain(clip_by_group_norm(hp.inner_grad_clip, clip_groups(hp.partition)), tx)
    return tx

