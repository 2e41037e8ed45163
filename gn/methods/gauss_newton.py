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
(G + λI) d = −∇ℓ over the whole outer batch (Martens 2010, Hessian-free; its
Levenberg-Marquardt damping and diagonal preconditioner: gn/methods/gn_cg.py).

Unlike the paper's code: the inner learning rate is computed from explicit
(outer, inner) step counters, so schedules are right whatever the warm-start
policy; `damping` really adds (λ/2)‖θ − θ_t‖²; line-search tokens are counted
apart from training tokens and the line search may use fewer batches than N.
By default also unlike it (each an option, docs/paper_protocol.md): the inner
optimizer's routing and clipping (`inner_routing`, `inner_clip_per_group`;
gn/methods/paper_inner.py) and the rejection of a step whose predicted decrease
is <= 0 (`reject_nonpositive_prediction`). A non-finite line-search loss is
never taken (the paper's code takes α = 1 when its loss is NaN).
"""

from __future__ import annotations

import dataclasses
import math
import time
import typing
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from gn import curvature
from gn.curvature.objective import lm_loss, split_batch
from gn.errors import ConfigError, suggest
from gn.methods.base import BatchPlan, MethodBase, MethodContext
from gn.methods import gn_cg
from gn.methods.linesearch import line_search
from gn.methods.optimizers import OPTIMIZERS
from gn.methods.paper_inner import inner_transform
from gn.optim import decay_mask, tree_norm
from gn.structs import coerce

# constant_inner_cosine is the paper's constant_with_inner_cosine. global_inner_cosine (global cosine x inner
# cosine) is neither the paper's intended nor its actual cosine_with_global_schedule (off by one there: each
# outer step runs the next one's peak and the last trains at lr 0; docs/paper_protocol.md).
INNER_SCHEDULES = ("constant", "constant_inner_cosine", "global_cosine", "global_inner_cosine")
INNER_SOLVERS = ("optax", "cg")
PARTITIONS = (None, *curvature.PARTITIONS)


INNER_LOOP_KEYS = ("inner_optimizer", "inner_learning_rate", "inner_adam_learning_rate", "inner_schedule",
                   "inner_min_lr_ratio", "inner_grad_clip", "warm_start", "inner_options")
# Options of the inner optimizer that GN sets from its own keys (so inner_options may not).
_INNER_OWN_KEYS = {"learning_rate": "inner_learning_rate", "grad_clip": "inner_grad_clip",
                   "weight_decay": "inner_weight_decay", "weight_decay_mask": "inner_weight_decay_mask",
                   "adam_learning_rate": "inner_adam_learning_rate"}
# Schedule options of the inner optimizer: GN applies its own inner schedule instead.
_INNER_SCHEDULE_KEYS = ("schedule", "warmup_steps", "decay_fraction", "min_lr_ratio")


def inner_optimizer_config(hp: Any, where: str = "gn"):
    """The inner optimizer's typed config: GN's inner_* keys plus `inner_options`, validated
    against the optimizer's own fields (ConfigError naming the key otherwise)."""
    inner_cls = OPTIMIZERS[hp.inner_optimizer]
    fields = {f.name for f in dataclasses.fields(inner_cls)}
    inner = {"learning_rate": hp.inner_learning_rate, "grad_clip": hp.inner_grad_clip,
             "weight_decay": hp.inner_weight_decay, "weight_decay_mask": hp.inner_weight_decay_mask}
    if "adam_learning_rate" in fields:
        inner["adam_learning_rate"] = hp.inner_adam_learning_rate
    options = hp.inner_options or {}
    if not isinstance(options, Mapping):
        raise ConfigError(f"'{where}.inner_options' must be a mapping of {hp.inner_optimizer} options, "
                          f"got {options!r}.")
    hints = typing.get_type_hints(inner_cls)
    valid = sorted(fields - set(_INNER_OWN_KEYS) - set(_INNER_SCHEDULE_KEYS))
    for key, value in options.items():
        if key in _INNER_SCHEDULE_KEYS:
            raise ConfigError(f"'{where}.inner_options.{key}': the inner loop's schedule is GN's own "
                              "(inner_schedule, inner_min_lr_ratio).")
        if key in _INNER_OWN_KEYS:
            raise ConfigError(f"'{where}.inner_options.{key}': set it with '{_INNER_OWN_KEYS[key]}' instead.")
        if key not in fields:
            raise ConfigError(f"'{where}.inner_options.{key}' is not an option of the inner optimizer "
                              f"'{hp.inner_optimizer}'.{suggest(str(key), valid)} Valid: {', '.join(valid)}.")
        inner[key] = coerce(hints[key], value, f"{where}.inner_options.{key}")
    cfg = inner_cls(**inner)
    cfg.validate(f"{where}.inner_options ({hp.inner_optimizer})")
    return cfg




class GNState(NamedTuple):
    inner_params: Any      # θ̂, the warm start for the next outer step
    inner_opt: Any         # the inner optimizer's state
    outer_step: jnp.ndarray
    damping: jnp.ndarray   # λ of the CG solve: `damping`, adapted by damping_adapt: lm (gn/methods/gn_cg.py)


def inner_lr_factor(schedule: str, outer: jnp.ndarray, inner: jnp.ndarray, n_inner: int,
                    n_outer: int, floor: float) -> jnp.ndarray:
    """Learning-rate multiplier at inner step `inner` of outer step `outer` (0-based)."""

    def cos(frac):
        return floor + (1.0 - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.clip(frac, 0.0, 1.0)))

    inner_c = cos(inner / n_inner)
    global_c = cos((outer * n_inner + inner) / (n_outer * n_inner))
    return {"constant": jnp.ones(()), "constant_inner_cosine": inner_c, "global_cosine": global_c,
            "global_inner_cosine": global_c * inner_c}[schedule]


