"""`gn analyze`: crossing interpolation, the McCandlish fit and its bootstrap,
Zhang's CBS, best lr per batch, the table reader, the CLI's JSON and run-dir
analysis on fake run directories (no training)."""

from __future__ import annotations

import csv
import io
import json
import math
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import yaml

from gn.errors import ConfigError
from gn.studies import cbs
from gn.studies.analyze import analyze_runs, analyze_table, read_table, write_outputs
from gn.studies.report import render_report

S_MIN, E_MIN = 200.0, 12800.0        # B_crit = 64
BATCHES = [8, 16, 32, 64, 128, 256, 512]


def _synthetic_rows(noise: float, seeds=(0, 1, 2), rng_seed: int = 1):
    rng = np.random.default_rng(rng_seed)
    rows = []
    for b in BATCHES:
        for s in seeds:
            steps = (S_MIN + E_MIN / b) * (math.exp(rng.normal(0, noise)) if noise else 1.0)
            rows.append({"method": "adamw", "batch_size": b, "learning_rate": 1e-3, "seed": s, "target": "3.5",
                         "steps_to_target": steps})
    return rows


def _write_csv(path, rows, fields=("method", "batch_size", "learning_rate", "seed", "target", "steps_to_target")):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


# ---------------------------------------------------------------- crossing

def test_crossing_interpolates_between_evaluations():
    # loss 4.0 at step 10, 3.0 at step 20: target 3.25 is 3/4 of the way -> step 17.5
    assert cbs.crossing([0, 10, 20, 30], [5.0, 4.0, 3.0, 2.5], 3.25) == pytest.approx(17.5)
    # any x-axis: tokens 1000 at loss 4.0, 2000 at 3.0 -> 1000 + 0.75*1000
    assert cbs.crossing_x([0, 1000, 2000, 3000], [5.0, 4.0, 3.0, 2.5], 3.25) == pytest.approx(1750.0)


def test_crossing_exact_hit_never_and_step_zero():
    assert cbs.crossing([0, 10, 20], [5.0, 4.0, 3.0], 4.0) == 10.0
    assert cbs.crossing([0, 10, 20], [5.0, 4.0, 3.5], 3.0) is None
    assert cbs.crossing([0, 10, 20], [2.0, 1.5, 1.0], 3.0) == 0.0
    # a non-finite evaluation is never a crossing and is not interpolated across
    assert cbs.crossing([0, 10, 20], [5.0, float("nan"), 3.0], 4.0) == 20.0


def test_crossing_axes_share_one_fraction():
    axes = {"step": [0, 10, 20], "tokens": [0, 640, 1280], "wall_time_s": [0.0, 1.0, 3.0]}
    hit = cbs.crossing_axes(axes, [5.0, 4.0, 2.0], 3.0)   # halfway between the 2nd and 3rd evaluation
    assert hit == pytest.approx({"step": 15.0, "tokens": 960.0, "wall_time_s": 2.0})


# ---------------------------------------------------------------- fit

def test_fit_exact_without_noise():
    b = np.array(BATCHES, dtype=float)
    fit = cbs.fit_mccandlish(b, S_MIN + E_MIN / b)
    assert fit["ok"]
    assert fit["S_min"] == pytest.approx(S_MIN, rel=1e-9)
    assert fit["E_min"] == pytest.approx(E_MIN, rel=1e-9)
    assert fit["B_crit"] == pytest.approx(E_MIN / S_MIN, rel=1e-9)


def test_fit_with_noise_recovers_truth_inside_seed_interval():
    from gn.studies import intervals

    rows = _synthetic_rows(noise=0.05)
    cells = {}
    for r in rows:
        cells.setdefault(r["batch_size"], {}).setdefault(r["learning_rate"], []).append(r["steps_to_target"])
    res = intervals.seed_bootstrap(cells, n_boot=400)
    assert res["S_min"] == pytest.approx(S_MIN, rel=0.15)
    assert res["E_min"] == pytest.approx(E_MIN, rel=0.15)
    assert res["B_crit"] == pytest.approx(E_MIN / S_MIN, rel=0.25)
    assert intervals.seed_bootstrap(cells, n_boot=400)["B_crit_ci"] == res["B_crit_ci"]   # fixed RNG seed
    lo, hi = res["B_crit_ci"]
    assert lo < res["B_crit"] < hi and res["ci_method"] == intervals.SEED_BOOTSTRAP


