"""The `gn` command line: a thin layer that parses arguments, loads the config
and calls `train` / `compare`. Bad input, and an operating-system error (read-only or
full disk, a damaged data file), exits with status 2 and a one-paragraph
message, never a traceback. SIGTERM exits with 143 and Ctrl-C with 130, both
after checkpointing the current step. Warnings print as one line each."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import warnings
from pathlib import Path

from gn.errors import ConfigError, RunError, Stopped
from gn.runtime import configure_jax_env


def _default_workdir(config: str, method: str | None = None) -> Path:
    base = Path("runs") / Path(config).stem
    return base / method if method else base


def _load(args):
    from gn.config import load_config

    return load_config(args.config, overrides=args.set or [])


DIVERGED = 3     # exit status of a run that diverged (bad input: 2, interrupted: 130)


def cmd_train(args) -> int | None:
    from gn.train.trainer import train

    cfg = _load(args)
    workdir = Path(args.workdir) if args.workdir else _default_workdir(args.config, args.method)
    summary = train(cfg, args.method, workdir, branch=args.branch)
    workdir = Path(args.branch) if args.branch else workdir
    from gn.train.distributed import is_primary

    if not is_primary():         # process 0 reports the run
        return DIVERGED if summary["diverged"] else None
    if summary["diverged"]:
        print(f"error: {summary['method']} diverged: {summary['divergence']}; {summary['steps']} steps, "
              f"{summary['tokens']:,} tokens ran; nothing of the diverged step was saved -> {workdir}",
              file=sys.stderr)
        return DIVERGED
    print(f"{summary['method']}: {summary['steps']} steps, {summary['tokens']:,} tokens, "
          f"final val loss {summary['final_val_loss']:.4f} (best {summary['best_val_loss']:.4f}), "
          f"{summary['wall_time_s']:.1f} s (+ {summary.get('compile_time_s', 0.0):.1f} s compiling) -> {workdir}")


def cmd_compare(args) -> None:
    from gn.train.compare import compare

    cfg = _load(args)
    workdir = Path(args.workdir) if args.workdir else _default_workdir(args.config)
    methods = [m for m in args.methods.split(",") if m] if args.methods else None
    compare(cfg, workdir, methods=methods)
    print(f"wrote {workdir}/comparison.json, comparison.md, comparison.png")


def cmd_sweep(args) -> None:
    # Imported here, not at the top: keeps `gn --help` fast (no JAX import).
    from gn.studies.sweep import main as sweep_main

    only = [int(i) for i in args.only.split(",") if i.strip()] if args.only else None
    sweep_main(args.spec, args.workdir, dry_run=args.dry_run, emit=args.emit, retry_failed=args.retry_failed,
               only=only, max_runs=args.max_runs)


def cmd_methods(args) -> None:
    from gn.methods import registry

    if args.name:
        print(registry.describe_options(args.name))
        return
    rows = registry.describe()
    width = max(len(n) for n, _ in rows)
    for name, desc in rows:
        print(f"{name:<{width}}  {desc}")


def cmd_analyze(args) -> None:
    # function-local import: keeps `gn --help` fast (no numpy/matplotlib/yaml at startup)
    import json

    from gn.errors import require
    from gn.studies.analyze import analyze_runs, analyze_table, to_json, write_outputs
    from gn.studies.run_archive import is_archive

    require(bool(args.dirs) != bool(args.table),
            "gn analyze takes run directories (or run archives) or --table FILE.csv (one of the two).")
    try:
        targets = [float(t) for t in args.targets.split(",") if t.strip()] if args.targets else None
    except ValueError:
        raise ConfigError(f"--targets must be comma-separated numbers, got '{args.targets}'.") from None
    if args.table:
        require(not args.fixed_tokens and not args.fixed_tokens_at,
                "--fixed-tokens needs run directories (their loss curves), not --table.")
        require(not args.methods, "--methods selects runs; with --table, filter the table's rows instead.")
        result = analyze_table(args.table, targets=targets, b_ref=args.cbs_reference_batch, space=args.fit)
        out = Path(args.out) if args.out else Path(args.table).parent
    else:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
        result = analyze_runs(args.dirs, targets=targets, fixed_tokens=args.fixed_tokens,
                              b_ref=args.cbs_reference_batch, space=args.fit, read=args.read, methods=methods,
                              fixed_tokens_at=args.fixed_tokens_at)
        first = Path(args.dirs[0])
        out = Path(args.out) if args.out else (first.parent if is_archive(first) else first)
    files = write_outputs(result, out)
    if args.json:
        print(json.dumps(to_json(result)))
    else:
        print(f"wrote {', '.join(str(f) for f in files)}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gn", description="Gauss-Newton and second-order optimization for LMs.")
    p.add_argument("--version", action="version", version=f"gn {version()}")
    p.add_argument("--distributed", action="store_true",
                   help="one run over several processes: start jax.distributed first, from the options below "
                        "or from the cluster's environment (SLURM's under srun); process 0 writes the files")
    p.add_argument("--coordinator", metavar="HOST:PORT", help="with --distributed: process 0's address")
    p.add_argument("--num-processes", type=int, metavar="N", help="with --distributed: number of processes")
    p.add_argument("--process-id", type=int, metavar="I", help="with --distributed: this process's index")
    sub = p.add_subparsers(dest="command", required=True)

    def add_common(sp):
        sp.add_argument("config", help="YAML config (states only what differs from the defaults)")
        sp.add_argument("--workdir", help="output directory (default runs/<config name>[/<method>])")
        sp.add_argument("--set", action="append", metavar="KEY.PATH=VALUE",
                        help="override one config key, e.g. --set train.steps=50 (repeatable)")

    t = sub.add_parser("train", help="train one method")
    add_common(t)
    t.add_argument("--method", required=True, help="a name from the config's methods list or any registered method")
    t.add_argument("--branch", metavar="NEW_WORKDIR",
                   help="continue the run of --workdir in NEW_WORKDIR with this (changed) config, starting from "
                        "its latest checkpoint; the source workdir is left untouched")
    t.set_defaults(fn=cmd_train)
    c = sub.add_parser("compare", help="train every method of the config and compare them")
    add_common(c)
    c.add_argument("--methods", help="comma-separated subset of the config's methods")
    c.set_defaults(fn=cmd_compare)
    sw = sub.add_parser("sweep", help="batch-size x learning-rate sweep from a spec (critical batch size)")
    sw.add_argument("spec", help="sweep spec YAML (see gn/studies/spec.py)")
    sw.add_argument("--workdir", help="sweep directory (default runs/<spec name>)")
    sw.add_argument("--dry-run", action="store_true", help="print the table of runs and totals; run nothing")
    sw.add_argument("--emit", choices=["slurm"], help="write SWEEP_DIR/sweep.sbatch (a job array) and the manifest")
    sw.add_argument("--retry-failed", action="store_true", help="rerun failed and diverged runs")
    sw.add_argument("--only", metavar="I,J", help="comma-separated manifest ids to run")
    sw.add_argument("--max-runs", type=int, help="train at most this many runs, then stop")
    sw.set_defaults(fn=cmd_sweep)
    m = sub.add_parser("methods", help="list registered methods, or one method's options")
    m.add_argument("name", nargs="?", help="a registered method: print its options with types and defaults")
    m.set_defaults(fn=cmd_methods)
    a = sub.add_parser("analyze", help="critical-batch-size analysis of finished runs or a steps-to-target table")
    a.add_argument("dirs", nargs="*",
                   help="run directories, folders searched recursively for them, or run archives (runs.jsonl.gz, "
                        "written next to every analysis.json): a run in a directory replaces an archived one")
    a.add_argument("--table",
                   help="CSV: method,batch_size,learning_rate,seed,target,steps_to_target[,tokens_to_target]")
    a.add_argument("--out", help="output folder (default: the first directory, or the table's folder)")
    a.add_argument("--json", action="store_true", help="print the analysis as one JSON object on stdout")
    a.add_argument("--fixed-tokens", action="store_true", help="also compare final loss per batch at fixed tokens")
    a.add_argument("--fixed-tokens-at", type=int, default=None, metavar="TOKENS",
                   help="the fixed-token comparison at this budget, read from each run's evaluation at exactly "
                        "that many tokens (valid when nothing in a run depends on its total budget: a constant "
                        "schedule); implies --fixed-tokens")
    a.add_argument("--targets", help="comma-separated target losses, e.g. 3.5,3.25 (default: the runs' config)")
    a.add_argument("--methods", help="comma-separated method names: analyse only their runs (default: every run)")
    a.add_argument("--cbs-reference-batch", type=float, default=None,
                   help="B_ref of Zhang et al.'s CBS = 1.2·B_ref + 0.2·E_min/S_min (default: the smallest batch)")
    a.add_argument("--fit", choices=("wls", "log"), default="wls",
                   help="McCandlish fit: wls (1/S² weights, default) or log (least squares on log S, as Zhang et al.)")
    a.add_argument("--read", choices=("auto", "raw", "ema"), default="auto",
                   help="validation loss a crossing is read from: auto (the EMA's when logged), raw or ema")
    a.set_defaults(fn=cmd_analyze)
    from gn.bench.cli import add_bench_parser

    add_bench_parser(sub)
    return p


def version() -> str:
    """The installed package's version (importlib.metadata), else gn.__version__."""
    try:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as _v

        return _v("gn")
    except PackageNotFoundError:
        import gn

        return gn.__version__


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {' '.join(str(message).split())}\n"


