"""`model.memory`: plain or lean chosen from XLA's compiled memory against a budget (gn.train.memory)."""

import json

import pytest

from gn import cli
from gn.config import config_from_dict
from gn.errors import ConfigError
from gn.model import model_config
from gn.model.config import LEAN, PLAIN, apply_memory
from gn.train.memory import estimate_bytes, resolve_memory

# Activations dominate the nano model at this shape, so lean's estimate is well below plain's.
SHAPE = dict(micro_batch=32, seq_len=128)


def _nano(**kw):
    return model_config("nano", vocab_size=512, memory="auto", **kw)


def test_auto_chooses_plain_for_nano_on_this_host():
    cfg, rec = resolve_memory(_nano(), curvature=True, **SHAPE)
    assert rec["chosen"] == "plain" and rec["budget_from"] == "host available memory"
    assert (cfg.logits_chunk, cfg.attn_chunk, cfg.remat, cfg.scan_layers, cfg.memory) == (0, 0, False, False, None)
    assert set(rec["estimates"]) == {"plain"}          # lean is not compiled when plain fits


@pytest.mark.parametrize("curvature", [True, False])
def test_auto_chooses_lean_where_a_set_limit_requires_it(curvature):
    plain = estimate_bytes(apply_memory(_nano(), "plain", SHAPE["seq_len"]), curvature=curvature, **SHAPE)
    lean = estimate_bytes(apply_memory(_nano(), "lean", SHAPE["seq_len"]), curvature=curvature, **SHAPE)
    # Measured on CPU (jax 0.10): 0.19 / 0.14 GB plain for the GN / gradient step; lean well under it.
    assert lean["total_bytes"] < 0.8 * plain["total_bytes"]
    limit_gb = (lean["total_bytes"] + plain["total_bytes"]) / 2 / 1e9
    cfg, rec = resolve_memory(_nano(memory_limit_gb=limit_gb), curvature=curvature, **SHAPE)
    assert rec["chosen"] == "lean" and rec["budget_from"] == "model.memory_limit_gb"
    assert (cfg.logits_chunk, cfg.remat, cfg.scan_layers) == (LEAN["logits_chunk"], True, True)
    assert cfg.attn_chunk == 0      # LEAN's 256-query chunk does not divide a 128-token sequence: one chunk
    with pytest.raises(ConfigError, match="no setting that fits"):
        resolve_memory(_nano(memory_limit_gb=lean["total_bytes"] / 2 / 1e9), curvature=curvature, **SHAPE)


def test_memory_modes_and_their_validation():
    assert model_config("45m").memory == "auto" and all(getattr(model_config("45m"), k) == v for k, v in PLAIN.items())
    # Stating one of the four fields without a memory mode makes them the user's (memory None).
    cfg = config_from_dict({"model": {"preset": "45m", "logits_chunk": 1024}, "data": {"seq_len": 64}})
    assert (cfg.model.memory, cfg.model.logits_chunk, cfg.model.remat) == (None, 1024, False)
    lean, _ = resolve_memory(model_config("45m", memory="lean"), micro_batch=2, seq_len=512, curvature=True)
    assert (lean.logits_chunk, lean.attn_chunk, lean.remat, lean.scan_layers) == (4096, 256, True, True)
    with pytest.raises(ConfigError, match="unknown memory 'lena'.*lean"):
        model_config("nano", memory="lena")
    with pytest.raises(ConfigError, match="chooses logits_chunk.*remat is also set"):
        model_config("nano", memory="lean", remat=True)
    with pytest.raises(ConfigError, match="memory_limit_gb"):
        model_config("nano", memory="auto", memory_limit_gb=-1)


def test_gn_train_records_the_choice_and_lean_computes_the_same_run(tmp_path):
    """`gn train` with memory auto under a limit that plain cannot meet runs lean; the losses equal
    the plain run's (the same function, to float32 summation order)."""
    from gn.train.run import prepare

    raw = {"model": {"preset": "nano", "hidden": 32, "memory": "plain"}, "data": {"seq_len": 16},
           "methods": [{"name": "adamw"}]}
    mcfg = prepare(config_from_dict(raw), "adamw").model_cfg     # the run's model, vocabulary included
    est = lambda mode: estimate_bytes(apply_memory(mcfg, mode, 16), micro_batch=16, seq_len=16,  # noqa: E731
                                      curvature=False)["total_bytes"]
    assert est("lean") < est("plain")
    limit = (est("lean") + est("plain")) / 2 / 1e9
    base = ["--set", "model.preset=nano", "--set", "model.hidden=32", "--set", "data.seq_len=16",
            "--set", "train.steps=3", "--set", "train.batch_size=16", "--set", "train.eval_every=3",
            "--set", "train.progress=false", "--set", "data.val_sequences=16", "--set", "train.eval_batch_size=16"]
    cfg = tmp_path / "c.yaml"
    cfg.write_text("methods:\n  - {name: adamw, learning_rate: 0.01}\n")
    runs = {}
    for name, sets in (("plain", ["--set", "model.memory=plain"]),
                       ("auto", ["--set", "model.memory=auto", "--set", f"model.memory_limit_gb={limit}"])):
        assert cli.main(["train", str(cfg), "--method", "adamw", "--workdir", str(tmp_path / name), *base, *sets]) == 0
        runs[name] = json.loads((tmp_path / name / "summary.json").read_text())
        rows = [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        runs[name]["losses"] = [r["train_loss"] for r in rows if "train_loss" in r]
    assert runs["plain"]["memory"] == {"mode": "plain", "chosen": "plain"}
    assert runs["auto"]["memory"]["chosen"] == "lean"
    assert runs["auto"]["losses"] == pytest.approx(runs["plain"]["losses"], rel=1e-5)
    # The stored config keeps the mode (not the choice), so resuming on another device is no drift.
    assert "memory: auto" in (tmp_path / "auto" / "config.yaml").read_text()
    assert cli.main(["train", str(cfg), "--method", "adamw", "--workdir", str(tmp_path / "auto"), *base,
                     "--set", "model.memory=auto", "--set", f"model.memory_limit_gb={limit}"]) == 0