def test_fit_guards_nonpositive_s_min():
    b = np.array([8.0, 16.0, 32.0])
    fit = cbs.fit_mccandlish(b, 1000.0 / b - 5.0)        # steps fall faster than 1/B: S_min < 0
    assert not fit["ok"] and fit["B_crit"] is None and fit["S_min"] < 0 and "S_min" in fit["note"]
    assert cbs.fit_mccandlish([8.0, 8.0], [10.0, 11.0])["B_crit"] is None   # one batch size only


# ---------------------------------------------------------------- Zhang CBS

def test_zhang_cbs_raw_variant_log_interpolated():
    # reference B=4, S=100 -> linear scaling 400/B. Excess 27.5*16/400 - 1 = 0.1 at B=16 and
    # 8.125*64/400 - 1 = 0.3 at B=64: 20% is halfway in log B between 16 and 64 -> B = 32.
    z = cbs.zhang_cbs_raw([4, 16, 64], [100.0, 27.5, 8.125])
    assert z["excess"]["16"] == pytest.approx(0.1) and z["excess"]["64"] == pytest.approx(0.3)
    assert z["cbs"] == pytest.approx(32.0)
    assert cbs.zhang_cbs_raw([4, 16], [100.0, 25.0])["above_grid"]          # perfect scaling: never exceeds


# ---------------------------------------------------------------- best lr

def test_best_per_batch_picks_lr_and_flags_edge():
    rows = []
    for lr, steps in ((1e-3, [100, 110]), (3e-3, [80, 90]), (1e-2, [None, 50])):
        for seed, s in enumerate(steps):
            rows.append({"method": "m", "batch_size": 32, "learning_rate": lr, "seed": seed, "steps": s})
    for lr, steps in ((1e-3, [100]), (3e-3, [60])):
        rows.append({"method": "m", "batch_size": 64, "learning_rate": lr, "seed": 0, "steps": steps[0]})
    best = {b["batch_size"]: b for b in cbs.best_per_batch(rows)}
    # 1e-2 has the fastest seed but missed on the other: an unreached seed counts as worst
    assert best[32]["learning_rate"] == 3e-3 and not best[32]["lr_at_edge"]
    assert best[32]["mean"] == pytest.approx(85.0) and best[32]["se"] == pytest.approx(5.0)
    assert best[64]["learning_rate"] == 3e-3 and best[64]["lr_at_edge"] and best[64]["edge"] == "high"


