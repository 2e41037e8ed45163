"""Config loading: every shipped config resolves; bad input fails with a clear message."""

from pathlib import Path

import pytest

from gn.config import Config, apply_override, config_from_dict, load_config
from gn.errors import ConfigError
from gn.methods import registry

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"quickstart.yaml", "c4_45m.yaml", "c4_150m.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.methods, "every shipped config lists methods"
    for entry in cfg.methods:
        assert entry.method in registry.names()
        assert cfg.method(entry.name) is entry
    # The resolved config round-trips through its own dict form.
    assert config_from_dict(cfg.to_dict()) == cfg


def test_yaml_states_deltas_and_presets_fill_the_rest():
    cfg = load_config(CONFIGS[0].parent / "c4_45m.yaml")
    assert (cfg.model.hidden, cfg.model.layers, cfg.model.heads, cfg.model.ffn) == (512, 4, 8, 2048)
    adamw = cfg.method("adamw")
    assert adamw.hparams.weight_decay == 0.1            # from the file
    assert adamw.hparams.b1 == 0.9                      # registered default


def test_overrides():
    cfg = load_config(CONFIGS[0].parent / "quickstart.yaml",
                      overrides=["train.steps=7", "model.hidden=32", "data.seq_len=64"])
    assert cfg.train.steps == 7 and cfg.model.hidden == 32 and cfg.data.seq_len == 64
    raw = {}
    apply_override(raw, "train.target_losses=[3.0, 2.5]")
    assert config_from_dict(raw).train.target_losses == (3.0, 2.5)


def test_registered_method_with_defaults():
    cfg = config_from_dict({})
    entry = cfg.method("lion")
    assert entry.method == "lion" and entry.hparams.learning_rate > 0


@pytest.mark.parametrize("raw, needle", [
    ({"trian": {}}, "Did you mean 'train'"),
    ({"train": {"step": 3}}, "Did you mean 'steps'"),
    ({"model": {"hiden": 3}}, "Did you mean 'hidden'"),
    ({"methods": [{"name": "adamw", "learning_rat": 0.1}]}, "Did you mean 'learning_rate'"),
    ({"methods": [{"name": "adamw", "learning_rate": -0.1}]}, "learning_rate' must be positive"),
    ({"methods": [{"name": "muonn"}]}, "Did you mean 'muon'"),
    ({"train": {"batch_size": 0}}, "batch_size must be a positive"),
    ({"train": {"batch_size": 10, "grad_accum": 3}}, "divisible"),
    ({"train": {"steps": "many"}}, "must be an integer"),
    ({"data": {"seq_len": 100000}}, "max_seq_len"),
    ({"model": {"preset": "huge"}}, "Valid presets"),
    ({"methods": [{"name": "a", "method": "adamw"}, {"name": "a", "method": "muon"}]}, "unique"),
])
def test_bad_input_is_rejected_with_a_clear_message(raw, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        config_from_dict(raw)


def test_unknown_method_lists_valid_names():
    cfg = config_from_dict({"methods": [{"name": "adamw"}]})
    with pytest.raises(ConfigError) as info:
        cfg.method("nope")
    assert "muon" in str(info.value) and "adamw" in str(info.value)


def test_base_config_is_merged_under_the_file(tmp_path):
    (tmp_path / "a.yaml").write_text("train: {steps: 5, batch_size: 8}\nmethods: [{name: adamw}]\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ntrain: {steps: 7}\nmethods: [{name: muon}]\n")
    cfg = load_config(tmp_path / "b.yaml")
    assert cfg.train.steps == 7 and cfg.train.batch_size == 8
    assert [m.name for m in cfg.methods] == ["muon"]
    (tmp_path / "c.yaml").write_text("base: c.yaml\n")
    with pytest.raises(ConfigError, match="itself"):
        load_config(tmp_path / "c.yaml")


def test_registry_covers_every_method_the_zoo_lists():
    cfg = load_config(CONFIGS[0].parent / "optimizer_zoo.yaml")
    assert {m.name for m in cfg.methods} == set(registry.names())
