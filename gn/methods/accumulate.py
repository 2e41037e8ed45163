"""The step `OptaxMethod` and `StatsMethod` share: gradient accumulation, then one update.

A step reads `train.grad_accum` micro-batches of `batch_size / grad_accum`
sequences (`micro_batch_plan`), averages what each micro-batch gives — the
loss, the gradient and, for the statistics methods, the layer factors and the
entropy — over them (`accumulate`: one call for a single micro-batch, else a
`lax.scan` that sums and scales by 1/n, so memory stays that of one
micro-batch), makes one update from the averages and pins the new parameters
and state to the run's sharding (`MethodContext.constrain`).
`AccumulatedMethod._step` is that sequence, written once; a subclass says what
a micro-batch computes (`micro`) and how the averages become an update
(`update`).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from gn.errors import require
from gn.methods.base import BatchPlan, MethodBase, MethodContext
from gn.optim import Schedule, bound_schedules as bound

# (micro-batch [b, T+1], rng or None) -> (mean loss, pytree to average)
MicroFn = Callable[[jax.Array, Optional[jax.Array]], tuple[jax.Array, Any]]
# params -> extra value_and_grad equivalents per step, relative to the gradient at the step's batch
BackendCost = Callable[[Any], float]


def tree_scale(tree: Any, s: Any) -> Any:
    return jax.tree.map(lambda x: x * s, tree)


def micro_batch_plan(ctx: MethodContext) -> BatchPlan:
    """`grad_accum` training batches of batch_size / grad_accum sequences (ConfigError unless it divides)."""
    require(ctx.batch_size % ctx.grad_accum == 0,
            f"batch_size {ctx.batch_size} is not divisible by grad_accum {ctx.grad_accum}.")
    return BatchPlan(train=ctx.grad_accum, micro_batch=ctx.batch_size // ctx.grad_accum)


def accumulate(fn: MicroFn, batches: jax.Array, rng: Optional[jax.Array] = None) -> tuple[jax.Array, Any]:
    """(mean loss, mean tree) of `fn` over the micro-batches `batches` [n, b, T+1].

    n = 1 calls `fn(batches[0], rng)` once. Otherwise a `lax.scan` adds the trees
    into zeros and scales the sum by 1/n; each micro-batch gets its own key of
    `jax.random.split(rng, n)` (None when `rng` is None)."""
    n = batches.shape[0]
    if n == 1:
        return fn(batches[0], rng)

    def body(acc, xs):
        loss, tree = fn(*xs)
        return jax.tree.map(jnp.add, acc, tree), loss

    shapes = jax.eval_shape(lambda: fn(batches[0], rng)[1])
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    keys = jax.random.split(rng, n) if rng is not None else None
    total, losses = jax.lax.scan(body, zeros, (batches, keys))
    return losses.mean(), tree_scale(total, 1.0 / n)


class AccumulatedMethod(MethodBase):
    """One optax update per step from averages over the step's micro-batches.

    Subclasses implement `micro(params, state)` (the per-micro-batch function for
    `accumulate`; it also gets the step's rng when `uses_rng`) and
    `update(params, state, loss, mean, batches)` -> (params, state, metrics)."""

    uses_rng = False

    def __init__(self, name: str, tx: optax.GradientTransformation, schedule: optax.Schedule,
                 ctx: MethodContext, *, backend_cost: Optional[BackendCost] = None):
        self.plan = micro_batch_plan(ctx)
        # A curvature backend inside tx (layerwise GN's CG products) costs more than the gradient;
        # its count depends on the parameter tree, so it is added once the tree is known (init).
        self._gradient_cost, self._backend_cost = self.grad_evals_per_step, backend_cost
        self.name = name
        self.tx = tx
        self.schedule = schedule
        self.updates_per_step = 1
        self._constrain = ctx.constrain
        self.step = jax.jit(self._step)

    def bind_schedules(self, schedules: Sequence[Schedule]) -> None:
        """Make the scalars of `schedules` (the ones this method's builder made: gn.optim.schedules)
        arguments of the compiled step instead of constants folded into it. The numbers are the
        same; the program is the same for every learning rate, so a sweep compiles it once (the
        persistent cache hits across grid points). Called by the trainer's `prepare`."""
        if not schedules:
            return
        schedules = tuple(schedules)
        arguments = tuple(s.arguments() for s in schedules)

        def step_with(args, params, state, batches, aux, rng):
            with bound(schedules, args):
                return self._step(params, state, batches, aux, rng)

        jitted = jax.jit(step_with)
        # Kept for inspection (tests compare the lowered programs of two learning rates).
        self.bound_step, self.step_arguments = jitted, arguments
        self.step = lambda params, state, batches, aux, rng: jitted(arguments, params, state, batches, aux, rng)

    def count_backend(self, params: Any, extra: float = 0.0) -> None:
        """grad_evals_per_step = the gradient's cost × (1 + the backend's + `extra`, both per gradient at
        the step's batch); set from the gradient's cost each time, so a second init counts the same."""
        backend = float(self._backend_cost(params)) if self._backend_cost is not None else 0.0
        self.grad_evals_per_step = self._gradient_cost * (1.0 + backend + extra)

    def init(self, params: Any) -> Any:
        self.count_backend(params)
        return self.tx.init(params)

    def lr(self, step: int) -> float:
        return float(self.schedule(step))

    def micro(self, params: Any, state: Any) -> MicroFn:
        raise NotImplementedError

    def update(self, params: Any, state: Any, loss: jax.Array, mean: Any,
               batches: jax.Array) -> tuple[Any, Any, dict]:
        raise NotImplementedError

    def _step(self, params, state, batches, aux, rng):
        del aux
        loss, mean = accumulate(self.micro(params, state), batches, rng if self.uses_rng else None)
        params, state, metrics = self.update(params, state, loss, mean, batches)
        # The run's parameter sharding (FSDP) on the outputs, not whatever propagation chose.
        return self._constrain(params), self._constrain(state), metrics