def test_best_per_batch_marks_ties_and_drops_an_edge_a_tie_reaches_inside():
    rows = []
    # B = 32: whole-step counts tie at the low edge and inside -> lowest reported, no edge, tie listed
    # B = 64: the low edge ties with the inside 0.02 (0.04 is worse on one seed): no edge
    # B = 128: a strict best at the low edge stays an edge, no tie
    for B, grid in ((32, {0.01: [4, 4], 0.02: [4, 4], 0.04: [5, 5]}), (64, {0.01: [3, 3], 0.02: [3, 3], 0.04: [3, 4]}),
                    (128, {0.01: [6, 6], 0.02: [7, 7], 0.04: [8, 8]})):
        for lr, steps in grid.items():
            for seed, s in enumerate(steps):
                rows.append({"method": "m", "batch_size": B, "learning_rate": lr, "seed": seed, "steps": s})
    best = {b["batch_size"]: b for b in cbs.best_per_batch(rows)}
    assert best[32]["learning_rate"] == 0.01 and best[32]["tied_lrs"] == [0.01, 0.02]
    assert best[32]["edge"] is None and not best[32]["lr_at_edge"]
    assert best[64]["tied_lrs"] == [0.01, 0.02] and best[64]["edge"] is None
    assert best[128]["tied_lrs"] == [] and best[128]["edge"] == "low" and best[128]["lr_at_edge"]
    # an exact tie goes to the cell with more seeds: 0.02 on three seeds beats 0.01 on two
    rows += [{"method": "m", "batch_size": 256, "learning_rate": lr, "seed": s, "steps": 3}
             for lr, seeds in ((0.01, (0, 1)), (0.02, (0, 1, 2))) for s in seeds]
    b256 = next(b for b in cbs.best_per_batch(rows) if b["batch_size"] == 256)
    assert b256["learning_rate"] == 0.02 and b256["n_seeds"] == 3 and b256["tied_lrs"] == [0.01, 0.02]
    # the report's edge column names the tie
    from gn.studies.report import _edge_text
    assert _edge_text(best[32]) == "tie 0.01/0.02" and _edge_text(best[128]) == "low"


# ---------------------------------------------------------------- table

def test_table_missing_column_and_empty_are_refused(tmp_path):
    rows = _synthetic_rows(noise=0.0)
    p = _write_csv(tmp_path / "t.csv", rows, ("method", "batch_size", "learning_rate", "seed", "target"))
    with pytest.raises(ConfigError, match="steps_to_target"):
        analyze_table(p)
    p = _write_csv(tmp_path / "e.csv", [])
    with pytest.raises(ConfigError, match="no rows"):
        analyze_table(p)
    bad = [dict(rows[0]), dict(rows[1], batch_size="sixteen")]
    with pytest.raises(ConfigError, match="row 3.*batch_size"):
        read_table(_write_csv(tmp_path / "b.csv", bad))


def test_cli_table_json(tmp_path):
    from gn.cli import main

    rows = _synthetic_rows(noise=0.0)
    rows.append(dict(rows[0], seed=9, steps_to_target=""))      # one unreached run
    p = _write_csv(tmp_path / "t.csv", rows)
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["analyze", "--table", str(p), "--json", "--out", str(tmp_path / "out")]) == 0
    out = json.loads(buf.getvalue())
    fit = out["methods"]["adamw"]["targets"]["3.5"]["fit"]
    assert fit["S_min"] == pytest.approx(S_MIN, rel=1e-6) and fit["E_min"] == pytest.approx(E_MIN, rel=1e-6)
    assert fit["B_crit"] == pytest.approx(64.0, rel=1e-6)
    assert len(fit["B_crit_ci"]) == 2
    assert (tmp_path / "out" / "analysis.json").is_file() and (tmp_path / "out" / "report.md").is_file()
    assert main(["analyze", "--table", str(tmp_path / "missing.csv")]) == 2


# ---------------------------------------------------------------- run directories

def _fake_run(d, *, method, batch, lr, seed, curve, every=10, diverged=False, registered=None):
    """A run directory as `gn train` writes it: config.yaml, metrics.jsonl, summary.json."""
    d.mkdir(parents=True)
    registered = registered or method
    lr_key = "inner_learning_rate" if registered.startswith("gn") else "learning_rate"
    (d / "config.yaml").write_text(yaml.safe_dump({
        "train": {"batch_size": batch, "seed": seed, "target_losses": [3.5]},
        "methods": [{"name": method, "learning_rate": lr}], "data": {"seq_len": 16}}))
    lines = []
    for i, loss in enumerate(curve):
        step = i * every
        lines.append({"step": step, "outer_step": float(step), "tokens": step * batch * 16, "aux_tokens": 0,
                      "updates": step, "grad_evals": float(step), "wall_time_s": 0.1 * step, "train_loss": loss,
                      "val_loss": loss})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (d / "summary.json").write_text(json.dumps({
        "method": method, "registered_method": registered, "batch_size": batch, "seq_len": 16,
        "hparams": {lr_key: lr}, "diverged": diverged, "family": "first_order"}))


