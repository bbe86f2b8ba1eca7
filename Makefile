# Every dev command is defined once here; .ci/run calls these targets.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo lint format typecheck test check bench

install:
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'

demo:
	$(PY) -m samples.order_processing

lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format:
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

typecheck:
	$(PY) -m mypy

test:
	$(PY) -m pytest

check: lint typecheck test

bench:
	$(PY) -m bench
