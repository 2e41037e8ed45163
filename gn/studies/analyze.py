"""`gn analyze`: critical-batch-size analysis of finished runs or of a table.

Input is either run directories written by `gn train` (or parents holding
them, searched recursively for summary.json) and run archives (the
runs.jsonl.gz every analysis of runs writes, gn.studies.run_archive), or a
CSV of steps to target.
Both are reduced to the same rows (method, batch_size, learning_rate, seed,
target, steps, ...) and analysed alike: best learning rate per batch size,
the McCandlish fit with a bootstrap interval, Zhang et al.'s CBS, step ratios
between methods and, for run directories, a fixed-token comparison. Outputs:
analysis.json, report.md, PNG plots (a plot failure only warns) and the
run archive.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import defaultdict
from itertools import combinations
from pathlib import Path
from typing import Iterable, Sequence

from gn.errors import require
from gn.studies import cbs, diagnostics, intervals
from gn.studies.cbs_plots import write_plots
from gn.studies.report import write_report
from gn.studies.inputs import AXES, _final_loss, loss_at_tokens, read_table, run_rows
from gn.studies.run_archive import ARCHIVE_NAME, load_runs, write_archive
from gn.train.metrics import target_key

UNITS = {"steps": "the method's own steps (metrics `step`)",
         "outer_steps": "outer steps (one GN solve + line search, or B/b sequential updates of the control)",
         "updates": "sequential parameter updates (GN inner steps; the control's small-batch steps)",
         "grad_evals": "value_and_grad equivalents at the run's batch (inner loop, line search, CG products, "
                       "K-FAC statistics; FLOP estimate)",
         "compute": "forward-backward passes over one sequence (grad_evals × batch size)",
         "tokens": "training tokens", "aux_tokens": "auxiliary tokens (line-search data, not trained on)",
         "wall_time_s": "wall time in seconds without compilation"}
# Units in which the McCandlish fit S(B) = S_min + E_min/B is made (a count of sequential steps).
FIT_UNITS = ("steps", "outer_steps", "updates")
# An interpolated crossing whose bracket (last evaluation above to first at or below) is wider
# than this fraction of the crossing is flagged: the evaluation cadence, not the method, sets it.
BRACKET_LIMIT = 0.25
# wls: weighted least squares in 1/B, weights 1/S² (closed form, vectorised bootstrap);
# log: unweighted least squares on log S (Zhang et al.'s curve_fit of log(a + b/B)).
FIT_SPACES = ("wls", "log")


# ---------------------------------------------------------------- analysis

def _bracket_flags(rows: list[dict], unit: str) -> dict:
    """Runs whose crossing bracket in `unit` is wider than BRACKET_LIMIT of the crossing (for
    interpolated crossings), or spans more than one step (whole-step crossings)."""
    wide = 0
    widths = []
    for r in rows:
        br, v = (r.get("bracket") or {}).get(unit), r.get(unit)
        if not br or br[0] is None or br[1] is None or not v:
            continue
        w = br[1] - br[0]
        widths.append(w / v)
        whole = r.get("crossing_rule") == "first_at_or_below"
        step_w = (r.get("bracket") or {}).get("steps")
        if (whole and step_w and step_w[1] - step_w[0] > 1) or (not whole and w > BRACKET_LIMIT * v):
            wide += 1
    return {"n_wide": wide, "max_rel_width": max(widths) if widths else None}


def _unit_stats(b: dict, units: Iterable[str]) -> dict:
    """Per unit: mean, s.e. and t-interval over the seeds of a best-lr cell, and bracket flags."""
    out = {}
    for u in units:
        vals = [r.get(u) for r in b["rows"]]
        st = intervals.t_interval([float(v) for v in vals if cbs._finite(v)])
        st["values"] = [None if not cbs._finite(v) else float(v) for v in vals]
        st.update(_bracket_flags(b["rows"], u))
        out[u] = st
    return out


def _best_entry(b: dict, units: Iterable[str]) -> dict:
    """A best_per_batch result as JSON: per-seed steps, and every unit with its t-interval."""
    st = intervals.t_interval([v for v in b["values"] if v is not None])
    e = {"batch_size": b["batch_size"], "learning_rate": b["learning_rate"], "steps_mean": b["mean"],
         "steps_mean_reached": b["mean_reached"], "steps_se": b["se"], "steps_ci": st["ci"], "steps": b["values"],
         "seeds": b["seeds"], "n_seeds": b["n_seeds"], "n_reached": b["n_reached"], "lr_grid": b["lr_grid"],
         "lr_at_edge": b["lr_at_edge"], "edge": b["edge"], "tied_lrs": b["tied_lrs"],
         "crossing_rule": next((r.get("crossing_rule") for r in b["rows"] if r.get("crossing_rule")), None),
         "read_from": next((r.get("read_from") for r in b["rows"] if r.get("read_from")), None),
         "updates_per_outer_step": next((r.get("updates_per_outer_step") for r in b["rows"]
                                         if r.get("updates_per_outer_step")), None),
         "units": _unit_stats(b, units)}
    for u, v in e["units"].items():
        if u != "steps" and v["mean"] is not None:
            e[f"{u}_mean"] = v["mean"]
    return e


def _grows_with_batch(best: list[dict]) -> bool:
    """Do the sequential updates per outer step grow with B across this method's batches?"""
    per = [(e["batch_size"], e["updates_per_outer_step"]) for e in best if e.get("updates_per_outer_step")]
    return len({round(p, 6) for _, p in per}) > 1


