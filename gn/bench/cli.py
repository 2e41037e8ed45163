"""`gn bench [optimizers]`: the benchmark subcommand.

`add_bench_parser(subparsers)` registers it on the `gn` parser (the subcommand is
run as `args.fn(args)`; bad input raises ConfigError). Standalone:
`python -m gn.bench.cli [bench] [optimizers] [--json] ...`.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap

from gn.errors import ConfigError
from gn.runtime import configure_jax_env

TARGETS = ("optimizers", "candidates")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Register `bench` (with the optional positional `optimizers`) on a subparsers object."""
    b = subparsers.add_parser(
        "bench", help="time the GN inner/outer step, or every optimizer step (`gn bench optimizers`)",
        description="Without a target: one GN inner step (gn, gn_prox_linear, gn_layerwise), the line search "
                    "and a whole gn outer step against one AdamW / Muon step, with the design-goal ratios. "
                    "`optimizers`: step time and state size of every registered non-GN method relative to "
                    "AdamW. Times are medians over interleaved repeats after compilation, in one process.")
    b.add_argument("target", nargs="?", choices=TARGETS,
                   help="'optimizers' for the optimizer table; 'candidates' for the GN inner step under each "
                        "memory/precision option alone (time, XLA temp bytes, and its numbers against plain)")
    b.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    b.add_argument("--preset", default="nano", help="model preset (nano, tiny, 45m, 150m, 45m_swiglu, 150m_swiglu); default nano")
    b.add_argument("--vocab-size", type=_positive, help="vocabulary (default 512 for nano, 4096 for tiny)")
    b.add_argument("--model", action="append", metavar="KEY=VALUE", dest="model_set",
                   help="override a model config field, e.g. --model hidden=32 (repeatable)")
    b.add_argument("--compute-dtype", choices=("float32", "bfloat16", "float16"),
                   help="mixed precision: matmul inputs in this dtype, parameters float32 (model.compute_dtype; "
                        "default: none, the parameters' dtype)")
    b.add_argument("--seq-len", type=_positive, default=128, help="sequence length (default 128)")
    b.add_argument("--logits-chunk", type=int, metavar="N",
                   help="model.logits_chunk: evaluate the LM head, the loss and every GN product N tokens at a "
                        "time, never forming the (tokens x vocabulary) logits (default 0: off)")
    b.add_argument("--remat", action="store_true",
                   help="model.remat: recompute each transformer block's activations in backward/transpose passes")
    b.add_argument("--scan-layers", action="store_true",
                   help="model.scan_layers: run the transformer blocks as one lax.scan (compile time flat in depth)")
    b.add_argument("--repeats", type=_positive,
                   help="timed repeats per function (default 10; the GN outer step: see --outer-repeats)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--tune-malloc", action="store_true",
                   help="first stop glibc from unmapping freed memory (mallopt): on CPU every standalone jitted "
                        "step otherwise page-faults its fresh temp buffer (see docs/benchmarks.md)")
    g = b.add_argument_group("gn step benchmark (no target)")
    g.add_argument("--inner-batch", type=_positive, default=8, help="b_inner sequences per inner step (default 8)")
    g.add_argument("--inner-steps", type=_positive, default=122,
                   help="N inner steps of the outer step (default 122, the paper's)")
    g.add_argument("--outer-repeats", type=_positive, help="timed repeats of the outer step (default 3)")
    g.add_argument("--ls-grid", type=_positive, help="line-search grid size (default: the gn method's, 5)")
    g.add_argument("--ls-batches", type=_positive, help="line-search batches (default: the gn method's, 2)")
    g.add_argument("--layerwise-block-mode", choices=("batched", "sequential", "unrolled"),
                   help="block_mode of gn_layerwise (default: the method's)")
    g.add_argument("--compare-block-modes", action="store_true",
                   help="also time gn_layerwise in the other block modes (reported under 'breakdown')")
    g.add_argument("--inner-optimizer", help="inner optimizer of the GN methods (default: theirs, muon)")
    g.add_argument("--compile-only", action="store_true",
                   help="compile every benchmarked function (value_and_grad, AdamW/Muon steps, the GN, prox-linear "
                        "and layerwise inner steps, the GN inner loop, the line search) on abstract arguments and "
                        "report XLA's temp/argument/output bytes; runs nothing (paper shapes on a small machine)")
    g.add_argument("--no-breakdown", action="store_true",
                   help="skip the breakdown timings (forward, GN model alone, inner update): fewer compiles")
    c = b.add_argument_group("candidates (target 'candidates')")
    c.add_argument("--candidates", help="comma-separated subset (default all: plain, bf16, logits_chunk, attn_chunk, "
                                        "remat, scan_layers, bf16_logits_chunk, bf16_lean)")
    o = b.add_argument_group("optimizer benchmark (target 'optimizers')")
    o.add_argument("--batch-size", type=_positive, default=16, help="sequences per step (default 16)")
    o.add_argument("--methods", help="comma-separated subset of methods (AdamW, the reference, is always run)")
    o.add_argument("--exclude", help="comma-separated methods to leave out")
    o.add_argument("--time-budget", type=float, default=60.0,
                   help="seconds of timed repeats per method; slower methods get fewer repeats (default 60)")
    b.set_defaults(fn=cmd_bench)
    return b


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def model_overrides(args) -> dict:
    """ModelConfig fields set by the command line: --model KEY=VALUE, then the dedicated flags."""
    from gn.bench.harness import parse_overrides

    overrides = parse_overrides(args.model_set)
    if args.compute_dtype is not None:
        overrides["compute_dtype"] = args.compute_dtype
    # Model options that change memory and compile time, not the function computed.
    if args.logits_chunk is not None:
        overrides["logits_chunk"] = args.logits_chunk
    if args.remat:
        overrides["remat"] = True
    if args.scan_layers:
        overrides["scan_layers"] = True
    return overrides


