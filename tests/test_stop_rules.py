"""Early-stop rules: train.stop_reads (wait for the raw parameters and the EMA alike),
train.stop_after_rejected (a stalled GN run), and the continuation of a run whose recorded
stop no longer holds under its config."""

from __future__ import annotations

import json

import pytest

from gn.config import config_from_dict
from gn.errors import ConfigError
from gn.studies import sweep as sweep_mod
from gn.studies.spec import spec_from_dict
from gn.train.hooks import EvalHistory, early_stop, stop_holds, stop_keys
from gn.train.trainer import train
from tests.tiny_models import EMA_RUN

BASE = EMA_RUN


def _cfg(**train_keys):
    return config_from_dict({**BASE, "train": {**BASE["train"], **train_keys},
                             "methods": [{"name": "adamw", "learning_rate": 0.03}]})


def _evals(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "val_loss" in r and r["step"] > 0]


def _target_raw_reaches_first(tmp_path):
    """A target the raw parameters reach at an earlier step than the lagging EMA (or never)."""
    train(_cfg(), "adamw", tmp_path / "probe")
    rows = _evals(tmp_path / "probe")
    for i, r in enumerate(rows):
        ema_best = min(q["val_loss_ema"] for q in rows[:i + 1])
        if r["val_loss"] < ema_best - 1e-3:
            t = 0.5 * (r["val_loss"] + ema_best)
            raw_step = next(q["step"] for q in rows if q["val_loss"] <= t)
            ema_step = next((q["step"] for q in rows if q["val_loss_ema"] <= t), None)
            return t, raw_step, ema_step, rows
    pytest.fail("the probe run has no evaluation where the raw loss leads the EMA's")


def test_stop_reads_all_waits_for_raw_and_ema(tmp_path):
    t, raw_step, ema_step, _ = _target_raw_reaches_first(tmp_path)
    assert ema_step is None or ema_step > raw_step
    stop = {"target_losses": [t], "stop_at_target": True, "target_from": "raw"}
    first = train(_cfg(**stop), "adamw", tmp_path / "raw")
    both = train(_cfg(**stop, stop_reads="all"), "adamw", tmp_path / "all")
    assert first["steps"] == raw_step and first["stop_reason"] == "targets_reached"
    assert both["steps"] == (ema_step or 6)
    assert both["stop_reason"] == ("targets_reached" if ema_step else "steps")
    # The to-target numbers still read target_from (raw): the later stop changes nothing there.
    assert both["steps_to_target"] == first["steps_to_target"]


def test_a_run_stopped_under_the_older_rule_continues_to_the_same_numbers(tmp_path):
    """Stopped at the raw crossing (stop_reads: target), then rerun in its workdir with stop_reads: all:
    it continues from the stop's checkpoint and ends where a run made with the new rule ends,
    with the same losses at every evaluation."""
    t, raw_step, ema_step, _ = _target_raw_reaches_first(tmp_path)
    stop = {"target_losses": [t], "stop_at_target": True, "target_from": "raw"}
    train(_cfg(**stop), "adamw", tmp_path / "w")
    assert len(_evals(tmp_path / "w")) == raw_step
    again = train(_cfg(**stop, stop_reads="all"), "adamw", tmp_path / "w")
    fresh = train(_cfg(**stop, stop_reads="all"), "adamw", tmp_path / "fresh")
    assert again["steps"] == fresh["steps"] == (ema_step or 6) > raw_step
    got, want = _evals(tmp_path / "w"), _evals(tmp_path / "fresh")
    assert [r["step"] for r in got] == [r["step"] for r in want]
    assert [(r["val_loss"], r["val_loss_ema"]) for r in got] == [(r["val_loss"], r["val_loss_ema"]) for r in want]
    # Its stop holds now: a third call trains nothing and returns the stored summary.
    assert train(_cfg(**stop, stop_reads="all"), "adamw", tmp_path / "w") == again


def test_stop_holds_reads_the_config_against_the_metrics():
    tcfg = _cfg(target_losses=[2.0], stop_at_target=True, stop_reads="all").train
    rows = [{"step": 0, "val_loss": 3.0, "val_loss_ema": 3.0},
            {"step": 1, "val_loss": 1.9, "val_loss_ema": 2.4, "step_rejected": 1.0},
            {"step": 2, "step_rejected": 1.0}]
    keys = stop_keys(tcfg)
    assert keys == ("val_loss", "val_loss_ema")
    assert not stop_holds(tcfg, keys, rows, "targets_reached")          # the EMA has not crossed
    assert stop_holds(tcfg, ("val_loss",), rows, "targets_reached")     # the raw reading has
    assert stop_holds(tcfg, keys, rows + [{"step": 3, "val_loss": 1.9, "val_loss_ema": 1.99}], "targets_reached")
    assert stop_holds(tcfg, keys, rows, "max_tokens") and stop_holds(tcfg, keys, rows, "steps")
    stalled = _cfg(stop_after_rejected=2).train
    assert stop_holds(stalled, keys, rows, "stalled")
    assert not stop_holds(_cfg(stop_after_rejected=3).train, keys, rows, "stalled")
    assert not stop_holds(_cfg().train, keys, rows, "stalled")          # 0: the rule is off