def _fit_unit(rows: list[dict], unit: str, best: list[dict], *, n_boot: int, b_ref: float | None,
              grows: bool, space: str = "wls") -> dict:
    """The McCandlish fit in one unit: the lr chosen per batch in that unit, a seed-bootstrap
    interval (lr choice redone per replicate), diagnostics and Zhang's CBS from the fit."""
    cells: dict = {}
    for r in rows:
        cells.setdefault(float(r["batch_size"]), {}).setdefault(r["learning_rate"], []).append(r.get(unit))
    fit = intervals.seed_bootstrap(cells, n_boot=n_boot, seed=0, space=space)
    per = {e["batch_size"]: e for e in cbs.best_per_batch(rows, unit)}
    pts = [(float(B), e["mean"], e["se"]) for B, e in sorted(per.items()) if e["mean"] is not None]
    ref = b_ref if b_ref is not None else (pts[0][0] if pts else None)
    # by construction: a count of outer steps when each outer step's sequential work grows with B,
    # or a count of updates each on a fixed batch: neither has B as its parallel width
    claimed = not grows
    min_step = 1.0
    if unit == "updates" and best and best[0].get("updates_per_outer_step") and \
            best[0].get("crossing_rule") == "first_at_or_below":
        min_step = min(e["updates_per_outer_step"] or 1.0 for e in best)
    diag = diagnostics.fit_diagnostics([p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts], fit,
                                       min_step=min_step, b_ref=ref, by_construction=not claimed,
                                       lr_edges=[float(B) for B, e in sorted(per.items())
                                                 if e["edge"] in ("low", "high")],
                                       single_lr=all(e["edge"] == "only" for e in per.values()))
    return {"unit": unit, "claimed": claimed, **fit, "diagnostics": diag,
            "zhang_cbs": cbs.zhang_cbs_fit(fit, ref) if ref is not None else None}


def _analyze_target(rows: list[dict], *, n_boot: int, b_ref: float | None = None, space: str = "wls") -> dict:
    """Best lr per batch with every unit, the McCandlish fit in each step unit (seed bootstrap,
    diagnostics, Zhang's CBS from the fit) and the raw-data Zhang variant, for one method and target."""
    # a unit the rows carry (as a key: a method that never reached still has its units)
    units = [u for u in AXES.values() if any(u in r for r in rows)]
    best = [_best_entry(b, units) for b in cbs.best_per_batch(rows, "steps")]
    grows = _grows_with_batch(best)
    fits = {u: _fit_unit(rows, u, best, n_boot=n_boot, b_ref=b_ref, grows=grows, space=space)
            for u in FIT_UNITS if u in units}
    reached = [e for e in best if e["steps_mean_reached"] is not None]
    main = fits["steps"]
    return {"best": best, "fit": {**main, "ok": main["B_crit"] is not None and main["S_min"] is not None
                                  and main["S_min"] > 0, "note": _note(main)},
            "fits": fits, "zhang_cbs": main["zhang_cbs"],
            "zhang_cbs_raw": cbs.zhang_cbs_raw([e["batch_size"] for e in reached],
                                               [e["steps_mean_reached"] for e in reached]),
            "per_step_work_grows_with_batch": grows,
            "unreached_batches": [e["batch_size"] for e in best if e["n_reached"] == 0]}


