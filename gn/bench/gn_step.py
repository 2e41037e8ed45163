"""`gn bench`: the cost of one Gauss-Newton inner step, the line search and an outer step.

Measured in one process, after compilation, interleaved round-robin (every
repeat times each candidate once, so machine noise hits all of them alike);
reported as medians in seconds:

- `adamw_step_s`, `muon_step_s`: one step of the registered method (value_and_grad
  + update) at b_inner sequences.
- `value_and_grad_s`: `jax.value_and_grad(lm_loss)` alone at b_inner.
- `gn_inner_step_s`, `gn_prox_linear_inner_step_s`, `gn_layerwise_inner_step_s`:
  ONE inner step of the method's scan body — the local model at θ_t on one batch
  (`method._model`, i.e. `curvature.quadratic_model`), q(θ̂), the inner optimizer's
  update (`method.tx`) and the learning-rate schedule (`inner_lr_factor`) — as one
  jitted function (`inner_step_fn`).
- `linesearch_s`: the method's jitted line search (`method._search`) over every α on
  `ls_batches` batches, predicted-decrease diagnostic included.
- `outer_step_s`: `method.step` of `gn` with `inner_steps` batches + the line search.

Ratios are quotients of these medians; `goals` checks them against the design
targets. `breakdown` holds the inner step's parts (the local model + its gradient,
for gn and gn_layerwise; the inner optimizer update), the inner loop and line search
as timed inside `method.step` (`gn_inner_step_in_scan_s` = inner loop / N), and
XLA FLOP ratios; `compiled` holds XLA's FLOP count and buffer sizes of each jitted
function (available on CPU, unlike `memory_stats()`); `samples_s` / `min_s` the raw
repeats. On CPU a standalone jitted call re-faults its temp buffer on every call
(glibc unmaps freed blocks above 32 MiB), which a step inside `lax.scan` does not;
`tune_malloc=True` (`--tune-malloc`) removes that artefact (see docs/benchmarks.md).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from gn.bench.harness import (compile_aot, machine_info, model_for_bench, peak_memory, precision, random_tokens,
                              ratio, time_round_robin, tune_malloc)
from gn.errors import require

PAPER_INNER_STEPS = 122

GOALS = (
    # (name, metric, threshold, description)
    ("gn_inner_le_1.5x_muon", "gn_inner_over_muon", 1.5, "gn inner step <= 1.5 x Muon step"),
    ("linesearch_le_20pct_of_outer", "linesearch_fraction_of_outer", 0.2,
     "line search <= 20% of an outer step"),
    ("layerwise_le_0.6x_blocks_times_gn", "gn_layerwise_inner_over_blocks_times_gn_inner", 0.6,
     "gn_layerwise inner step <= 0.6 x num_blocks x gn inner step"),
)


# --------------------------------------------------------------------------- the GN benchmark

@dataclasses.dataclass(frozen=True)
class GNBenchConfig:
    """What `gn bench` measures. `None` means: the registered method's default."""

    preset: str = "nano"
    vocab_size: int | None = None            # None: DEFAULT_VOCAB[preset] or the preset's own
    model_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    inner_batch: int = 8                     # b_inner sequences per inner step / first-order step
    seq_len: int = 128
    inner_steps: int = PAPER_INNER_STEPS     # N of the outer step
    repeats: int = 10
    outer_repeats: int | None = 3            # rounds that include the outer step (None: repeats)
    ls_grid: int | None = None
    ls_batches: int | None = None
    layerwise_block_mode: str | None = None
    compare_block_modes: bool = False        # also time gn_layerwise in every other block_mode (breakdown)
    inner_optimizer: str | None = None       # the GN methods' inner optimizer (default: theirs, Muon)
    breakdown: bool = True                   # also time forward, the GN model alone and the inner update
    compiler_options: Mapping[str, Any] | None = None   # for smoke tests only (see compile_aot)
    tune_malloc: bool = False                # apply `tune_malloc()` first (CPU allocator artefact)
    seed: int = 0

    def validate(self) -> None:
        for name in ("inner_batch", "seq_len", "inner_steps", "repeats"):
            v = getattr(self, name)
            require(isinstance(v, int) and v > 0, f"bench: '{name}' must be a positive integer, got {v!r}.")
        for name in ("outer_repeats", "ls_grid", "ls_batches", "vocab_size"):
            v = getattr(self, name)
            require(v is None or (isinstance(v, int) and v > 0),
                    f"bench: '{name}' must be a positive integer, got {v!r}.")


