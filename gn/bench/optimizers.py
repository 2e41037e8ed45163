"""`gn bench optimizers`: step time and state size of every non-Gauss-Newton method.

Every registered method whose step is one parameter update (its config's
`whole_outer_steps` trait is false: first-order optax methods, the FOG family —
K-FAC, FOG, DiagFog, ... — and the curvature methods of `gn.methods.muon_like`)
is built through the registry with `MethodContext(model_cfg=...)`, so new methods
are picked up without changes here; outer-step methods (Gauss-Newton: an inner
loop or a solve, then a line search) have `gn bench`. For each:

- `step_time_s`: median wall time of the method's jitted `step` at a fixed batch
  (default 16 x 128), compiled ahead of time, the returned parameters and state fed
  back into the next call (so periodic work — SOAP's eigenbases, K-FAC inverses,
  Sophia's Hessian estimate — happens at its real frequency; the median is the
  common step, `step_time_mean_s` the amortised one);
- `state_bytes`: sum of `nbytes` over the leaves of the method's state;
- `step_time_rel`, `state_rel`: the same divided by AdamW's, measured in the same
  process (timings interleaved round-robin with every other method).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np

from gn.bench.harness import (compile_aot, machine_info, model_for_bench, random_tokens, ratio, time_round_robin,
                              tune_malloc)
from gn.errors import ConfigError, require

REFERENCE = "adamw"


@dataclasses.dataclass(frozen=True)
class OptimizerBenchConfig:
    preset: str = "nano"
    vocab_size: int | None = None
    model_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    batch_size: int = 16
    seq_len: int = 128
    repeats: int = 10
    methods: tuple[str, ...] | None = None      # None: every registered one-update method (is_one_update)
    exclude: tuple[str, ...] = ()               # names left out (e.g. methods too slow for the preset)
    time_budget_s: float = 60.0                 # per method: timed repeats stop once they add up to this
    tune_malloc: bool = False                   # see gn.bench.harness.tune_malloc
    seed: int = 0

    def validate(self) -> None:
        for name in ("batch_size", "seq_len", "repeats"):
            v = getattr(self, name)
            require(isinstance(v, int) and v > 0,
                    f"bench optimizers: '{name}' must be a positive integer, got {v!r}.")
        require(self.time_budget_s > 0,
                f"bench optimizers: 'time_budget_s' must be positive, got {self.time_budget_s}.")


def tree_bytes(tree: Any) -> int:
    """Sum of nbytes over the array leaves of a pytree."""
    return int(sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(tree)))


def is_one_update(cls: Any) -> bool:
    """Whether a registered method's step is a single parameter update, read from its config's
    traits (gn.methods.base.MethodConfig): an outer-step method (`whole_outer_steps`, e.g. GN's
    inner loop + line search) is timed by `gn bench`, not here."""
    return not cls.whole_outer_steps


def selected_methods(names: tuple[str, ...] | None, exclude: tuple[str, ...] = ()) -> list[str]:
    """The methods to measure, AdamW (the reference) first."""
    from gn.methods import registry

    for n in exclude:
        registry.get(n)                  # ConfigError for unknown names
        require(n != REFERENCE, f"'{REFERENCE}' is the reference of `gn bench optimizers` and cannot be excluded.")
    if names is None:
        chosen = [n for n in registry.names() if is_one_update(registry.get(n))]
    else:
        chosen = []
        for n in names:
            spec = registry.get(n)       # ConfigError for unknown names
            if not is_one_update(spec):
                raise ConfigError(f"'{n}' is an outer-step method (family {spec.family!r}: parameters move only "
                                  "at whole outer steps); `gn bench optimizers` measures one-update methods only. "
                                  "Use `gn bench` for the GN inner/outer step.")
            if n not in chosen:
                chosen.append(n)
    return [REFERENCE] + [n for n in chosen if n != REFERENCE and n not in exclude]


def _compiled_step(name: str, ctx, params, batches, key):
    """(step thunk carrying its own params and state, the initial state, XLA statistics, first call's s)
    of the registered method `name`, compiled ahead of time where its step is a jitted function."""
    from gn.methods import registry

    method = registry.build(registry.resolve_entry({"name": name}), ctx)
    state = method.init(params)
    step = method.step
    if hasattr(step, "lower"):
        step, stats = compile_aot(step, params, state, batches, None, key)
    else:
        stats = {}
    carry = [params, state]

    def thunk(step=step, carry=carry):
        carry[0], carry[1], _ = step(carry[0], carry[1], batches, None, key)
        return carry[0], carry[1]

    t0 = time.perf_counter()
    jax.block_until_ready(thunk())      # fails here, not in the timing loop, if the step is broken
    return thunk, state, stats, time.perf_counter() - t0


def run_optimizer_bench(cfg: OptimizerBenchConfig = OptimizerBenchConfig(), *,
                        log: Callable[[str], None] | None = None) -> dict:
    from gn.model import count_params, init_params, make_apply
    from gn.methods import registry
    from gn.methods.base import MethodContext

    cfg.validate()
    say = log or (lambda msg: None)
    malloc_tuned = tune_malloc() if cfg.tune_malloc else False
    names = selected_methods(cfg.methods, tuple(cfg.exclude))
    mcfg = model_for_bench(cfg.preset, cfg.vocab_size, cfg.model_overrides, cfg.seq_len,
                           micro_batch=cfg.batch_size)
    apply = make_apply(mcfg)
    params = init_params(mcfg, jax.random.PRNGKey(cfg.seed))
    batches = random_tokens(np.random.default_rng(cfg.seed), (1, cfg.batch_size, cfg.seq_len + 1),
                            mcfg.vocab_size)
    key = jax.random.PRNGKey(cfg.seed + 1)
    ctx = MethodContext(apply_fn=apply, total_steps=1000, batch_size=cfg.batch_size, model_cfg=mcfg,
                        reference_batch_size=cfg.batch_size)
    say(f"model {cfg.preset}: {count_params(mcfg):,} params, vocab {mcfg.vocab_size}; "
        f"batch {cfg.batch_size} x seq {cfg.seq_len}; {len(names)} methods")

    fns: dict[str, Callable[[], Any]] = {}
    info: dict[str, dict] = {}
    errors: dict[str, str] = {}
    counts: dict[str, int] = {}
    first_call: dict[str, float] = {}
    for name in names:
        say(f"compiling {name}")
        try:
            thunk, state, stats, first_call[name] = _compiled_step(name, ctx, params, batches, key)
        except ConfigError:
            raise
        except Exception as exc:   # a method under development must not sink the whole table
            if name == REFERENCE:
                raise
            errors[name] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            say(f"  {name} failed: {errors[name]}")
            continue
        fns[name] = thunk
        # A method whose first call alone exceeds the budget (e.g. tens of CG iterations per step)
        # is reported from that call; the others are timed until the budget is spent.
        counts[name] = 0 if first_call[name] > cfg.time_budget_s else cfg.repeats
        info[name] = {"family": registry.get(name).family, "state_bytes": tree_bytes(state),
                      "compile_s": stats.get("compile_s"), "flops": stats.get("flops"),
                      "temp_bytes": stats.get("temp_bytes")}
    say(f"timing {len(fns)} methods x {cfg.repeats} rounds")
    # The checked first call above was the warm-up.
    samples = time_round_robin(fns, cfg.repeats, warmup=0, counts=counts, budget_s=cfg.time_budget_s)
    for name in fns:
        if not samples[name]:
            samples[name] = [first_call[name]]
    ref_t = statistics.median(samples[REFERENCE])
    ref_b = info[REFERENCE]["state_bytes"]
    methods = {}
    for name in fns:
        t = statistics.median(samples[name])
        methods[name] = {"step_time_s": t, "step_time_rel": ratio(t, ref_t),
                         "state_bytes": info[name]["state_bytes"],
                         "state_rel": ratio(info[name]["state_bytes"], ref_b),
                         "step_time_mean_s": statistics.fmean(samples[name]),
                         "repeats": len(samples[name]), "from_first_call": counts[name] == 0,
                         "first_call_s": first_call[name],
                         **{k: info[name][k] for k in ("family", "compile_s", "flops", "temp_bytes")}}
    return {
        "benchmark": "optimizers",
        "config": {"preset": cfg.preset, "vocab_size": mcfg.vocab_size, "hidden": mcfg.hidden,
                   "layers": mcfg.layers, "ffn": mcfg.ffn, "num_params": count_params(mcfg),
                   "params_bytes": tree_bytes(params), "batch_size": cfg.batch_size, "seq_len": cfg.seq_len,
                   "repeats": cfg.repeats, "time_budget_s": cfg.time_budget_s, "exclude": list(cfg.exclude),
                   "malloc_tuned": malloc_tuned, "seed": cfg.seed},
        "machine": machine_info(),
        "reference": REFERENCE,
        "methods": methods,
        "errors": errors,
        "samples_s": samples,
    }


def format_optimizer_table(res: dict) -> str:
    c, m = res["config"], res["machine"]
    lines = [f"gn bench optimizers: preset {c['preset']} "
             f"({c['num_params']:,} params = {c['params_bytes']:,} bytes, "
             f"vocab {c['vocab_size']}), batch {c['batch_size']} x seq {c['seq_len']}, "
             f"medians of up to {c['repeats']} steps (n: fewer once {c['time_budget_s']:g} s are spent; 'first' is "
             f"the first call, excluded unless n = 1 and it exceeded the budget); relative to {res['reference']}",
             f"machine: {m['cpu']} ({m['cores_usable']} cores usable), {m['backend']}, jax {m['jax']}", ""]
    header = (f"  {'method':<12}{'family':<13}{'step (ms)':>11}{'rel':>8}{'mean (ms)':>11}{'n':>4}"
              f"{'first (ms)':>12}{'state (bytes)':>15}{'rel':>8}")
    lines += [header, "  " + "-" * (len(header) - 2)]
    for name, r in res["methods"].items():
        lines.append(f"  {name:<12}{r['family']:<13}{r['step_time_s'] * 1e3:>11.3f}{r['step_time_rel']:>8.2f}"
                     f"{r['step_time_mean_s'] * 1e3:>11.3f}{r['repeats']:>4}{r['first_call_s'] * 1e3:>12.1f}"
                     f"{r['state_bytes']:>15,}{r['state_rel']:>8.2f}")
    for name, err in res["errors"].items():
        lines.append(f"  {name:<12}FAILED: {err}")
    return "\n".join(lines)


__all__ = ["OptimizerBenchConfig", "REFERENCE", "format_optimizer_table", "is_one_update", "run_optimizer_bench",
           "selected_methods", "tree_bytes"]
