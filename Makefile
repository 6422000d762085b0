# Two commands: `make repro` (set up + run the pipeline) and `make test`.
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: setup repro test ryangpt bench

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(PIP_ARGS) -r requirements.txt -r requirements-dev.txt
	touch $@

repro: setup
	dvc repro

test: setup
	python -m pytest -q tests

# Switch params.yaml to the full RyanGPT profile; `dvc params diff` then shows what changed
# and `git checkout params.yaml` switches back to the sample profile. Local edits are never overwritten.
ryangpt:
	@git diff --quiet -- params.yaml || { echo "params.yaml has local edits; commit or stash them first (git diff params.yaml)"; exit 1; }
	cp configs/ryangpt.yaml params.yaml

bench: setup
	python benchmarks/data_pipeline.py
