"""`gn sweep`: lr rules, expansion, bad specs, manifest/SLURM, resume, and the trainer's early stops."""

import dataclasses
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gn.config import config_from_dict
from gn.errors import ConfigError
from gn.studies import runner as runner_mod
from gn.studies import sweep as sweep_mod
from gn.studies.spec import LrRule, default_power, spec_from_dict
from gn.train.trainer import train

BASE = {
    "model": {"preset": "nano", "hidden": 32, "layers": 1, "heads": 2, "ffn": 64, "max_seq_len": 64},
    "data": {"source": "synthetic", "seq_len": 16, "val_sequences": 8,
             "synthetic": {"vocab_size": 16, "order": 1, "support": 3}},
    "train": {"eval_every": 1, "eval_batch_size": 4, "checkpoint_every": 1},
}


def _spec(**over):
    raw = {"config": BASE, "tokens": 128, "batch_sizes": [4, 8], "seeds": [0],
           "lr": {"center": 1e-2, "base_batch": 4, "points": 2, "factor": 2},
           "methods": [{"name": "adamw"}]}
    raw.update(over)
    return raw


def _expand(**over):
    return sweep_mod.expand(spec_from_dict(_spec(**over)))


# --- lr rule -----------------------------------------------------------------

def test_lr_rule_centre_points_and_list():
    rule = LrRule(center=1e-2, base_batch=4, power=0.5, points=3, factor=2.0)
    assert rule.grid(16) == pytest.approx((1e-2, 2e-2, 4e-2))            # centre 1e-2·(16/4)^0.5 = 2e-2
    assert LrRule(center=1e-2, base_batch=4, power=1.0, points=1).grid(16) == pytest.approx((4e-2,))
    assert LrRule(values=(1e-3, 3e-3)).grid(512) == (1e-3, 3e-3)
    two = LrRule(center=1.0, base_batch=1, power=0.0, points=2, factor=4.0).grid(7)
    assert two == pytest.approx((0.5, 2.0))


def test_lr_power_by_family():
    assert default_power("adamw", "first_order") == 0.5
    assert default_power("muon", "first_order") == 0.5
    assert default_power("sgd", "first_order") == 1.0 and default_power("lars", "first_order") == 1.0
    assert default_power("gn", "gauss_newton") == 0.0
    spec = spec_from_dict(_spec(methods=[{"name": "sgd"}, {"name": "adamw"}, {"name": "muon", "lr": {"power": 0.25}}]))
    assert [m.lr.power for m in spec.methods] == [1.0, 0.5, 0.25]


def test_method_lr_overrides_spec_rule():
    spec = spec_from_dict(_spec(methods=[{"name": "adamw", "lr": {"values": [0.1, 0.2]}},
                                         {"name": "muon", "lr": {"center": 0.02}}]))
    assert spec.methods[0].lr.grid(8) == (0.1, 0.2)
    assert spec.methods[1].lr.grid(4) == pytest.approx((0.02 / 2 ** 0.5, 0.02 * 2 ** 0.5), rel=1e-5)


# --- expansion ---------------------------------------------------------------

def test_expansion_count_and_resolved_configs():
    runs = _expand(seeds=[0, 1], methods=[{"name": "adamw", "vary": {"weight_decay": [0.0, 0.1, 0.2]}},
                                          {"name": "muon"}], vary={"train.grad_accum": [1, 2]})
    # adamw: 2 B × 2 lr × 2 seeds × 3 wd × 2 grad_accum; muon: 2 × 2 × 2 × 2
    assert len(runs) == 2 * 2 * 2 * 3 * 2 + 2 * 2 * 2 * 2
    r = runs[0]
    cfg = config_from_dict(r.config)
    assert len(cfg.methods) == 1 and cfg.methods[0].name == "adamw"
    assert cfg.train.batch_size == 4 and cfg.train.steps == 2 == r.steps       # ceil(128 / (4·16))
    assert cfg.methods[0].hparams.learning_rate == r.learning_rate
    assert cfg.methods[0].hparams.schedule == "constant" and not r.schedule_tied_to_horizon
    assert {x.config["train"]["grad_accum"] for x in runs} == {1, 2}
    assert {x.config["methods"][0].get("weight_decay") for x in runs if x.method == "adamw"} == {0.0, 0.1, 0.2}
    assert _expand(tokens=200)[2].steps == 2                                  # B=8: ceil(200 / 128)


