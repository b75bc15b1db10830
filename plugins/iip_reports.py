"""Airflow plugin: the dataset reports that runs write, inside the Airflow UI.

- a "Report" tab on every DAG run (`external_views`, destination `dag_run`): `/iip/runs/{dag}/{run}`;
- a "Step report" tab on every task instance: `/iip/runs/{dag}/{run}/tasks/{task}` (that step's section);
- a "Dataset reports" page in the navigation: `/iip/reports`, every reported run with its DAG, date, state and
  records in/kept; `/iip/reports/view?path=<folder>` serves one report by its folder.

It serves files the report task wrote (report.html, the per-step pages, and the index entries under
`<data root>/_reports/`); it never runs step code or draws a figure. Every route requires an authenticated user
allowed to read DAG runs, through Airflow's own auth manager (a bearer token or the UI's session cookie); paths
are resolved strictly inside the data root.
"""

from __future__ import annotations

import html
import json
import re
from typing import Any

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.core_api.security import requires_access_dag
from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, HTTPException, Query
from fastapi.responses import HTMLResponse, JSONResponse

from operators.core import storage
from operators.orchestration.settings import data_root, safe_name

INDEX_DIR = "_reports"  # written by operators.report.write_report
PAGE = re.compile(r"^_report/[A-Za-z0-9_.\-]{1,200}\.html$")
STYLE = ("body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#0f172a}table{border-collapse:collapse}"
         "th,td{border:1px solid #e2e8f0;padding:4px 10px;text-align:left}th{background:#f8fafc}"
         "td.n{text-align:right}a{color:#2563eb}.muted{color:#64748b}")


def inside(root: str, rel: str, *names: str) -> str:
    """URI of `rel`/`names` under `root`; a 400 for anything that would leave it (.., absolute, scheme)."""
    rel = rel.strip("/")
    if "://" in rel or "\\" in rel or any(p in ("..", ".") for p in rel.split("/")):
        raise HTTPException(status_code=400, detail="path must stay inside the data root")
    try:
        uri = storage.join(root, *[p for p in (rel, *names) if p])
    except storage.StorageError as e:
        raise HTTPException(status_code=400, detail=str(e)) from None
    if not (uri == root or uri.startswith(root.rstrip("/") + "/")):
        raise HTTPException(status_code=400, detail="path must stay inside the data root")
    return uri


def index_entries(root: str) -> list[dict[str, Any]]:
    """Every reported run (newest first), from the small index the report task writes."""
    out = []
    for uri in storage.list_files(storage.join(root, INDEX_DIR)):  # a missing folder lists as empty
        if uri.endswith(".json"):
            try:
                out.append(json.loads(storage.read_bytes(uri)))
            except ValueError:
                continue
    return sorted(out, key=lambda e: str(e.get("logical_date") or e.get("generated_at") or ""), reverse=True)


def index_entry(root: str, dag_id: str, run_id: str) -> dict[str, Any] | None:
    """The index entry of one run, or None when its report task has not written one yet."""
    uri = storage.join(root, INDEX_DIR, safe_name(dag_id), safe_name(run_id) + ".json")
    return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else None


def run_states(pairs: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """Airflow's state of each (dag_id, run_id); empty when the metadata DB cannot be read (shown as unknown)."""
    if not pairs:
        return {}
    try:
        from airflow.models.dagrun import DagRun
        from airflow.utils.session import create_session
        from sqlalchemy import select, tuple_

        with create_session() as session:
            rows = session.execute(select(DagRun.dag_id, DagRun.run_id, DagRun.state).where(
                tuple_(DagRun.dag_id, DagRun.run_id).in_(pairs))).all()
        return {(d, r): str(s.value if hasattr(s, "value") else s) for d, r, s in rows}
    except Exception:  # the page must render without a reachable DB (e.g. a report-only deployment)
        return {}


def _page(title: str, body: str) -> HTMLResponse:
    return HTMLResponse(f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}"
                        f"</title><style>{STYLE}</style></head><body>{body}</body></html>")


def _not_yet(dag_id: str, run_id: str, state: str | None) -> HTMLResponse:
    return _page("No report yet", (
        f"<h2>No report for this run yet</h2><p>{html.escape(dag_id)} / {html.escape(run_id)}"
        f"{' is ' + html.escape(state) if state else ''}.</p><p class='muted'>The report is written by the run's "
        "<code>report</code> task, which runs after every step (also when a step failed). Come back when it has "
        "run, or open a task's log to follow progress.</p>"))


def _serve(uri: str) -> HTMLResponse:
    if not storage.exists(uri):
        raise HTTPException(status_code=404, detail="no such report")
    return HTMLResponse(storage.read_bytes(uri).decode())


def step_page(entry: dict[str, Any], task_id: str) -> str:
    """The page (relative to the run's report folder) that shows task `task_id`'s step, else the whole report."""
    group = task_id.split(".", 1)[0]
    pages: dict[str, str] = entry.get("pages") or {}
    for step_dir, page in pages.items():
        if step_dir == group or step_dir.endswith("/" + group):
            return page
    if group in ("validate", "export"):
        return "_report/validation.html"
    return "report.html"


