"""Crash anywhere: Phase 1 tasks killed (like kill -9) inside their commit windows, retried, then compared
with an uninterrupted run (bench/crash_anywhere.py is the harness; run it with no sample for every window).

The kills use the fault hook (operators/core/faults.py, IIP_FAULT): a timed kill cannot land reliably in a
window that lasts microseconds, such as between a part's upload and the manifest that commits it.
"""

from __future__ import annotations

from pathlib import Path

from bench.crash_anywhere import PIPELINE, run


def test_kills_at_seeded_windows_of_every_phase1_step_change_nothing(tmp_path: Path) -> None:
    result = run(records=200, per_step=4, seed=7, work=tmp_path)
    print(result)
    assert result["problems"] == []
    # Every planned kill really killed a task (status 137), and each killed task's retry succeeded.
    assert result["kills"] == result["kills_planned"] >= 4 * len(PIPELINE)
    assert result["crashes_survived"] == result["kills"]
    # The sample reaches every window kind and every kind of task.
    assert set(result["kills_by_point"]) == {"part.written", "write.temp", "commit.before", "commit.after"}
    assert set(result["kills_by_task_kind"]) == {"plan", "map", "partition", "stage", "run", "reduce"}
