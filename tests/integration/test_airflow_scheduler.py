"""A real Airflow (api-server + scheduler + dag-processor, LocalExecutor, PostgreSQL metadata) runs
`ingest_source` over a raw corpus on a real S3 API server, end to end.

What it proves that `airflow dags test` cannot: the DAG parses in the dag-processor, the scheduler
expands the mapped ingest over the planned shards, LocalExecutor workers run each task through the
execution API, XComs flow between tasks, storage on s3:// works from task processes, and no task log
leaks the S3 secret.

Needs PostgreSQL (`scripts/start-postgres.sh` starts one; `make test` runs it): when none is reachable the
test fails naming it, unless the developer allowed the skip with IIP_ALLOW_SKIPS=postgres.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FAKE_SECRET, free_port, require_or_skip, wait_for_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

ROOT = Path(__file__).resolve().parents[2]
DAGS_FOLDER = ROOT / "dags"
BIN = Path(sys.executable).parent
DAG_ID = "ingest_source"

PG_HOST = os.environ.get("IIP_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("IIP_PG_PORT", "5432"))
PG_USER = os.environ.get("IIP_PG_USER", "iip")
PG_PASSWORD = os.environ.get("IIP_PG_PASSWORD", "iip-test")  # the non-secret test default
PG_ADMIN_DB = os.environ.get("IIP_PG_DATABASE", "iip_airflow_test")

RUN_TIMEOUT_S = 240.0
# Every input file is planned as its own shard: the DAG's smallest shard target is 1 MiB, so files
# above half of that never share one.
TARGET_SHARD_MB = 1
MIN_FILE_BYTES = 600 * 1024


# -- PostgreSQL ---------------------------------------------------------------------------------------
def _pg_connect(dbname: str) -> Any:
    import psycopg2

    return psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, password=PG_PASSWORD, dbname=dbname,
                            connect_timeout=5)


@pytest.fixture()
def airflow_db() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this run; yields its SQLAlchemy URL, drops it afterwards."""
    try:
        admin = _pg_connect(PG_ADMIN_DB)
    except Exception as e:  # psycopg2.OperationalError, or psycopg2 missing
        detail = " ".join(str(e).split())
        reason = (f"PostgreSQL not reachable as {PG_USER}@{PG_HOST}:{PG_PORT}/{PG_ADMIN_DB} ({detail}); "
                  "start it with scripts/start-postgres.sh")
        require_or_skip("postgres", reason)
    admin.autocommit = True
    try:  # Airflow 3 also opens an async engine on the metadata DB: for PostgreSQL that is asyncpg
        import asyncpg  # noqa: F401
    except ImportError:
        admin.close()
        pytest.fail("Airflow 3 on PostgreSQL needs the asyncpg driver too (pip install asyncpg)")
    name = f"iip_af_{uuid.uuid4().hex[:12]}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg2://{PG_USER}:{PG_PASSWORD}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


# -- a small raw corpus ---------------------------------------------------------------------------------
WORDS = (
    "data", "pipeline", "shard", "record", "python", "airflow", "scheduler", "storage", "bucket",
    "parquet", "arrow", "model", "instruction", "answer", "question", "reason", "step", "filter",
    "sample", "token", "batch", "stream", "manifest", "ledger", "quality", "language", "corpus",
    "dataset", "window", "buffer", "retry", "commit", "reduce", "report",
)


def _text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)).capitalize() + "."


def _sharegpt(rng: random.Random) -> dict[str, Any]:
    return {"conversations": [{"from": "human", "value": "Explain: " + _text(rng, 60)},
                              {"from": "gpt", "value": _text(rng, 240)}]}


def _alpaca(rng: random.Random) -> dict[str, Any]:
    return {"instruction": "Summarize: " + _text(rng, 40), "input": _text(rng, 40), "output": _text(rng, 200)}


MALFORMED = ['{"conversations": [{"from": "human", "value": "cut off', "this line is not json at all"]