def inner_step_fn(method) -> Callable:
    """One inner step of `method` (a GaussNewtonMethod): the method's own `inner_step`, the function its
    inner loop's scan body calls, sharding constraint included:
    (θ_t, θ̂, opt, batch, outer_step, i) -> (θ̂', opt', ℓ(z0), q(θ̂))."""
    return method.inner_step


def _build(name: str, hparams: dict, ctx):
    from gn.methods import registry

    return registry.build(registry.resolve_entry({"name": name, **hparams}), ctx)


def bench_methods(cfg: "GNBenchConfig", mcfg: Any, apply: Callable) -> tuple:
    """AdamW and Muon at the inner batch; GN, GN-prox-linear and layerwise GN at N inner batches."""
    from gn.methods.base import MethodContext

    b, N = cfg.inner_batch, cfg.inner_steps

    def ctx(batch_size):
        return MethodContext(apply_fn=apply, total_steps=100, batch_size=batch_size, model_cfg=mcfg,
                             reference_batch_size=batch_size)

    common_hp: dict[str, Any] = {"inner_steps": N}
    if cfg.inner_optimizer is not None:
        common_hp["inner_optimizer"] = cfg.inner_optimizer
    gn_hp = dict(common_hp)
    if cfg.ls_grid is not None:
        gn_hp["ls_grid"] = cfg.ls_grid
    if cfg.ls_batches is not None:
        gn_hp["ls_batches"] = cfg.ls_batches
    lw_hp = dict(common_hp)
    if cfg.layerwise_block_mode is not None:
        lw_hp["block_mode"] = cfg.layerwise_block_mode
    return (_build("adamw", {}, ctx(b)), _build("muon", {}, ctx(b)), _build("gn", gn_hp, ctx(N * b)),
            _build("gn_prox_linear", common_hp, ctx(N * b)), _build("gn_layerwise", lw_hp, ctx(N * b)))


