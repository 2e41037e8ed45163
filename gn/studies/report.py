"""Markdown report of a `gn analyze` result (see gn.studies.analyze)."""

from __future__ import annotations

import math
from pathlib import Path


def _f(x, spec: str = ".4g") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "inf" if isinstance(x, float) and x > 0 else "–"
    return format(x, spec)


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(head: list[str], rows: list[list]) -> list[str]:
    return [_row(head), _row(["---"] * len(head)), *(_row(r) for r in rows), ""]


def _ci(ci) -> str:
    if not ci or ci[0] is None:
        return "–"
    return f"[{_f(ci[0])}, {_f(ci[1])}]"


# units shown in the cost tables, in order, with short headers
COST_UNITS = (("steps", "own steps"), ("outer_steps", "outer steps"), ("updates", "seq. updates"), ("compute", "compute (seq. fwd-bwd)"),
              ("tokens", "tokens"), ("aux_tokens", "aux tokens"), ("wall_time_s", "wall s"))


def _mci(st: dict | None, spec: str = ".4g") -> str:
    """mean [t-interval] (n), or the single value."""
    if not st or st.get("mean") is None:
        return "–"
    if st.get("ci") and st["ci"][0] is not None:
        return f"{_f(st['mean'], spec)} [{_f(st['ci'][0], spec)}, {_f(st['ci'][1], spec)}]"
    return _f(st["mean"], spec)


def _edge_text(e: dict) -> str:
    """The edge column: a best lr at its grid's end, or the lrs tied with it (best_per_batch)."""
    ties = e.get("tied_lrs") or []
    tie = "tie " + "/".join(_f(t, ".3g") for t in ties) if ties else ""
    return " ".join(x for x in (e.get("edge") or "", tie) if x)


def _best_section(result: dict) -> list[str]:
    lines = ["## Costs to target in every unit", "",
             "At each batch's best lr (chosen by the method's own steps): mean over the seeds that reached, with a "
             "Student-t 95% interval; `reached` is seeds reached / run. Crossing: `whole` = first evaluation at or "
             "below the target (a method that moves only at whole outer steps), `interp` = linear between "
             "evaluations. `wide` counts runs whose crossing bracket exceeds the stated limit (see Definitions): "
             "their value is set by the evaluation cadence. `edge` marks a best lr at the end of its grid; `tie` lists "
             "the lrs whose cost equals the best's (the one with the most seeds is reported, then the lowest; an "
             "inside lr among them drops the edge flag).", ""]
    for t in result["targets"]:
        rows = []
        for m, res in result["methods"].items():
            for e in res["targets"].get(t, {}).get("best", []):
                u = e.get("units") or {}
                wide = (u.get("steps") or {}).get("n_wide", 0)
                rule = {"first_at_or_below": "whole", "interpolated": "interp"}.get(e.get("crossing_rule"), "–")
                rows.append([m, _f(e["batch_size"], "g"), _f(e["learning_rate"], ".3g"),
                             f"{e['n_reached']}/{e['n_seeds']}", *[_mci(u.get(k)) for k, _ in COST_UNITS], rule,
                             wide or "", _edge_text(e)])
        head = ["method", "batch", "best lr", "reached", *[h for _, h in COST_UNITS], "crossing", "wide", "edge"]
        # drop unit columns no row has (a table carries only steps, maybe tokens)
        keep = [j for j in range(len(head)) if j < 4 or j >= 4 + len(COST_UNITS) or any(r[j] != "–" for r in rows)]
        lines += [f"### target {t}", ""]
        lines += _table([head[j] for j in keep], [[r[j] for j in keep] for r in rows])
    return lines


def _ci_kind(method: str | None) -> str:
    if not method:
        return "–"
    return next((k for k in ("seed bootstrap", "residual bootstrap") if method.startswith(k)), "none")


def _warn_text(diag: dict) -> str:
    return "; ".join(w["text"] for w in diag.get("warnings", [])) or "–"


