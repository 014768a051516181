# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
# The local CPU build of torch is pinned through constraints.txt; pyproject.toml keeps a normal range.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

.PHONY: install demo test test-all lint bench
install: $(STAMP)

demo: $(STAMP)
	$(BIN)/nanoseek demo $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest

test-all: $(STAMP)
	$(BIN)/python -m pytest -m "slow or not slow"

lint: $(STAMP)
	$(BIN)/ruff check nanoseek tests benchmarks
