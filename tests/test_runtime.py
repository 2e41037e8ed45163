"""Process set-up and timing: the persistent compile cache is really on for the CLI,
and compilation is measured apart from the step's computation."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gn.config import config_from_dict
from gn.train.trainer import train
from gn.train.timing import CompileClock
from tests.test_train import TINY

ROOT = Path(__file__).parent.parent


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT"))}
    env.update(PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", **extra)
    return env


def test_parser_does_not_import_jax():
    code = "import sys, gn.cli; gn.cli.build_parser(); print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_cli_fills_the_persistent_compile_cache(tmp_path):
    cfg = {**TINY, "train": {**TINY["train"], "steps": 2}, "methods": [{"name": "adamw", "learning_rate": 0.01}]}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    cache = tmp_path / "cache"
    code = "import sys; from gn.cli import main; sys.exit(main(sys.argv[1:]))"
    args = ["train", str(tmp_path / "tiny.yaml"), "--method", "adamw", "--workdir", str(tmp_path / "run")]
    # GN_CACHE_DIR only: the cache directory and its settings come from gn.cli itself
    # (minimum compile time 0 so that the tiny run's fast compilations are stored too).
    env = _env(GN_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    subprocess.run([sys.executable, "-c", code, *args], env=env, check=True, capture_output=True, cwd=tmp_path)
    entries = [p for p in (cache / "xla").rglob("*") if p.is_file()]
    assert len(entries) >= 3, entries       # the step, the evaluation, the finiteness check, ...
    # A rerun in a fresh workdir loads them: the first step compiles less than without the cache.
    args[-1] = str(tmp_path / "rerun")
    subprocess.run([sys.executable, "-c", code, *args], env=env, check=True, capture_output=True, cwd=tmp_path)
    first = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][1]
    again = [json.loads(line) for line in (tmp_path / "rerun" / "metrics.jsonl").read_text().splitlines()][1]
    print(f"first step compile: {first['compile_time_s']:.3f} s cold, {again['compile_time_s']:.3f} s from the cache")


def test_compile_time_is_apart_from_wall_time(tmp_path):
    cfg = config_from_dict({**TINY, "train": {**TINY["train"], "steps": 3, "eval_every": 10, "checkpoint_every": 10}})
    summary = train(cfg, "adamw", tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][1:]
    assert rows[0]["compile_time_s"] > 0                        # the first step compiles the method's step
    assert [r["compile_time_s"] for r in rows[1:]] == [0.0, 0.0]  # identical steps reuse it
    wall = 0.0
    for r in rows:
        assert 0 <= r["compile_time_s"] <= r["step_time_s"]
        wall += r["step_time_s"] - r["compile_time_s"]
        assert r["wall_time_s"] == pytest.approx(wall, rel=1e-9, abs=1e-12)
    assert rows[0]["wall_time_s"] < rows[0]["step_time_s"]
    assert summary["compile_time_s"] == pytest.approx(sum(r["compile_time_s"] for r in rows))
    assert summary["wall_time_s"] == pytest.approx(wall)


def test_compile_clock_counts_nested_spans_once():
    clock = CompileClock()
    ev = "/jax/core/compile/jaxpr_trace_duration"
    clock._on_span(ev, 1.0, 2.0)           # inner trace closes first ...
    clock._on_span(ev, 0.5, 3.0)           # ... inside the outer one
    clock._on_span("/jax/other", 0.0, 10.0)
    assert clock.total() == pytest.approx(2.5)
    mark = clock.mark()
    clock._on_span("/jax/core/compile/backend_compile_duration", 4.0, 4.5)
    assert clock.since(mark) == pytest.approx(0.5)


def test_one_cache_root_honours_gn_cache_dir_then_xdg_cache_home(monkeypatch, tmp_path):
    from gn.data.cache import cache_root as data_root
    from gn.runtime import cache_root

    monkeypatch.delenv("GN_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == data_root(None) == tmp_path / "xdg" / "gn"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")        # the XDG rule: relative paths are ignored
    assert cache_root() == data_root(None) == Path.home() / ".cache" / "gn"
    monkeypatch.setenv("GN_CACHE_DIR", str(tmp_path / "gn"))
    assert cache_root() == data_root(None) == tmp_path / "gn"
    assert data_root(str(tmp_path / "explicit")) == tmp_path / "explicit"
