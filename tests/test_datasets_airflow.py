"""Dataset versions in real Airflow: a publish task records an asset event on `iip://datasets/<name>` with the
version in `extra`; the consuming DAGs schedule on those assets only when IIP_ASSET_SCHEDULES is on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from operators.cli import build_step
from operators.core import storage
from operators.core.runner import run_all
from tests.conftest import ROOT, dag_info, dags_test, migrated_airflow
from tests.test_exports_consumers import SCHEMA, pool

# A DAG that is exactly the publishing tail of the real DAGs (validate -> export -> publish -> report).
PUBLISH_DAG = '''
from datetime import datetime
from airflow.sdk import Param, dag
from operators.orchestration.dag_builder import publish_tasks

@dag(dag_id="publish_only", schedule=None, start_date=datetime(2026, 1, 1), catchup=False,
     params={"run": Param("", type="string"), "keep_versions": Param(1, type="integer", minimum=1)})
def publish_only():
    publish_tasks("select", "{{ params.run }}/select", "{{ params.run }}", dataset="tiny")

publish_only()
'''

EVENTS = """
import json
from airflow.models.asset import AssetEvent, AssetModel
from airflow.utils.session import create_session
with create_session() as s:
    rows = s.query(AssetModel.uri, AssetEvent.extra).join(AssetEvent, AssetEvent.asset_id == AssetModel.id).all()
print(json.dumps([{"uri": u, "extra": e} for u, e in rows]))
"""


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    dags = tmp_path_factory.mktemp("dags")
    (dags / "publish_only.py").write_text(PUBLISH_DAG)
    return migrated_airflow(tmp_path_factory, {"AIRFLOW__CORE__DAGS_FOLDER": str(dags),
                                               "PYTHONPATH": str(ROOT)})[0]


def test_publish_task_records_asset_event_with_version(home: dict[str, str], tmp_path: Path) -> None:
    run = Path(home["IIP_DATA_ROOT"]) / "runs" / "p1"  # the report indexes runs under the data root
    select = storage.validate_uri(str(run / "select"))
    # Publish, publish the same output again (a skip: no version, no event), then a changed output.
    logs = []
    for raw, n in (("raw", 35), ("raw", 35), ("raw2", 30)):
        if not (tmp_path / raw).exists():
            (tmp_path / raw).mkdir()
            rows = [r for r in pool(n) if r["label"]]  # labelled records: the validation suite requires labels
            pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), tmp_path / raw / "p.parquet")
            run_all(build_step("select", {"budgets": {}}), [str(tmp_path / raw)], select)
        r = dags_test(home, "publish_only", "-c", json.dumps({"run": str(run)}))
        assert r.returncode == 0, "\n".join(x for x in (r.stdout + r.stderr).splitlines() if "rror" in x)[-5000:]
        logs.append(r.stdout + r.stderr)
    assert ["tiny v0001 unchanged: LATEST already is this output" in log for log in logs] == [False, True, False]
    out = subprocess.run([sys.executable, "-c", EVENTS], env=home, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    events = json.loads(out.stdout.strip().splitlines()[-1])
    assert [e["uri"] for e in events] == ["iip://datasets/tiny"] * 2
    assert sorted(e["extra"]["version"] for e in events) == [1, 2]
    assert {e["extra"]["step_dir"] for e in events} == {select}
    data = Path(home["IIP_DATA_ROOT"]) / "datasets" / "tiny"
    assert json.loads((data / "LATEST").read_text())["version"] == 2
    # keep_versions=1: the second publish removed v1; the run's report task ran after publish (a teardown, last).
    assert not (data / "v0001" / "_VERSION.json").exists() and (data / "v0002" / "_VERSION.json").exists()
    assert (run / "report.json").exists()


def test_consumers_schedule_on_assets_only_when_opted_in(home: dict[str, str]) -> None:
    env = {**home, "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags")}
    for on in ("", "1"):
        env["IIP_ASSET_SCHEDULES"] = on
        conv, train = dag_info(env, "conversational_synthesis"), dag_info(env, "two_stage_finetune")
        assert conv["errors"] == {} and "publish" in conv["tasks"] and "keep_versions" in conv["params"]
        if on:
            assert "iip://datasets/foundational" in conv["schedule"]
            assert "iip://datasets/conversational" in train["schedule"]
        else:
            assert conv["schedule"] == train["schedule"] == "None"
    found = dag_info(env, "foundational_selection")
    assert "publish" in found["tasks"] and "keep_versions" in found["params"]


def test_asset_extra_reads_the_newest_triggering_event() -> None:
    """What the consumers' templates do with `triggering_asset_events` (Airflow's own accessor and event type)."""
    from datetime import UTC, datetime

    from airflow.sdk.execution_time.comms import AssetEventDagRunReferenceResult
    from airflow.sdk.execution_time.context import TriggeringAssetEventsAccessor

    from operators.orchestration.dag_builder import asset_extra

    def event(version: int, day: int) -> AssetEventDagRunReferenceResult:
        return AssetEventDagRunReferenceResult.model_validate({
            "asset": {"name": "iip://datasets/f", "uri": "iip://datasets/f", "extra": {}},
            "extra": {"version": version, "step_dir": f"s3://b/runs/r{version}/select"}, "source_aliases": [],
            "source_task_id": "publish", "source_dag_id": "d", "source_run_id": "r", "source_map_index": -1,
            "timestamp": datetime(2026, 1, day, tzinfo=UTC)})

    events = TriggeringAssetEventsAccessor.build([event(2, 3), event(3, 5), event(1, 1)])
    assert asset_extra(events, "step_dir", "demo") == "s3://b/runs/r3/select"
    assert asset_extra(TriggeringAssetEventsAccessor.build([]), "step_dir", "demo") == "demo"


def test_publish_pod_runs_the_same_cli_and_collects_its_result() -> None:
    from operators.orchestration.dag_builder import dataset_asset
    from operators.orchestration.step_operator import StepOperator

    op = StepOperator(task_id="publish", action="publish", step="found", inputs=["s3://b/runs/r/select"],
                      output_uri="s3://b/runs/r", config={"keep": 3}, outlets=[dataset_asset("found")])
    kw = op.pod_kwargs({"run_id": "manual__1", "logical_date": None})
    args = kw["arguments"]
    assert args[:3] == ["datasets", "publish", "found"] and kw["do_xcom_push"] is True
    assert args[args.index("--input") + 1] == "s3://b/runs/r/select" and args[args.index("--run") + 1] == "s3://b/runs/r"
    assert json.loads(args[args.index("--config") + 1]) == {"keep": 3}
    assert json.loads(args[args.index("--run-context") + 1])["run_id"] == "manual__1"
    with pytest.raises(ValueError, match="keep"):  # a bad publish config fails before any work
        StepOperator(task_id="p", action="publish", step="found", output_uri="x", config={"keep": 0}).execute({})
