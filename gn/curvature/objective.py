"""The language-modelling objective shared by every method and the trainer.

A batch is an int32 array [batch, seq_len + 1] of packed tokens: inputs are
window[:, :-1], targets window[:, 1:], every position counted. The loss is
`losses.mean_loss`, the one definition the Gauss-Newton models linearise; for a
`gn.split.SplitApply` model it is evaluated chunk by chunk (`chunked_loss.model_loss`).
`mean_entropy` needs full logits (not chunked).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from gn.curvature.chunked_loss import model_loss
from gn.curvature.losses import mean_loss
from gn.split import SplitApply

ApplyFn = Callable[[Any, jnp.ndarray], jnp.ndarray]


def split_batch(batch: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Inputs and next-token targets of a packed [B, T+1] window batch."""
    return batch[..., :-1], batch[..., 1:]


def lm_loss(apply_fn: ApplyFn, params: Any, batch: jnp.ndarray) -> jnp.ndarray:
    """Mean next-token softmax cross-entropy (nats per token) on a [B, T+1] batch.

    For a `gn.split.SplitApply` model the loss and its gradient are computed
    `chunk` tokens at a time (`chunked_loss.model_loss`): no (tokens × vocabulary)
    logits are formed, in the value or in the gradient.
    """
    inputs, targets = split_batch(batch)
    if isinstance(apply_fn, SplitApply):
        return model_loss(apply_fn, params, inputs, targets)
    return mean_loss(apply_fn(params, inputs), targets)


def mean_entropy(logits: jax.Array) -> jax.Array:
    """Mean over tokens of the predictive entropy −Σ_v p_v log p_v (nats)."""
    z = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    logp = jax.nn.log_softmax(z, axis=-1)
    return -jnp.mean(jnp.sum(jnp.exp(logp) * logp, axis=-1))
