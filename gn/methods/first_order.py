"""Typed hyperparameters of the first-order methods, and how each builds its optax chain.

Every method is the chain (`gn.optim.clip_and_decay`)

    clip_by_global_norm(grad_clip) -> <optimizer with learning-rate schedule>
    -> decoupled weight decay (lr_t · wd · θ on a path-based mask)

so schedules, clipping and weight decay mean the same thing for all methods.
`OptimizerConfig` holds the shared fields; each subclass adds its own options
and builds its optimizer in `core(schedule, apply_fn)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Optional

import optax
from optax import contrib

from gn.curvature.objective import lm_loss
from gn.methods.base import MethodConfig, MethodContext, check_choice, check_range, opt
from gn.methods.optax_method import OptaxMethod
from gn.optim import SCHEDULES, Schedule, clip_and_decay, make_schedule, validate_decay_rule

HORIZON_KEYS = ("schedule", "warmup_steps", "min_lr_ratio", "decay_fraction")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig(MethodConfig):
    """Hyperparameters shared by every first-order method."""

    family: ClassVar[str] = "first_order"
    inner_ok: ClassVar[bool] = True     # usable as the Gauss-Newton inner optimizer (a plain optax chain)

    learning_rate: float = opt(1e-3, "peak learning rate")
    schedule: str = opt("cosine", "learning-rate schedule: constant, cosine or wsd")
    warmup_steps: int = opt(0, "linear warmup steps")
    min_lr_ratio: float = opt(0.1, "final learning rate as a fraction of the peak (cosine, wsd)")
    decay_fraction: float = opt(0.2, "fraction of the run spent decaying (wsd)")
    grad_clip: float = opt(1.0, "global-norm gradient clipping (0 = off)")
    weight_decay: float = opt(0.0, "decoupled weight decay: θ ← θ − lr_t·wd·θ")
    weight_decay_mask: Any = opt("matrices", "decayed leaves: matrices, hidden_matrices, all, none, or path globs")

    def validate(self, where: str) -> None:
        check_range(self.learning_rate > 0, where, "learning_rate", "positive", self.learning_rate)
        check_choice(self.schedule, SCHEDULES, where, "schedule")
        check_range(self.warmup_steps >= 0, where, "warmup_steps", ">= 0", self.warmup_steps)
        check_range(0.0 <= self.min_lr_ratio <= 1.0, where, "min_lr_ratio", "in [0, 1]", self.min_lr_ratio)
        check_range(0.0 < self.decay_fraction <= 1.0, where, "decay_fraction", "in (0, 1]", self.decay_fraction)
        check_range(self.grad_clip >= 0, where, "grad_clip", ">= 0 (0 disables)", self.grad_clip)
        check_range(self.weight_decay >= 0, where, "weight_decay", ">= 0", self.weight_decay)
        validate_decay_rule(self.weight_decay_mask, f"{where}.weight_decay_mask")

    # -- building ------------------------------------------------------------------
    def core(self, schedule: optax.Schedule, apply_fn: Optional[Callable]) -> optax.GradientTransformation:
        """The optimizer proper, at learning rate `schedule`."""
        raise NotImplementedError

    def step_extras(self, apply_fn: Callable, batches) -> dict:
        """Extra arguments of `update` beyond the gradient (none for plain optimizers)."""
        del apply_fn, batches
        return {}

    def backend_cost(self, ctx: MethodContext, name: str) -> Optional[Callable[[Any], float]]:
        """params -> what a curvature backend inside the chain costs per step, in gradients at
        the step's batch (None: nothing beyond the gradient). Counted in the run's compute."""
        del ctx, name
        return None

    def schedule_fn(self, total_steps: int) -> optax.Schedule:
        """The learning-rate schedule these hyperparameters describe."""
        return make_schedule(self.schedule, self.learning_rate, total_steps, warmup_steps=self.warmup_steps,
                             min_lr_ratio=self.min_lr_ratio, decay_fraction=self.decay_fraction)

    def transform(self, schedule: optax.Schedule, apply_fn: Optional[Callable] = None
                  ) -> optax.GradientTransformation:
        """clip -> optimizer(schedule) -> decoupled weight decay.

        `schedule` replaces the learning-rate schedule the hyperparameters
        describe, so callers that drive the learning rate themselves (the
        Gauss-Newton inner loop) can pass `lambda step: 1.0` and scale the updates.
        """
        return clip_and_decay(self.core(schedule, apply_fn), schedule, grad_clip=self.grad_clip,
                              weight_decay=self.weight_decay, weight_decay_mask=self.weight_decay_mask)

    def build(self, ctx: MethodContext, name: str) -> OptaxMethod:
        schedule = self.schedule_fn(ctx.total_steps)
        extras = None if type(self).step_extras is OptimizerConfig.step_extras else self.step_extras
        return OptaxMethod(name, self.transform(schedule, ctx.apply_fn), schedule, ctx, extras=extras,
                           backend_cost=self.backend_cost(ctx, name))

    def adam_side_lr(self, schedule: optax.Schedule, adam_learning_rate: Optional[float]):
        """The AdamW side's rate: the same schedule shape at its own peak (None = Muon's own)."""
        if adam_learning_rate is None:
            return None
        ratio = adam_learning_rate / self.learning_rate
        if isinstance(schedule, Schedule):      # the ratio, too, an argument of the compiled step
            return schedule.scaled(ratio)
        return lambda s: schedule(s) * ratio


def _opts(cfg: OptimizerConfig, *keys: str) -> dict:
    return {k: getattr(cfg, k) for k in keys}


@dataclasses.dataclass(frozen=True)
class AdamWConfig(OptimizerConfig):
    name: ClassVar[str] = "adamw"
    description: ClassVar[str] = "Adam with decoupled weight decay (Loshchilov & Hutter 2019)"
    learning_rate: float = opt(3e-3, "peak learning rate")
    weight_decay: float = opt(0.01, "decoupled weight decay: θ ← θ − lr_t·wd·θ")
    b1: float = opt(0.9, "first-moment decay β₁")
    b2: float = opt(0.95, "second-moment decay β₂")
    eps: float = opt(1e-8, "denominator ε")

    def core(self, schedule, apply_fn):
        return optax.adam(schedule, **_opts(self, "b1", "b2", "eps"))


@dataclasses.dataclass(frozen=True)
class AdamConfig(AdamWConfig):
    name: ClassVar[str] = "adam"
    description: ClassVar[str] = "Adam (Kingma & Ba 2015), no weight decay by default"
    weight_decay: float = opt(0.0, "decoupled weight decay: θ ← θ − lr_t·wd·θ")
    b2: float = opt(0.999, "second-moment decay β₂")


@dataclasses.dataclass(frozen=True)
class SGDConfig(OptimizerConfig):
    name: ClassVar[str] = "sgd"
    lr_batch_power: ClassVar[float] = 1.0   # SGD-like: linear scaling, lr ∝ B (Goyal et al. 2017)
    description: ClassVar[str] = "SGD with optional (Nesterov) momentum"
    learning_rate: float = opt(0.3, "peak learning rate")
    momentum: float = opt(0.9, "heavy-ball momentum (0 = none)")
    nesterov: bool = opt(False, "Nesterov momentum")

    def core(self, schedule, apply_fn):
        return optax.sgd(schedule, momentum=self.momentum or None, nesterov=self.nesterov)


@dataclasses.dataclass(frozen=True)
class LionConfig(OptimizerConfig):
    name: ClassVar[str] = "lion"
    description: ClassVar[str] = "Lion: sign of interpolated momentum (Chen et al. 2023)"
    learning_rate: float = opt(3e-4, "peak learning rate")
    weight_decay: float = opt(0.01, "decoupled weight decay: θ ← θ − lr_t·wd·θ")
    b1: float = opt(0.9, "interpolation factor of the update")
    b2: float = opt(0.99, "momentum decay")

    def core(self, schedule, apply_fn):
        return optax.lion(schedule, weight_decay=0.0, **_opts(self, "b1", "b2"))


@dataclasses.dataclass(frozen=True)
class AdafactorConfig(OptimizerConfig):
    name: ClassVar[str] = "adafactor"
    description: ClassVar[str] = "Adafactor: factored second moments (Shazeer & Stern 2018)"
    learning_rate: float = opt(1e-2, "peak learning rate")
    decay_rate: float = opt(0.8, "second-moment decay exponent")
    clipping_threshold: float = opt(1.0, "update clipping threshold")
    multiply_by_parameter_scale: bool = opt(False, "scale updates by the parameter RMS")
    min_dim_size_to_factor: int = opt(32, "smallest dimension that is factored")

    def core(self, schedule, apply_fn):
        return optax.adafactor(schedule, **_opts(self, "decay_rate", "clipping_threshold",
                                                 "multiply_by_parameter_scale", "min_dim_size_to_factor"))


@dataclasses.dataclass(frozen=True)
class LambConfig(OptimizerConfig):
    name: ClassVar[str] = "lamb"
    description: ClassVar[str] = "LAMB: layerwise trust-ratio Adam (You et al. 2020)"
    learning_rate: float = opt(1e-2, "peak learning rate")
    weight_decay: float = opt(0.01, "decoupled weight decay: θ ← θ − lr_t·wd·θ")
    b1: float = opt(0.9, "first-moment decay β₁")
    b2: float = opt(0.999, "second-moment decay β₂")
    eps: float = opt(1e-6, "denominator ε")

    def core(self, schedule, apply_fn):
        return optax.lamb(schedule, **_opts(self, "b1", "b2", "eps"))


@dataclasses.dataclass(frozen=True)
class LarsConfig(OptimizerConfig):
    name: ClassVar[str] = "lars"
    lr_batch_power: ClassVar[float] = 1.0   # SGD-like: linear scaling, lr ∝ B (Goyal et al. 2017)
    description: ClassVar[str] = "LARS: layerwise trust-ratio SGD with momentum (You et al. 2017)"
    learning_rate: float = opt(1.0, "peak learning rate")
    momentum: float = opt(0.9, "heavy-ball momentum")
    trust_coefficient: float = opt(0.001, "trust ratio coefficient")
    nesterov: bool = opt(False, "Nesterov momentum")

    def core(self, schedule, apply_fn):
        return optax.lars(schedule, **_opts(self, "momentum", "trust_coefficient", "nesterov"))


@dataclasses.dataclass(frozen=True)
class RMSPropConfig(OptimizerConfig):
    name: ClassVar[str] = "rmsprop"
    description: ClassVar[str] = "RMSProp (Tieleman & Hinton 2012)"
    decay: float = opt(0.9, "second-moment decay")
    eps: float = opt(1e-8, "denominator ε")
    momentum: float = opt(0.0, "momentum")
    centered: bool = opt(False, "subtract the squared mean gradient")

    def core(self, schedule, apply_fn):
        return optax.rmsprop(schedule, **_opts(self, "decay", "eps", "momentum", "centered"))


@dataclasses.dataclass(frozen=True)
class AdagradConfig(OptimizerConfig):
    name: ClassVar[str] = "adagrad"
    description: ClassVar[str] = "Adagrad (Duchi et al. 2011)"
    learning_rate: float = opt(3e-2, "peak learning rate")
    initial_accumulator_value: float = opt(0.1, "initial sum of squared gradients")
    eps: float = opt(1e-7, "denominator ε")

    def core(self, schedule, apply_fn):
        return optax.adagrad(schedule, **_opts(self, "initial_accumulator_value", "eps"))


@dataclasses.dataclass(frozen=True)
class RpropConfig(OptimizerConfig):
    name: ClassVar[str] = "rprop"
    description: ClassVar[str] = ("Rprop: sign-based per-parameter step sizes (Riedmiller & Braun 1993); "
                                  "lr is the initial step")
    unused: ClassVar[tuple[str, ...]] = HORIZON_KEYS    # its step sizes adapt by themselves
    grad_clip: float = opt(0.0, "global-norm gradient clipping (0 = off)")
    eta_minus: float = opt(0.5, "step shrink factor on a sign change")
    eta_plus: float = opt(1.2, "step growth factor")
    min_step_size: float = opt(1e-6, "smallest step")
    max_step_size: float = opt(1.0, "largest step")

    def core(self, schedule, apply_fn):
        return optax.rprop(schedule(0), **_opts(self, "eta_minus", "eta_plus", "min_step_size", "max_step_size"))


@dataclasses.dataclass(frozen=True)
class SophiaConfig(OptimizerConfig):
    name: ClassVar[str] = "sophia"
    description: ClassVar[str] = ("Sophia-H: clipped diagonal-Hessian preconditioning, Hutchinson estimator "
                                  "(Liu et al. 2023)")
    inner_ok: ClassVar[bool] = False    # needs the objective, not only a gradient
    weight_decay: float = opt(0.01, "decoupled weight decay: θ ← θ − lr_t·wd·θ")
    b1: float = opt(0.965, "momentum decay")
    b2: float = opt(0.99, "Hessian-estimate decay")
    eps: float = opt(1e-8, "denominator ε")
    gamma: float = opt(0.01, "clipping scale")
    update_interval: int = opt(10, "steps between Hessian estimates")

    def core(self, schedule, apply_fn):
        return contrib.sophia(schedule, weight_decay=0.0, **_opts(self, "b1", "b2", "eps", "gamma",
                                                                  "update_interval"))

    def step_extras(self, apply_fn, batches):
        return {"obj_fn": lambda p: lm_loss(apply_fn, p, batches[-1])}


CONFIGS: tuple[type[OptimizerConfig], ...] = (
    AdamWConfig, AdamConfig, SGDConfig, LionConfig, AdafactorConfig, LambConfig, LarsConfig,
    RMSPropConfig, AdagradConfig, RpropConfig, SophiaConfig)
