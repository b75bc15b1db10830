"""Two runs of `foundational_selection` at once, through a real scheduler (PostgreSQL metadata, LocalExecutor,
separate worker processes).

Both runs are triggered together on one run folder (`run_name`; the DAG allows two active runs): every task of
both runs succeeds, each committing or adopting what the other committed; every step folder verifies (listed
files and checksums, no stray part, a folder reader sees exactly the data files); the ledger holds from step to
step; and the dataset gets one version, not two (the second publish finds LATEST already is this output and
skips). tests/integration/test_backfilled_nights.py runs the nightly DAG's date backfill the same way.

Then, on the same Airflow and run folder, what a user does next from the UI: clear a finished step and
everything downstream (the REST call the UI's Clear makes), and re-run the folder with a changed Param (the
trigger form; Airflow keeps a finished run's conf as it was: its PATCH takes a state and a note only, so a
changed Param is a new run). The cleared run finds every step committed under its plan and changes nothing;
the changed Param recomputes filter and everything downstream, old and new outputs never mix, and a new
version is published whose report shows the new figures, while the first version and the first run's report
keep theirs.

Needs PostgreSQL, like tests/integration/test_airflow_scheduler.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from operators.core import storage
from operators.core.runner import read_step_table
from operators.core.verify import verify_chain
from operators.datasets import versions as dv
from operators.orchestration.dag_builder import FOUNDATIONAL_STEPS
from operators.report import index_uri
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
DAG = "foundational_selection"
BUDGETS = {"math": 1.0, "code": 1.0, "general": 1.0}
CONF = {"sources": ["conc"], "run_name": "shared", "budgets": BUDGETS, "target_shard_mb": 1}


@dataclass
class Published:
    """Two racing runs into one folder, finished: what the tests of this module look at."""

    af: Airflow
    api: Api
    data: Path
    runs: list[str]
    done: dict[str, dict[str, Any]]


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Published]:
    tmp = tmp_path_factory.mktemp("concurrent")
    data = tmp / "data"
    with pytest_database() as url, running_airflow(tmp / "airflow", url, str(data), parallelism=4) as af:
        api = Api(af.api_url, af.home)
        # An ingested source for foundational_selection (what ingest_source would have committed): 60
        # two-turn records and 12 of four turns, so that a min_turns of 3 keeps a few.
        _raw(tmp / "raw-a", "a", 60)
        (tmp / "raw-a" / "long.jsonl").write_text("\n".join(_four_turns(12)) + "\n")
        # One part, so one shard per step: both runs race on it at every step (every task is a few CPU seconds
        # of Airflow under the scheduler; a second shard would be raced the same way, only slower). The races
        # of every task kind over several shards are tests/reliability/test_concurrency.py's.
        r = run_cli("run", "ingest", "--config", '{"source_name": "conc"}',
                    "--input", str(tmp / "raw-a"),
                    "--output", str(data / "sources" / "conc" / "ingest"))
        assert r.returncode == 0, r.stderr[-2000:]
        unpause(api, af, DAG)
        runs = [trigger(api, DAG, CONF, run_id=f"together_{k}")["dag_run_id"] for k in range(2)]
        done = wait_for_runs(api, af, DAG, runs, RUN_TIMEOUT_S)
        af.mark("two foundational_selection runs")
        yield Published(af, api, data, runs, done)


def _raw(folder: Path, tag: str, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{tag}.jsonl").write_text("\n".join(three_domain_conversations(n, tag)) + "\n")


def _four_turns(n: int) -> list[str]:
    """`n` ShareGPT lines of two exchanges each (four turns), every one unique."""
    return [json.dumps({"conversations": [
        {"from": "human", "value": f"What is {i} plus {i + 2}? Show the steps, please."},
        {"from": "gpt", "value": f"Add the units first: {i} + {i + 2} = {2 * i + 2}."},
        {"from": "human", "value": f"And {i} times {i + 2}, explained the same way?"},
        {"from": "gpt", "value": f"Multiply: {i} x {i + 2} = {i * (i + 2)}, since {i} groups of {i + 2}."}]})
        for i in range(n)]


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


def _report_kept(report_dir: Path) -> dict[str, int]:
    return {s["step"]: s["records_kept"] for s in json.loads((report_dir / "report.json").read_text())["steps"]}


def test_two_runs_of_a_dag_at_once_commit_once_and_publish_once(published: Published) -> None:
    af, api, data, runs, done = published.af, published.api, published.data, published.runs, published.done
    states = {r: _states(api, DAG, r) for r in runs}
    for r in runs:
        assert done[r]["state"] == "success", (r, done[r], states[r], af.diagnostics(DAG))
    # They really ran at the same time, not one after the other.
    starts = [parse_time(done[r]["start_date"]) for r in runs]
    ends = [parse_time(done[r]["end_date"]) for r in runs]
    assert all(starts) and all(ends)
    assert max(starts) < min(ends), (starts, ends)  # type: ignore[type-var]
    stats = _step_chain_checks(data / "runs" / "shared")
    assert stats[0]["records_in"] == 72
    # One version: one publish made it, the other found LATEST already is this output and skipped. (Which of
    # the two numbers both claimed survives depends on who won the race for LATEST.)
    root = storage.validate_uri(str(data))
    assert len(dv.versions(root, "foundational")) == 1
    assert sorted(states[r]["publish"][0] for r in runs) == ["skipped", "success"], states
    assert all(states[r]["report"] == ["success"] for r in runs)
    af.mark("checked")


def test_clear_then_rerun_with_a_changed_param_recomputes_downstream_and_never_mixes(published: Published) -> None:
    af, api, data = published.af, published.api, published.data
    assert all(d["state"] == "success" for d in published.done.values()), "the racing runs failed"
    run, root = data / "runs" / "shared", storage.validate_uri(str(data))
    manifests = {s: (run / s / "_MANIFEST.json").read_bytes() for s in FOUNDATIONAL_STEPS}
    first = published.runs[0]
    (published_version,) = dv.versions(root, "foundational")

    # Clear filter and everything downstream in a finished run, as the UI's Clear does.
    cleared = api.call("POST", f"/dags/{DAG}/clearTaskInstances",
                       json={"dry_run": False, "dag_run_id": first, "task_ids": ["filter.plan"],
                             "include_downstream": True, "only_failed": False, "reset_dag_runs": True})
    assert len(cleared["task_instances"]) > 20, cleared
    again = wait_for_runs(api, af, DAG, [first], RUN_TIMEOUT_S)[first]
    states = _states(api, DAG, first)
    assert again["state"] == "success", (again, states, af.diagnostics(DAG))
    # Same Params, same inputs: every step was up to date, its shard tasks did not run (they expand to no shard:
    # the instance the first try had is "removed"), nothing was rewritten, and no version was published.
    # pii has no tasks: filter's shard tasks run it, exact_dedup's plan commits it (`plan --through`).
    grouped = [s for s in FOUNDATIONAL_STEPS if s != "pii"]
    assert not any(t.startswith("pii.") for t in states), states
    assert all(set(states[f"{s}.run"]) <= {"skipped", "removed"} for s in grouped), states
    # Each step is committed by the next one's plan (`plan --after`); the chain's last step by the export's plan.
    assert all(states[f"{s}.plan"] == ["success"] for s in [*grouped, "export"]), states
    assert not any(f"{s}.reduce" in states for s in FOUNDATIONAL_STEPS), states
    assert {s: (run / s / "_MANIFEST.json").read_bytes() for s in FOUNDATIONAL_STEPS} == manifests
    assert states["publish"] == ["skipped"] and dv.versions(root, "foundational") == [published_version]
    af.mark("cleared run")

    # A changed filter Param, into the same folder, from the trigger form.
    rerun = trigger(api, DAG, {**CONF, "min_turns": 3}, run_id="min_turns_3")["dag_run_id"]
    after = wait_for_runs(api, af, DAG, [rerun], RUN_TIMEOUT_S)[rerun]
    assert after["state"] == "success", (after, _states(api, DAG, rerun), af.diagnostics(DAG))
    af.mark("re-run with a changed Param")
    # filter and every step after it recomputed: each is committed under a new config hash ...
    stats = _step_chain_checks(run)  # ... verifies, lists only its own files, and the ledger holds
    new = {s: json.loads((run / s / "_MANIFEST.json").read_text()) for s in FOUNDATIONAL_STEPS}
    old = {s: json.loads(m) for s, m in manifests.items()}
    assert all(new[s]["config_hash"] != old[s]["config_hash"] for s in FOUNDATIONAL_STEPS)
    assert stats[0]["records_in"] == 72 and stats[0]["records_kept"] == 12
    assert stats[0]["dropped_by_reason"] == {"too_few_turns": 60}
    # Never mixed: no record of the old output is left in any step (only four-turn records pass the filter).
    for s in FOUNDATIONAL_STEPS:
        table = read_step_table(storage.validate_uri(str(run / s)))
        assert all(len(c) == 4 for c in table.column("conversations").to_pylist()), s
    # A new version, whose report (rendered when it was published) shows the new figures; version 1 and the
    # first run's report keep the old ones.
    # (Its number may skip one: the losing publisher of the race above claimed a number, and numbers are
    # never reused.)
    latest = dv.read_latest(root, "foundational")[0]
    assert latest is not None and latest > published_version
    assert dv.versions(root, "foundational") == [published_version, latest]
    v1, v2 = (data / "datasets" / "foundational" / dv.vname(v) for v in (published_version, latest))
    selected = stats[-1]["records_kept"]
    assert _report_kept(v2)["filter"] == 12 and _report_kept(v2)["select"] == selected
    assert _report_kept(v1)["filter"] == 72
    assert _report_kept(run)["filter"] == 12
    entries = {r: json.loads(Path(index_uri(str(data), DAG, r).removeprefix("file://")).read_text())
               for r in (first, rerun)}
    assert _report_kept(data / entries[first]["path"])["filter"] == 72
    assert _report_kept(data / entries[rerun]["path"])["filter"] == 12