def _paragraph(text: str) -> str:
    return textwrap.fill(" ".join(str(text).split()), width=100, subsequent_indent="  ")


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _one_line_warning
    # First, before anything imports jax: the platform and the persistent compilation
    # cache, so reruns (resume after a crash, repeated comparisons) reuse compiled steps.
    configure_jax_env(warn=False)      # an unwritable cache is refused below, with exit status 2
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("train", "compare", "sweep"):
            from gn.train.workdirs import check_writable_dir

            check_writable_dir(Path(os.environ["JAX_COMPILATION_CACHE_DIR"]),
                               "the compilation cache (GN_CACHE_DIR or JAX_COMPILATION_CACHE_DIR)")
        if args.distributed or args.coordinator or args.num_processes is not None:
            if args.command != "train":
                raise ConfigError(f"--distributed runs one training run over several processes (`gn train`); "
                                  f"`gn {args.command}` is not supported there (a sweep's runs are separate "
                                  f"jobs: use --emit slurm).")
            from gn.train import distributed

            distributed.initialize(args.coordinator, args.num_processes, args.process_id)
        status = args.fn(args)
        if status:
            return status
    except (ConfigError, RunError) as exc:
        # In a multi-process run a verdict of process 0 is raised in every process: printed once.
        if not getattr(exc, "echo", False):
            print("error: " + _paragraph(exc), file=sys.stderr)
        return 2
    except OSError as exc:   # an OS refusal not converted where it happened: still one paragraph
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print("error: " + _paragraph(f"{exc.strerror or exc}{where}."), file=sys.stderr)
        return 2
    except Stopped as exc:
        print(_paragraph(exc.message), file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
