"""Validation loss after each outer step, per method and learning rate, with seed-paired differences.

Whole-step methods (GN) cross a target only at whole outer steps, so two variants that both need 3
outer steps are tied at that resolution however different their losses are. This reads, for every
(method, batch, lr) cell of the given run directories, the validation loss after outer step k (raw or
EMA), its mean and Student-t 95 % interval over seeds (gn.studies.intervals.t_interval), and, against
a reference cell, the difference paired by seed (same seed = same training stream, same validation
set) with its t-interval. The paired s.e. of the validation set itself (experiments/val_resolution.py)
bounds what a difference can resolve.

    python experiments/loss_at_steps.py runs/paper_vs_defaults runs/large_batch_v2 --methods gn,gn_paper \\
        --reference gn:0.02 --steps 1,2,3 --out experiments/results/paper_vs_defaults/loss_at_steps.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from gn.studies.run_archive import load_runs
from gn.studies.intervals import t_interval


def loss_after(run: dict, step: int, key: str) -> float | None:
    """The validation loss logged at outer step `step` (None when the run did not evaluate there)."""
    for r in run["evals"]:
        if round(float(r.get("outer_step", r.get("step", -1))), 6) == step:
            return float(r[key])
    return None


def cells(dirs: list[str], methods: set[str] | None) -> dict:
    out: dict = defaultdict(dict)
    for run in load_runs(dirs, read="raw"):   # run directories or run archives (runs.jsonl.gz)
        if methods and run["method"] not in methods:
            continue
        out[(run["method"], run["batch_size"], run["learning_rate"])][run["seed"]] = run
    return out


def table(by_cell: dict, steps: list[int], key: str, reference: tuple[str, float] | None) -> list[dict]:
    ref = None
    if reference is not None:
        ref = next((runs for (m, _, lr), runs in by_cell.items()
                    if m == reference[0] and abs(lr - reference[1]) <= 1e-9 * max(1.0, lr)), None)
        if ref is None:
            raise SystemExit(f"--reference {reference[0]}:{reference[1]} names no cell of the runs")
    rows = []
    for (m, B, lr), runs in sorted(by_cell.items()):
        row = {"method": m, "batch_size": B, "learning_rate": lr, "seeds": sorted(runs), "read": key, "steps": {}}
        for k in steps:
            vals = {s: loss_after(r, k, key) for s, r in runs.items()}
            entry = {"loss": t_interval([v for v in vals.values() if v is not None])}
            if ref is not None:
                diffs = [vals[s] - loss_after(ref[s], k, key) for s in vals
                         if s in ref and vals[s] is not None and loss_after(ref[s], k, key) is not None]
                entry["minus_reference"] = t_interval(diffs)
            row["steps"][str(k)] = entry
        rows.append(row)
    return rows


def _fmt(t: dict) -> str:
    if t["mean"] is None:
        return "–"
    if t["ci"][0] is None:
        return f"{t['mean']:.4f} (n 1)"
    return f"{t['mean']:.4f} [{t['ci'][0]:.4f}, {t['ci'][1]:.4f}] (n {t['n']})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--methods", help="comma-separated method names to keep (default: all)")
    ap.add_argument("--steps", default="1,2,3", help="outer steps, e.g. 1,2,3")
    ap.add_argument("--read", choices=("raw", "ema"), default="raw")
    ap.add_argument("--reference", help="method:lr, the cell the paired differences are taken against")
    ap.add_argument("--out", help="JSON output file")
    a = ap.parse_args(argv)
    steps = [int(s) for s in a.steps.split(",")]
    ref = None
    if a.reference:
        m, _, lr = a.reference.rpartition(":")
        ref = (m, float(lr))
    key = "val_loss_ema" if a.read == "ema" else "val_loss"
    rows = table(cells(a.dirs, set(a.methods.split(",")) if a.methods else None), steps, key, ref)
    for r in rows:
        print(f"{r['method']} B={r['batch_size']} lr={r['learning_rate']:g} seeds={r['seeds']}")
        for k, e in r["steps"].items():
            diff = f"   minus reference {_fmt(e['minus_reference'])}" if "minus_reference" in e else ""
            print(f"  after {k}: {_fmt(e['loss'])}{diff}")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"reference": a.reference, "read": a.read, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