def cmd_bench(args) -> None:
    overrides = model_overrides(args)
    log = _log   # progress goes to stderr; stdout holds only the table or the JSON
    if args.compile_only and args.target == "optimizers":
        raise ConfigError("--compile-only applies to the GN step benchmark (no target), not to 'optimizers'.")
    if args.target == "optimizers":
        from gn.bench.optimizers import OptimizerBenchConfig, format_optimizer_table, run_optimizer_bench

        methods = tuple(m.strip() for m in args.methods.split(",") if m.strip()) if args.methods else None
        exclude = tuple(m.strip() for m in args.exclude.split(",") if m.strip()) if args.exclude else ()
        cfg = OptimizerBenchConfig(preset=args.preset, vocab_size=args.vocab_size, model_overrides=overrides,
                                   batch_size=args.batch_size, seq_len=args.seq_len,
                                   repeats=args.repeats or 10, methods=methods, exclude=exclude,
                                   time_budget_s=args.time_budget, tune_malloc=args.tune_malloc,
                                   seed=args.seed)
        res = run_optimizer_bench(cfg, log=log)
        print(json.dumps(res, indent=1) if args.json else format_optimizer_table(res))
        return
    from gn.bench.compile_only import format_compile_table, run_compile_only
    from gn.bench.gn_step import GNBenchConfig, format_gn_table, run_gn_bench
    if args.compile_only and args.target == "candidates":
        raise ConfigError("--compile-only applies to the GN step benchmark (no target), not to 'candidates'.")

    cfg = GNBenchConfig(preset=args.preset, vocab_size=args.vocab_size, model_overrides=overrides,
                        inner_batch=args.inner_batch, seq_len=args.seq_len, inner_steps=args.inner_steps,
                        repeats=args.repeats or 10, outer_repeats=args.outer_repeats or 3,
                        ls_grid=args.ls_grid, ls_batches=args.ls_batches,
                        layerwise_block_mode=args.layerwise_block_mode,
                        compare_block_modes=args.compare_block_modes, inner_optimizer=args.inner_optimizer,
                        breakdown=not args.no_breakdown, tune_malloc=args.tune_malloc, seed=args.seed)
    if args.target == "candidates":
        from gn.bench.candidates import format_candidates_table, run_candidates

        only = tuple(x.strip() for x in args.candidates.split(",") if x.strip()) if args.candidates else None
        res = run_candidates(cfg, only=only, log=log)
        print(json.dumps(res, indent=1) if args.json else format_candidates_table(res))
        return
    if args.compile_only:
        res = run_compile_only(cfg, log=log)
        print(json.dumps(res, indent=1) if args.json else format_compile_table(res))
        return
    res = run_gn_bench(cfg, log=log)
    print(json.dumps(res, indent=1) if args.json else format_gn_table(res))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gn.bench.cli")
    add_bench_parser(p.add_subparsers(dest="command", required=True))
    return p


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point; `bench` may be omitted from argv."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "bench":
        argv = ["bench"] + argv
    configure_jax_env()   # before jax is imported: platform and persistent compilation cache
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except ConfigError as exc:
        msg = " ".join(str(exc).split())
        print("error: " + textwrap.fill(msg, width=100, subsequent_indent="  "), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
