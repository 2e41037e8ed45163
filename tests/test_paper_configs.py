"""The paper's protocol as configs (configs/paper_*.yaml) and its batch sweep (experiments/paper_45m_batch_sweep.yaml)."""

import json
from pathlib import Path

import pytest
import yaml

from gn import cli
from gn.config import load_config
from gn.model import count_params
from gn.studies import runner as runner_mod
from gn.studies import sweep as sweep_mod

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("size, b_inner", [("45m", 32), ("150m", 128)])
def test_paper_configs_state_the_protocol(size, b_inner):
    ws = load_config(ROOT / f"configs/paper_{size}_warmstart.yaml")
    cfg = load_config(ROOT / f"configs/paper_{size}.yaml")
    for c in (ws, cfg):
        assert (c.model.preset, c.model.mlp, c.model.qk_norm, c.model.norm_eps) == (size, "gelu", True, 1e-6)
        assert (c.data.source, c.data.tokenizer, c.data.seq_len) == ("c4", "t5-base", 1024)
        assert c.data.val_sequences == 100 * 128 and c.train.target_losses == (3.25,)
    assert (ws.train.steps, ws.train.batch_size, ws.train.init_from) == (1000, 32, None)
    assert cfg.train.init_from == f"runs/paper_{size}_warmstart"
    assert cfg.train.batch_size == 122 * b_inner
    assert cfg.train.ema_decay ** 122 == pytest.approx(0.999, abs=1e-9)    # 0.999 per GN outer step
    gn = cfg.method("gn").hparams
    assert (gn.inner_steps, gn.inner_optimizer, gn.inner_learning_rate, gn.inner_schedule, gn.inner_grad_clip,
            gn.inner_weight_decay, gn.inner_weight_decay_mask, gn.ls_batches, gn.ls_grid) == \
        (122, "muon", 0.01, "constant_inner_cosine", 1.0, 0.001, "adam_side", 122, 5)
    assert gn.inner_options["adam_b2"] == 0.999
    lw = cfg.method("gn_layerwise").hparams
    assert (lw.partition, lw.ls_grid) == ("transformer_blocks", 10)
    adamw = [e for e in cfg.methods if e.method == "adamw"]
    assert sorted(e.hparams.learning_rate for e in adamw) == [0.003, 0.01, 0.03]
    for e in adamw:
        h = e.hparams
        assert (h.schedule, h.warmup_steps, h.weight_decay, h.b1, h.b2) == ("constant", 0, 0.0, 0.9, 0.95)
    soap = [e for e in cfg.methods if e.method == "soap"]
    assert soap and all(e.hparams.precondition_frequency == 10 for e in soap)
    assert {e.method for e in cfg.methods} >= {"gn", "gn_layerwise", "adamw", "muon", "soap", "fog", "diagfog"}
    # The paper's model exactly: the T5 sentinels are never emitted, so no extra rows.
    assert cfg.model.vocab_size == 32000
    assert count_params(cfg.model) == {"45m": 45_363_712, "150m": 134_142_720}[size]


TINY = ["--set", "model.preset=nano", "--set", "model.vocab_size=null", "--set", "model.hidden=16",
        "--set", "model.layers=1", "--set", "model.heads=2", "--set", "model.ffn=32", "--set", "model.max_seq_len=16",
        "--set", "model.mlp=gelu", "--set", "model.qk_norm=true",
        "--set", "data.source=synthetic", "--set", "data.seq_len=8", "--set", "data.val_sequences=8",
        "--set", "data.synthetic.vocab_size=16", "--set", "train.eval_batch_size=4",
        "--set", "train.eval_every=1", "--set", "train.checkpoint_every=1", "--set", "train.progress=false"]


def test_paper_warm_start_chain_runs_end_to_end(tmp_path, capsys):
    """AdamW warm start, then GN from its final parameters, on a tiny override of the paper configs."""
    ws_dir, gn_dir = tmp_path / "ws", tmp_path / "gn"
    assert cli.main(["train", str(ROOT / "configs/paper_45m_warmstart.yaml"), "--method", "adamw",
                     "--workdir", str(ws_dir), *TINY, "--set", "train.steps=2", "--set", "train.batch_size=4"]) == 0
    assert cli.main(["train", str(ROOT / "configs/paper_45m.yaml"), "--method", "gn", "--workdir", str(gn_dir), *TINY,
                     "--set", f"train.init_from={ws_dir}", "--set", "train.steps=1", "--set", "train.batch_size=4",
                     "--set", "methods.gn.inner_steps=2", "--set", "methods.gn.ls_batches=1"]) == 0
    ws, gn = (json.loads((d / "summary.json").read_text()) for d in (ws_dir, gn_dir))
    assert ws["steps"] == 2 and gn["steps"] == 1
    resolved = yaml.safe_load((gn_dir / "config.yaml").read_text())
    assert resolved["train"]["init_from"] == str(ws_dir) and resolved["model"]["mlp"] == "gelu"
    # GN started from the warm start: its first evaluation is the warm start's last one.
    metrics = [json.loads(line) for line in (gn_dir / "metrics.jsonl").read_text().splitlines()]
    ws_metrics = [json.loads(line) for line in (ws_dir / "metrics.jsonl").read_text().splitlines()]
    first = next(m["val_loss"] for m in metrics if "val_loss" in m)
    last_ws = [m["val_loss"] for m in ws_metrics if "val_loss" in m][-1]
    assert first == pytest.approx(last_ws, rel=1e-5)


def test_paper_batch_sweep_expands_and_emits_a_slurm_array(tmp_path, monkeypatch, capsys):
    spec = ROOT / "experiments/paper_45m_batch_sweep.yaml"
    runs = sweep_mod.main(str(spec), str(tmp_path / "dry"), dry_run=True)
    assert not (tmp_path / "dry").exists()
    n = len(runs)
    assert n > 0 and f"{n} runs" in capsys.readouterr().out
    raw = yaml.safe_load(spec.read_text())
    batches = raw["batch_sizes"]
    # 32 sequences (32K tokens) up to ~40M tokens per step, through the paper's 122 x 32 = 3904.
    assert min(batches) == 32 and 32 * 122 in batches and max(batches) * 1024 >= 39e6
    assert all(b % 32 == 0 for b in batches)                                # b_inner 32 divides every batch
    # adamw 3 lrs + muon 2 + soap 3 + gn 1, at every batch size, one seed.
    assert n == (3 + 2 + 3 + 1) * len(batches)
    monkeypatch.chdir(tmp_path)
    sweep_mod.main(str(spec), "out", emit="slurm")
    script = (tmp_path / "out" / "sweep.sbatch").read_text()
    rows = runner_mod.read_manifest(tmp_path / "out")
    assert len(rows) == n and f"#SBATCH --array=0-{n - 1}" in script
    gn_rows = [r for r in rows if "--method gn" in r["command"]]
    assert gn_rows
    for r in gn_rows[:3]:
        cfg = load_config(tmp_path / r["workdir"] / "config_in.yaml")
        entry = cfg.methods[0]
        assert cfg.train.batch_size == 32 * entry.hparams.inner_steps       # b_inner 32, batch grows through N