def test_gn_batch_grows_through_inner_steps():
    runs = _expand(batch_sizes=[8, 16], methods=[{"name": "gn", "b_inner": 4, "lr": {"values": [0.01, 0.03]}}])
    assert [(r.batch_size, r.config["methods"][0]["inner_steps"]) for r in runs] == [(8, 2), (8, 2), (16, 4), (16, 4)]
    assert [r.config["methods"][0]["inner_learning_rate"] for r in runs] == [0.01, 0.03, 0.01, 0.03]
    assert all(r.config["train"]["batch_size"] == r.batch_size for r in runs)


def test_fixed_n_inner_grows_the_inner_batch():
    """n_inner: N fixed at every B, b_inner = B / N (GN); the control takes N updates of B / N."""
    runs = _expand(batch_sizes=[8, 16], lr={"values": [0.01]},
                   methods=[{"name": "gn", "n_inner": 2}, {"name": "ctl", "method": "muon", "n_inner": 2}])
    got = {(r.method, r.batch_size): r.config["methods"][0] for r in runs}
    assert got["gn", 8]["inner_steps"] == 2 and got["gn", 16]["inner_steps"] == 2
    assert got["ctl", 8]["batch_size"] == 4 and got["ctl", 16]["batch_size"] == 8
    assert all(r.config["train"]["batch_size"] == r.batch_size for r in runs)


def test_warmup_tokens_b2_scaling_ema_and_horizon():
    runs = _expand(warmup_tokens=256, scale_b2=True, ema_halflife_updates=2, schedule="cosine",
                   lr={"values": [1e-2]}, methods=[{"name": "adamw", "lr": {"base_batch": 4}}])
    by_b = {r.batch_size: r for r in runs}
    assert by_b[4].config["methods"][0]["warmup_steps"] == 4 and by_b[8].config["methods"][0]["warmup_steps"] == 2
    assert by_b[4].config["methods"][0]["b2"] == pytest.approx(0.95)
    assert by_b[8].config["methods"][0]["b2"] == pytest.approx(0.95 ** 2)
    assert by_b[4].config["train"]["ema_decay"] == pytest.approx(0.5 ** 0.5)
    assert all(r.schedule_tied_to_horizon for r in runs)


def test_workdir_names_unique_and_stable():
    a, b = _expand(seeds=[0, 1]), _expand(seeds=[0, 1])
    assert [r.name for r in a] == [r.name for r in b]
    assert len({r.name for r in a}) == len(a)
    assert a[0].name.startswith("adamw_B4_lr7.071e-3_s0_") and len(a[0].name.rsplit("_", 1)[1]) == 8
    assert _expand(tokens=256)[0].name != a[0].name                           # another config, another hash


@pytest.mark.parametrize("over, needle", [
    ({"methods": [{"name": "adamx"}]}, "adamw"),                                   # unknown method, suggested
    ({"methods": [{"name": "adamw", "learning_rat": 0.1}]}, "learning_rat"),       # unknown key in an entry
    ({"batch_sizes": []}, "empty grid"),
    ({"methods": [{"name": "adamw", "vary": {"weight_decay": []}}]}, "empty grid"),
    ({"lr": {"values": []}}, "empty grid"),
    ({"methods": [{"name": "gn", "b_inner": 3}]}, "not divisible by b_inner"),
    ({"methods": [{"name": "gn"}]}, "b_inner"),
    ({"methods": [{"name": "gn", "n_inner": 3}]}, "not divisible by n_inner"),
    ({"methods": [{"name": "gn", "n_inner": 2, "b_inner": 2}]}, "not both"),
    ({"base": "nowhere.yaml"}, "nowhere.yaml"),
    ({"batch_size": [4]}, "batch_sizes"),                                          # unknown spec key, suggested
    ({"methods": [{"name": "adamw", "learning_rate": 0.1}]}, "set by the sweep"),
    ({"vary": {"train.steps": [1, 2]}}, "set by the sweep"),
    ({"vary": {"methods.muon.b2": [0.9]}}, "names no sweep method"),
    ({"lr": {"center": 0.01}}, "base_batch"),
])
def test_bad_specs_are_refused(over, needle, tmp_path):
    raw = _spec(**over)
    if "base" in raw:
        raw.pop("config")
    with pytest.raises(ConfigError, match=needle):
        sweep_mod.expand(spec_from_dict(raw, root=tmp_path))


