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


def _best_section(result: dict) -> list[str]:
    lines = ["## Best learning rate per method and batch size", "",
             "Steps to target at the best lr (mean ± s.e. over seeds; unreached seeds are left out of the mean "
             "and counted). `edge` marks a best lr at the low/high end of that batch's grid: widen the grid.", ""]
    for t in result["targets"]:
        rows = []
        for m, res in result["methods"].items():
            for e in res["targets"].get(t, {}).get("best", []):
                se = f" ± {_f(e['steps_se'], '.3g')}" if e["steps_se"] is not None else ""
                rows.append([m, _f(e["batch_size"], "g"), _f(e["learning_rate"], ".3g"),
                             _f(e["steps_mean_reached"]) + se, f"{e['n_reached']}/{e['n_seeds']}",
                             _f(e.get("tokens_mean")), e["edge"] or ""])
        lines += [f"### target {t}", ""]
        lines += _table(["method", "batch", "best lr", "steps", "reached", "tokens", "edge"], rows)
    return lines


def _fit_section(result: dict) -> list[str]:
    lines = ["## Critical batch size", "",
             "McCandlish et al. (2018) fit S(B) = S_min + E_min/B, B_crit = E_min/S_min, with a 95% bootstrap "
             "interval over seeds and learning-rate grid points (each replicate resamples both and refits). "
             "The Zhang et al. (2024) CBS (steps 20% above linear scaling from the smallest "
             "batch) is a different quantity: do not compare it with B_crit.", ""]
    rows = []
    for m, res in result["methods"].items():
        for t, r in res["targets"].items():
            fit, z = r["fit"], r["zhang_cbs"]
            zc = _f(z["cbs"], ".4g") if z["cbs"] is not None else ("> grid" if z["above_grid"] else "–")
            rows.append([m, t, f"{_f(fit['S_min'])} {_ci(fit.get('S_min_ci'))}",
                         f"{_f(fit['E_min'])} {_ci(fit.get('E_min_ci'))}",
                         f"{_f(fit['B_crit'])} {_ci(fit.get('B_crit_ci'))}", zc, fit["note"] or "ok"])
    return lines + _table(["method", "target", "S_min [95% CI]", "E_min [95% CI]", "B_crit (McCandlish) [95% CI]",
                           "CBS (Zhang, 20%)", "fit"], rows)


def _ratio_section(result: dict) -> list[str]:
    lines = ["## Step ratios between methods", "",
             "steps(a)/steps(b) at each batch size, best lr of each (mean over reached seeds).", ""]
    any_rows = False
    for t, pairs in result["ratios"].items():
        batches = sorted({float(b) for r in pairs.values() for b in r})
        if not batches:
            continue
        any_rows = True
        lines += [f"### target {t}", ""]
        lines += _table(["a/b"] + [f"B={b:g}" for b in batches],
                        [[p] + [_f(r.get(f"{b:g}"), ".3g") for b in batches] for p, r in pairs.items()])
    return lines if any_rows else lines + ["(no batch size where two methods both reached a target)", ""]


def _fixed_section(result: dict) -> list[str]:
    lines = ["## Fixed token budget", "",
             "Final validation loss per batch size at the best lr by mean final loss (diverged runs count as "
             "worst).", ""]
    rows = [[m, _f(e["batch_size"], "g"), _f(e["learning_rate"], ".3g"),
             _f(e["final_val_loss_mean"]) + (f" ± {_f(e['final_val_loss_se'], '.3g')}"
                                             if e["final_val_loss_se"] else ""),
             e["n_diverged"], _f(e["tokens_max"]), e["edge"] or ""]
            for m, es in result["fixed_tokens"].items() for e in es]
    lines += _table(["method", "batch", "best lr", "final val loss", "diverged", "tokens", "edge"], rows)
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
    lines += _best_section(result) + _fit_section(result) + _ratio_section(result)
    if result.get("fixed_tokens"):
        lines += _fixed_section(result)
    return "\n".join(lines)


def write_report(result: dict, path: str | Path) -> None:
    """Write `render_report(result)` to `path`."""
    Path(path).write_text(render_report(result))
