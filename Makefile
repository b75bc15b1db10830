# Two commands do everything on a fresh machine:
#   make demo   - create the environment and run the main job end to end on the embedded default
#   make test   - create the environment and pass the tests (what .ci/run calls)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= test,demo,bench

.PHONY: venv demo test lint typecheck unit bench clean

$(VENV)/.installed-$(EXTRAS): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[$(EXTRAS)]'
	touch $@

venv: $(VENV)/.installed-$(EXTRAS)

demo: venv
	bash scripts/demo.sh

test: venv
	bash scripts/test.sh

lint: venv
	$(BIN)/ruff check operators dags plugins tests bench scripts

typecheck: venv
	$(BIN)/mypy operators dags plugins

unit: venv
	$(BIN)/python -m pytest -q -m "not integration"

bench: venv
	$(BIN)/python bench/ingest.py --records 100000

clean:
	rm -rf .airflow .data .pytest_cache .mypy_cache .ruff_cache