def test_base_path_is_relative_to_the_spec(tmp_path):
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "base.yaml").write_text(yaml.safe_dump({**BASE, "methods": [{"name": "lion"}]}))
    raw = _spec(base="cfgs/base.yaml")
    raw.pop("config")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    runs = sweep_mod.expand(sweep_mod.load_spec(tmp_path / "s.yaml"))
    assert len(runs) == 4 and all(r.config["methods"][0]["name"] == "adamw" for r in runs)


def test_example_spec_expands():
    root = Path(__file__).parent.parent
    runs = sweep_mod.expand(sweep_mod.load_spec(root / "experiments" / "cbs_small.yaml"))
    assert len(runs) == 8 and {r.method for r in runs} == {"adamw", "muon"}


# --- dry run, manifest, SLURM ------------------------------------------------

def _write_spec(tmp_path, **over):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(_spec(**over)))
    return path


def test_dry_run_runs_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner_mod, "run_manifest", lambda *a, **k: pytest.fail("dry run trained"))
    runs = sweep_mod.main(str(_write_spec(tmp_path)), str(tmp_path / "out"), dry_run=True)
    out = capsys.readouterr().out
    assert not (tmp_path / "out").exists()
    assert "4 runs" in out and all(r.name in out for r in runs)


def test_dry_run_names_a_coarse_evaluation_cadence():
    runs = sweep_mod.expand(spec_from_dict(_spec()))
    table = sweep_mod.format_table(runs)
    coarse = [r for r in runs if r.eval_every > 1]
    assert ("note: evaluation every >1 outer steps" in table) == bool(coarse)
    every_step = [dataclasses.replace(r, eval_every=1) for r in runs]
    assert "note: evaluation" not in sweep_mod.format_table(every_step)
    assert "note: evaluation" in sweep_mod.format_table([dataclasses.replace(runs[0], eval_every=4)])
    # The rough cost (no plan: tests/test_plan_cost.py) says what it leaves out, naming the methods
    # whose extra work it omits.
    first_order = [dataclasses.replace(r, family="first_order") for r in every_step]
    assert "not the inner products" not in sweep_mod.format_table(first_order)
    fog = sweep_mod.format_table([dataclasses.replace(first_order[0], method="my_fog", family="fog")])
    assert "rough cost" in fog and "backend solves of my_fog" in fog


def test_slurm_array_matches_manifest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sweep_mod.main(str(_write_spec(tmp_path)), "out", emit="slurm")
    script = (tmp_path / "out" / "sweep.sbatch").read_text()
    rows = runner_mod.read_manifest(tmp_path / "out")
    assert len(rows) == 4 and "#SBATCH --array=0-3" in script and "#SBATCH --requeue" in script
    for r in rows:
        assert (tmp_path / r["workdir"] / "config_in.yaml").is_file()
        assert r["command"] == f"gn train {r['workdir']}/config_in.yaml --method adamw --workdir {r['workdir']}"
    # Execute the script with a fake `gn` that echoes its arguments: index i runs line i's command.
    fake = tmp_path / "bin" / "gn"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho "gn $*"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "GN_TRAIN": str(fake)}
    for i in (0, 3):
        out = subprocess.run(["bash", "out/sweep.sbatch"], env={**env, "SLURM_ARRAY_TASK_ID": str(i)},
                             capture_output=True, text=True, check=True).stdout.splitlines()
        assert out[-1] == rows[i]["command"]
    # Absolute log and manifest paths (sbatch may be called from anywhere), the emitting Python.
    assert f"#SBATCH --output={tmp_path / 'out' / 'slurm'}/%A_%a.out" in script
    assert sys.executable in script
    past = subprocess.run(["bash", "out/sweep.sbatch"], env={**env, "SLURM_ARRAY_TASK_ID": "4"},
                          capture_output=True, text=True)
    assert past.returncode == 1 and "past the manifest's 4 runs" in past.stderr
    (tmp_path / rows[1]["workdir"] / "summary.json").write_text("{}")            # a finished run exits at once
    out = subprocess.run(["bash", "out/sweep.sbatch"], env={**env, "SLURM_ARRAY_TASK_ID": "1"},
                         capture_output=True, text=True, check=True).stdout
    assert "is finished" in out and "gn train" not in out