def _fit_section(result: dict) -> list[str]:
    lines = ["## Critical batch size, per unit", "",
             "McCandlish et al. (2018) S(B) = S_min + E_min/B, B_crit = E_min/S_min, fitted in each step unit. "
             "`claimed: no` where the method's sequential updates per outer step grow with B (the count falls as "
             "1/B by construction there): the fitted number is shown in parentheses and is not a B_crit. "
             "Intervals are 95% (method in column `CI`). Zhang et al.'s CBS (from the fit, with its reference "
             "batch) is a different quantity from B_crit.", ""]
    rows = []
    for m, res in result["methods"].items():
        for t, r in res["targets"].items():
            for unit, fit in (r.get("fits") or {"steps": r["fit"]}).items():
                bc = f"{_f(fit['B_crit'])} {_ci(fit.get('B_crit_ci'))}"
                if not fit.get("claimed", True):
                    bc = f"({bc}) not claimed"
                z = fit.get("zhang_cbs") or {}
                zc = (f"{_f(z.get('cbs'))} {_ci(z.get('cbs_ci'))} @B_ref={_f(z.get('B_ref'), 'g')}"
                      if z.get("cbs") is not None else "–")
                diag = fit.get("diagnostics") or {}
                res_txt = " / ".join(f"{100 * v['rel']:+.1f}%" for v in (diag.get("residuals") or {}).values()) or "–"
                rows.append([m, t, unit, f"{_f(fit['S_min'])} {_ci(fit.get('S_min_ci'))}", bc,
                             _ci_kind(fit.get("ci_method")), zc, res_txt,
                             _f(diag.get("rel_rms"), ".2g"), _warn_text(diag)])
    lines += _table(["method", "target", "unit", "S_min [95% CI]", "B_crit [95% CI]", "CI", "CBS (Zhang, fit)",
                     "residuals by B", "rel. RMS", "warnings"], rows)
    raw = [[m, t, _f(r["zhang_cbs_raw"]["cbs"]) if r.get("zhang_cbs_raw", {}).get("cbs") is not None else
            ("> grid" if r.get("zhang_cbs_raw", {}).get("above_grid") else "–")]
           for m, res in result["methods"].items() for t, r in res["targets"].items() if "zhang_cbs_raw" in r]
    if raw:
        lines += ["Raw-data variant of Zhang's CBS (measured steps interpolated from the smallest batch; not "
                  "their computation):", ""] + _table(["method", "target", "CBS (raw variant)"], raw)
    return lines


def _ratio_section(result: dict) -> list[str]:
    lines = ["## Cost ratios between methods, per unit", "",
             "cost(a)/cost(b) at each batch size, best lr of each (mean over reached seeds), in every unit: a "
             "method's advantage in outer steps need not survive in sequential updates or compute.", ""]
    by_unit = result.get("ratios_by_unit") or {t: {"steps": p} for t, p in result["ratios"].items()}
    any_rows = False
    for t, units in by_unit.items():
        for unit, pairs in units.items():
            batches = sorted({float(b) for r in pairs.values() for b in r})
            if not batches or unit in ("steps", "grad_evals"):
                continue
            any_rows = True
            lines += [f"### target {t}, {unit}", ""]
            lines += _table(["a/b"] + [f"B={b:g}" for b in batches],
                            [[p] + [_f(r.get(f"{b:g}"), ".3g") for b in batches] for p, r in pairs.items() if r])
    if not any_rows:   # a table has only each method's own steps
        for t, pairs in result["ratios"].items():
            batches = sorted({float(b) for r in pairs.values() for b in r})
            if batches:
                any_rows = True
                lines += [f"### target {t}, steps", ""]
                lines += _table(["a/b"] + [f"B={b:g}" for b in batches],
                                [[p] + [_f(r.get(f"{b:g}"), ".3g") for b in batches] for p, r in pairs.items()])
    return lines if any_rows else lines + ["(no batch size where two methods both reached a target)", ""]