def build_corpus(seed: int = 7) -> dict[str, bytes]:
    """Three JSONL files (ShareGPT, Alpaca, ShareGPT with malformed and blank lines), each over 600 KiB."""
    rng = random.Random(seed)

    def fill(make: Any, extra: list[str] | None = None) -> bytes:
        lines: list[str] = []
        size = 0
        while size < MIN_FILE_BYTES:
            line = json.dumps(make(rng))
            lines.append(line)
            size += len(line) + 1
            if extra and len(lines) % 50 == 0:
                lines.append(extra.pop())
                lines.append("")  # a blank line is not a record
        lines += extra or []
        return ("\n".join(lines) + "\n").encode()

    return {
        "a_sharegpt.jsonl": fill(_sharegpt),
        "b_alpaca.jsonl": fill(_alpaca),
        "c_sharegpt_messy.jsonl": fill(_sharegpt, list(MALFORMED)),
    }


def non_blank_lines(files: dict[str, bytes]) -> int:
    return sum(1 for data in files.values() for line in data.decode().splitlines() if line.strip())


# -- Airflow --------------------------------------------------------------------------------------------
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

    def task_logs(self) -> list[Path]:
        return sorted(p for p in (self.home / "logs").rglob("*.log") if f"dag_id={DAG_ID}" in p.parts)

    def diagnostics(self, failed_tasks: tuple[str, ...] = ()) -> str:
        parts = [self.tail(n) for n in ("scheduler", "dag-processor", "api-server")]
        for p in self.task_logs():
            if any(f"task_id={t}" in p.parts for t in failed_tasks):
                lines = p.read_text(errors="replace").splitlines()[-40:]
                parts.append(f"--- tail of {p} ---\n" + "\n".join(lines))
        return "\n".join(parts)


def _signal_group(p: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(p.pid, sig)  # start_new_session: the group id is the leader's pid
    except (ProcessLookupError, PermissionError):
        pass


def airflow_env(home: Path, db_url: str, api_port: int, data_root: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    api = f"http://127.0.0.1:{api_port}"
    env.update({
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": db_url,
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "8",
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
        "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "30",
        "IIP_DATA_ROOT": data_root,
        "IIP_EXECUTION_MODE": "local",
        # The consumers schedule on their datasets' assets: an asset event starts conversational_synthesis.
        "IIP_ASSET_SCHEDULES": "1",
        "PYTHONUNBUFFERED": "1",
    })
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


def wait_for_dag(api: Api, af: Airflow, timeout: float = 90, dag_id: str = DAG_ID) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        af.check_alive()
        dags = api.call("GET", "/dags", params={"dag_id_pattern": dag_id})["dags"]
        if any(d["dag_id"] == dag_id for d in dags):
            return
        time.sleep(1)
    errors = api.call("GET", "/importErrors")
    raise AssertionError(f"{dag_id} not parsed after {timeout}s; import errors: {errors}\n{af.diagnostics()}")


def check_asset_event_starts_synthesis(api: Api, af: Airflow, timeout: float = 90) -> dict[str, Any]:
    """A new version of `foundational` (an event on its asset, as publish emits) makes the scheduler create a
    conversational_synthesis run; returns that run. The run is then failed and the DAG paused again, so the
    test does not spend minutes labeling with the CPU model."""
    dag = "conversational_synthesis"
    wait_for_dag(api, af, dag_id=dag)
    api.call("PATCH", f"/dags/{dag}", json={"is_paused": False})
    assets = api.call("GET", "/assets", params={"uri_pattern": "iip://datasets/foundational"})["assets"]
    asset = next(a for a in assets if a["uri"] == "iip://datasets/foundational")
    extra = {"name": "foundational", "version": 1, "step_dir": "s3://nowhere/select"}
    api.call("POST", "/assets/events", json={"asset_id": asset["id"], "extra": extra})
    deadline = time.monotonic() + timeout
    runs: list[dict[str, Any]] = []
    while time.monotonic() < deadline and not runs:
        af.check_alive()
        runs = api.call("GET", f"/dags/{dag}/dagRuns")["dag_runs"]
        time.sleep(1)
    api.call("PATCH", f"/dags/{dag}", json={"is_paused": True})
    for r in runs:
        api.call("PATCH", f"/dags/{dag}/dagRuns/{r['dag_run_id']}", json={"state": "failed"})
    assert runs, f"no {dag} run {timeout}s after an event on iip://datasets/foundational\n{af.diagnostics()}"
    return runs[0]


def _s3_client() -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"],
                        region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))


def _read_json(s3: Any, bucket: str, key: str) -> Any:
    return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())


