# Two commands: `make repro` (set up + run the pipeline) and `make test`.
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: setup kernel repro test llamacpp profile ryangpt bench

setup: $(VENV)/.installed node_modules/.installed $(VENV)/llama.cpp/VERSION kernel

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(PIP_ARGS) -r requirements.txt -r requirements-dev.txt
	touch $@

# llama.cpp's converter for the gguf stage, from the pinned llama-cpp-python source distribution on PyPI.
$(VENV)/llama.cpp/VERSION: $(VENV)/.installed model/llamacpp.py
	$(BIN)/python -m model.llamacpp
	touch $@

# The server's decode kernel (serve/kernel.cpp), compiled here once so that the server compiles nothing. Run every
# time: the library is built for this source, these flags, this CPU and this torch, and the command returns at once
# when that one is there (a file stamp would miss a new CPU or torch). Without a C++ compiler it says so in one
# line and goes on (the pipeline needs none), and tries again on the next run.
kernel: $(VENV)/.installed
	$(BIN)/python -m serve.kernel

# The plots page's JavaScript (vega, from the npm registry), so `dvc plots show` renders offline.
node_modules/.installed: package.json package-lock.json
	@if command -v npm >/dev/null 2>&1; then npm ci --no-audit --no-fund --loglevel=error && touch $@; \
	else echo "npm not found: install Node.js for the dvc plots show page; nothing else needs it"; fi

repro: setup
	dvc repro

# Lint (pyproject.toml: rules that catch real defects) and formatting first: a failure there fails `make test`.
test: setup
	ruff check .
	ruff format --check .
	python -m pytest -q tests

# llama.cpp itself (llama-cpp-python and llama-server, built from the converter's source distribution, for any
# x86-64 CPU with AVX2: a build for the native CPU crashes on some), for the GGUF tests; about 20 minutes on 2 cores.
llamacpp: setup
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(BIN)/python -m pip install --quiet $(VENV)/llama.cpp/llama_cpp_python-*.tar.gz
	$(BIN)/python -m model.llama_server

# Switch params.yaml to a profile of configs/ (`make profile NAME=ryangpt-fast`); `dvc params diff` then
# shows what changed and `git checkout params.yaml` switches back to the sample profile. Local edits of
# params.yaml are never overwritten.
profile: setup
	@git diff --quiet -- params.yaml || { echo "params.yaml has local edits; commit or stash them first (git diff params.yaml)"; exit 1; }
	python -m model.profiles $(NAME)

ryangpt: NAME := ryangpt
ryangpt: profile

bench: setup
	python -m benchmarks.data_pipeline
