# Quickstart: `make demo` and `make test` on a fresh machine. Both create .venv first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0

export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_ENABLE_TELEMETRY := false

.PHONY: install test lint unit demo up down bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: the CPU wheel on this machine; a plain `torch` would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[test,bench]'
	# build the C++ decode step and bf16 attention now (~30 s each, cached) rather than in the first
	# sampling or training step; a failure only warns
	$(PY) -c "from igpt_core import native; native.decode_extension(); native.attention_extension()"
	touch $@

install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/pytest

unit: install
	$(VENV)/bin/pytest -m "not slow"

demo: install
	$(VENV)/bin/igpt run

up: install
	bash infra/up.sh

down:
	bash infra/down.sh

bench: install
	for b in bench/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) igpt-home .pytest_cache