# --- local runner: resume, failures ------------------------------------------

def _fake_train(calls, fail=()):
    def fake(cfg, name, workdir):
        calls.append(Path(workdir).name)
        if cfg.methods[0].hparams.learning_rate in fail:
            raise RuntimeError("boom")
        summary = {"steps": cfg.train.steps, "tokens": 1, "diverged": False, "stop_reason": "steps",
                   "final_val_loss": 2.0, "best_val_loss": 2.0, "wall_time_s": 0.1}
        (Path(workdir) / "summary.json").write_text(json.dumps(summary))
        return summary
    return fake


def test_runner_skips_finished_records_failures_and_retries(tmp_path):
    spec = spec_from_dict(_spec())
    runs = sweep_mod.expand(spec)
    sweep_mod.write_sweep(runs, tmp_path)
    calls = []
    bad_lr = runs[1].learning_rate
    recs = runner_mod.run_manifest(tmp_path, train_fn=_fake_train(calls, fail=(bad_lr,)), max_runs=2)
    assert len(calls) == 2 and [r["status"] for r in recs] == ["finished", "failed"]   # "killed" after 2 runs
    assert "boom" in recs[1]["reason"]
    recs = runner_mod.run_manifest(tmp_path, train_fn=_fake_train(calls, fail=(bad_lr,)))
    assert calls[2:] == [runs[2].name, runs[3].name]                 # finished and failed runs not repeated
    rec = json.loads((tmp_path / runs[0].name / "sweep_run.json").read_text())
    assert {k: rec[k] for k in ("method", "batch_size", "learning_rate", "seed", "status")} == {
        "method": "adamw", "batch_size": 4, "learning_rate": runs[0].learning_rate, "seed": 0, "status": "finished"}
    runner_mod.run_manifest(tmp_path, train_fn=_fake_train(calls), retry_failed=True)
    assert calls[4:] == [runs[1].name]
    assert json.loads((tmp_path / runs[1].name / "status.json").read_text())["status"] == "finished"


def test_runner_collects_runs_trained_elsewhere(tmp_path):
    runs = sweep_mod.expand(spec_from_dict(_spec()))
    sweep_mod.write_sweep(runs, tmp_path)
    (tmp_path / runs[0].name / "summary.json").write_text(json.dumps({"diverged": True, "steps": 1}))
    calls = []
    recs = runner_mod.run_manifest(tmp_path, train_fn=_fake_train(calls), only=[0, 1])
    assert calls == [runs[1].name] and recs[0]["status"] == "diverged"