def run_gn_bench(cfg: GNBenchConfig = GNBenchConfig(), *, log: Callable[[str], None] | None = None) -> dict:
    """Run the GN step benchmark; returns the JSON-able result (see the module docstring)."""
    from gn import curvature
    from gn.model import count_params, make_apply
    from gn.methods.base import MethodContext
    from gn.curvature.objective import lm_loss

    cfg.validate()
    say = log or (lambda msg: None)
    malloc_tuned = tune_malloc() if cfg.tune_malloc else False
    mcfg = model_for_bench(cfg.preset, cfg.vocab_size, cfg.model_overrides, cfg.seq_len,
                           micro_batch=cfg.inner_batch)
    apply = make_apply(mcfg)
    b, T, N = cfg.inner_batch, cfg.seq_len, cfg.inner_steps
    V = mcfg.vocab_size

    adamw, muon, gn, prox, lw = bench_methods(cfg, mcfg, apply)

    params, batch, inner_batches, aux, theta_hat = _inputs(cfg, mcfg, gn.hp.ls_batches)
    batches1 = batch[None]
    key = jax.random.PRNGKey(cfg.seed + 2)
    step0 = jnp.zeros((), jnp.int32)
    i0 = jnp.asarray(1, jnp.int32)

    say(f"model {cfg.preset}: {count_params(mcfg):,} params, vocab {V}; b_inner {b} x seq {T}, N {N}")
    fns: dict[str, Callable[[], Any]] = {}
    compiled: dict[str, dict] = {}

    def add(name, jitted, *args):
        say(f"compiling {name}")
        exe, stats = compile_aot(jitted, *args, compiler_options=cfg.compiler_options)
        compiled[name] = stats
        fns[name] = lambda: exe(*args)

    loss_fn = lambda p, bt: lm_loss(apply, p, bt)  # noqa: E731
    add("value_and_grad", jax.jit(jax.value_and_grad(loss_fn)), params, batch)
    add("adamw_step", adamw.step, params, adamw.init(params), batches1, None, key)
    add("muon_step", muon.step, params, muon.init(params), batches1, None, key)
    for name, m in (("gn", gn), ("gn_prox_linear", prox), ("gn_layerwise", lw)):
        m_state = m.init(params)
        add(f"{name}_inner_step", jax.jit(inner_step_fn(m)), params, theta_hat, m_state.inner_opt, batch, step0, i0)
    if cfg.compare_block_modes:
        from gn.curvature import BLOCK_MODES

        for mode in BLOCK_MODES:
            if mode != lw.hp.block_mode:
                m = dataclasses.replace(lw.hp, block_mode=mode).build(
                    MethodContext(apply_fn=apply, total_steps=100, batch_size=N * b, model_cfg=mcfg,
                                  reference_batch_size=N * b), "gn_layerwise")
                add(f"gn_layerwise_{mode}_inner_step", jax.jit(inner_step_fn(m)), params, theta_hat,
                    m.init(params).inner_opt, batch, step0, i0)
    if cfg.breakdown:
        # The gn inner step split: local model + its gradient, and the inner optimizer update alone.
        add("forward", jax.jit(loss_fn), params, batch)
        add("gn_model_grad", jax.jit(lambda th0, th, bt: gn.local_model(th0, bt)(th)), params, theta_hat, batch)
        add("gn_layerwise_model_grad", jax.jit(lambda th0, th, bt: lw.local_model(th0, bt)(th)), params, theta_hat,
            batch)
        add("inner_update", jax.jit(gn.tx.update), params, gn.tx.init(params), theta_hat)
    num_blocks = len(curvature.make_partition(params, lw.partition)[1])

    gn_state = gn.init(params)
    outer_metrics: list[dict] = []

    def outer():
        new, _, metrics = gn.step(params, gn_state, inner_batches, aux, key)
        outer_metrics.append(metrics)
        return new

    say("compiling outer_step (gn.step: inner loop + line search)")
    t0 = time.perf_counter()
    jax.block_until_ready(outer())
    outer_compile_s = time.perf_counter() - t0
    fns["outer_step"] = outer
    # After the outer step: its call compiled the line search, so this hits the cache.
    add("linesearch", gn._search, params, theta_hat, aux)
    outer_metrics.clear()
    outer_rounds = min(cfg.outer_repeats or cfg.repeats, cfg.repeats)
    say(f"timing {len(fns)} functions x {cfg.repeats} rounds (outer step: {outer_rounds})")
    samples = time_round_robin(fns, cfg.repeats, warmup=1, counts={"outer_step": outer_rounds})
    outer_metrics = outer_metrics[1:]   # the first call was the warm-up
    med = {k: statistics.median(v) for k, v in samples.items()}

    res = _result(cfg, mcfg, gn, lw, med, samples, compiled, outer_metrics, num_blocks=num_blocks,
                  outer_compile_s=outer_compile_s, outer_rounds=outer_rounds, malloc_tuned=malloc_tuned,
                  peak=peak_memory())
    res["compiled"] = compiled
    res["min_s"] = {k: min(v) for k, v in samples.items()}
    res["samples_s"] = samples
    return res


def _inputs(cfg: GNBenchConfig, mcfg, ls_batches: int):
    """θ_t, one inner batch, the N inner batches, the line-search batches and a θ̂ near θ_t."""
    from gn.model import init_params

    b, T, N, V = cfg.inner_batch, cfg.seq_len, cfg.inner_steps, mcfg.vocab_size
    params = init_params(mcfg, jax.random.PRNGKey(cfg.seed))
    rng = np.random.default_rng(cfg.seed)
    batch = random_tokens(rng, (b, T + 1), V)
    inner_batches = random_tokens(rng, (N, b, T + 1), V)
    aux = random_tokens(rng, (ls_batches, b, T + 1), V)
    # θ̂ a little away from θ_t: a non-trivial direction for the inner step and the line search
    # (built in numpy: eager per-leaf JAX ops would each compile a kernel).
    theta_hat = jax.tree.map(
        lambda p: jnp.asarray(np.asarray(p) + 1e-2 * rng.standard_normal(p.shape).astype(p.dtype)), params)
    return params, batch, inner_batches, aux, theta_hat


