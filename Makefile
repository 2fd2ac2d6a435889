# Set-up and the two entry points. Everything installs into .venv from the package registries.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

## demo: install, synthesize a tree, pack, verify, benchmark loaders, train the uni/multi-task study on the CPU
demo: $(STAMP)
	$(BIN)/python tools/demo.py

## test: the fast test tier (what CI runs)
test: $(STAMP)
	$(BIN)/python -m pytest -q

## test-all: every tier, the slow training tests included
test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m 'slow or not slow'

clean:
	rm -rf demo runs
