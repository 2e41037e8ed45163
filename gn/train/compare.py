"""Run every method of a config on the same data and initialisation, and compare.

Writes `comparison.json` ({"methods": {NAME: summary}}), `comparison.md` (the
table also printed) and `comparison.png` (validation loss against steps and
tokens). Each method runs in `workdir/NAME` and resumes from its checkpoints,
so an interrupted comparison continues where it stopped.
"""

from __future__ import annotations

import json
from pathlib import Path

from gn.config import Config
from gn.errors import require
from gn.train.metrics import MetricsLog, target_key
from gn.train.plots import plot_comparison
from gn.train.trainer import prepare, train


def compare(cfg: Config, workdir: str | Path, *, methods: list[str] | None = None) -> dict:
    """Train each method (all of cfg.methods by default) and write the comparison files."""
    workdir = Path(workdir)
    names = methods or [m.name for m in cfg.methods]
    require(bool(names), "The config lists no methods to compare; add a 'methods:' list.")
    runs = [prepare(cfg, n) for n in names]   # validate every method before any training
    summaries, rows = {}, {}
    for name, run in zip(names, runs):
        summaries[name] = train(cfg, name, workdir / name, run=run)
        rows[name] = MetricsLog(workdir / name / "metrics.jsonl").read()
    result = {"methods": summaries}
    (workdir / "comparison.json").write_text(json.dumps(result, indent=2, default=str))
    table = format_table(summaries, cfg.train.target_losses)
    (workdir / "comparison.md").write_text(table + "\n")
    floor = next(iter(summaries.values())).get("loss_floor")
    plot_comparison(rows, workdir / "comparison.png", floor=floor)
    print(table)
    return result


def _fmt(x, spec=".4f"):
    if x is None:
        return "–"
    if isinstance(x, float):
        return format(x, spec)
    return str(x)


def format_table(summaries: dict[str, dict], targets) -> str:
    """A Markdown table: losses, steps/updates/tokens to each target, wall time."""
    head = ["method", "batch", "steps", "updates", "tokens", "aux tokens", "final val", "best val"]
    for t in targets:
        head += [f"steps→{t:g}", f"updates→{t:g}", f"tokens→{t:g}"]
    head += ["wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in summaries.items():
        row = [name, s["batch_size"], s["steps"], s["updates"], f"{s['tokens']:,}", f"{s['aux_tokens']:,}",
               _fmt(s["final_val_loss"]), _fmt(s["best_val_loss"])]
        for t in targets:
            k = target_key(t)
            tok = s["tokens_to_target"].get(k)
            row += [_fmt(s["steps_to_target"].get(k)), _fmt(s["updates_to_target"].get(k)),
                    f"{tok:,}" if tok is not None else "–"]
        row += [f"{s['wall_time_s']:.1f}" + (" (diverged)" if s.get("diverged") else "")]
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    floor = next(iter(summaries.values()), {}).get("loss_floor")
    if floor is not None:
        lines.append(f"\nBayes-optimal loss floor of the synthetic language: {floor:.4f} nats/token.")
    return "\n".join(lines)