def _result(cfg: GNBenchConfig, mcfg, gn, lw, med: dict, samples: dict, compiled: dict, outer_metrics: list,
            *, num_blocks: int, outer_compile_s: float, outer_rounds: int, malloc_tuned: bool, peak) -> dict:
    """The JSON-able result from the medians `med` (and the outer steps' own timings)."""
    from gn.model import count_params

    b, T, N, V = cfg.inner_batch, cfg.seq_len, cfg.inner_steps, mcfg.vocab_size
    peak, peak_note = peak
    res: dict[str, Any] = {
        "benchmark": "gn_step",
        "config": {"preset": cfg.preset, "vocab_size": V, "hidden": mcfg.hidden, "layers": mcfg.layers,
                   "ffn": mcfg.ffn, "dtype": mcfg.dtype, "compute_dtype": mcfg.compute_dtype,
                   "logits_chunk": mcfg.logits_chunk, "attn_chunk": mcfg.attn_chunk, "remat": mcfg.remat,
                   "scan_layers": mcfg.scan_layers,
                   "num_params": count_params(mcfg),
                   "non_embedding_params": count_params(mcfg, non_embedding=True),
                   "inner_batch": b, "seq_len": T, "inner_steps": N, "ls_grid": gn.hp.ls_grid,
                   "ls_batches": gn.hp.ls_batches, "layerwise_block_mode": lw.hp.block_mode,
                   "inner_optimizer": gn.hp.inner_optimizer, "repeats": cfg.repeats,
                   "compiler_options": dict(cfg.compiler_options) if cfg.compiler_options else None,
                   "malloc_tuned": malloc_tuned,
                   "outer_repeats": outer_rounds, "seed": cfg.seed},
        "machine": machine_info(),
        "adamw_step_s": med["adamw_step"],
        "muon_step_s": med["muon_step"],
        "value_and_grad_s": med["value_and_grad"],
        "gn_inner_step_s": med["gn_inner_step"],
        "gn_prox_linear_inner_step_s": med["gn_prox_linear_inner_step"],
        "gn_layerwise_inner_step_s": med["gn_layerwise_inner_step"],
        "linesearch_s": med["linesearch"],
        "outer_step_s": med["outer_step"],
        "num_blocks": num_blocks,
        "peak_bytes_in_use": peak,
        "peak_memory_note": peak_note,
    }
    res.update({
        "gn_inner_over_muon": ratio(res["gn_inner_step_s"], res["muon_step_s"]),
        "gn_prox_linear_inner_over_muon": ratio(res["gn_prox_linear_inner_step_s"], res["muon_step_s"]),
        "gn_layerwise_inner_over_gn_inner": ratio(res["gn_layerwise_inner_step_s"], res["gn_inner_step_s"]),
        "gn_layerwise_inner_over_blocks_times_gn_inner":
            ratio(res["gn_layerwise_inner_step_s"], num_blocks * res["gn_inner_step_s"]),
        "linesearch_fraction_of_outer": ratio(res["linesearch_s"], res["outer_step_s"]),
        "gn_inner_over_value_and_grad": ratio(res["gn_inner_step_s"], res["value_and_grad_s"]),
    })
    res["goals"] = _goals(res, N)
    res["breakdown"] = _breakdown(med, samples, compiled, outer_metrics, N=N, num_blocks=num_blocks,
                                  outer_compile_s=outer_compile_s, gn_inner_step_s=res["gn_inner_step_s"])
    return res


def _goals(res: dict, N: int) -> dict:
    """Each of GOALS with its value and whether it passes."""
    goals = {}
    for name, metric, threshold, desc in GOALS:
        value = res[metric]
        goals[name] = {"description": desc, "metric": metric, "threshold": threshold, "value": value,
                              "pass": value is not None and value <= threshold}
    goals["linesearch_le_20pct_of_outer"]["at_paper_inner_steps"] = N == PAPER_INNER_STEPS
    return goals


