"""experiments/seeds.py aggregation (pure Python, no training)."""

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("seeds", Path(__file__).parent.parent / "experiments" / "seeds.py")
seeds = importlib.util.module_from_spec(spec)
spec.loader.exec_module(seeds)


def test_aggregate_and_standard_error():
    res = {s: {"methods": {"gn": {"final_val_loss": v, "outer_steps_to_target": {"4": st}}}}
           for s, (v, st) in enumerate([(3.0, 10), (3.2, None), (3.4, 20)])}
    agg = seeds.aggregate(res, [4.0])
    assert agg["gn"]["final_val_loss"] == [3.0, 3.2, 3.4]
    assert agg["gn"]["outer_steps_to_target"]["4"] == [10, None, 20]
    assert seeds._mean_se([3.0, 3.2, 3.4]) == "3.2 ± 0.12"
    assert seeds._mean_se([]) == "–"


def _load(name):
    s = importlib.util.spec_from_file_location(name, Path(__file__).parent.parent / "experiments" / f"{name}.py")
    mod = importlib.util.module_from_spec(s)
    s.loader.exec_module(mod)
    return mod


def test_loss_at_steps_pairs_by_seed():
    las = _load("loss_at_steps")

    def run(seed, losses):
        return {"seed": seed, "evals": [{"outer_step": float(k), "val_loss": v} for k, v in enumerate(losses)]}

    by_cell = {("a", 8, 0.1): {0: run(0, [3.0, 2.5]), 1: run(1, [3.0, 2.7])},
               ("b", 8, 0.2): {0: run(0, [3.0, 2.4]), 1: run(1, [3.0, 2.6]), 2: run(2, [3.0, 9.0])}}
    rows = {r["method"]: r for r in las.table(by_cell, [1], "val_loss", ("a", 0.1))}
    b = rows["b"]["steps"]["1"]
    assert b["loss"]["n"] == 3
    d = b["minus_reference"]          # seeds 0 and 1 only (seed 2 has no partner): -0.1 both
    assert d["n"] == 2 and abs(d["mean"] + 0.1) < 1e-12 and d["se"] < 1e-12
    assert las.loss_after(by_cell["a", 8, 0.1][0], 5, "val_loss") is None


def test_units_table_merges_analyses_and_gives_a_ratio_to_each_reference():
    bt = _load("batch_tables")

    def cell(B, outer, updates, compute):
        u = {k: {"mean": v, "ci": [v * 0.9, v * 1.1]} for k, v in
             (("outer_steps", outer), ("updates", updates), ("compute", compute))}
        return {"batch_size": B, "learning_rate": 0.01, "n_reached": 3, "n_seeds": 3, "units": u}

    def analysis(**cells):
        return {"methods": {m: {"targets": {"1.9": {"best": es}}} for m, es in cells.items()}}

    a = analysis(adamw=[cell(512, 10.0, 10.0, 100.0)], gn=[cell(512, 2.0, 64.0, 50.0)],
                 ctl=[cell(512, 4.0, 32.0, 25.0)])
    b = analysis(gn=[cell(1024, 1.0, 64.0, 80.0)])
    rows = bt.units_table([a, b], "1.9", ["adamw", "ctl"]).splitlines()
    gn512 = next(r for r in rows if r.startswith("| gn | 512 "))
    cells = [c.strip() for c in gn512.strip("|").split("|")]
    assert cells[-6:] == ["0.2", "6.4", "0.5", "0.5", "2", "2"]   # / adamw, then / ctl: outer, updates, compute
    gn1024 = next(r for r in rows if r.startswith("| gn | 1024 "))
    assert gn1024.rstrip(" |").endswith("– | – | – | – | – | –")      # no reference at B = 1024
    try:
        bt.units_table([a, a], "1.9")
    except SystemExit as e:
        assert "gn at B = 512 is in two analyses" in str(e) or "in two analyses" in str(e)
    else:
        raise AssertionError("a cell given twice must be refused")


def test_read_analysis_keeps_the_named_methods_and_names_a_missing_one(tmp_path):
    import json
    bt = _load("batch_tables")
    p = tmp_path / "analysis.json"
    p.write_text(json.dumps({"methods": {"adamw": {"targets": {}}, "gn": {"targets": {}}}}))
    assert list(bt.read_analysis(f"{p}:gn")["methods"]) == ["gn"]
    assert list(bt.read_analysis(str(p))["methods"]) == ["adamw", "gn"]
    try:
        bt.read_analysis(f"{p}:gn+soap")
    except SystemExit as e:
        assert "no method soap" in str(e)
    else:
        raise AssertionError("a method the analysis lacks must be named")


def test_predict_table_compares_a_fitted_curve_with_a_batch_it_was_not_fitted_on():
    bt = _load("batch_tables")

    def cell(B, steps):
        return {"batch_size": B, "learning_rate": 0.01, "n_reached": 2, "n_seeds": 2,
                "units": {"outer_steps": {"mean": steps, "ci": [steps - 1, steps + 1], "n": 2}}}

    fit = {"unit": "steps", "S_min": 10.0, "E_min": 2000.0, "S_min_ci": [9.0, 11.0], "E_min_ci": [1800.0, 2200.0]}
    in_updates = {**fit, "unit": "steps", "S_min": 80.0, "E_min": 16000.0}   # a method's own steps: 8 updates an outer step
    fits = {"methods": {"m": {"targets": {"1.9": {"fit": in_updates, "fits": {"steps": in_updates, "outer_steps": fit},
                                                  "best": [cell(100, 30.0), cell(400, 15.0)]}}}}}
    measured = {"methods": {"m": {"targets": {"1.9": {"best": [cell(200, 22.0), cell(400, 15.0)]}}}}}
    rows = bt.predict_table([fits], [measured], "1.9").splitlines()
    assert len(rows) == 3                                   # B = 400 was fitted on: not a prediction
    cells = [c.strip() for c in rows[2].strip("|").split("|")]
    assert cells[1] == "200" and cells[3] == "20 [18, 22]"  # 10 + 2000 / 200, range 9 + 1800/200 .. 11 + 2200/200
    assert cells[-1] == "1.100"


def test_fixed_table_gives_each_cell_its_lr_interval_and_paired_difference():
    bt = _load("batch_tables")
    e = lambda b, lr, mean, vb=None, edge=None: {  # noqa: E731
        "batch_size": b, "learning_rate": lr, "final_val_loss_mean": mean, "final_val_loss_ci": [mean - 0.01, mean + 0.01],
        "n_seeds": 3, "edge": edge, "vs_best": vb}
    analysis = {"fixed_tokens": {
        "gn": [e(32, 0.01, 1.30), e(2048, 0.08, 1.76, {"method": "ctl", "diff_mean": 0.15, "diff_ci": [0.1, 0.2],
                                                         "n_pairs": 3})],
        "ctl": [e(32, 0.0119, 1.57, {"method": "gn", "diff_mean": 0.27, "diff_ci": [0.2, 0.3], "n_pairs": 3}, "low"),
                e(2048, 0.0476, 1.62)]}}
    rows = bt.fixed_table(analysis).splitlines()
    assert rows[0] == "| method | B = 32 | B = 2048 |"
    gn_row, ctl_row = rows[2], rows[3]
    assert "1.300 [1.29, 1.31] (n = 3, lr 0.01); best" in gn_row and "Δ +0.150 [0.1, 0.2] vs ctl" in gn_row
    assert "lr 0.0119, low" in ctl_row and ctl_row.endswith("1.620 [1.61, 1.63] (n = 3, lr 0.0476); best |")
