"""K-FAC statistics from the gradient's own forward/backward pass, and `StatsMethod`.

The FOG family (K-FAC, FOG, DiagFog, PI-Muon; `gn.optim`) needs, besides the
gradient, each dense layer's input and output-gradient statistics and the
predictive entropy. They come from one forward pass of the model with zero
perturbations on every dense output (`gn.curvature.layer_stats`, which finds
the dense layers of any flax model by parameter path): the pullback of ∂ℓ̄/∂z
gives ∇θ ℓ̄ and ∂ℓ̄/∂y of every layer at once.

Not chunked: this pass forms the full (tokens × vocabulary) logits (and the
entropy reads them) even when `model.logits_chunk` > 0; the statistics of the
LM head's output gradients need them. `gn.curvature.chunked` covers the loss,
its gradient and the Gauss-Newton products only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from gn.curvature.layer_stats import layer_stats_vjp
from gn.curvature.losses import mean_loss
from gn.curvature.objective import mean_entropy, split_batch
from gn.errors import require
from gn.methods.accumulate import AccumulatedMethod, BackendCost, micro_batch_plan
from gn.methods.base import MethodContext
from gn.model import FlaxLM, ModelConfig, make_apply
from gn.optim import ParamPath as Path
from gn.optim import FISHER_TYPES, batch_factors, kron_stats_cost, predictive_integrity, stat_layers
from gn.optim import safe_increment
from gn.optim import tree_norm


def _ce(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return mean_loss(logits, labels)


def stats_model(model: Any) -> Any:
    """What `gn.curvature.layer_stats` runs for `model`: a ModelConfig becomes the LLaMA
    apply function, unrolled and unchunked (its statistics need every dense layer in
    the model's own flax scope and the full logits); a FlaxLM gives its apply function;
    a flax Module or an apply function is returned as is."""
    if isinstance(model, ModelConfig):
        return make_apply(dataclasses.replace(model, scan_layers=False, remat=False, logits_chunk=0))
    if isinstance(model, FlaxLM):
        return model.apply
    return model


def loss_grads_and_stats(cfg: Any, params: Any, batch: jax.Array, *, layers: Sequence[Path],
                         kind: Optional[str] = "kron", fisher: str = "empirical",
                         rng: Optional[jax.Array] = None, compute_stats: Any = True):
    """Loss, gradient, layer factors and predictive entropy from ONE forward pass.

    The forward runs the model with zero perturbations on every dense output
    under `jax.vjp` (`gn.curvature.layer_stats.layer_stats_vjp`; equivalent to
    `jax.value_and_grad(..., argnums=(0, 1), has_aux=True)` over (params,
    perturbations), but the pullback can be reused): its pullback of ∂ℓ̄/∂z
    gives both ∇θ ℓ̄ and ∂ℓ̄/∂y of every dense layer. With fisher="true", a
    second pullback of the loss on labels sampled from softmax(z) (with `rng`)
    gives the δ used for the statistics.

    Args:
      cfg: the model: a gn.model ModelConfig (the LLaMA model, `stats_model`), a
        flax Module, or an apply(params, inputs) -> logits running flax modules;
        params: its parameters (as that apply takes them); batch: [B, T+1] tokens.
      layers: kernel paths to gather statistics for (`stat_layers`).
      kind: "kron" (A, G), "diag" (their diagonals) or None (no statistics).
      compute_stats: bool or traced bool; when False (a T_cov off-step) the
        statistics are skipped with `lax.cond` and zeros returned.

    Returns:
      (loss, grads, factors or None, entropy), loss the mean token cross-entropy.
    """
    if fisher not in FISHER_TYPES:
        raise ValueError(f"fisher must be one of {FISHER_TYPES}, got {fisher!r}")
    inputs, targets = split_batch(batch)
    logits, pullback, acts = layer_stats_vjp(stats_model(cfg), params, inputs)
    loss, dlogits = jax.value_and_grad(_ce)(logits, targets)
    grads, dout = pullback(dlogits)
    entropy = mean_entropy(jax.lax.stop_gradient(logits))
    if kind is None:
        return loss, grads, None, entropy

    def stats():
        d = dout
        if fisher == "true":
            if rng is None:
                raise ValueError("fisher='true' needs an rng to sample labels")
            z = jax.lax.stop_gradient(logits).astype(jnp.float32)
            sampled = jax.random.categorical(rng, z, axis=-1)
            _, d = pullback(jax.grad(_ce)(logits, sampled))
        return batch_factors(acts, d, layers, diagonal=(kind == "diag"))

    if compute_stats is True:
        factors = stats()
    else:
        shapes = jax.eval_shape(stats)
        factors = jax.lax.cond(compute_stats, stats,
                               lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))
    return loss, grads, factors, entropy


class StatsMethodState(NamedTuple):
    """State of `StatsMethod`: its step count (for T_cov) and the transformation's state."""

    count: jax.Array
    opt: Any


class StatsMethod(AccumulatedMethod):
    """One update per step from the gradient AND layer statistics of one forward/backward pass.

    Per micro-batch (`lax.scan` with grad_accum > 1: gn.methods.accumulate, the step
    `OptaxMethod` shares), `loss_grads_and_stats`
    returns the mean loss, its gradient, the batch factors of the selected
    kernels (stats="kron" or "diag"; None for no statistics) and the predictive
    entropy; all are averaged over micro-batches. The transformation is then
    called as tx.update(grads, state, params, factors=..., entropy=H, grad_norm=‖g‖,
    inputs=..., targets=...), ‖g‖ the global norm of the raw (pre-clip) gradient (also
    reported as `grad_norm`), inputs/targets the whole step's batch.
    On steps with count % T_cov ≠ 0 the statistics are skipped (`lax.cond`).
    """

    uses_rng = True          # fisher="true" samples labels: one key per micro-batch

    def __init__(self, name: str, tx: optax.GradientTransformation, schedule: optax.Schedule,
                 ctx: MethodContext, *, stats: Optional[str], layer_mask: Callable[[Any], Any],
                 fisher: str = "empirical", T_cov: int = 1, pi: Optional[tuple[float, float]] = None,
                 backend_cost: Optional[BackendCost] = None):
        require(ctx.model_cfg is not None,
                f"method '{name}' needs the model config (MethodContext.model_cfg) to gather layer statistics.")
        micro_batch_plan(ctx)       # its ConfigError (batch_size / grad_accum) before the others
        require(fisher in FISHER_TYPES,
                f"'{name}.fisher' must be one of {', '.join(FISHER_TYPES)}, got {fisher!r}.")
        require(T_cov >= 1, f"'{name}.T_cov' must be >= 1, got {T_cov}.")
        # Forward ≈ 1, backward ≈ 2 units; the sampled-label backward runs on refresh steps.
        extra = 2.0 / (3.0 * T_cov) if (stats is not None and fisher == "true") else 0.0
        self.grad_evals_per_step = (1.0 + extra) * ctx.batch_size / (ctx.reference_batch_size or ctx.batch_size)
        self.traces = 0          # times `step` was traced (diagnostics: recompilation)
        self._cfg = ctx.model_cfg
        self._stats, self._mask, self._fisher, self._t_cov, self._pi = stats, layer_mask, fisher, T_cov, pi
        super().__init__(name, optax.with_extra_args_support(tx), schedule, ctx, backend_cost=backend_cost)

    def init(self, params: Any) -> StatsMethodState:
        # the statistics' outer products, on refresh steps (every T_cov)
        stats = (kron_stats_cost(params, self._mask, diagonal=self._stats == "diag") / self._t_cov
                 if self._stats is not None else 0.0)
        self.count_backend(params, extra=stats)
        return StatsMethodState(jnp.zeros([], jnp.int32), self.tx.init(params))

    def micro(self, params, state):
        """(loss, (grads, factors, entropy)) of one micro-batch; the layers and the T_cov
        refresh are the step's."""
        self.traces += 1
        layers = stat_layers(params, self._mask) if self._stats else ()
        refresh = True if self._t_cov == 1 else (state.count % self._t_cov == 0)

        def one(batch, rng):
            loss, grads, factors, entropy = loss_grads_and_stats(
                self._cfg, params, batch, layers=layers, kind=self._stats, fisher=self._fisher, rng=rng,
                compute_stats=refresh)
            return loss, (grads, factors, entropy)

        return one

    def update(self, params, state, loss, mean, batches):
        grads, factors, entropy = mean
        gnorm = tree_norm(grads)
        inputs, targets = split_batch(batches.reshape((-1,) + batches.shape[2:]))
        # inputs/targets (the whole step's batch) feed Fisher sources that need the model (layerwise GN).
        extra = {"entropy": entropy, "grad_norm": gnorm, "inputs": inputs, "targets": targets}
        if factors is not None:
            extra["factors"] = factors
        updates, opt = self.tx.update(grads, state.opt, params, **extra)
        params = optax.apply_updates(params, updates)
        metrics = {"train_loss": loss, "grad_norm": gnorm, "update_norm": tree_norm(updates),
                   "entropy": entropy}
        if self._pi is not None:
            metrics["pi"] = predictive_integrity(entropy, gnorm, *self._pi)
        return params, StatsMethodState(safe_increment(state.count), opt), metrics
