"""The run archive (gn.studies.run_archive): a committed analysis keeps what its runs were, so
that it can be redone bit for bit and extended without the run directories."""

from __future__ import annotations

import gzip
import json
import shutil

import numpy as np
import pytest

from gn.cli import main
from gn.errors import ConfigError
from gn.studies.analyze import analyze_runs, to_json, write_outputs
from gn.studies.run_archive import ARCHIVE_NAME, FORMAT, load_runs, read_archive, write_archive
from tests.test_analyze import _fake_run


def _study(root, seeds=(0, 1, 2), batches=(16, 64, 256)):
    """Fake runs with seed noise, three lrs per batch, so that the bootstrap and the lr choice both act."""
    rng = np.random.default_rng(0)
    for b in batches:
        for lr in (1e-3, 3e-3, 1e-2):
            for s in seeds:
                scale = (1 + 16 / b) * (1.3 if lr != 3e-3 else 1.0) * (1 + 0.05 * rng.standard_normal())
                curve = [5.0] + [3.0 + 2.0 * np.exp(-k / (3 * scale)) for k in range(1, 12)]
                _fake_run(root / f"adamw_B{b}_lr{lr:g}_s{s}", method="adamw", batch=b, lr=lr, seed=s,
                          curve=[float(x) for x in curve], every=2)


def test_archive_alone_reproduces_the_analysis_bit_for_bit(tmp_path):
    _study(tmp_path / "runs")
    res = analyze_runs([tmp_path / "runs"], n_boot=200, fixed_tokens=True)
    write_outputs(res, tmp_path / "a")
    again = analyze_runs([tmp_path / "a" / ARCHIVE_NAME], n_boot=200, fixed_tokens=True)
    write_outputs(again, tmp_path / "b")
    for f in ("analysis.json", "report.md", ARCHIVE_NAME):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    # the analysis really rests on the seeds: 27 runs, 3 seeds a cell, a fit with an interval of nonzero width
    best = res["methods"]["adamw"]["targets"]["3.5"]["best"]
    assert res["counts"]["runs"] == 27 and all(e["n_seeds"] == 3 for e in best)
    lo, hi = res["methods"]["adamw"]["targets"]["3.5"]["fit"]["B_crit_ci"]
    assert lo < hi


def test_new_runs_extend_an_archived_study_as_if_never_lost(tmp_path):
    """Seeds 0-1 archived, their directories deleted; seed 2 run later: the joint analysis equals
    the analysis of all three seeds' directories."""
    _study(tmp_path / "all")
    full = to_json(analyze_runs([tmp_path / "all"], n_boot=200))
    old, new = tmp_path / "old", tmp_path / "new"
    for d in (tmp_path / "all").iterdir():
        shutil.copytree(d, (new if d.name.endswith("_s2") else old) / d.name)
    write_outputs(analyze_runs([old], n_boot=200), tmp_path / "committed")
    shutil.rmtree(old)
    joint = to_json(analyze_runs([new, tmp_path / "committed" / ARCHIVE_NAME], n_boot=200))
    # same runs, same order, same numbers; only the directories named in `source` differ
    full.pop("source"), joint.pop("source")
    assert json.dumps(full) == json.dumps(joint)


def test_a_directory_replaces_the_archived_run_of_its_name(tmp_path):
    _fake_run(tmp_path / "r" / "x", method="adamw", batch=16, lr=1e-3, seed=0, curve=[5, 4])
    write_archive(load_runs([tmp_path / "r"]), tmp_path / ARCHIVE_NAME)
    shutil.rmtree(tmp_path / "r")
    # the run continued (a later stop rule): its directory now has a third evaluation
    _fake_run(tmp_path / "r" / "x", method="adamw", batch=16, lr=1e-3, seed=0, curve=[5, 4, 3])
    runs = load_runs([tmp_path / ARCHIVE_NAME, tmp_path / "r"])
    assert len(runs) == 1 and [e["val_loss"] for e in runs[0]["evals"]] == [5, 4, 3]
    alone = load_runs([tmp_path / ARCHIVE_NAME])
    assert [e["val_loss"] for e in alone[0]["evals"]] == [5, 4]
    assert alone[0]["evals"][1]["compute"] == 10.0 * 16   # derived again: grad_evals x batch