@pytest.fixture()
def airflow(tmp_path: Path, airflow_db: str, s3_bucket: str) -> Iterator[Airflow]:
    home = tmp_path / "airflow"
    home.mkdir()
    port = free_port()
    while port in (8793, 8794):
        port = free_port()
    env = airflow_env(home, airflow_db, port, f"{s3_bucket}/root")
    af = Airflow(home=home, env=env, api_url=f"http://127.0.0.1:{port}")
    migrate = subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=env, cwd=home, capture_output=True,
                             text=True, timeout=180)
    assert migrate.returncode == 0, f"airflow db migrate failed:\n{migrate.stdout[-3000:]}\n{migrate.stderr[-3000:]}"
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


def test_ingest_source_runs_under_the_scheduler(airflow: Airflow, s3_bucket: str) -> None:
    af = airflow
    bucket = s3_bucket.removeprefix("s3://")
    s3 = _s3_client()
    corpus = build_corpus()
    for name, data in corpus.items():
        s3.put_object(Bucket=bucket, Key=f"raw/{name}", Body=data)
    lines = non_blank_lines(corpus)

    api = Api(af.api_url, af.home)
    wait_for_dag(api, af)
    af.mark("dag parsed")
    api.call("PATCH", f"/dags/{DAG_ID}", json={"is_paused": False})
    conf = {"source_uri": f"{s3_bucket}/raw/", "source_name": "it-corpus", "target_shard_mb": TARGET_SHARD_MB}
    run = api.call("POST", f"/dags/{DAG_ID}/dagRuns", json={"logical_date": None, "conf": conf})
    run_id = run["dag_run_id"]

    deadline = time.monotonic() + RUN_TIMEOUT_S
    state = run["state"]
    while time.monotonic() < deadline:
        af.check_alive()
        state = api.call("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}")["state"]
        if state in ("success", "failed"):
            break
        time.sleep(1)
    af.mark(f"run {state}")
    tis = api.call("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances", params={"limit": 100})
    summary = sorted((t["task_id"], t["map_index"], t["state"]) for t in tis["task_instances"])
    not_ok = tuple(sorted({t for t, _, s in summary if s != "success"}))
    assert state == "success", f"run {run_id} ended {state!r}; tasks: {summary}\n{af.diagnostics(not_ok)}"

    ingest = [t for t in tis["task_instances"] if t["task_id"] == "ingest.run"]
    assert sorted(t["map_index"] for t in ingest) == list(range(len(corpus))), summary
    assert all(t["state"] == "success" for t in ingest), summary
    succeeded = {t for t, _, s in summary if s == "success"}
    assert succeeded == {"ingest.plan", "ingest.run", "ingest.reduce", "report"}, summary

    out = "root/sources/it-corpus"
    manifest = _read_json(s3, bucket, f"{out}/ingest/_MANIFEST.json")
    stats = manifest["stats"]
    dropped = sum(stats["dropped_by_reason"].values())
    assert stats["records_in"] == lines, stats
    assert stats["records_in"] == stats["records_kept"] + dropped, stats
    assert stats["dropped_by_reason"].get("bad_json") == len(MALFORMED), stats
    assert stats["records_kept"] > 0 and stats["shards"] == len(corpus), stats

    report_raw = s3.get_object(Bucket=bucket, Key=f"{out}/report.json")["Body"].read().decode()
    report = json.loads(report_raw)
    ingest_report = [s for s in report["steps"] if s["step"] == "ingest"]
    assert [s["records_in"] for s in ingest_report] == [lines], report["steps"]
    assert FAKE_SECRET not in report_raw, "the S3 secret leaked into report.json"

    task_logs = af.task_logs()
    assert len(task_logs) == 3 + len(corpus), f"expected one log per task instance, found {task_logs}"
    assert all("python -m operators" in p.read_text(errors="replace") for p in task_logs), \
        "a task log lacks the step command line: are task logs being written?"
    all_logs = [p for p in (af.home / "logs").rglob("*") if p.is_file()]
    for p in [*all_logs, *(af.log_path(n) for n in af.procs)]:
        assert FAKE_SECRET not in p.read_text(errors="replace"), f"the S3 secret leaked into {p}"

    # The same Airflow (one start for both checks): a dataset version starts the synthesis DAG.
    run = check_asset_event_starts_synthesis(api, af)
    assert run["run_type"] == "asset_triggered", run
    af.mark("asset-triggered run")
