"""`gn sweep`: critical-batch-size sweeps and large-batch studies from one spec.

A spec (see `gn.studies.spec` for every key) expands into runs: methods ×
batch sizes × learning rates (a grid around lr0·(B/B0)^p per batch size) ×
seeds × `vary` values. Each run is a fully resolved single-method config,
validated before anything runs, in its own directory named readably plus a
hash of the config (`adamw_B16_lr3e-3_s0_1a2b3c4d`), so the same spec always
maps to the same directories and reruns skip what is finished:

    SWEEP_DIR/manifest.jsonl          one line per run: id, workdir, method, batch_size, learning_rate,
                                      seed, tokens, est_cost, warmup_steps, eval_every and its
                                      `gn train ...` command
    SWEEP_DIR/sweep.sbatch            (--emit slurm) a requeueable job array over the manifest
    SWEEP_DIR/RUN/config_in.yaml      the resolved input config
    SWEEP_DIR/RUN/status.json         pending / running / finished / diverged / failed
    SWEEP_DIR/RUN/sweep_run.json      at the end: method, batch_size, learning_rate, seed, status, reason,
                                      evals_to_target (evaluations up to each crossing), ...
    SWEEP_DIR/RUN/...                 the trainer's outputs (metrics.jsonl, summary.json, checkpoints/)

Sweeps default to a constant learning rate, so one run serves every horizon (a
`schedule: cosine` spec ties the schedule to the token budget, and the run record
says `schedule_tied_to_horizon: true`), with weight averaging on, a warmup of 4
updates for warm-started runs, and an evaluation cadence that gives every run at
least `min_evals` evaluations before its crossing (`gn.studies.spec` says why and
how to change each). For Gauss-Newton methods the lr grid is the inner learning
rate and the batch grows through inner_steps = B / b_inner at a fixed b_inner.

Example (about 1-2 minutes on a CPU; 2 methods × 2 batch sizes × 2 lrs):

    gn sweep experiments/cbs_small.yaml --dry-run          # the table of runs and totals
    gn sweep experiments/cbs_small.yaml                    # run locally -> runs/cbs_small/
    gn sweep experiments/cbs_small.yaml --emit slurm       # runs/cbs_small/sweep.sbatch; sbatch it
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import math
import re
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Mapping

import yaml

from gn.errors import ConfigError, require
from gn.config import config_from_dict
from gn.methods import registry
from gn.studies.runner import MANIFEST, run_manifest
from gn.studies.spec import GN_FAMILY, HORIZON_SCHEDULES, SweepMethod, SweepSpec, load_spec

SBATCH = "sweep.sbatch"


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """One resolved run of a sweep."""

    id: int
    name: str                       # directory name: readable + hash of the resolved config
    method: str                     # display name (the config's single methods entry)
    registered_method: str
    family: str
    batch_size: int
    learning_rate: float            # for GN methods: inner_learning_rate
    seed: int
    steps: int
    tokens: int
    est_cost: float                 # gradient-token equivalents (line-search forwards count 1/3)
    vary: Mapping[str, Any]
    config: Mapping[str, Any]       # the fully resolved raw config (Config.to_dict())
    schedule_tied_to_horizon: bool
    warmup_steps: int | None        # None: the method has no warmup_steps
    eval_every: int = 0             # train.eval_every (outer steps)
    min_evals: int = 0              # the spec's min_evals (the runner checks the crossings against it)

    def command(self, sweep_dir: Path) -> str:
        """The `gn train` command line that runs (or resumes) this run."""
        d = sweep_dir / self.name
        return shlex.join(["gn", "train", str(d / "config_in.yaml"), "--method", self.method, "--workdir", str(d)])


def expand(spec: SweepSpec) -> list[RunPlan]:
    """Every run of the spec, each validated through `config_from_dict` (ConfigError on a bad spec)."""
    runs: list[RunPlan] = []
    for m in spec.methods:
        keys = [k for k, _ in m.vary]
        for B, seed in itertools.product(m.batch_sizes, m.seeds):
            for lr, combo in itertools.product(m.lr.grid(B), itertools.product(*(v for _, v in m.vary))):
                runs.append(_resolve(spec, m, B, lr, seed, dict(zip(keys, combo)), len(runs)))
    names = [r.name for r in runs]
    dup = sorted({n for n in names if names.count(n) > 1})
    require(not dup, f"The sweep lists identical runs twice: {', '.join(dup)}.")
    return runs


def _resolve(spec: SweepSpec, m: SweepMethod, B: int, lr: float, seed: int, vary: dict, index: int) -> RunPlan:

    tokens_per_step = B * spec.seq_len
    steps = math.ceil(spec.tokens / tokens_per_step)
    raw = copy.deepcopy(dict(spec.base))
    train = raw.setdefault("train", {})
    train.update(batch_size=B, steps=steps, seed=seed, progress=False)   # the runner prints its own progress
    if spec.targets:
        train["target_losses"] = list(spec.targets)
    if spec.stop_at_target:
        # Wait for the raw parameters and the EMA alike, so that `gn analyze --read raw|ema` finds
        # every crossing (a stop at the EMA's alone cut off raw ones: docs/results.md).
        train.update(stop_at_target=True, stop_reads="all")
    if spec.stop_after_rejected:
        train["stop_after_rejected"] = spec.stop_after_rejected
    if spec.ema_halflife_updates > 0:
        train["ema_decay"] = 0.5 ** (1.0 / spec.ema_halflife_updates)     # per sequential update
    if spec.eval_every(B):
        train["eval_every"] = spec.eval_every(B)
    defaults = registry.resolve_entry({"name": m.name, "method": m.registered}).hparams.to_dict()
    entry = {"name": m.name, "method": m.registered, **m.options}
    for key, value in vary.items():
        if "." in key:
            section, _, rest = key.partition(".")
            raw.setdefault(section, {})[rest] = value
        else:
            entry[key] = value
    if m.is_gn and m.options.get("inner_solver") == "cg":
        # Hessian-free CG has no inner learning rate (its step is the damped GN solve; the line
        # search scales it): one lr value, recorded for the run's name only.
        require(len(m.lr.grid(B)) == 1, f"methods.{m.name}: inner_solver: cg has no learning rate; give "
                                        "one lr value (it is not used) and vary damping instead.")
    else:
        entry[m.lr_key] = lr
    b_inner = m.inner_batch(B)
    if m.is_gn:
        entry["inner_steps"] = B // b_inner
    elif b_inner:
        entry["batch_size"] = b_inner         # the control: B / b_inner sequential updates per outer step
    if "schedule" in defaults and "schedule" not in entry:
        entry["schedule"] = spec.schedule
    warmup = None
    if "warmup_steps" in defaults:
        # warmup_steps counts the method's own steps: for the small-batch control, updates of b_inner.
        method_batch = b_inner if (b_inner and not m.is_gn) else B
        if spec.warmup_updates is not None and not (spec.warmup_default and "warmup_steps" in entry):
            warmup = spec.warmup_updates
        elif spec.warmup_tokens:
            warmup = round(spec.warmup_tokens / (method_batch * spec.seq_len))
        else:
            warmup = entry.get("warmup_steps", defaults["warmup_steps"])
        entry["warmup_steps"] = warmup
    if spec.scale_b2:
        _scale_b2(entry, defaults, B, m)
    raw["methods"] = [entry]
    label = f"{m.name}_B{B}_lr{_fmt(lr)}_s{seed}" + "".join(f"_{_slug(k)}{_fmt(v)}" for k, v in vary.items())
    try:
        cfg = config_from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"Sweep run {label}: {exc}") from None
    resolved = cfg.to_dict()
    digest = run_digest(resolved)
    hp = cfg.methods[0].hparams.to_dict()
    sched = hp.get("inner_schedule") if m.is_gn else hp.get("schedule")
    return RunPlan(id=index, name=f"{label}_{digest}", method=m.name, registered_method=m.registered,
                   family=m.family, batch_size=B, learning_rate=lr, seed=seed, steps=steps,
                   tokens=steps * tokens_per_step, est_cost=_cost(steps * tokens_per_step, hp, m),
                   vary=vary, config=resolved, schedule_tied_to_horizon=sched in HORIZON_SCHEDULES,
                   warmup_steps=warmup, eval_every=cfg.train.eval_every, min_evals=spec.min_evals)


# Config keys added after sweeps were run, left out of a run's digest while at their default, so that
# an existing sweep directory keeps its run names (and its finished runs) across the addition.
DIGEST_OMITTED_DEFAULTS = {("train", "compile_reuse"): False, ("data", "train_documents"): None,
                           ("data", "max_epochs"): None}


# Keys that decide when a run stops, never what it computes up to then: left out of the digest,
# so a run keeps its workdir when the stop rule changes (gn.train.workdirs continues it).
DIGEST_STOP_KEYS = (("train", "stop_reads"), ("train", "stop_after_rejected"))


def run_digest(resolved: Mapping) -> str:
    """The 8 hex digits that key a run's workdir to its resolved config."""
    keyed = {section: dict(values) if isinstance(values, Mapping) else values
             for section, values in resolved.items()}
    for section, key in DIGEST_STOP_KEYS:
        keyed.get(section, {}).pop(key, None)
    for (section, key), default in DIGEST_OMITTED_DEFAULTS.items():
        if keyed.get(section, {}).get(key, default) == default:
            keyed.get(section, {}).pop(key, None)
    return hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _scale_b2(entry: dict, defaults: Mapping, B: int, m: SweepMethod) -> None:
    """b2' = b2^(B/B0): the second moment's half-life stays constant in tokens."""
    keys = [k for k in ("b2", "adam_b2") if k in defaults]
    if not keys:
        return
    require(m.lr.base_batch is not None,
            f"methods.{m.name}: scale_b2 needs lr.base_batch (the batch B0 at which b2 holds).")
    for key in keys:
        entry[key] = float(f"{entry.get(key, defaults[key]) ** (B / m.lr.base_batch):.8g}")


