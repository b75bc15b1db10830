"""The run report, in three layers kept apart:

    collect.py   what the run committed -> one report dict (report.json)
    figures.py   numbers -> SVG figures (pure), charts.py: one function per chart of the report
    render.py    dict + figures -> one self-contained HTML page (+ a page per step, + Markdown)

`write_report` runs the three and writes the files beside the run; with a run context it also writes that run's
own copy and a small index entry `<index root>/_reports/<dag>/<run>.json`, which is how the Airflow plugin finds
a run's report without listing a data root of millions of parts. The plugin only serves these files. A published
dataset version carries its own copy, rendered when it is published (operators/datasets/versions.py).
"""

from __future__ import annotations

import json
from typing import Any

from operators.core import storage
from operators.orchestration.settings import safe_name
from operators.report.collect import build_report
from operators.report.render import anchor, render_html, render_markdown, render_step_page, render_validation_page

PAGES_DIR = "_report"
INDEX_DIR = "_reports"
RUNS_DIR = "_runs"  # per Airflow run: the report as that run left it


def index_uri(index_root: str, dag_id: str, run_id: str) -> str:
    """Where the index entry of (dag_id, run_id) lives."""
    return storage.join(storage.validate_uri(index_root), INDEX_DIR, safe_name(dag_id), safe_name(run_id) + ".json")


def run_report_dir(root: str, dag_id: str, run_id: str) -> str:
    """Where the frozen copy of one Airflow run's report of `root` lives."""
    return storage.join(root, RUNS_DIR, safe_name(dag_id), safe_name(run_id))


def render_report_files(report: dict[str, Any]) -> dict[str, bytes]:
    """A built report rendered: report.json/.md/.html and the per-step pages, by path within a report folder."""
    files = {"report.json": json.dumps(report, indent=1, default=str).encode(),
             "report.md": render_markdown(report).encode(), "report.html": render_html(report).encode()}
    for s in report["steps"]:
        files[f"{PAGES_DIR}/{anchor(s['dir'])}.html"] = render_step_page(report, s["dir"]).encode()
    files[f"{PAGES_DIR}/validation.html"] = render_validation_page(report).encode()
    return files


def _write_files(files: dict[str, bytes], dest: str) -> dict[str, str]:
    for rel, data in files.items():
        storage.write_bytes(storage.join(dest, rel), data)
    return {"json": storage.join(dest, "report.json"), "markdown": storage.join(dest, "report.md"),
            "html": storage.join(dest, "report.html")}


def write_report_files(report: dict[str, Any], dest: str) -> dict[str, str]:
    """Render a built report into `dest`: report.json/.md/.html and the per-step pages; returns their URIs."""
    return _write_files(render_report_files(report), dest)


def write_report(root: str, run: dict[str, Any] | None = None, index_root: str | None = None) -> dict[str, str]:
    """Build the report of `root`, write report.json/.md/.html and the per-step pages; returns their URIs.

    With a run context and an index root, the run's own copy is written too (under `_runs/<dag>/<run>`), and
    the index entry points at it: a later run into the same folder rewrites the folder's report, and this
    run's page must keep showing this run's figures."""
    report = build_report(root, run)
    root = report["root"]
    files = render_report_files(report)  # once, for the folder's copy and the run's
    out = _write_files(files, root)
    if run and index_root and run.get("dag_id") and run.get("run_id"):
        index_root = storage.validate_uri(index_root)
        if not (root == index_root or root.startswith(index_root.rstrip("/") + "/")):
            raise ValueError(f"report root {root} is not under the index root {index_root}")
        frozen = run_report_dir(root, str(run["dag_id"]), str(run["run_id"]))
        _write_files(files, frozen)
        steps = report["steps"]
        entry = {**run, "path": frozen[len(index_root):].strip("/"), "folder": root[len(index_root):].strip("/"),
                 "generated_at": report["generated_at"],
                 "steps": len(steps), "records_in": steps[0]["records_in"] if steps else 0,
                 "records_kept": steps[-1]["records_kept"] if steps else 0,
                 "pages": {s["dir"]: f"{PAGES_DIR}/{anchor(s['dir'])}.html" for s in steps}}
        out["index"] = index_uri(index_root, run["dag_id"], run["run_id"])
        storage.write_bytes(out["index"], json.dumps(entry, indent=1).encode())
    return out


__all__ = ["INDEX_DIR", "PAGES_DIR", "RUNS_DIR", "build_report", "index_uri", "render_html", "render_report_files",
           "run_report_dir", "write_report", "write_report_files"]
