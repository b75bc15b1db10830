"""A real Airflow for tests and benchmarks: its own PostgreSQL database, api-server + scheduler + dag-processor
as separate process groups on LocalExecutor, and the REST calls that trigger runs and read their tasks.

Used by tests/integration/test_airflow_scheduler.py, tests/reliability/test_concurrency.py and bench/load.py.
Nothing here depends on pytest fixtures: `fresh_database` raises `PostgresUnavailable`, which a test turns
into `require_or_skip("postgres", ...)` (see `pytest_database`) and a benchmark into an error message.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from tests.conftest import free_port, require_or_skip, wait_for_port

ROOT = Path(__file__).resolve().parents[2]
DAGS_FOLDER = ROOT / "dags"
BIN = Path(sys.executable).parent

PG_HOST = os.environ.get("IIP_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("IIP_PG_PORT", "5432"))
PG_USER = os.environ.get("IIP_PG_USER", "iip")
PG_PASSWORD = os.environ.get("IIP_PG_PASSWORD", "iip-test")  # the non-secret test default
PG_ADMIN_DB = os.environ.get("IIP_PG_DATABASE", "iip_airflow_test")

FINISHED = ("success", "failed")


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL answers with the test role; the message says how to start one."""


# -- PostgreSQL ---------------------------------------------------------------------------------------
def pg_connect(dbname: str) -> Any:
    """A psycopg2 connection to `dbname` as the test role."""
    import psycopg2

    return psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, password=PG_PASSWORD, dbname=dbname,
                            connect_timeout=5)


@contextmanager
def fresh_database() -> Iterator[str]:
    """A fresh, empty PostgreSQL database; yields its SQLAlchemy URL and drops it afterwards.

    Raises PostgresUnavailable when none is reachable, RuntimeError when the asyncpg driver is missing
    (Airflow 3 also opens an async engine on the metadata DB: for PostgreSQL that is asyncpg)."""
    try:
        admin = pg_connect(PG_ADMIN_DB)
    except Exception as e:  # psycopg2.OperationalError, or psycopg2 missing
        detail = " ".join(str(e).split())
        raise PostgresUnavailable(f"PostgreSQL not reachable as {PG_USER}@{PG_HOST}:{PG_PORT}/{PG_ADMIN_DB} "
                                  f"({detail}); start it with scripts/start-postgres.sh") from None
    admin.autocommit = True
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        admin.close()
        raise RuntimeError("Airflow 3 on PostgreSQL needs the asyncpg driver too (pip install asyncpg)") from None
    name = f"iip_af_{uuid.uuid4().hex[:12]}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    admin.close()
    try:
        yield f"postgresql+psycopg2://{PG_USER}:{PG_PASSWORD}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        # A connection of its own: the server may have restarted meanwhile (bench/faults_above.py does that).
        admin = pg_connect(PG_ADMIN_DB)
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@contextmanager
def pytest_database() -> Iterator[str]:
    """`fresh_database` for a test: no PostgreSQL fails the test naming it (or skips, if the developer allowed
    it with IIP_ALLOW_SKIPS=postgres); a missing asyncpg fails it."""
    import pytest

    try:
        db = fresh_database()
        url = db.__enter__()
    except PostgresUnavailable as e:
        require_or_skip("postgres", str(e))
    except RuntimeError as e:
        pytest.fail(str(e))
    try:
        yield url
    finally:
        db.__exit__(None, None, None)


