"""End-to-end trainer: outputs, exact resume, divergence, comparison, CLI errors, multi-device."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gn import cli
from gn.config import config_from_dict, load_config
from gn.errors import ConfigError
from gn.train.compare import compare
from gn.train.trainer import train

ROOT = Path(__file__).parent.parent

TINY = {
    "model": {"preset": "nano", "hidden": 32, "layers": 1, "heads": 2, "ffn": 64, "max_seq_len": 64},
    "data": {"source": "synthetic", "seq_len": 32, "val_sequences": 8,
             "synthetic": {"vocab_size": 16, "order": 1, "support": 3}},
    "train": {"steps": 6, "batch_size": 4, "eval_every": 2, "eval_batch_size": 4, "checkpoint_every": 2,
              "progress": False, "target_losses": [2.5, 0.1]},
    "methods": [{"name": "adamw", "learning_rate": 0.01}, {"name": "muon", "learning_rate": 0.02}],
}
TIMING = {"step_time_s", "compile_time_s", "wall_time_s", "inner_time_s", "linesearch_time_s"}


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_train_writes_all_outputs(tmp_path):
    cfg = config_from_dict(TINY)
    summary = train(cfg, "adamw", tmp_path)
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "loss.png"):
        assert (tmp_path / name).exists(), name
    rows = _rows(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(7))
    for r in rows[1:]:
        assert {"step", "tokens", "train_loss", "lr", "step_time_s"} <= set(r)
        assert r["tokens"] == r["step"] * 4 * 32
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 2, 4, 6]
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    for key in ("method", "steps", "tokens", "initial_val_loss", "final_val_loss", "best_val_loss",
                "steps_to_target", "tokens_to_target", "wall_time_s", "loss_floor"):
        assert key in summary
    assert summary["steps"] == 6 and summary["tokens"] == 6 * 4 * 32
    assert summary["steps_to_target"]["0.1"] is None            # unreachable: below the Bayes floor
    assert summary["loss_floor"] is not None and summary["final_val_loss"] > summary["loss_floor"]
    assert summary["final_val_loss"] < summary["initial_val_loss"]
    # The resolved config is complete and loads back to the same run.
    resolved = load_config(tmp_path / "config.yaml")
    assert resolved.model.vocab_size == 16 and resolved.methods[0].name == "adamw"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step_"))[-1]


def test_gn_warm_starts_from_another_runs_final_parameters(tmp_path):
    cfg = config_from_dict(TINY)
    first = train(cfg, "adamw", tmp_path / "adamw")
    warm = config_from_dict({**TINY, "train": {**TINY["train"], "steps": 2, "init_from": str(tmp_path / "adamw")},
                             "methods": [{"name": "gn", "inner_steps": 2, "ls_batches": 1}]})
    summary = train(warm, "gn", tmp_path / "gn")
    assert summary["initial_val_loss"] == pytest.approx(first["final_val_loss"], rel=1e-6)
    rows = _rows(tmp_path / "gn" / "metrics.jsonl")
    for key in ("loss_before", "loss_after", "pred_decrease", "actual_decrease", "rho", "alpha", "delta_norm",
                "inner_time_s", "linesearch_time_s", "aux_tokens"):
        assert key in rows[1], key
    assert rows[-1]["aux_tokens"] == 2 * 1 * 2 * 32      # 2 steps x 1 line-search batch of b_inner=2 x seq 32
    bad = config_from_dict({**TINY, "train": {**TINY["train"], "init_from": str(tmp_path / "nothing")}})
    with pytest.raises(ConfigError, match="init_from"):
        train(bad, "adamw", tmp_path / "bad")


class Crash(Exception):
    pass


@pytest.mark.parametrize("method", ["muon", "gn"])
def test_resume_after_crash_equals_uninterrupted_run(tmp_path, monkeypatch, method):
    cfg = config_from_dict({**TINY, "train": {**TINY["train"], "ema_decay": 0.9},
                            "methods": TINY["methods"] + [{"name": "gn", "inner_steps": 2, "ls_batches": 1}]})
    train(cfg, method, tmp_path / "full")

    from gn.train import trainer

    real_prepare = trainer.prepare
    calls = {"n": 0}

    def crashing_prepare(*a, **k):
        run = real_prepare(*a, **k)
        step = run.method.step

        def wrapped(*args):
            calls["n"] += 1
            if calls["n"] == 5:           # dies during step 5; the last checkpoint is step 4
                raise Crash()
            return step(*args)

        run.method.step = wrapped
        return run

    monkeypatch.setattr(trainer, "prepare", crashing_prepare)
    with pytest.raises(Crash):
        train(cfg, method, tmp_path / "resumed")
    monkeypatch.setattr(trainer, "prepare", real_prepare)
    assert max(r["step"] for r in _rows(tmp_path / "resumed" / "metrics.jsonl")) == 4
    train(cfg, method, tmp_path / "resumed")
    full, resumed = _rows(tmp_path / "full" / "metrics.jsonl"), _rows(tmp_path / "resumed" / "metrics.jsonl")
    assert _strip(full) == _strip(resumed)


def test_divergence_is_reported_and_never_checkpointed(tmp_path):
    cfg = config_from_dict({**TINY, "methods": [{"name": "sgd", "learning_rate": 1e30, "grad_clip": 0.0,
                                                  "momentum": 0.0}]})
    summary = train(cfg, "sgd", tmp_path)
    assert summary["diverged"]
    steps = [p for p in (tmp_path / "checkpoints").glob("step_*")]
    assert steps == []


def test_compare_writes_table_json_and_plot(tmp_path, capsys):
    cfg = config_from_dict({**TINY, "train": {**TINY["train"], "steps": 4}})
    result = compare(cfg, tmp_path)
    assert set(result["methods"]) == {"adamw", "muon"}
    on_disk = json.loads((tmp_path / "comparison.json").read_text())
    assert on_disk["methods"]["muon"]["steps"] == 4
    table = (tmp_path / "comparison.md").read_text()
    assert "| adamw |" in table and "| muon |" in table and "To validation loss 2.5" in table
    assert (tmp_path / "comparison.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "| muon |" not in out and "\nmuon " in out and "wall s" in out    # aligned plain text


def _cli(args, capsys):
    code = cli.main(args)
    return code, capsys.readouterr()


def test_cli_methods_lists_registry(capsys):
    code, out = _cli(["methods"], capsys)
    assert code == 0
    for name in ("adamw", "muon", "sgd", "sophia", "lion"):
        assert f"\n{name} " in "\n" + out.out


@pytest.mark.parametrize("extra, needle", [
    (["--set", "train.stepz=3"], "Did you mean 'steps'"),
    (["--method", "nope"], "Unknown method 'nope'"),
    (["--set", "data.source=c4", "--set", "data.path=/no/such/file.json.gz"], "/no/such/file.json.gz"),
    (["--set", "data.seq_len=100000"], "max_seq_len"),
    (["--set", "methods=[{name: adamw, learning_rate: -1}]"], "learning_rate' must be positive"),
])
def test_cli_bad_input_one_paragraph_no_traceback(tmp_path, capsys, extra, needle):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    args = ["train", str(cfg), "--workdir", str(tmp_path / "w")]
    if "--method" not in extra:
        args += ["--method", "adamw"]
    code, out = _cli(args + extra, capsys)
    assert code == 2
    assert out.err.startswith("error: ") and needle in " ".join(out.err.split())
    assert "Traceback" not in out.err
    assert not (tmp_path / "w" / "metrics.jsonl").exists()


def test_cli_offline_hub_source_fails_fast(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "data": {"source": "c4", "seq_len": 32}}))
    code, out = _cli(["train", str(cfg), "--method", "adamw", "--workdir", str(tmp_path / "w")], capsys)
    assert code == 2 and "local" in out.err


_MULTI = """
import json, sys
from gn.config import config_from_dict
from gn.train.trainer import train
from gn.errors import ConfigError
cfg = config_from_dict(json.loads(sys.argv[1]))
s = train(cfg, "adamw", sys.argv[2])
bad = config_from_dict({**json.loads(sys.argv[1]), "train": {**json.loads(sys.argv[1])["train"], "batch_size": 6}})
try:
    train(bad, "adamw", sys.argv[2] + "_bad")
    print("NO_ERROR")
