"""Loss plots (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_run(rows: list[dict], path: str | Path, *, title: str = "", floor: float | None = None) -> None:
    """Train loss and validation loss against steps for one run."""
    fig, ax = plt.subplots(figsize=(6, 4))
    train = [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    if train:
        ax.plot(*zip(*train), label="train", alpha=0.6)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    if floor is not None:
        ax.axhline(floor, color="k", ls="--", lw=1, label="Bayes floor")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_comparison(runs: dict[str, list[dict]], path: str | Path, *, floor: float | None = None) -> None:
    """Validation loss against outer steps of the reference batch and against
    training tokens, one line per method."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in runs.items():
        val = [r for r in rows if r.get("val_loss") is not None]
        axes[0].plot([r.get("outer_step", r["step"]) for r in val], [r["val_loss"] for r in val], "o-", ms=3,
                     label=name)
        axes[1].plot([r["tokens"] for r in val], [r["val_loss"] for r in val], "o-", ms=3, label=name)
    for ax, xl in zip(axes, ("outer step (reference batch)", "training tokens")):
        if floor is not None:
            ax.axhline(floor, color="k", ls="--", lw=1, label="Bayes floor")
        ax.set_xlabel(xl)
        ax.set_ylabel("validation loss (nats/token)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
