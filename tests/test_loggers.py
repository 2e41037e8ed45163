"""train.loggers: TensorBoard event files beside metrics.jsonl; clear errors before compute."""

import importlib.util
import json
import struct
from pathlib import Path

import pytest

from gn.config import config_from_dict
from gn.errors import ConfigError
from gn.train.trainer import train
from tests.test_train import TINY


def _events(logdir: Path) -> list:
    """Every Event in the TFRecord event files under logdir (length, crc, data, crc per record)."""
    from tensorboardX.proto.event_pb2 import Event

    out = []
    for path in sorted(logdir.rglob("events.out.tfevents.*")):
        buf = path.read_bytes()
        i = 0
        while i < len(buf):
            (n,) = struct.unpack("<Q", buf[i:i + 8])
            ev = Event()
            ev.ParseFromString(buf[i + 12:i + 12 + n])
            out.append(ev)
            i += 12 + n + 4
    return out


def test_tensorboard_event_files_match_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboardX")
    cfg = config_from_dict({**TINY, "train": {**TINY["train"], "loggers": ["tensorboard"]}})
    assert cfg.train.loggers == ("tensorboard",)
    train(cfg, "adamw", tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    got: dict[str, dict[int, float]] = {}
    for ev in _events(tmp_path / "tb"):
        for v in ev.summary.value:
            got.setdefault(v.tag, {})[ev.step] = v.simple_value
    for key in ("train_loss", "val_loss", "tokens", "wall_time_s", "compile_time_s", "lr"):
        want = {r["step"]: r[key] for r in rows if key in r}
        assert set(got[key]) == set(want), key
        for step, value in want.items():
            assert got[key][step] == pytest.approx(value, rel=1e-6, abs=1e-6), (key, step)
    assert sorted(got["val_loss"]) == [0, 2, 4, 6]


def test_logger_errors_before_compute(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="unknown logger 'tensorbord'.*tensorboard"):
        config_from_dict({**TINY, "train": {**TINY["train"], "loggers": ["tensorbord"]}})
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match="'wandb' is not installed"):
        config_from_dict({**TINY, "train": {**TINY["train"], "loggers": ["wandb"]}})
    assert not list(tmp_path.iterdir())


def test_wandb_offline_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = config_from_dict({**TINY, "train": {**TINY["train"], "steps": 2, "loggers": ["wandb"]}})
    train(cfg, "adamw", tmp_path)
    assert list((tmp_path / "wandb").glob("offline-run-*"))