def test_analyze_runs_on_fake_dirs(tmp_path):
    root = tmp_path / "sweep"
    # batch 16: lr 1e-3 crosses 3.5 between 4.0 (step 10) and 3.0 (step 20) -> 15; lr 3e-3 crosses at 10
    # exactly; lr 1e-2 diverged (its early curve would have been fastest)
    for seed in (0, 1):
        _fake_run(root / f"a16_lo_{seed}", method="adamw", batch=16, lr=1e-3, seed=seed, curve=[5, 4, 3, 2])
        _fake_run(root / f"a16_mid_{seed}", method="adamw", batch=16, lr=3e-3, seed=seed, curve=[5, 3.5, 3, 2])
        _fake_run(root / f"a16_hi_{seed}", method="adamw", batch=16, lr=1e-2, seed=seed, curve=[5, 3.0],
                  diverged=True)
        # batch 64: 3.75 at step 10, 3.25 at step 20 -> 3.5 halfway, step 15; a single lr is an edge
        _fake_run(root / "b64" / f"s{seed}", method="adamw", batch=64, lr=3e-3, seed=seed, curve=[4.5, 3.75, 3.25])
        _fake_run(root / f"g16_{seed}", method="gn", batch=16, lr=0.5, seed=seed, curve=[5, 3.4, 3], every=5)
    res = analyze_runs([root], fixed_tokens=True, n_boot=50)
    best = {e["batch_size"]: e for e in res["methods"]["adamw"]["targets"]["3.5"]["best"]}
    assert best[16]["learning_rate"] == 3e-3 and best[16]["steps_mean"] == pytest.approx(10.0)
    assert not best[16]["lr_at_edge"]
    assert best[64]["steps_mean"] == pytest.approx(15.0) and best[64]["lr_at_edge"]
    assert best[64]["tokens_mean"] == pytest.approx(15.0 * 64 * 16)
    assert res["methods"]["adamw"]["n_diverged"] == 2 and res["counts"]["runs"] == 10
    gn_best = res["methods"]["gn"]["targets"]["3.5"]["best"][0]
    # 5 -> 3.4 over steps 0..5: GN moves only at whole outer steps, so it crosses at step 5 (the
    # first evaluation at or below), never at the interpolated 5·1.5/1.6; its bracket is [0, 5]
    assert gn_best["steps_mean"] == 5.0 and gn_best["crossing_rule"] == "first_at_or_below"
    assert gn_best["units"]["steps"]["n_wide"] == 2            # evaluated every 5 steps: bracket > 1 step
    assert res["ratios"]["3.5"]["adamw/gn"]["16"] == pytest.approx(10.0 / 5.0)
    # interpolated at 15 inside the bracket [10, 20]: 10 steps wide, more than 25 % of 15, so flagged
    assert best[64]["crossing_rule"] == "interpolated" and best[64]["units"]["steps"]["n_wide"] == 2
    ft = {e["batch_size"]: e for e in res["fixed_tokens"]["adamw"]}
    assert ft[16]["final_val_loss_mean"] == 2 and ft[16]["n_diverged"] == 0
    files = write_outputs(res, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert saved["methods"]["adamw"]["targets"]["3.5"]["best"][0]["learning_rate"] == 3e-3
    assert "B_crit" in (tmp_path / "out" / "report.md").read_text()
    assert any(f.suffix == ".png" for f in files)


def test_plot_failure_warns_and_keeps_json_and_report(tmp_path, monkeypatch):
    from gn.studies import cbs_plots

    def boom(*args):
        raise RuntimeError("no display")

    monkeypatch.setattr(cbs_plots, "plot_best_lr", boom)
    res = analyze_table(_write_csv(tmp_path / "t.csv", _synthetic_rows(noise=0.0)), n_boot=20)
    with pytest.warns(UserWarning, match="best_lr.png"):
        write_outputs(res, tmp_path / "out")
    assert (tmp_path / "out" / "analysis.json").is_file() and (tmp_path / "out" / "report.md").is_file()
    assert not (tmp_path / "out" / "best_lr.png").exists()
    assert (tmp_path / "out" / "steps_vs_batch_3.5.png").is_file()


def test_sweep_run_json_takes_precedence_and_cli_json_on_runs(tmp_path):
    from gn.cli import main

    root = tmp_path / "runs"
    for i, (batch, curve) in enumerate(((8, [5, 4, 3]), (32, [5, 3.4, 3]))):
        d = root / f"r{i}"
        _fake_run(d, method="gn", batch=batch, lr=0.5, seed=0, curve=curve, registered="gn")
        # the sweep groups these under its own display name, lr and seed
        (d / "sweep_run.json").write_text(json.dumps({"method": "gn-cg", "batch_size": batch,
                                                      "learning_rate": 0.25, "seed": 7}))
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["analyze", str(root), "--json", "--targets", "3.5"]) == 0
    out = json.loads(buf.getvalue())
    assert list(out["methods"]) == ["gn-cg"]
    best = out["methods"]["gn-cg"]["targets"]["3.5"]["best"]
    assert [e["learning_rate"] for e in best] == [0.25, 0.25] and best[0]["seeds"] == [7]
    assert [e["steps_mean"] for e in best] == pytest.approx([20.0, 10.0])   # whole outer steps
    assert set(out["methods"]["gn-cg"]["targets"]["3.5"]["fit"]) >= {"S_min", "E_min", "B_crit", "B_crit_ci"}
    assert (root / "analysis.json").is_file()          # default --out: the first input directory
    assert main(["analyze", str(root), "--targets", "3.5,abc"]) == 2


