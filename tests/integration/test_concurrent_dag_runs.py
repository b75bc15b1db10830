"""Two DAG runs at once, through a real scheduler (PostgreSQL metadata, LocalExecutor, separate worker processes).

1. Two `foundational_selection` runs triggered together on one run folder (`run_name`; the DAG allows two
   active runs): every task of both runs succeeds, each committing or adopting what the other committed;
   every step folder verifies (listed files and checksums, no stray part, a folder reader sees exactly the
   data files); the ledger holds from step to step; and the dataset gets one version, not two (the second
   publish finds LATEST already is this output and skips).
2. Two `nightly_refresh` nights triggered together (the DAG allows one active run): the second waits in the
   queue until the first has finished, then finds no new file, ingests nothing, re-commits nothing and
   publishes nothing.
3. Airflow's date backfill of `nightly_refresh` over two nights, run by the scheduler in date order: the first
   ingests the file that arrived and publishes a version, the second finds nothing new.

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

# About 20 minutes on one of the suite's two workers: three scenarios, about 300 scheduled tasks of a few CPU seconds
# each while the other worker keeps the second core busy (15 minutes reached the last backfilled night).
pytestmark = [pytest.mark.integration, pytest.mark.timeout(2100)]

RUN_TIMEOUT_S = 900.0  # the first pair took 400 s beside a busy second worker
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


def test_two_runs_of_a_dag_and_two_nights_at_once(airflow: Airflow, tmp_path: Path) -> None:
    af, data = airflow, tmp_path / "data"
    api = Api(af.api_url, af.home)
    # An ingested source for foundational_selection (what ingest_source would have committed).
    _raw(tmp_path / "raw-a", "a", 60)
    # Parts of 30 rows: two input files, so that every step has two shards to race on (every task is a few
    # CPU seconds of Airflow under the scheduler: more shards would test nothing more, only slower).
    r = run_cli("run", "ingest", "--config", '{"source_name": "conc", "max_part_rows": 30}',
                "--input", str(tmp_path / "raw-a"),
                "--output", str(data / "sources" / "conc" / "ingest"))
    assert r.returncode == 0, r.stderr[-2000:]

    dag = "foundational_selection"
    unpause(api, af, dag)
    conf = {"sources": ["conc"], "run_name": "shared", "budgets": BUDGETS, "target_shard_mb": 0.004}
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
    assert stats[0]["shards"] >= 2 and stats[0]["records_in"] == 60
    # One version: one publish made it, the other found LATEST already is this output and skipped.
    root = storage.validate_uri(str(data))
    assert dv.versions(root, "foundational") == [1]
    assert sorted(states[r]["publish"][0] for r in runs) == ["skipped", "success"], states
    assert all(states[r]["report"] == ["success"] for r in runs)

    # Two nights at once: max_active_runs=1 queues the second until the first has finished.
    nightly = "nightly_refresh"
    _raw(tmp_path / "raw-n", "n", 45)
    unpause(api, af, nightly)
    # One shard per step: what the nights test is queueing and skipping, not the shards (the runs above race on
    # shards).
    nconf = {"sources": [{"name": "night", "uri": str(tmp_path / "raw-n")}], "run_name": "nightly",
             "budgets": BUDGETS, "target_shard_mb": 1}
    nights = [trigger(api, nightly, nconf, logical_date=f"2026-01-0{d}T00:00:00Z", run_id=f"night_{d}")["dag_run_id"]
              for d in (2, 3)]
    done = wait_for_runs(api, af, nightly, nights, 2 * RUN_TIMEOUT_S)
    af.mark("two nightly_refresh runs")
    first, second = nights
    nstates = {r: _states(api, nightly, r) for r in nights}
    for r in nights:
        assert done[r]["state"] == "success", (r, done[r], nstates[r], af.diagnostics(nightly))
    assert "queued" in done[second]["states_seen"], done[second]
    assert parse_time(done[second]["start_date"]) >= parse_time(done[first]["end_date"])  # type: ignore[operator]
    # The second night found nothing new: its mapped ingest expanded to nothing (one skipped placeholder), no
    # second ingest folder, no second version.
    assert nstates[first]["ingest"] == ["success"] and nstates[second]["ingest"] == ["skipped"], nstates
    assert sorted(p.parent.name for p in (data / "sources" / "night").glob("*/ingest")) == ["2026-01-02"]
    assert nstates[first]["publish"] == ["success"] and nstates[second]["publish"] == ["skipped"], nstates
    # One more version (its number may skip one: the losing publisher of the pair above claimed a number for its
    # draft, and numbers are never reused).
    assert len(dv.versions(root, "foundational")) == 2 and dv.versions(root, "foundational")[0] == 1
    assert dv.read_latest(root, "foundational")[0] == dv.versions(root, "foundational")[-1]
    _step_chain_checks(data / "runs" / "nightly")

    # Airflow's own backfill over two dates (what `airflow backfill create` sends), run by the scheduler: a file
    # arrived, so the first backfilled night ingests it and publishes; the second finds nothing new.
    _raw(tmp_path / "raw-n", "late", 15)
    latest = dv.read_latest(root, "foundational")[0]
    api.call("POST", "/backfills", json={"dag_id": nightly, "from_date": "2026-01-04T00:00:00Z",
                                         "to_date": "2026-01-05T00:00:00Z", "max_active_runs": 1,
                                         "dag_run_conf": nconf, "reprocess_behavior": "none"})
    backfilled = sorted(r["dag_run_id"] for r in api.call("GET", f"/dags/{nightly}/dagRuns")["dag_runs"]
                        if r["run_type"] == "backfill")
    assert len(backfilled) == 2, backfilled
    done = wait_for_runs(api, af, nightly, backfilled, 2 * RUN_TIMEOUT_S)
    af.mark("two backfilled nights")
    bstates = {r: _states(api, nightly, r) for r in backfilled}
    assert [done[r]["state"] for r in backfilled] == ["success", "success"], (done, bstates)
    assert [done[r]["logical_date"][:10] for r in backfilled] == ["2026-01-04", "2026-01-05"]
    assert parse_time(done[backfilled[1]]["start_date"]) >= parse_time(done[backfilled[0]]["end_date"])  # type: ignore[operator]
    assert [bstates[r]["ingest"] for r in backfilled] == [["success"], ["skipped"]], bstates
    assert [bstates[r]["publish"] for r in backfilled] == [["success"], ["skipped"]], bstates
    assert (data / "sources" / "night" / "2026-01-04" / "ingest" / "_MANIFEST.json").exists()
    new = dv.read_latest(root, "foundational")[0]
    assert new is not None and latest is not None and new > latest
    stats = _step_chain_checks(data / "runs" / "nightly")
    assert stats[0]["records_in"] == 45 + 15  # both nights' files
    af.mark("checked")
