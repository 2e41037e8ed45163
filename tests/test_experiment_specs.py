"""Every file under experiments/ resolves: a sweep spec expands into its runs (each validated as a config),
a training config loads; and every `gn sweep experiments/X.yaml --only ids` that the docs cite names runs the
spec has. A spec broken by an edit elsewhere (a renamed key, a method option removed, an entry dropped) fails
here, not in a researcher's `gn sweep` hours later."""

from pathlib import Path

import re

import pytest
import yaml

from gn.config import load_config
from gn.studies import sweep

ROOT = Path(__file__).parent.parent
EXPERIMENTS = sorted((ROOT / "experiments").glob("*.yaml"))
DOCS = [ROOT / "docs" / "results.md", ROOT / "experiments" / "README.md", ROOT / "README.md"]
CITED = re.compile(r"gn sweep experiments/([\w.]+\.yaml) --only ([0-9][0-9,]*[0-9]|[0-9])\b")


def _is_spec(path: Path) -> bool:
    raw = yaml.safe_load(path.read_text()) or {}
    return "tokens" in raw and "methods" in raw and "model" not in raw


def test_the_experiments_hold_specs_and_configs():
    kinds = {_is_spec(p) for p in EXPERIMENTS}
    assert kinds == {True, False}, "experiments/ holds sweep specs and the warm starts' training configs"


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_experiment_file_resolves(path):
    if _is_spec(path):
        runs = sweep.expand(sweep.load_spec(path))
        assert runs, f"{path.name} expands into no run"
    else:
        cfg = load_config(path)
        assert cfg.methods


def test_the_ids_the_docs_cite_exist():
    cited: dict[str, set[int]] = {}
    for doc in DOCS:
        for name, ids in CITED.findall(doc.read_text()):
            cited.setdefault(name, set()).update(int(i) for i in ids.split(","))
    assert len(cited) >= 5, "the docs cite sweeps by id; the pattern found too few"
    for name, ids in cited.items():
        path = ROOT / "experiments" / name
        assert path.is_file(), f"the docs cite {name}, which is not in experiments/"
        n = len(sweep.expand(sweep.load_spec(path)))
        assert max(ids) < n, f"the docs cite {name} --only {max(ids)}, but it has {n} runs"
