"""The language-modelling objective shared by every method.

A batch is an int32 array [batch, seq_len + 1] of packed tokens: inputs are
window[:, :-1], targets window[:, 1:], every position counted.
"""

from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp

ApplyFn = Callable[[Any, jnp.ndarray], jnp.ndarray]


def split_batch(batch: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Inputs and next-token targets of a packed [B, T+1] window batch."""
    return batch[..., :-1], batch[..., 1:]


def lm_loss(apply_fn: ApplyFn, params: Any, batch: jnp.ndarray) -> jnp.ndarray:
    """Mean next-token softmax cross-entropy (nats per token) on a [B, T+1] batch."""
    from gn.curvature import mean_loss  # the one definition of the loss the GN models linearise

    inputs, targets = split_batch(batch)
    return mean_loss(apply_fn(params, inputs), targets)