def _note(fit: dict) -> str:
    if fit["S_min"] is None:
        return "no fit: fewer than two batches reached the target"
    if fit["S_min"] <= 0:
        return "S_min <= 0: steps fall like 1/B over the whole grid, B_crit is beyond the largest batch"
    if fit["E_min"] <= 0:
        return "E_min <= 0: larger batches do not save steps"
    return ""


def _ratios(methods: dict, targets: list[str]) -> dict:
    """cost(a)/cost(b) in every unit at each batch both reached, for every pair of methods
    (means over reached seeds at each method's best lr). `steps` (each method's own) is the
    historical key; `by_unit` has all."""
    out, by_unit = {}, {}
    for t in targets:
        def per(m, unit):
            return {e["batch_size"]: e["units"][unit]["mean"]
                    for e in methods[m]["targets"].get(t, {}).get("best", [])
                    if e["n_reached"] and unit in e["units"] and e["units"][unit]["mean"]}
        units = sorted({u for m in methods for e in methods[m]["targets"].get(t, {}).get("best", [])
                        for u in e["units"]})
        pairs = {}
        for a, b in combinations(sorted(methods), 2):
            pa, pb = per(a, "steps"), per(b, "steps")
            pairs[f"{a}/{b}"] = {f"{B:g}": pa[B] / pb[B] for B in sorted(set(pa) & set(pb))}
        out[t] = pairs
        by_unit[t] = {
            u: {f"{a}/{b}": {f"{B:g}": per(a, u)[B] / per(b, u)[B] for B in sorted(set(per(a, u)) & set(per(b, u)))}
                for a, b in combinations(sorted(methods), 2)} for u in units}
    return out, by_unit


DEFINITIONS = {
    "fit": "McCandlish et al. 2018: S(B) = S_min + E_min/B, B_crit = E_min/S_min; weighted least squares in 1/B "
           "(weights 1/S^2) to the mean over seeds at each batch's best lr (chosen in the fit's unit); made in "
           "each step unit (steps, outer_steps, updates). claimed = false where the method's sequential updates "
           "per outer step grow with B, so the count falls as 1/B by construction: no B_crit there.",
    "interval": intervals.SEED_BOOTSTRAP + "; spread widened by sqrt(n/(n-1)); 95% percentile interval (RNG "
                "seed 0). With one run per cell, or a batch whose best cell has one seed: a residual bootstrap "
                "of the fit, or none with fewer than three batches; none where the replicates do not vary (never "
                "a zero-width interval). Means over seeds carry a Student-t 95% interval with their n.",
    "crossing": "methods that move only at whole outer steps (Gauss-Newton) cross at the first evaluation at or "
                "below the target; others are interpolated linearly between the evaluations around it. Each "
                "crossing has a bracket (last evaluation above, first at or below); n_wide counts runs whose "
                f"bracket exceeds {BRACKET_LIMIT:g} of the crossing (interpolated) or one step (whole steps). Read "
                "from the EMA's validation loss when the run averaged weights (read_from).",
    "zhang_cbs": "Zhang et al. 2024, as their code computes it: from the fitted curve, the batch where "
                 "S(B)·B = 1.2·S(B_ref)·B_ref, i.e. 1.2·B_ref + 0.2·E_min/S_min; B_ref from "
                 "--cbs-reference-batch (default: the smallest batch). zhang_cbs_raw interpolates the measured "
                 "steps instead (a variant). Neither is comparable with B_crit.",
    "units": UNITS}


def analyze_rows(rows: list[dict], targets: list[str], *, source: dict, n_boot: int = 2000,
                 b_ref: float | None = None, space: str = "wls") -> dict:
    """The analysis of steps-to-target rows (shared by run directories and tables)."""
    methods = {}
    for m in sorted({r["method"] for r in rows}):
        mine = [r for r in rows if r["method"] == m]
        res = {"n_rows": len(mine), "n_not_reached": sum(r["steps"] is None for r in mine), "targets": {}}
        for t in targets:
            trs = [r for r in mine if r["target"] == t]
            if trs:
                res["targets"][t] = _analyze_target(trs, n_boot=n_boot, b_ref=b_ref, space=space)
        methods[m] = res
    ratios, by_unit = _ratios(methods, targets)
    return {"source": source, "targets": targets, "methods": methods, "ratios": ratios,
            "ratios_by_unit": by_unit, "definitions": DEFINITIONS,
            "settings": {"n_boot": n_boot, "cbs_reference_batch": b_ref, "fit_space": space}}


