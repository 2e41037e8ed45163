"""First-order optimizers as optax transformations, built from typed hyperparameters.

Every method is the chain

    clip_by_global_norm(grad_clip) -> <optimizer with learning-rate schedule>
    -> decoupled weight decay (lr_t · wd · θ on a path-based mask)

so schedules, clipping and weight decay mean the same thing for all methods.
Optimizer-specific options (betas, momentum, ...) are keyword arguments of the
factory and appear, with their defaults, in the resolved config.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import optax
from optax import contrib

from gn.errors import require
from gn.optim.lwgn import fog_gn, lwgn
from gn.optim.muon_family import adarmsuon, normuon, rmsuon
from gn.optim.soap import soap
from gn.optim.masks import decay_mask, is_hidden_matrix, map_with_path, validate_decay_rule
from gn.optim.method import MethodContext, OptaxMethod, decoupled_weight_decay
from gn.optim.schedules import SCHEDULES, make_schedule


@dataclasses.dataclass(frozen=True)
class OptimHParams:
    """Hyperparameters shared by every first-order method."""

    learning_rate: float = 1e-3
    schedule: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    weight_decay_mask: Any = "matrices"

    def validate(self, where: str) -> None:
        require(self.learning_rate > 0, f"{where}.learning_rate must be positive, got {self.learning_rate}.")
        require(self.schedule in SCHEDULES,
                f"{where}.schedule must be one of {', '.join(SCHEDULES)}, got '{self.schedule}'.")
        require(self.warmup_steps >= 0, f"{where}.warmup_steps must be >= 0, got {self.warmup_steps}.")
        require(0.0 <= self.min_lr_ratio <= 1.0, f"{where}.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}.")
        require(0.0 < self.decay_fraction <= 1.0,
                f"{where}.decay_fraction must be in (0, 1], got {self.decay_fraction}.")
        require(self.grad_clip >= 0, f"{where}.grad_clip must be >= 0 (0 disables), got {self.grad_clip}.")
        require(self.weight_decay >= 0, f"{where}.weight_decay must be >= 0, got {self.weight_decay}.")
        validate_decay_rule(self.weight_decay_mask, f"{where}.weight_decay_mask")


def muon_dimension_numbers(params: Any) -> Any:
    """Muon routing by path: hidden 2-D kernels (in, out) are orthogonalised;
    embedding, head and norms go to Muon's AdamW side (as in the paper)."""
    dims = contrib.MuonDimensionNumbers(reduction_axis=0, output_axis=1)
    return map_with_path(lambda p, x: dims if is_hidden_matrix(p, x) else None, params)


def _muon(lr, *, beta=0.95, nesterov=True, ns_steps=5, adam_learning_rate=None,
          adam_b1=0.9, adam_b2=0.999, eps=1e-8):
    # adam_learning_rate arrives as a schedule (see build_optax_method) or None = Muon's own.
    adam_lr = lr if adam_learning_rate is None else adam_learning_rate
    return contrib.muon(lr, beta=beta, nesterov=nesterov, ns_steps=ns_steps, eps=eps,
                        adam_b1=adam_b1, adam_b2=adam_b2, adam_learning_rate=adam_lr,
                        muon_weight_dimension_numbers=muon_dimension_numbers)


@dataclasses.dataclass(frozen=True)
class OptaxFactory:
    """How to build one optimizer: fn(schedule, **options) -> transformation."""

    fn: Callable[..., optax.GradientTransformation]
    options: dict
    needs_obj_fn: bool = False
    needs_batch: bool = False      # curvature backends: fn(schedule, apply_fn, **options), batch as extra args


