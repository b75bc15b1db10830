"""Two runs of `foundational_selection` at once, through a real scheduler (PostgreSQL metadata, LocalExecutor,
separate worker processes).

Both runs are triggered together on one run folder (`run_name`; the DAG allows two active runs): every task of
both runs succeeds, each committing or adopting what the other committed; every step folder verifies (listed
files and checksums, no stray part, a folder reader sees exactly the data files); the ledger holds from step to
step; and the dataset gets one version, not two (the second publish finds LATEST already is this output and
skips). tests/integration/test_backfilled_nights.py runs the nightly DAG's date backfill the same way.

Needs PostgreSQL, like tests/integration/test_airflow_scheduler.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from operators.core import storage
from operators.core.verify import verify_chain
from operators.datasets import versions as dv
from operators.orchestration.dag_builder import FOUNDATIONAL_STEPS
from tests.conftest import run_cli, three_domain_conversations
from tests.integration.harness import (
    Airflow,
    Api,
    parse_time,
    pytest_database,
    running_airflow,
    task_instances,
    trigger,
    unpause,
    wait_for_runs,
)

# About 70 scheduled tasks of a second or two of CPU each, beside a busy second worker.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]

RUN_TIMEOUT_S = 900.0
BUDGETS = {"math": 1.0, "code": 1.0, "general": 1.0}


@pytest.fixture()
def airflow(tmp_path: Path) -> Iterator[Airflow]:
    with pytest_database() as url, running_airflow(tmp_path / "airflow", url, str(tmp_path / "data"),
                                                   parallelism=4) as af:
        yield af


def _raw(folder: Path, tag: str, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{tag}.jsonl").write_text("\n".join(three_domain_conversations(n, tag)) + "\n")


def _states(api: Api, dag_id: str, run_id: str) -> dict[str, list[str]]:
    """Task id -> the states of its instances (one per map index)."""
    out: dict[str, list[str]] = {}
    for t in task_instances(api, dag_id, run_id):
        out.setdefault(t["task_id"], []).append(t["state"])
    return out


def _step_chain_checks(run: Path) -> list[dict[str, Any]]:
    """Every Phase 1 step of a run folder verifies, and each step reads exactly what the one before kept."""
    checks, chain = verify_chain([str(run / step) for step in FOUNDATIONAL_STEPS])
    assert [c.problems for c in checks] == [[]] * len(checks) and chain == [], ([c.as_dict() for c in checks], chain)
    return [json.loads((run / step / "stats.json").read_text()) for step in FOUNDATIONAL_STEPS]


def test_two_runs_of_a_dag_at_once_commit_once_and_publish_once(airflow: Airflow, tmp_path: Path) -> None:
    af, data = airflow, tmp_path / "data"
    api = Api(af.api_url, af.home)
    # An ingested source for foundational_selection (what ingest_source would have committed).
    _raw(tmp_path / "raw-a", "a", 60)
    # One part, so one shard per step: both runs race on it at every step (every task is a few CPU seconds of
    # Airflow under the scheduler; a second shard would be raced the same way, only slower). The races of
    # every task kind over several shards are tests/reliability/test_concurrency.py's.
    r = run_cli("run", "ingest", "--config", '{"source_name": "conc"}',
                "--input", str(tmp_path / "raw-a"),
                "--output", str(data / "sources" / "conc" / "ingest"))
    assert r.returncode == 0, r.stderr[-2000:]

    dag = "foundational_selection"
    unpause(api, af, dag)
    conf = {"sources": ["conc"], "run_name": "shared", "budgets": BUDGETS, "target_shard_mb": 1}
    runs = [trigger(api, dag, conf, run_id=f"together_{k}")["dag_run_id"] for k in range(2)]
    done = wait_for_runs(api, af, dag, runs, RUN_TIMEOUT_S)
    af.mark("two foundational_selection runs")
    states = {r: _states(api, dag, r) for r in runs}
    for r in runs:
        assert done[r]["state"] == "success", (r, done[r], states[r], af.diagnostics(dag))
    # They really ran at the same time, not one after the other.
    starts = [parse_time(done[r]["start_date"]) for r in runs]
    ends = [parse_time(done[r]["end_date"]) for r in runs]
    assert all(starts) and all(ends)
    assert max(starts) < min(ends), (starts, ends)  # type: ignore[type-var]
    stats = _step_chain_checks(data / "runs" / "shared")
    assert stats[0]["records_in"] == 60
    # One version: one publish made it, the other found LATEST already is this output and skipped.
    root = storage.validate_uri(str(data))
    assert dv.versions(root, "foundational") == [1]
    assert sorted(states[r]["publish"][0] for r in runs) == ["skipped", "success"], states
    assert all(states[r]["report"] == ["success"] for r in runs)
    af.mark("checked")
