"""Shared fixtures: a real S3 API server on loopback, temp data roots, an isolated Airflow home."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
FAKE_SECRET = "iip-test-secret-Zx9QvL2pK7"  # a fake credential: tests assert it never leaks


ALLOW_SKIPS_ENV = "IIP_ALLOW_SKIPS"


def allowed_skips() -> set[str]:
    """The names a developer listed in IIP_ALLOW_SKIPS (comma-separated), e.g. `vllm,helm`."""
    return {w.strip() for w in os.environ.get(ALLOW_SKIPS_ENV, "").split(",") if w.strip()}


def require_or_skip(what: str, reason: str) -> NoReturn:
    """A test's prerequisite `what` is missing: skip if the developer allowed it, else fail loudly.

    `make test` installs every prerequisite (helm, the vLLM environment, PostgreSQL, the shared data), so
    under it a missing one is a broken setup, never a pass. `reason` names what is missing and how to get
    it. Known names: helm, vllm, postgres, shared-data, browser, tmpfs (the disk-full tests mount one: root).
    """
    if what in allowed_skips():
        pytest.skip(f"{reason} (skip allowed by {ALLOW_SKIPS_ENV}={os.environ[ALLOW_SKIPS_ENV]})")
    pytest.fail(f"{what} is missing: {reason}. To skip on purpose instead, set {ALLOW_SKIPS_ENV}={what}",
                pytrace=False)


def three_domain_conversations(n: int, tag: str = "") -> list[str]:
    """`n` ShareGPT JSON lines cycling math, code and general questions, each question unique by its number
    (and by `tag`, when given, so that two corpora share no record unless a test copies one)."""
    mark = f" ({tag})" if tag else ""
    lines = []
    for i in range(n):
        q = [f"Solve the equation {i}x + 3 = {i + 7}{mark}. How many solutions are there?",
             f"Write a Python function number {i} that reverses a list{mark}.",
             f"Tell me an interesting fact about the city number {i}{mark}."][i % 3]
        a = ["x = 4/3, exactly one solution since the equation is linear.",
             "```python\ndef rev(xs):\n    return xs[::-1]\n```",
             "It has a very old library with many rare maps and manuscripts."][i % 3]
        lines.append(json.dumps({"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}))
    return lines


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real S3 API (moto's server) on loopback; yields its endpoint URL and sets the env for it."""
    port = free_port()
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or "moto_server"
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        endpoint = f"http://127.0.0.1:{port}"
        env = {
            "S3_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture()
def s3_bucket(s3_server: str) -> str:
    """A fresh bucket on the loopback S3 server; yields its s3:// URI."""
    import boto3

    name = f"iip-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return f"s3://{name}"


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run `python -m operators ...` in a subprocess, as a pod or the local StepOperator would."""
    return subprocess.run([sys.executable, "-m", "operators", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})


def run_step_as_tasks(step: str, config: dict[str, Any], inputs: list[str], out: str) -> None:
    """Run `step` the way the orchestrator does: `plan`, then every map and partition task of each stage and
    every shard's `run` as its own CLI process (a fresh step object; state only in storage), each reduce
    stage once, and the step's `reduce`. Fails naming the task that failed."""
    from operators.core import storage
    from operators.core.registry import step_class
    from operators.core.runner import load_plan

    cfg = ["--config", json.dumps(config)]

    def task(*args: str) -> None:
        r = run_cli(*args, "--output", out)
        assert r.returncode == 0, f"{' '.join(args)} failed:\n{r.stderr[-3000:]}"

    task("plan", step, *cfg, *[a for i in inputs for a in ("--input", i)])
    shards = len(load_plan(storage.validate_uri(out)).shards)
    for st in step_class(step).stages:
        if st.kind == "reduce":
            task("stage", step, *cfg, "--stage", st.name)
        else:
            for k in range(shards):
                task("stage", step, *cfg, "--stage", st.name, "--shard", str(k))
    for k in range(shards):
        task("run", step, *cfg, "--shard", str(k))
    task("reduce", step)


def airflow_env(home: Path, data_root: Path) -> dict[str, str]:
    """Environment of an isolated embedded Airflow (its own home and SQLite DB) over this repo's DAGs."""
    return {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "IIP_DATA_ROOT": str(data_root),
        "IIP_EXECUTION_MODE": "local",
        # A failing task is retried as in production, a second apart instead of 30 s (`dags test` waits them).
        "IIP_TASK_RETRY_DELAY_S": "1",
    }


def airflow(env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run the `airflow` CLI in `env`."""
    return subprocess.run([sys.executable, "-m", "airflow", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def dags_test(env: dict[str, str], dag_id: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """`airflow dags test <dag_id> *args` in `env`, parsing only the DAG's own file (`<dag_id>.py` in the DAGs
    folder, when there is one): the CLI parses the DAGs folder twice, and the other DAG files cost ~5 s per run
    and test nothing here (tests/test_dags.py parses them all)."""
    own = Path(env.get("AIRFLOW__CORE__DAGS_FOLDER", str(ROOT / "dags"))) / f"{dag_id}.py"
    return airflow(env, "dags", "test", dag_id, *args, *(("-f", str(own)) if own.is_file() else ()),
                   timeout=timeout)


def migrated_airflow(tmp_path_factory: pytest.TempPathFactory, extra: dict[str, str] | None = None
                     ) -> tuple[dict[str, str], Path]:
    """A fresh Airflow home with its metadata DB migrated: (its environment, its data root).

    The migration runs once per test process (`airflow db migrate` costs ~8 CPU s); each home gets its own copy
    of that migrated SQLite file, so homes share nothing after this call."""
    data = tmp_path_factory.mktemp("data")
    env = {**airflow_env(tmp_path_factory.mktemp("airflow"), data), **(extra or {})}
    shutil.copyfile(_migrated_sqlite(tmp_path_factory), Path(env["AIRFLOW_HOME"]) / "airflow.db")
    return env, data


def _migrated_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This process's migrated, never-used metadata DB (made on first use)."""
    template = tmp_path_factory.getbasetemp() / "airflow-migrated"
    db = template / "airflow.db"
    if not db.exists():
        env = airflow_env(template / "home", template / "data")
        r = airflow(env, "db", "migrate", timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        shutil.copyfile(template / "home" / "airflow.db", db.with_suffix(".tmp"))
        os.replace(db.with_suffix(".tmp"), db)  # appears only once whole
    return db


DAG_INFO = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
b = DagBag()
d = b.dags.get(sys.argv[1])
print(json.dumps({"errors": {k: str(v) for k, v in b.import_errors.items()}, "dags": sorted(b.dags),
                  "tasks": sorted(t.task_id for t in d.tasks) if d else [],
                  "params": sorted(d.params.keys()) if d else [],
                  "schedule": str(d.schedule) if d else None, "catchup": d.catchup if d else None,
                  "max_active_runs": d.max_active_runs if d else None}))
"""


def dag_info(env: dict[str, str], dag_id: str) -> dict[str, Any]:
    """What Airflow's DagBag parses in `env`: import errors, DAG ids, and `dag_id`'s tasks, params, schedule."""
    r = subprocess.run([sys.executable, "-c", DAG_INFO, dag_id], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    info: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    return info


# The slowest test files, slowest first, as `scripts/test.sh --durations` measured them (2026-12-03). The suite runs
# on xdist workers a file at a time (`--dist loadfile --no-loadscope-reorder`) in collection order: starting the
# long files first keeps the last minutes from being one long file on one worker while the others idle.
SLOW_FIRST = (
    "tests/integration/test_concurrent_dag_runs.py",
    "tests/reliability/test_crash_anywhere.py",
    "tests/integration/test_backfilled_nights.py",
    "tests/test_synth_dag.py",
    "tests/test_nightly_refresh.py",
    "tests/test_train_run.py",
    "tests/reliability/test_secrets_e2e.py",
    "tests/test_dags.py",
    "tests/test_backfill_source.py",
    "tests/test_datasets_airflow.py",
    "tests/test_train_stages.py",
    "tests/test_ui_browser.py",
    "tests/test_llm_vllm.py",
    "tests/test_llm_openai.py",
    "tests/test_synth_steps.py",
    "tests/test_bench_smoke.py",
    "tests/test_llm_layer.py",
    "tests/reliability/test_disk_full.py",
    "tests/reliability/test_flaky_storage.py",
    "tests/integration/test_airflow_scheduler.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Put the SLOW_FIRST files first, in that order; every other test keeps its place after them."""
    rank = {path: i for i, path in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))