except ConfigError as e:
    print("ERR", e)
"""


def _run_devices(n, workdir):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", _MULTI, json.dumps(TINY), str(workdir)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout, _rows(Path(workdir) / "metrics.jsonl")


def test_four_devices_match_one_device(tmp_path):
    _, one = _run_devices(1, tmp_path / "one")
    text, four = _run_devices(4, tmp_path / "four")
    assert "ERR" in text and "not divisible by the 4 devices" in " ".join(text.split())
    for a, b in zip(one, four):
        for key in ("train_loss", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["adamw", "gn"])
def test_kill_9_then_same_command_matches_uninterrupted(tmp_path, method):
    import signal
    import time

    cfg = tmp_path / "c.yaml"
    raw = {**TINY, "train": {**TINY["train"], "steps": 40, "checkpoint_every": 4, "eval_every": 4},
           "methods": TINY["methods"] + [{"name": "gn", "inner_steps": 2, "ls_batches": 1}]}
    cfg.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "gn.cli", "train", str(cfg), "--method", method, "--workdir"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    subprocess.run(cmd + [str(tmp_path / "full")], env=env, check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen(cmd + [str(tmp_path / "killed")], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) > 14:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(_rows(metrics)) < 41, "the run finished before it could be killed"
    subprocess.run(cmd + [str(tmp_path / "killed")], env=env, check=True, capture_output=True, timeout=600)
    assert _strip(_rows(tmp_path / "full" / "metrics.jsonl")) == _strip(_rows(metrics))
