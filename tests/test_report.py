"""What a person reads: the four-panel plots and the terminal table."""

import matplotlib.pyplot as plt
import pytest

from gn.train.compare import format_table, format_text_table
from gn.train.plots import AXES, comparison_figure, run_figure


def _rows(scale):
    rows = [{"step": 0, "outer_step": 0.0, "updates": 0, "grad_evals": 0.0, "wall_time_s": 0.0, "val_loss": 3.0}]
    for s in range(1, 5):
        rows.append({"step": s, "outer_step": float(s), "updates": s * scale, "grad_evals": 1.5 * s * scale,
                     "wall_time_s": 0.1 * s, "train_loss": 3.0 - 0.2 * s,
                     **({"val_loss": 3.0 - 0.25 * s} if s % 2 == 0 else {})})
    return rows


def _hlines(ax):
    return sorted({ln.get_ydata()[0] for ln in ax.get_lines() if len(set(ln.get_ydata())) == 1
                   and list(ln.get_xdata()) == [0, 1]})


@pytest.mark.parametrize("make", ["comparison", "run"])
def test_four_panels_with_target_lines(make):
    targets = (2.5, 2.2)
    fig = (comparison_figure({"adamw": _rows(1), "gn": _rows(4)}, targets=targets, floor=2.0) if make == "comparison"
           else run_figure(_rows(4), title="gn", targets=targets))
    axes = fig.axes
    assert [ax.get_xlabel() for ax in axes] == [label for _, label in AXES]
    assert "wall time without compilation" in axes[3].get_xlabel()
    for ax in axes:
        assert set(targets) <= set(_hlines(ax))
    # Each panel's x values are its own unit: gn's 4 inner updates per outer step show on the updates axis.
    val = [ln for ln in axes[1].get_lines() if ln.get_label() in ("gn", "validation")][0]
    assert list(val.get_xdata()) == [0, 8, 16]
    plt.close(fig)


def _summary(**extra):
    base = {"batch_size": 16, "outer_steps": 4, "updates": 4, "tokens": 2048, "aux_tokens": 0, "grad_evals": 4.0,
            "initial_val_loss": 3.0, "final_val_loss": 2.0, "best_val_loss": 2.0, "wall_time_s": 1.25,
            "compile_time_s": 3.5, "steps": 4, "loss_floor": None,
            **{f: {"2.5": 2} for f in ("outer_steps_to_target", "updates_to_target", "tokens_to_target",
                                       "aux_tokens_to_target", "grad_evals_to_target", "wall_time_to_target")}}
    return {**base, **extra}


def test_text_table_is_aligned_with_units_footnote_and_line_search_column():
    summaries = {"adamw": _summary(), "gn_layerwise": _summary(updates=488, grad_evals=321.5, ls_at_edge_steps=3)}
    text = format_text_table(summaries, [2.5])
    lines = text.splitlines()
    assert "|" not in text
    head, rule, adamw, gn = lines[:4]
    assert head.startswith("method") and "wall s" in head and "val (nats)" in head and "batch (seq)" in head
    assert len({len(head), len(rule), len(adamw), len(gn)}) == 1          # aligned columns
    # Column starts line up: every right-aligned cell ends where its header ends.
    assert gn.endswith("1.2") or gn.endswith("1.3")
    edge_end = head.index("LS at edge (steps)") + len("LS at edge (steps)")
    assert gn[:edge_end].endswith("3/4") and adamw[:edge_end].endswith("–")
    assert any(line.startswith("grad evals: value_and_grad equivalents") and "FLOP estimate" in line
               for line in lines)
    assert "To validation loss 2.5 nats/token:" in text
    md = format_table(summaries, [2.5])
    assert "| LS at edge |" in md and "| 3/4 |" in md
