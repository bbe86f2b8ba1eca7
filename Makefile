# Every dev command is defined once here; .ci/run calls these targets.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo lint format typecheck test check bench flaky-check

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

# The whole suite FLAKY_RUNS times in a row beside one busy process per core, as CI runs it
# (services required, broker restart included); stops at FLAKY_MINUTES. Logs in .flaky-check/.
FLAKY_RUNS ?= 10
FLAKY_MINUTES ?= 150
flaky-check:
	SAGAS_TEST_REQUIRE_SERVICES=1 SAGAS_TEST_BROKER_RESTART=1 SAGAS_FAULT_BROKER_RESTART=1 \
		$(PY) -m tests.flaky_check --runs $(FLAKY_RUNS) --max-minutes $(FLAKY_MINUTES)

bench:
	$(PY) -m bench
