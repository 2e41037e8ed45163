"""Loss plots (matplotlib, headless).

Every plot has the same four panels, one per cost axis a method can be charged
in: outer steps of the reference batch, sequential parameter updates, gradient
evaluations (value_and_grad equivalents at the reference batch; a FLOP estimate
for GN) and wall time without compilation. Target losses (train.target_losses)
are drawn as dotted horizontal lines, the Bayes floor of a synthetic language
as a dashed one.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# (metrics key, axis label): the x axes of every loss plot.
AXES = (("outer_step", "outer steps (reference batch)"),
        ("updates", "sequential updates"),
        ("grad_evals", "gradient evaluations (value_and_grad equiv.)"),
        ("wall_time_s", "wall time without compilation (s)"))


def _x(r: dict, key: str):
    if key == "outer_step":
        return r.get("outer_step", r.get("step"))
    return r.get(key)


def _series(rows: list[dict], key: str, loss: str) -> tuple[list, list]:
    pts = [(_x(r, key), r[loss]) for r in rows if r.get(loss) is not None and _x(r, key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _references(ax, targets, floor) -> None:
    for i, t in enumerate(targets):
        ax.axhline(t, color="0.35", ls=":", lw=1.2, label="target loss" if i == 0 else None)
    if floor is not None:
        ax.axhline(floor, color="k", ls="--", lw=1, label="Bayes floor")


def _figure(title: str):
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    if title:
        fig.suptitle(title)
    return fig, axes.ravel()


def run_figure(rows: list[dict], *, title: str = "", floor: float | None = None, targets=()):
    """Train and validation loss of one run against the four cost axes."""
    fig, axes = _figure(title)
    for ax, (key, label) in zip(axes, AXES):
        x, y = _series(rows, key, "train_loss")
        if x:
            ax.plot(x, y, label="train", alpha=0.6)
        x, y = _series(rows, key, "val_loss")
        if x:
            ax.plot(x, y, "o-", ms=3, label="validation")
        _references(ax, targets, floor)
        ax.set_xlabel(label)
        ax.set_ylabel("loss (nats/token)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def comparison_figure(runs: dict[str, list[dict]], *, floor: float | None = None, targets=()):
    """Validation loss of every method against the four cost axes."""
    fig, axes = _figure("validation loss")
    for ax, (key, label) in zip(axes, AXES):
        for name, rows in runs.items():
            x, y = _series(rows, key, "val_loss")
            ax.plot(x, y, "o-", ms=3, label=name)
        _references(ax, targets, floor)
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss (nats/token)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _save(fig, path) -> None:
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_run(rows: list[dict], path: str | Path, *, title: str = "", floor: float | None = None,
             targets=()) -> None:
    """WORKDIR/loss.png: train and validation loss against the four cost axes."""
    _save(run_figure(rows, title=title, floor=floor, targets=targets), path)


def plot_comparison(runs: dict[str, list[dict]], path: str | Path, *, floor: float | None = None,
                    targets=()) -> None:
    """comparison.png: validation loss of each method against the four cost axes."""
    _save(comparison_figure(runs, floor=floor, targets=targets), path)
