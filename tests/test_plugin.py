"""The reports plugin: lists and serves committed reports, refuses paths outside the data root."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
from fastapi.testclient import TestClient

from operators.cli import build_step
from operators.core.runner import run_all
from operators.report import write_report
from tests.conftest import ROOT


def load_plugin() -> ModuleType:
    spec = importlib.util.spec_from_file_location("iip_reports", ROOT / "plugins" / "iip_reports.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture()
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> TestClient:
    raw = tmp_path / "raw.jsonl"
    raw.write_text(json.dumps({"conversations": [{"from": "human", "value": "hi there, how are you?"},
                                                 {"from": "gpt", "value": "fine"}]}) + "\n{broken\n")
    run_all(build_step("ingest", {"source_name": "p"}), [str(raw)], str(tmp_path / "data" / "sources" / "p" / "ingest"))
    write_report(str(tmp_path / "data" / "sources" / "p"))
    (tmp_path / "secret.txt").write_text("outside the root")
    monkeypatch.setenv("IIP_DATA_ROOT", str(tmp_path / "data"))
    return TestClient(load_plugin().create_app())


def test_index_lists_reports_and_view_serves_them(client: TestClient) -> None:
    r = client.get("/reports")
    assert r.status_code == 200 and "sources/p" in r.text
    r = client.get("/reports/view", params={"path": "sources/p"})
    assert r.status_code == 200 and "bad_json" in r.text
    r = client.get("/reports/view", params={"path": "sources/p", "format": "json"})
    step = r.json()["steps"][0]
    assert (step["records_in"], step["records_kept"], step["dropped_by_reason"]) == (2, 1, {"bad_json": 1})


@pytest.mark.parametrize("path", ["../", "../secret.txt", "sources/../../", "nope"])
def test_view_refuses_paths_outside_root_or_missing(client: TestClient, path: str) -> None:
    r = client.get("/reports/view", params={"path": path})
    assert r.status_code in (400, 404)
    assert "outside the root" not in r.text
