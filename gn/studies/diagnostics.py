"""Diagnostics of a McCandlish fit S(B) = S_min + E_min/B, shown next to the number they qualify.

A fit is only as good as the points it passes through. Per target and unit:

* residuals per batch, relative (S_i / Ŝ_i − 1) and in seed standard errors of S_i;
* their relative RMS;
* warnings (each a short code plus a sentence):
  - `s_min_below_one_step`: S_min below one step of the method in this unit (no run can
    take less than one step, so the asymptote is an extrapolation artefact);
  - `systematic_residuals`: some residual exceeds 3 seed standard errors (the curve misses a
    point by more than seed noise), or, without standard errors, the residual signs ordered
    by B form at most two runs over four or more batches (a curved misfit);
  - `few_batches`: fewer than four batches in the fit;
  - `lr_at_edge`: the best learning rate is at an edge of a batch's grid (`single_lr`: no grid);
  - `zhang_reference_not_linear`: the Zhang reference batch is above 0.2·B_crit, where
    steps at B_ref already exceed perfect scaling by more than 20 %, so "linear scaling from
    B_ref" is not linear;
  - `per_step_work_grows_with_batch`: the method's sequential updates per outer step grow
    with B in this sweep, so its count in this unit falls as 1/B by construction and no B_crit
    is claimed in it.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

SE_LIMIT = 3.0          # residuals beyond this many seed standard errors are a misfit
ZHANG_LINEAR = 0.2      # B_ref / B_crit above this: the reference is outside the linear regime


def _runs(signs: Sequence[int]) -> int:
    return 1 + sum(a != b for a, b in zip(signs, signs[1:])) if signs else 0


def fit_diagnostics(batch: Sequence[float], steps: Sequence[float], se: Sequence[float | None], fit: dict, *,
                    min_step: float = 1.0, lr_edges: Sequence[float] = (), b_ref: float | None = None,
                    by_construction: bool = False, single_lr: bool = False) -> dict:
    """Residuals and warnings of `fit` (a dict with S_min, E_min, B_crit) against the fitted
    points (batch, mean steps, their standard errors; None where one seed). `min_step` is one
    step of the method in this unit; `lr_edges` the batches whose best lr is at a grid edge."""
    warnings: list[dict] = []

    def warn(code, text):
        warnings.append({"code": code, "text": text})

    b = np.asarray(batch, float)
    s = np.asarray(steps, float)
    out: dict = {"residuals": {}, "rel_rms": None, "warnings": warnings}
    if by_construction:
        warn("per_step_work_grows_with_batch", "sequential updates per outer step grow with B here: the count "
             "falls as 1/B by construction in this unit, so no B_crit is claimed in it")
    if b.size < 4:
        warn("few_batches", f"{b.size} batches in the fit (fewer than four)")
    if single_lr:
        warn("single_lr", "one learning rate per batch: the best lr was not searched")
    if lr_edges:
        warn("lr_at_edge", "best lr at the grid's edge at B = " + ", ".join(f"{x:g}" for x in lr_edges))
    s_min, e_min = fit.get("S_min"), fit.get("E_min")
    if s_min is None or e_min is None or b.size == 0:
        return out
    pred = s_min + e_min / b
    rel = s / pred - 1.0
    z = [None if (e is None or not e) else float((si - pi) / e) for si, pi, e in zip(s, pred, se)]
    out["residuals"] = {f"{bi:g}": {"rel": float(r), "z": zi} for bi, r, zi in zip(b, rel, z)}
    out["rel_rms"] = float(math.sqrt(np.mean(rel ** 2)))
    if s_min < min_step:
        warn("s_min_below_one_step", f"S_min = {s_min:.3g} is below one step ({min_step:g}) of the method")
    zs = [abs(x) for x in z if x is not None]
    signs = [int(np.sign(r)) for r in rel[np.argsort(b)] if r != 0]
    if zs and max(zs) > SE_LIMIT:
        worst = max((x for x in z if x is not None), key=abs)
        warn("systematic_residuals", f"a residual of {worst:+.1f} seed standard errors (limit {SE_LIMIT:g}); "
             "relative residuals " + " / ".join(f"{100 * r:+.1f} %" for r in rel[np.argsort(b)]))
    elif not zs and b.size >= 4 and _runs(signs) <= 2:
        warn("systematic_residuals", "residual signs by batch " + " ".join("+" if x > 0 else "-" for x in signs)
             + " (at most two runs: a curved misfit)")
    bc = fit.get("B_crit")
    if b_ref is not None and bc is not None and math.isfinite(bc) and bc > 0 and b_ref / bc > ZHANG_LINEAR:
        warn("zhang_reference_not_linear", f"Zhang reference batch {b_ref:g} is {b_ref / bc:.2f}·B_crit "
             f"(> {ZHANG_LINEAR:g}): not in the linear-scaling regime")
    return out
