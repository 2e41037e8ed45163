"""Typed hyperparameters of the Gauss-Newton methods: gn, gn_prox_linear, gn_layerwise.

One frozen dataclass (`GNConfig`) with the inner loop, the CG solver, the line
search and the probe; the three registered variants differ in the local model
(`kind`) and their defaults. `build` returns the outer step of
`gn.methods.gauss_newton.GaussNewtonMethod`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional

from gn import curvature
from gn.methods.base import MethodConfig, MethodContext, check_choice, check_range, opt
from gn.methods.gauss_newton import (INNER_LOOP_KEYS, INNER_SCHEDULES, INNER_SOLVERS, PARTITIONS,
                                     GaussNewtonMethod, inner_optimizer_config)
from gn.methods.optimizers import OPTIMIZERS
from gn.methods import gn_cg, paper_inner
from gn.optim import validate_decay_rule


CG_KEYS = ("cg_iters", "cg_tol")


@dataclasses.dataclass(frozen=True)
class GNConfig(MethodConfig):
    """Hyperparameters of a Gauss-Newton method (defaults sized for CPU runs;
    the paper's 45M settings: inner_steps 122, b_inner 32, inner lr 0.01)."""

    family: ClassVar[str] = "gauss_newton"
    kind: ClassVar[str] = "gn"          # curvature.quadratic_model kind
    lr_key: ClassVar[str] = "inner_learning_rate"
    # b_inner is fixed in a batch study; the outer batch grows through N, so the inner lr does not scale
    lr_batch_power: ClassVar[float] = 0.0
    # θ_{t+1} = θ_t + α·Δ only after the inner loop and the line search: nothing moves inside a step
    whole_outer_steps: ClassVar[bool] = True

    inner_steps: int = opt(8, "N inner steps per outer step, each on batch_size / N sequences")
    inner_solver: str = opt("optax", "optax (inner loop of inner_optimizer) or cg (Hessian-free solve)")
    inner_optimizer: str = opt("muon", "first-order method of the inner loop")
    inner_learning_rate: float = opt(0.01, "inner peak learning rate")
    inner_adam_learning_rate: Optional[float] = opt(None, "inner AdamW-side rate (null = inner_learning_rate)")
    inner_schedule: str = opt("constant_inner_cosine", "constant, constant_inner_cosine (the paper's "
                                                       "constant_with_inner_cosine), global_cosine, "
                                                       "global_inner_cosine (neither the paper's intended nor its "
                                                       "actual cosine_with_global_schedule, which is off by one)")
    inner_min_lr_ratio: float = opt(0.0, "floor of the inner cosine, as a fraction of the peak")
    inner_grad_clip: float = opt(1.0, "inner global-norm clipping (0 = off)")
    inner_options: Any = opt(None, "other options of the inner optimizer, validated against its config, "
                                   "e.g. {adam_b2: 0.999} for Muon's AdamW side (the paper)")
    inner_weight_decay: float = opt(0.001, "inner decoupled weight decay (also in the CG solve: + wd·M)")
    inner_weight_decay_mask: Any = opt("adam_side", "inner decayed leaves: adam_side (the paper: embedding, head, "
                                                    "norms), matrices, hidden_matrices, all, none or path globs")
    inner_routing: str = opt("gn", "gn: embedding, head and norms on the inner Muon's AdamW side (Nesterov: NAdam); "
                                   "paper: embedding and head on their own AdamW without Nesterov, the rest on "
                                   "contrib.muon (Abreu et al. 2025; gn/methods/paper_inner.py)")
    inner_embed_head_options: Any = opt(None, "inner_routing paper: the embedding/head AdamW's {learning_rate, b1, "
                                              "b2, eps, nesterov} (null: Muon's AdamW-side lr, adam_b1, adam_b2, "
                                              "1e-8, false)")
    inner_clip_per_group: bool = opt(False, "clip {embedding, head} and the rest (with a partition: each block) "
                                            "each by its own global norm, as the paper; false: one global norm")
    warm_start: bool = opt(True, "continue the previous inner solution and optimizer state")
    damping: float = opt(0.0, "λ in (λ/2)‖θ − θ_t‖² added to the model")
    partition: Optional[str] = opt(None, "block-diagonal model: per_tensor, top_level, transformer_blocks "
                                         "(paper: final norm in the last block), transformer_blocks_head_norm")
    block_mode: str = opt("batched", "batched, sequential or unrolled (same numbers)")
    ls_grid: int = opt(5, "line-search grid α ∈ {2^(−i/2) : i < ls_grid}")
    ls_batches: int = opt(2, "fresh batches the line search reads")
    ls_extend: int = opt(0, "extra downward grid chunks while the loss improves")
    ls_reject_increase: bool = opt(False, "reject a step whose best α still raises the line-search loss "
                                          "(θ kept; off: accepted, as in the paper, with a note)")
    reject_nonpositive_prediction: bool = opt(True, "reject a step whose predicted decrease is <= 0 (θ kept); "
                                                    "false: the best finite α is always taken (the paper's rule)")
    ls_vectorize: bool = opt(True, "evaluate all α in one vmapped call (false: one by one, less memory)")
    cg_iters: int = opt(50, "CG iterations (cg solver and probe)")
    cg_tol: float = opt(1e-6, "CG relative residual tolerance")
    # The Hessian-free step's options (gn/methods/gn_cg.py; Martens 2010).
    cg_precondition: str = opt("none", "CG preconditioner: none, or diag_ggn (diagonal: a Monte-Carlo estimate "
                                       "of diag(G) at labels sampled from the model, + λ + wd·M; one extra "
                                       "gradient's cost per step)")
    cg_precondition_power: float = opt(1.0, "exponent ξ of the diag_ggn preconditioner (1: Jacobi; Martens 2010 "
                                            "used 0.75)")
    damping_adapt: str = opt("none", "none (λ = damping throughout) or lm: Levenberg-Marquardt from ρ at the full "
                                     "step (λ·3/2 if ρ < 1/4, λ·2/3 if ρ > 3/4; inner_solver: cg; initial λ: damping)")
    damping_min: float = opt(1e-6, "floor of λ under damping_adapt: lm")
    damping_max: float = opt(1e3, "ceiling of λ under damping_adapt: lm")
    ls_grid_up: int = opt(0, "line-search steps above 1: adds α ∈ {2^(i/2) : 1 ≤ i ≤ ls_grid_up}")
    probe_every: int = opt(0, "every k outer steps, compare the inner loop with a CG solve (0 = off)")

    def validate(self, where: str) -> None:
        check_range(self.inner_steps > 0, where, "inner_steps", "positive", self.inner_steps)
        check_choice(self.inner_solver, INNER_SOLVERS, where, "inner_solver")
        check_choice(self.inner_optimizer, tuple(OPTIMIZERS), where, "inner_optimizer")
        check_range(OPTIMIZERS[self.inner_optimizer].inner_ok, where, "inner_optimizer",
                    "a plain first-order method (not one that needs the objective or the batch)",
                    self.inner_optimizer)
        check_range(self.inner_learning_rate > 0, where, "inner_learning_rate", "positive", self.inner_learning_rate)
        check_range(self.inner_adam_learning_rate is None or self.inner_adam_learning_rate > 0, where,
                    "inner_adam_learning_rate", "positive or null", self.inner_adam_learning_rate)
        check_choice(self.inner_schedule, INNER_SCHEDULES, where, "inner_schedule")
        check_range(0 <= self.inner_min_lr_ratio <= 1, where, "inner_min_lr_ratio", "in [0, 1]",
                    self.inner_min_lr_ratio)
        for key in ("inner_grad_clip", "inner_weight_decay", "damping"):
            check_range(getattr(self, key) >= 0, where, key, ">= 0", getattr(self, key))
        validate_decay_rule(self.inner_weight_decay_mask, f"{where}.inner_weight_decay_mask")
        paper_inner.validate(self, inner_optimizer_config(self, where), where)
        check_choice(self.partition, PARTITIONS, where, "partition")
        check_choice(self.block_mode, curvature.BLOCK_MODES, where, "block_mode")
        for key in ("ls_grid", "ls_batches", "cg_iters"):
            check_range(getattr(self, key) > 0, where, key, "positive", getattr(self, key))
        check_range(self.ls_extend >= 0, where, "ls_extend", ">= 0", self.ls_extend)
        check_range(self.cg_tol > 0, where, "cg_tol", "positive", self.cg_tol)
        gn_cg.validate_options(self, where)
        check_range(self.probe_every >= 0, where, "probe_every", ">= 0 (0 disables the CG probe)",
                    self.probe_every)

    def unused_keys(self) -> tuple[str, ...]:
        return INNER_LOOP_KEYS + paper_inner.PAPER_INNER_KEYS if self.inner_solver == "cg" else ()

    def unused_reason(self) -> str:
        return " with inner_solver: cg (a Hessian-free solve over the whole outer batch has no inner loop)"

    def sequential_updates(self, batch_size: int) -> int:
        """N inner updates (inner loop); one damped solve (cg), whose cg_iters products are sequential."""
        del batch_size
        return 1 if self.inner_solver == "cg" else self.inner_steps

    def update_batch(self, batch_size: int) -> int:
        return batch_size // self.sequential_updates(batch_size)

    def build(self, ctx: MethodContext, name: str) -> "GaussNewtonMethod":
        return GaussNewtonMethod(name, self, ctx, kind=self.kind)


@dataclasses.dataclass(frozen=True)
class GNFullConfig(GNConfig):
    name: ClassVar[str] = "gn"
    description: ClassVar[str] = ("Full Gauss-Newton: inner Muon loop on the GN quadratic model + line search "
                                  "(Abreu et al. 2025)")


@dataclasses.dataclass(frozen=True)
class GNProxLinearConfig(GNConfig):
    name: ClassVar[str] = "gn_prox_linear"
    kind: ClassVar[str] = "prox_linear"
    description: ClassVar[str] = ("GN-prox-linear: inner loop on the full loss of the linearised model + "
                                  "line search")


@dataclasses.dataclass(frozen=True)
class GNLayerwiseConfig(GNConfig):
    name: ClassVar[str] = "gn_layerwise"
    description: ClassVar[str] = ("Layerwise GN: block-diagonal GN model (embedding, each block, the final norm in "
                                  "the last block, head), "
                                  "all blocks in one compiled step")
    partition: Optional[str] = opt("transformer_blocks", "block-diagonal model: per_tensor, top_level, "
                                                         "transformer_blocks (the paper's: embedding, each block "
                                                         "with the final norm in the last, head), "
                                                         "transformer_blocks_head_norm (final norm with the head)")
    ls_grid: int = opt(10, "line-search grid α ∈ {2^(−i/2) : i < ls_grid}")
    # "unrolled": each block's tangent starts and its transpose stops at that block; same numbers
    # as "batched" (one vmapped pass), measured 30-35 % faster (docs/benchmarks.md).
    block_mode: str = opt("unrolled", "batched, sequential or unrolled (same numbers)")


CONFIGS = (GNFullConfig, GNProxLinearConfig, GNLayerwiseConfig)
