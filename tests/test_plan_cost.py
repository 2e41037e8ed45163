"""The dry run's planned cost (gn.studies.plan_cost) against what the runs count: the planned
cost of a run equals its summary's grad_evals × train.batch_size × seq_len for every kind of
step (a plain optimizer, the small-batch control, GN with its inner loop and line search,
GN-CG at a fixed iteration count, a statistics method with its backend)."""

from __future__ import annotations

import copy
import re

import pytest

from gn.config import config_from_dict
from gn.studies import sweep as sweep_mod
from gn.studies.plan_cost import planned_costs, run_cost
from gn.studies.spec import spec_from_dict
from gn.train.trainer import train
from tests.tiny_models import TINY_RUN

METHODS = [
    {"name": "adamw", "learning_rate": 1e-3},
    {"name": "ctl", "method": "muon", "batch_size": 2, "learning_rate": 1e-3},
    {"name": "gn", "inner_steps": 2, "inner_learning_rate": 1e-2},
    # cg_tol 1e-30: every configured CG iteration runs, so the plan (cg_iters) is what is spent
    {"name": "gn_cg", "method": "gn", "inner_solver": "cg", "inner_steps": 1, "cg_iters": 3, "cg_tol": 1e-30},
    {"name": "fog", "learning_rate": 1e-3},
]


def _raw(entry):
    raw = copy.deepcopy(TINY_RUN)
    raw["methods"] = [entry]
    return raw


@pytest.mark.parametrize("entry", METHODS, ids=[m["name"] for m in METHODS])
def test_planned_cost_is_what_the_run_counts(tmp_path, entry):
    raw = _raw(entry)
    planned = run_cost(config_from_dict(raw).to_dict())
    summary = train(config_from_dict(raw), entry["name"], tmp_path)
    counted = summary["grad_evals"] * raw["train"]["batch_size"] * raw["data"]["seq_len"]
    assert planned == pytest.approx(counted, rel=1e-9)
    if entry["name"] in ("gn", "gn_cg"):
        # the curvature's products are in it: more than the gradients over the run's tokens
        assert planned > summary["tokens"]


def test_dry_run_table_uses_the_planned_cost_and_marks_the_rough_one(tmp_path):
    spec = spec_from_dict({"config": _raw(METHODS[0]), "batch_sizes": [4], "seeds": [0], "tokens": 4 * 16 * 3,
                           "methods": [{"name": "gn", "n_inner": 2, "lr": {"values": [1e-2, 2e-2]}},
                                       {"name": "adamw", "lr": {"values": [1e-3]}}]})
    runs = sweep_mod.expand(spec)
    costs, reasons = planned_costs(runs)
    assert not reasons and set(costs) == {r.id for r in runs}
    gn = [costs[r.id] for r in runs if r.method == "gn"]
    assert gn[0] == gn[1] and gn[0] > next(r.tokens for r in runs if r.method == "gn")   # one build per config
    table = sweep_mod.format_table(runs, (costs, reasons))
    assert "~" not in table and "the method's own cost per step" in table
    rough = sweep_mod.format_table(runs)
    assert all(re.search(r"~ *[\d,]+  \S+$", line) for line in rough.splitlines()[2:2 + len(runs)])
    assert "rough cost" in rough


def test_a_run_that_cannot_be_built_keeps_the_rough_cost_with_its_reason(tmp_path):
    raw = _raw(METHODS[0])
    raw["data"] = {"source": "text", "path": str(tmp_path / "missing"), "seq_len": 16, "tokenizer": "bpe"}
    spec = spec_from_dict({"config": raw, "batch_sizes": [4], "seeds": [0], "tokens": 4 * 16 * 3,
                           "methods": [{"name": "adamw", "lr": {"values": [1e-3]}}]})
    runs = sweep_mod.expand(spec)
    costs, reasons = planned_costs(runs)
    assert costs == {} and len(reasons) == 1 and "adamw at B = 4" in reasons[0]
    assert "not built for the plan" in sweep_mod.format_table(runs, (costs, reasons))


def test_a_plan_that_fails_otherwise_names_the_error_and_keeps_the_rough_cost(monkeypatch):
    import gn.studies.plan_cost as pc

    spec = spec_from_dict({"config": _raw(METHODS[0]), "batch_sizes": [4], "seeds": [0, 1], "tokens": 4 * 16 * 3,
                           "methods": [{"name": "adamw", "lr": {"values": [1e-3]}}]})
    runs = sweep_mod.expand(spec)
    calls = []

    def broken(cfg):
        calls.append(cfg)
        raise RuntimeError("no backend")

    monkeypatch.setattr(pc, "run_cost", broken)
    costs, reasons = pc.planned_costs(runs)
    # two seeds, one configuration: built (and failed) once
    assert costs == {} and len(calls) == 1 and reasons == ["adamw at B = 4: RuntimeError: no backend"]
