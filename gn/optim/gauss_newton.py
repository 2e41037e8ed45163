"""The Gauss-Newton outer step: full GN, GN-prox-linear and layerwise GN.

Abreu, Vyas, Kakade, Morwani, "The Potential of Second-Order Optimization for
LLMs: A Study with Full Gauss-Newton" (2025). One outer step at θ_t:

    θ̂ ← warm start (previous inner solution and its optimizer state) or θ_t
    for i in 1..N (a fresh mini-batch of b_inner sequences each):
        θ̂ ← θ̂ + lr_i · inner_opt(∇Q_i(θ̂))         Q_i: GN model of the loss at θ_t on batch i
    Δ = θ̂ − θ_t
    α* = argmin_{α ∈ {2^(−j/2)}} ℓ(θ_t + α Δ) on line-search batches
    θ_{t+1} = θ_t + α* Δ

Q is the Gauss-Newton quadratic (kind "gn"), the prox-linear model ℓ(z0 + J d)
("prox_linear"), or their block-diagonal (layerwise) versions with a partition.
`inner_solver: cg` replaces the inner loop by conjugate gradient on
(G + λI) d = −∇ℓ over the whole outer batch (Martens 2010, Hessian-free).

Unlike the paper's code: the inner learning rate is computed from explicit
(outer, inner) step counters, so schedules are right whatever the warm-start
policy; `damping` really adds (λ/2)‖θ − θ_t‖²; line-search tokens are counted
apart from training tokens and the line search may use fewer batches than N.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gn import curvature
from gn.errors import ConfigError, require
from gn.optim.linesearch import line_search
from gn.optim.method import BatchPlan, MethodContext, tree_norm
from gn.train.objective import lm_loss, split_batch

INNER_SCHEDULES = ("constant", "constant_inner_cosine", "global_cosine", "global_inner_cosine")
INNER_SOLVERS = ("optax", "cg")
PARTITIONS = (None, "per_tensor", "transformer_blocks")


@dataclasses.dataclass(frozen=True)
class GNHParams:
    """Hyperparameters of a Gauss-Newton method (defaults sized for CPU runs;
    the paper's 45M settings: inner_steps 122, b_inner 32, inner lr 0.01)."""

    inner_steps: int = 8
    inner_solver: str = "optax"
    inner_optimizer: str = "muon"
    inner_learning_rate: float = 0.01
    inner_adam_learning_rate: float = 0.0      # 0 = same as inner_learning_rate
    inner_schedule: str = "constant_inner_cosine"
    inner_min_lr_ratio: float = 0.0
    inner_grad_clip: float = 1.0
    inner_weight_decay: float = 0.001
    warm_start: bool = True
    damping: float = 0.0
    partition: str | None = None
    block_mode: str = "batched"
    ls_grid: int = 5
    ls_batches: int = 2
    ls_extend: int = 0
    ls_vectorize: bool = True
    cg_iters: int = 50
    cg_tol: float = 1e-6
    probe_every: int = 0                       # >0: every k outer steps, compare the inner loop with CG

    def validate(self, where: str) -> None:
        from gn.optim import registry

        require(self.inner_steps > 0, f"{where}.inner_steps must be positive, got {self.inner_steps}.")
        require(self.inner_solver in INNER_SOLVERS,
                f"{where}.inner_solver must be one of {', '.join(INNER_SOLVERS)}, got '{self.inner_solver}'.")
        spec = registry.get(self.inner_optimizer)
        require(spec.family == "first_order",
                f"{where}.inner_optimizer must be a first-order method, got '{self.inner_optimizer}'.")
        require(self.inner_learning_rate > 0, f"{where}.inner_learning_rate must be positive.")
        require(self.inner_adam_learning_rate >= 0, f"{where}.inner_adam_learning_rate must be >= 0.")
        require(self.inner_schedule in INNER_SCHEDULES,
                f"{where}.inner_schedule must be one of {', '.join(INNER_SCHEDULES)}, got '{self.inner_schedule}'.")
        require(0 <= self.inner_min_lr_ratio <= 1, f"{where}.inner_min_lr_ratio must be in [0, 1].")
        require(self.inner_grad_clip >= 0 and self.inner_weight_decay >= 0 and self.damping >= 0,
                f"{where}: inner_grad_clip, inner_weight_decay and damping must be >= 0.")
        require(self.partition in PARTITIONS,
                f"{where}.partition must be one of {PARTITIONS}, got {self.partition!r}.")
        require(self.block_mode in curvature.BLOCK_MODES,
                f"{where}.block_mode must be one of {curvature.BLOCK_MODES}.")
        require(self.ls_grid > 0 and self.ls_batches > 0 and self.ls_extend >= 0,
                f"{where}: ls_grid and ls_batches must be positive and ls_extend >= 0.")
        require(self.cg_iters > 0 and self.cg_tol > 0, f"{where}: cg_iters and cg_tol must be positive.")
        require(self.probe_every >= 0, f"{where}.probe_every must be >= 0 (0 disables the CG probe).")


class GNState(NamedTuple):
    inner_params: Any      # θ̂, the warm start for the next outer step
    inner_opt: Any         # the inner optimizer's state
    outer_step: jnp.ndarray


def inner_lr_factor(schedule: str, outer: jnp.ndarray, inner: jnp.ndarray, n_inner: int,
                    n_outer: int, floor: float) -> jnp.ndarray:
    """Learning-rate multiplier at inner step `inner` of outer step `outer` (0-based)."""

    def cos(frac):
        return floor + (1.0 - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.clip(frac, 0.0, 1.0)))

    inner_c = cos(inner / n_inner)
    global_c = cos((outer * n_inner + inner) / (n_outer * n_inner))
    return {"constant": jnp.ones(()), "constant_inner_cosine": inner_c, "global_cosine": global_c,
            "global_inner_cosine": global_c * inner_c}[schedule]


