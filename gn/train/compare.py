"""Run every method of a config on the same data and initialisation, and compare.

Writes `comparison.json` ({"methods": {NAME: summary}}), `comparison.md` (markdown
tables), `comparison.png` (validation loss against outer steps, sequential updates,
gradient evaluations and wall time without compilation, with the target losses)
and prints the same tables as aligned plain text with units. Each method runs in `workdir/NAME` and resumes from its checkpoints,
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
    plot_comparison(rows, workdir / "comparison.png", floor=floor, targets=cfg.train.target_losses)
    print(format_text_table(summaries, cfg.train.target_losses))
    return result


def _fmt(x, spec=".4f"):
    if x is None:
        return "–"
    if isinstance(x, float):
        return format(x, spec)
    return str(x)


def _num(x, spec=",.0f"):
    return "–" if x is None else format(x, spec)


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def format_table(summaries: dict[str, dict], targets) -> str:
    """Markdown tables: one overall, then one per target loss.

    Outer steps are steps of the reference batch (train.batch_size): a method
    at a smaller batch (the small-batch control) needs several of its steps
    per outer step. Updates are sequential parameter updates (a GN outer step
    hides N inner updates); grad evals are value_and_grad equivalents at the
    reference batch (FLOP estimates for GN); aux tokens are line-search tokens.
    """
    head = ["method", "batch", "outer steps", "updates", "train tokens", "aux tokens", "grad evals",
            "initial val", "final val", "best val", "LS at edge", "wall s"]
    lines = [_row(head), "|" + "---|" * len(head)]
    for name, s in summaries.items():
        lines.append(_row([name, s["batch_size"], _num(s["outer_steps"], "g"), s["updates"], _num(s["tokens"]),
                           _num(s["aux_tokens"]), _num(s["grad_evals"], ".1f"), _fmt(s["initial_val_loss"]),
                           _fmt(s["final_val_loss"]), _fmt(s["best_val_loss"]), _edge(s),
                           f"{s['wall_time_s']:.1f}" + (" (diverged)" if s.get("diverged") else "")]))
    for t in targets:
        k = target_key(t)
        head = ["method", "outer steps", "updates", "train tokens", "aux tokens", "grad evals", "wall s"]
        lines += ["", f"To validation loss {t:g}:", "", _row(head), "|" + "---|" * len(head)]
        for name, s in summaries.items():
            lines.append(_row([_read(name, s), _num(s["outer_steps_to_target"].get(k), "g"),
                               _num(s["updates_to_target"].get(k), "g"), _num(s["tokens_to_target"].get(k)),
                               _num(s["aux_tokens_to_target"].get(k)), _num(s["grad_evals_to_target"].get(k), ".1f"),
                               _num(s["wall_time_to_target"].get(k), ".1f")]))
    floor = next(iter(summaries.values()), {}).get("loss_floor")
    if floor is not None:
        lines.append(f"\nBayes-optimal loss floor of the synthetic language: {floor:.4f} nats/token.")
    lines.append("\n– = target not reached.")
    lines += [f"\n{note}" for note in TEXT_FOOTNOTES]
    return "\n".join(lines)


def _read(name: str, s: dict) -> str:
    """The method's name, marked when its to-target numbers read the EMA (train.target_from)."""
    return name + (" (EMA)" if s.get("target_metric") == "val_loss_ema" else "")


def _edge(s: dict) -> str:
    """Line-search steps at the grid's edge (GN methods), of all steps."""
    if s.get("ls_at_edge_steps") is None:
        return "–"
    return f"{s['ls_at_edge_steps']}/{s.get('steps', '?')}"


def _aligned(head: list[str], rows: list[list[str]]) -> list[str]:
    """Plain-text columns: the first left-aligned, the others right-aligned."""
    cells = [head] + rows
    widths = [max(len(str(r[i])) for r in cells) for i in range(len(head))]

    def line(r):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return [line(head), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]


TEXT_FOOTNOTES = (
    "outer steps: steps of the reference batch (train.batch_size); updates: sequential parameter updates "
    "(a GN outer step makes N inner updates).",
    "grad evals: value_and_grad equivalents at the reference batch; for GN methods a FLOP estimate of the "
    "inner steps and the line search.",
    "LS at edge: GN outer steps whose line-search step size sat at the edge of its grid, of all steps "
    "(– = no line search).",
    "wall s: seconds of computation, compilation excluded (compile s).",
)


def format_text_table(summaries: dict[str, dict], targets) -> str:
    """The terminal table: aligned plain text with units in the headers, one block
    overall and one per target loss, then footnotes saying what the units are."""
    head = ["method", "batch (seq)", "outer steps", "updates", "train tokens", "aux tokens", "grad evals",
            "initial val (nats)", "final val (nats)", "best val (nats)", "LS at edge (steps)", "compile s", "wall s"]
    rows = []
    for name, s in summaries.items():
        rows.append([name, s["batch_size"], _num(s["outer_steps"], "g"), s["updates"], _num(s["tokens"]),
                     _num(s["aux_tokens"]), _num(s["grad_evals"], ".1f"), _fmt(s["initial_val_loss"]),
                     _fmt(s["final_val_loss"]), _fmt(s["best_val_loss"]), _edge(s),
                     _num(s.get("compile_time_s"), ".1f"),
                     f"{s['wall_time_s']:.1f}" + (" (diverged)" if s.get("diverged") else "")])
    lines = _aligned(head, rows)
    for t in targets:
        k = target_key(t)
        head = ["method", "outer steps", "updates", "train tokens", "aux tokens", "grad evals", "wall s"]
        rows = [[_read(name, s), _num(s["outer_steps_to_target"].get(k), "g"), _num(s["updates_to_target"].get(k), "g"),
                 _num(s["tokens_to_target"].get(k)), _num(s["aux_tokens_to_target"].get(k)),
                 _num(s["grad_evals_to_target"].get(k), ".1f"), _num(s["wall_time_to_target"].get(k), ".1f")]
                for name, s in summaries.items()]
        lines += ["", f"To validation loss {t:g} nats/token:"] + _aligned(head, rows)
    lines.append("")
    floor = next(iter(summaries.values()), {}).get("loss_floor")
    if floor is not None:
        lines.append(f"Bayes-optimal loss floor of the synthetic language: {floor:.4f} nats/token.")
    lines += ["– = target not reached.", *TEXT_FOOTNOTES]
    return "\n".join(lines)
