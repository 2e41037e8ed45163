"""What a run is before its first step: the validated method, data, model and mesh.

`prepare(cfg, method_name)` checks everything that can be wrong with the input
(ConfigError, before any compute) and builds the token source, the model's
apply function and the method; a method at a batch other than train.batch_size
runs proportionally more steps so that methods compare per reference step.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax

from gn import data as gn_data
from gn.config import Config
from gn.errors import ConfigError, require
from gn.methods.base import MethodContext
from gn.model import FlaxLM, make_apply
from gn.optim import collecting_schedules
from gn.train import mesh as meshlib
from gn.train.checkpoint import Checkpointer
from gn.train.memory import resolve_memory
from gn.train.sharding import constrainer


@dataclasses.dataclass
class Run:
    """Everything built (and validated) before the first step."""

    cfg: Config
    entry: Any
    method: Any
    source: Any
    model_cfg: Any
    apply_fn: Any
    mesh: Any
    batch_size: int
    steps: int          # this method's steps: train.steps scaled so every method reads the same tokens
    every: int          # reference steps per method step's multiple: eval/checkpoint cadence multiplier
    compute_cfg: Any = None   # model_cfg with model.memory resolved: what apply_fn computes with
    memory: dict | None = None   # what model.memory measured and chose (gn.train.memory)


def prepare(cfg: Config, method_name: str, *, num_devices: int | None = None, model: Any = None) -> Run:
    """Validate the method, data and sharding, then build source, model and method.

    Everything that can be wrong with the input raises ConfigError here, before
    any training compute. `num_devices`: use only the first devices (default all;
    tests compare device counts within one process). `model`: a gn.model.FlaxLM to
    train instead of the config's LLaMA model (cfg.model is then not used).
    """
    entry = cfg.method(method_name)
    gn_data.check_data(cfg.data)
    tcfg = cfg.train
    visible = num_devices or len(jax.devices())
    mesh = meshlib.make_mesh(visible, tcfg.fsdp)      # ConfigError unless fsdp divides the devices
    n_dev = mesh.devices.size
    where = f"the {n_dev} devices of the mesh" + (f" (data {n_dev // tcfg.fsdp} × fsdp {tcfg.fsdp})"
                                                  if tcfg.fsdp > 1 else "")
    batch_size = entry.batch_size or tcfg.batch_size
    require(batch_size % n_dev == 0,
            f"The batch size {batch_size} is not divisible by {where}: batches are split over every "
            f"device; use a multiple of {n_dev}.")
    require(tcfg.eval_batch_size % n_dev == 0,
            f"train.eval_batch_size ({tcfg.eval_batch_size}) is not divisible by {where}; "
            f"use a multiple of {n_dev}.")
    steps, every = _scaled_steps(cfg.train, batch_size, entry.name)
    if cfg.train.init_from:
        src = Path(cfg.train.init_from) / FINAL_PARAMS
        require(src.is_dir() and Checkpointer(src).steps(),
                f"train.init_from: '{cfg.train.init_from}' holds no finished run's parameters "
                f"(expected {src}/ written at the end of `gn train`).")
    source = gn_data.build_source(cfg.data, seed=cfg.train.seed)
    require(model is None or isinstance(model, FlaxLM),
            f"prepare(model=...): a gn.model.FlaxLM is expected, got {type(model).__name__}.")
    model_cfg = model if model is not None else cfg.model
    if model_cfg.vocab_size is None:
        model_cfg = dataclasses.replace(model_cfg, vocab_size=source.vocab_size)
    require(model_cfg.vocab_size >= source.vocab_size,
            f"model.vocab_size ({model_cfg.vocab_size}) is smaller than the data's vocabulary "
            f"({source.vocab_size}); leave model.vocab_size unset to take it from the data.")
    def build(mcfg):
        apply = make_apply(mcfg)
        ctx = MethodContext(apply_fn=apply, total_steps=steps, batch_size=batch_size,
                            grad_accum=cfg.train.grad_accum, num_devices=n_dev, model_cfg=mcfg,
                            reference_batch_size=cfg.train.batch_size,
                            constrain=constrainer(mesh, tcfg.fsdp_min_size))
        # train.compile_reuse: the learning rate an argument of the compiled step, not a constant
        # (gn.optim.schedules): one program, compiled once, for every grid point of a sweep.
        with collecting_schedules() as made:
            method = entry.build(ctx)
        if tcfg.compile_reuse and hasattr(method, "bind_schedules"):
            method.bind_schedules(made)
        return apply, method

    # model.memory: the method's plan (built cheaply on the config as written) gives the
    # micro-batch whose compiled memory chooses plain or lean (gn.train.memory).
    compute_cfg = dataclasses.replace(model_cfg, memory=None) if model_cfg.memory else model_cfg
    apply_fn, method = build(compute_cfg)
    memory = None
    if model_cfg.memory is not None:
        compute_cfg, memory = resolve_memory(
            model_cfg, micro_batch=max(1, method.plan.micro_batch // n_dev), seq_len=cfg.data.seq_len,
            curvature=entry.hparams.family != "first_order", device=mesh.devices.flat[0])
        apply_fn, method = build(compute_cfg)
    plan = method.plan
    num_train = getattr(source, "num_train", None)
    if cfg.data.max_epochs is not None and num_train:
        # every step draws plan.train + plan.aux batches of plan.micro_batch windows (trainer._step)
        need = steps * (plan.train + plan.aux) * plan.micro_batch
        require(need <= cfg.data.max_epochs * num_train,
                f"data.max_epochs {cfg.data.max_epochs:g}: method '{entry.name}' would read {need:,} training "
                f"windows in its {steps} steps ({need / num_train:.2f} passes over the {num_train:,} windows of "
                f"its training documents). Lower train.steps (or the sweep's tokens), or raise data.max_epochs.")
    for count, micro in ((plan.train, plan.micro_batch), (plan.aux, plan.aux_micro_batch)):
        require(count == 0 or micro % n_dev == 0,
                f"Method '{entry.name}' splits each step into batches of {micro} sequences, which is not "
                f"divisible by {where}; choose batch sizes that are multiples of {n_dev}.")
    return Run(cfg, entry, method, source, model_cfg, apply_fn, mesh, batch_size, steps, every,
               compute_cfg, memory)


def _scaled_steps(tcfg, batch_size: int, name: str) -> tuple[int, int]:
    """Steps for a method whose batch differs from train.batch_size, at equal tokens.

    A method at batch b = B/k runs k·train.steps steps (evaluating and
    checkpointing every k·eval_every, k·checkpoint_every), so that it is compared
    per *reference* step of train.batch_size = B — e.g. the small-batch Muon
    control beside a GN outer step of N inner batches.
    """
    ref = tcfg.batch_size
    if batch_size == ref:
        return tcfg.steps, 1
    require(ref % batch_size == 0,
            f"Method '{name}' has batch_size {batch_size}, which must divide train.batch_size ({ref}) so "
            f"that it runs a whole number of steps per reference step.")
    k = ref // batch_size
    return tcfg.steps * k, k


FINAL_PARAMS = "final_params"


def abstract(tree: Any) -> Any:
    """Shape/dtype/sharding of every leaf: the restore target of a checkpoint."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def warm_start(path: str, params: Any) -> Any:
    """The final parameters of another run (same model shapes)."""
    restored = None
    try:
        restored = Checkpointer(Path(path) / FINAL_PARAMS).restore_latest(abstract({"params": params}))
    except Exception as exc:  # shapes or structure differ
        raise ConfigError(f"train.init_from: could not load the parameters of '{path}' into this model "
                          f"({type(exc).__name__}: {exc}); the model configs must match.") from None
    require(restored is not None, f"train.init_from: '{path}' holds no readable final parameters.")
    return restored[1]["params"]
