"""`model.memory`: plain or memory-lean, chosen from XLA's compiled memory and the device's.

The plain and lean settings (`gn.model.config.PLAIN`, `LEAN`) compute the same function;
plain keeps every activation and is presumed the faster while it fits (remat recomputes every
block; the one GPU measurement, docs/device_check.md, is a 45m GN outer step of 11.6 s plain
float32 against 13.6 s lean with bf16 matmuls, two options apart: `gn bench candidates` times
each option alone, and its first GPU run should confirm or change this rule), lean chunks the logits and
attention, recomputes each block and scans the layers. `memory: auto` compiles (without
running) the run's heaviest per-batch function at its micro-batch under the plain setting,
and takes plain when XLA's memory for it plus the state the run keeps fits the budget, else
lean when lean fits, else refuses before any compute:

- a first-order method: `value_and_grad` of the loss;
- a curvature method (GN family and the FOG/K-FAC family, whose steps push tangents):
  one GN inner step's model value and gradient, `quadratic_model(...).with_loss0` (a JVP
  through the network and a VJP of it, the dominant cost of `gn.methods.gauss_newton`).

The estimate is XLA's `memory_analysis()` temp + argument + output bytes of that call plus
`STATE_COPIES` parameter-sized trees the run holds besides (parameters, optimizer state, the
EMA, GN's θ_t): a lower bound of the peak, so a setting it rejects cannot fit. The budget is
`model.memory_limit_gb` when set, else the device's free memory (`memory_stats()`), else, on
CPU, the host's available memory.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp

from gn.errors import ConfigError
from gn.model import count_params, init_params, make_apply
from gn.model.config import ModelConfig, apply_memory

# Parameter-sized trees a run keeps beside the step's own arguments: the EMA, two optimizer
# moments, GN's θ_t and inner iterate (counted once more than a first-order method needs).
STATE_COPIES = 4


def memory_budget(cfg: ModelConfig, device: Any = None) -> tuple[int, str]:
    """(bytes, where it came from) that `memory: auto` must fit in."""
    if cfg.memory_limit_gb is not None:
        return int(cfg.memory_limit_gb * 1e9), "model.memory_limit_gb"
    device = device or jax.devices()[0]
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # some backends raise instead of returning None
        stats = None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0)), f"{device.platform} free memory"
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        avail = None
    if not avail:
        raise ConfigError("model.memory: auto cannot read this device's free memory; set "
                          "model.memory_limit_gb, or model.memory: plain or lean.")
    return int(avail), "host available memory"


def estimate_bytes(cfg: ModelConfig, *, micro_batch: int, seq_len: int, curvature: bool) -> dict:
    """XLA's memory for the run's heaviest per-batch call under `cfg` (compiled, never run)."""
    from gn.curvature import quadratic_model
    from gn.curvature.objective import lm_loss, split_batch

    apply = make_apply(cfg)
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    batch = jax.ShapeDtypeStruct((micro_batch, seq_len + 1), jnp.int32)
    if curvature:
        def fn(p0, p, b):
            x, y = split_batch(b)
            return quadratic_model(apply, p0, x, y).with_loss0(p)
        lowered = jax.jit(fn).lower(params, params, batch)
    else:
        lowered = jax.jit(jax.value_and_grad(lambda p, b: lm_loss(apply, p, b))).lower(params, batch)
    ma = lowered.compile().memory_analysis()
    step = sum(int(getattr(ma, k, 0) or 0) for k in ("temp_size_in_bytes", "argument_size_in_bytes",
                                                     "output_size_in_bytes"))
    param_bytes = count_params(cfg) * jnp.dtype(cfg.dtype).itemsize
    return {"step_bytes": step, "state_bytes": STATE_COPIES * param_bytes,
            "total_bytes": step + STATE_COPIES * param_bytes}


def resolve_memory(cfg: ModelConfig, *, micro_batch: int, seq_len: int, curvature: bool,
                   device: Any = None) -> tuple[ModelConfig, dict | None]:
    """`cfg` with its memory mode turned into the four fields, and what was measured.

    memory None: `cfg` unchanged and no record. plain / lean: that setting. auto: plain
    if its estimate fits the budget, else lean if it fits, else ConfigError with both."""
    if cfg.memory is None:
        return cfg, None
    if cfg.memory in ("plain", "lean"):
        return apply_memory(cfg, cfg.memory, seq_len), {"mode": cfg.memory, "chosen": cfg.memory}
    budget, source = memory_budget(cfg, device)
    record = {"mode": "auto", "budget_bytes": budget, "budget_from": source, "micro_batch": micro_batch,
              "curvature_step": curvature, "estimates": {}}
    for mode in ("plain", "lean"):
        candidate = apply_memory(cfg, mode, seq_len)
        est = estimate_bytes(candidate, micro_batch=micro_batch, seq_len=seq_len, curvature=curvature)
        record["estimates"][mode] = est
        if est["total_bytes"] <= budget:
            return candidate, {**record, "chosen": mode}
    gb = lambda x: f"{x / 1e9:.2f} GB"  # noqa: E731
    raise ConfigError(
        f"model.memory: auto found no setting that fits {gb(budget)} ({source}): XLA's estimate at "
        f"micro-batch {micro_batch} x seq {seq_len} is {gb(record['estimates']['plain']['total_bytes'])} plain "
        f"and {gb(record['estimates']['lean']['total_bytes'])} lean; lower the micro-batch (train.grad_accum for "
        "first-order methods, inner_steps for GN), use more devices (train.fsdp), or raise model.memory_limit_gb "
        "if the budget is wrong.")


def describe(record: dict | None) -> str | None:
    """One line for the run's log."""
    if not record:
        return None
    if record["mode"] != "auto":
        return f"model.memory: {record['mode']}"
    est = ", ".join(f"{m} {e['total_bytes'] / 1e9:.2f} GB" for m, e in record["estimates"].items())
    return (f"model.memory: auto chose {record['chosen']} (XLA estimate {est}; budget "
            f"{record['budget_bytes'] / 1e9:.2f} GB, {record['budget_from']})")


__all__ = ["STATE_COPIES", "describe", "estimate_bytes", "memory_budget", "resolve_memory"]