def _all_finite(tree: Any) -> jnp.ndarray:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _flop_cost(num_blocks: int) -> float:
    """Matmul FLOPs of one inner step relative to a value_and_grad (6N per token):
    primal 2N + tangent 4N + transpose 4N, with one tangent/transpose per block."""
    return (2.0 + 8.0 * num_blocks) / 6.0


class GaussNewtonMethod(MethodBase):
    """The GN outer step as a trainer method (see module docstring)."""

    def __init__(self, name: str, hp: Any, ctx: MethodContext, *, kind: str):
        n = hp.inner_steps
        if ctx.batch_size % n:
            raise ConfigError(f"Method '{name}': the batch size {ctx.batch_size} must be divisible by "
                              f"inner_steps ({n}): each inner step reads batch_size / inner_steps sequences.")
        self.name, self.hp, self.kind = name, hp, kind
        self.b_inner = ctx.batch_size // n
        self.total_steps = ctx.total_steps
        self._apply = ctx.apply_fn
        # Pins θ̂, the inner optimizer state and the new θ to the run's parameter sharding (FSDP).
        self._constrain = ctx.constrain
        self.partition = hp.partition
        self.plan = BatchPlan(train=n, micro_batch=self.b_inner, aux=hp.ls_batches, aux_micro_batch=self.b_inner)
        self.updates_per_step = n if hp.inner_solver == "optax" else 1
        # The learning rate is applied outside the transformation from explicit step counters.
        # gn's routing or the paper's, one clip or one per group (gn/methods/paper_inner.py).
        self.tx = inner_transform(hp, inner_optimizer_config(hp, name))
        self._edge_noted = False
        self._rejection_noted = False
        self._nonpositive_noted = False
        self._increase_noted = False
        self._num_blocks = None
        ref = ctx.reference_batch_size or ctx.batch_size
        self._ref_scale = self.b_inner / ref
        self._inner = jax.jit(self._inner_loop if hp.inner_solver == "optax" else self._cg_solve)
        self._search = jax.jit(self._line_search)
        self._lm = jax.jit(lambda *args: gn_cg.lm_update(self, *args))
        self._probe_fn = jax.jit(self._probe)

    # -- cost accounting ---------------------------------------------------
    @property
    def grad_evals_per_step(self) -> float:
        """value_and_grad equivalents at the reference batch (FLOP estimate), with the line
        search's grid evaluated once (`ls_extend` chunks are counted per step, in `grad_evals`)."""
        return self._cost(self.hp.ls_grid + self.hp.ls_grid_up + 1)

    def _cost(self, ls_evals, cg_iters_used=None) -> Any:
        """FLOP estimate of one outer step whose line search evaluated `ls_evals` points (α = 0
        included): forward passes cost 2N of a gradient's 6N; the predicted decrease one
        model evaluation per line-search batch. The CG step counts the products it did
        (`cg_iters_used`; cg_iters, an upper bound, when not given): gn_cg.cost."""
        nb = self._num_blocks or 1
        hp = self.hp
        cg_search = 0.0
        if hp.inner_solver == "optax":
            inner = hp.inner_steps * _flop_cost(nb)
        else:
            cg_inner, cg_search = gn_cg.cost(hp, nb, cg_iters_used)
            inner = hp.inner_steps * cg_inner
        search = hp.ls_batches * (ls_evals / 3.0 + _flop_cost(nb) + cg_search)
        return (inner + search) * self._ref_scale

    def init(self, params: Any) -> GNState:
        self._num_blocks = len(curvature.make_partition(params, self.partition)[1]) if self.partition else 1
        lam = jnp.asarray(self.hp.damping, jnp.promote_types(jnp.result_type(*jax.tree.leaves(params)), jnp.float32))
        return GNState(inner_params=params, inner_opt=self.tx.init(params), outer_step=jnp.zeros((), jnp.int32),
                       damping=lam)

    def lr(self, step: int) -> float:
        f = inner_lr_factor(self.hp.inner_schedule, jnp.asarray(step), jnp.asarray(0), self.hp.inner_steps,
                            self.total_steps, self.hp.inner_min_lr_ratio)
        return float(self.hp.inner_learning_rate * f)

    # -- the pieces ----------------------------------------------------------
    def local_model(self, theta, batch):
        """The local model of this method (Q, P or their layerwise versions) at θ_t = `theta` on `batch`."""
        inputs, targets = split_batch(batch)
        return curvature.quadratic_model(self._apply, theta, inputs, targets, kind=self.kind,
                                         partition=self.partition, damping=self.hp.damping,
                                         block_mode=self.hp.block_mode)

    def inner_step(self, theta, theta_hat, opt, batch, outer_step, i):
        """ONE inner step, exactly as the inner loop's scan body runs it (and as `gn bench` times it):
        (θ_t, θ̂, opt, batch, outer_step, i) -> (θ̂', opt', ℓ(z0), q(θ̂)), the new (θ̂', opt')
        under the run's sharding constraint. `i` is the inner step's index (the inner schedule's clock)."""
        hp = self.hp
        # ℓ(z0) from the same pass as Q (a chunked model would otherwise pay another head pass).
        value, grads, loss0 = self.local_model(theta, batch).with_loss0(theta_hat)
        updates, opt = self.tx.update(grads, opt, theta_hat)
        lr = hp.inner_learning_rate * inner_lr_factor(hp.inner_schedule, outer_step, i, hp.inner_steps,
                                                      self.total_steps, hp.inner_min_lr_ratio)
        theta_hat = jax.tree.map(lambda p, u: p + (lr * u).astype(p.dtype), theta_hat, updates)
        theta_hat, opt = self._constrain((theta_hat, opt))
        return theta_hat, opt, loss0, value

    def _inner_loop(self, theta, state: GNState, batches):
        hp = self.hp
        start = state.inner_params if hp.warm_start else theta
        opt = state.inner_opt if hp.warm_start else self.tx.init(theta)

        def body(carry, xs):
            i, batch = xs
            theta_hat, opt, loss0, value = self.inner_step(theta, *carry, batch, state.outer_step, i)
            return (theta_hat, opt), (loss0, value)

        (theta_hat, opt), (loss0, qvals) = jax.lax.scan(body, (start, opt), (jnp.arange(hp.inner_steps), batches))
        metrics = {"train_loss": loss0.mean(), "inner_q_first": qvals[0] - loss0[0],
                   "inner_q_last": qvals[-1] - loss0[-1]}
        theta_hat, opt = self._constrain((theta_hat, opt))
        return theta_hat, opt, metrics

    def _decay(self, theta):
        """M ⊙ θ · wd: the inner loop's decoupled decay as the gradient of (wd/2)‖M θ‖²."""
        mask = decay_mask(theta, self.hp.inner_weight_decay_mask)
        return jax.tree.map(lambda m, x: jnp.where(m, self.hp.inner_weight_decay, 0.0).astype(x.dtype) * x,
                            mask, theta)

    def regularizer(self, theta_hat):
        """(wd/2)‖M θ̂‖², the inner weight decay as a term of the local model (0 when wd = 0)."""
        if not self.hp.inner_weight_decay:
            return jnp.zeros(())
        return 0.5 * sum(jnp.vdot(d, x) for d, x in zip(jax.tree.leaves(self._decay(theta_hat)),
                                                         jax.tree.leaves(theta_hat)))

    def _damped_solve(self, theta, inputs, targets, grads, damping=None, diag=None):
        """The minimiser of the same local model as the inner loop by CG (block CG with a partition):
        (G + λI + wd·M) d = −(g + wd·M θ_t), M the inner weight-decay mask (gn_cg.damped_solve)."""
        return gn_cg.damped_solve(self, theta, inputs, targets, grads, damping, diag)

    def _cg_solve(self, theta, state: GNState, batches):
        """(G + λI) d = −∇ℓ over the whole outer batch, matrix-free (Martens 2010; gn_cg.cg_solve)."""
        return gn_cg.cg_solve(self, theta, state, batches)

    def _line_search(self, theta, theta_hat, aux):
        hp = self.hp
        delta = jax.tree.map(jnp.subtract, theta_hat, theta)
        ls = line_search(lambda p, b: lm_loss(self._apply, p, b), theta, delta, aux,
                         grid=hp.ls_grid, extend=hp.ls_extend, vectorize=hp.ls_vectorize, up=hp.ls_grid_up)
        moved = jax.tree.map(lambda p, d: p + ls.alpha.astype(p.dtype) * d, theta, delta)
        # Predicted decrease of the local model of the LOSS (the proximal term (λ/2)‖θ − θ_t‖² of
        # `damping` left out, as in the LM ratio, gn_cg.lm_update) on the line-search data, at the
        # chosen step. With the term in, a step at α ≥ 2 along the damped model's own minimiser
        # would be predicted not to decrease (q_λ(2d*) = q_λ(0)) and be rejected however much the
        # loss fell: every GN-CG step at λ0 = 0.1 with ls_grid_up was.
        def predicted(b):
            inputs, targets = split_batch(b)
            q = curvature.quadratic_model(self._apply, theta, inputs, targets, kind=self.kind,
                                          partition=self.partition, damping=0.0, block_mode=hp.block_mode)
            value, _, loss0 = q.with_loss0(moved)
            return loss0 - value

        pred = jax.lax.map(predicted, aux).mean()
        # A step the local model does not predict to decrease the loss is not trusted (a diverged inner
        # loop can still find a lucky α on the line-search batches): θ stays at θ_t.
        if hp.reject_nonpositive_prediction:
            rejected = ~(jnp.isfinite(pred) & (pred > 0))
        else:
            # The paper's rule: the best α is taken whatever the prediction. Not copied from its code:
            # a NaN loss at α = 1 is taken there; here a non-finite α or step never is (θ kept).
            rejected = (ls.alpha <= 0) | ~_all_finite(moved)
        if hp.ls_reject_increase:
            # Even the best α of the grid raised the loss on fresh data: the direction is not trusted.
            rejected = rejected | ~(ls.loss <= ls.loss0)
        new = self._constrain(jax.tree.map(lambda m, p: jnp.where(rejected, p, m), moved, theta))
        alpha = jnp.where(rejected, 0.0, ls.alpha)
        actual = jnp.where(rejected, 0.0, ls.loss0 - ls.loss)
        metrics = {"alpha": alpha, "loss_before": ls.loss0, "loss_after": jnp.where(rejected, ls.loss0, ls.loss),
                   "pred_decrease": pred, "actual_decrease": actual,
                   "rho": actual / jnp.where(pred == 0, jnp.nan, pred), "delta_norm": tree_norm(delta),
                   "ls_at_edge": ls.at_edge.astype(jnp.float32), "ls_evals": ls.num_evals,
                   "step_rejected": rejected.astype(jnp.float32), "ls_best_loss": ls.loss,
                   "ls_at_top": ls.at_top.astype(jnp.float32), "loss_full_step": ls.loss_at_one}
        return new, rejected, metrics

    def _probe(self, theta, theta_hat, batch):
        """Fraction of the CG decrease of Q (on one fixed batch) that θ̂ achieves.

        Both minimise the same model, Q plus the inner weight decay (wd/2)‖M θ‖²:
        CG solves it on `batch` (the near-exact minimiser of that batch's model);
        the inner loop's θ̂ was fitted to N different batches, so the fraction
        measures how well the small-batch inner loop minimises it.
        """
        inputs, targets = split_batch(batch)
        q = self.local_model(theta, batch)
        d, _ = self._damped_solve(theta, inputs, targets, q(theta)[1])
        model = lambda th: q(th)[0] + self.regularizer(th)
        q0 = q.loss0 + self.regularizer(theta)
        cg_dec = q0 - model(jax.tree.map(jnp.add, theta, d))
        inner_dec = q0 - model(theta_hat)
        return {"probe_cg_decrease": cg_dec, "probe_inner_decrease": inner_dec,
                "probe_fraction": inner_dec / cg_dec}

    def step(self, params, state: GNState, batches, aux, rng):
        """One outer step; times the inner loop and the line search separately."""
        del rng
        t0 = time.perf_counter()
        theta_hat, opt, m_inner = self._inner(params, state, batches)
        jax.block_until_ready(theta_hat)
        t1 = time.perf_counter()
        new, rejected, m_ls = self._search(params, theta_hat, aux)
        lam, m_lm = state.damping, {}
        if self.hp.damping_adapt == "lm":     # the next step's λ from ρ at the full step (gn_cg.lm_update)
            lam, m_lm = self._lm(params, theta_hat, aux, state.damping, m_ls["loss_before"], m_ls["loss_full_step"])
        jax.block_until_ready(new)
        t2 = time.perf_counter()
        # One transfer for the three scalars the host needs (the step has already synchronised).
        n_evals, rejected, pred = jax.device_get((m_ls["ls_evals"], rejected, m_ls["pred_decrease"]))
        m_ls["grad_evals"] = self._cost(int(n_evals), m_inner.get("cg_iters_used"))   # host float: exact accounting
        if bool(rejected) and not math.isfinite(float(pred)):
            # A non-finite inner solution cannot be continued: the next inner loop restarts at θ_t.
            # A finite rejected one is kept (warm start): θ stays at θ_t and the next outer step
            # refines θ̂ further on fresh batches of the same model.
            theta_hat, opt = params, self._constrain(self.tx.init(params))
        state = GNState(inner_params=theta_hat, inner_opt=opt, outer_step=state.outer_step + 1, damping=lam)
        metrics = {**m_inner, **m_ls, **m_lm, "inner_time_s": t1 - t0, "linesearch_time_s": t2 - t1}
        k = self.hp.probe_every
        if k and int(state.outer_step) % k == 0:
            metrics.update(self._probe_fn(params, theta_hat, batches[0]))
        return new, state, metrics

    def notes(self, step: int, metrics) -> list[str]:
        """Once per run each: a step rejected (and why), taken with a predicted decrease <= 0, taken
        although it raised the line-search loss, or at the smallest step of the grid."""
        notes = []
        if metrics.get("step_rejected"):
            if not self._rejection_noted:
                self._rejection_noted = True
                pred = metrics["pred_decrease"]
                if self.hp.reject_nonpositive_prediction and not pred > 0:     # NaN too
                    why = (f"predicted decrease {pred:.3g} <= 0; reject_nonpositive_prediction: false takes the "
                           "best α anyway, the paper's rule")
                elif self.hp.ls_reject_increase and metrics.get("ls_best_loss", 0.0) > metrics["loss_before"]:
                    why = "the best line-search step raised the loss; ls_reject_increase"
                else:
                    why = "no line-search step gave a finite loss"
                notes.append(f"{self.name}: step {step} rejected ({why}): θ kept, the inner solution refined "
                             "next step; summary.json counts rejected steps")
        elif not metrics.get("pred_decrease", 1.0) > 0 and not self._nonpositive_noted:
            self._nonpositive_noted = True
            notes.append(f"{self.name}: step {step} was taken at α={metrics['alpha']:.3g} although its predicted "
                         f"decrease is {metrics['pred_decrease']:.3g} <= 0 (reject_nonpositive_prediction: false, "
                         "the paper's rule)")
        elif metrics.get("actual_decrease", 0.0) < 0 and not self._increase_noted:
            self._increase_noted = True
            notes.append(f"{self.name}: step {step} raised the line-search loss by {-metrics['actual_decrease']:.3g} "
                         f"at its best step α={metrics['alpha']:.3g} and was taken (the paper's rule); "
                         "ls_reject_increase: true rejects such steps")
        elif metrics.get("ls_at_edge") and not self._edge_noted:
            self._edge_noted = True
            notes.append(f"{self.name}: step {step} chose the smallest line-search step α={metrics['alpha']:.3g}; "
                         "set ls_extend > 0 to extend the grid downward")
        return notes

    def summarize(self, rows: list[dict]) -> dict:
        """Line-search statistics: steps whose α* sat at the grid's edge, and the mean α*."""
        edge = [r for r in rows if "ls_at_edge" in r]
        if not edge:
            return {}
        return {"ls_at_edge_steps": int(sum(r["ls_at_edge"] > 0 for r in edge)),
                "mean_alpha": sum(r["alpha"] for r in edge) / len(edge),
                "rejected_steps": int(sum(r.get("step_rejected", 0) > 0 for r in edge))}


__all__ = ["GNState", "GaussNewtonMethod", "inner_lr_factor", "inner_optimizer_config"]