FACTORIES: dict[str, tuple[str, OptaxFactory]] = {
    "adamw": ("Adam with decoupled weight decay (Loshchilov & Hutter 2019)",
              OptaxFactory(lambda lr, **o: optax.adam(lr, **o), {"b1": 0.9, "b2": 0.95, "eps": 1e-8})),
    "adam": ("Adam (Kingma & Ba 2015), no weight decay by default",
             OptaxFactory(lambda lr, **o: optax.adam(lr, **o), {"b1": 0.9, "b2": 0.999, "eps": 1e-8})),
    "sgd": ("SGD with optional (Nesterov) momentum",
            OptaxFactory(lambda lr, momentum, nesterov: optax.sgd(lr, momentum=momentum or None, nesterov=nesterov),
                         {"momentum": 0.9, "nesterov": False})),
    "lion": ("Lion: sign of interpolated momentum (Chen et al. 2023)",
             OptaxFactory(lambda lr, **o: optax.lion(lr, weight_decay=0.0, **o), {"b1": 0.9, "b2": 0.99})),
    "adafactor": ("Adafactor: factored second moments (Shazeer & Stern 2018)",
                  OptaxFactory(lambda lr, **o: optax.adafactor(lr, **o),
                               {"decay_rate": 0.8, "clipping_threshold": 1.0, "multiply_by_parameter_scale": False,
                                "min_dim_size_to_factor": 32})),
    "lamb": ("LAMB: layerwise trust-ratio Adam (You et al. 2020)",
             OptaxFactory(lambda lr, **o: optax.lamb(lr, **o), {"b1": 0.9, "b2": 0.999, "eps": 1e-6})),
    "lars": ("LARS: layerwise trust-ratio SGD with momentum (You et al. 2017)",
             OptaxFactory(lambda lr, **o: optax.lars(lr, **o), {"momentum": 0.9, "trust_coefficient": 0.001,
                                                                 "nesterov": False})),
    "rmsprop": ("RMSProp (Tieleman & Hinton 2012)",
                OptaxFactory(lambda lr, **o: optax.rmsprop(lr, **o), {"decay": 0.9, "eps": 1e-8, "momentum": 0.0,
                                                                        "centered": False})),
    "adagrad": ("Adagrad (Duchi et al. 2011)",
                OptaxFactory(lambda lr, **o: optax.adagrad(lr, **o), {"initial_accumulator_value": 0.1,
                                                                        "eps": 1e-7})),
    "rprop": ("Rprop: sign-based per-parameter step sizes (Riedmiller & Braun 1993); lr is the initial step",
              OptaxFactory(lambda lr, **o: optax.rprop(lr(0), **o), {"eta_minus": 0.5, "eta_plus": 1.2,
                                                                      "min_step_size": 1e-6, "max_step_size": 1.0})),
    "sophia": ("Sophia-H: clipped diagonal-Hessian preconditioning, Hutchinson estimator (Liu et al. 2023)",
               OptaxFactory(lambda lr, **o: contrib.sophia(lr, weight_decay=0.0, **o),
                            {"b1": 0.965, "b2": 0.99, "eps": 1e-8, "gamma": 0.01, "update_interval": 10},
                            needs_obj_fn=True)),
    "muon": ("Muon: Newton-Schulz orthogonalised momentum on hidden matrices, AdamW on embeddings/head/norms "
             "(Jordan et al. 2024; optax.contrib.muon)",
             OptaxFactory(_muon, {"beta": 0.95, "nesterov": True, "ns_steps": 5, "adam_learning_rate": None,
                                  "adam_b1": 0.9, "adam_b2": 0.95})),
    "soap": ("SOAP: Adam in the eigenbasis of Shampoo's preconditioners (Vyas et al. 2024)",
             OptaxFactory(lambda lr, **o: soap(lr, weight_decay=0.0, **o),
                          {"b1": 0.95, "b2": 0.95, "eps": 1e-8, "precondition_frequency": 10,
                           "max_precond_dim": 10000, "eigenbasis_update": "eigh"})),
    "normuon": ("NorMuon: Muon with neuron-wise second-moment normalisation of the orthogonalised update",
                OptaxFactory(lambda lr, **o: normuon(lr, weight_decay=0.0, **o),
                             {"beta": 0.95, "b2": 0.95, "nesterov": True, "ns_steps": 5,
                              "adam_learning_rate": None, "adam_b1": 0.9, "adam_b2": 0.95})),
    "rmsuon": ("RMSuon: NS5 of Adam momentum rescaled to the Adam update's energy (seed 003); "
               "v_penalty > 0 gives V-RMSuon",
               OptaxFactory(lambda lr, **o: rmsuon(lr, weight_decay=0.0, **o),
                            {"b1": 0.9, "b2": 0.95, "eps": 1e-8, "v_penalty": 0.0, "ns_steps": 5,
                             "adam_learning_rate": None, "adam_b1": 0.9, "adam_b2": 0.95})),
    "adarmsuon": ("AdaRMSuon: NS5 of the Adam-whitened momentum, energy-scaled (seed 003)",
                  OptaxFactory(lambda lr, **o: adarmsuon(lr, weight_decay=0.0, **o),
                               {"b1": 0.9, "b2": 0.95, "eps": 1e-8, "v_penalty": 0.0, "ns_steps": 5,
                                "adam_learning_rate": None, "adam_b1": 0.9, "adam_b2": 0.95})),
    "lwgn": ("Natural-gradient descent with layerwise GN, (G_bb + λI)⁻¹ g_b per tensor by block CG (seed 004)",
             OptaxFactory(lambda lr, apply_fn, **o: lwgn(lr, apply_fn, **o),
                          {"momentum": 0.0, "partition": "transformer_blocks", "damping": 1e-2, "max_iters": 10,
                           "tol": 1e-6, "block_mode": "unrolled"}, needs_batch=True)),
    "fog_gn": ("FOG-GN = Muon ∘ LwGN⁻¹: Muon on the per-tensor layerwise GN direction of hidden matrices, "
               "AdamW elsewhere (seeds 000/004)",
               OptaxFactory(lambda lr, apply_fn, **o: fog_gn(lr, apply_fn, **o),
                            {"beta": 0.95, "nesterov": True, "ns_steps": 5, "damping": 1e-3, "max_iters": 5,
                             "tol": 1e-6, "adam_learning_rate": None, "adam_b1": 0.9, "adam_b2": 0.95,
                             "block_mode": "unrolled"},
                            needs_batch=True)),
}

