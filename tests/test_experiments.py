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
