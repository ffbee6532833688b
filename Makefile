# reprotune: two commands do all set-up on a fresh machine.
#   make repro   create .venv if missing, install, run the whole DVC pipeline
#   make test    same install, then the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.reprotune-installed
export DVC_NO_ANALYTICS := 1
# dvc.yaml commands call `python`: make it the project's venv interpreter.
export PATH := $(abspath $(BIN)):$(PATH)
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: install repro test test-fast lint dag check clean-venv

install: $(STAMP)

# torch is installed first, pinned, so that nothing resolves the newest CUDA build
# (gigabytes); on a CUDA machine install a CUDA build of the same version first (README).
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

repro: install
	$(BIN)/dvc repro

test: install
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

lint: install
	$(BIN)/ruff check .

dag: install
	$(BIN)/dvc dag

# validate all of params.yaml: one line naming the bad key (the `check` stage runs the same)
check: install
	@$(BIN)/python -m reprotune.params

clean-venv:
	rm -rf $(VENV)
