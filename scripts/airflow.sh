#!/usr/bin/env bash
# `make airflow`: the Airflow UI over this repo's dags/ and plugins/, with the same metadata DB and data root as
# `make demo`, so the demo's runs and reports are there. Ctrl-C stops every process it started.
#
#   AIRFLOW_PORT   UI/API port on 127.0.0.1 (default 8080); the execution API, log server and scheduler health
#                  ports follow it (PORT+1..PORT+3), so nothing else has to be moved by hand
#   IIP_DATA_ROOT  data root (default ./.data)        IIP_UI_NO_LOGIN=1  every visitor is admin (local only)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=$ROOT/.venv/bin
export PATH=$BIN:$PATH  # standalone starts its components as `airflow ...` from PATH
PORT=${AIRFLOW_PORT:-8080}
case $PORT in ''|*[!0-9]*) echo "AIRFLOW_PORT must be a number, got '$PORT'" >&2; exit 2;; esac

export AIRFLOW_HOME=${AIRFLOW_HOME:-$ROOT/.airflow/demo}
export AIRFLOW__CORE__DAGS_FOLDER=$ROOT/dags
export AIRFLOW__CORE__PLUGINS_FOLDER=$ROOT/plugins
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__API__HOST=127.0.0.1
export AIRFLOW__API__PORT=$PORT
export AIRFLOW__API__BASE_URL=http://127.0.0.1:$PORT
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL=http://127.0.0.1:$PORT/execution/
export AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=$((PORT + 1))
export AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT=$((PORT + 2))
export AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT=$((PORT + 3))
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS=${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS:-admin:admin}
if [ "${IIP_UI_NO_LOGIN:-0}" = 1 ]; then export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS=True; fi
export IIP_DATA_ROOT=${IIP_DATA_ROOT:-$ROOT/.data}
export IIP_EXECUTION_MODE=${IIP_EXECUTION_MODE:-local}
mkdir -p "$AIRFLOW_HOME"

if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
  echo "port $PORT on 127.0.0.1 is taken; choose another: make airflow AIRFLOW_PORT=8090" >&2; exit 2
fi

echo "== metadata DB at $AIRFLOW_HOME (shared with make demo)"
$BIN/airflow db migrate >"$AIRFLOW_HOME/migrate.log" 2>&1 || { tail -20 "$AIRFLOW_HOME/migrate.log"; exit 1; }
echo "== parsing dags/ and unpausing the triggered DAGs"
$BIN/airflow dags reserialize >"$AIRFLOW_HOME/reserialize.log" 2>&1 || { tail -20 "$AIRFLOW_HOME/reserialize.log"; exit 1; }
# Every DAG a user triggers starts unpaused; the scheduled nightly_refresh stays paused until a user unpauses it,
# so opening the UI never starts a full refresh on its own.
$BIN/airflow dags unpause -y --treat-dag-id-as-regex '^(?!nightly_refresh$).*' >/dev/null 2>&1 || true

LOG=$AIRFLOW_HOME/standalone.log
echo "== starting Airflow (api-server, scheduler, dag processor, triggerer); log: $LOG"
setsid "$BIN/airflow" standalone >"$LOG" 2>&1 &
PGID=$!

stop() {
  # Kill first, talk after: a closed terminal or pipe must not stop the clean-up half way (SIGPIPE on echo).
  trap - INT TERM EXIT
  trap '' PIPE
  kill -TERM -- "-$PGID" 2>/dev/null || true
  { echo; echo "== stopping Airflow (process group $PGID)"; } 2>/dev/null || true
  for _ in $(seq 1 10); do kill -0 -- "-$PGID" 2>/dev/null || break; sleep 1; done
  kill -KILL -- "-$PGID" 2>/dev/null || true
  echo "stopped" 2>/dev/null || true
}
trap stop INT TERM EXIT

for _ in $(seq 1 120); do
  if curl -fsS "http://127.0.0.1:$PORT/api/v2/monitor/health" >/dev/null 2>&1; then break; fi
  kill -0 "$PGID" 2>/dev/null || { echo "Airflow exited; last lines of $LOG:" >&2; tail -30 "$LOG" >&2; exit 1; }
  sleep 1
done
curl -fsS "http://127.0.0.1:$PORT/api/v2/monitor/health" >/dev/null || { echo "Airflow did not become healthy" >&2; exit 1; }

echo
echo "Airflow UI      : http://127.0.0.1:$PORT/"
if [ "${IIP_UI_NO_LOGIN:-0}" = 1 ]; then
  echo "login           : none (IIP_UI_NO_LOGIN=1: every visitor is admin)"
else
  PW=$($BIN/python -c "import json,sys; print(json.load(open(sys.argv[1])).get('admin',''))" \
       "$AIRFLOW_HOME/simple_auth_manager_passwords.json.generated" 2>/dev/null || true)
  echo "login           : admin / ${PW:-see $AIRFLOW_HOME/simple_auth_manager_passwords.json.generated}"
fi
echo "dataset reports : http://127.0.0.1:$PORT/iip/reports  (and a Report tab on every run)"
echo "data root       : $IIP_DATA_ROOT"
echo "Ctrl-C stops it."
wait "$PGID"
