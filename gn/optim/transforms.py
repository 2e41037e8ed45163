"""Small optax building blocks shared by every optimizer of the toolkit.

- `decoupled_weight_decay`: θ ← θ − lr_t · wd · θ on a path-based mask.
- `clip_and_decay`: clip_by_global_norm -> core -> decoupled weight decay, the
  chain every registered method is built from, so clipping and decay mean the
  same thing for all of them.
- `embed_head_split`, `clip_by_group_norm`: the pieces of the inner optimizer of
  Abreu et al. (2025) (its own transformation on the embedding and head, each group
  clipped by its own global norm; gn/methods/paper_inner.py assembles them).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from gn.optim.masks import decay_mask
from gn.paths import is_embedding_or_head, map_with_path


def tree_norm(tree: Any) -> jnp.ndarray:
    """Global Euclidean norm of a pytree."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def decoupled_weight_decay(schedule: optax.Schedule, weight_decay: float,
                           mask: Any | Callable[[Any], Any]) -> optax.GradientTransformation:
    """θ ← θ − lr_t · wd · θ on masked leaves (Loshchilov & Hutter 2019).

    Added after the optimizer's own (learning-rate scaled) update, so every
    method gets the same decoupled decay, applied with the same schedule.
    """
    inner = optax.chain(optax.add_decayed_weights(weight_decay, mask),
                        optax.scale_by_learning_rate(schedule))

    def init(params):
        return inner.init(params)

    def update(updates, state, params=None):
        decay, state = inner.update(jax.tree.map(jnp.zeros_like, updates), state, params)
        return jax.tree.map(jnp.add, updates, decay), state

    return optax.GradientTransformation(init, update)


def clip_and_decay(core: optax.GradientTransformation, schedule: optax.Schedule, *, grad_clip: float,
                   weight_decay: float, weight_decay_mask: Any) -> optax.GradientTransformation:
    """clip_by_global_norm(grad_clip) -> core -> decoupled weight decay (lr_t · wd · θ).

    `grad_clip = 0` and `weight_decay = 0` leave those parts out; the mask is a
    rule of `masks.decay_mask` ('matrices', 'hidden_matrices', 'all', 'none' or
    path globs).
    """
    parts = []
    if grad_clip > 0:
        parts.append(optax.clip_by_global_norm(grad_clip))
    parts.append(core)
    if weight_decay > 0:
        parts.append(decoupled_weight_decay(schedule, weight_decay,
                                            lambda p: decay_mask(p, weight_decay_mask)))
    return optax.chain(*parts)


def embed_head_labels(params: Any) -> Any:
    """'embed_head' for the token embedding and the output head, 'rest' for every other leaf."""
    return map_with_path(lambda p, _: "embed_head" if is_embedding_or_head(p) else "rest", params)


def embed_head_split(embed_head: optax.GradientTransformation,
                     rest: optax.GradientTransformation) -> optax.GradientTransformation:
    """`embed_head` on the embedding and head, `rest` on every other leaf, each with its own state."""
    return optax.partition({"embed_head": embed_head, "rest": rest}, embed_head_labels)


def clip_by_group_norm(max_norm: float, labels: Callable[[Any], Any]) -> optax.GradientTransformation:
    """`optax.clip_by_global_norm(max_norm)` applied to each group of leaves apart.

    `labels(updates)` gives every leaf a hashable group label (a pytree shaped like the
    updates, e.g. `embed_head_labels` or a layerwise partition's labels); each group is
    scaled by min(1, max_norm / ‖group‖), its own global norm.
    """

    def update(updates, state, params=None):
        del params
        leaves, treedef = jax.tree.flatten(updates)
        groups = treedef.flatten_up_to(labels(updates))
        sq: dict = {}
        for g, x in zip(groups, leaves):
            sq[g] = sq.get(g, 0.0) + jnp.sum(jnp.square(x))
        norms = {g: jnp.sqrt(v) for g, v in sq.items()}
        out = [jnp.where(norms[g] < max_norm, x, (x / norms[g].astype(x.dtype)) * max_norm)
               for g, x in zip(groups, leaves)]
        return treedef.unflatten(out), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
