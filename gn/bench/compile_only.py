"""`gn bench --compile-only`: compile every benchmarked function without running it and
report XLA's temp bytes and compile time (works on CPU, where nothing else reports memory)."""


from typing import Callable

import jax
import jax.numpy as jnp

from gn.bench.gn_step import GNBenchConfig, bench_methods, inner_step_fn
from gn.bench.harness import compile_aot, machine_info, model_for_bench, precision

COMPILE_ONLY_FUNCTIONS = ("value_and_grad", "adamw_step", "muon_step", "gn_inner_step",
                          "gn_prox_linear_inner_step", "gn_layerwise_inner_step", "gn_inner_loop", "linesearch")


def run_compile_only(cfg: GNBenchConfig = GNBenchConfig(), *, log: Callable[[str], None] | None = None) -> dict:
    """`gn bench --compile-only`: compile every benchmarked function, run none of them.

    Each function (`COMPILE_ONLY_FUNCTIONS`: value_and_grad, one AdamW and one Muon
    step, one inner step of gn / gn_prox_linear / gn_layerwise, gn's whole jitted
    inner loop of N steps, and the line search) is lowered on abstract arguments
    (`jax.ShapeDtypeStruct`s from `jax.eval_shape`: no parameter, batch or optimizer
    state is ever materialised) and compiled with `jax.jit(...).lower(...).compile()`.
    Reported per function under `compiled`: compile seconds, XLA's FLOP count and
    `memory_analysis()` temp / argument / output bytes (also on CPU), plus their sum
    `total_bytes`, a lower bound of the call's live memory. Nothing is executed on
    the device, so paper-sized shapes can be checked for memory on a machine that
    could not run them.
    """
    from gn import curvature
    from gn.model import count_params, init_params, make_apply
    from gn.curvature.objective import lm_loss

    cfg.validate()
    say = log or (lambda msg: None)
    mcfg = model_for_bench(cfg.preset, cfg.vocab_size, cfg.model_overrides, cfg.seq_len,
                           micro_batch=cfg.inner_batch)
    apply = make_apply(mcfg)
    b, T, N = cfg.inner_batch, cfg.seq_len, cfg.inner_steps

    adamw, muon, gn, prox, lw = bench_methods(cfg, mcfg, apply)

    key = jax.eval_shape(lambda: jax.random.PRNGKey(cfg.seed))
    params = jax.eval_shape(lambda k: init_params(mcfg, k), key)
    tokens = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    batch, scalar = tokens(b, T + 1), jax.ShapeDtypeStruct((), jnp.int32)
    say(f"model {cfg.preset}: {count_params(mcfg):,} params (abstract), vocab {mcfg.vocab_size}; "
        f"b_inner {b} x seq {T}, N {N}; compile only")
    compiled: dict[str, dict] = {}

    def add(name, jitted, *args):
        say(f"compiling {name}")
        _, stats = compile_aot(jitted, *args, compiler_options=cfg.compiler_options)
        parts = (stats.get("temp_bytes"), stats.get("argument_bytes"), stats.get("output_bytes"))
        stats["total_bytes"] = sum(parts) if None not in parts else None
        compiled[name] = stats

    loss_fn = lambda p, bt: lm_loss(apply, p, bt)  # noqa: E731
    add("value_and_grad", jax.jit(jax.value_and_grad(loss_fn)), params, batch)
    for name, m in (("adamw_step", adamw), ("muon_step", muon)):
        add(name, m.step, params, jax.eval_shape(m.init, params), tokens(1, b, T + 1), None, key)
    for name, m in (("gn", gn), ("gn_prox_linear", prox), ("gn_layerwise", lw)):
        opt = jax.eval_shape(lambda p, m=m: m.init(p).inner_opt, params)
        add(f"{name}_inner_step", jax.jit(inner_step_fn(m)), params, params, opt, batch, scalar, scalar)
    add("gn_inner_loop", gn._inner, params, jax.eval_shape(gn.init, params), tokens(N, b, T + 1))
    add("linesearch", gn._search, params, params, tokens(gn.hp.ls_batches, b, T + 1))
    return {
        "benchmark": "gn_step_compile_only",
        "config": {"preset": cfg.preset, "vocab_size": mcfg.vocab_size, "hidden": mcfg.hidden,
                   "layers": mcfg.layers, "ffn": mcfg.ffn, "mlp": mcfg.mlp, "qk_norm": mcfg.qk_norm,
                   "dtype": mcfg.dtype, "compute_dtype": mcfg.compute_dtype,
                   "logits_chunk": mcfg.logits_chunk, "attn_chunk": mcfg.attn_chunk, "remat": mcfg.remat,
                   "scan_layers": mcfg.scan_layers,
                   "num_params": count_params(mcfg), "non_embedding_params": count_params(mcfg, non_embedding=True),
                   "inner_batch": b, "seq_len": T, "inner_steps": N, "ls_grid": gn.hp.ls_grid,
                   "ls_batches": gn.hp.ls_batches, "layerwise_block_mode": lw.hp.block_mode,
                   "inner_optimizer": gn.hp.inner_optimizer,
                   "compiler_options": dict(cfg.compiler_options) if cfg.compiler_options else None},
        "machine": machine_info(),
        "num_blocks": len(curvature.make_partition(params, lw.partition)[1]),
        "compiled": compiled,
    }




def format_compile_table(res: dict) -> str:
    """Aligned table of `run_compile_only`'s result: one row per compiled function."""
    c = res["config"]
    mib = lambda x: "-" if x is None else f"{x / 2**20:,.1f}"  # noqa: E731
    lines = [f"gn bench --compile-only: {c['preset']} ({c['num_params']:,} params, vocab {c['vocab_size']}"
             f"{precision(c)}), "
             f"b_inner {c['inner_batch']} x seq {c['seq_len']}, N {c['inner_steps']}; "
             f"{res['machine']['backend']} (nothing executed)",
             f"{'function':<28}{'temp MiB':>12}{'args MiB':>12}{'out MiB':>12}{'total MiB':>12}"
             f"{'GFLOP':>10}{'compile s':>11}"]
    for name, st in res["compiled"].items():
        flops = "-" if st.get("flops") is None else f"{st['flops'] / 1e9:,.2f}"
        lines.append(f"{name:<28}{mib(st.get('temp_bytes')):>12}{mib(st.get('argument_bytes')):>12}"
                     f"{mib(st.get('output_bytes')):>12}{mib(st.get('total_bytes')):>12}{flops:>10}"
                     f"{st['compile_s']:>11.1f}")
    return "\n".join(lines)