def _cost(tokens: int, hp: Mapping, m: SweepMethod) -> float:
    """Rough cost in gradient-token equivalents: GN adds its line search
    (ls_batches batches of b_inner, ls_grid forward passes each, a forward ≈ 1/3 of a gradient)."""
    if not m.is_gn:
        return float(tokens)
    inner = hp["inner_steps"]
    return float(tokens * (1.0 + hp["ls_batches"] * hp["ls_grid"] / (3.0 * inner)))


def _fmt(v: Any) -> str:
    """Short, filename-safe value text: 0.003 -> 3e-3, 0.0125 -> 1.25e-2, 512 -> 512."""
    if isinstance(v, float):
        if v != 0 and (abs(v) < 0.1 or abs(v) >= 1e4):
            mant, exp = f"{v:.3e}".split("e")
            return f"{mant.rstrip('0').rstrip('.')}e{int(exp)}"
        return f"{v:g}"
    return re.sub(r"[^A-Za-z0-9.+-]", "-", str(v))


def _slug(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "", key.split(".")[-1])


# ---------------------------------------------------------------------------
# Manifest, dry-run table, SLURM


def manifest_rows(runs: list[RunPlan], sweep_dir: Path) -> list[dict]:
    """The manifest's lines (the local runner and the SLURM array read the same file)."""
    return [{"id": r.id, "name": r.name, "workdir": str(sweep_dir / r.name), "method": r.method,
             "registered_method": r.registered_method, "batch_size": r.batch_size,
             "learning_rate": r.learning_rate, "seed": r.seed, "steps": r.steps, "tokens": r.tokens,
             "est_cost": r.est_cost, "vary": dict(r.vary), "schedule_tied_to_horizon": r.schedule_tied_to_horizon,
             "warmup_steps": r.warmup_steps, "eval_every": r.eval_every, "min_evals": r.min_evals,
             "targets": list(r.config["train"].get("target_losses") or []),
             "command": r.command(sweep_dir)} for r in runs]


