"""Typed hyperparameters of the FOG family: K-FAC, FOG, DiagFog, PI-Muon (docs/methods.md §1-3).

Each builds its optax chain from `gn.optim` and runs it in a `StatsMethod`,
which hands the transformation the layer statistics and the predictive entropy
of the gradient's own forward/backward pass. PI-Muon may take its g_fisher from
layerwise Gauss-Newton instead of K-FAC (`fisher_source: lwgn`, docs/methods.md §4);
`pi_muon_gn` is that variant under its own name.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

from gn.methods.base import MethodContext, check_choice, check_range, opt
from gn.methods.first_order import OptimizerConfig
from gn.methods.muon_like import CURVATURE_BATCH_HELP, check_curvature_batch, lwgn_backend_cost
from gn.methods.stats import StatsMethod
from gn.optim import (DAMPING_MODES, DIAG_MODES, FISHER_SOURCES, FISHER_TYPES, clip_and_decay, diagfog, fog,
                      kernels_only, kfac, matrix_mask_fn, pi_muon, scale_by_layerwise_gn, scale_by_muon,
                      with_adamw_side)

# Not arguments of the optax alias: they choose how the StatsMethod gathers statistics.
_METHOD_KEYS = ("fisher", "fisher_source", "lwgn_iters", "curvature_batch", "statistics")
_KFAC_ONLY = ("stat_decay", "damping_mode", "T_cov", "T_inv", "kl_clip", "fisher")
_STATS_KEYS = ("stat_decay", "T_cov", "fisher")


@dataclasses.dataclass(frozen=True)
class _StatsConfig(OptimizerConfig):
    """Shared by the family: AdamW side, head routing and the Fisher type."""

    family: ClassVar[str] = "fog"
    inner_ok: ClassVar[bool] = False
    alias: ClassVar = None           # the gn.optim optimizer this method runs
    learning_rate: float = opt(0.02, "peak learning rate")
    stat_decay: float = opt(0.95, "EMA decay of the statistics")
    T_cov: int = opt(1, "steps between statistics refreshes")
    fisher: str = opt("empirical", "statistics from true labels (empirical) or sampled labels (true)")
    include_head: bool = opt(False, "precondition lm_head too (builds a V×V factor)")
    adam_learning_rate: Optional[float] = opt(None, "AdamW-side peak learning rate (null = the method's own)")
    adam_b1: float = opt(0.9, "AdamW-side β₁")
    adam_b2: float = opt(0.95, "AdamW-side β₂")
    adam_eps: float = opt(1e-8, "AdamW-side ε")

    def validate(self, where: str) -> None:
        super().validate(where)
        check_choice(self.fisher, FISHER_TYPES, where, "fisher")
        check_range(0.0 <= self.stat_decay < 1.0, where, "stat_decay", "in [0, 1)", self.stat_decay)
        for key in ("T_cov", "T_inv", "ns_steps"):
            if hasattr(self, key):
                check_range(getattr(self, key) >= 1, where, key, ">= 1", getattr(self, key))
        for key in ("damping", "eps", "kl_clip", "alpha", "gamma"):
            if hasattr(self, key):
                check_range(getattr(self, key) >= 0, where, key, ">= 0", getattr(self, key))
        if hasattr(self, "damping_mode"):
            check_choice(self.damping_mode, DAMPING_MODES, where, "damping_mode")

    def stats_kind(self) -> Optional[str]:
        """Which layer statistics the step gathers: kron (A, G), diag, or None."""
        return "kron"

    def alias_options(self, ctx: MethodContext) -> dict:
        """Keyword arguments of the gn.optim alias."""
        shared = {f.name for f in dataclasses.fields(OptimizerConfig)}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in shared and f.name not in _METHOD_KEYS}

    def build(self, ctx: MethodContext, name: str) -> StatsMethod:
        schedule = self.schedule_fn(ctx.total_steps)
        o = self.alias_options(ctx)
        o["adam_learning_rate"] = self.adam_side_lr(schedule, self.adam_learning_rate)
        if getattr(self, "statistics", True):
            core = type(self).alias(schedule, **o)
        else:   # the control: the same chain with the statistical operator replaced by the identity
            core = with_adamw_side(
                scale_by_muon(self.beta, nesterov=self.nesterov, ns_steps=self.ns_steps), schedule,
                include_head=self.include_head, adam_learning_rate=o["adam_learning_rate"],
                adam_b1=self.adam_b1, adam_b2=self.adam_b2, adam_eps=self.adam_eps)
        tx = clip_and_decay(core, schedule, grad_clip=self.grad_clip, weight_decay=self.weight_decay,
                            weight_decay_mask=self.weight_decay_mask)
        pi = (self.alpha, self.gamma) if hasattr(self, "alpha") else None
        return StatsMethod(name, tx, schedule, ctx,
                           stats=self.stats_kind() if getattr(self, "statistics", True) else None,
                           layer_mask=matrix_mask_fn(self.include_head), fisher=self.fisher,
                           T_cov=self.T_cov, pi=pi, backend_cost=self.backend_cost(ctx, name))


@dataclasses.dataclass(frozen=True)
class KFACConfig(_StatsConfig):
    name: ClassVar[str] = "kfac"
    description: ClassVar[str] = ("K-FAC natural-gradient descent with momentum and KL clip (Martens & Grosse "
                                  "2015); AdamW on embeddings/head/norms")
    alias: ClassVar = staticmethod(kfac)
    learning_rate: float = opt(0.1, "peak learning rate")
    damping: float = opt(1e-3, "λ added to the Kronecker factors' eigenvalue products")
    damping_mode: str = opt("eigen", "eigen (exact (A⊗G + λI)⁻¹) or factored (Tikhonov per factor)")
    T_inv: int = opt(10, "steps between eigendecompositions")
    kl_clip: float = opt(1e-3, "KL clip κ (0 = off)")
    momentum: float = opt(0.9, "heavy-ball momentum on the natural gradient (0 = off)")
    nesterov: bool = opt(False, "Nesterov momentum")


@dataclasses.dataclass(frozen=True)
class FOGConfig(_StatsConfig):
    name: ClassVar[str] = "fog"
    description: ClassVar[str] = ("FOG: Muon of the K-FAC natural gradient, Muon ∘ K-FAC⁻¹ (docs/methods.md §1); AdamW on "
                                  "embeddings/head/norms")
    alias: ClassVar = staticmethod(fog)
    damping: float = opt(1e-3, "λ added to the Kronecker factors' eigenvalue products")
    damping_mode: str = opt("eigen", "eigen (exact (A⊗G + λI)⁻¹) or factored (Tikhonov per factor)")
    T_inv: int = opt(10, "steps between eigendecompositions")
    kl_clip: float = opt(0.0, "KL clip κ (0 = off)")
    beta: float = opt(0.95, "Muon momentum decay")
    nesterov: bool = opt(True, "Nesterov momentum")
    ns_steps: int = opt(5, "Newton-Schulz iterations")
    statistics: bool = opt(True, "false: the same chain without its statistical operator (the control)")

    def unused_keys(self) -> tuple[str, ...]:
        return () if self.statistics else _STATS_KEYS + ("damping", "damping_mode", "T_inv", "kl_clip")

    def unused_reason(self) -> str:
        return " with statistics: false (no statistical operator)"


@dataclasses.dataclass(frozen=True)
class DiagFogConfig(_StatsConfig):
    name: ClassVar[str] = "diagfog"
    description: ClassVar[str] = "DiagFog: Muon of g / (diagonal Fisher + eps), O(in + out) statistics (docs/methods.md §2)"
    alias: ClassVar = staticmethod(diagfog)
    diag: str = opt("kron", "kron (E[a²]·E[δ²], from layer statistics) or ema_sq (EMA of g²)")
    eps: float = opt(1e-8, "ε in g / (f_diag + ε)")
    beta: float = opt(0.95, "Muon momentum decay")
    nesterov: bool = opt(True, "Nesterov momentum")
    ns_steps: int = opt(5, "Newton-Schulz iterations")
    statistics: bool = opt(True, "false: the same chain without its statistical operator (the control)")

    def validate(self, where: str) -> None:
        super().validate(where)
        check_choice(self.diag, DIAG_MODES, where, "diag")

    def unused_keys(self) -> tuple[str, ...]:
        return () if self.statistics else _STATS_KEYS + ("diag", "eps")

    def unused_reason(self) -> str:
        return " with statistics: false (no statistical operator)"

    def stats_kind(self) -> Optional[str]:
        return "diag" if self.diag == "kron" else None


@dataclasses.dataclass(frozen=True)
class PIMuonConfig(_StatsConfig):
    name: ClassVar[str] = "pi_muon"
    description: ClassVar[str] = ("PI-Muon: PI-weighted mix of the K-FAC step and Muon, PI = exp(-(alpha H + "
                                  "gamma |g|)) (superseded by FOG; docs/methods.md §3); g_fisher from fisher_source: "
                                  "kfac or lwgn (layerwise GN)")
    alias: ClassVar = staticmethod(pi_muon)
    alpha: float = opt(0.1, "PI's entropy weight α")
    gamma: float = opt(0.1, "PI's gradient-norm weight γ")
    fisher_source: str = opt("kfac", "g_fisher from kfac or lwgn (layerwise Gauss-Newton)")
    damping: float = opt(1e-3, "λ of the K-FAC or layerwise-GN solve")
    damping_mode: str = opt("eigen", "eigen (exact (A⊗G + λI)⁻¹) or factored (Tikhonov per factor)")
    T_inv: int = opt(10, "steps between eigendecompositions")
    kl_clip: float = opt(1e-3, "KL clip κ (0 = off)")
    beta: float = opt(0.95, "Muon momentum decay")
    nesterov: bool = opt(True, "Nesterov momentum")
    ns_steps: int = opt(5, "Newton-Schulz iterations")

    def validate(self, where: str) -> None:
        super().validate(where)
        check_choice(self.fisher_source, FISHER_SOURCES, where, "fisher_source")

    def unused_keys(self) -> tuple[str, ...]:
        return _KFAC_ONLY if self.fisher_source == "lwgn" else ()

    def unused_reason(self) -> str:
        return " with fisher_source: lwgn (the layerwise-GN solve has no K-FAC statistics)"

    def stats_kind(self) -> Optional[str]:
        return "kron" if self.fisher_source == "kfac" else None

    def alias_options(self, ctx: MethodContext) -> dict:
        o = super().alias_options(ctx)
        if self.fisher_source == "lwgn":
            # Layerwise Gauss-Newton (docs/methods.md §4) as g_fisher: per-kernel (G_bb + λI)⁻¹ g_b by block CG.
            o["fisher"] = scale_by_layerwise_gn(ctx.apply_fn, damping=self.damping,
                                                only=kernels_only(self.include_head),
                                                max_iters=getattr(self, "lwgn_iters", 5), block_mode="unrolled",
                                                curvature_batch=getattr(self, "curvature_batch", 0))
        return o

    def backend_cost(self, ctx, name):
        if self.fisher_source != "lwgn":
            return None
        return lwgn_backend_cost(ctx, name, curvature_batch=getattr(self, "curvature_batch", 0),
                                 iters=getattr(self, "lwgn_iters", 5), only=kernels_only(self.include_head))


@dataclasses.dataclass(frozen=True)
class PIMuonGNConfig(PIMuonConfig):
    name: ClassVar[str] = "pi_muon_gn"
    description: ClassVar[str] = ("PI-Muon with layerwise Gauss-Newton as g_fisher: (1-λ)(G_bb+λI)⁻¹g + "
                                  "λ Muon(g) (docs/methods.md §4)")
    fisher_source: str = opt("lwgn", "g_fisher from kfac or lwgn (layerwise Gauss-Newton)")
    lwgn_iters: int = opt(5, "block-CG iterations of the layerwise-GN solve")
    curvature_batch: int = opt(0, CURVATURE_BATCH_HELP)

    def validate(self, where: str) -> None:
        super().validate(where)
        check_range(self.lwgn_iters >= 1, where, "lwgn_iters", ">= 1", self.lwgn_iters)
        check_curvature_batch(self, where)


CONFIGS = (KFACConfig, FOGConfig, DiagFogConfig, PIMuonConfig, PIMuonGNConfig)
