"""The report task in a real Airflow run: it writes the run's report and index entry even when a step failed,
and the run still ends failed (the report is a teardown that does not decide the run's state)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import dags_test, migrated_airflow


def _finished_state(log: str) -> str:
    m = re.findall(r"DagRun Finished: .*?state=(\w+)", log)
    assert m, log[-3000:]
    return m[-1]


@pytest.mark.integration
def test_a_failed_run_still_gets_its_report_and_stays_failed(tmp_path_factory: pytest.TempPathFactory) -> None:
    env, data = migrated_airflow(tmp_path_factory)
    missing = data.parent / "no-such-corpus.jsonl"  # the plan task fails: no input
    r = dags_test(env, "ingest_source", "-c",
                json.dumps({"source_uri": str(missing), "source_name": "broken"}), timeout=600)
    assert _finished_state(r.stdout + r.stderr) == "failed"
    (entry_file,) = (data / "_reports" / "ingest_source").glob("*.json")
    entry = json.loads(entry_file.read_text())
    assert entry["dag_id"] == "ingest_source" and entry["folder"] == "sources/broken" and entry["steps"] == 0
    page = Path(data / "sources" / "broken" / "report.html").read_text()
    assert "No step of this run has committed yet" in page and entry["run_id"] in page
