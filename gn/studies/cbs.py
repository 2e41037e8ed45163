"""Critical batch size: target crossings, the McCandlish fit, its bootstrap,
Zhang et al.'s CBS and the best learning rate per batch size (DESIGN.md §6).

Pure numpy, no JAX: these functions run on tables of finished runs. Two
definitions of a critical batch appear here and they are never mixed:

* McCandlish et al. (2018): S(B) = S_min + E_min/B, B_crit = E_min/S_min.
* Zhang et al. (2024): the batch where steps exceed perfect linear scaling
  from the smallest batch by a threshold (20%); roughly 0.2·B_crit + 1.2·B_ref.
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


def _b_crit_or_inf(fit: dict) -> float:
    # S_min -> 0+ sends B_crit to +inf, so a non-positive S_min ranks above every finite value
    if fit["S_min"] is None:
        return math.nan
    if fit["S_min"] <= 0:
        return math.inf
    return fit["E_min"] / fit["S_min"]


def _percentile_interval(x: np.ndarray, level: float) -> list:
    """Order-statistic percentile interval; works with +-inf entries (no
    interpolation between infinities, which would give nan)."""
    x = np.sort(x[~np.isnan(x)])
    if x.size == 0:
        return [None, None]
    a = (1.0 - level) / 2
    lo = x[int(math.floor(a * (x.size - 1)))]
    hi = x[int(math.ceil((1 - a) * (x.size - 1)))]
    return [float(lo), float(hi)]


def _inflate(s: np.ndarray, groups: list[np.ndarray], idx: np.ndarray) -> np.ndarray:
    """Resampled steps with their spread about the batch's mean scaled by
    sqrt(n/(n-1)): a plain resample of n seeds has (n-1)/n of the seeds'
    variance, which with 3 seeds makes a 95% interval cover only ~80%."""
    out = s[idx].copy()
    pos = 0
    for g in groups:
        n = g.size
        if n > 1:
            m = s[g].mean()
            out[pos:pos + n] = m + math.sqrt(n / (n - 1)) * (out[pos:pos + n] - m)
        pos += n
    return out


def bootstrap_fit(batch: Sequence[float], steps: Sequence[float], *, n_boot: int = 1000, level: float = 0.95,
                  seed: int = 0, weights: Sequence[float] | None = None) -> dict:
    """Percentile bootstrap of the McCandlish fit. Each replicate resamples,
    with replacement and within each batch size, that batch's points (seeds or
    grid points), so every batch size keeps its count, widens their spread
    about the batch mean by sqrt(n/(n-1)) (the resample's variance deficit;
    see `_inflate`), then refits
    S(B) = S_min + E_min/B. The interval is the (1-level)/2 and (1+level)/2
    percentiles of the replicates; a replicate with S_min <= 0 counts as
    B_crit = +inf (an unbounded upper end is reported as inf). Uses a fixed
    RNG seed, so the result is reproducible. Returns the point fit plus
    S_min_ci, E_min_ci, B_crit_ci and n_boot.
    """
    b = np.asarray(batch, dtype=float)
    s = np.asarray(steps, dtype=float)
    w = None if weights is None else np.asarray(weights, dtype=float)
    out = fit_mccandlish(b, s, w)
    groups = [np.flatnonzero(b == v) for v in np.unique(b)]
    rng = np.random.default_rng(seed)
    reps = np.full((n_boot, 3), np.nan)
    if out["n_batches"] >= 2:
        for k in range(n_boot):
            idx = np.concatenate([rng.choice(g, size=g.size, replace=True) for g in groups])
            f = fit_mccandlish(b[idx], _inflate(s, groups, idx), None if w is None else w[idx])
            if f["S_min"] is not None:
                reps[k] = (f["S_min"], f["E_min"], _b_crit_or_inf(f))
    out.update(S_min_ci=_percentile_interval(reps[:, 0], level), E_min_ci=_percentile_interval(reps[:, 1], level),
               B_crit_ci=_percentile_interval(reps[:, 2], level), n_boot=n_boot, ci_level=level,
               boot_invalid=int(np.sum(~np.isfinite(reps[:, 2]))))
    return out


def bootstrap_fit_grid(cells: dict, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """Percentile bootstrap of the McCandlish fit over seeds AND learning-rate grid points.

    `cells[B][lr]` lists steps to target per seed (None: not reached). Each
    replicate, at every batch size: resamples that batch's lr grid points with
    replacement, resamples each chosen point's seeds with replacement, takes the
    best (lowest mean steps; an unreached seed makes a point unreachable) and fits
    S(B) = S_min + E_min/B to the best points. So the interval also covers the
    coarseness of the lr grid, and exists with one seed. The point estimate is
    the fit to the best lr per batch (mean over seeds), as in `best_per_batch`.
    """
    rng = np.random.default_rng(seed)

    def best(batch_cells, resample):
        out = np.inf
        lrs = list(batch_cells)
        chosen = rng.choice(len(lrs), size=len(lrs), replace=True) if resample else range(len(lrs))
        for i in chosen:
            vals = batch_cells[lrs[i]]
            pick = [vals[j] for j in rng.choice(len(vals), size=len(vals), replace=True)] if resample else vals
            if pick and all(v is not None and np.isfinite(v) for v in pick):
                out = min(out, float(np.mean(pick)))
        return out

    def fit(resample):
        pts = [(float(B), best(c, resample)) for B, c in sorted(cells.items())]
        pts = [(b, s) for b, s in pts if np.isfinite(s)]
        return fit_mccandlish([p[0] for p in pts], [p[1] for p in pts])

    out = fit(False)
    reps = np.full((n_boot, 3), np.nan)
    if out["n_batches"] >= 2:
        for k in range(n_boot):
            f = fit(True)
            if f["S_min"] is not None:
                reps[k] = (f["S_min"], f["E_min"], _b_crit_or_inf(f))
    out.update(S_min_ci=_percentile_interval(reps[:, 0], level), E_min_ci=_percentile_interval(reps[:, 1], level),
               B_crit_ci=_percentile_interval(reps[:, 2], level), n_boot=n_boot, ci_level=level,
               boot_invalid=int(np.sum(~np.isfinite(reps[:, 2]))), ci_over="seeds and learning-rate grid points")
    return out


def zhang_cbs(batch: Sequence[float], steps: Sequence[float], threshold: float = 0.2) -> dict:
    """Critical batch size as defined by Zhang et al. (2024): with the smallest
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
    out = {"definition": f"Zhang et al. 2024: steps exceed linear scaling from the smallest batch by {threshold:.0%}",
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
    of that batch's grid, so the optimum may lie outside it.
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
            ranked.append(((miss, math.inf if mean is None else mean, lr), lr, vals, mean, se, rs))
        ranked.sort(key=lambda t: t[0])
        _, lr, vals, mean, se, rs = ranked[0]
        grid = sorted(per_lr)
        n_reached = sum(v is not None for v in vals)
        edge = "only" if len(grid) == 1 else "low" if lr == grid[0] else "high" if lr == grid[-1] else None
        out.append({"method": method, "batch_size": batch, "learning_rate": lr,
                    "mean": mean if n_reached == len(vals) else None, "mean_reached": mean, "se": se,
                    "values": vals, "seeds": [r.get("seed") for r in sorted(rs, key=lambda r: r.get("seed", 0))],
                    "n_seeds": len(vals), "n_reached": n_reached, "lr_grid": grid,
                    "lr_at_edge": edge is not None, "edge": edge, "rows": rs})
    return out
