# Set-up and the two entry points. Everything installs into .venv from the package registries.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

## demo: install, synthesize a tree, pack, verify, benchmark loaders, train the uni/multi-task study on the CPU
demo: $(STAMP)
	$(BIN)/python tools/demo.py

## lint: ruff's checks and formatting (pyproject.toml [tool.ruff]); part of `make test`
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

## test: the lint check, then the fast test tier (what CI runs)
test: lint
	$(BIN)/python -m pytest -q

## test-all: every tier, the slow training tests included
test-all: lint
	$(BIN)/python -m pytest -q -m 'slow or not slow'

clean:
	rm -rf demo runs
