"""One reviewer's marks: a small versioned JSON file per reviewer, `<run>/review/marks/<reviewer>.json`.

    {"format": 1, "revision": 12, "reviewer": "alice", "sample_created_at": "...",
     "marks": {"<item id>": {"mark": "drifted", "comment": "asks about a different API", "at": "...Z"}}}

`format` is the layout's version (a reader ignores a file of another format rather than misread it); `revision`
counts the writes. Each mark is saved as it is made, by a compare-and-swap of the whole file
(`storage.read_versioned` / `compare_and_swap`: If-Match on S3, a lock and a rename locally), so two tabs of one
reviewer never lose each other's marks, and readers never see a half-written file. Files of different reviewers
never contend. Marking an item again replaces its mark (the latest wins).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from operators.core import storage
from operators.orchestration.settings import safe_name
from operators.review import REVIEW_DIR

FORMAT = 1
MARKS_DIR = "marks"
MARKS = ("faithful", "drifted", "factual_error", "unsafe", "skip")
ERRORS = frozenset(("drifted", "factual_error", "unsafe"))  # what counts against a strategy; skip counts nowhere
MAX_COMMENT = 1000
MAX_REVIEWER = 120
CAS_ATTEMPTS = 20


class MarkError(ValueError):
    """A mark that cannot be saved as asked (unknown mark or item, comment too long, bad reviewer)."""


def marks_uri(run_root: str, reviewer: str) -> str:
    """Where `reviewer`'s marks of the run live."""
    return storage.join(run_root, REVIEW_DIR, MARKS_DIR, safe_name(reviewer) + ".json")


def empty(reviewer: str) -> dict[str, Any]:
    """The marks file of a reviewer who has marked nothing yet."""
    return {"format": FORMAT, "revision": 0, "reviewer": reviewer, "marks": {}}


def _parse(data: bytes | None, reviewer: str) -> dict[str, Any]:
    if data is None:
        return empty(reviewer)
    try:
        doc = json.loads(data)
    except ValueError:
        raise MarkError(f"the marks file of {reviewer!r} is not JSON; move it away to start over") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("marks"), dict):
        raise MarkError(f"the marks file of {reviewer!r} has an unknown format {doc.get('format')!r}")
    if doc.get("reviewer") != reviewer:  # two names that map to one file name (e.g. "a b" and "a_b")
        raise MarkError(f"the marks file {safe_name(reviewer)}.json belongs to {doc.get('reviewer')!r}")
    return doc


def read_marks(run_root: str, reviewer: str) -> dict[str, Any]:
    """`reviewer`'s marks file (an empty one when they have marked nothing)."""
    data, _ = storage.read_versioned(marks_uri(run_root, reviewer))
    return _parse(data, reviewer)


def validate(sample: dict[str, Any], reviewer: str, item_id: str, mark: str, comment: str) -> str:
    """The comment to store, or a MarkError saying what is wrong with the mark."""
    if not reviewer or len(reviewer) > MAX_REVIEWER:
        raise MarkError("a reviewer needs a name of 1 to 120 characters")
    if mark not in MARKS:
        raise MarkError(f"mark must be one of {list(MARKS)}, got {mark!r}")
    if item_id not in {i["id"] for i in sample.get("items", [])}:
        raise MarkError(f"item {item_id!r} is not in this run's review sample")
    comment = comment.strip()
    if len(comment) > MAX_COMMENT:
        raise MarkError(f"comment is {len(comment)} characters; at most {MAX_COMMENT}")
    return comment


def set_mark(run_root: str, sample: dict[str, Any], reviewer: str, item_id: str, mark: str,
             comment: str = "") -> dict[str, Any]:
    """Save `reviewer`'s `mark` of `item_id` (replacing an earlier one); returns the file as written."""
    comment = validate(sample, reviewer, item_id, mark, comment)
    uri = marks_uri(run_root, reviewer)
    for _ in range(CAS_ATTEMPTS):
        data, token = storage.read_versioned(uri)
        doc = _parse(data, reviewer)
        doc["revision"] = int(doc.get("revision", 0)) + 1
        doc["sample_created_at"] = sample.get("created_at")
        doc["marks"][item_id] = {"mark": mark, "comment": comment,
                                 "at": datetime.now(UTC).isoformat(timespec="seconds")}
        if storage.compare_and_swap(uri, token, json.dumps(doc, indent=1, sort_keys=True).encode()):
            return doc
    raise MarkError(f"could not save the mark after {CAS_ATTEMPTS} tries: the file kept changing")


def all_marks(run_root: str) -> dict[str, dict[str, dict[str, Any]]]:
    """{reviewer: {item id: {mark, comment, at}}} of every reviewer of the run (files of another format skipped)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for uri in storage.list_files(storage.join(run_root, REVIEW_DIR, MARKS_DIR)):
        if not uri.endswith(".json"):
            continue
        doc = storage.read_json_object(uri)
        if doc and doc.get("format") == FORMAT and isinstance(doc.get("marks"), dict) and doc.get("reviewer"):
            out[str(doc["reviewer"])] = {str(k): v for k, v in doc["marks"].items()
                                         if isinstance(v, dict) and v.get("mark") in MARKS}
    return dict(sorted(out.items()))


__all__ = ["ERRORS", "FORMAT", "MARKS", "MAX_COMMENT", "MarkError", "all_marks", "empty", "marks_uri",
           "read_marks", "set_mark", "validate"]
