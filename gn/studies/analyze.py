"""`gn analyze`: critical-batch-size analysis of finished runs or of a table.

Input is either run directories written by `gn train` (or parents holding
them, searched recursively for summary.json) or a CSV of steps to target.
Both are reduced to the same rows (method, batch_size, learning_rate, seed,
target, steps, ...) and analysed alike: best learning rate per batch size,
the McCandlish fit with a bootstrap interval, Zhang et al.'s CBS, step ratios
between methods and, for run directories, a fixed-token comparison. Outputs:
analysis.json, report.md and PNG plots (a plot failure only warns).
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from itertools import combinations
from pathlib import Path
from typing import Iterable, Sequence

import yaml

from gn.errors import ConfigError, require
from gn.studies import cbs
from gn.studies.cbs_plots import write_plots
from gn.studies.report import write_report
from gn.train.metrics import MetricsLog, target_key

# metrics.jsonl field -> name of the to-target quantity in the analysis
AXES = {"step": "steps", "outer_step": "outer_steps", "tokens": "tokens", "aux_tokens": "aux_tokens",
        "updates": "updates", "grad_evals": "grad_evals", "wall_time_s": "wall_time_s"}
# methods whose step size lives in `inner_learning_rate` (the outer step is a GN solve)
GN_METHODS = {"gn", "gn_prox_linear", "gn_layerwise"}
TABLE_REQUIRED = ("method", "batch_size", "learning_rate", "seed", "target", "steps_to_target")


def _num(x) -> float | int:
    """Integral floats as int, so batch sizes keep the units and look of the input."""
    x = float(x)
    return int(x) if x.is_integer() else x


# ---------------------------------------------------------------- loading runs

def find_run_dirs(dirs: Iterable[str | Path]) -> list[Path]:
    """Run directories among `dirs`: each is a run (holds summary.json) or a
    parent searched recursively. Raises ConfigError if one holds no run."""
    found: list[Path] = []
    for d in map(Path, dirs):
        require(d.is_dir(), f"'{d}' is not a directory (gn analyze takes run directories or --table FILE.csv).")
        runs = [d] if (d / "summary.json").is_file() else sorted(p.parent for p in d.rglob("summary.json"))
        require(bool(runs), f"no run directories (with summary.json) under '{d}'.")
        found += [r for r in runs if r not in found]
    return found


def _read_json(p: Path) -> dict:
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read '{p}': {exc}") from None


def load_run(d: Path) -> dict:
    """One run directory as a dict: method, batch_size, learning_rate, seed,
    diverged, targets (from config.yaml) and evals (the metrics records with a
    validation loss). sweep_run.json, when present, names method, batch,
    learning rate and seed; otherwise they come from summary.json/config.yaml."""
    summary = _read_json(d / "summary.json")
    cfg = yaml.safe_load((d / "config.yaml").read_text()) if (d / "config.yaml").is_file() else {}
    cfg = cfg or {}
    sweep = _read_json(d / "sweep_run.json") if (d / "sweep_run.json").is_file() else {}
    train = cfg.get("train") or {}
    hp = summary.get("hparams") or {}
    reg = summary.get("registered_method", summary.get("method"))
    lr_keys = ("learning_rate", "inner_learning_rate")
    if reg in GN_METHODS:
        lr_keys = lr_keys[::-1]
    lr = sweep.get("learning_rate", next((hp[k] for k in lr_keys if hp.get(k) is not None), None))
    require(lr is not None, f"run '{d}' names no learning rate (neither sweep_run.json nor summary.json hparams).")
    batch = sweep.get("batch_size", summary.get("batch_size", train.get("batch_size")))
    require(batch is not None, f"run '{d}' names no batch size.")
    rows = MetricsLog(d / "metrics.jsonl").read()
    return {"dir": str(d), "method": str(sweep.get("method", summary.get("method", d.name))),
            "batch_size": _num(batch), "learning_rate": float(lr), "seed": sweep.get("seed", train.get("seed", 0)),
            "diverged": bool(summary.get("diverged", False)) or any(r.get("diverged") for r in rows),
            "targets": [float(t) for t in train.get("target_losses") or []],
            "evals": [r for r in rows if r.get("val_loss") is not None]}


def run_rows(run: dict, targets: Sequence[float]) -> list[dict]:
    """One row per target: every axis at the interpolated crossing of the
    validation loss. A diverged run counts as not reached, whatever its curve
    did before it diverged."""
    ev = run["evals"]
    axes = {field: [r.get(field) for r in ev] for field in AXES}
    out = []
    for t in targets:
        hit = cbs.crossing_axes(axes, [r["val_loss"] for r in ev], t)
        row = {k: run[k] for k in ("method", "batch_size", "learning_rate", "seed", "diverged")}
        row["target"] = target_key(t)
        row.update({AXES[f]: (None if run["diverged"] else v) for f, v in hit.items()})
        out.append(row)
    return out


def _final_loss(run: dict) -> float | None:
    vals = [r["val_loss"] for r in run["evals"] if math.isfinite(r["val_loss"])]
    return None if run["diverged"] or not vals else vals[-1]


# ---------------------------------------------------------------- table

def read_table(path: str | Path) -> list[dict]:
    """Rows of a steps-to-target CSV. Validates everything before any analysis:
    a missing column, an empty table or an unparsable number raises ConfigError
    naming the column and the row (1 = the header line)."""
    p = Path(path)
    require(p.is_file(), f"table '{p}' not found.")
    with p.open(newline="") as f:
        reader = csv.DictReader(f)
        cols = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in TABLE_REQUIRED if c not in cols]
        require(not missing, f"table '{p}' lacks the column(s) {', '.join(missing)}; "
                             f"required: {','.join(TABLE_REQUIRED)} (tokens_to_target optional).")
        raw = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
    require(bool(raw), f"table '{p}' has no rows.")
    rows = []
    for line, r in enumerate(raw, start=2):
        def number(col, *, optional=False, positive=False):
            text = r.get(col, "")
            if text == "" and optional:
                return None
            try:
                x = float(text)
            except ValueError:
                raise ConfigError(f"table '{p}' row {line}: column {col} is not a number: '{text}'.") from None
            require(math.isfinite(x) and (x > 0 if positive else True),
                    f"table '{p}' row {line}: column {col} must be a finite{' positive' if positive else ''} "
                    f"number, got '{text}'.")
            return x
        require(r["method"] != "", f"table '{p}' row {line}: column method is empty.")
        number("target")
        row = {"method": r["method"], "batch_size": _num(number("batch_size", positive=True)),
               "learning_rate": number("learning_rate", positive=True), "seed": _num(number("seed")),
               "target": r["target"], "steps": number("steps_to_target", optional=True), "diverged": False}
        if "tokens_to_target" in cols:
            row["tokens"] = number("tokens_to_target", optional=True)
        rows.append(row)
    return rows


# ---------------------------------------------------------------- analysis

def _best_entry(b: dict, axes: Iterable[str]) -> dict:
    """A best_per_batch result as JSON: per-seed steps and means of other axes."""
    e = {"batch_size": b["batch_size"], "learning_rate": b["learning_rate"], "steps_mean": b["mean"],
         "steps_mean_reached": b["mean_reached"], "steps_se": b["se"], "steps": b["values"], "seeds": b["seeds"],
         "n_seeds": b["n_seeds"], "n_reached": b["n_reached"], "lr_grid": b["lr_grid"],
         "lr_at_edge": b["lr_at_edge"], "edge": b["edge"]}
    for a in axes:
        vals = [r.get(a) for r in b["rows"] if cbs._finite(r.get(a))]
        if vals and a != "steps":
            e[f"{a}_mean"] = sum(vals) / len(vals)
    return e


def _analyze_target(rows: list[dict], *, n_boot: int) -> dict:
    """Best lr per batch, McCandlish fit (+bootstrap) and Zhang CBS for one method and target."""
    axes = sorted({k for r in rows for k in r if k in AXES.values()})
    best = [_best_entry(b, axes) for b in cbs.best_per_batch(rows, "steps")]
    cells: dict = {}
    for r in rows:
        cells.setdefault(r["batch_size"], {}).setdefault(r["learning_rate"], []).append(r["steps"])
    fit = cbs.bootstrap_fit_grid(cells, n_boot=n_boot, seed=0)
    reached = [e for e in best if e["steps_mean_reached"] is not None]
    zhang = cbs.zhang_cbs([e["batch_size"] for e in reached], [e["steps_mean_reached"] for e in reached])
    return {"best": best, "fit": fit, "zhang_cbs": zhang,
            "unreached_batches": [e["batch_size"] for e in best if e["n_reached"] == 0]}


def _ratios(methods: dict, targets: list[str]) -> dict:
    """steps(a)/steps(b) at each batch both reached, for every pair of methods."""
    out = {}
    for t in targets:
        per = {m: {e["batch_size"]: e["steps_mean_reached"] for e in methods[m]["targets"].get(t, {}).get("best", [])
                   if e["steps_mean_reached"] is not None} for m in methods}
        out[t] = {f"{a}/{b}": {f"{B:g}": per[a][B] / per[b][B] for B in sorted(set(per[a]) & set(per[b]))}
                  for a, b in combinations(sorted(methods), 2)}
    return out


def analyze_rows(rows: list[dict], targets: list[str], *, source: dict, n_boot: int = 1000) -> dict:
    """The analysis of steps-to-target rows (shared by run directories and tables)."""
    methods = {}
    for m in sorted({r["method"] for r in rows}):
        mine = [r for r in rows if r["method"] == m]
        res = {"n_rows": len(mine), "n_not_reached": sum(r["steps"] is None for r in mine), "targets": {}}
        for t in targets:
            trs = [r for r in mine if r["target"] == t]
            if trs:
                res["targets"][t] = _analyze_target(trs, n_boot=n_boot)
        methods[m] = res
    return {"source": source, "targets": targets, "methods": methods, "ratios": _ratios(methods, targets),
            "definitions": {
                "fit": "McCandlish et al. 2018: S(B) = S_min + E_min/B, B_crit = E_min/S_min; weighted least squares "
                       "in 1/B (weights 1/S^2) over every reached seed at each batch's best lr; 95% percentile "
                       "bootstrap resampling seeds within each batch size (RNG seed 0).",
                "zhang_cbs": "Zhang et al. 2024: batch where steps exceed linear scaling from the smallest batch by "
                             "20% (log-interpolated); a different quantity from B_crit.",
                "steps": "the method's own steps at its batch size (metrics `step`), interpolated linearly between "
                         "the evaluations around the target crossing; unreached or diverged runs count as worst when "
                         "choosing the lr and are left out of the fit. The bootstrap does not redo the lr choice."}}


def _targets_for(runs: list[dict], targets: Sequence[float] | None) -> list[float]:
    if targets:
        return [float(t) for t in targets]
    found = sorted({t for r in runs for t in r["targets"]}, reverse=True)
    require(bool(found), "no target losses: the runs' config.yaml has no train.target_losses; pass --targets 3.5,3.25.")
    return found


def analyze_runs(dirs: Sequence[str | Path], *, targets: Sequence[float] | None = None, fixed_tokens: bool = False,
                 n_boot: int = 1000) -> dict:
    """Analyse run directories (or parents holding them): see the module docstring."""
    runs = [load_run(d) for d in find_run_dirs(dirs)]
    ts = _targets_for(runs, targets)
    rows = [row for run in runs for row in run_rows(run, ts)]
    out = analyze_rows(rows, [target_key(t) for t in ts], source={"kind": "runs", "dirs": [r["dir"] for r in runs]},
                       n_boot=n_boot)
    for m, res in out["methods"].items():
        res["n_runs"] = sum(r["method"] == m for r in runs)
        res["n_diverged"] = sum(r["method"] == m and r["diverged"] for r in runs)
    out["counts"] = {"runs": len(runs), "diverged": sum(r["diverged"] for r in runs)}
    if fixed_tokens:
        out["fixed_tokens"] = fixed_token_table(runs)
    out["_runs"] = runs   # curves for the plots; dropped from analysis.json
    return out


def fixed_token_table(runs: list[dict]) -> dict:
    """Final validation loss against batch size per method, at the best lr by
    mean final loss over seeds (diverged runs count as worst)."""
    rows = [{k: r[k] for k in ("method", "batch_size", "learning_rate", "seed")} |
            {"final_val_loss": _final_loss(r), "tokens": (r["evals"][-1].get("tokens") if r["evals"] else None)}
            for r in runs]
    out = {}
    for b in cbs.best_per_batch(rows, "final_val_loss"):
        toks = [r["tokens"] for r in b["rows"] if r["tokens"] is not None]
        out.setdefault(b["method"], []).append(
            {"batch_size": b["batch_size"], "learning_rate": b["learning_rate"], "final_val_loss_mean": b["mean"],
             "final_val_loss_se": b["se"], "final_val_loss": b["values"], "n_seeds": b["n_seeds"],
             "n_diverged": b["n_seeds"] - b["n_reached"], "tokens_max": max(toks) if toks else None,
             "lr_at_edge": b["lr_at_edge"], "edge": b["edge"]})
    return out


def analyze_table(csv_path: str | Path, *, targets: Sequence[float] | None = None, n_boot: int = 1000) -> dict:
    """Analyse a steps-to-target CSV; targets are keyed exactly as written in it."""
    rows = read_table(csv_path)
    ts = list(dict.fromkeys(r["target"] for r in rows))
    if targets:
        ts = [t for t in ts if any(math.isclose(float(t), float(x)) for x in targets)]
        require(bool(ts), f"none of --targets {list(targets)} is in the table's target column.")
    out = analyze_rows(rows, ts, source={"kind": "table", "path": str(csv_path)}, n_boot=n_boot)
    out["counts"] = {"rows": len(rows), "not_reached": sum(r["steps"] is None for r in rows)}
    return out


# ---------------------------------------------------------------- outputs

def _clean(x):
    """JSON-safe copy: inf/nan become None (JSON has neither)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items() if k != "rows"}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def to_json(result: dict) -> dict:
    """The JSON form of an analysis (without the run curves kept for plotting)."""
    return _clean({k: v for k, v in result.items() if not k.startswith("_")})


def write_outputs(result: dict, out: str | Path) -> list[Path]:
    """Write analysis.json, report.md and the plots into `out`; returns the
    files written. A failing plot warns and is skipped."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "analysis.json").write_text(json.dumps(to_json(result), indent=2))
    write_report(result, out / "report.md")
    files = [out / "analysis.json", out / "report.md"]
    try:
        files += write_plots(result, out)
    except Exception as exc:  # plots are a convenience; the JSON and the report must survive
        warnings.warn(f"could not write the analysis plots: {exc}", stacklevel=2)
    return files
