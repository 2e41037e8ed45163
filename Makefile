# Two commands: `make quickstart` (the main job) and `make test` (the test suite).
# Both create the virtual environment $(VENV) on first use from the pinned
# versions in constraints.txt; `make constraints` refreshes those pins.

PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.gn-installed
EXTRAS := dev,tb

.PHONY: quickstart test venv constraints

quickstart: $(STAMP)
	$(VENV)/bin/gn compare configs/quickstart.yaml

test: $(STAMP)
	$(VPY) -m pytest -q

venv: $(STAMP)

# Reinstalled when the dependencies or their pins change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install -c constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

# Refresh the pins: newest versions in a throwaway environment, frozen for this
# Python, resolved for the other supported ones; then run `make test`.
constraints:
	rm -rf .venv-constraints
	$(PYTHON) -m venv .venv-constraints
	.venv-constraints/bin/python -m pip install --quiet --upgrade pip
	.venv-constraints/bin/python -m pip install --quiet -e ".[$(EXTRAS)]"
	.venv-constraints/bin/python scripts/constraints.py --out constraints.txt
	rm -rf .venv-constraints