def _targets_for(runs: list[dict], targets: Sequence[float] | None) -> list[float]:
    if targets:
        return [float(t) for t in targets]
    found = sorted({t for r in runs for t in r["targets"]}, reverse=True)
    require(bool(found), "no target losses: the runs' config.yaml has no train.target_losses; pass --targets 3.5,3.25.")
    return found


def _check_options(b_ref: float | None, space: str) -> None:
    require(b_ref is None or (math.isfinite(b_ref) and b_ref > 0),
            f"--cbs-reference-batch must be a positive batch size, got {b_ref}.")
    require(space in FIT_SPACES, f"--fit must be one of {', '.join(FIT_SPACES)}, got '{space}'.")


def analyze_runs(dirs: Sequence[str | Path], *, targets: Sequence[float] | None = None, fixed_tokens: bool = False,
                 n_boot: int = 2000, b_ref: float | None = None, space: str = "wls", read: str = "auto",
                 methods: Sequence[str] | None = None, fixed_tokens_at: int | None = None) -> dict:
    """Analyse run directories (or parents holding them) and run archives (`runs.jsonl.gz` of a
    committed analysis, gn.studies.run_archive): see the module docstring. `methods`: only the
    runs of these (sweep) method names; ConfigError naming any that no run has. `fixed_tokens_at`:
    the fixed-token table read at that many tokens instead of each run's last evaluation
    (inputs.loss_at_tokens)."""
    _check_options(b_ref, space)
    require(fixed_tokens_at is None or (isinstance(fixed_tokens_at, int) and fixed_tokens_at > 0),
            f"--fixed-tokens-at must be a positive token count, got {fixed_tokens_at}.")
    runs = load_runs(dirs, read)      # ConfigError for an unknown `read` before any file is read
    if methods:
        missing = sorted(set(methods) - {r["method"] for r in runs})
        require(not missing, f"--methods: no run of {', '.join(missing)} among the inputs "
                             f"(they hold {', '.join(sorted({r['method'] for r in runs}))}).")
        runs = [r for r in runs if r["method"] in set(methods)]
    ts = _targets_for(runs, targets)
    rows = [row for run in runs for row in run_rows(run, ts)]
    out = analyze_rows(rows, [target_key(t) for t in ts], source={"kind": "runs", "dirs": [r["dir"] for r in runs]},
                       n_boot=n_boot, b_ref=b_ref, space=space)
    for m, res in out["methods"].items():
        res["n_runs"] = sum(r["method"] == m for r in runs)
        res["n_diverged"] = sum(r["method"] == m and r["diverged"] for r in runs)
    out["counts"] = {"runs": len(runs), "diverged": sum(r["diverged"] for r in runs)}
    cut = cut_runs(runs, ts)
    if cut:
        out["counts"]["stopped before this reading crossed"] = len(cut)
        out["cut_runs"] = cut
        warnings.warn(f"{len(cut)} run(s) stopped at the targets of another reading before this one ({read}) "
                      f"crossed every target, and count as not reached here: {', '.join(cut[:3])}"
                      f"{' ...' if len(cut) > 3 else ''}; rerun their sweep to continue them (train.stop_reads: all)",
                      stacklevel=2)
    if fixed_tokens or fixed_tokens_at:
        out["fixed_tokens"] = fixed_token_table(runs, fixed_tokens_at)
        if fixed_tokens_at:
            out["fixed_tokens_at"] = fixed_tokens_at
    out["_runs"] = runs   # curves for the plots; dropped from analysis.json
    return out


def cut_runs(runs: list[dict], targets: Sequence[float]) -> list[str]:
    """Runs stopped for "targets_reached" by another reading (the EMA's, before `gn sweep` waited for
    both) while the one read here had not reached every target: unreached here by the stop, not by
    the method."""
    out = []
    for r in runs:
        if r.get("stop_reason") != "targets_reached":
            continue
        vals = [e[r["read_from"]] for e in r["evals"] if e.get(r["read_from"]) is not None]
        if vals and min(vals) > min(targets):
            out.append(r["dir"])
    return out


