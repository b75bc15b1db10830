"""Airflow plugin: browse the dataset reports that runs write, from the Airflow UI.

Serves `/iip/reports` (an index of every report under the data root) and `/iip/reports/view?path=...`
(one report as HTML, or JSON with `format=json`). It only reads report files that steps committed;
it never runs step code. Paths are resolved strictly inside the data root.
"""

from __future__ import annotations

import html
import json
import os
from typing import Any

from airflow.plugins_manager import AirflowPlugin
from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import HTMLResponse, JSONResponse

from operators.core import storage

REPORT_FILES = ("report.html", "report.json", "report.md")


def data_root() -> str:
    return storage.validate_uri(os.environ.get("IIP_DATA_ROOT") or os.path.abspath(".data"))


def list_reports(root: str) -> list[str]:
    """Relative folders under `root` that hold a report.json."""
    out = []
    for uri in storage.list_files(root):
        if uri.endswith("/report.json"):
            out.append(uri[len(root) + 1: -len("/report.json")])
    return sorted(out)


def resolve_report(root: str, rel: str, name: str) -> str:
    """URI of report file `name` in folder `rel` under `root`; refuses anything outside the root."""
    if name not in REPORT_FILES:
        raise HTTPException(status_code=400, detail="unknown report file")
    try:
        uri = storage.join(root, rel, name) if rel.strip("/") else storage.join(root, name)
    except storage.StorageError as e:
        raise HTTPException(status_code=400, detail=str(e)) from None
    if not storage.exists(uri):
        raise HTTPException(status_code=404, detail="no such report")
    return uri


def create_app() -> FastAPI:
    """The FastAPI app Airflow mounts under /iip."""
    app = FastAPI(title="IIP dataset reports")

    @app.get("/reports", response_class=HTMLResponse)
    def index() -> str:
        root = data_root()
        items = "".join(
            f"<li><a href='reports/view?path={html.escape(p)}'>{html.escape(p)}</a></li>"
            for p in list_reports(root)
        )
        return (f"<!doctype html><h1>Dataset reports</h1><p>{html.escape(root)}</p>"
                f"<ul>{items or '<li>none yet</li>'}</ul>")

    @app.get("/reports/view", response_model=None)
    def view(path: str = Query(..., max_length=512), format: str = "html") -> Any:
        root = data_root()
        if format == "json":
            uri = resolve_report(root, path, "report.json")
            return JSONResponse(json.loads(storage.read_bytes(uri)))
        return HTMLResponse(storage.read_bytes(resolve_report(root, path, "report.html")).decode())

    return app


class IIPReportsPlugin(AirflowPlugin):
    """Registers the reports app and a link to it in the Airflow navigation."""

    # AirflowPlugin declares these as plain class attributes, so they are overridden as such.
    name = "iip_reports"
    fastapi_apps = [{"app": create_app(), "url_prefix": "/iip", "name": "IIP dataset reports"}]  # noqa: RUF012
    external_views = [  # noqa: RUF012
        {"name": "Dataset reports", "href": "/iip/reports", "destination": "nav", "category": "browse"}
    ]
