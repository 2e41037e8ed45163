"""The step interface every method implements, and its optax implementation.

A *method* is what the trainer runs: it consumes one or more mini-batches per
step and returns new parameters. First-order optimizers are optax
`GradientTransformation`s wrapped in `OptaxMethod` (one update per step, with
gradient accumulation over micro-batches). The Gauss-Newton outer step, which
hides many sequential inner updates and a line search, implements the same
interface so a sweep can swap methods by name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import optax

from gn.errors import ConfigError
from gn.train.objective import ApplyFn, lm_loss, split_batch


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """How many [micro_batch, T+1] batches a step reads.

    `train` batches count as training tokens; `aux` batches (e.g. line-search
    data) are read from the same stream but reported separately.
    """

    train: int
    micro_batch: int
    aux: int = 0
    aux_micro_batch: int = 0


@dataclasses.dataclass(frozen=True)
class MethodContext:
    """What a method may know about the run when it is built."""

    apply_fn: ApplyFn
    total_steps: int
    batch_size: int
    grad_accum: int = 1
    num_devices: int = 1
    model_cfg: Any = None            # gn.model.ModelConfig, for methods that need layer structure
    reference_batch_size: int = 0    # train.batch_size: cost is reported relative to a step at this batch


class Method(Protocol):
    """A training method: a pure, jit-compiled step over several batches."""

    name: str
    plan: BatchPlan
    updates_per_step: int          # sequential parameter updates hidden in one step
    grad_evals_per_step: float     # cost of a step in value_and_grad equivalents

    def init(self, params: Any) -> Any: ...

    def step(self, params: Any, state: Any, batches: jnp.ndarray, aux: jnp.ndarray | None,
             rng: jax.Array) -> tuple[Any, Any, dict]: ...

    def lr(self, step: int) -> float: ...


def tree_scale(tree: Any, s: Any) -> Any:
    return jax.tree.map(lambda x: x * s, tree)


def tree_norm(tree: Any) -> jnp.ndarray:
    """Global Euclidean norm of a pytree."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


class OptaxMethod:
    """Runs an optax transformation: one update per step from the mean gradient
    over the step's micro-batches (gradient accumulation by `lax.scan`)."""

    def __init__(self, name: str, tx: optax.GradientTransformation, schedule: optax.Schedule,
                 ctx: MethodContext, *, needs_obj_fn: bool = False, needs_batch: bool = False):
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
        self._needs_obj_fn = needs_obj_fn
        self._needs_batch = needs_batch
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
        extra = {}
        if self._needs_obj_fn:
            extra["obj_fn"] = lambda p: lm_loss(self._apply, p, batches[-1])
        if self._needs_batch:
            # Curvature backends see the whole step's batch (all micro-batches).
            inputs, targets = split_batch(batches.reshape((-1,) + batches.shape[2:]))
            extra.update(inputs=inputs, targets=targets)
        updates, state = self.tx.update(grads, state, params, **extra)
        params = optax.apply_updates(params, updates)
        metrics = {"train_loss": loss, "grad_norm": tree_norm(grads),
                   "update_norm": tree_norm(updates)}
        return params, state, metrics


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
