# fedge — the README's two commands are `make demo` and `make test`; both set up everything
# they need on a fresh Debian/Ubuntu machine (system packages, .venv, the project).

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedge-installed
# A second, device-like environment proving the tflite-runtime fallback (no ai-edge-litert,
# tflite-runtime 2.14 which needs numpy<2).
TFLITE_VENV ?= .venv-tflite
TFLITE_STAMP := $(TFLITE_VENV)/.fedge-installed
PIP_FLAGS ?= --quiet --disable-pip-version-check

.PHONY: install system-deps tflite-env test lint typecheck pytest demo bench clean

system-deps:
	@bash scripts/system-deps.sh

install: system-deps $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(PIP_FLAGS) --upgrade pip
	$(BIN)/pip install $(PIP_FLAGS) -e '.[demo,dev]'
	touch $@

tflite-env: system-deps $(TFLITE_STAMP)

$(TFLITE_STAMP): pyproject.toml
	$(PYTHON) -m venv $(TFLITE_VENV)
	$(TFLITE_VENV)/bin/pip install $(PIP_FLAGS) 'tflite-runtime==2.14.0' 'numpy<2'
	touch $@

lint: install
	$(BIN)/ruff check .

typecheck: install
	$(BIN)/mypy

pytest: install tflite-env
	FEDGE_TFLITE_PYTHON=$(CURDIR)/$(TFLITE_VENV)/bin/python $(BIN)/pytest $(PYTEST_ARGS)

test: lint typecheck pytest

# A Mosquitto broker, the aggregator and 7 agents (one per training subject of the real
# smartwatch data) for 20 federated rounds; writes out/demo/summary.json and rounds.png.
demo: install
	$(BIN)/fedge demo --out out/demo

bench: install
	$(BIN)/python bench/bench_training.py --out bench/results/training.json
	$(BIN)/python bench/bench_rounds.py --out bench/results/rounds.json

clean:
	rm -rf $(VENV) $(TFLITE_VENV) out .pytest_cache .mypy_cache .ruff_cache
