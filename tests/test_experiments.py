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