ReadRuns = Depends(requires_access_dag("GET", DagAccessEntity.RUN))


def create_app() -> FastAPI:
    """The FastAPI app Airflow mounts under /iip."""
    app = FastAPI(title="IIP dataset reports")

    @app.get("/reports", response_class=HTMLResponse, dependencies=[ReadRuns])
    def index() -> HTMLResponse:
        root = data_root()
        entries = index_entries(root)
        states = run_states([(str(e.get("dag_id")), str(e.get("run_id"))) for e in entries])
        rows = []
        for e in entries:
            dag, run = str(e.get("dag_id")), str(e.get("run_id"))
            href = f"runs/{html.escape(dag)}/{html.escape(safe_name(run))}"
            rows.append(
                f"<tr><td>{html.escape(dag)}</td><td><a href='{href}'>{html.escape(run)}</a></td>"
                f"<td>{html.escape(str(e.get('logical_date') or e.get('generated_at') or ''))}</td>"
                f"<td>{html.escape(states.get((dag, run), 'unknown'))}</td>"
                f"<td class='n'>{int(e.get('records_in') or 0):,}</td><td class='n'>{int(e.get('records_kept') or 0):,}"
                f"</td><td>{html.escape(str(e.get('folder') or e.get('path', '')))}</td></tr>")
        table = ("<table><tr><th>DAG</th><th>run</th><th>date</th><th>state</th><th>records in</th><th>kept</th>"
                 f"<th>folder</th></tr>{''.join(rows)}</table>") if rows else "<p>No run has written a report yet.</p>"
        return _page("Dataset reports", f"<h2>Dataset reports</h2><p class='muted'>data root "
                                        f"{html.escape(root)}</p>{table}")

    @app.get("/runs/{dag_id}/{run_id}", response_class=HTMLResponse, dependencies=[ReadRuns])
    def run_report(dag_id: str, run_id: str) -> HTMLResponse:
        root = data_root()
        entry = index_entry(root, dag_id, run_id)
        if entry is None:
            return _not_yet(dag_id, run_id, run_states([(dag_id, run_id)]).get((dag_id, run_id)))
        return _serve(inside(root, str(entry["path"]), "report.html"))

    @app.get("/runs/{dag_id}/{run_id}/report.json", dependencies=[ReadRuns])
    def run_report_json(dag_id: str, run_id: str) -> JSONResponse:
        root = data_root()
        entry = index_entry(root, dag_id, run_id)
        if entry is None:
            raise HTTPException(status_code=404, detail="no report for this run yet")
        return JSONResponse(json.loads(storage.read_bytes(inside(root, str(entry["path"]), "report.json"))))

    @app.get("/runs/{dag_id}/{run_id}/tasks/{task_id}", response_class=HTMLResponse, dependencies=[ReadRuns])
    def task_report(dag_id: str, run_id: str, task_id: str) -> HTMLResponse:
        root = data_root()
        entry = index_entry(root, dag_id, run_id)
        if entry is None:
            return _not_yet(dag_id, run_id, run_states([(dag_id, run_id)]).get((dag_id, run_id)))
        page = step_page(entry, task_id)
        if page != "report.html" and not PAGE.match(page):
            raise HTTPException(status_code=400, detail="bad page name in the index")
        return _serve(inside(root, str(entry["path"]), page))

    @app.get("/reports/view", response_model=None, dependencies=[ReadRuns])
    def view(path: str = Query(..., max_length=512), format: str = "html") -> Any:
        root = data_root()
        name = "report.json" if format == "json" else "report.html"
        uri = inside(root, path, name)
        if not storage.exists(uri):
            raise HTTPException(status_code=404, detail="no such report")
        if format == "json":
            return JSONResponse(json.loads(storage.read_bytes(uri)))
        return HTMLResponse(storage.read_bytes(uri).decode())

    return app


class IIPReportsPlugin(AirflowPlugin):
    """Registers the reports app, a navigation entry, and a report tab on every run and task instance."""

    # AirflowPlugin declares these as plain class attributes, so they are overridden as such.
    name = "iip_reports"
    fastapi_apps = [{"app": create_app(), "url_prefix": "/iip", "name": "IIP dataset reports"}]  # noqa: RUF012
    external_views = [  # noqa: RUF012
        {"name": "Dataset reports", "href": "/iip/reports", "destination": "nav", "category": "browse",
         "url_route": "dataset-reports"},
        {"name": "Report", "href": "/iip/runs/{DAG_ID}/{RUN_ID}", "destination": "dag_run", "url_route": "report"},
        {"name": "Step report", "href": "/iip/runs/{DAG_ID}/{RUN_ID}/tasks/{TASK_ID}",
         "destination": "task_instance", "url_route": "step-report"},
    ]