def test_real_sweep_resumes_without_repeating(tmp_path, monkeypatch):
    import gn.train.trainer as trainer

    calls = []
    real = trainer.train
    monkeypatch.setattr(trainer, "train", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    spec = _write_spec(tmp_path, tokens=32, batch_sizes=[2], lr={"values": [1e-2, 2e-2]})
    sweep_mod.main(str(spec), str(tmp_path / "out"), max_runs=1)          # interrupted after the first run
    first = sorted((tmp_path / "out").glob("*/summary.json"))
    assert len(calls) == 1 and len(first) == 1
    mtime = first[0].stat().st_mtime_ns
    recs = sweep_mod.main(str(spec), str(tmp_path / "out"))
    assert len(calls) == 2 and first[0].stat().st_mtime_ns == mtime
    assert [r["status"] for r in recs] == ["finished", "finished"] and recs[1]["steps"] == 1


# --- trainer early stops -------------------------------------------------------

def _tiny(**train):
    return config_from_dict({**BASE, "train": {**BASE["train"], "steps": 6, "batch_size": 4, "progress": False,
                                               **train}, "methods": [{"name": "adamw", "learning_rate": 0.01}]})


def test_max_tokens_stops_a_run(tmp_path):
    summary = train(_tiny(max_tokens=3 * 4 * 16), "adamw", tmp_path)
    assert summary["steps"] == 3 and summary["stop_reason"] == "max_tokens"
    assert train(_tiny(), "adamw", tmp_path / "full")["stop_reason"] == "steps"


def test_stop_at_target_stops_after_reaching_every_target(tmp_path):
    summary = train(_tiny(target_losses=[100.0, 50.0], stop_at_target=True), "adamw", tmp_path)
    assert summary["steps"] == 1 and summary["stop_reason"] == "targets_reached"
    unreachable = train(_tiny(steps=2, target_losses=[100.0, 0.01], stop_at_target=True), "adamw", tmp_path / "b")
    assert unreachable["steps"] == 2 and unreachable["stop_reason"] == "steps"
    with pytest.raises(ConfigError, match="target_losses"):
        _tiny(stop_at_target=True)
    with pytest.raises(ConfigError, match="max_tokens"):
        _tiny(max_tokens=-1)


def test_a_run_made_before_a_new_config_field_is_not_repeated(tmp_path):
    """A newer toolkit adds a field with a harmless default: the run's hash changes, but its
    old directory (same label, same config once resolved) is kept instead of training again."""
    runs = _expand()
    sweep_mod.write_sweep(runs, tmp_path)
    old = tmp_path / runs[0].name
    label = runs[0].name.rsplit("_", 1)[0]
    legacy = tmp_path / f"{label}_0ldhash0"
    old.rename(legacy)
    raw = yaml.safe_load((legacy / "config_in.yaml").read_text())
    raw["model"].pop("compute_dtype")          # written by a toolkit without that field
    (legacy / "config_in.yaml").write_text(yaml.safe_dump(raw))
    adopted = sweep_mod.adopt_existing(runs, tmp_path)
    assert adopted[0].name == legacy.name
    assert [r.name for r in adopted[1:]] == [r.name for r in runs[1:]]
    raw["train"]["seed"] = 99                  # a different run under the same label is not taken
    (legacy / "config_in.yaml").write_text(yaml.safe_dump(raw))
    assert sweep_mod.adopt_existing(runs, tmp_path)[0].name == runs[0].name


# --- fair baselines by default (issue 14, item 7) ---------------------------------

WARM = {**BASE, "train": {**BASE["train"], "init_from": "runs/some_warm_start"}}


def _warm(**over):
    return sweep_mod.expand(spec_from_dict(_spec(config=WARM, **over)))


def _hp(run):
    return run.config["methods"][0]


def test_warm_started_runs_warm_up_over_four_updates_by_default():
    from gn.studies.spec import WARM_START_WARMUP_UPDATES

    assert WARM_START_WARMUP_UPDATES == 4
    runs = _warm(batch_sizes=[4, 8], methods=[
        {"name": "adamw"}, {"name": "soap"}, {"name": "gn", "b_inner": 4, "lr": {"values": [0.01]}},
        {"name": "muon_control", "method": "muon", "b_inner": 4},
        {"name": "own", "method": "adamw", "warmup_steps": 7}])
    by = {(r.method, r.batch_size): r for r in runs}
    for B in (4, 8):                     # the same number of updates at every batch, not the same tokens
        for name in ("adamw", "soap", "muon_control"):
            assert _hp(by[(name, B)])["warmup_steps"] == 4 == by[(name, B)].warmup_steps
        assert "warmup_steps" not in _hp(by[("gn", B)]) and by[("gn", B)].warmup_steps is None
        assert _hp(by[("own", B)])["warmup_steps"] == 7                 # a method's own setting wins
    # A cold start keeps the methods' own warmup (0), as before.
    assert {_hp(r)["warmup_steps"] for r in _expand()} == {0}
    # Stated rules replace the default: in updates, or fixed in tokens (the control: tokens / b_inner).
    assert {_hp(r)["warmup_steps"] for r in _warm(warmup_updates=2)} == {2}
    tok = _warm(warmup_tokens=256, methods=[{"name": "adamw"}, {"name": "ctl", "method": "muon", "b_inner": 2}])
    assert {(r.method, r.batch_size): r.warmup_steps for r in tok} == {
        ("adamw", 4): 4, ("adamw", 8): 2, ("ctl", 4): 8, ("ctl", 8): 8}   # 256 / (2 x 16) updates of b_inner 2
    assert {_hp(r)["warmup_steps"] for r in _warm(warmup_tokens=0)} == {0}   # explicitly none
    with pytest.raises(ConfigError, match="one of 'warmup_tokens'"):
        _warm(warmup_tokens=256, warmup_updates=2)
    with pytest.raises(ConfigError, match="conflicts with the spec's 'warmup_updates'"):
        _warm(warmup_updates=2, methods=[{"name": "adamw", "warmup_steps": 3}])


def test_weight_averaging_is_on_by_default():
    from gn.studies.spec import DEFAULT_EMA_HALFLIFE_UPDATES

    assert DEFAULT_EMA_HALFLIFE_UPDATES > 0
    decay = 0.5 ** (1 / DEFAULT_EMA_HALFLIFE_UPDATES)
    assert all(r.config["train"]["ema_decay"] == pytest.approx(decay) for r in _expand())
    assert all(config_from_dict(r.config).train.ema_decay == pytest.approx(decay) for r in _expand())
    assert {r.config["train"]["ema_decay"] for r in _expand(ema_halflife_updates=0)} == {0.0}   # off when asked
    own = {**BASE, "train": {**BASE["train"], "ema_decay": 0.99}}                 # the base config's own EMA stays
    assert {r.config["train"]["ema_decay"] for r in _expand(config=own)} == {0.99}
    assert {r.config["train"]["ema_decay"] for r in _expand(config=own, ema_halflife_updates=1)} == {0.5}


def test_soap_precondition_frequency_is_tuned_by_vary():
    runs = _expand(lr={"values": [1e-3]}, methods=[{"name": "soap", "vary": {"precondition_frequency": [1, 2]}}])
    assert sorted((r.batch_size, _hp(r)["precondition_frequency"]) for r in runs) == [(4, 1), (4, 2), (8, 1), (8, 2)]
    assert len({r.name for r in runs}) == 4 and all("precondition" in r.name for r in runs)
    runs = _expand(lr={"values": [1e-3]}, methods=[{"name": "soap"}],
                   vary={"methods.soap.precondition_frequency": [1, 3]})
    assert {_hp(r)["precondition_frequency"] for r in runs} == {1, 3}


CPU_SPECS = ("cbs_synthetic", "cbs_synthetic_ext", "large_batch", "large_batch_tune", "fixed_tokens", "fixed_tokens_v2",
             "batch_vs_inner", "batch_vs_inner_edges", "batch_vs_inner_ctl_low", "ladder_b1024", "ladder_b1024_s13", "large_batch_v2",
             "large_batch_v2_ws1", "g_fisher", "text_ladder")


@pytest.mark.parametrize("name", CPU_SPECS)
def test_cpu_experiments_follow_the_fair_protocol(name):
    """The committed CPU specs: warmup from the warm start, weight averaging, SOAP's basis updated at
    least every second step, and >= 8 evaluations within the fastest pilot crossing (or every step)."""
    root = Path(__file__).parent.parent / "experiments"
    spec = sweep_mod.load_spec(root / f"{name}.yaml")
    runs = sweep_mod.expand(spec)
    assert spec.base["train"]["init_from"] and spec.ema_halflife_updates > 0
    soap: dict = {}
    for r in runs:
        hp, train_cfg = _hp(r), r.config["train"]
        if r.warmup_steps is not None:
            assert r.warmup_steps >= 4, r.name
        assert train_cfg["ema_decay"] > 0
        if r.registered_method == "soap":
            soap.setdefault(r.method, set()).add(hp["precondition_frequency"])
    # Each SOAP entry refreshes its basis at least every second step, or tunes the frequency down to that.
    assert all(min(freqs) <= 2 for freqs in soap.values()), soap
    for r in runs:
        horizon = spec.crossing_tokens or spec.tokens
        per_step = r.batch_size * spec.seq_len
        assert r.eval_every == 1 or horizon // (r.eval_every * per_step) >= 8, r.name


# --- evaluation cadence (issue 14, item 3) -----------------------------------------

def test_eval_cadence_gives_min_evals_before_the_expected_crossing():
    spec = spec_from_dict(_spec(tokens=16 * 64 * 100, batch_sizes=[1, 4, 16, 64]))   # seq 16
    assert spec.min_evals == 8 and spec.crossing_tokens == 0
    # From the budget: B=64 has 100 steps -> every 12 (8 evaluations); B=1: 6400 steps -> every 800.
    assert [spec.eval_every(b) for b in (1, 4, 16, 64)] == [800, 200, 50, 12]
    spec = spec_from_dict(_spec(tokens=16 * 64 * 100, crossing_tokens=16 * 64 * 20, batch_sizes=[4, 64]))
    assert [spec.eval_every(b) for b in (4, 16, 64)] == [40, 10, 2]
    for b in (1, 2, 3, 5, 7, 64, 100, 1000):     # at least 8 evaluations within crossing_tokens, or every step
        k = spec.eval_every(b)
        assert k == 1 or spec.crossing_tokens // (k * b * 16) >= 8
        assert k == 1 or spec.crossing_tokens // ((k + 1) * b * 16) < 8         # and no denser than needed
    assert spec_from_dict(_spec(crossing_tokens=64, min_evals=8)).eval_every(4) == 1   # fewer steps than 8: every step
    # eval_every_tokens may only make the cadence denser; min_evals: 0 leaves it alone.
    dense = spec_from_dict(_spec(tokens=16 * 64 * 100, eval_every_tokens=16 * 64 * 2))
    assert dense.eval_every(64) == 2 and dense.eval_every(4) == 32
    assert spec_from_dict(_spec(tokens=16 * 64 * 100, eval_every_tokens=16 * 64 * 80)).eval_every(64) == 12
    assert spec_from_dict(_spec(min_evals=0)).eval_every(4) == 0
    runs = _expand(tokens=16 * 64 * 100, crossing_tokens=16 * 64 * 20, batch_sizes=[4, 64])
    assert [(r.batch_size, r.config["train"]["eval_every"], r.eval_every) for r in runs][::2] == [(4, 40, 40), (64, 2, 2)]
    assert all(r.config["train"]["eval_every"] == 1 for r in _expand(min_evals=0))     # the base's cadence
    with pytest.raises(ConfigError, match="crossing_tokens"):
        spec_from_dict(_spec(crossing_tokens=10 ** 6))


def test_runner_records_evaluations_before_each_crossing_and_warns_when_sparse(tmp_path, capsys):
    rows = [{"step": 0, "val_loss": 5.0}, {"step": 3, "val_loss": 4.0, "val_loss_ema": 4.5},
            {"step": 6, "val_loss": 3.0, "val_loss_ema": 3.8}, {"step": 9, "val_loss": 2.5, "val_loss_ema": 2.9}]
    assert runner_mod.evals_to_target(rows, [3.5, 2.0]) == {"3.5": {"val_loss": 2, "val_loss_ema": 3}}
    runs = _expand(targets=[3.5], batch_sizes=[4], lr={"values": [1e-2]}, tokens=64 * 9, min_evals=8)
    assert runs[0].eval_every == 1
    rows_path = tmp_path / runs[0].name
    sweep_mod.write_sweep(runs, tmp_path)
    manifest = runner_mod.read_manifest(tmp_path)
    assert manifest[0]["targets"] == [3.5] and manifest[0]["min_evals"] == 8

    def fake(cfg, name, workdir):
        (Path(workdir) / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        summary = {"steps": 9, "tokens": 1, "diverged": False, "stop_reason": "steps", "final_val_loss": 2.5,
                   "best_val_loss": 2.5, "wall_time_s": 0.1}
        (Path(workdir) / "summary.json").write_text(json.dumps(summary))
        return summary

    rec = runner_mod.run_manifest(tmp_path, train_fn=fake)[0]
    assert rec["evals_to_target"] == {"3.5": {"val_loss": 2, "val_loss_ema": 3}}
    out = capsys.readouterr()
    assert rec["sparse_crossings"] == [] and "warning" not in out.out + out.err          # every step: dense enough
    row = {**manifest[0], "eval_every": 3}                                    # a coarser cadence: flagged
    rec = runner_mod._write(rows_path, row, json.loads((rows_path / "summary.json").read_text()), None)
    assert rec["sparse_crossings"] == ["3.5 (val_loss)", "3.5 (val_loss_ema)"]
    assert "fewer than 8 evaluations" in runner_mod._line(row, rec, True)


# --- methods declare what they are (issue 14, item 1) -----------------------------

def test_bench_optimizers_selects_methods_by_their_traits(monkeypatch):
    import dataclasses
    from typing import ClassVar

    from gn.bench.optimizers import selected_methods
    from gn.methods import registry
    from gn.methods.base import MethodConfig

    every = selected_methods(None)
    assert every[0] == "adamw"
    assert set(every) == {n for n in registry.names() if not registry.get(n).whole_outer_steps}
    assert "gn" not in every and "gn_layerwise" not in every and {"soap", "muon", "fog_gn"} <= set(every)

    @dataclasses.dataclass(frozen=True)
    class OuterFirstOrder(MethodConfig):          # a new method: only its traits decide
        name: ClassVar[str] = "zz_outer"
        family: ClassVar[str] = "first_order"
        whole_outer_steps: ClassVar[bool] = True

    @dataclasses.dataclass(frozen=True)
    class OneUpdateCurvature(MethodConfig):
        name: ClassVar[str] = "zz_one_update"
        family: ClassVar[str] = "gauss_newton"

    monkeypatch.setitem(registry._REGISTRY, "zz_outer", OuterFirstOrder)
    monkeypatch.setitem(registry._REGISTRY, "zz_one_update", OneUpdateCurvature)
    chosen = selected_methods(None)
    assert "zz_one_update" in chosen and "zz_outer" not in chosen
    assert selected_methods(("zz_one_update",)) == ["adamw", "zz_one_update"]
    with pytest.raises(ConfigError, match="outer-step method"):
        selected_methods(("zz_outer",))


def test_a_key_added_at_its_default_keeps_existing_run_names():
    """train.compile_reuse (and data.train_documents, data.max_epochs) came after sweeps were run: at
    its default (False; None) a run's digest is the
    digest of the config without the key (the formula before it), so sweep directories keep their
    finished runs; set to true, the run is another run."""
    import hashlib

    from gn.config import config_from_dict
    from gn.studies.sweep import run_digest

    resolved = config_from_dict({"methods": [{"name": "adamw"}]}).to_dict()
    assert resolved["train"]["compile_reuse"] is False
    assert resolved["data"]["train_documents"] is None and resolved["data"]["max_epochs"] is None
    later = ("compile_reuse", "stop_reads", "stop_after_rejected")   # the stop keys: left out always
    before = {**resolved, "train": {k: v for k, v in resolved["train"].items() if k not in later},
              "data": {k: v for k, v in resolved["data"].items() if k not in ("train_documents", "max_epochs")}}
    old = hashlib.sha256(json.dumps(before, sort_keys=True, default=str).encode()).hexdigest()[:8]
    assert run_digest(resolved) == old
    assert run_digest({**resolved, "train": {**resolved["train"], "compile_reuse": True}}) != old
    assert run_digest({**resolved, "data": {**resolved["data"], "max_epochs": 1.0}}) != old
    assert resolved["train"]["compile_reuse"] is False        # the caller's dict is not changed
    assert "stop_reads" in resolved["train"]