def test_stalled_stop_counts_consecutive_rejected_steps():
    rows = [{"step": 0, "val_loss": 3.0}, {"step": 1, "step_rejected": 1.0}, {"step": 2, "step_rejected": 0.0},
            {"step": 3, "step_rejected": 1.0}, {"step": 4, "step_rejected": 1.0}]
    history = EvalHistory.of(rows)
    assert history.rejected_run == 2                                     # steps 3 and 4; step 2 was taken
    history.update({"step": 5, "step_rejected": 1.0})
    assert history.rejected_run == 3
    tcfg = _cfg(stop_after_rejected=3).train
    record = {"step": 5, "tokens": 5 * 64}
    assert early_stop(tcfg, record, history.best, rejected_run=history.rejected_run) == "stalled"
    assert early_stop(tcfg, record, history.best, rejected_run=2) is None
    assert early_stop(_cfg().train, record, history.best, rejected_run=100) is None
    history.update({"step": 6, "step_rejected": 0.0})
    assert history.rejected_run == 0


def test_stop_rule_keys_refuse_bad_values_before_any_compute():
    for bad, key in [({"stop_reads": "raw"}, "train.stop_reads"), ({"stop_after_rejected": -1}, "stop_after_rejected"),
                     ({"stop_after_rejected": 1.5}, "stop_after_rejected"),
                     ({"stop_after_rejected": True}, "stop_after_rejected")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            _cfg(**bad)


def _spec(**extra):
    return spec_from_dict({"config": {**BASE, "train": {k: v for k, v in BASE["train"].items() if k != "ema_decay"}},
                           "tokens": 4 * 16 * 3, "batch_sizes": [4], "seeds": [0], "targets": [2.0],
                           "stop_at_target": True, "methods": [{"name": "adamw", "lr": {"values": [0.01]}}],
                           **extra})


def test_sweep_stops_on_both_readings_and_its_stop_keys_leave_run_names_alone():
    plain, stalled = sweep_mod.expand(_spec()), sweep_mod.expand(_spec(stop_after_rejected=3))
    train_cfg = dict(plain[0].config["train"])
    assert train_cfg["stop_reads"] == "all" and train_cfg["stop_after_rejected"] == 0
    assert dict(stalled[0].config["train"])["stop_after_rejected"] == 3
    # The stop rule decides when a run ends, not what it computes: the same workdir.
    assert plain[0].name == stalled[0].name
    changed = {**plain[0].config, "train": {**train_cfg, "stop_reads": "target"}}
    assert sweep_mod.run_digest(changed) == sweep_mod.run_digest(plain[0].config)
    assert sweep_mod.run_digest({**plain[0].config, "train": {**train_cfg, "seed": 1}}) != \
        sweep_mod.run_digest(plain[0].config)
    with pytest.raises(ConfigError, match="stop_after_rejected"):
        _spec(stop_after_rejected=-2)


def test_sweep_runner_reopens_a_finished_run_whose_stop_no_longer_holds(tmp_path):
    import yaml

    from gn.studies import runner

    cfg = _cfg(target_losses=[2.0], stop_at_target=True, stop_reads="all")
    (tmp_path / "config_in.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    rows = [{"step": 0, "val_loss": 3.0, "val_loss_ema": 3.0}, {"step": 1, "val_loss": 1.9, "val_loss_ema": 2.4}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    row = {"method": "adamw"}
    old = {"status": "finished", "stop_reason": "targets_reached"}
    assert runner._reopened(tmp_path, row, old)                 # the EMA (2.4) has not reached 2.0
    assert not runner._reopened(tmp_path, row, {**old, "stop_reason": "max_tokens"})
    assert not runner._reopened(tmp_path, row, {"status": "diverged", "stop_reason": "targets_reached"})
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 2, "val_loss": 1.95, "val_loss_ema": 1.99}) + "\n")
    assert not runner._reopened(tmp_path, row, old)
