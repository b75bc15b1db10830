"""Airflow's date backfill of `nightly_refresh` over two nights, through a real scheduler (PostgreSQL metadata,
LocalExecutor): what `airflow backfill create` sends. The scheduler runs the nights one at a time in date order
(the second waits queued until the first has finished); the first ingests the files that arrived and publishes
a version, the second finds nothing new, ingests nothing and publishes nothing.

Needs PostgreSQL, like tests/integration/test_airflow_scheduler.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from operators.core import storage
from operators.datasets import versions as dv
from tests.integration.harness import Airflow, Api, parse_time, pytest_database, running_airflow, unpause, wait_for_runs
from tests.integration.test_concurrent_dag_runs import BUDGETS, RUN_TIMEOUT_S, _raw, _states, _step_chain_checks

# About 60 scheduled tasks (a full night, and a night whose steps are up to date), beside a busy second worker.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]


@pytest.fixture()
def airflow(tmp_path: Path) -> Iterator[Airflow]:
    with pytest_database() as url, running_airflow(tmp_path / "airflow", url, str(tmp_path / "data"),
                                                   parallelism=4) as af:
        yield af


def test_a_date_backfill_runs_nights_in_order_and_the_second_finds_nothing_new(airflow: Airflow,
                                                                               tmp_path: Path) -> None:
    af, data = airflow, tmp_path / "data"
    api = Api(af.api_url, af.home)
    nightly = "nightly_refresh"
    _raw(tmp_path / "raw-n", "n", 45)
    unpause(api, af, nightly)
    # One shard per step: what the nights test is ordering, queueing and skipping, not the shards
    # (test_concurrent_dag_runs races two runs on shared shards).
    nconf = {"sources": [{"name": "night", "uri": str(tmp_path / "raw-n")}], "run_name": "nightly",
             "budgets": BUDGETS, "target_shard_mb": 1}
    api.call("POST", "/backfills", json={"dag_id": nightly, "from_date": "2026-01-04T00:00:00Z",
                                         "to_date": "2026-01-05T00:00:00Z", "max_active_runs": 1,
                                         "dag_run_conf": nconf, "reprocess_behavior": "none"})
    backfilled = sorted(r["dag_run_id"] for r in api.call("GET", f"/dags/{nightly}/dagRuns")["dag_runs"]
                        if r["run_type"] == "backfill")
    assert len(backfilled) == 2, backfilled
    done = wait_for_runs(api, af, nightly, backfilled, 2 * RUN_TIMEOUT_S)
    af.mark("two backfilled nights")
    first, second = backfilled
    states = {r: _states(api, nightly, r) for r in backfilled}
    assert [done[r]["state"] for r in backfilled] == ["success", "success"], (done, states, af.diagnostics(nightly))
    assert [done[r]["logical_date"][:10] for r in backfilled] == ["2026-01-04", "2026-01-05"]
    # One at a time, in date order: the second waited queued until the first had finished.
    assert "queued" in done[second]["states_seen"], done[second]
    assert parse_time(done[second]["start_date"]) >= parse_time(done[first]["end_date"])  # type: ignore[operator]
    # The second night found nothing new: its mapped ingest expanded to nothing (one skipped placeholder), no
    # second ingest folder, no second version.
    assert [states[r]["ingest"] for r in backfilled] == [["success"], ["skipped"]], states
    assert [states[r]["publish"] for r in backfilled] == [["success"], ["skipped"]], states
    assert sorted(p.parent.name for p in (data / "sources" / "night").glob("*/ingest")) == ["2026-01-04"]
    root = storage.validate_uri(str(data))
    assert dv.versions(root, "foundational") == [1]
    stats = _step_chain_checks(data / "runs" / "nightly")
    assert stats[0]["records_in"] == 45
    af.mark("checked")