def fixed_token_table(runs: list[dict], at_tokens: int | None = None) -> dict:
    """Final validation loss against batch size per method, at the best lr by
    mean final loss over seeds (diverged runs count as worst), with its Student-t
    95 % interval over seeds and, per batch, the difference to that batch's best
    method paired by seed (the same data order and the same validation sequences,
    so the seed-to-seed spread the two share cancels). `at_tokens`: read every run
    at that budget (inputs.loss_at_tokens) rather than at its last evaluation."""
    def loss(r):
        return _final_loss(r) if at_tokens is None else loss_at_tokens(r, at_tokens)

    def tokens_of(r):
        return at_tokens if at_tokens is not None else (r["evals"][-1].get("tokens") if r["evals"] else None)

    rows = [{k: r[k] for k in ("method", "batch_size", "learning_rate", "seed")} |
            {"final_val_loss": loss(r), "tokens": tokens_of(r),
             "read_from": r.get("read_from", "val_loss")}
            for r in runs]
    out = {}
    for b in cbs.best_per_batch(rows, "final_val_loss"):
        toks = [r["tokens"] for r in b["rows"] if r["tokens"] is not None]
        st = intervals.t_interval([v for v in b["values"] if v is not None])
        out.setdefault(b["method"], []).append(
            {"batch_size": b["batch_size"], "learning_rate": b["learning_rate"], "final_val_loss_mean": b["mean"],
             "final_val_loss_se": b["se"], "final_val_loss_ci": st["ci"], "final_val_loss": b["values"],
             "seeds": b["seeds"], "n_seeds": b["n_seeds"], "n_diverged": b["n_seeds"] - b["n_reached"],
             "tokens_max": max(toks) if toks else None, "lr_at_edge": b["lr_at_edge"], "edge": b["edge"],
             "tied_lrs": b["tied_lrs"], "read_from": b["rows"][0]["read_from"], "vs_best": None})
    _paired_to_best(out)
    return out


def _paired_to_best(table: dict) -> None:
    """Set each entry's `vs_best`: its final loss minus that of the batch's lowest-mean method, over the
    seeds both have (paired), with a Student-t 95 % interval; None for the best itself."""
    by_batch = defaultdict(list)
    for m, es in table.items():
        for e in es:
            by_batch[e["batch_size"]].append((m, e))
    for mes in by_batch.values():
        finite = [(m, e) for m, e in mes if e["final_val_loss_mean"] is not None]
        if not finite:
            continue
        ref_m, ref = min(finite, key=lambda me: me[1]["final_val_loss_mean"])
        ref_v = {s: v for s, v in zip(ref["seeds"], ref["final_val_loss"]) if v is not None}
        for m, e in mes:
            if m == ref_m:
                continue
            mine = {s: v for s, v in zip(e["seeds"], e["final_val_loss"]) if v is not None}
            d = intervals.t_interval([mine[s] - ref_v[s] for s in sorted(set(mine) & set(ref_v))])
            e["vs_best"] = {"method": ref_m, "diff_mean": d["mean"], "diff_ci": d["ci"], "n_pairs": d["n"]}


def analyze_table(csv_path: str | Path, *, targets: Sequence[float] | None = None, n_boot: int = 2000,
                  b_ref: float | None = None, space: str = "wls") -> dict:
    """Analyse a steps-to-target CSV; targets are keyed exactly as written in it."""
    _check_options(b_ref, space)
    rows = read_table(csv_path)
    ts = list(dict.fromkeys(r["target"] for r in rows))
    if targets:
        ts = [t for t in ts if any(math.isclose(float(t), float(x)) for x in targets)]
        require(bool(ts), f"none of --targets {list(targets)} is in the table's target column.")
    out = analyze_rows(rows, ts, source={"kind": "table", "path": str(csv_path)}, n_boot=n_boot, b_ref=b_ref,
                       space=space)
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
    """Write analysis.json, report.md, the plots and, for an analysis of runs, their archive
    (runs.jsonl.gz: what a later analysis needs of every run, gn.studies.run_archive) into
    `out`; returns the files written. A failing plot warns and is skipped."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "analysis.json").write_text(json.dumps(to_json(result), indent=2))
    write_report(result, out / "report.md")
    files = [out / "analysis.json", out / "report.md"]
    if "_runs" in result:
        files.append(write_archive(result["_runs"], out / ARCHIVE_NAME))
    try:
        files += write_plots(result, out)
    except Exception as exc:  # plots are a convenience; the JSON and the report must survive
        warnings.warn(f"could not write the analysis plots: {exc}", stacklevel=2)
    return files