# -- Airflow processes --------------------------------------------------------------------------------
@dataclass
class Airflow:
    """Airflow components started as separate process groups, each logging to its own file."""

    home: Path
    env: dict[str, str]
    api_url: str
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    t0: float = field(default_factory=time.monotonic)
    timings: dict[str, float] = field(default_factory=dict)

    def mark(self, phase: str) -> None:
        """Record when `phase` ended, in seconds since the fixture started (printed at the end)."""
        self.timings[phase] = round(time.monotonic() - self.t0, 1)

    def log_path(self, name: str) -> Path:
        return self.home / f"{name}.out"

    def start(self, name: str, *args: str) -> None:
        with self.log_path(name).open("wb") as out:
            self.procs[name] = subprocess.Popen([str(BIN / "airflow"), *args], env=self.env, cwd=self.home,
                                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                start_new_session=True)

    def check_alive(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise AssertionError(f"airflow {name} exited with code {p.returncode}\n{self.tail(name)}")

    def stop(self) -> None:
        """SIGINT each process group, wait, then SIGKILL whatever is left."""
        for p in self.procs.values():
            _signal_group(p, signal.SIGINT)
        deadline = time.monotonic() + 30
        for name, p in self.procs.items():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"airflow {name} ignored SIGINT for 30 s: killing it")
        for p in self.procs.values():
            _signal_group(p, signal.SIGKILL)  # the group's stragglers too, even if the leader exited
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def tail(self, name: str, lines: int = 60) -> str:
        path = self.log_path(name)
        text = path.read_text(errors="replace") if path.exists() else ""
        return f"--- tail of {path} ---\n" + "\n".join(text.splitlines()[-lines:])

    def task_logs(self, dag_id: str, run_id: str | None = None) -> list[Path]:
        """Task log files of `dag_id` (of one run, with `run_id`)."""
        logs = (p for p in (self.home / "logs").rglob("*.log") if f"dag_id={dag_id}" in p.parts)
        return sorted(p for p in logs if run_id is None or f"run_id={run_id}" in p.parts)

    def diagnostics(self, dag_id: str = "", failed_tasks: Iterable[str] = ()) -> str:
        """Tails of the component logs and of the named tasks' logs, for an assertion message."""
        parts = [self.tail(n) for n in ("scheduler", "dag-processor", "api-server")]
        failed = tuple(failed_tasks)
        for p in self.task_logs(dag_id) if dag_id else []:
            if any(f"task_id={t}" in p.parts for t in failed):
                lines = p.read_text(errors="replace").splitlines()[-40:]
                parts.append(f"--- tail of {p} ---\n" + "\n".join(lines))
        return "\n".join(parts)


