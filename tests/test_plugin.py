"""The reports plugin: finds a run's report by its Airflow ids, serves a step's page, refuses anonymous callers
and paths outside the data root. Airflow's own auth manager checks the tokens (no stand-in)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from types import ModuleType
from typing import Any

import pytest

from operators.cli import build_step
from operators.core.runner import run_all
from operators.report import write_report
from tests.conftest import ROOT, migrated_airflow

RUN_ID = "manual__2026-11-28T10:00:00+00:00"
TASK = f"/runs/ingest_source/{RUN_ID}/tasks/ingest.run"
OUTSIDE = ["../", "../secret.txt", "sources/../../", "/etc", "file:///etc", "nope", "sources/p/../../.."]
BAD_RUN_IDS = ["..", "../../secret", "%2e%2e"]

# Runs inside a migrated Airflow home (token checks read its DB): requests by the plugin's app, as Airflow mounts
# it, with a JWT from Airflow's configured auth manager (the simple auth manager), as the UI's login gets one.
PROBE = """
import importlib.util, json, sys
from fastapi.testclient import TestClient
from airflow.api_fastapi.app import create_auth_manager
from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
token = create_auth_manager().generate_jwt(SimpleAuthManagerUser(username="admin", role="admin"))
spec = importlib.util.spec_from_file_location("iip_reports", sys.argv[1])
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
client = TestClient(mod.create_app())
out = []
for path, params, auth in json.loads(sys.argv[2]):
    headers, cookies = {}, {}
    if auth == "bearer": headers["Authorization"] = "Bearer " + token
    elif auth == "cookie": cookies["_token"] = token
    elif auth == "forged": headers["Authorization"] = "Bearer not-a-token"
    r = client.get(path, params=params, headers=headers, cookies=cookies)
    out.append({"status": r.status_code, "text": r.text})
print("PROBE " + json.dumps(out))
"""


def load_plugin() -> ModuleType:
    spec = importlib.util.spec_from_file_location("iip_reports", ROOT / "plugins" / "iip_reports.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


REQUESTS: list[tuple[str, dict[str, str], str]] = [
    ("/reports", {}, "none"), (f"/runs/ingest_source/{RUN_ID}", {}, "none"), (TASK, {}, "none"),
    ("/reports/view", {"path": "sources/p"}, "none"), ("/reports", {}, "forged"),
    ("/reports", {}, "bearer"), (f"/runs/ingest_source/{RUN_ID}", {}, "cookie"), (TASK, {}, "bearer"),
    (f"/runs/ingest_source/{RUN_ID}/report.json", {}, "bearer"), ("/runs/ingest_source/manual__other", {}, "bearer"),
    *[("/reports/view", {"path": p}, "bearer") for p in OUTSIDE],
    *[(f"/runs/ingest_source/{r}", {}, "bearer") for r in BAD_RUN_IDS],
]


@pytest.fixture(scope="module")
def responses(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str, str], dict[str, Any]]:
    """Every request of REQUESTS answered by the plugin inside a real, migrated Airflow home."""
    env, data = migrated_airflow(tmp_path_factory)
    raw = data.parent / "raw.jsonl"
    raw.write_text(json.dumps({"conversations": [{"from": "human", "value": "hi there, how are you?"},
                                                 {"from": "gpt", "value": "fine"}]}) + "\n{broken\n")
    run_all(build_step("ingest", {"source_name": "p"}), [str(raw)], str(data / "sources" / "p" / "ingest"))
    write_report(str(data / "sources" / "p"), run={"dag_id": "ingest_source", "run_id": RUN_ID,
                                                   "logical_date": "2026-11-28T10:00:00+00:00"},
                 index_root=str(data))
    (data.parent / "secret.txt").write_text("outside the root")
    r = subprocess.run([sys.executable, "-c", PROBE, str(ROOT / "plugins" / "iip_reports.py"), json.dumps(REQUESTS)],
                       env={**env, "IIP_DATA_ROOT": str(data)}, capture_output=True, text=True, timeout=300, cwd=ROOT)
    line = next((x for x in r.stdout.splitlines() if x.startswith("PROBE ")), None)
    assert line is not None, r.stderr[-3000:]
    answers = json.loads(line[len("PROBE "):])
    return {(p, json.dumps(q, sort_keys=True), a): ans for (p, q, a), ans in zip(REQUESTS, answers, strict=True)}


def get(responses: dict[tuple[str, str, str], dict[str, Any]], path: str, auth: str,
        params: dict[str, str] | None = None) -> dict[str, Any]:
    return responses[(path, json.dumps(params or {}, sort_keys=True), auth)]


def test_anonymous_and_forged_requests_are_refused(responses: dict[tuple[str, str, str], dict[str, Any]]) -> None:
    for path, params, auth in REQUESTS:
        if auth == "none":
            r = get(responses, path, auth, params)
            assert r["status"] == 401, path
            assert "bad_json" not in r["text"]
    assert get(responses, "/reports", "forged")["status"] in (401, 403)


def test_run_tab_task_tab_and_index(responses: dict[tuple[str, str, str], dict[str, Any]]) -> None:
    r = get(responses, "/reports", "bearer")
    assert r["status"] == 200 and "ingest_source" in r["text"] and RUN_ID in r["text"] and "sources/p" in r["text"]
    r = get(responses, f"/runs/ingest_source/{RUN_ID}", "cookie")  # the UI's session cookie, as an iframe sends it
    assert r["status"] == 200 and "<svg" in r["text"] and "bad_json" in r["text"] and "{broken" in r["text"]
    r = get(responses, TASK, "bearer")
    assert r["status"] == 200 and "ingest: ingest" in r["text"] and "1 / 2 (50.0%)" in r["text"]
    step = json.loads(get(responses, f"/runs/ingest_source/{RUN_ID}/report.json", "bearer")["text"])["steps"][0]
    assert (step["records_in"], step["records_kept"], step["dropped_by_reason"]) == (2, 1, {"bad_json": 1})
    r = get(responses, "/runs/ingest_source/manual__other", "bearer")
    assert r["status"] == 200 and "No report for this run yet" in r["text"]


@pytest.mark.parametrize("path", OUTSIDE)
def test_view_refuses_paths_outside_root_or_missing(responses: dict[tuple[str, str, str], dict[str, Any]],
                                                    path: str) -> None:
    r = get(responses, "/reports/view", "bearer", {"path": path})
    assert r["status"] in (400, 404)
    assert "outside the root" not in r["text"]


@pytest.mark.parametrize("run_id", BAD_RUN_IDS)
def test_run_ids_cannot_walk_out_of_the_index(responses: dict[tuple[str, str, str], dict[str, Any]],
                                              run_id: str) -> None:
    r = get(responses, f"/runs/ingest_source/{run_id}", "bearer")
    assert r["status"] in (200, 404) and "outside the root" not in r["text"]


def test_step_page_mapping() -> None:
    plugin = load_plugin()
    entry = {"pages": {"filter": "_report/step-filter.html", "near_dedup": "_report/step-near_dedup.html"}}
    assert plugin.step_page(entry, "near_dedup.pairs") == "_report/step-near_dedup.html"
    assert plugin.step_page(entry, "filter.run") == "_report/step-filter.html"
    assert plugin.step_page(entry, "validate") == "_report/validation.html"
    assert plugin.step_page(entry, "report") == "report.html"
