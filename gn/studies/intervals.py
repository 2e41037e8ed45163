"""Confidence intervals for the McCandlish fit whose sampling unit is the seed.

The fit S(B) = S_min + E_min/B (McCandlish et al. 2018) is made to the steps to
target at each batch's best learning rate. What varies between repetitions of
a study is the seed (data order, initialisation of the inner loop); the
learning-rate grid is a design choice. So a replicate here

1. resamples, with replacement, the seeds of every (batch, lr) cell, keeping
   each cell's count, and widens the resample's spread about the cell mean by
   sqrt(n/(n-1)) (a resample of n values has (n-1)/n of their variance);
2. redoes the learning-rate choice on the replicate's cell means (a cell with
   an unreached seed ranks below every cell that reached on all seeds);
3. refits S(B) by weighted least squares in 1/B (weights 1/S²).

The percentile interval of the replicates' B_crit is the reported interval
(Efron & Tibshirani 1993, ch. 13). With one run per cell (e.g. a published
table) there is no seed to resample: a residual bootstrap of the fit
(multiplicative residuals S_i/Ŝ_i − 1, widened by sqrt(n/(n−2)) for the two
fitted parameters) is used when at least three batches were fitted, and no
interval otherwise. The same residual bootstrap is used when some batch's best
cell has a single seed (a seed resample would hold that batch fixed). Never a
zero-width interval: replicates that do not vary give none.

All of it is vectorised over replicates: the closed-form 2×2 weighted least
squares below replaces one `lstsq` per replicate.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

SEED_BOOTSTRAP = "seed bootstrap: seeds resampled within each (batch, lr) cell, the lr choice redone per replicate"
RESIDUAL_BOOTSTRAP = "residual bootstrap of the fit (one run per cell: no seeds to resample)"
RESIDUAL_ONE_SEED = ("residual bootstrap of the fit (a batch's best cell has one seed, which a seed resample "
                     "would hold fixed)")
NO_INTERVAL = "no interval: one run per cell and fewer than three batches"
NO_VARIATION = "no interval: the bootstrap replicates did not vary (an exact fit, or one seed where it matters)"


def wls_fit(batch: np.ndarray, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """S_min and E_min of S = S_min + E_min·u, u = 1/B, by least squares with
    weights 1/S², along the last axis; NaN steps are left out. Shapes (..., n)."""
    u = np.broadcast_to(1.0 / np.asarray(batch, float), np.shape(steps))
    s = np.asarray(steps, float)
    ok = np.isfinite(s) & (s > 0)
    w = np.where(ok, 1.0 / np.where(ok, s, 1.0) ** 2, 0.0)
    s0 = np.where(ok, s, 0.0)
    sw, su, suu = w.sum(-1), (w * u).sum(-1), (w * u * u).sum(-1)
    ss, sus = (w * s0).sum(-1), (w * u * s0).sum(-1)
    det = sw * suu - su * su
    with np.errstate(divide="ignore", invalid="ignore"):
        e_min = (sw * sus - su * ss) / det
        s_min = (ss - su * e_min) / sw
    bad = ~(np.abs(det) > 1e-300 * np.maximum(sw * suu, 1e-300))
    return np.where(bad, np.nan, s_min), np.where(bad, np.nan, e_min)


def log_fit(batch: np.ndarray, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """S_min and E_min by unweighted least squares on log S (Zhang et al. 2024's fit), one
    Levenberg-Marquardt solve per row of `steps` (..., n), started from `wls_fit`."""
    from scipy.optimize import least_squares

    b = np.asarray(batch, float)
    s = np.asarray(steps, float)
    flat = s.reshape(-1, s.shape[-1])
    s0, e0 = wls_fit(b, flat)
    out = np.full((flat.shape[0], 2), np.nan)
    for k, row in enumerate(flat):
        ok = np.isfinite(row) & (row > 0)
        if ok.sum() < 2 or not np.isfinite(s0[k]):
            continue
        bb, ss = b[ok], row[ok]
        x0 = [s0[k] if s0[k] > 0 else 1e-6 * ss.min(), e0[k] if e0[k] > 0 else ss.max() * bb.min()]

        def resid(p):
            return np.log(np.maximum(p[0] + p[1] / bb, 1e-300)) - np.log(ss)
        out[k] = least_squares(resid, x0, method="lm", xtol=1e-15, ftol=1e-15, gtol=1e-15, max_nfev=20000).x
    return out[:, 0].reshape(s.shape[:-1]), out[:, 1].reshape(s.shape[:-1])


FITS = {"wls": wls_fit, "log": log_fit}


def b_crit(s_min: np.ndarray, e_min: np.ndarray) -> np.ndarray:
    """E_min/S_min; +inf where S_min <= 0 (steps still fall like 1/B: B_crit beyond the data) and
    0 where E_min <= 0 < S_min (no gain from larger batches), so a replicate never gives a
    negative batch size."""
    with np.errstate(divide="ignore", invalid="ignore"):
        bc = np.where(s_min > 0, np.maximum(e_min, 0.0) / s_min, np.inf)
    return np.where(np.isnan(s_min) | np.isnan(e_min), np.nan, bc)


def percentile(x: np.ndarray, level: float) -> list:
    """Order-statistic percentile interval (works with ±inf; NaN dropped)."""
    x = np.sort(np.asarray(x, float)[~np.isnan(x)])
    if x.size == 0:
        return [None, None]
    a = (1.0 - level) / 2
    return [float(x[int(math.floor(a * (x.size - 1)))]), float(x[int(math.ceil((1 - a) * (x.size - 1)))])]


def cell_array(cells: Mapping[float, Mapping[float, Sequence]]) -> tuple[np.ndarray, list, np.ndarray]:
    """cells[B][lr] = per-seed values (None: unreached) as an array (batches, lrs, seeds) padded
    with -inf where a cell has fewer seeds (so padding is never mistaken for an unreached
    seed), the sorted batches and their lr lists."""
    batches = sorted(cells)
    lrs = [sorted(cells[b]) for b in batches]
    n_lr = max(len(x) for x in lrs)
    n_seed = max(len(cells[b][lr]) for b, ls in zip(batches, lrs) for lr in ls)
    arr = np.full((len(batches), n_lr, n_seed), -np.inf)
    for i, (b, ls) in enumerate(zip(batches, lrs)):
        for j, lr in enumerate(ls):
            vals = [np.nan if v is None or not math.isfinite(float(v)) else float(v) for v in cells[b][lr]]
            arr[i, j, :len(vals)] = vals
    return arr, batches, lrs


def _best(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per batch (axis -3 of arr[..., batch, lr, seed]): the best lr's mean steps and its index.

    Rank: fraction of unreached seeds first, then the mean; a batch whose best cell
    has an unreached seed gets NaN (left out of the fit)."""
    present = arr != -np.inf
    reached = present & np.isfinite(arr)
    n = present.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        miss = np.where(n > 0, 1.0 - reached.sum(-1) / np.maximum(n, 1), np.inf)
        mean = np.where(reached, arr, 0.0).sum(-1) / reached.sum(-1)
    mean = np.where(np.isfinite(mean), mean, np.inf)
    key = np.where(np.isinf(miss), np.inf, miss * 1e300 + np.minimum(mean, 1e299))
    idx = np.argmin(np.where(np.isnan(key), np.inf, key), axis=-1)
    best_mean = np.take_along_axis(mean, idx[..., None], -1)[..., 0]
    best_miss = np.take_along_axis(miss, idx[..., None], -1)[..., 0]
    return np.where((best_miss == 0) & np.isfinite(best_mean), best_mean, np.nan), idx


def _resample(arr: np.ndarray, rng: np.random.Generator, n_boot: int) -> np.ndarray:
    """n_boot resamples of every cell's seeds (with replacement, within the cell's own count),
    widened by sqrt(n/(n-1)) about the cell mean. Shape (n_boot, *arr.shape)."""
    present = arr != -np.inf
    n = present.sum(-1, keepdims=True)                       # seeds per cell
    u = rng.random((n_boot, *arr.shape))
    idx = np.minimum((u * n).astype(int), np.maximum(n - 1, 0))
    rep = np.take_along_axis(np.broadcast_to(arr, (n_boot, *arr.shape)), idx, -1)
    rep = np.where(present, rep, -np.inf)
    fin = np.isfinite(arr)
    with np.errstate(invalid="ignore", divide="ignore"):
        m = np.where(fin, arr, 0.0).sum(-1, keepdims=True) / fin.sum(-1, keepdims=True)
        infl = np.sqrt(np.where(n > 1, n / np.maximum(n - 1, 1), 1.0))
    return np.where(np.isfinite(rep), m + infl * (rep - m), rep)


def seed_bootstrap(cells: Mapping[float, Mapping[float, Sequence]], *, n_boot: int = 2000, level: float = 0.95,
                   seed: int = 0, space: str = "wls") -> dict:
    """The point fit at each batch's best lr and its seed-bootstrap interval (module docstring).

    Falls back to `residual_bootstrap` when a fitted batch's best cell has one seed. Returns S_min, E_min,
    B_crit, their `*_ci`, `ci_method`, `n_boot`, `ci_level`, `lr_choice_changed` (fraction of
    replicates whose lr choice differs from the point estimate's at some batch) and the best
    lr index per batch (`best_index`)."""
    arr, batches, lrs = cell_array(cells)
    b = np.asarray(batches, float)
    best, idx = _best(arr)
    fit = FITS[space]
    s_min, e_min = fit(b, best)
    ok = bool(s_min > 0 and e_min > 0)      # else no B_crit (the note says why)
    out = {"S_min": _f(s_min), "E_min": _f(e_min), "B_crit": _f(b_crit(s_min, e_min)) if ok else None,
           "n_boot": n_boot, "ci_level": level, "best_index": [int(i) for i in idx],
           "n_batches_fitted": int(np.isfinite(best).sum()), "space": space}
    if int(np.isfinite(best).sum()) < 2:
        return out | {"S_min_ci": [None, None], "E_min_ci": [None, None], "B_crit_ci": [None, None],
                      "ci_method": "no fit: fewer than two batches reached the target"}
    # Seeds of each fitted batch's best cell: with one, resampling seeds holds that batch's value
    # fixed and the interval would understate (zero width when every best cell has one seed).
    fitted = np.isfinite(best)
    best_seeds = np.take_along_axis((arr != -np.inf).sum(-1), idx[:, None], -1)[:, 0]
    if best_seeds[fitted].min() < 2:
        method = RESIDUAL_BOOTSTRAP if (arr != -np.inf).sum(-1).max() < 2 else RESIDUAL_ONE_SEED
        return out | residual_bootstrap(b[fitted], best[fitted], n_boot=n_boot, level=level, seed=seed,
                                        space=space, method=method)
    rng = np.random.default_rng(seed)
    rep = _resample(arr, rng, n_boot)
    rbest, ridx = _best(rep)
    rs, re = fit(b, rbest)
    # a replicate that lost a batch keeps the fit over the rest only if two batches remain
    rs = np.where(np.isfinite(rbest).sum(-1) >= 2, rs, np.nan)
    return out | _nonzero_width({"S_min_ci": percentile(rs, level), "E_min_ci": percentile(re, level),
                                 "B_crit_ci": percentile(b_crit(rs, re), level), "ci_method": SEED_BOOTSTRAP,
                                 "lr_choice_changed": float(np.mean(np.any(ridx != idx, axis=-1)))})


def _nonzero_width(ci: dict) -> dict:
    """The intervals, or none where the replicates gave B_crit a zero-width one: that is no
    measurement of sampling error, and a reader would take it for a precise number."""
    lo, hi = ci["B_crit_ci"]
    if lo is not None and math.isfinite(lo) and math.isfinite(hi) and hi - lo <= 1e-9 * max(abs(lo), abs(hi)):
        return ci | {"S_min_ci": [None, None], "E_min_ci": [None, None], "B_crit_ci": [None, None],
                     "ci_method": NO_VARIATION}
    return ci


def residual_bootstrap(batch: Sequence[float], steps: Sequence[float], *, n_boot: int = 2000, level: float = 0.95,
                       seed: int = 0, space: str = "wls", method: str = RESIDUAL_BOOTSTRAP) -> dict:
    """Interval of a fit to one value per batch: replicates Ŝ_i·(1 + r*_i) with r* drawn from the
    fit's relative residuals, widened by sqrt(n/(n-2)); none (and `ci_method` says so) with
    fewer than three batches, where the two-parameter fit has no residual to resample."""
    b, s = np.asarray(batch, float), np.asarray(steps, float)
    if b.size < 3:
        return {"S_min_ci": [None, None], "E_min_ci": [None, None], "B_crit_ci": [None, None],
                "ci_method": NO_INTERVAL}
    fit = FITS[space]
    s_min, e_min = fit(b, s)
    fitted = s_min + e_min / b
    r = s / fitted - 1.0
    r = (r - r.mean()) * math.sqrt(b.size / (b.size - 2))
    rng = np.random.default_rng(seed)
    rep = fitted * (1.0 + r[rng.integers(0, b.size, size=(n_boot, b.size))])
    rs, re = fit(b, rep)
    return _nonzero_width({"S_min_ci": percentile(rs, level), "E_min_ci": percentile(re, level),
                           "B_crit_ci": percentile(b_crit(rs, re), level), "ci_method": method})


def t_interval(values: Sequence[float], level: float = 0.95) -> dict:
    """Mean, standard error (n-1) and the Student-t interval mean ± t_{n-1}·se, with n."""
    from scipy import stats

    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], float)
    if x.size == 0:
        return {"mean": None, "se": None, "ci": [None, None], "n": 0}
    if x.size == 1:
        return {"mean": float(x[0]), "se": None, "ci": [None, None], "n": 1}
    se = float(x.std(ddof=1) / math.sqrt(x.size))
    h = float(stats.t.ppf(0.5 + level / 2, x.size - 1)) * se
    return {"mean": float(x.mean()), "se": se, "ci": [float(x.mean() - h), float(x.mean() + h)], "n": int(x.size)}


def _f(x) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x
