"""`OptaxMethod`: runs an optax transformation as a trainer method."""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from gn.curvature.objective import lm_loss
from gn.methods.accumulate import AccumulatedMethod, BackendCost, tree_scale
from gn.methods.base import MethodContext
from gn.optim import tree_norm

# (apply_fn, batches [k, b, T+1]) -> extra keyword arguments of tx.update
StepExtras = Callable[[Any, jnp.ndarray], dict]

__all__ = ["OptaxMethod", "StepExtras", "tree_scale"]


class OptaxMethod(AccumulatedMethod):
    """One update per step from the mean gradient over the step's micro-batches
    (gradient accumulation by `lax.scan`: gn.methods.accumulate).

    `extras(apply_fn, batches)` gives transformations that need more than the
    gradient their extra arguments (Sophia's `obj_fn`, a curvature backend's
    `inputs`/`targets`)."""

    def __init__(self, name: str, tx: optax.GradientTransformation, schedule: optax.Schedule,
                 ctx: MethodContext, *, extras: Optional[StepExtras] = None,
                 backend_cost: Optional[BackendCost] = None):
        self._apply = ctx.apply_fn
        self._extras = extras
        # value_and_grad equivalents at the reference batch (train.batch_size).
        self.grad_evals_per_step = ctx.batch_size / (ctx.reference_batch_size or ctx.batch_size)
        super().__init__(name, tx, schedule, ctx, backend_cost=backend_cost)

    def micro(self, params, state):
        del state
        loss_grad = jax.value_and_grad(lambda p, b: lm_loss(self._apply, p, b))
        return lambda batch, rng: loss_grad(params, batch)

    def update(self, params, state, loss, grads, batches):
        extra = self._extras(self._apply, batches) if self._extras is not None else {}
        updates, state = self.tx.update(grads, state, params, **extra)
        params = optax.apply_updates(params, updates)
        metrics = {"train_loss": loss, "grad_norm": tree_norm(grads),
                   "update_norm": tree_norm(updates)}
        return params, state, metrics