def test_a_run_stopped_by_another_reading_is_named_not_silently_unreached(tmp_path):
    """A run that stopped at "targets_reached" (the EMA's crossing, under the older sweep rule) while
    the reading analysed (raw) stayed above a target is listed as cut, in analysis and report."""
    root = tmp_path / "sweep"
    _fake_run(root / "cut", method="adamw", batch=16, lr=1e-3, seed=0, curve=[5, 4, 3.6])
    _fake_run(root / "done", method="adamw", batch=16, lr=1e-3, seed=1, curve=[5, 4, 3.2])
    _fake_run(root / "short", method="adamw", batch=16, lr=1e-3, seed=2, curve=[5, 4, 3.7])
    for name, reason in (("cut", "targets_reached"), ("done", "targets_reached"), ("short", "steps")):
        p = root / name / "summary.json"
        p.write_text(json.dumps({**json.loads(p.read_text()), "stop_reason": reason}))
    with pytest.warns(UserWarning, match="stopped at the targets of another reading"):
        res = analyze_runs([root], n_boot=20, read="raw")
    assert [Path(d).name for d in res["cut_runs"]] == ["cut"]          # "short" ran out of steps: unreached
    assert res["counts"]["stopped before this reading crossed"] == 1
    assert "Stopped before this reading crossed" in render_report(res)


