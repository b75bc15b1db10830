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
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FAKE_SECRET
from tests.integration.harness import (
    Airflow,
    Api,
    not_succeeded,
    pytest_database,
    running_airflow,
    task_instances,
    trigger,
    unpause,
    wait_for_dag,
    wait_for_runs,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

DAG_ID = "ingest_source"

RUN_TIMEOUT_S = 240.0
# Every input file is planned as its own shard: the DAG's smallest shard target is 1 MiB, so files
# above half of that never share one.
TARGET_SHARD_MB = 1
MIN_FILE_BYTES = 600 * 1024


@pytest.fixture()
def airflow_db() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this run; yields its SQLAlchemy URL, drops it afterwards."""
    with pytest_database() as url:
        yield url


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


def check_asset_event_starts_synthesis(api: Api, af: Airflow, timeout: float = 90) -> dict[str, Any]:
    """A new version of `foundational` (an event on its asset, as publish emits) makes the scheduler create a
    conversational_synthesis run; returns that run. The run is then failed and the DAG paused again, so the
    test does not spend minutes labeling with the CPU model."""
    dag = "conversational_synthesis"
    wait_for_dag(api, af, dag)
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
    assert runs, f"no {dag} run {timeout}s after an event on iip://datasets/foundational\n{af.diagnostics(dag)}"
    return runs[0]


def _s3_client() -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"],
                        region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))


def _read_json(s3: Any, bucket: str, key: str) -> Any:
    return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())


@pytest.fixture()
def airflow(tmp_path: Path, airflow_db: str, s3_bucket: str) -> Iterator[Airflow]:
    # The consumers schedule on their datasets' assets: an asset event starts conversational_synthesis.
    with running_airflow(tmp_path / "airflow", airflow_db, f"{s3_bucket}/root",
                         extra_env={"IIP_ASSET_SCHEDULES": "1"}) as af:
        yield af


def test_ingest_source_runs_under_the_scheduler(airflow: Airflow, s3_bucket: str) -> None:
    af = airflow
    bucket = s3_bucket.removeprefix("s3://")
    s3 = _s3_client()
    corpus = build_corpus()
    for name, data in corpus.items():
        s3.put_object(Bucket=bucket, Key=f"raw/{name}", Body=data)
    lines = non_blank_lines(corpus)

    api = Api(af.api_url, af.home)
    unpause(api, af, DAG_ID)
    af.mark("dag parsed")
    conf = {"source_uri": f"{s3_bucket}/raw/", "source_name": "it-corpus", "target_shard_mb": TARGET_SHARD_MB}
    run_id = trigger(api, DAG_ID, conf)["dag_run_id"]
    state = wait_for_runs(api, af, DAG_ID, [run_id], RUN_TIMEOUT_S)[run_id]["state"]
    af.mark(f"run {state}")
    tis = task_instances(api, DAG_ID, run_id)
    summary = sorted((t["task_id"], t["map_index"], t["state"]) for t in tis)
    not_ok = {t for t, _, _ in not_succeeded(tis)}
    assert state == "success", f"run {run_id} ended {state!r}; tasks: {summary}\n{af.diagnostics(DAG_ID, not_ok)}"

    ingest = [t for t in tis if t["task_id"] == "ingest.run"]
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

    task_logs = af.task_logs(DAG_ID)
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
