"""Quality gates: great-expectations suites over a committed step's output, with a readable report.

The suite checks what downstream training relies on: canonical columns present, non-null unique ids,
at least one exchange per record, no empty turn, a conversation that starts with a human (or system)
turn, and a label struct on every row. Each part file is validated as its own batch (memory bounded by
a part), id uniqueness is checked globally with 64-bit hashes, and any failure fails the task with the
failing expectations and sample values named.
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from operators.core import storage
from operators.core.arrays import count_repeats
from operators.core.manifest import read_manifest, step_manifest_uri
from operators.schema import CANONICAL_SCHEMA

log = logging.getLogger("operators.validate")


class ValidationFailed(RuntimeError):
    """The output broke one or more expectations."""


def _profile(table: pa.Table) -> Any:
    """One row per record with the columns the suite checks (a small pandas frame)."""
    import pandas as pd

    convs = table.column("conversations").to_pylist()
    return pd.DataFrame({
        "id": table.column("id").to_pylist(),
        "n_turns": [len(c or []) for c in convs],
        "min_turn_chars": [min((len(t["value"].strip()) for t in c), default=0) for c in convs],
        "first_role": [c[0]["from"] if c else None for c in convs],
        "has_label": [lab is not None for lab in table.column("label").to_pylist()],
    })


def _suite(gx: Any) -> Any:
    e = gx.expectations
    suite = gx.ExpectationSuite(name="iip_canonical_records")
    for exp in (
        e.ExpectColumnValuesToNotBeNull(column="id"),
        e.ExpectColumnValuesToBeUnique(column="id"),
        e.ExpectColumnValuesToBeBetween(column="n_turns", min_value=2),
        e.ExpectColumnValuesToBeBetween(column="min_turn_chars", min_value=1),
        e.ExpectColumnValuesToBeInSet(column="first_role", value_set=["human", "system"]),
        e.ExpectColumnValuesToBeInSet(column="has_label", value_set=[True]),
    ):
        suite.add_expectation(exp)
    return suite


# Bump when the suite changes: a report made by another suite is not reused.
SUITE_VERSION = 1


class PartChecks:
    """The suite, run part by part (memory bounded by a part); what the parts showed, summed per expectation.

    One per task: a shard task of the tail (operators/tail.py) checks its own parts, `validate_step` all of
    them; `write_validation` merges the states."""

    def __init__(self) -> None:
        import great_expectations as gx  # slow to import: only when validating, never at DAG parse time

        context = gx.get_context(mode="ephemeral")
        try:  # progress bars would flood task logs
            from great_expectations.data_context.types.base import ProgressBarsConfig

            context.variables.progress_bars = ProgressBarsConfig(globally=False)
        except (ImportError, AttributeError):
            pass
        self._batch = context.data_sources.add_pandas("records").add_dataframe_asset("parts") \
            .add_batch_definition_whole_dataframe("part")
        self._suite = context.suites.add(_suite(gx))
        self.parts: list[dict[str, Any]] = []
        self.checks: dict[str, dict[str, Any]] = {}  # per expectation, summed over parts
        self.failures: list[dict[str, Any]] = []

    def check(self, path: str, table: pa.Table) -> Any:
        """Validate one part; returns its profile frame (the caller may hash its ids)."""
        frame = _profile(table)
        result = self._batch.get_batch(batch_parameters={"dataframe": frame}).validate(self._suite)
        self.parts.append({"part": path, "rows": len(frame), "success": bool(result["success"])})
        for r in result["results"]:
            cfg = r["expectation_config"]
            _tally(self.checks, cfg["type"], cfg["kwargs"], r["result"], bool(r["success"]))
            if not r["success"]:
                self.failures.append({"expectation": cfg["type"], "column": cfg["kwargs"].get("column"),
                                      "part": path, "unexpected": r["result"].get("partial_unexpected_list", [])[:5],
                                      "unexpected_count": r["result"].get("unexpected_count")})
        return frame

    def state(self) -> dict[str, Any]:
        """What the parts showed, as JSON-able data (a shard task's summary carries it to the commit)."""
        return {"parts": self.parts, "checks": self.checks, "failures": self.failures}


def step_commit(step_dir: str) -> str:
    """sha256 of a committed step's manifest: the same value exactly when it is the same committed output."""
    return hashlib.sha256(storage.read_bytes(step_manifest_uri(step_dir))).hexdigest()


def missing_columns(step_dir: str) -> list[str]:
    """Canonical columns the step's first data part lacks (every part has the step's one schema)."""
    m = read_manifest(step_manifest_uri(step_dir))
    files = m.data_files() if m is not None else []
    return sorted(set(CANONICAL_SCHEMA.names) - set(files and _columns(step_dir, files[0].path)))


def write_validation(step_dir: str, commit: str, states: list[dict[str, Any]], *, records: int,
                     duplicates: int, missing: list[str]) -> dict[str, Any]:
    """Merge part checks (`PartChecks.state()` of one or more tasks) with the run-wide checks (columns, id
    uniqueness); write validation.json/.html beside the step; raise ValidationFailed naming the failures."""
    failures: list[dict[str, Any]] = []
    if missing:
        failures.append({"expectation": "canonical columns present", "part": "*", "unexpected": missing})
    checks: dict[str, dict[str, Any]] = {}
    for st in states:
        failures += st["failures"]
        for key, row in st["checks"].items():
            _merge_check(checks, key, row)
    if duplicates:
        failures.append({"expectation": "ids unique across all parts", "part": "*", "unexpected_count": duplicates})
    expectations = [
        {"expectation": "canonical columns present", "column": None, "kwargs": {"columns": CANONICAL_SCHEMA.names},
         "observed": f"missing {missing}" if missing else "all present", "success": not missing},
        *checks.values(),
        {"expectation": "ids unique across all parts", "column": "id", "kwargs": {},
         "observed": f"{duplicates} duplicate ids in {records}", "success": not duplicates,
         "unexpected_count": duplicates},
    ]
    report = {"step_dir": step_dir, "commit": commit, "suite_version": SUITE_VERSION, "records": records,
              "success": not failures, "parts": [p for st in states for p in st["parts"]],
              "expectations": expectations, "failures": failures}
    storage.write_bytes(storage.join(step_dir, "validation.json"), json.dumps(report, indent=2, default=str).encode())
    storage.write_bytes(storage.join(step_dir, "validation.html"), _html(report).encode())
    if failures:
        raise ValidationFailed(_failure_message(failures))
    return report


def validate_step(step_dir: str) -> dict[str, Any]:
    """Validate every data part of a committed step; write validation.json/.html; raise on failure.

    A report already written for this very commit (the step manifest's bytes) by this suite is the answer: a
    night with nothing new, or a re-run, does not validate the same data again (nor pay great-expectations'
    import, 6 s on one core). The DAGs validate in the tail's shard tasks instead (operators/tail.py)."""
    step_dir = storage.validate_uri(step_dir)
    m = read_manifest(step_manifest_uri(step_dir))
    if m is None:
        raise ValidationFailed(f"no committed step at {step_dir}")
    commit = step_commit(step_dir)
    earlier = earlier_report(step_dir, commit)
    if earlier is not None:
        if not earlier["success"]:
            raise ValidationFailed(_failure_message(earlier["failures"]))
        return earlier
    checks = PartChecks()
    seen: list[np.ndarray] = []
    for f in m.data_files():
        with storage.open_input(storage.join(step_dir, f.path)) as fh:
            frame = checks.check(f.path, pq.read_table(fh))
        seen.append(np.array([xxhash.xxh3_64_intdigest(i.encode()) for i in frame["id"]], dtype=np.uint64))
    ids = np.concatenate(seen) if seen else np.empty(0, np.uint64)
    return write_validation(step_dir, commit, [checks.state()], records=len(ids), duplicates=count_repeats(ids),
                            missing=missing_columns(step_dir))


def _failure_message(failures: list[dict[str, Any]]) -> str:
    return "; ".join(f"{x['expectation']} failed ({x.get('column') or ''} in {x['part']}: "
                     f"{x.get('unexpected_count') or x.get('unexpected')})" for x in failures[:5])


def earlier_report(step_dir: str, commit: str) -> dict[str, Any] | None:
    """validation.json when this suite wrote it for `commit`; None otherwise (absent, unreadable, stale)."""
    report = storage.read_json_object(storage.join(step_dir, "validation.json"))
    if report is None or report.get("commit") != commit or report.get("suite_version") != SUITE_VERSION:
        return None
    log.info("validation: %s already validated for this commit (%s): %s", step_dir, commit[:12],
             "passed" if report["success"] else "failed")
    return report


def _tally(checks: dict[str, dict[str, Any]], kind: str, kwargs: dict[str, Any], result: dict[str, Any],
           ok: bool) -> None:
    """Add one part's result of one expectation to its run-wide row (counts add, success needs every part)."""
    column = kwargs.get("column")
    shown = {k: v for k, v in kwargs.items() if k not in ("column", "batch_id") and v is not None}
    _merge_check(checks, f"{kind}:{column}", {
        "expectation": kind, "column": column, "kwargs": shown, "element_count": int(result.get("element_count") or 0),
        "unexpected_count": int(result.get("unexpected_count") or 0), "success": ok,
        "sample_unexpected": list(result.get("partial_unexpected_list") or [])[:5]})


def _merge_check(checks: dict[str, dict[str, Any]], key: str, row: dict[str, Any]) -> None:
    """Add a row of an expectation (one part's, or one task's sum) to the merged one."""
    into = checks.setdefault(key, {**row, "element_count": 0, "unexpected_count": 0, "success": True,
                                   "sample_unexpected": []})
    into["element_count"] += row["element_count"]
    into["unexpected_count"] += row["unexpected_count"]
    into["success"] = into["success"] and row["success"]
    into["sample_unexpected"] = (into["sample_unexpected"] + row["sample_unexpected"])[:5]
    into["observed"] = f"{into['unexpected_count']} of {into['element_count']} unexpected"


def _columns(step_dir: str, rel: str) -> list[str]:
    with storage.open_input(storage.join(step_dir, rel)) as fh:
        return list(pq.read_schema(fh).names)


def _html(report: dict[str, Any]) -> str:
    rows = "".join(f"<tr><td>{html.escape(p['part'])}</td><td>{p['rows']}</td><td>{'ok' if p['success'] else 'FAIL'}"
                   f"</td></tr>" for p in report["parts"])
    fails = "".join(f"<li>{html.escape(json.dumps(f, default=str))}</li>" for f in report["failures"])
    checks = "".join(
        f"<tr><td>{html.escape(str(x['expectation']))}</td><td>{html.escape(str(x.get('column') or ''))}</td>"
        f"<td>{html.escape(json.dumps(x.get('kwargs') or {}, default=str))}</td>"
        f"<td>{html.escape(str(x.get('observed', '')))}</td><td>{'pass' if x['success'] else 'FAIL'}</td></tr>"
        for x in report["expectations"])
    return (f"<!doctype html><meta charset='utf-8'><title>Validation</title><h1>Validation: "
            f"{'passed' if report['success'] else 'FAILED'}</h1><p>{html.escape(report['step_dir'])}: "
            f"{report['records']} records</p><h2>Expectations</h2><table><tr><th>expectation</th><th>column</th>"
            f"<th>arguments</th><th>observed</th><th>result</th></tr>{checks}</table>"
            f"<h2>Failures</h2><ul>{fails or '<li>none</li>'}</ul>"
            f"<h2>Parts</h2><table><tr><th>part</th><th>rows</th><th>result</th></tr>{rows}</table>")