def test_fixed_tokens_at_a_smaller_budget_reads_that_evaluation(tmp_path):
    """--fixed-tokens-at T reads each run at its evaluation at T tokens: the best lr may change with the
    budget; a budget no run evaluated at, or one a run ended short of, is refused naming the run."""
    from gn.cli import main

    root = tmp_path / "ft"
    # batch 16, 16 tokens a sequence, evaluated every 10 steps = 2560 tokens. At 2560 tokens lr 1e-2 is
    # ahead (3.0 against 4.0); at the end (7680) lr 1e-3 is (2.0 against 2.5)
    for s in (0, 1):
        _fake_run(root / f"lo{s}", method="adamw", batch=16, lr=1e-3, seed=s, curve=[5, 4.0 + 0.1 * s, 3, 2])
        _fake_run(root / f"hi{s}", method="adamw", batch=16, lr=1e-2, seed=s, curve=[5, 3.0 + 0.1 * s, 2.8, 2.5])
        _fake_run(root / f"dv{s}", method="adamw", batch=16, lr=3e-2, seed=s, curve=[5, 9.0], diverged=True)
    end = analyze_runs([root], fixed_tokens=True, n_boot=20)["fixed_tokens"]["adamw"][0]
    assert end["learning_rate"] == 1e-3 and end["final_val_loss_mean"] == pytest.approx(2.0)
    early = analyze_runs([root], fixed_tokens_at=2560, n_boot=20)
    e = early["fixed_tokens"]["adamw"][0]
    assert early["fixed_tokens_at"] == 2560 and e["learning_rate"] == 1e-2 and e["tokens_max"] == 2560
    assert e["final_val_loss"] == pytest.approx([3.0, 3.1])
    # at the last evaluation the explicit budget equals the default reading
    last = analyze_runs([root], fixed_tokens_at=7680, n_boot=20)["fixed_tokens"]["adamw"][0]
    assert last["final_val_loss"] == end["final_val_loss"] and last["learning_rate"] == end["learning_rate"]
    with pytest.raises(ConfigError, match="no evaluation at 3,000 tokens"):
        analyze_runs([root], fixed_tokens_at=3000, n_boot=20)
    with pytest.raises(ConfigError, match="it ended at 7,680"):
        analyze_runs([root], fixed_tokens_at=10240, n_boot=20)
    assert main(["analyze", str(root), "--fixed-tokens-at", "2560", "--out", str(tmp_path / "o")]) == 0
    assert "2,560 tokens" in (tmp_path / "o" / "report.md").read_text()


def test_fixed_tokens_interval_and_paired_difference(tmp_path):
    """Final losses share a large per-seed offset (the data order): the difference to the batch's best is
    read paired by seed, so its interval is narrow and excludes 0 although the two means' intervals overlap."""
    from scipy import stats

    root = tmp_path / "ft"
    offset = {0: 0.0, 1: 0.3, 2: -0.3}
    a = {s: 2.0 + offset[s] for s in offset}
    b = {0: 2.10, 1: 2.42, 2: -0.3 + 2.09}
    for s in offset:
        _fake_run(root / f"a{s}", method="adamw", batch=16, lr=1e-3, seed=s, curve=[5, 4, a[s]])
        _fake_run(root / f"m{s}", method="muon", batch=16, lr=1e-2, seed=s, curve=[5, 4, b[s]])
    ft = analyze_runs([root], fixed_tokens=True, n_boot=20)["fixed_tokens"]
    ea, eb = ft["adamw"][0], ft["muon"][0]
    vals = list(a.values())
    h = stats.t.ppf(0.975, 2) * np.std(vals, ddof=1) / np.sqrt(3)
    assert ea["final_val_loss_ci"] == pytest.approx([np.mean(vals) - h, np.mean(vals) + h])
    assert ea["vs_best"] is None and eb["vs_best"]["method"] == "adamw"
    d = [b[s] - a[s] for s in (0, 1, 2)]
    hd = stats.t.ppf(0.975, 2) * np.std(d, ddof=1) / np.sqrt(3)
    assert eb["vs_best"]["diff_mean"] == pytest.approx(np.mean(d))
    assert eb["vs_best"]["diff_ci"] == pytest.approx([np.mean(d) - hd, np.mean(d) + hd])
    # paired: the difference excludes 0; unpaired, the two means' intervals overlap
    assert eb["vs_best"]["diff_ci"][0] > 0 and ea["final_val_loss_ci"][1] > eb["final_val_loss_ci"][0]
    assert eb["vs_best"]["n_pairs"] == 3
    write_outputs(analyze_runs([root], fixed_tokens=True, n_boot=20), tmp_path / "o")
    text = (tmp_path / "o" / "report.md").read_text()
    assert "paired by seed" in text and "vs adamw" in text