def _signal_group(p: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(p.pid, sig)  # start_new_session: the group id is the leader's pid
    except (ProcessLookupError, PermissionError):
        pass


def airflow_env(home: Path, db_url: str, api_port: int, data_root: str, *, parallelism: int = 8,
                extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of every Airflow component (and so of every task): this repo's DAGs, LocalExecutor with
    `parallelism` worker slots, the metadata DB at `db_url`, the API on `api_port`, steps writing under
    `data_root`. `extra` is applied last."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    api = f"http://127.0.0.1:{api_port}"
    env.update({
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": db_url,
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": str(parallelism),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        "AIRFLOW__CORE__AUTH_MANAGER":
            "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        # Workers reach the execution API here; the default is http://localhost:8080 whatever the port.
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(api_port),
        "AIRFLOW__API__BASE_URL": api,
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{api}/execution/",
        "AIRFLOW__API__WORKERS": "1",
        # Every component must sign and accept the same task tokens.
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
        # serve-logs binds these on all interfaces: never the shared defaults 8793/8794.
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "600",
        "IIP_DATA_ROOT": data_root,
        "IIP_EXECUTION_MODE": "local",
        "IIP_TASK_RETRY_DELAY_S": "1",  # retries as in production, a second apart instead of 30 s
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra or {})
    return env


class Api:
    """The public REST API (/api/v2) with a JWT from the simple auth manager's generated password."""

    def __init__(self, base: str, home: Path) -> None:
        import requests

        self.base = base
        self.session = requests.Session()
        pw_file = home / "simple_auth_manager_passwords.json.generated"
        deadline = time.monotonic() + 30
        while not pw_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        password = json.loads(pw_file.read_text())["admin"]
        r = self.session.post(f"{base}/auth/token", json={"username": "admin", "password": password}, timeout=30)
        r.raise_for_status()
        self.session.headers["Authorization"] = f"Bearer {r.json()['access_token']}"

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        r = self.session.request(method, f"{self.base}/api/v2{path}", timeout=30, **kwargs)
        if r.status_code >= 400:
            raise AssertionError(f"{method} {path} -> {r.status_code}: {r.text[:2000]}")
        return r.json() if r.content else None


def wait_healthy(af: Airflow, timeout: float = 90) -> None:
    """Until the API reports the metadata DB and the scheduler healthy."""
    import requests

    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        af.check_alive()
        try:
            r = requests.get(f"{af.api_url}/api/v2/monitor/health", timeout=5)
            last = r.json()
            # The DAG processor's health shows as the DAG appearing (wait_for_dag).
            if (r.ok and last.get("metadatabase", {}).get("status") == "healthy"
                    and last.get("scheduler", {}).get("status") == "healthy"):
                return
        except (requests.RequestException, ValueError) as e:
            last = e
        time.sleep(0.5)
    raise AssertionError(f"Airflow not healthy after {timeout}s: {last}\n{af.diagnostics()}")


def wait_for_dag(api: Api, af: Airflow, dag_id: str, timeout: float = 90) -> None:
    """Until the dag-processor has parsed `dag_id` (fails with the import errors otherwise)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        af.check_alive()
        dags = api.call("GET", "/dags", params={"dag_id_pattern": dag_id})["dags"]
        if any(d["dag_id"] == dag_id for d in dags):
            return
        time.sleep(1)
    errors = api.call("GET", "/importErrors")
    raise AssertionError(f"{dag_id} not parsed after {timeout}s; import errors: {errors}\n{af.diagnostics()}")


@contextmanager
def running_airflow(home: Path, db_url: str, data_root: str, *, parallelism: int = 8,
                    extra_env: dict[str, str] | None = None) -> Iterator[Airflow]:
    """Migrate the DB at `db_url`, start api-server, scheduler and dag-processor, wait until healthy; yields
    the running Airflow and stops every process group on exit (printing the phase timings)."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    while port in (8793, 8794):
        port = free_port()
    env = airflow_env(home, db_url, port, data_root, parallelism=parallelism, extra=extra_env)
    af = Airflow(home=home, env=env, api_url=f"http://127.0.0.1:{port}")
    migrate = subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=env, cwd=home, capture_output=True,
                             text=True, timeout=180)
    if migrate.returncode != 0:
        raise AssertionError(f"airflow db migrate failed:\n{migrate.stdout[-3000:]}\n{migrate.stderr[-3000:]}")
    af.mark("db migrate")
    try:
        af.start("api-server", "api-server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1")
        af.start("scheduler", "scheduler")
        af.start("dag-processor", "dag-processor")
        wait_for_port(port, timeout=90)
        wait_healthy(af)
        af.mark("healthy")
        yield af
    finally:
        af.stop()
        af.mark("stopped")
        print(f"airflow timings (s since start): {af.timings}")


# -- runs and their tasks -----------------------------------------------------------------------------
def unpause(api: Api, af: Airflow, dag_id: str) -> None:
    """Wait until `dag_id` is parsed, then unpause it."""
    wait_for_dag(api, af, dag_id)
    api.call("PATCH", f"/dags/{dag_id}", json={"is_paused": False})


def trigger(api: Api, dag_id: str, conf: dict[str, Any], *, logical_date: str | None = None,
            run_id: str | None = None) -> dict[str, Any]:
    """Create a run of `dag_id` (a manual trigger, as the UI's form does); returns the run as the API has it."""
    body: dict[str, Any] = {"logical_date": logical_date, "conf": conf}
    if run_id:
        body["dag_run_id"] = run_id
    run: dict[str, Any] = api.call("POST", f"/dags/{dag_id}/dagRuns", json=body)
    return run


def run_state(api: Api, dag_id: str, run_id: str) -> dict[str, Any]:
    """The run as the API has it now (state, start_date, end_date, ...)."""
    run: dict[str, Any] = api.call("GET", f"/dags/{dag_id}/dagRuns/{run_id}")
    return run


def wait_for_runs(api: Api, af: Airflow, dag_id: str, run_ids: Iterable[str], timeout: float,
                  poll: float = 1.0) -> dict[str, dict[str, Any]]:
    """Until every run has finished (success or failed) or `timeout` passed; each run's last record.

    Also records the states each run went through, in order, under `states_seen` (e.g. queued -> running)."""
    ids = list(run_ids)
    seen: dict[str, list[str]] = {r: [] for r in ids}
    last: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        af.check_alive()
        for r in ids:
            last[r] = run_state(api, dag_id, r)
            if not seen[r] or seen[r][-1] != last[r]["state"]:
                seen[r].append(last[r]["state"])
        if all(last[r]["state"] in FINISHED for r in ids):
            break
        time.sleep(poll)
    return {r: {**last[r], "states_seen": seen[r]} for r in ids}


def task_instances(api: Api, dag_id: str, run_id: str) -> list[dict[str, Any]]:
    """Every task instance of a run, mapped ones one per map index (paged: a load run has hundreds)."""
    out: list[dict[str, Any]] = []
    while True:
        page = api.call("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances",
                        params={"limit": 100, "offset": len(out), "order_by": "id"})
        out += page["task_instances"]
        if not page["task_instances"] or len(out) >= page["total_entries"]:
            return out


def not_succeeded(tis: Iterable[dict[str, Any]]) -> list[tuple[str, int, str | None]]:
    """(task id, map index, state) of every task instance that did not succeed."""
    return sorted((t["task_id"], t["map_index"], t["state"]) for t in tis if t["state"] != "success")


def parse_time(value: str | None) -> datetime | None:
    """An API timestamp (ISO 8601, 'Z' or an offset), or None."""
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))
