"""Set-up in two commands: the Makefile, the pinned versions and CI agree."""

import os
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

try:
    from packaging.requirements import Requirement
except ImportError:  # pragma: no cover - pip's vendored copy
    from pip._vendor.packaging.requirements import Requirement

ROOT = Path(__file__).parent.parent
PYTHONS = ("3.11", "3.12")


def _canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def _dependencies():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [Requirement(r) for r in project["dependencies"] + extras["dev"] + extras["tb"]]


def _pins(python: str) -> dict[str, str]:
    env = {"python_version": python, "python_full_version": f"{python}.0"}
    pins: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        (spec,) = req.specifier
        assert spec.operator == "==", line
        name = _canonical(req.name)
        assert name not in pins, f"{name} pinned twice for Python {python}"
        pins[name] = spec.version
    return pins


@pytest.mark.parametrize("python", sorted(set(PYTHONS) | {f"{sys.version_info[0]}.{sys.version_info[1]}"}))
def test_every_dependency_is_pinned_for_each_python(python):
    pins = _pins(python)
    for req in _dependencies():
        name = _canonical(req.name)
        assert name in pins, f"{req.name} is not pinned for Python {python}"
        assert req.specifier.contains(pins[name], prereleases=True), (req, pins[name])
        for extra in req.extras:   # e.g. jax[cpu] -> jaxlib
            assert extra != "cpu" or "jaxlib" in pins
    assert pins["jax"].startswith("0.10.") if python == "3.11" else True
    if python == "3.12":
        assert tuple(int(x) for x in pins["jax"].split(".")[:2]) >= (0, 11)   # no jax 0.10 wheels for 3.12


@pytest.mark.skipif(os.environ.get("CI") != "true", reason="CI installs from constraints.txt; a dev venv may differ")
def test_ci_environment_has_the_pinned_versions():
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    for name, version in _pins(here).items():
        assert metadata.version(name) == version, name


def _recipe(makefile: str, target: str) -> str:
    m = re.search(rf"^{re.escape(target)}:[^\n]*\n((?:\t[^\n]*\n)+)", makefile, re.M)
    assert m, f"no '{target}' target in the Makefile"
    return m.group(1)


def test_makefile_ci_and_readme_use_the_same_two_commands():
    mk = (ROOT / "Makefile").read_text()
    assert "gn compare configs/quickstart.yaml" in _recipe(mk, "quickstart")
    assert "-m pytest -q" in _recipe(mk, "test")
    assert re.search(r"^quickstart: \$\(STAMP\)", mk, re.M) and re.search(r"^test: \$\(STAMP\)", mk, re.M)
    install = _recipe(mk, "$(STAMP)")
    assert "-m venv" in install and "-c constraints.txt" in install
    assert "scripts/constraints.py" in _recipe(mk, "constraints")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "set -euo pipefail" in ci
    assert re.search(r"^make test\b", ci, re.M), "CI must run the README's test command"
    readme = (ROOT / "README.md").read_text()
    top = readme.split("```")[1]
    commands = [ln.split("#")[0].strip() for ln in top.splitlines()[1:] if ln.split("#")[0].strip()]
    assert commands == ["make quickstart", "make test"]
    assert "gn compare configs/quickstart.yaml" in readme
    assert "make constraints" in readme