def _flop_cost(num_blocks: int) -> float:
    """Matmul FLOPs of one inner step relative to a value_and_grad (6N per token):
    primal 2N + tangent 4N + transpose 4N, with one tangent/transpose per block."""
    return (2.0 + 8.0 * num_blocks) / 6.0


class GaussNewtonMethod:
    """The GN outer step as a trainer method (see module docstring)."""

    def __init__(self, name: str, hp: GNHParams, ctx: MethodContext, *, kind: str):
        from gn.optim import registry
        from gn.optim.first_order import build_transform

        n = hp.inner_steps
        if ctx.batch_size % n:
            raise ConfigError(f"Method '{name}': the batch size {ctx.batch_size} must be divisible by "
                              f"inner_steps ({n}): each inner step reads batch_size / inner_steps sequences.")
        self.name, self.hp, self.kind = name, hp, kind
        self.b_inner = ctx.batch_size // n
        self.total_steps = ctx.total_steps
        self._apply = ctx.apply_fn
        self.partition = hp.partition
        self.plan = BatchPlan(train=n, micro_batch=self.b_inner, aux=hp.ls_batches, aux_micro_batch=self.b_inner)
        self.updates_per_step = n if hp.inner_solver == "optax" else 1
        inner_entry = registry.resolve_entry({"name": hp.inner_optimizer})
        inner_hp = {**inner_entry.hparams, "learning_rate": hp.inner_learning_rate,
                    "grad_clip": hp.inner_grad_clip, "weight_decay": hp.inner_weight_decay}
        if "adam_learning_rate" in inner_hp:
            inner_hp["adam_learning_rate"] = hp.inner_adam_learning_rate or None
        # The learning rate is applied outside the transformation from explicit step counters.
        self.tx = build_transform(hp.inner_optimizer, inner_hp, lambda step: 1.0)
        self._num_blocks = None
        ref = ctx.reference_batch_size or ctx.batch_size
        self._ref_scale = self.b_inner / ref
        self._inner = jax.jit(self._inner_loop if hp.inner_solver == "optax" else self._cg_solve)
        self._search = jax.jit(self._line_search)
        self._probe_fn = jax.jit(self._probe)

    # -- cost accounting ---------------------------------------------------
    @property
    def grad_evals_per_step(self) -> float:
        """value_and_grad equivalents at the reference batch (FLOP estimate)."""
        nb = self._num_blocks or 1
        hp = self.hp
        if hp.inner_solver == "optax":
            inner = hp.inner_steps * _flop_cost(nb)
        else:   # one primal + cg_iters tangent/transpose pairs over the whole outer batch (upper bound)
            inner = hp.inner_steps * (2.0 + 8.0 * nb * hp.cg_iters) / 6.0
        search = hp.ls_batches * ((hp.ls_grid + 1) / 3.0 + _flop_cost(nb))
        return (inner + search) * self._ref_scale

    def init(self, params: Any) -> GNState:
        self._num_blocks = len(curvature.make_partition(params, self.partition)[1]) if self.partition else 1
        return GNState(inner_params=params, inner_opt=self.tx.init(params), outer_step=jnp.zeros((), jnp.int32))

    def lr(self, step: int) -> float:
        f = inner_lr_factor(self.hp.inner_schedule, jnp.asarray(step), jnp.asarray(0), self.hp.inner_steps,
                            self.total_steps, self.hp.inner_min_lr_ratio)
        return float(self.hp.inner_learning_rate * f)

    # -- the pieces ----------------------------------------------------------
    def _model(self, theta, batch):
        inputs, targets = split_batch(batch)
        return curvature.quadratic_model(self._apply, theta, inputs, targets, kind=self.kind,
                                         partition=self.partition, damping=self.hp.damping,
                                         block_mode=self.hp.block_mode)

    def _inner_loop(self, theta, state: GNState, batches):
        hp = self.hp
        start = state.inner_params if hp.warm_start else theta
        opt = state.inner_opt if hp.warm_start else self.tx.init(theta)

        def body(carry, xs):
            theta_hat, opt = carry
            i, batch = xs
            q = self._model(theta, batch)
            value, grads = q(theta_hat)
            updates, opt = self.tx.update(grads, opt, theta_hat)
            lr = hp.inner_learning_rate * inner_lr_factor(hp.inner_schedule, state.outer_step, i, hp.inner_steps,
                                                          self.total_steps, hp.inner_min_lr_ratio)
            theta_hat = jax.tree.map(lambda p, u: p + (lr * u).astype(p.dtype), theta_hat, updates)
            return (theta_hat, opt), (q.loss0, value)

        (theta_hat, opt), (loss0, qvals) = jax.lax.scan(body, (start, opt), (jnp.arange(hp.inner_steps), batches))
        metrics = {"train_loss": loss0.mean(), "inner_q_first": qvals[0] - loss0[0],
                   "inner_q_last": qvals[-1] - loss0[-1]}
        return theta_hat, opt, metrics

    def _damped_solve(self, theta, inputs, targets, grads):
        """d = −(G + λI)⁻¹ g by CG (block CG, one recursion per block, with a partition)."""
        hp = self.hp
        matvec0 = curvature.ggn_operator(self._apply, theta, inputs, targets, partition=self.partition,
                                         block_mode=hp.block_mode)

        def matvec(v):
            return jax.tree.map(lambda gv, x: gv + hp.damping * x, matvec0(v), v)

        rhs = jax.tree.map(jnp.negative, grads)
        if self.partition is None:
            return curvature.conjugate_gradient(matvec, rhs, max_iters=hp.cg_iters, tol=hp.cg_tol)
        labels = curvature.make_partition(theta, self.partition)[0]
        return curvature.block_conjugate_gradient(matvec, rhs, labels, max_iters=hp.cg_iters, tol=hp.cg_tol)

    def _cg_solve(self, theta, state: GNState, batches):
        """(G + λI) d = −∇ℓ over the whole outer batch, matrix-free (Martens 2010)."""
        flat = batches.reshape((-1,) + batches.shape[2:])
        inputs, targets = split_batch(flat)
        loss0, grads = jax.value_and_grad(lambda p: lm_loss(self._apply, p, flat))(theta)
        d, info = self._damped_solve(theta, inputs, targets, grads)
        theta_hat = jax.tree.map(jnp.add, theta, d)
        return theta_hat, state.inner_opt, {"train_loss": loss0, "cg_iters": info.iterations,
                                            "cg_residual": jnp.max(info.residual_norm)}

    def _line_search(self, theta, theta_hat, aux):
        hp = self.hp
        delta = jax.tree.map(jnp.subtract, theta_hat, theta)
        ls = line_search(lambda p, b: lm_loss(self._apply, p, b), theta, delta, aux,
                         grid=hp.ls_grid, extend=hp.ls_extend, vectorize=hp.ls_vectorize)
        new = jax.tree.map(lambda p, d: p + ls.alpha.astype(p.dtype) * d, theta, delta)
        # Predicted decrease of the local model on the line-search data, at the chosen step.
        pred = jax.lax.map(lambda b: (lambda q: q.loss0 - q(new)[0])(self._model(theta, b)), aux).mean()
        actual = ls.loss0 - ls.loss
        metrics = {"alpha": ls.alpha, "loss_before": ls.loss0, "loss_after": ls.loss,
                   "pred_decrease": pred, "actual_decrease": actual,
                   "rho": actual / jnp.where(pred == 0, jnp.nan, pred), "delta_norm": tree_norm(delta),
                   "ls_at_edge": ls.at_edge.astype(jnp.float32), "ls_evals": ls.num_evals}
        return new, metrics

    def _probe(self, theta, theta_hat, batch):
        """Fraction of the CG decrease of Q (on one fixed batch) that θ̂ achieves.

        CG solves (G + λI) d = −∇ℓ on `batch` (the near-exact minimiser of that
        batch's Q); the inner loop's θ̂ was fitted to N different batches, so
        the fraction measures how well the small-batch inner loop minimises Q.
        """
        inputs, targets = split_batch(batch)
        q = self._model(theta, batch)
        d, _ = self._damped_solve(theta, inputs, targets, q(theta)[1])
        q0 = q.loss0
        cg_dec = q0 - q(jax.tree.map(jnp.add, theta, d))[0]
        inner_dec = q0 - q(theta_hat)[0]
        return {"probe_cg_decrease": cg_dec, "probe_inner_decrease": inner_dec,
                "probe_fraction": inner_dec / cg_dec}

    def step(self, params, state: GNState, batches, aux, rng):
        """One outer step; times the inner loop and the line search separately."""
        del rng
        t0 = time.perf_counter()
        theta_hat, opt, m_inner = self._inner(params, state, batches)
        jax.block_until_ready(theta_hat)
        t1 = time.perf_counter()
        new, m_ls = self._search(params, theta_hat, aux)
        jax.block_until_ready(new)
        t2 = time.perf_counter()
        state = GNState(inner_params=theta_hat, inner_opt=opt, outer_step=state.outer_step + 1)
        metrics = {**m_inner, **m_ls, "inner_time_s": t1 - t0, "linesearch_time_s": t2 - t1}
        k = self.hp.probe_every
        if k and int(state.outer_step) % k == 0:
            metrics.update(self._probe_fn(params, theta_hat, batches[0]))
        return new, state, metrics