def _breakdown(med: dict, samples: dict, compiled: dict, outer_metrics: list, *, N: int, num_blocks: int,
               outer_compile_s: float, gn_inner_step_s: float) -> dict:
    """Where the GN step's time goes: the inner step split, the outer step's own timings, FLOP ratios."""
    inner_loop = statistics.median(float(m["inner_time_s"]) for m in outer_metrics)
    ls_in_step = statistics.median(float(m["linesearch_time_s"]) for m in outer_metrics)
    flops = {k: v.get("flops") for k, v in compiled.items()}
    out = {
        "forward_s": med.get("forward"),
        "gn_model_grad_s": med.get("gn_model_grad"),
        "inner_update_s": med.get("inner_update"),
        "outer_inner_loop_s": inner_loop,
        "outer_linesearch_s": ls_in_step,
        "gn_inner_step_in_scan_s": inner_loop / N,
        "gn_inner_step_in_scan_over_muon_step": ratio(inner_loop / N, med["muon_step"]),
        "outer_compile_s": outer_compile_s,
        "gn_model_grad_over_value_and_grad": ratio(med.get("gn_model_grad"), med["value_and_grad"]),
        "muon_step_minus_value_and_grad_s": med["muon_step"] - med["value_and_grad"],
        "gn_inner_flops_over_muon_flops": ratio(flops.get("gn_inner_step"), flops.get("muon_step")),
        "gn_model_grad_flops_over_value_and_grad_flops": ratio(flops.get("gn_model_grad"),
                                                               flops.get("value_and_grad")),
        "gn_layerwise_flops_over_gn_flops": ratio(flops.get("gn_layerwise_inner_step"),
                                                  flops.get("gn_inner_step")),
        # The goal's ratio for the local-model products alone (the inner update is shared by all blocks).
        "gn_layerwise_model_grad_s": med.get("gn_layerwise_model_grad"),
        "gn_layerwise_model_grad_over_blocks_times_gn_model_grad": ratio(
            med.get("gn_layerwise_model_grad"),
            num_blocks * med["gn_model_grad"] if "gn_model_grad" in med else None),
    }
    for name in samples:
        if name.startswith("gn_layerwise_") and name.endswith("_inner_step") and name != "gn_layerwise_inner_step":
            out[f"{name}_s"] = med[name]
            out[f"{name}_over_blocks_times_gn_inner"] = ratio(
                med[name], num_blocks * gn_inner_step_s)
    return out


def _fmt(x: Any, unit: str = "") -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        if unit == "s":
            return f"{x * 1e3:.3f} ms" if x < 1 else f"{x:.3f} s"
        return f"{x:.3f}"
    return str(x)


def format_gn_table(res: dict) -> str:
    """The result as a readable table."""
    c, m = res["config"], res["machine"]
    lines = [f"gn bench: preset {c['preset']} ({c['num_params']:,} params, vocab {c['vocab_size']}"
             f"{precision(c)}), "
             f"b_inner {c['inner_batch']} x seq {c['seq_len']}, N = {c['inner_steps']} inner steps, "
             f"line search grid {c['ls_grid']} x {c['ls_batches']} batches; "
             f"medians of {c['repeats']} repeats (outer step: {c['outer_repeats']})",
             f"machine: {m['cpu']} ({m['cores_usable']} cores usable), {m['backend']}, jax {m['jax']}", ""]
    rows = [("adamw_step_s", "s"), ("muon_step_s", "s"), ("value_and_grad_s", "s"), ("gn_inner_step_s", "s"),
            ("gn_prox_linear_inner_step_s", "s"), ("gn_layerwise_inner_step_s", "s"), ("linesearch_s", "s"),
            ("outer_step_s", "s"), ("num_blocks", ""), ("gn_inner_over_muon", ""),
            ("gn_prox_linear_inner_over_muon", ""), ("gn_layerwise_inner_over_gn_inner", ""),
            ("gn_layerwise_inner_over_blocks_times_gn_inner", ""), ("linesearch_fraction_of_outer", ""),
            ("gn_inner_over_value_and_grad", "")]
    width = max([len(k) for k, _ in rows] + [len(k) for k in res["breakdown"]]) + 2
    lines += [f"  {k:<{width}}{_fmt(res[k], u)}" for k, u in rows]
    peak = res["peak_bytes_in_use"]
    peak_text = peak if peak is not None else "null"
    lines.append(f"  {'peak_bytes_in_use':<{width}}{peak_text}  ({res['peak_memory_note']})")
    lines += ["", "breakdown:"]
    for k, v in res["breakdown"].items():
        lines.append(f"  {k:<{width}}{_fmt(v, 's' if k.endswith('_s') else '')}")
    lines += ["", "goals:"]
    for name, g in res["goals"].items():
        lines.append(f"  [{'PASS' if g['pass'] else 'FAIL'}] {g['description']}: "
                     f"{g['metric']} = {_fmt(g['value'])} (<= {g['threshold']})")
    return "\n".join(lines)


__all__ = ["GNBenchConfig", "GOALS", "PAPER_INNER_STEPS", "bench_methods", "format_gn_table", "inner_step_fn",
           "run_gn_bench"]


if __name__ == "__main__":   # pragma: no cover - convenience
    raise SystemExit("use: python -m gn.bench.cli [--json] ...")
