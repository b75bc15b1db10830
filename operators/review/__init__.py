"""Drift review of a `conversational_synthesis` run: people mark a sample of evolved instructions.

    sample.py   a seeded sample of the run's evolved instructions, stratified by (strategy, round), each beside
                its seed; written once as `<run>/review/sample.json`, shared by every reviewer
    marks.py    one versioned marks file per reviewer, `<run>/review/marks/<reviewer>.json`, compare-and-swap
    stats.py    error rate per (strategy, round) with a 95% Wilson interval, agreement between reviewers, and
                the gate that marks a run "needs a stronger validator"

Pure logic and storage only: the Airflow plugin (plugins/iip_review.py) and the report call these.
"""

from __future__ import annotations

REVIEW_DIR = "review"

__all__ = ["REVIEW_DIR"]