# Per-method overrides of the shared defaults.
DEFAULTS: dict[str, dict] = {
    "adamw": {"learning_rate": 3e-3, "weight_decay": 0.01},
    "adam": {"learning_rate": 3e-3},
    "sgd": {"learning_rate": 0.3},
    "lion": {"learning_rate": 3e-4, "weight_decay": 0.01},
    "adafactor": {"learning_rate": 1e-2},
    "lamb": {"learning_rate": 1e-2, "weight_decay": 0.01},
    "lars": {"learning_rate": 1.0},
    "rmsprop": {"learning_rate": 1e-3},
    "adagrad": {"learning_rate": 3e-2},
    "rprop": {"learning_rate": 1e-3, "grad_clip": 0.0},
    "sophia": {"learning_rate": 1e-3, "weight_decay": 0.01},
    "muon": {"learning_rate": 0.02, "weight_decay": 0.0},
    "soap": {"learning_rate": 3e-3, "weight_decay": 0.01},
    "normuon": {"learning_rate": 0.02},
    "rmsuon": {"learning_rate": 3e-3},
    "adarmsuon": {"learning_rate": 3e-3},
    "lwgn": {"learning_rate": 0.3, "grad_clip": 0.0},
    "fog_gn": {"learning_rate": 0.02},
}


def split_hparams(hparams: dict) -> tuple[OptimHParams, dict]:
    """Split a resolved hyperparameter dict into the shared part and the options."""
    common_keys = {f.name for f in dataclasses.fields(OptimHParams)}
    common = OptimHParams(**{k: v for k, v in hparams.items() if k in common_keys})
    return common, {k: v for k, v in hparams.items() if k not in common_keys}


def build_transform(method: str, hparams: dict, schedule: optax.Schedule, *,
                    apply_fn: Callable | None = None) -> optax.GradientTransformation:
    """clip -> optimizer(schedule) -> decoupled weight decay, for a registered first-order method.

    `schedule` replaces the learning-rate schedule the hyperparameters describe,
    so callers that drive the learning rate themselves (the Gauss-Newton inner
    loop) can pass `lambda step: 1.0` and scale the updates.
    """
    common, options = split_hparams(hparams)
    factory = FACTORIES[method][1]
    if options.get("adam_learning_rate") is not None:
        # The AdamW side follows the same schedule shape at its own peak.
        ratio = options["adam_learning_rate"] / common.learning_rate
        options["adam_learning_rate"] = lambda s: schedule(s) * ratio
    parts = []
    if common.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(common.grad_clip))
    if factory.needs_batch:
        parts.append(factory.fn(schedule, apply_fn, **options))
    else:
        parts.append(factory.fn(schedule, **options))
    if common.weight_decay > 0:
        rule = common.weight_decay_mask
        parts.append(decoupled_weight_decay(schedule, common.weight_decay, lambda p: decay_mask(p, rule)))
    return optax.chain(*parts)


def hparams_schedule(common: OptimHParams, total_steps: int) -> optax.Schedule:
    """The learning-rate schedule described by the shared hyperparameters."""
    return make_schedule(common.schedule, common.learning_rate, total_steps,
                         warmup_steps=common.warmup_steps, min_lr_ratio=common.min_lr_ratio,
                         decay_fraction=common.decay_fraction)


def build_optax_method(name: str, method: str, hparams: dict, ctx: MethodContext,
                       factory: OptaxFactory) -> OptaxMethod:
    """The trainer-facing method for a registered first-order optimizer."""
    common, _ = split_hparams(hparams)
    schedule = hparams_schedule(common, ctx.total_steps)
    tx = build_transform(method, hparams, schedule, apply_fn=ctx.apply_fn)
    return OptaxMethod(name, tx, schedule, ctx, needs_obj_fn=factory.needs_obj_fn, needs_batch=factory.needs_batch)
