"""Re-analyse the committed CBS study (experiments/results/cbs_synthetic/analysis.json) under the
measurement protocol of `gn analyze` (issue 14): crossings at the resolution a method has, the fit
in each unit with a residual-bootstrap interval (one seed per cell), and the diagnostics.

The committed JSON keeps each batch's best-lr cell only (steps interpolated between evaluations,
one seed), not the curves. Two things can still be recomputed exactly from it:

* a method that moves only at whole outer steps (GN) evaluated every k outer steps crosses at the
  first evaluation at or below the target: k·ceil(s/k) for an interpolated s (the sweep evaluated
  every 32,768 tokens: k = 16, 4, 1, 1 at B = 32, 128, 512, 2048 with 64-token sequences);
* every count in sequential updates: GN makes N = B/16 updates per outer step.

What cannot be recomputed: the lr choice per replicate (other grid points are not in the JSON), so
the interval is a residual bootstrap of the fit to the best cells, as for a published table.

    python experiments/reanalyse_committed.py experiments/results/cbs_synthetic/analysis.json \
        --out experiments/results/cbs_synthetic_reanalysis
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from gn.methods import registry
from gn.studies.analyze import analyze_rows, write_outputs

SEQ_LEN = 64
EVAL_EVERY_TOKENS = 32768
B_INNER = 16


def _cadence(batch: int) -> int:
    return max(1, round(EVAL_EVERY_TOKENS / (batch * SEQ_LEN)))


def rows_from(analysis: dict) -> dict[str, list[dict]]:
    """Rows per unit (steps = the method's own, updates) from the committed best cells."""
    out: dict[str, list[dict]] = {"steps": [], "updates": []}
    for method, res in analysis["methods"].items():
        whole = registry.get(method).whole_outer_steps if method in registry.names() else False
        for target, r in res["targets"].items():
            for e in r["best"]:
                B = int(e["batch_size"])
                for seed, s in zip(e["seeds"], e["steps"]):
                    if s is not None and whole:
                        k = _cadence(B)
                        s = k * math.ceil(s / k - 1e-9)
                    per_update = B // B_INNER if whole else 1
                    base = {"method": method, "batch_size": B, "learning_rate": e["learning_rate"], "seed": seed,
                            "target": target, "diverged": False,
                            "crossing_rule": "first_at_or_below" if whole else "interpolated",
                            "updates_per_outer_step": per_update}
                    out["steps"].append(base | {"steps": s})
                    out["updates"].append(base | {"steps": None if s is None else s * per_update})
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("analysis", help="a committed analysis.json")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    src = json.loads(Path(args.analysis).read_text())
    for unit, rows in rows_from(src).items():
        res = analyze_rows(rows, list(src["targets"]), source={"kind": "table", "path": f"{args.analysis} ({unit})"})
        out = Path(args.out) / unit
        write_outputs(res, out)
        print(f"{unit}: wrote {out}")


if __name__ == "__main__":
    main()