def _definitions(result: dict) -> list[str]:
    d = result.get("definitions") or {}
    lines = ["## Definitions", ""]
    for k in ("fit", "interval", "crossing", "zhang_cbs"):
        if k in d:
            lines.append(f"- **{k}**: {d[k]}")
    for u, text in (d.get("units") or {}).items():
        lines.append(f"- unit `{u}`: {text}")
    reads = sorted({e.get("read_from") for res in result["methods"].values() for r in res["targets"].values()
                    for e in r["best"] if e.get("read_from")})
    if reads:
        lines.append(f"- crossings read from: {', '.join(reads)}")
    return lines + [""]


def _ci_text(mean, ci, n: int) -> str:
    """`_mci` of a mean and its interval, with its n."""
    return "–" if mean is None else f"{_mci({'mean': mean, 'ci': ci})} (n = {n})"


def _fixed_section(result: dict) -> list[str]:
    reads = {e.get("read_from") for es in result["fixed_tokens"].values() for e in es} - {None}
    at = result.get("fixed_tokens_at")
    lines = ["## Fixed token budget" + (f": {at:,} tokens, read from each run's evaluation there" if at else ""), "",
             "Final validation loss per batch size at the best lr by mean final loss over seeds (diverged runs "
             f"count as worst; read from {', '.join(sorted(reads)) or 'val_loss'}), mean [Student-t 95 %] (n seeds); "
             "Δ: minus the batch's best method, paired by seed (same data order, same validation sequences), "
             "mean [Student-t 95 %] (n pairs). A Δ interval that contains 0 does not separate the two.", ""]
    rows = []
    for m, es in result["fixed_tokens"].items():
        for e in es:
            vb = e.get("vs_best")
            delta = "best" if vb is None and e["final_val_loss_mean"] is not None else "–" if vb is None else \
                _ci_text(vb["diff_mean"], vb["diff_ci"], vb["n_pairs"]) + f" vs {vb['method']}"
            rows.append([m, _f(e["batch_size"], "g"), _f(e["learning_rate"], ".3g"),
                         _ci_text(e["final_val_loss_mean"], e.get("final_val_loss_ci"), e["n_seeds"]), delta,
                         e["n_diverged"], _f(e["tokens_max"]), _edge_text(e)])
    lines += _table(["method", "batch", "best lr", "final val loss", "Δ to the batch's best", "diverged", "tokens",
                     "edge"], rows)
    for m, es in result["fixed_tokens"].items():
        toks = [e["tokens_max"] for e in es if e["tokens_max"]]
        # the comparison only means something at one budget; say so rather than silently mixing budgets
        if toks and max(toks) > 1.05 * min(toks):
            lines += [f"Warning: {m}'s runs end at different token counts ({min(toks):.4g} to {max(toks):.4g}); "
                      "this is not a fixed-token comparison.", ""]
    return lines


def render_report(result: dict) -> str:
    """The report as markdown text."""
    src = result["source"]
    what = src.get("path") if src["kind"] == "table" else f"{len(src['dirs'])} run directories"
    counts = ", ".join(f"{k}: {v}" for k, v in result.get("counts", {}).items())
    lines = ["# Critical-batch-size analysis", "", f"Input: {what} ({counts}).", ""]
    div = {m: r.get("n_diverged") for m, r in result["methods"].items() if r.get("n_diverged")}
    if div:
        lines += ["Diverged runs (counted as not reached): " + ", ".join(f"{m} {n}" for m, n in div.items()), ""]
    if result.get("cut_runs"):
        lines += [f"Stopped before this reading crossed every target (another reading stopped them; counted as not "
                  f"reached; rerun the sweep to continue them): {len(result['cut_runs'])} runs, "
                  + ", ".join(Path(d).name for d in result["cut_runs"]), ""]
    lines += _best_section(result) + _fit_section(result) + _ratio_section(result)
    if result.get("fixed_tokens"):
        lines += _fixed_section(result)
    lines += _definitions(result)
    return "\n".join(lines)


def write_report(result: dict, path: str | Path) -> None:
    """Write `render_report(result)` to `path`."""
    Path(path).write_text(render_report(result))