def test_archive_is_deterministic_and_lossless(tmp_path):
    _fake_run(tmp_path / "r" / "x", method="adamw", batch=16, lr=1e-3, seed=0, curve=[5, 1 / 3, 0.1 + 0.2])
    runs = load_runs([tmp_path / "r"])
    a = write_archive(runs, tmp_path / "a.jsonl.gz").read_bytes()
    b = write_archive(list(reversed(runs)), tmp_path / "b.jsonl.gz").read_bytes()
    assert a == b
    back = read_archive(tmp_path / "a.jsonl.gz")
    assert [e["val_loss"] for e in back[0]["evals"]] == [5, 1 / 3, 0.1 + 0.2]   # floats exactly


def _write_lines(path, lines):
    path.write_bytes(gzip.compress(("\n".join(json.dumps(x) for x in lines) + "\n").encode(), mtime=0))


def test_bad_archives_are_refused_before_any_analysis(tmp_path):
    _fake_run(tmp_path / "r" / "x", method="adamw", batch=16, lr=1e-3, seed=0, curve=[5, 4])
    good = json.loads(gzip.decompress(write_archive(load_runs([tmp_path / "r"]),
                                                    tmp_path / "g.jsonl.gz").read_bytes()).decode().split("\n")[1])
    p = tmp_path / "bad.jsonl.gz"
    p.write_bytes(b"not gzip")
    with pytest.raises(ConfigError, match="cannot read run archive"):
        read_archive(p)
    _write_lines(p, [{"format": "other"}, good])
    with pytest.raises(ConfigError, match="not a gn run archive"):
        read_archive(p)
    _write_lines(p, [FORMAT, {k: v for k, v in good.items() if k != "seed"}])
    with pytest.raises(ConfigError, match="line 2: run record lacks seed"):
        read_archive(p)
    _write_lines(p, [FORMAT, good | {"batch_size": 0}])
    with pytest.raises(ConfigError, match="positive numbers"):
        read_archive(p)
    _write_lines(p, [FORMAT, good | {"evals": [{"step": 0}]}])
    with pytest.raises(ConfigError, match="evaluation 0 has no numeric val_loss"):
        read_archive(p)
    p.write_bytes(gzip.compress((json.dumps(FORMAT) + "\n\n" + json.dumps(good) + "\n{oops\n").encode()))
    with pytest.raises(ConfigError, match="line 4: not JSON"):   # the file's line, blank lines counted
        read_archive(p)
    _write_lines(p, [FORMAT])
    with pytest.raises(ConfigError, match="holds no run"):
        load_runs([p])
    with pytest.raises(ConfigError, match="not found"):
        load_runs([tmp_path / "missing.jsonl.gz"])


def test_cli_analyzes_an_archive_and_writes_next_to_it(tmp_path, capsys):
    _study(tmp_path / "runs", seeds=(0, 1), batches=(16, 64))
    assert main(["analyze", str(tmp_path / "runs"), "--out", str(tmp_path / "a")]) == 0
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / ARCHIVE_NAME, tmp_path / "b" / ARCHIVE_NAME)
    assert main(["analyze", str(tmp_path / "b" / ARCHIVE_NAME)]) == 0   # --out defaults to the archive's folder
    assert (tmp_path / "b" / "analysis.json").is_file()
    a = json.loads((tmp_path / "a" / "analysis.json").read_text())
    b = json.loads((tmp_path / "b" / "analysis.json").read_text())
    assert a["methods"] == b["methods"] and a["ratios"] == b["ratios"]


def test_methods_selects_runs_and_names_a_method_with_none(tmp_path):
    _study(tmp_path / "runs", seeds=(0, 1), batches=(16, 64))
    _fake_run(tmp_path / "runs" / "gn_x", method="gn", batch=16, lr=0.1, seed=0, curve=[5, 3])
    res = analyze_runs([tmp_path / "runs"], n_boot=20, methods=["adamw"])
    assert set(res["methods"]) == {"adamw"} and res["counts"]["runs"] == 12
    assert set(analyze_runs([tmp_path / "runs"], n_boot=20)["methods"]) == {"adamw", "gn"}
    with pytest.raises(ConfigError, match="no run of soap"):
        analyze_runs([tmp_path / "runs"], n_boot=20, methods=["adamw", "soap"])
    assert main(["analyze", str(tmp_path / "runs"), "--methods", "gn", "--out", str(tmp_path / "g")]) == 0
    assert set(json.loads((tmp_path / "g" / "analysis.json").read_text())["methods"]) == {"gn"}
