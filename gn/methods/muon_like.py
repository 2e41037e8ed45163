"""Typed hyperparameters of Muon, its relatives, SOAP and the layerwise-GN backends.

Muon-composed methods orthogonalise hidden 2-D kernels and send embeddings,
head and norms to an AdamW side whose peak rate is `adam_learning_rate`
(None = the method's own), on the same schedule shape.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

from gn import curvature
from gn.curvature.objective import split_batch
from gn.errors import ConfigError
from gn.methods.base import MethodContext, check_choice, check_range, opt
from gn.methods.first_order import OptimizerConfig, _opts
from gn.optim import adarmsuon, fog_gn, layerwise_gn_cost, lwgn, muon, normuon, rmsuon, soap
from gn.paths import is_hidden_matrix

_ADAM_LR = "AdamW-side peak learning rate (null = the method's own)"


@dataclasses.dataclass(frozen=True)
class MuonConfig(OptimizerConfig):
    name: ClassVar[str] = "muon"
    description: ClassVar[str] = ("Muon: Newton-Schulz orthogonalised momentum on hidden matrices, AdamW on "
                                  "embeddings/head/norms (Jordan et al. 2024; optax.contrib.muon's numbers)")
    learning_rate: float = opt(0.02, "peak learning rate (Muon side)")
    beta: float = opt(0.95, "momentum decay")
    nesterov: bool = opt(True, "Nesterov momentum")
    ns_steps: int = opt(5, "Newton-Schulz iterations")
    adam_learning_rate: Optional[float] = opt(None, _ADAM_LR)
    adam_b1: float = opt(0.9, "AdamW-side β₁")
    adam_b2: float = opt(0.95, "AdamW-side β₂")

    def validate(self, where: str) -> None:
        super().validate(where)
        check_range(self.ns_steps >= 1, where, "ns_steps", ">= 1", self.ns_steps)
        check_range(self.adam_learning_rate is None or self.adam_learning_rate > 0, where,
                    "adam_learning_rate", "positive or null", self.adam_learning_rate)

    def core(self, schedule, apply_fn):
        # adam_nesterov: contrib.muon's AdamW side is Nesterov whenever Muon is (the router's default is not).
        return muon(schedule, adam_learning_rate=self.adam_side_lr(schedule, self.adam_learning_rate),
                    adam_nesterov=self.nesterov, **_opts(self, "beta", "nesterov", "ns_steps", "adam_b1", "adam_b2"))


@dataclasses.dataclass(frozen=True)
class NorMuonConfig(MuonConfig):
    name: ClassVar[str] = "normuon"
    description: ClassVar[str] = ("NorMuon: Muon with neuron-wise second-moment normalisation of the "
                                  "orthogonalised update")
    b2: float = opt(0.95, "decay of the neuron-wise second moment")

    def core(self, schedule, apply_fn):
        return normuon(schedule, weight_decay=0.0,
                       adam_learning_rate=self.adam_side_lr(schedule, self.adam_learning_rate),
                       **_opts(self, "beta", "b2", "nesterov", "ns_steps", "adam_b1", "adam_b2"))


@dataclasses.dataclass(frozen=True)
class RMSuonConfig(OptimizerConfig):
    name: ClassVar[str] = "rmsuon"
    description: ClassVar[str] = ("RMSuon: NS5 of Adam momentum rescaled to the Adam update's energy (docs/methods.md §5); "
                                  "v_penalty > 0 gives V-RMSuon")
    learning_rate: float = opt(3e-3, "peak learning rate")
    b1: float = opt(0.9, "first-moment decay β₁")
    b2: float = opt(0.95, "second-moment decay β₂")
    eps: float = opt(1e-8, "denominator ε")
    v_penalty: float = opt(0.0, "V-RMSuon regulariser λ: adds lr·λ·√v̂")
    ns_steps: int = opt(5, "Newton-Schulz iterations")
    adam_learning_rate: Optional[float] = opt(None, _ADAM_LR)
    adam_b1: float = opt(0.9, "AdamW-side β₁")
    adam_b2: float = opt(0.95, "AdamW-side β₂")

    def core(self, schedule, apply_fn):
        return rmsuon(schedule, weight_decay=0.0,
                      adam_learning_rate=self.adam_side_lr(schedule, self.adam_learning_rate),
                      **_opts(self, "b1", "b2", "eps", "v_penalty", "ns_steps", "adam_b1", "adam_b2"))


@dataclasses.dataclass(frozen=True)
class AdaRMSuonConfig(RMSuonConfig):
    name: ClassVar[str] = "adarmsuon"
    description: ClassVar[str] = "AdaRMSuon: NS5 of the Adam-whitened momentum, energy-scaled (docs/methods.md §5)"

    def core(self, schedule, apply_fn):
        return adarmsuon(schedule, weight_decay=0.0,
                         adam_learning_rate=self.adam_side_lr(schedule, self.adam_learning_rate),
                         **_opts(self, "b1", "b2", "eps", "v_penalty", "ns_steps", "adam_b1", "adam_b2"))


@dataclasses.dataclass(frozen=True)
class SOAPConfig(OptimizerConfig):
    name: ClassVar[str] = "soap"
    description: ClassVar[str] = "SOAP: Adam in the eigenbasis of Shampoo's preconditioners (Vyas et al. 2024)"
    learning_rate: float = opt(3e-3, "peak learning rate")
    weight_decay: float = opt(0.01, "decoupled weight decay: θ ← θ − lr_t·wd·θ")
    b1: float = opt(0.95, "first-moment decay β₁")
    b2: float = opt(0.95, "second-moment and preconditioner decay β₂")
    eps: float = opt(1e-8, "denominator ε")
    precondition_frequency: int = opt(10, "steps between eigenbasis updates")
    max_precond_dim: int = opt(10000, "dimensions above this are not preconditioned")
    eigenbasis_update: str = opt("eigh", "eigh (exact) or qr (one power-iteration step)")

    def validate(self, where: str) -> None:
        super().validate(where)
        check_choice(self.eigenbasis_update, ("eigh", "qr"), where, "eigenbasis_update")
        check_range(self.precondition_frequency >= 1, where, "precondition_frequency", ">= 1",
                    self.precondition_frequency)

    def core(self, schedule, apply_fn):
        return soap(schedule, weight_decay=0.0, **_opts(self, "b1", "b2", "eps", "precondition_frequency",
                                                        "max_precond_dim", "eigenbasis_update"))


def _batch_extras(apply_fn, batches) -> dict:
    # Curvature backends see the whole step's batch (all micro-batches; curvature_batch takes its first k).
    inputs, targets = split_batch(batches.reshape((-1,) + batches.shape[2:]))
    return {"inputs": inputs, "targets": targets}


CURVATURE_BATCH_HELP = ("sequences of the step's batch the layerwise-GN solve reads (0 = all; Martens 2010 §4.3 "
                        "solves on a smaller curvature batch than the gradient's)")


def check_curvature_batch(cfg, where: str) -> None:
    """ConfigError unless curvature_batch >= 0 (0 = the whole batch; larger than the batch is caught
    by lwgn_backend_cost, where the batch is known)."""
    check_range(cfg.curvature_batch >= 0, where, "curvature_batch", ">= 0 (0 = the whole batch)",
                cfg.curvature_batch)


def lwgn_backend_cost(ctx: MethodContext, name: str, *, curvature_batch: int, iters: int, only=None,
                      partition="per_tensor"):
    """The layerwise-GN solve's cost per step (gn.optim.layerwise_gn_cost), scaled to the share of the
    batch it reads, as a backend_cost; a curvature_batch larger than the batch is a ConfigError
    before any compute."""
    k, b = curvature_batch, ctx.batch_size
    if k > b:
        raise ConfigError(f"'{name}.curvature_batch' ({k}) is larger than the step's batch ({b} sequences).")
    frac = (k or b) / b
    return lambda params: frac * layerwise_gn_cost(params, partition=partition, max_iters=iters, only=only)


@dataclasses.dataclass(frozen=True)
class LwGNConfig(OptimizerConfig):
    name: ClassVar[str] = "lwgn"
    family: ClassVar[str] = "curvature"
    inner_ok: ClassVar[bool] = False
    description: ClassVar[str] = ("Natural-gradient descent with layerwise GN, (G_bb + λI)⁻¹ g_b per block "
                                  "by block CG (docs/methods.md §4)")
    learning_rate: float = opt(0.3, "peak learning rate")
    grad_clip: float = opt(0.0, "global-norm gradient clipping (0 = off)")
    momentum: float = opt(0.0, "momentum on the GN direction (0 = none)")
    partition: str = opt("transformer_blocks", "blocks: per_tensor, top_level, transformer_blocks "
                                                        "(final norm in the last block) or transformer_blocks_head_norm")
    damping: float = opt(1e-2, "λ in (G_bb + λI)")
    max_iters: int = opt(10, "CG iterations per step")
    tol: float = opt(1e-6, "CG relative residual tolerance")
    block_mode: str = opt("unrolled", "batched, sequential or unrolled (same numbers)")
    curvature_batch: int = opt(0, CURVATURE_BATCH_HELP)

    def validate(self, where: str) -> None:
        super().validate(where)
        check_choice(self.partition, curvature.PARTITIONS, where, "partition")
        check_choice(self.block_mode, curvature.BLOCK_MODES, where, "block_mode")
        check_range(self.damping >= 0, where, "damping", ">= 0", self.damping)
        check_range(self.max_iters >= 1, where, "max_iters", ">= 1", self.max_iters)
        check_curvature_batch(self, where)

    def core(self, schedule, apply_fn):
        return lwgn(schedule, apply_fn, **_opts(self, "momentum", "partition", "damping", "max_iters", "tol",
                                                "block_mode", "curvature_batch"))

    def step_extras(self, apply_fn, batches):
        return _batch_extras(apply_fn, batches)

    def backend_cost(self, ctx, name):
        return lwgn_backend_cost(ctx, name, curvature_batch=self.curvature_batch, iters=self.max_iters,
                                 partition=self.partition)


@dataclasses.dataclass(frozen=True)
class FogGNConfig(MuonConfig):
    name: ClassVar[str] = "fog_gn"
    family: ClassVar[str] = "curvature"
    inner_ok: ClassVar[bool] = False
    description: ClassVar[str] = ("FOG-GN = Muon ∘ LwGN⁻¹: Muon on the per-tensor layerwise GN direction of "
                                  "hidden matrices, AdamW elsewhere (docs/methods.md §4)")
    damping: float = opt(1e-3, "λ in (G_bb + λI)")
    max_iters: int = opt(5, "CG iterations per step")
    tol: float = opt(1e-6, "CG relative residual tolerance")
    block_mode: str = opt("unrolled", "batched, sequential or unrolled (same numbers)")
    curvature_batch: int = opt(0, CURVATURE_BATCH_HELP)

    def validate(self, where: str) -> None:
        super().validate(where)
        check_choice(self.block_mode, curvature.BLOCK_MODES, where, "block_mode")
        check_range(self.max_iters >= 1, where, "max_iters", ">= 1", self.max_iters)
        check_curvature_batch(self, where)

    def core(self, schedule, apply_fn):
        return fog_gn(schedule, apply_fn, adam_learning_rate=self.adam_side_lr(schedule, self.adam_learning_rate),
                      adam_nesterov=self.nesterov,      # as MuonConfig.core
                      **_opts(self, "beta", "nesterov", "ns_steps", "damping", "max_iters", "tol", "adam_b1",
                              "adam_b2", "block_mode", "curvature_batch"))

    def step_extras(self, apply_fn, batches):
        return _batch_extras(apply_fn, batches)

    def backend_cost(self, ctx, name):
        return lwgn_backend_cost(ctx, name, curvature_batch=self.curvature_batch, iters=self.max_iters,
                                 only=is_hidden_matrix)


CONFIGS: tuple[type[OptimizerConfig], ...] = (
    MuonConfig, SOAPConfig, NorMuonConfig, RMSuonConfig, AdaRMSuonConfig, LwGNConfig, FogGNConfig)
