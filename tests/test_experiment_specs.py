"""Every file under experiments/ that docs/results.md cites resolves: a sweep spec expands into its runs
(each validated as a config), a training config loads. A spec broken by an edit elsewhere (a renamed key,
a method option removed) fails here, not in a researcher's `gn sweep` hours later."""

from pathlib import Path

import pytest
import yaml

from gn.config import load_config
from gn.studies import sweep

EXPERIMENTS = sorted((Path(__file__).parent.parent / "experiments").glob("*.yaml"))


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
        assert len({r.name for r in runs}) == len(runs)
        assert [r.id for r in runs] == list(range(len(runs))), "ids are the positions docs/results.md cites"
    else:
        cfg = load_config(path)
        assert cfg.methods
