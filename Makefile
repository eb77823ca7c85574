# Every target creates .venv at the repository root when it is missing and
# installs the project into it; services are started and stopped by
# scripts/services.sh, which the demo and test targets call themselves.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA ?= ../shared/data

.PHONY: venv demo test test-unit services-up services-down services-status \
	evaluate bench operations lint typecheck clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

demo: venv
	scripts/demo.sh

test: venv
	scripts/test.sh

test-unit: venv
	$(BIN)/python -m pytest -m "not integration"

services-up: venv
	scripts/services.sh up

services-down:
	scripts/services.sh down

services-status:
	scripts/services.sh status

evaluate: venv
	scripts/evaluate.sh $(DATA)

bench: venv
	scripts/bench.sh

operations: venv
	scripts/operations.sh

lint: venv
	$(BIN)/ruff check schemas models stream tests
	$(BIN)/ruff format --check schemas models stream tests

typecheck: venv
	$(BIN)/mypy schemas models

clean:
	rm -rf var build *.egg-info .pytest_cache .mypy_cache .ruff_cache