def register_gauss_newton() -> None:
    """Register gn, gn_prox_linear and gn_layerwise."""
    from gn.optim.registry import MethodSpec, register

    variants = {
        "gn": ("gn", {}, "Full Gauss-Newton: inner Muon loop on the GN quadratic model + line search "
                         "(Abreu et al. 2025)"),
        "gn_prox_linear": ("prox_linear", {}, "GN-prox-linear: inner loop on the full loss of the "
                                              "linearised model + line search"),
        # block_mode "unrolled": each block's tangent starts and its transpose stops at that block;
        # same numbers as "batched" (one vmapped pass), measured 30-35 % faster (docs/benchmarks.md).
        "gn_layerwise": ("gn", {"partition": "transformer_blocks", "ls_grid": 10, "block_mode": "unrolled"},
                         "Layerwise GN: block-diagonal GN model (embedding, each block, norm+head), "
                         "all blocks in one compiled step"),
    }
    for name, (kind, defaults, desc) in variants.items():
        def build(display, hparams, ctx, _kind=kind):
            return GaussNewtonMethod(display, GNHParams(**hparams), ctx, kind=_kind)

        register(MethodSpec(name=name, description=desc, hparams_cls=GNHParams, options={},
                            defaults=defaults, build=build, family="gauss_newton"))


__all__ = ["GNHParams", "GNState", "GaussNewtonMethod", "register_gauss_newton", "inner_lr_factor"]
