#!/usr/bin/env bash
# Start a local PostgreSQL for the integration tests (Airflow's metadata database). Idempotent.
#
# - installs Debian's `postgresql` when the cluster tools are missing (needs root and apt);
# - starts the first existing cluster (e.g. `15 main`), creating `<version> main` if there is none;
# - waits until it accepts connections on 127.0.0.1;
# - creates (or updates) role `iip` (LOGIN CREATEDB, password from IIP_PG_PASSWORD, default
#   `iip-test`, a non-secret test value) and database `iip_airflow_test` owned by it.
# Prints the SQLAlchemy URL without the password on the last line of stdout.
set -euo pipefail

PG_ROLE=${IIP_PG_USER:-iip}
PG_PASSWORD=${IIP_PG_PASSWORD:-iip-test}
PG_DB=${IIP_PG_DATABASE:-iip_airflow_test}

log() { echo "start-postgres: $*" >&2; }

as_postgres() {
    if [ "$(id -un)" = postgres ]; then
        "$@"
    elif [ "$(id -u)" -eq 0 ]; then
        if command -v runuser >/dev/null 2>&1; then runuser -u postgres -- "$@"; else su postgres -s /bin/sh -c "$(printf '%q ' "$@")"; fi
    else
        sudo -n -u postgres -- "$@"
    fi
}

if ! command -v pg_ctlcluster >/dev/null 2>&1 || ! command -v pg_lsclusters >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ]; then
        log "PostgreSQL is not installed and this is not root: install Debian's 'postgresql' package first"
        exit 1
    fi
    log "installing Debian's postgresql"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2
    apt-get install -y -q postgresql >&2
fi

# The first cluster that exists (`<version> <name> <port> <status> ...`); create one if none.
cluster=$(pg_lsclusters --no-header 2>/dev/null | awk 'NF { print; exit }')
if [ -z "$cluster" ]; then
    version=$(ls /usr/lib/postgresql 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$version" ]; then
        log "no PostgreSQL server version found under /usr/lib/postgresql"
        exit 1
    fi
    log "creating cluster $version main"
    pg_createcluster "$version" main >&2
    cluster=$(pg_lsclusters --no-header | awk 'NF { print; exit }')
fi
read -r PG_VERSION PG_CLUSTER PG_PORT PG_STATUS _ <<<"$cluster"

if [ "$PG_STATUS" != online ]; then
    log "starting cluster $PG_VERSION $PG_CLUSTER (port $PG_PORT)"
    # Another caller may start it at the same moment: a failure is fatal only if it is still down.
    pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" start >&2 || log "pg_ctlcluster start returned an error; checking"
fi

ready=""
for _ in $(seq 1 60); do
    if pg_isready -q -h 127.0.0.1 -p "$PG_PORT"; then ready=1; break; fi
    sleep 0.5
done
if [ -z "$ready" ]; then
    log "cluster $PG_VERSION $PG_CLUSTER is not accepting connections on 127.0.0.1:$PG_PORT after 30 s"
    pg_lsclusters >&2 || true
    tail -n 30 "/var/log/postgresql/postgresql-$PG_VERSION-$PG_CLUSTER.log" >&2 2>/dev/null || true
    exit 1
fi

# Role and database. Values travel through psql variables (quoted by psql, never in argv or the shell).
as_postgres env IIP_PG_ROLE="$PG_ROLE" IIP_PG_PW="$PG_PASSWORD" IIP_PG_DB="$PG_DB" \
    psql -X -q -v ON_ERROR_STOP=1 -p "$PG_PORT" -d postgres >&2 <<'SQL'
\getenv role IIP_PG_ROLE
\getenv pw IIP_PG_PW
\getenv db IIP_PG_DB
SELECT NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'role') AS create_role \gset
\if :create_role
CREATE ROLE :"role" LOGIN CREATEDB PASSWORD :'pw';
\else
ALTER ROLE :"role" LOGIN CREATEDB PASSWORD :'pw';
\endif
SELECT NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'db') AS create_db \gset
\if :create_db
CREATE DATABASE :"db" OWNER :"role";
\endif
SQL

log "ready: cluster $PG_VERSION $PG_CLUSTER on 127.0.0.1:$PG_PORT, role $PG_ROLE, database $PG_DB"
echo "postgresql+psycopg2://${PG_ROLE}@127.0.0.1:${PG_PORT}/${PG_DB}"
