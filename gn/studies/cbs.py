"""Critical batch size: target crossings, the McCandlish fit, Zhang et al.'s CBS
and the best learning rate per batch size (McCandlish et al. 2018; Zhang et al. 2024). Intervals are in
`gn.studies.intervals`, fit diagnostics in `gn.studies.diagnostics`.

Pure numpy, no JAX: these functions run on tables of finished runs. Two
definitions of a critical batch appear here and they are never mixed:

* McCandlish et al. (2018): S(B) = S_min + E_min/B, B_crit = E_min/S_min.
* Zhang et al. (2024): the batch where steps exceed perfect linear scaling
  from a reference batch B_ref by a threshold (20%). From the fitted curve
  (their code) that is CBS = 1.2·B_ref + 0.2·E_min/S_min (`zhang_cbs_fit`);
  `zhang_cbs_raw` interpolates the measured steps instead (a variant, labelled).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable, Sequence

import numpy as np


def _finite(v) -> bool:
    return v is not None and math.isfinite(float(v))


def crossing_fraction(values: Sequence[float], target: float) -> tuple[int, float] | None:
    """Where a curve first reaches `target`, as (i, f) with the crossing at
    position i - 1 + f between evaluations i-1 and i (f in (0, 1]), or (0, 0.0)
    when values[0] <= target already. None if never reached.

    Linear interpolation between the last evaluation above the target, v0, and
    the first at or below it, v1:  f = (v0 - target) / (v0 - v1).
    Non-finite values (a diverging curve) are never a crossing.
    """
    prev = None
    for i, v in enumerate(values):
        if not _finite(v):
            prev = None   # no interpolation across a non-finite evaluation
            continue
        v = float(v)
        if v <= target:
            if prev is None:
                return i, 0.0
            j, v0 = prev
            return i, (v0 - target) / (v0 - v) if v0 != v else 1.0
        prev = (i, v)
    return None


def crossing_x(x: Sequence[float], values: Sequence[float], target: float) -> float | None:
    """The x (tokens, updates, grad evals, wall time, ...) at which the curve
    values(x) first reaches `target`:

        x* = x0 + (x1 - x0) · (v0 - target) / (v0 - v1),

    with (x0, v0) the last evaluation above the target and (x1, v1) the first
    at or below it. The first value counts (x* = x[0] if values[0] <= target);
    an exact hit returns that x; None if never reached.
    """
    return crossing_axes({"x": x}, values, target)["x"]


def crossing(steps: Sequence[float], values: Sequence[float], target: float) -> float | None:
    """The (fractional) step at which a loss curve first reaches `target`,
    linear between the two evaluations around the crossing:

        s* = s0 + (s1 - s0) · (v0 - target) / (v0 - v1).

    The evaluation at step 0 counts; an exact hit returns its step; None if
    never reached. Same as `crossing_x` with x = steps.
    """
    return crossing_x(steps, values, target)


def crossing_axes(axes: dict[str, Sequence[float]], values: Sequence[float], target: float) -> dict:
    """Every axis (e.g. step, tokens, wall_time_s) at the same crossing:
    axis* = a0 + (a1 - a0)·f with f from `crossing_fraction`. None per axis
    when never reached (or when that axis is missing at the evaluations used)."""
    hit = crossing_fraction(values, target)
    out = {}
    for name, a in axes.items():
        if hit is None:
            out[name] = None
            continue
        i, f = hit
        if f == 0.0:
            out[name] = None if a[i] is None else float(a[i])
        elif a[i] is None or a[i - 1] is None:
            out[name] = None
        else:
            out[name] = float(a[i - 1]) + (float(a[i]) - float(a[i - 1])) * f
    return out


def crossing_resolved(axes: dict[str, Sequence[float]], values: Sequence[float], target: float, *,
                      whole_steps: bool) -> dict:
    """The crossing on every axis at the resolution the method has, with its bracket.

    `bracket[axis]` = [a at the last evaluation above the target, a at the first at or below
    it] (the same value twice when the first evaluation is already at or below). A method that
    moves only at whole outer steps (`whole_steps`: Gauss-Newton's θ changes once per outer
    step, after the line search) crosses at that first evaluation at or below the target — an
    upper bound that is exact when it evaluates every outer step; no interpolation inside a
    step. For the others `value[axis]` is the linear interpolation of `crossing_axes`.
    Returns {"value": {...}, "bracket": {...}, "rule": "first_at_or_below"|"interpolated"}
    with None everywhere when never reached."""
    hit = crossing_fraction(values, target)
    rule = "first_at_or_below" if whole_steps else "interpolated"
    if hit is None:
        return {"value": {k: None for k in axes}, "bracket": {k: None for k in axes}, "rule": rule}
    i, f = hit
    lo_i = i - 1 if f > 0 else i

    def at(a, j):
        return None if a[j] is None else float(a[j])
    bracket = {k: [at(a, lo_i), at(a, i)] for k, a in axes.items()}
    value = ({k: at(a, i) for k, a in axes.items()} if whole_steps
             else crossing_axes(axes, values, target))
    return {"value": value, "bracket": bracket, "rule": rule}


def fit_mccandlish(batch: Sequence[float], steps: Sequence[float], weights: Sequence[float] | None = None) -> dict:
    """Fit S(B) = S_min + E_min/B (McCandlish et al. 2018) by weighted least
    squares, which is linear in u = 1/B:

        minimise  Σ_i w_i (S_i - S_min - E_min·u_i)²,   B_crit = E_min / S_min.

    Default weights w_i = 1/S_i²: step counts scatter multiplicatively across
    seeds, so relative residuals are the comparable ones. Returns a dict with
    S_min, E_min, B_crit, ok and note. B_crit is None (ok False) when
    S_min <= 0 (steps still fall as fast as 1/B: B_crit is beyond the data) or
    E_min <= 0 (no gain from larger batches), and when fewer than two distinct
    batch sizes are given; never raises for such data.
    """
    b = np.asarray(batch, dtype=float)
    s = np.asarray(steps, dtype=float)
    w = 1.0 / s**2 if weights is None else np.asarray(weights, dtype=float)
    keep = np.isfinite(b) & np.isfinite(s) & (b > 0) & (s > 0) & np.isfinite(w) & (w > 0)
    b, s, w = b[keep], s[keep], w[keep]
    out = {"S_min": None, "E_min": None, "B_crit": None, "ok": False, "note": "", "n_points": int(b.size),
           "n_batches": int(np.unique(b).size)}
    if np.unique(b).size < 2:
        out["note"] = "needs steps at two or more batch sizes"
        return out
    design = np.stack([np.ones_like(b), 1.0 / b], axis=1)
    sw = np.sqrt(w)
    coef, *_ = np.linalg.lstsq(design * sw[:, None], s * sw, rcond=None)
    s_min, e_min = float(coef[0]), float(coef[1])
    out.update(S_min=s_min, E_min=e_min)
    if s_min <= 0:
        out["note"] = "S_min <= 0: steps fall like 1/B over the whole grid, B_crit is beyond the largest batch"
    elif e_min <= 0:
        out["note"] = "E_min <= 0: larger batches do not save steps"
    else:
        out.update(B_crit=e_min / s_min, ok=True)
    return out


def zhang_cbs_fit(fit: dict, b_ref: float, threshold: float = 0.2) -> dict:
    """Zhang et al.'s (2024) CBS from a fitted S(B) = S_min + E_min/B, as their code computes it
    (hlzhang109/critical-batch-size, plots/chinchilla.ipynb): the batch B where steps exceed
    linear scaling from B_ref by `threshold`,

        S(B)·B = (1 + t)·S(B_ref)·B_ref   ⇔   B = (1 + t)·B_ref + t·E_min/S_min.

    Monotone in B_crit = E_min/S_min, so its interval is that of B_crit mapped through the same
    line. None when the fit has no positive S_min."""
    out = {"definition": f"Zhang et al. 2024 from the fitted curve: S(B)·B = {1 + threshold:g}·S(B_ref)·B_ref, "
                         f"i.e. {1 + threshold:g}·B_ref + {threshold:g}·E_min/S_min",
           "threshold": threshold, "B_ref": float(b_ref), "cbs": None, "cbs_ci": [None, None]}
    bc = fit.get("B_crit")
    if bc is None or not math.isfinite(bc):
        return out
    line = lambda x: None if x is None else ((1 + threshold) * b_ref + threshold * x)   # noqa: E731
    out["cbs"] = line(bc)
    out["cbs_ci"] = [line(x) for x in fit.get("B_crit_ci") or [None, None]]
    out["B_ref_over_B_crit"] = b_ref / bc
    return out


def zhang_cbs_raw(batch: Sequence[float], steps: Sequence[float], threshold: float = 0.2) -> dict:
    """A raw-data variant of Zhang et al.'s CBS (not their computation: see `zhang_cbs_fit`): with the smallest
    batch B_ref and its steps S_ref as reference, perfect linear scaling is
    S_lin(B) = S_ref·B_ref/B and the excess is r(B) = S(B)/S_lin(B) - 1. The
    CBS is the batch where r first reaches `threshold` (20%), interpolated
    linearly in log B between the grid points around it:

        log B* = log B0 + (log B1 - log B0)·(threshold - r0)/(r1 - r0).

    Several values at one batch are averaged. Returns cbs (None when the
    excess never reaches the threshold: above_grid True), B_ref, S_ref and the
    excess per batch. Not comparable with the McCandlish B_crit.
    """
    b = np.asarray(batch, dtype=float)
    s = np.asarray(steps, dtype=float)
    keep = np.isfinite(b) & np.isfinite(s) & (b > 0) & (s > 0)
    b, s = b[keep], s[keep]
    grid = np.unique(b)
    out = {"definition": f"raw-data variant: measured steps exceed linear scaling from the smallest batch by "
                         f"{threshold:.0%} (log-interpolated between grid points; not Zhang et al.'s fitted CBS)",
           "threshold": threshold, "cbs": None, "above_grid": False, "B_ref": None, "S_ref": None, "excess": {}}
    if grid.size < 2:
        return out
    mean_s = np.array([s[b == v].mean() for v in grid])
    b_ref, s_ref = grid[0], mean_s[0]
    r = mean_s * grid / (s_ref * b_ref) - 1.0
    out.update(B_ref=float(b_ref), S_ref=float(s_ref), excess={f"{v:g}": float(x) for v, x in zip(grid, r)})
    for i in range(1, grid.size):
        if r[i] >= threshold:
            r0 = r[i - 1]
            f = (threshold - r0) / (r[i] - r0)
            out["cbs"] = float(np.exp(np.log(grid[i - 1]) + (np.log(grid[i]) - np.log(grid[i - 1])) * f))
            return out
    out["above_grid"] = True
    return out


def _mean_se(x: list[float]) -> tuple[float | None, float | None]:
    if not x:
        return None, None
    a = np.asarray(x, dtype=float)
    se = float(a.std(ddof=1) / math.sqrt(a.size)) if a.size > 1 else None
    return float(a.mean()), se


def best_per_batch(rows: Iterable[dict], key: str = "steps") -> list[dict]:
    """For each (method, batch_size), the learning rate with the lowest mean of
    `key` over seeds. A missing or non-finite value (target not reached,
    diverged) counts as worst: learning rates are ranked by (fraction of seeds
    not reached, mean over reached seeds), so an lr that reached the target on
    every seed beats one that missed it on any.

    Each result has method, batch_size, learning_rate, mean, se (standard error
    of the mean, n-1 in the variance; None for a single seed), values (per seed,
    None where unreached), n_seeds, n_reached, lr_grid, and lr_at_edge /
    edge ("low", "high" or "only") when the best lr is the smallest or largest
    of that batch's grid, so the optimum may lie outside it. `tied_lrs` lists
    every lr whose rank equals the best's (a count at whole outer steps often
    ties across a grid); of an exact tie the cell with the most seeds is reported
    (then the lowest lr), and when one of the tied lrs is inside the grid the edge
    flag is dropped: the tie, not the grid, limits what the choice says.
    """
    by = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by[(r["method"], r["batch_size"])][r["learning_rate"]].append(r)
    out = []
    for (method, batch), per_lr in sorted(by.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        ranked = []
        for lr, rs in per_lr.items():
            vals = [float(r[key]) if _finite(r.get(key)) else None for r in sorted(rs, key=lambda r: r.get("seed", 0))]
            reached = [v for v in vals if v is not None]
            mean, se = _mean_se(reached)
            miss = 1.0 - len(reached) / len(vals)
            # exact ties (whole-step counts) go to the cell with more seeds, then the lower lr
            ranked.append(((miss, math.inf if mean is None else mean, -len(vals), lr), lr, vals, mean, se, rs))
        ranked.sort(key=lambda t: t[0])
        (miss0, mean0, _, _), lr, vals, mean, se, rs = ranked[0]
        grid = sorted(per_lr)
        n_reached = sum(v is not None for v in vals)
        # equal rank up to float rounding of a mean (whole-step counts tie exactly)
        tied = sorted(t[1] for t in ranked if math.isfinite(mean0) and t[0][0] == miss0 and
                      abs(t[0][1] - mean0) <= 1e-9 * max(1.0, abs(mean0)))
        edge = "only" if len(grid) == 1 else "low" if lr == grid[0] else "high" if lr == grid[-1] else None
        if edge in ("low", "high") and any(grid[0] < t < grid[-1] for t in tied):
            edge = None
        out.append({"method": method, "batch_size": batch, "learning_rate": lr,
                    "mean": mean if n_reached == len(vals) else None, "mean_reached": mean, "se": se,
                    "values": vals, "seeds": [r.get("seed") for r in sorted(rs, key=lambda r: r.get("seed", 0))],
                    "n_seeds": len(vals), "n_reached": n_reached, "lr_grid": grid,
                    "lr_at_edge": edge is not None, "edge": edge, "tied_lrs": tied if len(tied) > 1 else [],
                    "rows": rs})
    return out
