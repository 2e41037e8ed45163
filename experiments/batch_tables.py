"""Markdown tables for docs/results.md from `gn analyze` outputs and run directories.

    python experiments/batch_tables.py cbs ANALYSIS.json             # B_crit per method and target
    python experiments/batch_tables.py large ANALYSIS.json B RUNDIR...  # the large-batch table at batch B
    python experiments/batch_tables.py cost RUNDIR...                # compute time of each experiment
    python experiments/batch_tables.py fixed ANALYSIS.json           # final loss per method and batch
    python experiments/batch_tables.py steps ANALYSIS.json TARGET    # steps to target per method and batch
    python experiments/batch_tables.py units A.json[:m1+m2][,B.json] TARGET [REF[,REF2]]  # every unit per method
        # and batch (the methods of several analyses, or some of them), ratios to each REF
    python experiments/batch_tables.py predict FIT.json[,..] MEASURED.json[,..] TARGET  # a fitted S(B) against
        # the steps measured at a batch it was not fitted on

Numbers are read, never typed: each table is printed from the analysis JSON (and, for
wall time and updates, from the runs' summary.json).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

from gn.studies.cbs import crossing_axes


def _ci(ci) -> str:
    if not ci or ci[0] is None:
        return "–"
    return "[" + ", ".join("∞" if (x is None or not math.isfinite(x)) else f"{x:.3g}" for x in ci) + "]"


def cbs_table(analysis: dict) -> str:
    rows = ["| method | target | S_min | E_min (seq) | B_crit (McCandlish) [95% CI] | CBS (Zhang, 20%) |",
            "|---|---|---|---|---|---|"]
    for m, res in analysis["methods"].items():
        for t, r in res["targets"].items():
            f, z = r["fit"], r["zhang_cbs"]
            if f.get("S_min") is None:
                rows.append(f"| {m} | {t} | – | – | – ({f.get('note', '')}) | – |")
                continue
            bc = f"{f['B_crit']:.3g}" if f.get("B_crit") else "–"
            zc = f"{z['cbs']:.3g}" if z.get("cbs") else ("> grid" if z.get("above_grid") else "–")
            rows.append(f"| {m} | {t} | {f['S_min']:.3g} | {f['E_min']:.4g} | {bc} {_ci(f.get('B_crit_ci'))} | {zc} |")
    return "\n".join(rows)


def _mean_se(xs: list[float]) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    m = statistics.fmean(xs)
    if len(xs) == 1:
        return f"{m:.3g} (n=1)"
    return f"{m:.3g} ± {statistics.stdev(xs) / math.sqrt(len(xs)):.2g} (n={len(xs)})"


def _crossings(rundir: str, target: float) -> dict:
    """Outer steps, updates, tokens, grad evals and wall time at the interpolated crossing."""
    rows = [json.loads(x) for x in (Path(rundir) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    evals = [r for r in rows if r.get("val_loss") is not None]
    axes = {k: [r.get(k) for r in evals] for k in ("outer_step", "updates", "tokens", "grad_evals", "wall_time_s")}
    return crossing_axes(axes, [r["val_loss"] for r in evals], target)


def large_table(analysis: dict, batch: float, rundirs: list[str]) -> str:
    """Per method: its best lr at `batch` and, over the seeds run at that lr, the mean ± s.e. of
    outer steps to each target and updates, tokens, gradient evaluations and wall time to the last,
    all interpolated between the evaluations around the crossing."""
    summaries = [json.loads(p.read_text()) | {"_dir": str(p.parent)} for d in rundirs
                 for p in Path(d).rglob("summary.json")]
    records = {str(p.parent): json.loads(p.read_text()) for d in rundirs for p in Path(d).rglob("sweep_run.json")}
    targets = sorted({t for res in analysis["methods"].values() for t in res["targets"]}, key=float, reverse=True)
    head = "| method | lr | " + " | ".join(f"outer steps to {t}" for t in targets) + \
           f" | updates to {targets[-1]} | tokens to {targets[-1]} | grad evals to {targets[-1]} | " \
           f"wall s to {targets[-1]} |"
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for m, res in analysis["methods"].items():
        best = [e for e in res["targets"][targets[-1]]["best"] if e["batch_size"] == batch]
        if not best:
            continue
        lr = best[0]["learning_rate"]
        mine = [s for s in summaries if records.get(s["_dir"], {}).get("method") == m
                and records[s["_dir"]].get("batch_size") == batch
                and math.isclose(records[s["_dir"]].get("learning_rate", -1), lr, rel_tol=1e-4)]
        cells = [f"{m}", f"{lr:.3g}"]
        hits = {t: [_crossings(s["_dir"], float(t)) for s in mine] for t in targets}
        for t in targets:
            cells.append(_mean_se([h["outer_step"] for h in hits[t]]))
        for axis in ("updates", "tokens", "grad_evals", "wall_time_s"):
            cells.append(_mean_se([h[axis] for h in hits[targets[-1]]]))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def cost(rundirs: list[str]) -> str:
    out = []
    for d in rundirs:
        sums = [json.loads(p.read_text()) for p in Path(d).rglob("summary.json")]
        wall = sum(s.get("wall_time_s", 0) for s in sums)
        comp = sum(s.get("compile_time_s", 0) for s in sums)
        out.append(f"{d}: {len(sums)} runs, {wall / 60:.1f} min of steps + {comp / 60:.1f} min compiling")
    return "\n".join(out)


def fixed_table(analysis: dict) -> str:
    """Final validation loss per method (rows) and batch size (columns) at the fixed token budget: each
    cell its mean [Student-t 95 %] (n seeds, best lr; "edge" where that lr is the grid's edge), then the
    difference to the batch's best method paired by seed, or "best"."""
    ft = analysis["fixed_tokens"]
    batches = sorted({e["batch_size"] for es in ft.values() for e in es})
    rows = ["| method | " + " | ".join(f"B = {b:g}" for b in batches) + " |", "|---|" + "---|" * len(batches)]

    def cell(e: dict | None) -> str:
        if e is None or e["final_val_loss_mean"] is None:
            return "–"
        txt = f"{e['final_val_loss_mean']:.3f} {_ci(e.get('final_val_loss_ci'))} (n = {e['n_seeds']}, " \
              f"lr {e['learning_rate']:.3g}{', ' + e['edge'] if e.get('edge') else ''})"
        vb = e.get("vs_best")
        if vb is None:
            return txt + "; best"
        return txt + f"; Δ {vb['diff_mean']:+.3f} {_ci(vb['diff_ci'])} vs {vb['method']}"

    for m, es in ft.items():
        by = {e["batch_size"]: e for e in es}
        rows.append(f"| {m} | " + " | ".join(cell(by.get(b)) for b in batches) + " |")
    return "\n".join(rows)


def steps_table(analysis: dict, target: str) -> str:
    """Steps to `target` (best lr, interpolated) per method and batch size."""
    ms = analysis["methods"]
    batches = sorted({e["batch_size"] for r in ms.values() for e in r["targets"].get(target, {}).get("best", [])})
    rows = ["| method | " + " | ".join(f"B={b:g}" for b in batches) + " |", "|---|" + "---|" * len(batches)]
    for m, r in ms.items():
        by = {e["batch_size"]: e for e in r["targets"].get(target, {}).get("best", [])}
        cells = []
        for b in batches:
            e = by.get(b)
            if e is None or e.get("steps_mean_reached") is None:
                cells.append("–")
            else:
                cells.append(f"{e['steps_mean_reached']:.3g}" + (f" ({e['edge']})" if e.get("edge") in ("low", "high") else ""))
        rows.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


UNIT_COLUMNS = (("outer_steps", "outer steps"), ("updates", "sequential updates"), ("compute", "compute (seq fwd-bwd)"))


def _cell(u: dict | None) -> str:
    if not u or u.get("mean") is None:
        return "–"
    ci = u.get("ci") or [None, None]
    return f"{u['mean']:.3g}" + (f" {_ci(ci)}" if ci[0] is not None else "")


def read_analysis(arg: str) -> dict:
    """`PATH` or `PATH:m1+m2` (only those methods, e.g. to take AdamW from one study and GN from another)."""
    path, _, keep = arg.partition(":")
    a = json.loads(Path(path).read_text())
    if keep:
        missing = [m for m in keep.split("+") if m not in a["methods"]]
        if missing:
            raise SystemExit(f"{path} has no method {', '.join(missing)} (it has {', '.join(a['methods'])})")
        a = {**a, "methods": {m: a["methods"][m] for m in keep.split("+")}}
    return a


def merge_best(analyses: list[dict], target: str) -> dict:
    """{method: {batch: best-lr entry}} from several analyses (e.g. one study's batches analysed apart);
    the same method at the same batch in two of them is ambiguous and refused."""
    best: dict = {}
    for a in analyses:
        for m, r in a["methods"].items():
            for e in r["targets"].get(target, {}).get("best", []):
                if e["batch_size"] in best.setdefault(m, {}):
                    raise SystemExit(f"{m} at B = {e['batch_size']:g} is in two analyses: give each cell once")
                best[m][e["batch_size"]] = e
    return best


def units_table(analyses: dict | list[dict], target: str, references: str | list[str] | None = None) -> str:
    """Per method and batch at the best lr: n reached/run, outer steps, sequential updates and compute
    to `target` (mean [Student-t 95 %] over seeds), and each unit's ratio to each of `references`
    (e.g. AdamW and the small-batch control) at the same batch ("–" where the reference has no cell)."""
    analyses = [analyses] if isinstance(analyses, dict) else analyses
    refs = [references] if isinstance(references, str) else list(references or [])
    best = merge_best(analyses, target)
    head = ["method", "B", "lr", "n"] + [name for _, name in UNIT_COLUMNS]
    for ref in refs:
        head += [f"{name.split(' ')[0]} / {ref}" for _, name in UNIT_COLUMNS]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in best:
        for B, e in sorted(best[m].items()):
            units = e.get("units") or {}
            lr = f"{e['learning_rate']:.3g}" + (f" ({e['edge']})" if e.get("edge") in ("low", "high") else "")
            cells = [m, f"{B:g}", lr, f"{e.get('n_reached', 0)}/{e.get('n_seeds', 0)}"]
            cells += [_cell(units.get(k)) for k, _ in UNIT_COLUMNS]
            for ref in refs:
                r = best.get(ref, {}).get(B)
                for k, _ in UNIT_COLUMNS:
                    a = (units.get(k) or {}).get("mean")
                    b = ((r or {}).get("units", {}).get(k) or {}).get("mean")
                    cells.append(f"{a / b:.3g}" if a and b else "–")
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def predict_table(fits: list[dict], measured: list[dict], target: str) -> str:
    """A fitted McCandlish curve against a batch it was not fitted on: per method, S(B) = S_min + E_min / B
    from `fits` in outer steps (the range from the marginal 95 % intervals of S_min and E_min, wider than the joint one
    because the two are anti-correlated) beside the measured steps at B (mean [Student-t 95 %], n)."""
    rows = ["| method | B | fitted on | predicted S(B) [range] | measured [95 %] | n | measured / predicted |",
            "|---|---|---|---|---|---|---|"]
    meas = merge_best(measured, target)
    for a in fits:
        for m, r in a["methods"].items():
            t = r["targets"].get(target) or {}
            # The fit in outer steps, the unit of the measured column (a method's own "steps" fit is in
            # its updates when it makes several per outer step, as the control at N = 8 does).
            f = (t.get("fits") or {}).get("outer_steps") or t.get("fit") or {}
            if f.get("S_min") is None or m not in meas:
                continue
            fitted = sorted(e["batch_size"] for e in t.get("best", []))
            lo = (f.get("S_min_ci") or [None])[0], (f.get("E_min_ci") or [None])[0]
            hi = (f.get("S_min_ci") or [None, None])[1], (f.get("E_min_ci") or [None, None])[1]
            for B, e in sorted(meas[m].items()):
                if B in fitted:
                    continue
                pred = f["S_min"] + f["E_min"] / B
                rng = (f"[{lo[0] + lo[1] / B:.3g}, {hi[0] + hi[1] / B:.3g}]"
                       if None not in lo + hi else "")
                u = (e.get("units") or {}).get("outer_steps") or {}
                if u.get("mean") is None:
                    continue
                rows.append(f"| {m} | {B:g} | {'/'.join(f'{b:g}' for b in fitted)} ({f.get('unit', 'steps')}) | "
                            f"{pred:.3g} {rng} | {_cell(u)} | {u.get('n', '')} | {u['mean'] / pred:.3f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    kind, *rest = sys.argv[1:]
    if kind == "cbs":
        print(cbs_table(json.loads(Path(rest[0]).read_text())))
    elif kind == "large":
        print(large_table(json.loads(Path(rest[0]).read_text()), float(rest[1]), rest[2:]))
    elif kind == "cost":
        print(cost(rest))
    elif kind == "fixed":
        print(fixed_table(json.loads(Path(rest[0]).read_text())))
    elif kind == "units":
        print(units_table([read_analysis(p) for p in rest[0].split(",")], rest[1],
                          rest[2].split(",") if len(rest) > 2 else None))
    elif kind == "predict":
        print(predict_table([read_analysis(p) for p in rest[0].split(",")],
                            [read_analysis(p) for p in rest[1].split(",")], rest[2]))
    elif kind == "steps":
        print(steps_table(json.loads(Path(rest[0]).read_text()), rest[1]))