def adopt_existing(runs: list[RunPlan], sweep_dir: Path) -> list[RunPlan]:
    """Keep the directory of a run made before the toolkit gained a config field.

    A run's name hashes its fully resolved config, which also holds every default; a
    newer toolkit that adds a field (with a default that changes nothing) would give the
    same run a new name and train it again. A directory with the same readable label whose
    stored config_in.yaml, resolved by today's code, equals this run's config is the same
    run: its name is kept, so finished work is never repeated.
    """
    out = []
    for r in runs:
        label = r.name.rsplit("_", 1)[0]
        for d in sorted(sweep_dir.glob(f"{label}_*")) if not (sweep_dir / r.name).exists() else ():
            try:
                stored = config_from_dict(yaml.safe_load((d / "config_in.yaml").read_text())).to_dict()
            except (OSError, ConfigError, yaml.YAMLError, TypeError):
                continue
            if stored == dict(r.config):
                r = dataclasses.replace(r, name=d.name)
                break
        out.append(r)
    return out


def write_sweep(runs: list[RunPlan], sweep_dir: Path) -> list[dict]:
    """Write the manifest and every run's config_in.yaml (and a pending status.json for new runs)."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    rows = manifest_rows(runs, sweep_dir)
    for r in runs:
        d = sweep_dir / r.name
        d.mkdir(exist_ok=True)
        (d / "config_in.yaml").write_text(yaml.safe_dump(dict(r.config), sort_keys=False))
        if not (d / "status.json").exists():
            (d / "status.json").write_text(json.dumps({"status": "pending"}))
    tmp = sweep_dir / (MANIFEST + ".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tmp.replace(sweep_dir / MANIFEST)
    return rows


def format_table(runs: list[RunPlan], planned: tuple[dict[int, float], list[str]] | None = None) -> str:
    """The dry-run table: one line per run, then totals. `planned`: gn.studies.plan_cost's costs
    from the methods' own accounting (run id -> cost) and why any run lacks one; without it (or
    for those runs) the cost is the rough one, marked ~."""
    costs, reasons = planned or ({}, [])
    cost = {r.id: costs.get(r.id, r.est_cost) for r in runs}
    rough = [r for r in runs if r.id not in costs]
    head = (f"{'id':>4}  {'method':<14} {'B':>6} {'lr':>9} {'seed':>4} {'steps':>7} {'eval':>5} {'tokens':>12} "
            f"{'cost':>13}  run")
    lines = [head, "-" * len(head)]
    for r in runs:
        mark = "~" if r.id not in costs else " "
        lines.append(f"{r.id:>4}  {r.method:<14} {r.batch_size:>6} {r.learning_rate:>9.3g} {r.seed:>4} "
                     f"{r.steps:>7} {r.eval_every:>5} {r.tokens:>12,} {mark}{cost[r.id]:>12,.0f}  {r.name}")
    lines.append(f"{len(runs)} runs, {sum(r.steps for r in runs):,} steps, {sum(r.tokens for r in runs):,} "
                 f"training tokens, cost {sum(cost.values()):,.0f} gradient-token equivalents")
    if costs:
        lines.append("note: cost = steps × the method's own cost per step (its inner products, line search, CG "
                     "products, statistics and backend solves; gn.studies.plan_cost), in forward-backward tokens")
    if rough:
        extra = sorted({r.method for r in rough if r.family != "first_order"})
        # The rough estimate is a plan, not the accounting: summary.json's grad_evals is.
        lines.append(f"note: ~ {len(rough)} run(s) with the rough cost (gradients and GN's line search only"
                     + (f"; not the inner products, statistics or backend solves of {', '.join(extra)}" if extra else "")
                     + "); each run's summary.json grad_evals counts everything")
        lines += [f"note: not built for the plan: {why}" for why in reasons[:5]]
    sparse = sorted({r.batch_size for r in runs if r.eval_every > 1})
    if sparse:
        # a crossing is only as fine as the cadence: say so before anything runs (the runner's
        # post-hoc warning comes after the compute is spent)
        lines.append(f"note: evaluation every >1 outer steps at B = {', '.join(map(str, sparse))} ('eval' column); "
                     "a crossing is resolved to that cadence: set crossing_tokens from a pilot or eval_every_tokens")
    return "\n".join(lines)


def sbatch_script(spec: SweepSpec, sweep_dir: Path, n: int, cwd: Path) -> str:
    """A requeueable SLURM job array: index i runs manifest line i's run with `gn train`.

    `gn train` resumes from the run's checkpoints, so a requeued task continues;
    a task whose run already wrote summary.json (finished, stopped early or
    diverged) exits at once. Paths are absolute (sbatch may be called from
    anywhere; SLURM opens the --output file before the script runs), the
    Python is the one that emitted the script (`GN_PYTHON` overrides it: a
    batch job's PATH need not hold the venv), the trainer is exec'd so that the
    SIGTERM of a requeue or preemption reaches it directly (it checkpoints at
    the next step boundary and exits 143; `--signal` warns it before a time limit),
    and an index past the manifest's last line fails with a message.
    """
    extra = "".join(f"#SBATCH --{k}={v}\n" for k, v in spec.slurm.items())
    sweep_dir = Path(os.path.abspath(sweep_dir))
    manifest = shlex.quote(str(sweep_dir / MANIFEST))
    logs = sweep_dir / "slurm"
    python = shlex.quote(sys.executable)
    return f"""#!/bin/bash
#SBATCH --job-name=gn-{spec.name}
#SBATCH --array=0-{n - 1}
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:TERM@120
#SBATCH --output={logs}/%A_%a.out
{extra}# Generated by `gn sweep --emit slurm`; the local runner reads the same manifest.
# Set GN_PLATFORMS (e.g. cuda) in the submitting environment for accelerators.
set -euo pipefail
cd {shlex.quote(str(cwd))}
PY=${{GN_PYTHON:-{python}}}
IDX=${{SLURM_ARRAY_TASK_ID:?run this script with sbatch (SLURM_ARRAY_TASK_ID is not set)}}
LINES=$(wc -l < {manifest})
if [ "$IDX" -ge "$LINES" ]; then
  echo "array index $IDX is past the manifest's $LINES runs ({manifest}); nothing to run" >&2; exit 1
fi
LINE=$(sed -n "$((IDX + 1))p" {manifest})
field() {{ printf '%s' "$LINE" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }}
RUN=$(field workdir)
METHOD=$(field method)
if [ -f "$RUN/summary.json" ]; then echo "$RUN is finished"; exit 0; fi
echo "task $IDX (job ${{SLURM_JOB_ID:-?}}, restart ${{SLURM_RESTART_COUNT:-0}}) on $(hostname): $RUN"
if [ -n "${{GN_TRAIN:-}}" ]; then
  exec $GN_TRAIN train "$RUN/config_in.yaml" --method "$METHOD" --workdir "$RUN"
fi
exec "$PY" -m gn.cli train "$RUN/config_in.yaml" --method "$METHOD" --workdir "$RUN"
"""


def emit_slurm(spec: SweepSpec, runs: list[RunPlan], sweep_dir: Path) -> Path:
    """Write the manifest, the run configs and SWEEP_DIR/sweep.sbatch."""
    require(bool(runs), "The sweep has no runs to emit.")
    write_sweep(runs, sweep_dir)
    (sweep_dir / "slurm").mkdir(exist_ok=True)
    path = sweep_dir / SBATCH
    path.write_text(sbatch_script(spec, sweep_dir, len(runs), Path.cwd()))
    path.chmod(0o755)
    return path


def main(spec_path: str, workdir: str | None = None, *, dry_run: bool = False, emit: str | None = None,
         retry_failed: bool = False, only: list[int] | None = None, max_runs: int | None = None) -> list:
    """The `gn sweep` command: expand, then dry-run, emit or run locally."""
    spec = load_spec(spec_path)
    sweep_dir = Path(workdir) if workdir else Path("runs") / spec.name
    runs = expand(spec)
    if dry_run:
        from gn.studies.plan_cost import planned_costs   # builds the methods: jax, only for the table
        print(format_table(runs, planned_costs(runs)))
        return runs
    if emit is not None:
        require(emit == "slurm", f"--emit supports 'slurm' only, got '{emit}'.")
        path = emit_slurm(spec, adopt_existing(runs, sweep_dir), sweep_dir)
        print(f"wrote {sweep_dir / MANIFEST} ({len(runs)} runs) and {path}; submit with: sbatch {path}")
        return runs
    runs = adopt_existing(runs, sweep_dir)
    write_sweep(runs, sweep_dir)
    return run_manifest(sweep_dir, retry_failed=retry_failed, only=only, max_runs=max_runs)
