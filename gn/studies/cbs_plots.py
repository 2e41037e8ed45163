"""Plots of a `gn analyze` result (matplotlib, headless). Each figure is
written on its own, so one failing figure only warns and the others survive."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np


def _plt():
    # imported here so that the analysis itself never needs a display or pays the import
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _series(res_t: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    es = [e for e in res_t["best"] if e["steps_mean_reached"] is not None]
    b = np.array([e["batch_size"] for e in es], dtype=float)
    s = np.array([e["steps_mean_reached"] for e in es], dtype=float)
    se = np.array([e["steps_se"] or 0.0 for e in es], dtype=float)
    return b, s, se


def plot_steps_vs_batch(result: dict, target: str, path: Path) -> None:
    """Steps to target against batch (log-log): data, perfect linear scaling
    from the smallest batch and the fitted S_min + E_min/B per method."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for i, (m, res) in enumerate(result["methods"].items()):
        if target not in res["targets"]:
            continue
        r = res["targets"][target]
        b, s, se = _series(r)
        if b.size == 0:
            continue
        c = f"C{i}"
        ax.errorbar(b, s, yerr=se, fmt="o", color=c, label=m)
        grid = np.geomspace(b.min(), b.max(), 100)
        ax.plot(grid, s[0] * b[0] / grid, ":", color=c, lw=1)
        fit = r["fit"]
        if fit["S_min"] is not None:
            label = f"{m} fit, B_crit={fit['B_crit']:.3g}" if fit["B_crit"] else f"{m} fit ({fit['note'][:20]})"
            ax.plot(grid, fit["S_min"] + fit["E_min"] / grid, "-", color=c, lw=1, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel(f"steps to loss {target}")
    ax.set_title("dotted: perfect scaling from the smallest batch")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_frontier(result: dict, target: str, path: Path) -> None:
    """Examples E = B·S against steps S: the McCandlish trade-off
    (S/S_min - 1)(E/E_min - 1) = 1."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for i, (m, res) in enumerate(result["methods"].items()):
        if target not in res["targets"]:
            continue
        r = res["targets"][target]
        b, s, _ = _series(r)
        if b.size == 0:
            continue
        ax.plot(s, b * s, "o", color=f"C{i}", label=m)
        fit = r["fit"]
        if fit["ok"]:
            grid = np.geomspace(b.min() / 2, b.max() * 2, 100)
            sf = fit["S_min"] + fit["E_min"] / grid
            ax.plot(sf, grid * sf, "-", color=f"C{i}", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"steps S to loss {target}")
    ax.set_ylabel("examples E = B·S")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_best_lr(result: dict, path: Path) -> None:
    """Best learning rate against batch size, per method and target; edge-of-grid choices hollow."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    styles = ["-", "--", ":", "-."]
    for i, (m, res) in enumerate(result["methods"].items()):
        for j, (t, r) in enumerate(res["targets"].items()):
            es = r["best"]
            b = [e["batch_size"] for e in es]
            lr = [e["learning_rate"] for e in es]
            ax.plot(b, lr, styles[j % 4], color=f"C{i}", label=f"{m} @ {t}")
            edge = [e for e in es if e["lr_at_edge"]]
            ax.plot([e["batch_size"] for e in edge], [e["learning_rate"] for e in edge], "o", mfc="none",
                    color=f"C{i}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("best learning rate (hollow: at grid edge)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_loss_curves(result: dict, method: str, path: Path) -> None:
    """Validation loss against steps for each batch size at its best lr (first target), all seeds."""
    plt = _plt()
    res = result["methods"][method]
    first = next(iter(res["targets"].values()))
    best = {(e["batch_size"], e["learning_rate"]) for e in first["best"]}
    fig, ax = plt.subplots(figsize=(6, 4.5))
    batches = sorted({b for b, _ in best})
    for run in result["_runs"]:
        if run["method"] != method or (run["batch_size"], run["learning_rate"]) not in best:
            continue
        k = batches.index(run["batch_size"])
        ev = run["evals"]
        ax.plot([r["step"] for r in ev], [r["val_loss"] for r in ev], "-", color=f"C{k % 10}", lw=1,
                label=f"B={run['batch_size']:g}, lr={run['learning_rate']:.3g}")
    for t in result["targets"]:
        ax.axhline(float(t), color="k", ls="--", lw=0.8)
    handles, labels = ax.get_legend_handles_labels()
    # one legend entry per batch (seeds share a label), in batch order
    uniq = sorted(dict(zip(labels, handles)).items(), key=lambda kv: float(kv[0].split(",")[0][2:]))
    ax.legend([h for _, h in uniq], [k for k, _ in uniq], fontsize=7)
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(left=0)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title(f"{method}: best lr per batch")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_fixed_tokens(result: dict, path: Path) -> None:
    """Final validation loss against batch size at a fixed token budget, per method."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for i, (m, es) in enumerate(result["fixed_tokens"].items()):
        es = [e for e in es if e["final_val_loss_mean"] is not None]
        ax.errorbar([e["batch_size"] for e in es], [e["final_val_loss_mean"] for e in es],
                    yerr=[e["final_val_loss_se"] or 0.0 for e in es], fmt="o-", color=f"C{i}", label=m)
    ax.set_xscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("final validation loss (best lr)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(result: dict, out: Path) -> list[Path]:
    """Every plot that applies to `result`; a failing one warns and is skipped."""
    jobs = []
    for t in result["targets"]:
        jobs.append((out / f"steps_vs_batch_{_safe(t)}.png", plot_steps_vs_batch, (result, t)))
        jobs.append((out / f"frontier_{_safe(t)}.png", plot_frontier, (result, t)))
    jobs.append((out / "best_lr.png", plot_best_lr, (result,)))
    if "_runs" in result:
        for m, res in result["methods"].items():
            if res["targets"]:
                jobs.append((out / f"loss_curves_{_safe(m)}.png", plot_loss_curves, (result, m)))
    if result.get("fixed_tokens"):
        jobs.append((out / "fixed_tokens.png", plot_fixed_tokens, (result,)))
    written = []
    for path, fn, args in jobs:
        try:
            fn(*args, path)
            written.append(path)
        except Exception as exc:  # one bad figure must not cost the others
            warnings.warn(f"could not write {path.name}: {exc}", stacklevel=2)
    return written
