"""`OptaxMethod`: runs an optax transformation as a trainer method."""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from gn.curvature.objective import lm_loss
from gn.errors import ConfigError
from gn.methods.base import BatchPlan, MethodBase, MethodContext
from gn.optim.transforms import tree_norm

# (apply_fn, batches [k, b, T+1]) -> extra keyword arguments of tx.update
StepExtras = Callable[[Any, jnp.ndarray], dict]


def tree_scale(tree: Any, s: Any) -> Any:
    return jax.tree.map(lambda x: x * s, tree)


class OptaxMethod(MethodBase):
    """One update per step from the mean gradient over the step's micro-batches
    (gradient accumulation by `lax.scan`).

    `extras(apply_fn, batches)` gives transformations that need more than the
    gradient their extra arguments (Sophia's `obj_fn`, a curvature backend's
    `inputs`/`targets`)."""

    def __init__(self, name: str, tx: optax.GradientTransformation, schedule: optax.Schedule,
                 ctx: MethodContext, *, extras: Optional[StepExtras] = None):
        if ctx.batch_size % ctx.grad_accum:
            raise ConfigError(f"batch_size {ctx.batch_size} is not divisible by grad_accum {ctx.grad_accum}.")
        self.name = name
        self.tx = tx
        self.schedule = schedule
        self.plan = BatchPlan(train=ctx.grad_accum, micro_batch=ctx.batch_size // ctx.grad_accum)
        self.updates_per_step = 1
        # value_and_grad equivalents at the reference batch (train.batch_size).
        self.grad_evals_per_step = ctx.batch_size / (ctx.reference_batch_size or ctx.batch_size)
        self._apply = ctx.apply_fn
        self._extras = extras
        self._constrain = ctx.constrain
        self.step = jax.jit(self._step)

    def init(self, params: Any) -> Any:
        return self.tx.init(params)

    def lr(self, step: int) -> float:
        return float(self.schedule(step))

    def _grads(self, params, batches):
        loss_grad = jax.value_and_grad(lambda p, b: lm_loss(self._apply, p, b))
        if batches.shape[0] == 1:
            loss, grads = loss_grad(params, batches[0])
            return loss, grads

        def body(acc, batch):
            loss, g = loss_grad(params, batch)
            return jax.tree.map(jnp.add, acc, g), loss

        zeros = jax.tree.map(jnp.zeros_like, params)
        grads, losses = jax.lax.scan(body, zeros, batches)
        n = batches.shape[0]
        return losses.mean(), tree_scale(grads, 1.0 / n)

    def _step(self, params, state, batches, aux, rng):
        del aux, rng
        loss, grads = self._grads(params, batches)
        extra = self._extras(self._apply, batches) if self._extras is not None else {}
        updates, state = self.tx.update(grads, state, params, **extra)
        params = optax.apply_updates(params, updates)
        metrics = {"train_loss": loss, "grad_norm": tree_norm(grads),
                   "update_norm": tree_norm(updates)}
        # The run's parameter sharding (FSDP) on the outputs, not whatever propagation chose.
        return self._constrain(params), self._constrain(state), metrics
